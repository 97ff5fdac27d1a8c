// The fused BatchNorm + PLIF GPU kernels of csrc/plif_bn_kernels.cuh compiled by the host compiler
// and launched on the CPU: every thread of the grid runs the real __global__ function in turn (the
// kernels share nothing between threads). The launch sequences below are the ones a GPU launcher
// makes. tests/test_batchnorm_plif_gpu_emulation.py builds this file into a shared library and
// compares its results bit for bit with the CPU op. Built with -ffp-contract=off, as the
// extension is.
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <vector>

// CUDA's half types with their host conversions, before the launch names are defined below.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace bn_emulation {
dim3 grid_dim, block_dim;
uint3 block_idx, thread_idx;
}  // namespace bn_emulation

#define gridDim bn_emulation::grid_dim
#define blockDim bn_emulation::block_dim
#define blockIdx bn_emulation::block_idx
#define threadIdx bn_emulation::thread_idx
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

#include "plif_bn_kernels.cuh"

namespace {

using plif::index_t;
using plif::bn::Geometry;

// A small grid, so that every grid-stride loop takes several turns.
constexpr unsigned int kEmulatedBlocks = 3;
constexpr unsigned int kEmulatedThreads = 64;

template <typename Kernel>
void launch(Kernel run_thread) {
  bn_emulation::grid_dim = dim3(kEmulatedBlocks);
  bn_emulation::block_dim = dim3(kEmulatedThreads);
  for (unsigned int b = 0; b < kEmulatedBlocks; ++b) {
    for (unsigned int t = 0; t < kEmulatedThreads; ++t) {
      bn_emulation::block_idx = make_uint3(b, 0, 0);
      bn_emulation::thread_idx = make_uint3(t, 0, 0);
      run_thread();
    }
  }
}

// dtype codes of the test: float32, float64, float16, bfloat16.
template <typename Fn>
void dispatch(int dtype, Fn fn) {
  switch (dtype) {
    case 0: fn(float{}, float{}); break;
    case 1: fn(double{}, double{}); break;
    case 2: fn(__half{}, float{}); break;
    case 3: fn(__nv_bfloat16{}, float{}); break;
    default: throw std::invalid_argument("unknown dtype code");
  }
}

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
  o.h_checkpoints = false;
  return o;
}

// Per channel, into channel_sums ([quantities, C]): the neuron values summed as the CPU op does.
template <typename value_t>
void channel_sums_of(const value_t* neuron_values, int quantities, const Geometry& g, double* channel_sums) {
  std::vector<double> slots(static_cast<size_t>(g.blocks() * plif::bn::rows_per_block(g.S) * quantities));
  launch([&] { plif::bn::bn_row_sums_kernel<value_t>(neuron_values, quantities, g, slots.data()); });
  launch([&] { plif::bn::bn_channel_sums_kernel(slots.data(), quantities, g, channel_sums); });
}

template <typename acc_t>
std::vector<acc_t> rounded(const double* values, size_t count) {
  std::vector<acc_t> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = static_cast<acc_t>(values[i]);
  return out;
}

template <typename Body>
int guarded(char* error, int error_size, Body body) {
  try {
    body();
  } catch (const std::exception& e) {
    std::snprintf(error, static_cast<size_t>(error_size), "%s", e.what());
    return -1;
  }
  return 0;
}

}  // namespace

extern "C" {

// The forward op: statistics (without running_mean), channel terms ([5, C] float64), spikes, v_last.
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
      const in_t* const y_data = static_cast<const in_t*>(y);
      std::vector<double> sums(static_cast<size_t>(2 * C));
      if (running_mean == nullptr) {
        std::vector<double> neuron_values(static_cast<size_t>(2 * neurons));
        launch([&] { plif::bn::bn_statistics_kernel<in_t, acc_t>(y_data, g, neuron_values.data()); });
        channel_sums_of(neuron_values.data(), 2, g, sums.data());
      }
      launch([&] {
        plif::bn::bn_channel_terms_kernel(sums.data(), running_mean, running_var, gamma, beta, eps, g, terms);
      });
      const std::vector<acc_t> terms_acc = rounded<acc_t>(terms, static_cast<size_t>(plif::bn::kChannelTerms * C));
      const auto o = options_of<acc_t>(v_threshold, v_reset, alpha, surrogate, flags);
      launch([&] {
        plif::bn::bn_forward_kernel<plif::kRuntime, in_t, acc_t>(
            y_data, g, terms_acc.data(), static_cast<const acc_t*>(k), k_per_layer != 0,
            static_cast<const acc_t*>(v_init), v_init_stride, o, static_cast<in_t*>(spikes),
            static_cast<acc_t*>(v_last));
      });
    });
  });
}

// The backward op: dL/dy (where grad_y is given), channel_sums ([3, C] float64: sum dL/dz,
// sum dL/dz * xhat, dL/dk per channel) and dL/dv_init (where given).
int bn_emulate_backward(int dtype, const void* grad_spikes, const void* grad_v_last, const void* y, long long T,
                        long long y_step, long long neurons, long long C, long long S, const double* terms,
                        const void* k, int k_per_layer, const void* v_init, long long v_init_stride,
                        int batch_statistics, double v_threshold, double v_reset, double alpha, int surrogate,
                        int flags, void* grad_y, double* channel_sums, void* grad_v_init, char* error,
                        int error_size) {
  return guarded(error, error_size, [&] {
    const Geometry g{T, y_step, neurons, C, S};
    dispatch(dtype, [&](auto in_v, auto acc_v) {
      using in_t = decltype(in_v);
      using acc_t = decltype(acc_v);
      const std::vector<acc_t> terms_acc = rounded<acc_t>(terms, static_cast<size_t>(plif::bn::kChannelTerms * C));
      const auto o = options_of<acc_t>(v_threshold, v_reset, alpha, surrogate, flags);
      std::vector<acc_t> neuron_values(static_cast<size_t>(3 * neurons));
      const auto pass = [&](auto pass_bits, const acc_t* mean_grad, const acc_t* mean_grad_xhat) {
        launch([&] {
          plif::bn::bn_backward_kernel<plif::kRuntime, decltype(pass_bits)::value, in_t, acc_t>(
              static_cast<const in_t*>(y), g, terms_acc.data(), static_cast<const acc_t*>(k), k_per_layer != 0,
              static_cast<const acc_t*>(v_init), v_init_stride, o, static_cast<const in_t*>(grad_spikes),
              static_cast<const acc_t*>(grad_v_last), batch_statistics != 0, mean_grad, mean_grad_xhat,
              neuron_values.data(), static_cast<acc_t*>(grad_v_init), static_cast<in_t*>(grad_y));
        });
      };
      pass(std::integral_constant<int, plif::bn::kReduce>(), nullptr, nullptr);
      channel_sums_of(neuron_values.data(), 3, g, channel_sums);
      if (grad_y == nullptr) return;
      const double count = g.per_channel(g.T);
      std::vector<acc_t> mean_grad(static_cast<size_t>(C)), mean_grad_xhat(static_cast<size_t>(C));
      for (long long c = 0; c < C; ++c) {
        mean_grad[c] = static_cast<acc_t>(channel_sums[c] / count);
        mean_grad_xhat[c] = static_cast<acc_t>(channel_sums[C + c] / count);
      }
      pass(std::integral_constant<int, plif::bn::kWriteGradY>(), mean_grad.data(), mean_grad_xhat.data());
    });
  });
}

}  // extern "C"
