// Entry points of the kernels, called by the binding layer (plif_ops.cpp) once every
// argument has been checked. Instantiated for (in_t, acc_t) in
// {(float, float), (double, double), (c10::Half, float), (c10::BFloat16, float)}.
#pragma once

#include "plif_params.h"

namespace plif {

template <typename in_t, typename acc_t>
void forward_cpu(const ForwardParams<in_t, acc_t>& p);
template <typename in_t, typename acc_t>
void backward_cpu(const BackwardParams<in_t, acc_t>& p);

#ifdef PLIF_WITH_CUDA
// Launch on PyTorch's current stream of the device the tensors live on; the caller sets the
// device guard.
template <typename in_t, typename acc_t>
void forward_cuda(const ForwardParams<in_t, acc_t>& p);
template <typename in_t, typename acc_t>
void backward_cuda(const BackwardParams<in_t, acc_t>& p);
#endif

}  // namespace plif
