// The CPU kernels' entry points: each picks the part (plif_cpu_parts.h) compiled for its mode or
// surrogate. Spiking mode, the one training uses, runs branch-free vectorised loops, one copy per
// surrogate for the backward; the smooth mode (for gradcheck) runs the run-time-switch scans.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "plif_cpu_parts.h"
#include "plif_dispatch.h"
#include "plif_launch.h"
#include "plif_math.h"

namespace plif {

template <typename in_t, typename acc_t>
void forward_cpu(const ForwardParams<in_t, acc_t>& p) {
  dispatch<kSpikingForward, kRuntime>(p.opts.spiking ? kSpikingForward : kRuntime,
                                      [&](auto mode) { forward_with_mode<decltype(mode)::value>(p); });
}

template <typename in_t, typename acc_t>
void backward_cpu(const BackwardParams<in_t, acc_t>& p) {
  dispatch<kRuntime, kSigmoid, kAtan, kPiecewiseQuadratic, kPiecewiseExp, kSoftSign, kSuperSpike, kErf>(
      p.opts.spiking ? static_cast<int>(p.opts.surrogate) : kRuntime,
      [&](auto surrogate) { backward_with_surrogate<decltype(surrogate)::value>(p); });
}

#define PLIF_INSTANTIATE_CPU_ENTRY_POINTS(in_t, acc_t)                       \
  template void forward_cpu<in_t, acc_t>(const ForwardParams<in_t, acc_t>&); \
  template void backward_cpu<in_t, acc_t>(const BackwardParams<in_t, acc_t>&);
PLIF_FOR_EACH_TYPE_PAIR(PLIF_INSTANTIATE_CPU_ENTRY_POINTS)
#undef PLIF_INSTANTIATE_CPU_ENTRY_POINTS

}  // namespace plif
