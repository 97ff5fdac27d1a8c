// CUDA kernels of the fused PLIF op, shared verbatim by the compiled extension (nvcc,
// plif_cuda.cu), the CuPy backend (NVRTC, plif_cuda/cupy_backend.py) and the CPU emulation of
// the launch that the gpu_emulation tests run (tests/gpu_emulation/). The per-neuron math is
// plif_math.h's; this file only arranges the memory traffic around it.
//
// The kernels are built for the memory roofline. The recurrence is serial in t, so a thread
// can only keep the memory system busy by loading inputs of several time steps before it runs
// the recurrence over them: every chunk of steps issues all its loads (at least 64 bytes per
// thread in float32; .ci/check_cuda_build.py reads that from the SASS) before its first store.
// The forward has two paths, picked per launch by the host with the grid (forward_shape in
// plif_launch.h) and passed in the kernel's flags (kFlagVectorPath):
//   vector: LANES consecutive neurons per thread, every [T, N] access one 16-byte word; where N
//           is a multiple of LANES, the tensors are aligned, and N is large enough that this keeps
//           at least as many bytes in flight as one neuron per thread;
//   scalar: one neuron per thread: small N (one thread per neuron, and the whole of a short
//           sequence in flight at once), misaligned tensors, N not a multiple of LANES.
// Each takes as many steps per chunk as 64 bytes of its loads need (Geometry below); the last
// chunk is shorter where T is not a multiple of the chunk, and the smooth mode (spiking=False,
// for gradcheck) runs one step at a time on the scalar path. The backward takes the checkpoints'
// chunks, one neuron per thread or, in the half types' lanes path, two (see there).
//
// ptxas is fragile here: benchmarks/NOTES.md lists what each register took.
//
// Kernel arguments are plain scalars and pointers (no structs) so that CuPy can pass them.
// Half types are CUDA's __half / __nv_bfloat16, whose bits equal c10::Half / c10::BFloat16.
#pragma once

#if !defined(__CUDACC_RTC__)
#include <string.h>  // memcpy, unqualified: NVRTC's built-in device one has no std:: name
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "plif_launch.h"
#include "plif_math.h"

// The emulation asserts the alignment of every vector access; on a GPU a misaligned vector
// access faults by itself.
#ifndef PLIF_CHECK_VECTOR_ACCESS
#define PLIF_CHECK_VECTOR_ACCESS(pointer, bytes) ((void)0)
#endif

// An optimisation barrier on a row offset: without it nvcc computes the 64-bit offsets of every
// step of a forward chunk up front, one register pair per step and stream (134 instead of 64
// registers for the fp16 forward). No code on the host. (The backward chunk fits 64 registers
// only without it.)
#if defined(__CUDA_ARCH__)
#define PLIF_KEEP_IN_ORDER(offset) asm volatile("" : "+l"(offset))
#else
#define PLIF_KEEP_IN_ORDER(offset) ((void)0)
#endif

namespace plif {

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__, which removes the
// implicit ones.
template <>
__host__ __device__ __forceinline__ float load_as<float, __half>(const __half& v) {
  return __half2float(v);
}
template <>
__host__ __device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16& v) {
  return __bfloat162float(v);
}
template <>
__host__ __device__ __forceinline__ __half store_as<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- launch geometry ---------------------------------------------------------------------------
// Neurons per thread of the forward's vector path (its scalar path and the backward take one)
// and time steps per forward chunk: a chunk loads at least kLoadBytesAhead per thread
// (plif_launch.h's chunk_steps), where a step of LANES neurons loads x. The backward's chunk is
// the checkpoint chunk (kCheckpointSteps steps of X and of the incoming gradients; see there).
template <typename in_t, typename acc_t>
struct Geometry {
  enum : int { kForwardLanes = kVectorBytes / sizeof(in_t) };
  template <int LANES>
  __host__ __device__ static constexpr int forward_steps() {
    return chunk_steps(LANES * static_cast<int>(sizeof(in_t)));
  }
  // Blocks per multiprocessor the kernels are built for (launch bounds). The forward keeps half
  // the threads of an sm_80 / sm_90 multiprocessor (64 registers each). The backward, whose chunk
  // keeps every load of its 8 steps in flight in one straight run, takes 91-113 registers (two
  // blocks: 512 threads; at 80 ptxas spilled 772 bytes; the half types' two lanes take the most)
  // and float64 138-144 (one block; at 128 the division's slow path took a stack frame on
  // sm_80-89); .ci/check_cuda_build.py lists both as exceptions with the bytes in flight they keep
  // (benchmarks/NOTES.md, "The backward in one round trip", "The half types' backward in lanes").
  enum : int {
    kForwardMinBlocks = 4,
    kBackwardMinBlocks = sizeof(acc_t) == 8 ? 1 : 2,
  };
};

