// Launchers of the fused CUDA kernels (plif_kernels.cuh). Only the launch lives here: the
// per-neuron math is plif_math.h's, shared with the CPU kernel and the CuPy backend.
//
// Nothing here synchronises with the host or reads device memory back, so the op can be
// captured in a CUDA graph. The caller (plif_ops.cpp) has set the device guard.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <atomic>

#include "plif_cuda_types.cuh"
#include "plif_kernels.cuh"
#include "plif_launch.h"

namespace plif {
namespace {

template <typename T>
const typename CudaType<T>::type* as_cuda(const T* ptr) {
  return reinterpret_cast<const typename CudaType<T>::type*>(ptr);
}
template <typename T>
typename CudaType<T>::type* as_cuda(T* ptr) {
  return reinterpret_cast<typename CudaType<T>::type*>(ptr);
}

// Blocks of `kernel` the current device keeps resident at once (its register use decides how
// many fit on a multiprocessor), queried once per device and kernel so that the launch path
// makes no driver call after the first. (ATen/cuda/CUDAContext.h caches the device properties
// too, but it pulls in the cuBLAS and cuSPARSE headers, which a minimal toolkit lacks.)
template <auto kernel>
index_t resident_blocks() {
  static std::array<std::atomic<index_t>, C10_COMPILE_TIME_MAX_GPUS> cache{};  // 0: not queried yet
  const c10::DeviceIndex device = c10::cuda::current_device();
  index_t blocks = cache[device].load(std::memory_order_relaxed);
  if (blocks == 0) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreadsPerBlock, 0));
    int multiprocessors = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
    blocks = static_cast<index_t>(multiprocessors) * per_sm;
    cache[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

}  // namespace

template <typename in_t, typename acc_t>
void forward_cuda(const ForwardParams<in_t, acc_t>& p) {
  using cuda_t = typename CudaType<in_t>::type;
  constexpr auto kernel = plif_forward_kernel<cuda_t, acc_t>;
  const LaunchPath launch = forward_shape(p, resident_blocks<kernel>());
  with_scalar_arguments(
      p,
      [&](auto... scalars) {
        kernel<<<static_cast<unsigned int>(launch.blocks), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            as_cuda(p.x), p.k, p.v_init, as_cuda(p.spikes), as_cuda(p.v_last), as_cuda(p.v_seq), p.h_seq, scalars...);
      },
      launch.path_flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backward recomputes H from x and the checkpoints (the op makes every CUDA backward take
// them); where k (v_init) is one value, the blocks' partial sums are finished after it.
template <typename in_t, typename acc_t>
void backward_cuda(const BackwardParams<in_t, acc_t>& p) {
  using cuda_t = typename CudaType<in_t>::type;
  constexpr auto kernel = plif_backward_kernel<cuda_t, acc_t>;
  const LaunchPath launch = backward_shape(p, resident_blocks<kernel>());
  const index_t blocks = launch.blocks;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_scalar_arguments(
      p,
      [&](auto... scalars) {
        kernel<<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(
            as_cuda(p.grad_spikes), as_cuda(p.grad_v_last), as_cuda(p.grad_v_seq), p.h_seq, as_cuda(p.x), p.k, p.v_init,
            as_cuda(p.grad_x), p.grad_k, p.grad_v_init, p.grad_k_partials, p.grad_v_init_partials, scalars...);
      },
      launch.path_flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.grad_k_partials != nullptr || p.grad_v_init_partials != nullptr) {
    plif_finish_shares_kernel<acc_t>
        <<<1, 1, 0, stream>>>(p.grad_k_partials, p.grad_v_init_partials, p.grad_k, p.grad_v_init, blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#define PLIF_INSTANTIATE_CUDA(in_t, acc_t)                                    \
  template void forward_cuda<in_t, acc_t>(const ForwardParams<in_t, acc_t>&); \
  template void backward_cuda<in_t, acc_t>(const BackwardParams<in_t, acc_t>&);

PLIF_FOR_EACH_TYPE_PAIR(PLIF_INSTANTIATE_CUDA)

}  // namespace plif
