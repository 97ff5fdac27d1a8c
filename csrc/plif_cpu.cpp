// Fused CPU kernels: blocks of neurons in parallel, each block scanned over all T steps
// with the shared math of plif_math.h. Built with -ffp-contract=off (see setup.py).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "plif_launch.h"
#include "plif_math.h"

namespace plif {
namespace {

// Wide enough for the per-step loops to vectorise and for each row of a block to fill whole
// cache lines; the tail (N % kLanes neurons) runs one neuron at a time.
constexpr int kLanes = 64;

// Blocks per parallel task: enough work per task to amortise the scheduling cost.
index_t grain_blocks(index_t T) {
  const index_t work_per_block = (T > 0 ? T : 1) * kLanes;
  const index_t target = 1 << 15;
  return target / work_per_block > 0 ? target / work_per_block : 1;
}

// One copy per instruction set, picked at load time for the running CPU: the same scans
// vectorise 4, 8 or 16 floats wide. No -ffast-math and contraction stays off in every copy.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PLIF_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PLIF_ISA_CLONES
#endif

template <typename in_t, typename acc_t>
PLIF_ISA_CLONES void forward_blocks(const ForwardParams<in_t, acc_t>& p, index_t begin, index_t end) {
  for (index_t b = begin; b < end; ++b) forward_scan<kLanes>(p, b * kLanes);
}

template <typename in_t, typename acc_t>
PLIF_ISA_CLONES void backward_blocks(const BackwardParams<in_t, acc_t>& p, index_t begin, index_t end) {
  for (index_t b = begin; b < end; ++b) backward_scan<kLanes>(p, b * kLanes);
}

template <typename Params, typename BlocksFn, typename NarrowFn>
void for_each_block(const Params& p, BlocksFn blocks_fn, NarrowFn narrow) {
  const index_t blocks = p.N / kLanes;
  at::parallel_for(0, blocks, grain_blocks(p.T), [&](int64_t begin, int64_t end) { blocks_fn(p, begin, end); });
  for (index_t n = blocks * kLanes; n < p.N; ++n) narrow(p, n);
}

}  // namespace

template <typename in_t, typename acc_t>
void forward_cpu(const ForwardParams<in_t, acc_t>& p) {
  for_each_block(p, forward_blocks<in_t, acc_t>, forward_scan<1, in_t, acc_t>);
}

template <typename in_t, typename acc_t>
void backward_cpu(const BackwardParams<in_t, acc_t>& p) {
  for_each_block(p, backward_blocks<in_t, acc_t>, backward_scan<1, in_t, acc_t>);
}

#define PLIF_INSTANTIATE_CPU(in_t, acc_t)                                    \
  template void forward_cpu<in_t, acc_t>(const ForwardParams<in_t, acc_t>&); \
  template void backward_cpu<in_t, acc_t>(const BackwardParams<in_t, acc_t>&);

PLIF_INSTANTIATE_CPU(float, float)
PLIF_INSTANTIATE_CPU(double, double)
PLIF_INSTANTIATE_CPU(c10::Half, float)
PLIF_INSTANTIATE_CPU(c10::BFloat16, float)

}  // namespace plif