// ---- accesses of LANES consecutive values ------------------------------------------------------
// Vector accesses move words of all LANES values, at most 16 bytes each: 16-byte words in the
// forward, one 4-byte word of two half values in the half types' backward.
template <int BYTES>
struct WordOfBytes {
  using type = uint4;
};
template <>
struct WordOfBytes<8> {
  using type = uint2;
};
template <>
struct WordOfBytes<4> {
  using type = unsigned int;
};
template <bool VECTOR, int LANES, typename T>
struct AccessWord {
  using type = T;
};
template <int LANES, typename T>
struct AccessWord<true, LANES, T> {
  static constexpr int kBytes = LANES * static_cast<int>(sizeof(T));
  static_assert(kBytes == 4 || kBytes == 8 || kBytes % 16 == 0, "a vector access moves whole words");
  using type = typename WordOfBytes<(kBytes < 16 ? kBytes : 16)>::type;
};

// LANES consecutive values as loaded: vector words (VECTOR: the address is aligned to the
// word), or one access per value. A value is taken out of its word only at its step, so that
// two half values in flight share one register instead of taking one each.
template <bool VECTOR, int LANES, typename T>
struct LoadedLanes {
  using Word = typename AccessWord<VECTOR, LANES, T>::type;
  static constexpr int kBytes = LANES * static_cast<int>(sizeof(T));
  static constexpr int kWords = kBytes / static_cast<int>(sizeof(Word));
  Word words[kWords];

  __device__ __forceinline__ void load(const T* __restrict__ source) {
    if constexpr (VECTOR) PLIF_CHECK_VECTOR_ACCESS(source, sizeof(Word));
    const Word* from = reinterpret_cast<const Word*>(source);
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = from[w];
  }

  __device__ __forceinline__ T operator[](int lane) const {
    T value;
    memcpy(&value, reinterpret_cast<const char*>(words) + sizeof(T) * lane, sizeof(T));
    return value;
  }
};

template <bool VECTOR, int LANES, typename T>
__device__ __forceinline__ void store_lanes(T* __restrict__ target, const T (&values)[LANES]) {
  if constexpr (VECTOR) {
    constexpr int kBytes = LANES * static_cast<int>(sizeof(T));
    using Word = typename AccessWord<true, LANES, T>::type;
    PLIF_CHECK_VECTOR_ACCESS(target, sizeof(Word));
    Word* words = reinterpret_cast<Word*>(target);
#pragma unroll
    for (int w = 0; w < static_cast<int>(kBytes / sizeof(Word)); ++w) {
      Word word;
      memcpy(&word, reinterpret_cast<const char*>(values) + sizeof(Word) * w, sizeof(Word));
      words[w] = word;
    }
  } else {
#pragma unroll
    for (int j = 0; j < LANES; ++j) target[j] = values[j];
  }
}

template <bool VECTOR, int LANES, typename out_t, typename acc_t>
__device__ __forceinline__ void store_lanes_as(out_t* __restrict__ target, const acc_t (&values)[LANES]) {
  out_t converted[LANES];
#pragma unroll
  for (int j = 0; j < LANES; ++j) converted[j] = store_as<out_t>(values[j]);
  store_lanes<VECTOR>(target, converted);
}

template <typename Pointer>
struct PointeeOf;
template <typename T>
struct PointeeOf<T*> {
  using type = T;
};

