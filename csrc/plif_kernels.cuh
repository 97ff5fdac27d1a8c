// CUDA kernels of the fused PLIF op, shared verbatim by the compiled extension (nvcc,
// plif_cuda.cu) and the CuPy backend (NVRTC, plif_cuda/cupy_backend.py). One thread scans one
// neuron over all T steps with the math of plif_math.h; consecutive threads take consecutive
// neurons, so every load and store of a warp is one coalesced transaction per time step.
//
// Kernel arguments are plain scalars and pointers (no structs) so that CuPy can pass them.
// Half types are CUDA's __half / __nv_bfloat16, whose bits equal c10::Half / c10::BFloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "plif_math.h"

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

template <typename in_t, typename acc_t>
__global__ void plif_forward_kernel(const in_t* x, const acc_t* k, const acc_t* v_init, in_t* spikes, acc_t* v_last,
                                    in_t* v_seq, acc_t* h_seq, index_t k_stride, index_t v_init_stride, index_t T,
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
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t n = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += stride) {
    forward_scan<1, kRuntime>(p, n);
  }
}

template <typename in_t, typename acc_t>
__global__ void plif_backward_kernel(const in_t* grad_spikes, const acc_t* grad_v_last, const in_t* grad_v_seq,
                                     const acc_t* h_seq, const acc_t* k, const acc_t* v_init, in_t* grad_x,
                                     acc_t* grad_k, acc_t* grad_v_init, index_t k_stride, index_t v_init_stride,
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
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t n = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += stride) {
    backward_scan<1, kRuntime>(p, n);
  }
}

}  // namespace plif
