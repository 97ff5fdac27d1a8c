// The nvcc launcher's entry points (plif_bn_cuda.cu), for the op (plif_bn_cpu.cpp) in builds with
// CUDA: every buffer of the launch struct allocated on the tensors' device, the device guard set.
#pragma once

#include "plif_bn_math.h"

namespace plif {
namespace bn {

template <typename in_t, typename acc_t>
void forward_cuda(const ForwardLaunch<in_t, acc_t>& p);
template <typename in_t, typename acc_t>
void backward_cuda(const BackwardLaunch<in_t, acc_t>& p);

}  // namespace bn
}  // namespace plif