template <typename acc_t>
__device__ __forceinline__ Options<acc_t> make_options(acc_t v_threshold, acc_t v_reset, acc_t alpha, int surrogate,
                                                       int flags) {
  Options<acc_t> o;
  o.v_threshold = v_threshold;
  o.v_reset = v_reset;
  o.alpha = alpha;
  o.surrogate = surrogate;
  o.soft_reset = (flags & kFlagSoftReset) != 0;
  o.decay_input = (flags & kFlagDecayInput) != 0;
  o.detach_reset = (flags & kFlagDetachReset) != 0;
  o.spiking = (flags & kFlagSpiking) != 0;
  o.h_checkpoints = (flags & kFlagHCheckpoints) != 0;
  return o;
}

// ---- forward -----------------------------------------------------------------------------------
// v_last's element type is the one ForwardParams gives it (in_t or the compute type).
template <typename in_t, typename acc_t>
using VLast = typename PointeeOf<decltype(ForwardParams<in_t, acc_t>::v_last)>::type;

// Up to STEPS time steps from t0 for LANES neurons from n0: every load first, then the
// recurrence; returns the steps taken (fewer at the end of the sequence). The [T, N] streams
// come as __restrict__ pointers, which lets the loads of a chunk move above the stores of the
// steps before (a pointer inside ForwardParams carries no such promise).
template <int STEPS, bool VECTOR, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ int forward_chunk(const in_t* __restrict__ x, in_t* __restrict__ spikes,
                                             in_t* __restrict__ v_seq, acc_t* __restrict__ h_seq, index_t T, index_t N,
                                             index_t x_step, const Options<acc_t>& o, index_t t0, index_t n0,
                                             ForwardState<LANES, acc_t>& st) {
  const int count = T - t0 < STEPS ? static_cast<int>(T - t0) : STEPS;
  LoadedLanes<VECTOR, LANES, in_t> inputs[STEPS];
  const in_t* source = x + t0 * x_step + n0;
#pragma unroll
  for (int i = 0; i < STEPS; ++i, source += x_step) {
    if (i < count) inputs[i].load(source);
  }
  index_t row = t0 * N + n0;
#pragma unroll
  for (int i = 0; i < STEPS; ++i, row += N) {
    if (i >= count) break;
    PLIF_KEEP_IN_ORDER(row);
    acc_t h[LANES], spike[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) {
      spike[j] = forward_neuron<SURROGATE>(st.v[j], load_as<acc_t>(inputs[i][j]), st.k[j], o, h[j]);
    }
    store_lanes_as<VECTOR>(spikes + row, spike);
    // Chosen before the store's condition: a row select sunk into the store split its 16-byte
    // words into one store per neuron (.ci/check_cuda_build.py asserts the widths).
    const index_t h_row = o.h_checkpoints ? checkpoint_row(t0 + i) * N + n0 : row;
    if (h_seq != nullptr && (!o.h_checkpoints || is_checkpoint_step(t0 + i, T))) {
      store_lanes<VECTOR>(h_seq + h_row, h);
    }
    if (v_seq != nullptr) store_lanes_as<VECTOR>(v_seq + row, st.v);
  }
  return count;
}

// All T steps of the neurons n0 .. n0 + LANES - 1, in chunks of STEPS steps (the last one
// shorter). One call site of the chunk: its code is what the build's time goes into.
template <int STEPS, bool VECTOR, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void forward_neurons(const ForwardParams<in_t, acc_t>& p, const in_t* __restrict__ x,
                                                in_t* __restrict__ spikes, in_t* __restrict__ v_seq,
                                                acc_t* __restrict__ h_seq, index_t n0) {
  ForwardState<LANES, acc_t> st;
  forward_begin<LANES>(p, n0, st);
  const Options<acc_t> o = p.opts;
  for (index_t t = 0; t < p.T;) {
    t += forward_chunk<STEPS, VECTOR, LANES, SURROGATE>(x, spikes, v_seq, h_seq, p.T, p.N, p.x_step, o, t, n0, st);
  }
  forward_end<LANES>(p, n0, st);
}

