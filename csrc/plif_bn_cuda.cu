// The nvcc launcher of the fused BatchNorm + PLIF kernels (plif_bn_kernels.cuh): the launch
// sequences of forward_launches / backward_launches on PyTorch's current stream. The op
// (plif_bn_cpu.cpp) checks the arguments, allocates every buffer and sets the device guard.
// Nothing here synchronises with the host.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#include "plif_bn_cuda.h"
#include "plif_bn_kernels.cuh"
#include "plif_cuda_types.cuh"

namespace plif {
namespace bn {
namespace {

// A launch struct with the half types' pointers as CUDA's (the same bits, the same layout).
template <typename Target, typename Source>
Target as_cuda_types(const Source& source) {
  static_assert(sizeof(Target) == sizeof(Source), "the launch structs differ only in their pointers' types");
  Target target;
  std::memcpy(&target, &source, sizeof(Target));
  return target;
}

// Grids of at most this many blocks: the kernels' grid-stride loops take the rest.
constexpr index_t kMaxBlocks = 65535;

struct StreamLaunch {
  cudaStream_t stream;

  template <typename Kernel, typename... Arguments>
  void operator()(index_t items, Kernel kernel, Arguments... arguments) const {
    const index_t needed = (items + kThreadsPerBlock - 1) / kThreadsPerBlock;
    const unsigned int blocks = static_cast<unsigned int>(needed < 1 ? 1 : needed < kMaxBlocks ? needed : kMaxBlocks);
    kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(arguments...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename acc_t, typename Fn>
void with_surrogate(const Options<acc_t>& o, Fn fn) {
  if (!o.spiking) return fn(std::integral_constant<int, kRuntime>());
  switch (o.surrogate) {
    case kSigmoid: return fn(std::integral_constant<int, kSigmoid>());
    case kAtan: return fn(std::integral_constant<int, kAtan>());
    default: return fn(std::integral_constant<int, kRuntime>());
  }
}

}  // namespace

template <typename in_t, typename acc_t>
void forward_cuda(const ForwardLaunch<in_t, acc_t>& given) {
  using cuda_t = typename CudaType<in_t>::type;
  const auto p = as_cuda_types<ForwardLaunch<cuda_t, acc_t>>(given);
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  if (p.opts.spiking) {
    forward_launches<kSpikingForward>(p, launch);
  } else {
    forward_launches<kRuntime>(p, launch);
  }
}

template <typename in_t, typename acc_t>
void backward_cuda(const BackwardLaunch<in_t, acc_t>& given) {
  using cuda_t = typename CudaType<in_t>::type;
  const auto p = as_cuda_types<BackwardLaunch<cuda_t, acc_t>>(given);
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  with_surrogate(p.opts, [&](auto surrogate) { backward_launches<decltype(surrogate)::value>(p, launch); });
}

#define PLIF_BN_INSTANTIATE_CUDA(in_t, acc_t)                                 \
  template void forward_cuda<in_t, acc_t>(const ForwardLaunch<in_t, acc_t>&); \
  template void backward_cuda<in_t, acc_t>(const BackwardLaunch<in_t, acc_t>&);
PLIF_FOR_EACH_TYPE_PAIR(PLIF_BN_INSTANTIATE_CUDA)

}  // namespace bn
}  // namespace plif
