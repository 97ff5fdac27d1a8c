// The fused BatchNorm + PLIF's arithmetic that every backend shares, in plain C++ (nvcc compiles
// it for the GPU kernels of plif_bn_kernels.cuh, the host compiler for the CPU kernel of
// plif_bn.h): the layout, the fixed-order sums, the channel terms and the per-neuron pieces, so
// that both compute the same bits.
#pragma once

#include "plif_launch.h"
#include "plif_math.h"

namespace plif {
namespace bn {

// Neurons walked together through the T steps, and the unit of the fixed-order sums. On a CPU a
// step of a block touches about 14 rows of this many values (the rows of y, dL/dS and the
// output, H and dH/dk, the per-neuron terms and running sums), which fit in L1 at 128 and not at
// 1024: 30% off the fused pair's time (benchmarks/NOTES.md, "Fused BatchNorm + PLIF").
constexpr index_t kBlock = 128;

// Rows of the [5, C] float64 channel_terms tensor the forward returns and the backward reads.
enum ChannelTerm : int { kMean = 0, kInvstd = 1, kScale = 2, kShift = 3, kUnbiasedVar = 4, kChannelTerms = 5 };

struct Geometry {
  index_t T;        // steps
  index_t y_step;   // elements between two steps of y (0: one step broadcast over time)
  index_t neurons;  // per step: N * C * S
  index_t C;
  index_t S;
  // Steps holding distinct values: the statistics are taken over these.
  PLIF_HD index_t distinct_steps() const { return y_step == 0 ? (T < 1 ? T : 1) : T; }
  PLIF_HD index_t blocks() const { return (neurons + kBlock - 1) / kBlock; }
  // Values per channel over all steps (what the gradient's means divide by) and over the distinct ones.
  PLIF_HD double per_channel(index_t steps) const {
    return static_cast<double>(steps) * static_cast<double>(neurons / C);
  }
};

// What a backward pass does: reduce the per-channel sums (and dL/dk, dL/dv_init), write dL/dy, or
// both; or, on the CPU, reduce and leave dL/dz in dL/dy's buffer for a pass that finishes it.
enum PassBits : int { kReduce = 1, kWriteGradY = 2, kStoreGradZ = 4, kWritesRows = kWriteGradY | kStoreGradZ };

// Rows a block's sums use: a block of kBlock neurons starting anywhere in a row of S spans at most this many.
PLIF_HD index_t rows_per_block(index_t S) { return (kBlock + S - 2) / S + 1; }

// The channel terms (rows of channel_terms, column c, `stride` apart) from the mean and variance
// that normalise, in float64: `batch` means they are the batch's biased ones over `count` values,
// whose unbiased variance the running statistics take; else they are the running statistics.
PLIF_HD void fill_channel_terms(double mean, double variance, double gamma, double beta, double eps, double count,
                                bool batch, double* terms, index_t stride) {
  const double invstd = 1.0 / ::sqrt(variance + eps);
  const double scale = gamma * invstd;
  terms[kMean * stride] = mean;
  terms[kInvstd * stride] = invstd;
  terms[kScale * stride] = scale;
  terms[kShift * stride] = beta - mean * scale;
  terms[kUnbiasedVar * stride] = !batch ? variance : count > 1 ? variance * count / (count - 1) : ::nan("");
}

// The batch's mean and biased variance from the sums of y and y * y over `count` values.
PLIF_HD void batch_moments(double sum, double sum_of_squares, double count, double& mean, double& variance) {
  mean = sum / count;
  const double raw = sum_of_squares / count - mean * mean;
  variance = raw > 0.0 ? raw : 0.0;
}

// ---- the per-neuron pieces, each written once ----------------------------------------------------
// The PLIF input: y normalised, scale = gamma * invstd and shift = beta - mean * scale (each
// rounded once to the compute type), two roundings.
template <typename acc_t>
PLIF_HD acc_t normalise(acc_t y, acc_t scale, acc_t shift) {
  return y * scale + shift;
}

// dL/dy from the neuron's dL/dz at the same element: the normalisation's share (scale), less the
// batch statistics' shares (the channel means of dL/dz and dL/dz * xhat; 0 with running statistics).
template <typename acc_t>
PLIF_HD acc_t grad_y_of(acc_t grad_z, acc_t xhat, acc_t scale, acc_t mean_grad, acc_t mean_grad_xhat) {
  return scale * (grad_z - mean_grad - xhat * mean_grad_xhat);
}

// The GPU kernels' call of the neuron's reverse-time step, from V[t-1] and the normalised input
// `x` (recomputed). Its running sum is dL/dk itself: dH/dk is X - (V[t-1] - V_r), exact for every
// k (dh_dk_of from X). The CPU block computes the same dH/dk in its recompute and calls
// backward_neuron_given_surrogate with it.
template <typename acc_t>
PLIF_HD acc_t neuron_backward(acc_t h, acc_t not_spiked, acc_t sg, acc_t v_prev, acc_t x, acc_t k, acc_t grad_v,
                              acc_t grad_s, bool through_spike, bool through_membrane, const Options<acc_t>& o,
                              acc_t& grad_h_next, acc_t& grad_k_sum) {
  return backward_neuron_given_surrogate(h, not_spiked, sg, dh_dk_of<true>(v_prev, x, o), k, grad_v, grad_s,
                                         through_spike, through_membrane, o, grad_h_next, grad_k_sum);
}

// What every pass, forward or backward, CPU or GPU, reads of y and the neuron.
template <typename in_t, typename acc_t>
struct NeuronInputs {
  Geometry g;
  const in_t* y;
  const acc_t* k;  // [C], or one value (k_per_layer)
  bool k_per_layer;
  const acc_t* v_init;  // [neurons], or one value (v_init_stride 0)
  index_t v_init_stride;
  Options<acc_t> opts;
};

// ---- a GPU launch's buffers (plif_bn_kernels.cuh runs them, plif_bn_cpu.cpp allocates them) ---
// The device buffers of a forward: inputs, outputs and scratch (sizes in the comments).
template <typename in_t, typename acc_t>
struct ForwardLaunch : NeuronInputs<in_t, acc_t> {
  const double* gamma;         // [C] or null
  const double* beta;          // [C] or null
  const double* running_mean;  // [C], or null: the batch's statistics
  const double* running_var;   // [C]
  double eps;
  in_t* spikes;           // [T, neurons]
  acc_t* v_last;          // [neurons]
  double* terms;          // [5, C]
  acc_t* terms_acc;       // [5, C]
  double* neuron_values;  // [2, neurons] (batch statistics only)
  double* slots;          // [blocks * rows_per_block(S) * 2]
  double* channel_sums;   // [2, C]
};

template <typename in_t, typename acc_t>
struct BackwardLaunch : NeuronInputs<in_t, acc_t> {
  const acc_t* terms_acc;    // [5, C]: the forward's terms, rounded
  const in_t* grad_spikes;   // [T, neurons] or null
  const acc_t* grad_v_last;  // [neurons] or null
  bool batch_statistics;
  in_t* grad_y;          // [T, neurons], or null: not needed
  acc_t* grad_v_init;    // [neurons] or null
  acc_t* neuron_values;  // [3, neurons]
  double* slots;         // [blocks * rows_per_block(S) * 3]
  double* channel_sums;  // [3, C]: sum dL/dz, sum dL/dz * xhat, dL/dk per channel
  acc_t* mean_grads;     // [2, C]
  double* layer_grad_k;  // [1]: dL/dk summed over the channels (k_per_layer)
};

}  // namespace bn
}  // namespace plif