// The vector path or the scalar one, as the host picked it (vector_path), each thread taking
// neurons in a grid-stride loop. The smooth mode (kRuntime) is for gradcheck: one step at a time,
// scalar path only (a fourth loop cost the other three registers).
template <int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void forward_paths(const ForwardParams<in_t, acc_t>& p, const in_t* __restrict__ x,
                                              in_t* __restrict__ spikes, in_t* __restrict__ v_seq,
                                              acc_t* __restrict__ h_seq, bool vector_path) {
  using Shape = Geometry<in_t, acc_t>;
  constexpr int kLanes = Shape::kForwardLanes;
  constexpr bool kChunked = SURROGATE != kRuntime;
  const index_t threads = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t first = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kChunked && vector_path) {
    constexpr int kSteps = Shape::template forward_steps<kLanes>();
    for (index_t n = first * kLanes; n < p.N; n += threads * kLanes) {
      forward_neurons<kSteps, true, kLanes, SURROGATE>(p, x, spikes, v_seq, h_seq, n);
    }
  } else {
    constexpr int kSteps = kChunked ? Shape::template forward_steps<1>() : 1;
    for (index_t n = first; n < p.N; n += threads) {
      forward_neurons<kSteps, false, 1, SURROGATE>(p, x, spikes, v_seq, h_seq, n);
    }
  }
}

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock, Geometry<in_t, acc_t>::kForwardMinBlocks)
    plif_forward_kernel(const in_t* __restrict__ x, const acc_t* __restrict__ k, const acc_t* __restrict__ v_init,
                        in_t* __restrict__ spikes, VLast<in_t, acc_t>* __restrict__ v_last, in_t* __restrict__ v_seq,
                        acc_t* __restrict__ h_seq, index_t k_stride, index_t v_init_stride, index_t T, index_t N,
                        index_t x_step, acc_t v_threshold, acc_t v_reset, acc_t alpha, int surrogate, int flags) {
  // The kernel's parameters are ForwardParams' fields, in their order.
  const ForwardParams<in_t, acc_t> p{x,
                                     k,
                                     v_init,
                                     spikes,
                                     v_last,
                                     v_seq,
                                     h_seq,
                                     k_stride,
                                     v_init_stride,
                                     T,
                                     N,
                                     x_step,
                                     make_options<acc_t>(v_threshold, v_reset, alpha, surrogate, flags)};
  const bool vector_path = (flags & kFlagVectorPath) != 0;
  if (p.opts.spiking) {
    forward_paths<kSpikingForward>(p, x, spikes, v_seq, h_seq, vector_path);
  } else {
    forward_paths<kRuntime>(p, x, spikes, v_seq, h_seq, vector_path);
  }
}

// ---- backward ----------------------------------------------------------------------------------
// grad_v_last's element type is the one BackwardParams gives it (that of v_last).
template <typename in_t, typename acc_t>
using GradVLast = typename PointeeOf<decltype(BackwardParams<in_t, acc_t>::grad_v_last)>::type;

// The backward takes X and H's checkpoints (kSaveCheckpoints) and walks the sequence back one
// chunk of kCheckpointSteps steps at a time, from the last. A chunk issues every load it needs
// (its X, the checkpoint before it, its incoming gradients) before anything else, recomputes its
// H from X (the forward's expressions: the same bits), then runs its steps back, each one the
// step function of plif_math.h with step T-1's and step 0's terms as predicates. So a neuron
// with T <= kCheckpointSteps makes one round trip to memory before its first store. A thread
// takes LANES consecutive neurons: one, or in the half types' lanes path two, whose values of a
// step make one 4-byte word (so a chunk keeps 64 B in flight, not 32; plif_launch.h's
// backward_shape picks the path). The chunk's H and dH/dk sit in shared memory, one column per
// thread and lane: in registers they left no room within the 64 that four resident blocks allow.
template <typename acc_t>
struct ChunkColumns {
  acc_t* h;      // h[((i + 1) * LANES + j) * kThreadsPerBlock]: H[t0 + i] of lane j; i = -1: the checkpoint H[t0 - 1]
  acc_t* dh_dk;  // dh_dk[(i * LANES + j) * kThreadsPerBlock]: dH/dk at t0 + i of lane j
};

// Lanes of the backward's widest path for a compute type: the half types' (float) two.
template <typename acc_t>
struct BackwardColumns {
  enum : int { kMaxLanes = sizeof(acc_t) == 4 ? 2 : 1 };
};

