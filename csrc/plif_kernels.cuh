// CUDA kernels of the fused PLIF op, shared verbatim by the compiled extension (nvcc,
// plif_cuda.cu), the CuPy backend (NVRTC, plif_cuda/cupy_backend.py) and the CPU emulation of
// the launch that the gpu_emulation tests run (tests/gpu_emulation/). The per-neuron math is
// plif_math.h's; this file only arranges the memory traffic around it.
//
// The kernels are built for the memory roofline. The recurrence is serial in t, so a thread
// can only keep the memory system busy by loading inputs of several time steps before it runs
// the recurrence over them: every chunk of steps issues all its loads (at least 64 bytes per
// thread; .ci/check_cuda_build.py reads that from the SASS) before its first store. Two paths,
// picked per launch from N, the grid and the tensors' alignment (vector_path below):
//   vector: LANES consecutive neurons per thread, every [T, N] access one 16-byte word; where N
//           is a multiple of LANES and so large that every thread of the grid takes LANES
//           neurons or more anyway (the forward only: see Geometry);
//   scalar: one neuron per thread: small N (one thread per neuron, and the whole of a short
//           sequence in flight at once), misaligned tensors, N not a multiple of LANES.
// Each path takes as many steps per chunk as 64 bytes of its loads need (Geometry below). The
// last chunk is shorter where T is not a multiple of the chunk. The smooth mode (spiking=False,
// for gradcheck) runs one step at a time on the scalar path, as do the backward's steps T-1
// (which adds the gradient on the last membrane) and 0 (whose previous membrane is v_init).
//
// The kernels keep half a multiprocessor's threads resident (Geometry's launch bounds: four
// blocks of plif_launch.h's kThreadsPerBlock at 64 registers; the exceptions are listed there),
// and the geometry is sized for that: two backward neurons per thread at most, loads kept as the
// words they arrive in until their step, the backward's loops with and without grad_v_seq
// compiled apart. ptxas is fragile here: benchmarks/NOTES.md lists what each register took.
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
__host__ __device__ __forceinline__ float load_as<float, __half>(const __half& v) { return __half2float(v); }
template <>
__host__ __device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16& v) {
  return __bfloat162float(v);
}
template <>
__host__ __device__ __forceinline__ __half store_as<__half, float>(float v) { return __float2half_rn(v); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- launch geometry ---------------------------------------------------------------------------
// Neurons per thread of the forward's vector path (its scalar path and the backward take one)
// and time steps per chunk. A chunk loads at least kLoadBytesAhead per thread: ceil(64 / bytes
// per step) steps, where a step of LANES neurons loads x (forward), or grad_spikes and H, plus
// grad_v_seq when given (backward). The forward's state is small and its lanes fill one 16-byte
// word. The backward's per-neuron state (k, H, S, two gradient sums) is not: with two neurons per
// thread it did not fit 64 registers (float32 spilled; the half types' division slow path took a
// stack frame), so it has no vector path. A warp's accesses are whole 128-byte lines either way;
// a vector access only saves load instructions.
template <typename in_t, typename acc_t>
struct Geometry {
  enum : int {
    kLoadBytesAhead = 64,
    kForwardLanes = 16 / sizeof(in_t),
  };
  __host__ __device__ static constexpr int steps_for(int step_bytes) {
    return (kLoadBytesAhead + step_bytes - 1) / step_bytes;
  }
  template <int LANES>
  __host__ __device__ static constexpr int forward_steps() {
    return steps_for(LANES * static_cast<int>(sizeof(in_t)));
  }
  template <int LANES, bool GRAD_V>
  __host__ __device__ static constexpr int backward_steps() {
    return steps_for(LANES * static_cast<int>((GRAD_V ? 2 : 1) * sizeof(in_t) + sizeof(acc_t)));
  }
  // Blocks per multiprocessor the kernels are built for (launch bounds): half the threads of an
  // sm_80 / sm_90 multiprocessor (64 registers each). The float64 backward does not fit: at 64
  // registers ptxas spills 312 bytes (sm_90), at 80 (3 blocks) the IEEE division's slow path
  // saves registers to a 24-byte stack frame; at 2 blocks it takes 116 (sm_90), no local memory.
  // .ci/check_cuda_build.py lists it as the one exception.
  enum : int {
    kForwardMinBlocks = 4,
    kBackwardMinBlocks = sizeof(acc_t) == 8 ? 2 : 4,
  };
};

__device__ __forceinline__ bool aligned16(const void* pointer) {
  return (reinterpret_cast<unsigned long long>(pointer) & 15u) == 0;  // null counts as aligned
}

// The vector path needs every [T, N] stream 16-byte aligned and whole vectors per row, and pays
// only where the scalar path would have each thread scan LANES neurons or more one after
// another. Uniform over the launch.
template <int LANES>
__device__ __forceinline__ bool vector_path(index_t N, const void* a, const void* b, const void* c, const void* d) {
  const index_t threads = static_cast<index_t>(gridDim.x) * blockDim.x;
  return N % LANES == 0 && N >= LANES * threads && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(d);
}

// ---- accesses of LANES consecutive values ------------------------------------------------------
// Vector accesses move 16-byte words.
template <bool VECTOR, typename T>
struct AccessWord {
  using type = T;
};
template <typename T>
struct AccessWord<true, T> {
  using type = uint4;
};

// LANES consecutive values as loaded: vector words (VECTOR: the address is aligned to the
// word), or one access per value. A value is taken out of its word only at its step, so that
// two half values in flight share one register instead of taking one each.
template <bool VECTOR, int LANES, typename T>
struct LoadedLanes {
  using Word = typename AccessWord<VECTOR, T>::type;
  static constexpr int kBytes = LANES * static_cast<int>(sizeof(T));
  static_assert(!VECTOR || kBytes % 16 == 0, "a vector access moves whole 16-byte words");
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
    using Word = typename AccessWord<true, T>::type;
    static_assert(kBytes % 16 == 0, "a vector access moves whole 16-byte words");
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

// The vector path or the scalar one, each thread taking neurons in a grid-stride loop. The
// smooth mode (kRuntime) is for gradcheck: one step at a time, scalar path only (a fourth loop
// cost the other three registers).
template <int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void forward_paths(const ForwardParams<in_t, acc_t>& p, const in_t* __restrict__ x,
                                              in_t* __restrict__ spikes, in_t* __restrict__ v_seq,
                                              acc_t* __restrict__ h_seq) {
  using Shape = Geometry<in_t, acc_t>;
  constexpr int kLanes = Shape::kForwardLanes;
  constexpr bool kChunked = SURROGATE != kRuntime;
  const index_t threads = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t first = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Every step of x starts on a 16-byte word too: its step x_step (0 included) whole vectors.
  if (kChunked && p.x_step % kLanes == 0 && vector_path<kLanes>(p.N, x, spikes, v_seq, h_seq)) {
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
__global__ void __launch_bounds__(kThreadsPerBlock, Geometry<in_t, acc_t>::kForwardMinBlocks) plif_forward_kernel(
    const in_t* __restrict__ x, const acc_t* __restrict__ k, const acc_t* __restrict__ v_init,
    in_t* __restrict__ spikes, VLast<in_t, acc_t>* __restrict__ v_last, in_t* __restrict__ v_seq,
    acc_t* __restrict__ h_seq, index_t k_stride, index_t v_init_stride, index_t T, index_t N, index_t x_step,
    acc_t v_threshold, acc_t v_reset, acc_t alpha, int surrogate, int flags) {
  ForwardParams<in_t, acc_t> p;
  p.x = x;
  p.k = k;
  p.v_init = v_init;
  p.spikes = spikes;
  p.v_last = v_last;
  p.v_seq = v_seq;
  p.h_seq = h_seq;
  p.k_stride = k_stride;
  p.v_init_stride = v_init_stride;
  p.T = T;
  p.N = N;
  p.x_step = x_step;
  p.opts = make_options<acc_t>(v_threshold, v_reset, alpha, surrogate, flags);
  if (p.opts.spiking) {
    forward_paths<kSpikingForward>(p, x, spikes, v_seq, h_seq);
  } else {
    forward_paths<kRuntime>(p, x, spikes, v_seq, h_seq);
  }
}

// ---- backward ----------------------------------------------------------------------------------
// grad_v_last's element type is the one BackwardParams gives it (that of v_last).
template <typename in_t, typename acc_t>
using GradVLast = typename PointeeOf<decltype(BackwardParams<in_t, acc_t>::grad_v_last)>::type;

// Up to STEPS time steps t_hi, t_hi - 1, ... (all >= 1) for LANES neurons from n0: every load
// (the gradients of those steps, H of the steps before them) first, then the recursion; returns
// the steps taken (fewer near step 0, whose previous membrane is v_init). GRAD_V: grad_v_seq is
// given (a third stream, so fewer steps fill the same bytes).
template <int STEPS, bool GRAD_V, bool VECTOR, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ int backward_chunk(const in_t* __restrict__ grad_spikes,
                                              const in_t* __restrict__ grad_v_seq, const acc_t* __restrict__ h_seq,
                                              in_t* __restrict__ grad_x, index_t N, const Options<acc_t>& o,
                                              bool grad_v_last_present, index_t t_hi, index_t n0,
                                              BackwardState<LANES, acc_t>& st) {
  const int count = t_hi < STEPS ? static_cast<int>(t_hi) : STEPS;
  LoadedLanes<VECTOR, LANES, in_t> grad_s[STEPS], grad_v[STEPS];
  LoadedLanes<VECTOR, LANES, acc_t> h_prev[STEPS];
  // Without grad_spikes its loads read H's rows instead (in bounds: sizeof(in_t) <= sizeof(acc_t);
  // and in cache), and their values are dropped: no branch splits the chunk's loads.
  const in_t* const grad_s_rows = grad_spikes != nullptr ? grad_spikes : reinterpret_cast<const in_t*>(h_seq);
  const index_t first_row = t_hi * N + n0;
  index_t load_row = first_row;
#pragma unroll
  for (int i = 0; i < STEPS; ++i, load_row -= N) {
    if (i < count) {
      h_prev[i].load(h_seq + load_row - N);
      grad_s[i].load(grad_s_rows + load_row);
      if (GRAD_V) grad_v[i].load(grad_v_seq + load_row);
    }
  }
  // Chunk steps are below T-1, where dL/dV arrives whenever any gradient does (see backward_lanes).
  const bool through_spike = grad_spikes != nullptr;
  const bool through_membrane = through_spike || GRAD_V || grad_v_last_present;
  index_t row = first_row;
#pragma unroll
  for (int i = 0; i < STEPS; ++i, row -= N) {
    if (i >= count) break;
    acc_t gx[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) {
      const acc_t gs = through_spike ? load_as<acc_t>(grad_s[i][j]) : acc_t(0);
      const acc_t gv = GRAD_V ? load_as<acc_t>(grad_v[i][j]) : acc_t(0);
      const acc_t h = h_prev[i][j];
      const acc_t s_prev = fire<SURROGATE>(h, o);
      const acc_t v_prev = reset(h, s_prev, o);
      gx[j] = backward_neuron<SURROGATE>(st.h[j], st.s[j], v_prev, st.k[j], gv, gs, through_spike,
                                         through_membrane, o, st.grad_h_next[j], st.grad_k_sum[j]);
      st.h[j] = h;
      st.s[j] = s_prev;
    }
    store_lanes_as<VECTOR>(grad_x + row, gx);
  }
  return count;
}

// One step t, any t: T-1 adds the gradient on the last membrane, and step 0's previous membrane
// is v_init.
template <bool GRAD_V, bool VECTOR, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void backward_single_step(const BackwardParams<in_t, acc_t>& p,
                                                     const in_t* __restrict__ grad_spikes,
                                                     const in_t* __restrict__ grad_v_seq,
                                                     const acc_t* __restrict__ h_seq, in_t* __restrict__ grad_x,
                                                     const Options<acc_t>& o, index_t t, index_t n0,
                                                     BackwardState<LANES, acc_t>& st) {
  const index_t row = t * p.N + n0;
  const bool through_spike = grad_spikes != nullptr;
  const bool through_membrane = GRAD_V || p.grad_v_last != nullptr || (t < p.T - 1 && through_spike);
  LoadedLanes<VECTOR, LANES, in_t> grad_s, grad_v;
  if (grad_spikes != nullptr) grad_s.load(grad_spikes + row);
  if (GRAD_V) grad_v.load(grad_v_seq + row);
  acc_t gx[LANES];
#pragma unroll
  for (int j = 0; j < LANES; ++j) {
    const acc_t gs = grad_spikes != nullptr ? load_as<acc_t>(grad_s[j]) : acc_t(0);
    acc_t gv = GRAD_V ? load_as<acc_t>(grad_v[j]) : acc_t(0);
    if (t == p.T - 1 && p.grad_v_last != nullptr) gv += load_as<acc_t>(p.grad_v_last[n0 + j]);
    acc_t h_prev, s_prev, v_prev;
    if (t > 0) {
      h_prev = h_seq[row - p.N + j];
      s_prev = fire<SURROGATE>(h_prev, o);
      v_prev = reset(h_prev, s_prev, o);
    } else {
      h_prev = s_prev = acc_t(0);
      v_prev = p.v_init[(n0 + j) * p.v_init_stride];
    }
    gx[j] = backward_neuron<SURROGATE>(st.h[j], st.s[j], v_prev, st.k[j], gv, gs, through_spike,
                                       through_membrane, o, st.grad_h_next[j], st.grad_k_sum[j]);
    st.h[j] = h_prev;
    st.s[j] = s_prev;
  }
  store_lanes_as<VECTOR>(grad_x + row, gx);
}

// All T steps (T >= 1) of the neurons n0 .. n0 + LANES - 1, back in time: step T-1 alone, then
// chunks (the last one shorter) down to step 1, then step 0 alone. The smooth mode (kRuntime)
// runs one step at a time.
template <bool GRAD_V, bool VECTOR, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void backward_neurons(const BackwardParams<in_t, acc_t>& p,
                                                 const in_t* __restrict__ grad_spikes,
                                                 const in_t* __restrict__ grad_v_seq,
                                                 const acc_t* __restrict__ h_seq, in_t* __restrict__ grad_x,
                                                 index_t n0) {
  using Shape = Geometry<in_t, acc_t>;
  BackwardState<LANES, acc_t> st;
  backward_begin<LANES, SURROGATE>(p, n0, h_seq + (p.T - 1) * p.N + n0, st);
  const Options<acc_t> o = p.opts;
  const bool grad_v_last_present = p.grad_v_last != nullptr;
  // One loop with one call site of each step function: the code is instantiated per surrogate
  // and path, and its size is what the build's time goes into.
  for (index_t t = p.T - 1; t >= 0;) {
    if (SURROGATE != kRuntime && t < p.T - 1 && t >= 1) {
      t -= backward_chunk<Shape::template backward_steps<LANES, GRAD_V>(), GRAD_V, VECTOR, LANES, SURROGATE>(
          grad_spikes, grad_v_seq, h_seq, grad_x, p.N, o, grad_v_last_present, t, n0, st);
    } else {
      backward_single_step<GRAD_V, VECTOR, LANES, SURROGATE>(p, grad_spikes, grad_v_seq, h_seq, grad_x, o, t, n0,
                                                             st);
      --t;
    }
  }
  backward_end<LANES>(p, n0, st);
}

// kSaveCheckpoints (half inputs): all T steps of neuron n, in chunks of kCheckpointSteps from
// the last. A chunk loads its X (16 bytes per thread), recomputes its H from X and the
// checkpoint before it (the forward's expressions: the same bits), then walks back through it
// as backward_chunk does, four steps' gradients loaded at a time (eight spill). The chunk's H
// sits in shared memory, one column per thread (9 KB per block): in registers it took nine more
// of them and left no room within the 64 that four resident blocks allow.
// This thread's column of the recomputed chunk: one array per compute type, shared by every
// instantiation of the path (one each would add up to a block's whole shared memory).
template <typename acc_t>
__device__ __forceinline__ acc_t* chunk_h_column() {
  __shared__ acc_t chunk_h[(kCheckpointSteps + 1) * kThreadsPerBlock];
  return chunk_h + threadIdx.x;
}

template <bool GRAD_V, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void backward_neuron_recomputing(const BackwardParams<in_t, acc_t>& p,
                                                            const in_t* __restrict__ grad_spikes,
                                                            const in_t* __restrict__ grad_v_seq,
                                                            const in_t* __restrict__ x, in_t* __restrict__ grad_x,
                                                            index_t n) {
  constexpr int K = kCheckpointSteps;
  constexpr int kPart = 4;
  // h[(i + 1) * kThreadsPerBlock]: H[t0 + i]; h[0]: the checkpoint H[t0 - 1].
  acc_t* const h = chunk_h_column<acc_t>();
  const Options<acc_t> o = p.opts;
  const bool through_spike = grad_spikes != nullptr;
  BackwardState<1, acc_t> st;
  const index_t last_chunk = (p.T - 1) / K;
  for (index_t chunk = last_chunk; chunk >= 0; --chunk) {
    const index_t t0 = chunk * K;
    const int count = p.T - t0 < K ? static_cast<int>(p.T - t0) : K;
    {
      // Steps past the end load the last step's row again (in bounds), as backward_chunk does.
      in_t inputs[K];
      index_t row = t0 * p.x_step + n;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        PLIF_KEEP_IN_ORDER(row);
        inputs[i] = x[row];
        if (i + 1 < count) row += p.x_step;
      }
      ForwardState<1, acc_t> forward;
      recompute_chunk_begin<1, SURROGATE>(p, chunk, n, forward, h);
#pragma unroll
      for (int i = 0; i < K; ++i) {
        if (i < count) {
          acc_t h_step;
          forward_neuron<SURROGATE>(forward.v[0], load_as<acc_t>(inputs[i]), forward.k[0], o, h_step);
          h[(i + 1) * kThreadsPerBlock] = h_step;
        }
      }
    }
    if (chunk == last_chunk) backward_begin<1, SURROGATE>(p, n, &h[count * kThreadsPerBlock], st);
    // Rows are running offsets: computed per step, ptxas keeps a 64-bit offset for every step.
    index_t row = (t0 + count - 1) * p.N + n;
#pragma unroll
    for (int part = K / kPart - 1; part >= 0; --part) {
      const int lo = part * kPart;
      if (lo >= count) continue;
      in_t grad_s[kPart], grad_v[kPart];
      index_t load_row = row;
#pragma unroll
      for (int i = lo + kPart - 1; i >= lo; --i) {
        PLIF_KEEP_IN_ORDER(load_row);
        if (through_spike) grad_s[i - lo] = grad_spikes[load_row];
        if (GRAD_V) grad_v[i - lo] = grad_v_seq[load_row];
        if (i < count && i > lo) load_row -= p.N;
      }
#pragma unroll
      for (int i = lo + kPart - 1; i >= lo; --i) {
        if (i >= count) continue;
        PLIF_KEEP_IN_ORDER(row);
        const index_t t = t0 + i;
        const bool through_membrane = GRAD_V || p.grad_v_last != nullptr || (t < p.T - 1 && through_spike);
        const acc_t gs = through_spike ? load_as<acc_t>(grad_s[i - lo]) : acc_t(0);
        acc_t gv = GRAD_V ? load_as<acc_t>(grad_v[i - lo]) : acc_t(0);
        if (t == p.T - 1 && p.grad_v_last != nullptr) gv += load_as<acc_t>(p.grad_v_last[n]);
        const acc_t h_prev = h[i * kThreadsPerBlock];
        acc_t s_prev, v_prev;
        if (t > 0) {
          s_prev = fire<SURROGATE>(h_prev, o);
          v_prev = reset(h_prev, s_prev, o);
        } else {
          s_prev = acc_t(0);
          v_prev = p.v_init[n * p.v_init_stride];
        }
        const acc_t gx = backward_neuron<SURROGATE>(st.h[0], st.s[0], v_prev, st.k[0], gv, gs, through_spike,
                                                    through_membrane, o, st.grad_h_next[0], st.grad_k_sum[0]);
        grad_x[row] = store_as<in_t>(gx);
        row -= p.N;
        st.h[0] = h_prev;
        st.s[0] = s_prev;
      }
    }
  }
  backward_end<1>(p, n, st);
}

// One neuron per thread (the backward has no vector path: see Geometry), in a grid-stride loop,
// from every H or (RECOMPUTE) from the checkpoints and x. GRAD_V: grad_v_seq is given; the loops
// with and without it are compiled apart (in one loop the chunks of both cost registers for
// both). The step functions above keep the forward's LANES / VECTOR parameters: written for one
// lane only, ptxas allocated them worse (spills).
template <bool RECOMPUTE, bool GRAD_V, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void backward_paths(const BackwardParams<in_t, acc_t>& p,
                                               const in_t* __restrict__ grad_spikes,
                                               const in_t* __restrict__ grad_v_seq,
                                               const acc_t* __restrict__ h_seq, const in_t* __restrict__ x,
                                               in_t* __restrict__ grad_x) {
  const index_t threads = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t first = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (index_t n = first; n < p.N; n += threads) {
    if constexpr (RECOMPUTE) {
      backward_neuron_recomputing<GRAD_V, SURROGATE>(p, grad_spikes, grad_v_seq, x, grad_x, n);
    } else {
      backward_neurons<GRAD_V, false, 1, SURROGATE>(p, grad_spikes, grad_v_seq, h_seq, grad_x, n);
    }
  }
}

// Both backward kernels take the same arguments and run the same modes; the one from checkpoints
// (plif_recompute_backward_kernel, half inputs only: the dtypes that keep checkpoints) is a kernel
// of its own, with its own registers and shared memory, so that neither path's needs weigh on
// the other's occupancy.
template <bool RECOMPUTE, typename in_t, typename acc_t>
__device__ __forceinline__ void backward_kernel_body(
    const in_t* __restrict__ grad_spikes, GradVLast<in_t, acc_t>* __restrict__ grad_v_last,
    const in_t* __restrict__ grad_v_seq, const acc_t* __restrict__ h_seq, const in_t* __restrict__ x,
    const acc_t* __restrict__ k, const acc_t* __restrict__ v_init, in_t* __restrict__ grad_x,
    acc_t* __restrict__ grad_k, acc_t* __restrict__ grad_v_init, index_t k_stride, index_t v_init_stride, index_t T,
    index_t N, index_t x_step, acc_t v_threshold, acc_t v_reset, acc_t alpha, int surrogate, int flags) {
  BackwardParams<in_t, acc_t> p;
  p.grad_spikes = grad_spikes;
  p.grad_v_last = grad_v_last;
  p.grad_v_seq = grad_v_seq;
  p.h_seq = h_seq;
  p.x = x;
  p.k = k;
  p.v_init = v_init;
  p.grad_x = grad_x;
  p.grad_k = grad_k;
  p.grad_v_init = grad_v_init;
  p.k_stride = k_stride;
  p.v_init_stride = v_init_stride;
  p.T = T;
  p.N = N;
  p.x_step = x_step;
  p.opts = make_options<acc_t>(v_threshold, v_reset, alpha, surrogate, flags);
#define PLIF_BACKWARD_PATHS(mode)                                                                        \
  (grad_v_seq != nullptr ? backward_paths<RECOMPUTE, true, mode>(p, grad_spikes, grad_v_seq, h_seq, x, grad_x) \
                         : backward_paths<RECOMPUTE, false, mode>(p, grad_spikes, grad_v_seq, h_seq, x, grad_x))
  // Spiking mode with the surrogate fixed at compile time (branch-free chunks); the smooth mode
  // switches per step.
  if (!p.opts.spiking) return PLIF_BACKWARD_PATHS(kRuntime);
  switch (p.opts.surrogate) {
    case kSigmoid: return PLIF_BACKWARD_PATHS(kSigmoid);
    case kAtan: return PLIF_BACKWARD_PATHS(kAtan);
    case kPiecewiseQuadratic: return PLIF_BACKWARD_PATHS(kPiecewiseQuadratic);
    case kPiecewiseExp: return PLIF_BACKWARD_PATHS(kPiecewiseExp);
    case kSoftSign: return PLIF_BACKWARD_PATHS(kSoftSign);
    case kSuperSpike: return PLIF_BACKWARD_PATHS(kSuperSpike);
    default: return PLIF_BACKWARD_PATHS(kErf);
  }
#undef PLIF_BACKWARD_PATHS
}

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock, Geometry<in_t, acc_t>::kBackwardMinBlocks) plif_backward_kernel(
    const in_t* __restrict__ grad_spikes, GradVLast<in_t, acc_t>* __restrict__ grad_v_last,
    const in_t* __restrict__ grad_v_seq, const acc_t* __restrict__ h_seq, const in_t* __restrict__ x,
    const acc_t* __restrict__ k, const acc_t* __restrict__ v_init, in_t* __restrict__ grad_x,
    acc_t* __restrict__ grad_k, acc_t* __restrict__ grad_v_init, index_t k_stride, index_t v_init_stride, index_t T,
    index_t N, index_t x_step, acc_t v_threshold, acc_t v_reset, acc_t alpha, int surrogate, int flags) {
  backward_kernel_body<false>(grad_spikes, grad_v_last, grad_v_seq, h_seq, x, k, v_init, grad_x, grad_k, grad_v_init, k_stride,
                     v_init_stride, T, N, x_step, v_threshold, v_reset, alpha, surrogate, flags);
}

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock, Geometry<in_t, acc_t>::kBackwardMinBlocks) plif_recompute_backward_kernel(
    const in_t* __restrict__ grad_spikes, GradVLast<in_t, acc_t>* __restrict__ grad_v_last,
    const in_t* __restrict__ grad_v_seq, const acc_t* __restrict__ h_seq, const in_t* __restrict__ x,
    const acc_t* __restrict__ k, const acc_t* __restrict__ v_init, in_t* __restrict__ grad_x,
    acc_t* __restrict__ grad_k, acc_t* __restrict__ grad_v_init, index_t k_stride, index_t v_init_stride, index_t T,
    index_t N, index_t x_step, acc_t v_threshold, acc_t v_reset, acc_t alpha, int surrogate, int flags) {
  backward_kernel_body<true>(grad_spikes, grad_v_last, grad_v_seq, h_seq, x, k, v_init, grad_x, grad_k, grad_v_init, k_stride,
                     v_init_stride, T, N, x_step, v_threshold, v_reset, alpha, surrogate, flags);
}

}  // namespace plif
