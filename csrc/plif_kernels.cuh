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
//   vector: LANES consecutive neurons per thread, every [T, N] access an 8- or 16-byte vector,
//           AHEAD steps per chunk; where N is a multiple of LANES and so large that every
//           thread of the grid takes LANES neurons or more anyway;
//   scalar: one neuron per thread, LANES * AHEAD steps per chunk (the same bytes in flight):
//           small N (one thread per neuron, and the whole of a short sequence in flight at
//           once), misaligned tensors, N not a multiple of LANES.
// The last chunk is shorter where T is not a multiple of the chunk. The smooth mode
// (spiking=False, for gradcheck) runs one step at a time, as do the backward's steps T-1 (which
// adds the gradient on the last membrane) and 0 (whose previous membrane is v_init).
//
// Kernel arguments are plain scalars and pointers (no structs) so that CuPy can pass them.
// Half types are CUDA's __half / __nv_bfloat16, whose bits equal c10::Half / c10::BFloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "plif_math.h"

// The emulation asserts the alignment of every vector access; on a GPU a misaligned vector
// access faults by itself.
#ifndef PLIF_CHECK_VECTOR_ACCESS
#define PLIF_CHECK_VECTOR_ACCESS(pointer, bytes) ((void)0)
#endif

// An optimisation barrier on a row offset: without it nvcc computes the 64-bit offsets of every
// step of a chunk up front, one register pair per step and stream (134 instead of 64 registers
// for the fp16 forward). No code on the host.
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
// The grid: one thread per neuron, capped at what the device keeps resident (the kernels'
// grid-stride loops take the rest). Host code: the nvcc launcher and the emulation call it.
// An enumerator, as in plif_math.h: NVRTC names a namespace-scope constant per compilation.
enum LaunchShape : int { kThreadsPerBlock = 256 };