// One pair of arrays per compute type, shared by every instantiation that uses it (both paths
// of a kernel: separate arrays would pass the 48 KB of static shared memory).
template <typename acc_t>
__device__ __forceinline__ ChunkColumns<acc_t> chunk_columns() {
  constexpr int kLanes = BackwardColumns<acc_t>::kMaxLanes;
  __shared__ acc_t chunk_h[(kCheckpointSteps + 1) * kLanes * kThreadsPerBlock];
  __shared__ acc_t chunk_dh_dk[kCheckpointSteps * kLanes * kThreadsPerBlock];
  return {chunk_h + threadIdx.x, chunk_dh_dk + threadIdx.x};
}

// All T steps (T >= 1) of neurons n0 .. n0 + LANES - 1, back in time, into st. GRAD_V:
// grad_v_seq is given.
template <bool GRAD_V, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void backward_neuron_chunks(const BackwardParams<in_t, acc_t>& p,
                                                       const in_t* __restrict__ grad_spikes,
                                                       const in_t* __restrict__ grad_v_seq, const in_t* __restrict__ x,
                                                       in_t* __restrict__ grad_x, index_t n0,
                                                       BackwardState<LANES, acc_t>& st) {
  constexpr int K = kCheckpointSteps;
  constexpr bool kVector = LANES > 1;
  constexpr int kColumn = kThreadsPerBlock;  // from one lane's column to the next
  const ChunkColumns<acc_t> column = chunk_columns<acc_t>();
  const Options<acc_t> o = p.opts;
  const bool through_spike = grad_spikes != nullptr;
  acc_t grad_v_last[LANES];
#pragma unroll
  for (int j = 0; j < LANES; ++j) {
    grad_v_last[j] = p.grad_v_last != nullptr ? load_as<acc_t>(p.grad_v_last[n0 + j]) : acc_t(0);
  }
  const index_t last_chunk = (p.T - 1) / K;
  for (index_t chunk = last_chunk; chunk >= 0; --chunk) {
    const index_t t0 = chunk * K;
    const int count = p.T - t0 < K ? static_cast<int>(p.T - t0) : K;
    // Every load of the chunk first, in one straight run: steps past the end load the last
    // step's rows again, and without grad_spikes its loads read x's rows (in bounds, values
    // dropped), so that no branch splits the run. Rows are running offsets: computed per step,
    // ptxas keeps a 64-bit offset for every step.
    LoadedLanes<kVector, LANES, in_t> inputs[K], grad_s[K], grad_v[K];
    const in_t* const grad_s_rows = through_spike ? grad_spikes : x;
    const index_t grad_s_step = through_spike ? p.N : p.x_step;
    index_t x_row = t0 * p.x_step + n0;
    index_t grad_s_row = t0 * grad_s_step + n0;
    index_t row = t0 * p.N + n0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      PLIF_KEEP_IN_ORDER(row);
      inputs[i].load(x + x_row);
      grad_s[i].load(grad_s_rows + grad_s_row);
      if (GRAD_V) grad_v[i].load(grad_v_seq + row);
      if (i + 1 < count) {
        x_row += p.x_step;
        grad_s_row += grad_s_step;
        row += p.N;
      }
    }
    ForwardState<LANES, acc_t> forward;
    acc_t h_before[LANES];
    recompute_chunk_begin<LANES, SURROGATE>(p, chunk, n0, forward, h_before);
    if (chunk > 0) {
#pragma unroll
      for (int j = 0; j < LANES; ++j) column.h[j * kColumn] = h_before[j];
    }
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (i < count) {
        in_t x_step_values[LANES];
        acc_t h_step[LANES], dh_dk_step[LANES];
#pragma unroll
        for (int j = 0; j < LANES; ++j) x_step_values[j] = inputs[i][j];
        recompute_step<LANES, SURROGATE>(x_step_values, o, forward, h_step, dh_dk_step);
#pragma unroll
        for (int j = 0; j < LANES; ++j) {
          column.h[((i + 1) * LANES + j) * kColumn] = h_step[j];
          column.dh_dk[(i * LANES + j) * kColumn] = dh_dk_step[j];
        }
      }
    }
    if (chunk == last_chunk) {
      acc_t h_last[LANES];
#pragma unroll
      for (int j = 0; j < LANES; ++j) h_last[j] = column.h[(count * LANES + j) * kColumn];
      backward_begin<LANES, SURROGATE>(p, n0, h_last, st);
    }
    row = (t0 + count - 1) * p.N + n0;
