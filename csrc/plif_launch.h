// Entry points of the kernels, called by the binding layer (plif_ops.cpp) once every
// argument has been checked, and the launch rule every GPU launcher follows. Instantiated for
// (in_t, acc_t) in {(float, float), (double, double), (c10::Half, float), (c10::BFloat16, float)}.
// Plain C++: a library built without CUDA (which still launches through NVRTC) uses the rule,
// and NVRTC compiles this file with the kernels.
#pragma once

#include "plif_params.h"

namespace plif {

template <typename in_t, typename acc_t>
void forward_cpu(const ForwardParams<in_t, acc_t>& p);
template <typename in_t, typename acc_t>
void backward_cpu(const BackwardParams<in_t, acc_t>& p);

// MACRO(in_t, acc_t) for the four (input, compute) type pairs the entry points are instantiated for.
#define PLIF_FOR_EACH_TYPE_PAIR(MACRO) \
  MACRO(float, float)                  \
  MACRO(double, double)                \
  MACRO(c10::Half, float)              \
  MACRO(c10::BFloat16, float)

#ifdef PLIF_WITH_CUDA
// Launch on PyTorch's current stream of the device the tensors live on; the caller sets the
// device guard.
template <typename in_t, typename acc_t>
void forward_cuda(const ForwardParams<in_t, acc_t>& p);
template <typename in_t, typename acc_t>
void backward_cuda(const BackwardParams<in_t, acc_t>& p);
#endif

// ---- the grid of a GPU launch ------------------------------------------------------------------
// Enumerators, as in plif_math.h: NVRTC names a namespace-scope constant per compilation.
// kLoadBytesAhead: what a chunk of steps loads per thread before its first store (at least);
// kVectorBytes: the word of a vector access.
enum LaunchShape : int { kThreadsPerBlock = 256, kLoadBytesAhead = 64, kVectorBytes = 16 };

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define PLIF_LAUNCH_HD __host__ __device__
#else
#define PLIF_LAUNCH_HD
#endif

// Time steps per chunk where a step loads step_bytes per thread: ceil(kLoadBytesAhead / step_bytes).
PLIF_LAUNCH_HD constexpr int chunk_steps(int step_bytes) { return (kLoadBytesAhead + step_bytes - 1) / step_bytes; }

// Blocks of a launch over `neurons`: one thread per neuron, capped at the blocks the device
// keeps resident (multiprocessors x blocks of that kernel per multiprocessor, which its register
// use decides), and at least one; the kernels' grid-stride loops take the rest. Both GPU
// launchers call this: the nvcc one (plif_cuda.cu) with the CUDA runtime's occupancy, the NVRTC
// one (plif_cuda/cupy_backend.py, through plif_cuda._C.launch_blocks) with the driver's for the
// run-time-compiled kernel.
inline index_t launch_blocks(index_t neurons, index_t resident_blocks) {
  const index_t needed = (neurons + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const index_t capped = needed < resident_blocks ? needed : resident_blocks;
  return capped > 1 ? capped : 1;
}

// ---- the forward's memory path -----------------------------------------------------------------
// The forward has two paths (plif_kernels.cuh): the vector path, LANES = kVectorBytes / element
// bytes consecutive neurons per thread, every [T, N] access one 16-byte word; and the scalar path,
// one neuron per thread. The host picks one for the whole launch, and the grid with it, and tells
// the kernel through this bit of its flags (beside plif_params.h's option flags).
enum LaunchFlags : int { kFlagVectorPath = kFlagHCheckpoints << 1 };

// Bytes of x a forward launch keeps in flight: busy threads x one chunk's loads per thread.
inline index_t forward_bytes_in_flight(index_t T, index_t N, int lanes, int element_bytes, index_t resident_blocks) {
  const index_t threads = (N + lanes - 1) / lanes;
  const index_t launched = launch_blocks(threads, resident_blocks) * kThreadsPerBlock;
  const index_t busy = threads < launched ? threads : launched;
  const int step_bytes = lanes * element_bytes;
  const index_t steps = chunk_steps(step_bytes) < T ? chunk_steps(step_bytes) : T;
  return busy * steps * step_bytes;
}

// A kernel's launch: its grid, and its memory path (kFlagVectorPath: the forward's vector path or
// the backward's lanes path; 0: one neuron per thread), which the launcher adds to the kernel's
// flags (with_scalar_arguments).
struct LaunchPath {
  index_t blocks;
  int path_flag;
};

// The vector path where it can run (the spiking mode: the smooth one steps one at a time, scalar
// only; every [T, N] stream on 16-byte words, x's steps x_step apart included; N a multiple of
// LANES) and keeps at least as many bytes in flight as the scalar path: from N of about twice the
// resident threads on (T = 8), while below that one neuron per thread keeps more in flight and a
// short sequence in one round trip. Its grid is N / LANES threads, capped at the resident blocks.
inline LaunchPath forward_shape(index_t T, index_t N, index_t x_step, int element_bytes, int flags,
                                bool streams_on_words, index_t resident_blocks) {
  const int lanes = kVectorBytes / element_bytes;
  const bool can_vector = (flags & kFlagSpiking) != 0 && streams_on_words && N % lanes == 0 && x_step % lanes == 0;
  const bool vector = can_vector && forward_bytes_in_flight(T, N, lanes, element_bytes, resident_blocks) >=
                                        forward_bytes_in_flight(T, N, 1, element_bytes, resident_blocks);
  return vector ? LaunchPath{launch_blocks(N / lanes, resident_blocks), kFlagVectorPath}
                : LaunchPath{launch_blocks(N, resident_blocks), 0};
}

// True where every pointer (null: an absent stream) is on a word of word_bytes.
template <typename... Pointers>
inline bool on_words(int word_bytes, const Pointers*... pointers) {
  return ((reinterpret_cast<unsigned long long>(pointers) % static_cast<unsigned long long>(word_bytes) == 0) && ...);
}
template <typename... Pointers>
inline bool on_vector_words(const Pointers*... pointers) {
  return on_words(kVectorBytes, pointers...);
}

// The launch of the forward kernel over p's tensors (the nvcc launcher and the emulation; the
// NVRTC one calls forward_shape through plif_cuda._C.forward_shape).
template <typename in_t, typename acc_t>
inline LaunchPath forward_shape(const ForwardParams<in_t, acc_t>& p, index_t resident_blocks) {
  return forward_shape(p.T, p.N, p.x_step, static_cast<int>(sizeof(in_t)), option_flags(p.opts),
                       on_vector_words(p.x, p.spikes, p.v_seq, p.h_seq), resident_blocks);
}

// ---- the backward's memory path ----------------------------------------------------------------
// Neurons per thread of the backward's lanes path: two half values make one 4-byte word, so a
// chunk of 8 steps keeps 64 B of X and gradients in flight, as float32's one neuron does; the
// wider types take one neuron per thread.
PLIF_LAUNCH_HD constexpr int backward_lanes(int element_bytes) { return element_bytes == 2 ? 2 : 1; }

// The launch of the backward kernel: the lanes path (kFlagVectorPath) where it can run (a half
// type, the spiking mode, x, grad_spikes, grad_v_seq and grad_x on words of the lanes, x's steps
// too, N a multiple of the lanes), on N / lanes threads capped at the resident blocks; else one
// neuron per thread. Either grid is within the op's row of per-block partials (launch_blocks(N, N)).
inline LaunchPath backward_shape(index_t N, index_t x_step, int element_bytes, int flags, bool streams_on_words,
                                 index_t resident_blocks) {
  const int lanes = backward_lanes(element_bytes);
  const bool lanes_path =
      lanes > 1 && (flags & kFlagSpiking) != 0 && streams_on_words && N % lanes == 0 && x_step % lanes == 0;
  return lanes_path ? LaunchPath{launch_blocks(N / lanes, resident_blocks), kFlagVectorPath}
                    : LaunchPath{launch_blocks(N, resident_blocks), 0};
}

template <typename in_t, typename acc_t>
inline LaunchPath backward_shape(const BackwardParams<in_t, acc_t>& p, index_t resident_blocks) {
  const int element_bytes = static_cast<int>(sizeof(in_t));
  return backward_shape(
      p.N, p.x_step, element_bytes, option_flags(p.opts),
      on_words(backward_lanes(element_bytes) * element_bytes, p.x, p.grad_spikes, p.grad_v_seq, p.grad_x),
      resident_blocks);
}

}  // namespace plif
