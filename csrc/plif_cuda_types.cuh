// c10's half types as CUDA's, for the nvcc launchers (plif_cuda.cu, plif_bn_cuda.cu): the same
// bits; the kernels are written for CUDA's, which is what NVRTC sees too.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace plif {

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

}  // namespace plif