#pragma unroll
    for (int i = K - 1; i >= 0; --i) {
      if (i >= count) continue;
      PLIF_KEEP_IN_ORDER(row);
      const index_t t = t0 + i;
      const bool last_step = t == p.T - 1;
      const bool membrane = through_membrane(last_step, through_spike, GRAD_V, p.grad_v_last != nullptr);
      acc_t gx[LANES];
#pragma unroll
      for (int j = 0; j < LANES; ++j) {
        const acc_t gs = through_spike ? load_as<acc_t>(grad_s[i][j]) : acc_t(0);
        const acc_t gv = (GRAD_V ? load_as<acc_t>(grad_v[i][j]) : acc_t(0)) + (last_step ? grad_v_last[j] : acc_t(0));
        gx[j] = backward_neuron_step<SURROGATE>(t > 0, t > 0 ? column.h[(i * LANES + j) * kColumn] : acc_t(0),
                                                column.dh_dk[(i * LANES + j) * kColumn], gs, gv, through_spike,
                                                membrane, o, st, j);
      }
      store_lanes_as<kVector>(grad_x + row, gx);
      row -= p.N;
    }
  }
}

// This thread's sums of the shares of a shared k and v_init (plif_math.h's "the gradient of a
// shared parameter"): its neurons' shares in grid-stride order.
struct ThreadShares {
  double grad_k = 0.0;
  double grad_v_init = 0.0;
};

// LANES neurons per thread, in a grid-stride loop. GRAD_V: grad_v_seq is given; the loops with and
// without it are compiled apart (in one loop the chunks of both cost registers for both). A null
// grad_k (grad_v_init), and then null partials, is a gradient nobody asked for: nothing of it is
// stored or summed.
template <bool GRAD_V, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void backward_neurons(const BackwardParams<in_t, acc_t>& p,
                                                 const in_t* __restrict__ grad_spikes,
                                                 const in_t* __restrict__ grad_v_seq, const in_t* __restrict__ x,
                                                 in_t* __restrict__ grad_x, ThreadShares& shares) {
  const index_t threads = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t first = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (index_t n0 = first * LANES; n0 < p.N; n0 += threads * LANES) {
    BackwardState<LANES, acc_t> st;
    backward_neuron_chunks<GRAD_V, LANES, SURROGATE>(p, grad_spikes, grad_v_seq, x, grad_x, n0, st);
#pragma unroll
    for (int j = 0; j < LANES; ++j) {
      if (p.grad_k_partials != nullptr) {
        shares.grad_k += grad_k_of_lane(p, st, j);
      } else if (p.grad_k != nullptr) {
        p.grad_k[n0 + j] = grad_k_of_lane(p, st, j);
      }
      if (p.grad_v_init_partials != nullptr) {
        shares.grad_v_init += grad_v_init_of_lane(st, j);
      } else if (p.grad_v_init != nullptr) {
        p.grad_v_init[n0 + j] = grad_v_init_of_lane(st, j);
      }
    }
  }
}

