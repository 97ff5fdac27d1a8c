// The fused BatchNorm + PLIF GPU kernels of csrc/plif_bn_kernels.cuh compiled by the host compiler
// and launched on the CPU: every thread of the grid runs the real __global__ function in turn (the
// kernels share nothing between threads). The launch sequences below are the ones a GPU launcher
// makes. tests/test_batchnorm_plif_gpu_emulation.py builds this file into a shared library and
// compares its results bit for bit with the CPU op. Built with -ffp-contract=off, as the
// extension is.
#include <functional>
#include <vector>

#include "emulation.h"

// plif_kernels.cuh, included for its half types' conversions, holds kernels that synchronise a
// block; none of them runs here, and the BatchNorm kernels never synchronise.
#define __syncthreads() throw std::logic_error("__syncthreads in the emulated BatchNorm kernels")

#include "plif_bn_kernels.cuh"

namespace {

using plif::index_t;
using plif::bn::Geometry;

// A small grid, so that every grid-stride loop takes several turns.
constexpr unsigned int kEmulatedBlocks = 3;
constexpr unsigned int kEmulatedThreads = 64;

// forward_launches / backward_launches' launch: every thread of a small grid (every grid-stride
// loop then takes several turns) runs `kernel` in turn.
struct EmulatedLaunch {
  template <typename Kernel, typename... Arguments>
  void operator()(index_t, Kernel kernel, Arguments... arguments) const {
    plif_emulation::grid_dim = dim3(kEmulatedBlocks);
    plif_emulation::block_dim = dim3(kEmulatedThreads);
    for (unsigned int b = 0; b < kEmulatedBlocks; ++b) {
      for (unsigned int t = 0; t < kEmulatedThreads; ++t) {
        plif_emulation::block_idx = make_uint3(b, 0, 0);
        plif_emulation::thread_idx = make_uint3(t, 0, 0);
        kernel(arguments...);
      }
    }
  }
};

using plif_emulation::dispatch;

template <typename acc_t>
plif::Options<acc_t> options_of(double v_threshold, double v_reset, double alpha, int surrogate, int flags) {
  plif::Options<acc_t> o;
  o.v_threshold = static_cast<acc_t>(v_threshold);
  o.v_reset = (flags & plif::kFlagSoftReset) ? acc_t(0) : static_cast<acc_t>(v_reset);
  o.alpha = static_cast<acc_t>(alpha);
  o.surrogate = surrogate;
  o.soft_reset = (flags & plif::kFlagSoftReset) != 0;
  o.decay_input = (flags & plif::kFlagDecayInput) != 0;
  o.detach_reset = (flags & plif::kFlagDetachReset) != 0;
  o.spiking = (flags & plif::kFlagSpiking) != 0;
  o.h_checkpoints = true;  // as the op's options: X given to the backward step
  return o;
}

// The fields both launches share (NeuronInputs), from the entry points' arguments.
template <typename in_t, typename acc_t>
void set_neuron_inputs(plif::bn::NeuronInputs<in_t, acc_t>& p, const Geometry& g, const void* y, const void* k,
                       int k_per_layer, const void* v_init, long long v_init_stride, const plif::Options<acc_t>& o) {
  p.g = g;
  p.y = static_cast<const in_t*>(y);
  p.k = static_cast<const acc_t*>(k);
  p.k_per_layer = k_per_layer != 0;
  p.v_init = static_cast<const acc_t*>(v_init);
  p.v_init_stride = v_init_stride;
  p.opts = o;
}

int guarded(char* error, int error_size, const std::function<void()>& body) {
  return plif_emulation::run_reporting(error, error_size, body) ? 0 : -1;
}

}  // namespace

