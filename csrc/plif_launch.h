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
// An enumerator, as in plif_math.h: NVRTC names a namespace-scope constant per compilation.
enum LaunchShape : int { kThreadsPerBlock = 256 };

// Blocks of a launch over `neurons`: one thread per neuron, capped at the blocks the device
// keeps resident (multiprocessors x blocks of that kernel per multiprocessor, which its register
// use decides), and at least one; the kernels' grid-stride loops take the rest, and pick their
// memory path from the grid they get. Both GPU launchers call this: the nvcc one (plif_cuda.cu)
// with the CUDA runtime's occupancy, the NVRTC one (plif_cuda/cupy_backend.py, through
// plif_cuda._C.launch_blocks) with the driver's for the run-time-compiled kernel.
inline index_t launch_blocks(index_t neurons, index_t resident_blocks) {
  const index_t needed = (neurons + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const index_t capped = needed < resident_blocks ? needed : resident_blocks;
  return capped > 1 ? capped : 1;
}

}  // namespace plif