// The thread block's partial sum of a shared parameter's shares, into partials[blockIdx.x]. Every
// thread of the block calls it (the condition on the pointer is uniform over the launch).
__device__ __forceinline__ void store_block_partial(double thread_share, double* __restrict__ partials) {
  __shared__ double thread_shares[kThreadsPerBlock];
  thread_shares[threadIdx.x] = thread_share;
  __syncthreads();
  if (threadIdx.x == 0) partials[blockIdx.x] = sum_in_fixed_order(thread_shares, static_cast<index_t>(blockDim.x));
  __syncthreads();  // the next call writes the array again
}

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock, Geometry<in_t, acc_t>::kBackwardMinBlocks)
    plif_backward_kernel(const in_t* __restrict__ grad_spikes, GradVLast<in_t, acc_t>* __restrict__ grad_v_last,
                         const in_t* __restrict__ grad_v_seq, const acc_t* __restrict__ h_seq,
                         const in_t* __restrict__ x, const acc_t* __restrict__ k, const acc_t* __restrict__ v_init,
                         in_t* __restrict__ grad_x, acc_t* __restrict__ grad_k, acc_t* __restrict__ grad_v_init,
                         double* __restrict__ grad_k_partials, double* __restrict__ grad_v_init_partials,
                         index_t k_stride, index_t v_init_stride, index_t T, index_t N, index_t x_step,
                         acc_t v_threshold, acc_t v_reset, acc_t alpha, int surrogate, int flags) {
  // The kernel's parameters are BackwardParams' fields, in their order.
  const BackwardParams<in_t, acc_t> p{grad_spikes,
                                      grad_v_last,
                                      grad_v_seq,
                                      h_seq,
                                      x,
                                      k,
                                      v_init,
                                      grad_x,
                                      grad_k,
                                      grad_v_init,
                                      grad_k_partials,
                                      grad_v_init_partials,
                                      k_stride,
                                      v_init_stride,
                                      T,
                                      N,
                                      x_step,
                                      make_options<acc_t>(v_threshold, v_reset, alpha, surrogate, flags)};
  ThreadShares shares;
  // The lanes path as the host picked it (backward_shape); spiking mode only, like the forward's.
  constexpr int kLanes = backward_lanes(static_cast<int>(sizeof(in_t)));
  const bool lanes_path = kLanes > 1 && (flags & kFlagVectorPath) != 0;
#define PLIF_BACKWARD_LANES(lanes, mode)                                                                      \
  (grad_v_seq != nullptr ? backward_neurons<true, lanes, mode>(p, grad_spikes, grad_v_seq, x, grad_x, shares) \
                         : backward_neurons<false, lanes, mode>(p, grad_spikes, grad_v_seq, x, grad_x, shares))
#define PLIF_BACKWARD_NEURONS(mode)    \
  if (kLanes > 1 && lanes_path) {      \
    PLIF_BACKWARD_LANES(kLanes, mode); \
  } else {                             \
    PLIF_BACKWARD_LANES(1, mode);      \
  }
  // Spiking mode with the surrogate fixed at compile time (branch-free steps); the smooth mode
  // switches per step.
  if (!p.opts.spiking) {
    PLIF_BACKWARD_LANES(1, kRuntime);
  } else {
    switch (p.opts.surrogate) {
      case kSigmoid: PLIF_BACKWARD_NEURONS(kSigmoid); break;
      case kAtan: PLIF_BACKWARD_NEURONS(kAtan); break;
      case kPiecewiseQuadratic: PLIF_BACKWARD_NEURONS(kPiecewiseQuadratic); break;
      case kPiecewiseExp: PLIF_BACKWARD_NEURONS(kPiecewiseExp); break;
      case kSoftSign: PLIF_BACKWARD_NEURONS(kSoftSign); break;
      case kSuperSpike: PLIF_BACKWARD_NEURONS(kSuperSpike); break;
      default: PLIF_BACKWARD_NEURONS(kErf); break;
    }
  }
#undef PLIF_BACKWARD_NEURONS
#undef PLIF_BACKWARD_LANES
  if (grad_k_partials != nullptr) store_block_partial(shares.grad_k, grad_k_partials);
  if (grad_v_init_partials != nullptr) store_block_partial(shares.grad_v_init, grad_v_init_partials);
}

// The fixed-order finish of the shared parameters' sums: one thread, after the backward kernel
// on the same stream, sums the blocks' partials into the one value of grad_k (grad_v_init).
template <typename acc_t>
__global__ void plif_finish_shares_kernel(const double* __restrict__ grad_k_partials,
                                          const double* __restrict__ grad_v_init_partials, acc_t* __restrict__ grad_k,
                                          acc_t* __restrict__ grad_v_init, index_t partials) {
  if (grad_k_partials != nullptr) grad_k[0] = static_cast<acc_t>(sum_in_fixed_order(grad_k_partials, partials));
  if (grad_v_init_partials != nullptr) {
    grad_v_init[0] = static_cast<acc_t>(sum_in_fixed_order(grad_v_init_partials, partials));
  }
}

}  // namespace plif