extern "C" {

// The forward op: channel terms ([5, C] float64), spikes, v_last.
int bn_emulate_forward(int dtype, const void* y, long long T, long long y_step, long long neurons, long long C,
                       long long S, const double* gamma, const double* beta, const double* running_mean,
                       const double* running_var, double eps, const void* k, int k_per_layer, const void* v_init,
                       long long v_init_stride, double v_threshold, double v_reset, double alpha, int surrogate,
                       int flags, void* spikes, void* v_last, double* terms, char* error, int error_size) {
  return guarded(error, error_size, [&] {
    const Geometry g{T, y_step, neurons, C, S};
    dispatch(dtype, [&](auto in_v, auto acc_v) {
      using in_t = decltype(in_v);
      using acc_t = decltype(acc_v);
      std::vector<double> neuron_values(static_cast<size_t>(2 * neurons)), channel_sums(static_cast<size_t>(2 * C));
      std::vector<double> slots(static_cast<size_t>(g.blocks() * plif::bn::rows_per_block(S) * 2));
      std::vector<acc_t> terms_acc(static_cast<size_t>(plif::bn::kChannelTerms * C));
      plif::bn::ForwardLaunch<in_t, acc_t> p;
      set_neuron_inputs(p, g, y, k, k_per_layer, v_init, v_init_stride,
                        options_of<acc_t>(v_threshold, v_reset, alpha, surrogate, flags));
      p.gamma = gamma;
      p.beta = beta;
      p.running_mean = running_mean;
      p.running_var = running_var;
      p.eps = eps;
      p.spikes = static_cast<in_t*>(spikes);
      p.v_last = static_cast<acc_t*>(v_last);
      p.terms = terms;
      p.terms_acc = terms_acc.data();
      p.neuron_values = neuron_values.data();
      p.slots = slots.data();
      p.channel_sums = channel_sums.data();
      plif::bn::forward_launches<plif::kRuntime>(p, EmulatedLaunch());
    });
  });
}

// The backward op: dL/dy (where grad_y is given), channel_sums ([3, C] float64: sum dL/dz,
// sum dL/dz * xhat, dL/dk per channel), dL/dv_init (where given) and, for a per-layer k, dL/dk.
int bn_emulate_backward(int dtype, const void* grad_spikes, const void* grad_v_last, const void* y, long long T,
                        long long y_step, long long neurons, long long C, long long S, const double* terms,
                        const void* k, int k_per_layer, const void* v_init, long long v_init_stride,
                        int batch_statistics, double v_threshold, double v_reset, double alpha, int surrogate,
                        int flags, void* grad_y, double* channel_sums, void* grad_v_init, double* layer_grad_k,
                        char* error, int error_size) {
  return guarded(error, error_size, [&] {
    const Geometry g{T, y_step, neurons, C, S};
    dispatch(dtype, [&](auto in_v, auto acc_v) {
      using in_t = decltype(in_v);
      using acc_t = decltype(acc_v);
      std::vector<acc_t> terms_acc(static_cast<size_t>(plif::bn::kChannelTerms * C));
      EmulatedLaunch()(terms_acc.size(), plif::bn::bn_round_terms_kernel<acc_t>, terms,
                       static_cast<index_t>(terms_acc.size()), terms_acc.data());
      std::vector<acc_t> neuron_values(static_cast<size_t>(3 * neurons)), mean_grads(static_cast<size_t>(2 * C));
      std::vector<double> slots(static_cast<size_t>(g.blocks() * plif::bn::rows_per_block(S) * 3));
      plif::bn::BackwardLaunch<in_t, acc_t> p;
      set_neuron_inputs(p, g, y, k, k_per_layer, v_init, v_init_stride,
                        options_of<acc_t>(v_threshold, v_reset, alpha, surrogate, flags));
      p.terms_acc = terms_acc.data();
      p.grad_spikes = static_cast<const in_t*>(grad_spikes);
      p.grad_v_last = static_cast<const acc_t*>(grad_v_last);
      p.batch_statistics = batch_statistics != 0;
      p.grad_y = static_cast<in_t*>(grad_y);
      p.grad_v_init = static_cast<acc_t*>(grad_v_init);
      p.neuron_values = neuron_values.data();
      p.slots = slots.data();
      p.channel_sums = channel_sums;
      p.mean_grads = mean_grads.data();
      p.layer_grad_k = layer_grad_k;
      plif::bn::backward_launches<plif::kRuntime>(p, EmulatedLaunch());
    });
  });
}

}  // extern "C"