inline unsigned int launch_blocks(index_t neurons, index_t resident_blocks) {
  const index_t needed = (neurons + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const index_t capped = needed < resident_blocks ? needed : resident_blocks;
  return static_cast<unsigned int>(capped > 1 ? capped : 1);
}

// Neurons per thread (LANES) and time steps per chunk (AHEAD) of the vector path; the scalar
// path takes one neuron per thread and LANES * AHEAD steps per chunk, the same loads in flight.
// Every chunk loads at least 64 bytes per thread. Forward: 4 steps of one 16-byte vector of x.
// Backward: per step grad_spikes (LANES in_t) and H (LANES acc_t), and grad_v_seq when given:
// 2 x 16 bytes in float32 and float64; in the half types 4 lanes (8 + 16 bytes per step, 3
// steps): 8 lanes of 2 steps held 161 registers, one 256-thread block per multiprocessor.
template <typename in_t>
struct Geometry {
  static constexpr int kForwardLanes = static_cast<int>(16 / sizeof(in_t));
  static constexpr int kForwardAhead = 4;
  static constexpr int kBackwardLanes = sizeof(in_t) == 2 ? 4 : static_cast<int>(16 / sizeof(in_t));
  static constexpr int kBackwardAhead = sizeof(in_t) == 2 ? 3 : 2;
  // Two resident blocks (<= 128 registers) keep the backward's loads in flight per SM; left free,
  // ptxas took 134 registers in the half types (one block) once the absent-gradient selects came
  // in. float64 needs more than 128 without spilling.
  static constexpr int kBackwardMinBlocks = sizeof(in_t) == 8 ? 1 : 2;
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
// Vector accesses move 16-byte words, or one 8-byte word where LANES values fill only that.
template <int BYTES>
struct VectorWord {
  using type = uint4;
};
template <>
struct VectorWord<8> {
  using type = uint2;
};

// LANES consecutive values: as vector words (VECTOR: the address is aligned to the word), or
// one access per value.
template <bool VECTOR, int LANES, typename T>
__device__ __forceinline__ void load_lanes(const T* __restrict__ source, T (&values)[LANES]) {
  if constexpr (VECTOR) {
    constexpr int kBytes = LANES * static_cast<int>(sizeof(T));
    using Word = typename VectorWord<kBytes>::type;
    static_assert(kBytes == 8 || kBytes % 16 == 0, "a vector access moves whole 8- or 16-byte words");
    PLIF_CHECK_VECTOR_ACCESS(source, sizeof(Word));
    const Word* words = reinterpret_cast<const Word*>(source);
#pragma unroll
    for (int w = 0; w < static_cast<int>(kBytes / sizeof(Word)); ++w) {
      const Word word = words[w];
      memcpy(reinterpret_cast<char*>(values) + sizeof(Word) * w, &word, sizeof(Word));
    }
  } else {
#pragma unroll
    for (int j = 0; j < LANES; ++j) values[j] = source[j];
  }
}

template <bool VECTOR, int LANES, typename T>
__device__ __forceinline__ void store_lanes(T* __restrict__ target, const T (&values)[LANES]) {
  if constexpr (VECTOR) {
    constexpr int kBytes = LANES * static_cast<int>(sizeof(T));
    using Word = typename VectorWord<kBytes>::type;
    static_assert(kBytes == 8 || kBytes % 16 == 0, "a vector access moves whole 8- or 16-byte words");
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
  return o;
}

// ---- forward -----------------------------------------------------------------------------------
// v_last's element type is the one ForwardParams gives it (in_t or the compute type).
template <typename in_t, typename acc_t>
using VLast = typename PointeeOf<decltype(ForwardParams<in_t, acc_t>::v_last)>::type;

// `count` (1 .. STEPS) time steps from t0 for LANES neurons from n0: every load first, then the
// recurrence. The [T, N] streams come as __restrict__ pointers, which lets the loads of a chunk
// move above the stores of the steps before (a pointer inside ForwardParams carries no such
// promise).
template <int STEPS, bool VECTOR, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void forward_chunk(const in_t* __restrict__ x, in_t* __restrict__ spikes,
                                              in_t* __restrict__ v_seq, acc_t* __restrict__ h_seq, index_t N,
                                              const Options<acc_t>& o, index_t t0, int count, index_t n0,
                                              ForwardState<LANES, acc_t>& st) {
  in_t inputs[STEPS][LANES];
#pragma unroll
  for (int i = 0; i < STEPS; ++i) {
    if (i < count) load_lanes<VECTOR>(x + (t0 + i) * N + n0, inputs[i]);
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
    if (h_seq != nullptr) store_lanes<VECTOR>(h_seq + row, h);
    if (v_seq != nullptr) store_lanes_as<VECTOR>(v_seq + row, st.v);
  }
}

// All T steps of the neurons n0 .. n0 + LANES - 1, in chunks of AHEAD steps (the last one
// shorter). One call site of the chunk: its code is what the build's time goes into.
template <int AHEAD, bool VECTOR, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void forward_neurons(const ForwardParams<in_t, acc_t>& p, const in_t* __restrict__ x,
                                                in_t* __restrict__ spikes, in_t* __restrict__ v_seq,
                                                acc_t* __restrict__ h_seq, index_t n0) {
  ForwardState<LANES, acc_t> st;
  forward_begin<LANES>(p, n0, st);
  const Options<acc_t> o = p.opts;
  for (index_t t = 0; t < p.T; t += AHEAD) {
    const int count = p.T - t < AHEAD ? static_cast<int>(p.T - t) : AHEAD;
    forward_chunk<AHEAD, VECTOR, LANES, SURROGATE>(x, spikes, v_seq, h_seq, p.N, o, t, count, n0, st);
  }
  forward_end<LANES>(p, n0, st);
}

// The vector path (VECTOR_AHEAD steps per chunk) or the scalar one (SCALAR_AHEAD), each
// thread taking neurons in a grid-stride loop. Chunks only where the surrogate is fixed: the
// smooth mode (kRuntime) is for gradcheck and runs one step at a time.
template <int VECTOR_AHEAD, int SCALAR_AHEAD, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void forward_paths(const ForwardParams<in_t, acc_t>& p, const in_t* __restrict__ x,
                                              in_t* __restrict__ spikes, in_t* __restrict__ v_seq,
                                              acc_t* __restrict__ h_seq) {
  constexpr int kLanes = Geometry<in_t>::kForwardLanes;
  const index_t threads = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t first = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vector_path<kLanes>(p.N, x, spikes, v_seq, h_seq)) {
    for (index_t n = first * kLanes; n < p.N; n += threads * kLanes) {
      forward_neurons<SURROGATE == kRuntime ? 1 : VECTOR_AHEAD, true, kLanes, SURROGATE>(p, x, spikes, v_seq, h_seq,
                                                                                        n);
    }
  } else {
    for (index_t n = first; n < p.N; n += threads) {
      forward_neurons<SURROGATE == kRuntime ? 1 : SCALAR_AHEAD, false, 1, SURROGATE>(p, x, spikes, v_seq, h_seq,
                                                                                    n);
    }
  }
}

template <typename in_t, typename acc_t>
__global__ void plif_forward_kernel(const in_t* __restrict__ x, const acc_t* __restrict__ k,
                                    const acc_t* __restrict__ v_init, in_t* __restrict__ spikes,
                                    VLast<in_t, acc_t>* __restrict__ v_last, in_t* __restrict__ v_seq,
                                    acc_t* __restrict__ h_seq, index_t k_stride, index_t v_init_stride, index_t T,
                                    index_t N, acc_t v_threshold, acc_t v_reset, acc_t alpha, int surrogate,
                                    int flags) {
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
  p.opts = make_options<acc_t>(v_threshold, v_reset, alpha, surrogate, flags);
  constexpr int kVectorAhead = Geometry<in_t>::kForwardAhead;
  constexpr int kScalarAhead = Geometry<in_t>::kForwardLanes * kVectorAhead;
  if (p.opts.spiking) {
    forward_paths<kVectorAhead, kScalarAhead, kSpikingForward>(p, x, spikes, v_seq, h_seq);
  } else {
    forward_paths<kVectorAhead, kScalarAhead, kRuntime>(p, x, spikes, v_seq, h_seq);
  }
}

// ---- backward ----------------------------------------------------------------------------------
// grad_v_last's element type is the one BackwardParams gives it (that of v_last).
template <typename in_t, typename acc_t>
using GradVLast = typename PointeeOf<decltype(BackwardParams<in_t, acc_t>::grad_v_last)>::type;

// `count` (1 .. STEPS) time steps t_hi, t_hi - 1, ..., t_hi - count + 1 (all >= 1) for LANES
// neurons from n0: every load (the gradients of those steps, H of the steps before them) first,
// then the recursion.
template <int STEPS, bool VECTOR, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void backward_chunk(const in_t* __restrict__ grad_spikes,
                                               const in_t* __restrict__ grad_v_seq, const acc_t* __restrict__ h_seq,
                                               in_t* __restrict__ grad_x, index_t N, const Options<acc_t>& o,
                                               bool grad_v_last_present, index_t t_hi, int count, index_t n0,
                                               BackwardState<LANES, acc_t>& st) {
  in_t grad_s[STEPS][LANES], grad_v[STEPS][LANES];
  acc_t h_prev[STEPS][LANES];
#pragma unroll
  for (int i = 0; i < STEPS; ++i) {
    const index_t row = (t_hi - i) * N + n0;
    if (i < count) load_lanes<VECTOR>(h_seq + row - N, h_prev[i]);
    if (i < count && grad_spikes != nullptr) load_lanes<VECTOR>(grad_spikes + row, grad_s[i]);
    if (i < count && grad_v_seq != nullptr) load_lanes<VECTOR>(grad_v_seq + row, grad_v[i]);
  }
  // Chunk steps are below T-1, where dL/dV arrives whenever any gradient does (see backward_lanes).
  const bool through_spike = grad_spikes != nullptr;
  const bool through_membrane = through_spike || grad_v_seq != nullptr || grad_v_last_present;
  index_t row = t_hi * N + n0;
#pragma unroll
  for (int i = 0; i < STEPS; ++i, row -= N) {
    if (i >= count) break;
    PLIF_KEEP_IN_ORDER(row);
    acc_t gx[LANES];
#pragma unroll
    for (int j = 0; j < LANES; ++j) {
      const acc_t gs = grad_spikes != nullptr ? load_as<acc_t>(grad_s[i][j]) : acc_t(0);
      const acc_t gv = grad_v_seq != nullptr ? load_as<acc_t>(grad_v[i][j]) : acc_t(0);
      const acc_t s_prev = fire<SURROGATE>(h_prev[i][j], o);
      const acc_t v_prev = reset(h_prev[i][j], s_prev, o);
      gx[j] = backward_neuron<SURROGATE>(st.h[j], st.s[j], v_prev, st.k[j], gv, gs, through_spike,
                                         through_membrane, o, st.grad_h_next[j], st.grad_k_sum[j]);
      st.h[j] = h_prev[i][j];
      st.s[j] = s_prev;
    }
    store_lanes_as<VECTOR>(grad_x + row, gx);
  }
}

// One step t, any t: T-1 adds the gradient on the last membrane, and step 0's previous membrane
// is v_init.
template <bool VECTOR, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void backward_single_step(const BackwardParams<in_t, acc_t>& p,
                                                     const in_t* __restrict__ grad_spikes,
                                                     const in_t* __restrict__ grad_v_seq,
                                                     const acc_t* __restrict__ h_seq, in_t* __restrict__ grad_x,
                                                     const Options<acc_t>& o, index_t t, index_t n0,
                                                     BackwardState<LANES, acc_t>& st) {
  const index_t row = t * p.N + n0;
  const bool through_spike = grad_spikes != nullptr;
  const bool through_membrane =
      grad_v_seq != nullptr || p.grad_v_last != nullptr || (t < p.T - 1 && through_spike);
  in_t grad_s[LANES], grad_v[LANES];
  if (grad_spikes != nullptr) load_lanes<VECTOR>(grad_spikes + row, grad_s);
  if (grad_v_seq != nullptr) load_lanes<VECTOR>(grad_v_seq + row, grad_v);
  acc_t gx[LANES];
#pragma unroll
  for (int j = 0; j < LANES; ++j) {
    const acc_t gs = grad_spikes != nullptr ? load_as<acc_t>(grad_s[j]) : acc_t(0);
    acc_t gv = grad_v_seq != nullptr ? load_as<acc_t>(grad_v[j]) : acc_t(0);
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
// chunks of AHEAD steps (the last one shorter) down to step 1, then step 0 alone.
template <int AHEAD, bool VECTOR, int LANES, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void backward_neurons(const BackwardParams<in_t, acc_t>& p,
                                                 const in_t* __restrict__ grad_spikes,
                                                 const in_t* __restrict__ grad_v_seq,
                                                 const acc_t* __restrict__ h_seq, in_t* __restrict__ grad_x,
                                                 index_t n0) {
  BackwardState<LANES, acc_t> st;
  backward_begin<LANES, SURROGATE>(p, n0, h_seq + (p.T - 1) * p.N + n0, st);
  const Options<acc_t> o = p.opts;
  // One loop with one call site of each step function: the code is instantiated per surrogate
  // and path, and its size is what the build's time goes into.
  for (index_t t = p.T - 1; t >= 0;) {
    if (AHEAD > 1 && t < p.T - 1 && t >= 1) {
      const int count = t < AHEAD ? static_cast<int>(t) : AHEAD;
      backward_chunk<AHEAD, VECTOR, LANES, SURROGATE>(grad_spikes, grad_v_seq, h_seq, grad_x, p.N, o,
                                                      p.grad_v_last != nullptr, t, count, n0, st);
      t -= count;
    } else {
      backward_single_step<VECTOR, LANES, SURROGATE>(p, grad_spikes, grad_v_seq, h_seq, grad_x, o, t, n0, st);
      --t;
    }
  }
  backward_end<LANES>(p, n0, st);
}

template <int VECTOR_AHEAD, int SCALAR_AHEAD, int SURROGATE, typename in_t, typename acc_t>
__device__ __forceinline__ void backward_paths(const BackwardParams<in_t, acc_t>& p,
                                               const in_t* __restrict__ grad_spikes,
                                               const in_t* __restrict__ grad_v_seq,
                                               const acc_t* __restrict__ h_seq, in_t* __restrict__ grad_x) {
  constexpr int kLanes = Geometry<in_t>::kBackwardLanes;
  const index_t threads = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t first = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vector_path<kLanes>(p.N, grad_spikes, grad_v_seq, h_seq, grad_x)) {
    for (index_t n = first * kLanes; n < p.N; n += threads * kLanes) {
      backward_neurons<SURROGATE == kRuntime ? 1 : VECTOR_AHEAD, true, kLanes, SURROGATE>(p, grad_spikes, grad_v_seq,
                                                                                         h_seq, grad_x, n);
    }
  } else {
    for (index_t n = first; n < p.N; n += threads) {
      backward_neurons<SURROGATE == kRuntime ? 1 : SCALAR_AHEAD, false, 1, SURROGATE>(p, grad_spikes, grad_v_seq,
                                                                                     h_seq, grad_x, n);
    }
  }
}

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock, Geometry<in_t>::kBackwardMinBlocks) plif_backward_kernel(const in_t* __restrict__ grad_spikes,
                                     GradVLast<in_t, acc_t>* __restrict__ grad_v_last,
                                     const in_t* __restrict__ grad_v_seq, const acc_t* __restrict__ h_seq,
                                     const acc_t* __restrict__ k, const acc_t* __restrict__ v_init,
                                     in_t* __restrict__ grad_x, acc_t* __restrict__ grad_k,
                                     acc_t* __restrict__ grad_v_init, index_t k_stride, index_t v_init_stride,
                                     index_t T, index_t N, acc_t v_threshold, acc_t v_reset, acc_t alpha,
                                     int surrogate, int flags) {
  BackwardParams<in_t, acc_t> p;
  p.grad_spikes = grad_spikes;
  p.grad_v_last = grad_v_last;
  p.grad_v_seq = grad_v_seq;
  p.h_seq = h_seq;
  p.k = k;
  p.v_init = v_init;
  p.grad_x = grad_x;
  p.grad_k = grad_k;
  p.grad_v_init = grad_v_init;
  p.k_stride = k_stride;
  p.v_init_stride = v_init_stride;
  p.T = T;
  p.N = N;
  p.opts = make_options<acc_t>(v_threshold, v_reset, alpha, surrogate, flags);
  constexpr int kVectorAhead = Geometry<in_t>::kBackwardAhead;
  constexpr int kScalarAhead = Geometry<in_t>::kBackwardLanes * kVectorAhead;
#define PLIF_BACKWARD_PATHS(mode) \
  backward_paths<kVectorAhead, kScalarAhead, mode>(p, grad_spikes, grad_v_seq, h_seq, grad_x)
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

}  // namespace plif
