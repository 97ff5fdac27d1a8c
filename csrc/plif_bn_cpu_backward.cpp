// The fused BatchNorm + PLIF backward on the CPU (plif_bn.h): a copy of the passes per
// specialised surrogate, whose loops vectorise, and the runtime-switch copy for the others and
// for the smooth mode.
#include "plif_bn.h"

namespace plif {
namespace bn {

template <typename in_t, typename acc_t>
void backward_cpu(const Args<in_t, acc_t>& a, const Gradients<in_t, acc_t>& gr, bool write_grad_y,
                  double* channel_sums) {
  if (a.opts.spiking && a.opts.surrogate == kAtan) return backward_all<kAtan>(a, gr, write_grad_y, channel_sums);
  if (a.opts.spiking && a.opts.surrogate == kSigmoid) {
    return backward_all<kSigmoid>(a, gr, write_grad_y, channel_sums);
  }
  backward_all<kRuntime>(a, gr, write_grad_y, channel_sums);
}

#define PLIF_BN_INSTANTIATE_BACKWARD(in_t, acc_t) \
  template void backward_cpu<in_t, acc_t>(const Args<in_t, acc_t>&, const Gradients<in_t, acc_t>&, bool, double*);
PLIF_FOR_EACH_TYPE_PAIR(PLIF_BN_INSTANTIATE_BACKWARD)

}  // namespace bn
}  // namespace plif
