// Fused CPU kernels: blocks of neurons in parallel, each block walked through all T steps
// with the shared math of plif_math.h. Built with -ffp-contract=off (see setup.py).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "plif_launch.h"
#include "plif_math.h"

namespace plif {
namespace {

// A block is kGroups groups of kLanes neurons. Each step runs one fused loop over a group (wide
// enough to vectorise, small enough for its temporaries to stay in L1), and the block walks
// time step by time step through all its groups, so every [T, N] stream is read and written
// in runs of kGroups * kLanes values that the hardware prefetchers follow.
constexpr int kLanes = 128;
constexpr int kGroups = 8;
constexpr index_t kBlock = kLanes * kGroups;

// One copy per instruction set, picked at load time for the running CPU: the same scans
// vectorise 4, 8 or 16 floats wide. No -ffast-math and contraction stays off in every copy.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PLIF_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PLIF_ISA_CLONES
#endif

template <int SURROGATE, typename in_t, typename acc_t>
PLIF_ISA_CLONES void forward_block(const ForwardParams<in_t, acc_t>& p, index_t n0) {
  ForwardState<kLanes, acc_t> state[kGroups];
  for (int g = 0; g < kGroups; ++g) forward_begin<kLanes>(p, n0 + g * kLanes, state[g]);
  for (index_t t = 0; t < p.T; ++t) {
    for (int g = 0; g < kGroups; ++g) forward_step<kLanes, SURROGATE>(p, t, n0 + g * kLanes, state[g]);
  }
  for (int g = 0; g < kGroups; ++g) forward_end<kLanes>(p, n0 + g * kLanes, state[g]);
}

template <int SURROGATE, typename in_t, typename acc_t>
PLIF_ISA_CLONES void backward_block(const BackwardParams<in_t, acc_t>& p, index_t n0) {
  BackwardState<kLanes, acc_t> state[kGroups];
  for (int g = 0; g < kGroups; ++g) backward_begin<kLanes, SURROGATE>(p, n0 + g * kLanes, state[g]);
  for (index_t t = p.T - 1; t >= 0; --t) {
    for (int g = 0; g < kGroups; ++g) backward_step<kLanes, SURROGATE>(p, t, n0 + g * kLanes, state[g]);
  }
  for (int g = 0; g < kGroups; ++g) backward_end<kLanes>(p, n0 + g * kLanes, state[g]);
}

// Whole blocks in parallel, then the remaining N % kBlock neurons one lane-group (or one
// neuron) at a time.
template <typename Params, typename BlockFn, typename GroupFn, typename NeuronFn>
void for_each_neuron(const Params& p, BlockFn block, GroupFn group, NeuronFn neuron) {
  const index_t blocks = p.N / kBlock;
  const index_t work_per_block = p.T * kBlock;
  // At least ~2^17 neuron-steps (tens of microseconds) per task: below that, waking a second
  // thread costs more than it saves.
  const int64_t grain = work_per_block >= (1 << 17) ? 1 : (1 << 17) / work_per_block;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) block(p, b * kBlock);
  });
  index_t n = blocks * kBlock;
  for (; n + kLanes <= p.N; n += kLanes) group(p, n);
  for (; n < p.N; ++n) neuron(p, n);
}

template <int SURROGATE, typename in_t, typename acc_t>
void forward_in_mode(const ForwardParams<in_t, acc_t>& p) {
  for_each_neuron(p, forward_block<SURROGATE, in_t, acc_t>, forward_scan<kLanes, SURROGATE, in_t, acc_t>,
                  forward_scan<1, SURROGATE, in_t, acc_t>);
}

template <int SURROGATE, typename in_t, typename acc_t>
void backward_in_mode(const BackwardParams<in_t, acc_t>& p) {
  for_each_neuron(p, backward_block<SURROGATE, in_t, acc_t>, backward_scan<kLanes, SURROGATE, in_t, acc_t>,
                  backward_scan<1, SURROGATE, in_t, acc_t>);
}

}  // namespace

// Spiking mode, the one training uses, runs branch-free vectorised loops (one copy per
// surrogate for the backward); the smooth mode (for gradcheck) runs the runtime-switch scans.
template <typename in_t, typename acc_t>
void forward_cpu(const ForwardParams<in_t, acc_t>& p) {
  if (p.opts.spiking) {
    forward_in_mode<kSpikingForward>(p);
  } else {
    forward_in_mode<kRuntime>(p);
  }
}

template <typename in_t, typename acc_t>
void backward_cpu(const BackwardParams<in_t, acc_t>& p) {
  if (!p.opts.spiking) return backward_in_mode<kRuntime>(p);
  switch (p.opts.surrogate) {
    case kSigmoid: return backward_in_mode<kSigmoid>(p);
    case kAtan: return backward_in_mode<kAtan>(p);
    case kPiecewiseQuadratic: return backward_in_mode<kPiecewiseQuadratic>(p);
    case kPiecewiseExp: return backward_in_mode<kPiecewiseExp>(p);
    case kSoftSign: return backward_in_mode<kSoftSign>(p);
    case kSuperSpike: return backward_in_mode<kSuperSpike>(p);
    default: return backward_in_mode<kErf>(p);
  }
}

#define PLIF_INSTANTIATE_CPU(in_t, acc_t)                                    \
  template void forward_cpu<in_t, acc_t>(const ForwardParams<in_t, acc_t>&); \
  template void backward_cpu<in_t, acc_t>(const BackwardParams<in_t, acc_t>&);

PLIF_INSTANTIATE_CPU(float, float)
PLIF_INSTANTIATE_CPU(double, double)
PLIF_INSTANTIATE_CPU(c10::Half, float)
PLIF_INSTANTIATE_CPU(c10::BFloat16, float)

}  // namespace plif
