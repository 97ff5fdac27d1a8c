// The fused BatchNorm + PLIF as GPU kernels: one thread per item, items in grid-stride loops, no
// thread sharing anything with another, and every sum in the order of the CPU kernel (plif_bn.h),
// from the same functions (plif_bn_math.h), so the two compute the same bits wherever the neuron
// math does (see plif_math.h on exp). tests/gpu_emulation/bn_emulated_launch.cpp runs them on the
// CPU and tests/test_batchnorm_plif_gpu_emulation.py compares them with the CPU op bit for bit.
//
// A pass is a sequence of launches (bn_forward_launches, bn_backward_launches below, which the
// emulation calls and an nvcc launcher would call): statistics, per neuron over the steps, into
// `neuron_values` ([quantities, neurons] scratch); row sums, per (block, row) slot, into `slots`;
// channel sums, per channel over the slots in block order; then the per-neuron passes.
#pragma once

#include "plif_bn_math.h"
#include "plif_kernels.cuh"  // the half types' load_as / store_as

namespace plif {
namespace bn {

// Steps of a neuron's membranes the backward keeps in its registers: longer sequences are walked
// back chunk by chunk, each chunk's membranes recomputed from the start (the same expressions).
// The chunk loops are unrolled, so that every membrane has a register (an indexed array would
// live in a stack frame).
enum BackwardGeometry : int { kBackwardChunk = 8 };

PLIF_HD index_t first_item() { return static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
PLIF_HD index_t item_stride() { return static_cast<index_t>(gridDim.x) * blockDim.x; }

// Per neuron: sum y and y * y over the distinct steps, in time order, float64
// (statistics_block's per-neuron sums).
template <typename in_t, typename acc_t>
__global__ void bn_statistics_kernel(const in_t* y, Geometry g, double* neuron_values) {
  for (index_t n = first_item(); n < g.neurons; n += item_stride()) {
    double sum = 0.0, sum_of_squares = 0.0;
    for (index_t t = 0; t < g.distinct_steps(); ++t) {
      const double value = static_cast<double>(load_as<acc_t>(y[t * g.y_step + n]));
      sum += value;
      sum_of_squares += value * value;
    }
    neuron_values[n] = sum;
    neuron_values[g.neurons + n] = sum_of_squares;
  }
}

// Per (block, row) slot: the row's neurons within the block summed by sum_in_fixed_order (RowSums::add_block).
template <typename value_t>
__global__ void bn_row_sums_kernel(const value_t* neuron_values, int quantities, Geometry g, double* slots) {
  const index_t per_block = rows_per_block(g.S);
  for (index_t item = first_item(); item < g.blocks() * per_block; item += item_stride()) {
    const index_t block = item / per_block;
    const index_t n0 = block * kBlock;
    const index_t n_end = n0 + kBlock < g.neurons ? n0 + kBlock : g.neurons;
    const index_t row = n0 / g.S + item % per_block;
    const index_t begin = row * g.S > n0 ? row * g.S : n0;
    const index_t end = (row + 1) * g.S < n_end ? (row + 1) * g.S : n_end;
    if (begin >= end) continue;
    for (int q = 0; q < quantities; ++q) {
      slots[item * quantities + q] = sum_in_fixed_order(neuron_values + q * g.neurons + begin, end - begin);
    }
  }
}

// Per channel: its rows' slots, row by row and each row's blocks in order, which is the order of
// RowSums::per_channel (blocks in order, rows in order within a block): a row's blocks all come
// before the next row of the channel, C rows later, starts.
__global__ void bn_channel_sums_kernel(const double* slots, int quantities, Geometry g, double* channel_sums) {
  const index_t per_block = rows_per_block(g.S);
  const index_t rows = g.neurons / g.S;
  for (index_t c = first_item(); c < g.C; c += item_stride()) {
    for (int q = 0; q < quantities; ++q) channel_sums[q * g.C + c] = 0.0;
    for (index_t row = c; row < rows; row += g.C) {
      for (index_t block = row * g.S / kBlock; block <= ((row + 1) * g.S - 1) / kBlock; ++block) {
        const double* slot = slots + (block * per_block + row - block * kBlock / g.S) * quantities;
        for (int q = 0; q < quantities; ++q) channel_sums[q * g.C + c] += slot[q];
      }
    }
  }
}

// Per channel: the channel terms from the batch's sums, or from the running statistics.
__global__ void bn_channel_terms_kernel(const double* channel_sums, const double* running_mean,
                                        const double* running_var, const double* gamma, const double* beta, double eps,
                                        Geometry g, double* terms) {
  const double count = g.per_channel(g.distinct_steps());
  for (index_t c = first_item(); c < g.C; c += item_stride()) {
    double mean, variance;
    if (running_mean != nullptr) {
      mean = running_mean[c];
      variance = running_var[c];
    } else {
      batch_moments(channel_sums[c], channel_sums[g.C + c], count, mean, variance);
    }
    fill_channel_terms(mean, variance, gamma != nullptr ? gamma[c] : 1.0, beta != nullptr ? beta[c] : 0.0, eps, count,
                       running_mean == nullptr, terms + c, g.C);
  }
}

// The per-channel values a neuron reads, in the compute type (`terms` is [5, C] rounded to it).
template <typename acc_t>
struct NeuronTerms {
  acc_t scale, shift, mean, invstd, k;
  PLIF_HD NeuronTerms(const acc_t* terms, const acc_t* k_values, bool k_per_layer, const Geometry& g, index_t n) {
    const index_t c = (n / g.S) % g.C;
    scale = terms[kScale * g.C + c];
    shift = terms[kShift * g.C + c];
    mean = terms[kMean * g.C + c];
    invstd = terms[kInvstd * g.C + c];
    k = k_values[k_per_layer ? 0 : c];
  }
};

template <int SURROGATE, typename in_t, typename acc_t>
__global__ void bn_forward_kernel(const in_t* y, Geometry g, const acc_t* terms, const acc_t* k, bool k_per_layer,
                                  const acc_t* v_init, index_t v_init_stride, Options<acc_t> o, in_t* spikes,
                                  acc_t* v_last) {
  for (index_t n = first_item(); n < g.neurons; n += item_stride()) {
    const NeuronTerms<acc_t> nt(terms, k, k_per_layer, g, n);
    acc_t v = v_init[n * v_init_stride];
    for (index_t t = 0; t < g.T; ++t) {
      acc_t h;
      const acc_t z = normalise(load_as<acc_t>(y[t * g.y_step + n]), nt.scale, nt.shift);
      spikes[t * g.neurons + n] = store_as<in_t>(forward_neuron<SURROGATE>(v, z, nt.k, o, h));
    }
    v_last[n] = v;
  }
}

// The backward of backward_block, one neuron per thread. PASS (plif_bn.h's PassBits): kReduce
// writes the neuron's sums of dL/dz and dL/dz * xhat and its dL/dk to neuron_values ([3, neurons])
// and dL/dv_init; kWriteGradY writes dL/dy from the channel means of those sums.
template <int SURROGATE, int PASS, typename in_t, typename acc_t>
__global__ void bn_backward_kernel(const in_t* y, Geometry g, const acc_t* terms, const acc_t* k, bool k_per_layer,
                                   const acc_t* v_init, index_t v_init_stride, Options<acc_t> o,
                                   const in_t* grad_spikes, const acc_t* grad_v_last, bool batch_statistics,
                                   const acc_t* mean_grad, const acc_t* mean_grad_xhat, acc_t* neuron_values,
                                   acc_t* grad_v_init, in_t* grad_y) {
  const bool through_spike = grad_spikes != nullptr;
  for (index_t n = first_item(); n < g.neurons; n += item_stride()) {
    const NeuronTerms<acc_t> nt(terms, k, k_per_layer, g, n);
    const index_t c = (n / g.S) % g.C;
    const acc_t channel_mean_grad = (PASS & kWriteGradY) != 0 && batch_statistics ? mean_grad[c] : acc_t(0);
    const acc_t channel_mean_grad_xhat = (PASS & kWriteGradY) != 0 && batch_statistics ? mean_grad_xhat[c] : acc_t(0);
    const acc_t v0 = v_init[n * v_init_stride];
    acc_t grad_h_next = 0, grad_k_sum = 0, sum_grad = 0, sum_grad_xhat = 0;
    for (index_t chunk_end = g.T; chunk_end > 0; chunk_end -= kBackwardChunk) {
      const index_t chunk_begin = chunk_end > kBackwardChunk ? chunk_end - kBackwardChunk : 0;
      const int steps = static_cast<int>(chunk_end - chunk_begin);
      // v_before: V[chunk_begin - 1]; h[i]: H[chunk_begin + i].
      acc_t v = v0;
      for (index_t t = 0; t < chunk_begin; ++t) {
        acc_t ht;
        forward_neuron<SURROGATE>(v, normalise(load_as<acc_t>(y[t * g.y_step + n]), nt.scale, nt.shift), nt.k, o, ht);
      }
      const acc_t v_before = v;
      acc_t h[kBackwardChunk];
#pragma unroll
      for (int i = 0; i < kBackwardChunk; ++i) {
        if (i < steps) {
          const acc_t y_value = load_as<acc_t>(y[(chunk_begin + i) * g.y_step + n]);
          forward_neuron<SURROGATE>(v, normalise(y_value, nt.scale, nt.shift), nt.k, o, h[i]);
        }
      }
#pragma unroll
      for (int i = kBackwardChunk - 1; i >= 0; --i) {
        if (i >= steps) continue;
        const index_t t = chunk_begin + i;
        const acc_t ht = h[i];
        const acc_t v_prev = i > 0 ? reset(h[i - 1], fire<SURROGATE>(h[i - 1], o), o) : v_before;
        const acc_t grad_v = t == g.T - 1 && grad_v_last != nullptr ? grad_v_last[n] : acc_t(0);
        const acc_t grad_s = through_spike ? load_as<acc_t>(grad_spikes[t * g.neurons + n]) : acc_t(0);
        const bool through_membrane = grad_v_last != nullptr || (t < g.T - 1 && through_spike);
        const acc_t y_value = load_as<acc_t>(y[t * g.y_step + n]);
        const acc_t grad_z =
            neuron_backward(ht, acc_t(1) - fire<SURROGATE>(ht, o), surrogate_grad<SURROGATE>(ht - o.v_threshold, o),
                            v_prev, normalise(y_value, nt.scale, nt.shift), nt.k, grad_v, grad_s, through_spike,
                            through_membrane, o, grad_h_next, grad_k_sum);
        const acc_t xhat = (y_value - nt.mean) * nt.invstd;
        if ((PASS & kReduce) != 0) {
          sum_grad += grad_z;
          sum_grad_xhat = fma_(grad_z, xhat, sum_grad_xhat);
        }
        if ((PASS & kWriteGradY) != 0) {
          grad_y[t * g.neurons + n] =
              store_as<in_t>(grad_y_of(grad_z, xhat, nt.scale, channel_mean_grad, channel_mean_grad_xhat));
        }
      }
    }
    if ((PASS & kReduce) != 0) {
      const bool any_grad = grad_spikes != nullptr || grad_v_last != nullptr;
      neuron_values[n] = sum_grad;
      neuron_values[g.neurons + n] = sum_grad_xhat;
      neuron_values[2 * g.neurons + n] = any_grad ? grad_k_sum : acc_t(0);
      if (grad_v_init != nullptr) grad_v_init[n] = (acc_t(1) - nt.k) * grad_h_next;
    }
  }
}

}  // namespace bn
}  // namespace plif

namespace plif {
namespace bn {

// Per channel: the channel terms rounded to the compute type ([5, C]).
template <typename acc_t>
__global__ void bn_round_terms_kernel(const double* terms, index_t count, acc_t* rounded) {
  for (index_t i = first_item(); i < count; i += item_stride()) rounded[i] = static_cast<acc_t>(terms[i]);
}

// Per channel: the means of dL/dz and dL/dz * xhat over the channel's `count` values (backward_all's).
template <typename acc_t>
__global__ void bn_mean_grads_kernel(const double* channel_sums, double count, index_t C, acc_t* mean_grads) {
  for (index_t c = first_item(); c < C; c += item_stride()) {
    mean_grads[c] = static_cast<acc_t>(channel_sums[c] / count);
    mean_grads[C + c] = static_cast<acc_t>(channel_sums[C + c] / count);
  }
}

// One thread: the per-channel dL/dk summed in channel order, for a per-layer k (as the CPU op sums them).
__global__ void bn_layer_sum_kernel(const double* per_channel, index_t C, double* total) {
  if (first_item() == 0) *total = sum_in_fixed_order(per_channel, C);
}

// The launches of a forward, in order, through `launch(items, kernel, arguments...)`, which runs
// `kernel` over at least `items` threads' worth of grid-stride loops: the nvcc launcher's
// <<<...>>> on the current stream, or the emulation's loop over the threads.
template <int SURROGATE, typename in_t, typename acc_t, typename Launch>
void forward_launches(const ForwardLaunch<in_t, acc_t>& p, Launch launch) {
  const Geometry& g = p.g;
  if (p.running_mean == nullptr) {
    launch(g.neurons, bn_statistics_kernel<in_t, acc_t>, p.y, g, p.neuron_values);
    launch(g.blocks() * rows_per_block(g.S), bn_row_sums_kernel<double>, static_cast<const double*>(p.neuron_values), 2,
           g, p.slots);
    launch(g.C, bn_channel_sums_kernel, static_cast<const double*>(p.slots), 2, g, p.channel_sums);
  }
  launch(g.C, bn_channel_terms_kernel, static_cast<const double*>(p.channel_sums), p.running_mean, p.running_var,
         p.gamma, p.beta, p.eps, g, p.terms);
  launch(kChannelTerms * g.C, bn_round_terms_kernel<acc_t>, static_cast<const double*>(p.terms),
         index_t(kChannelTerms) * g.C, p.terms_acc);
  launch(g.neurons, bn_forward_kernel<SURROGATE, in_t, acc_t>, p.y, g, static_cast<const acc_t*>(p.terms_acc), p.k,
         p.k_per_layer, p.v_init, p.v_init_stride, p.opts, p.spikes, p.v_last);
}

template <int SURROGATE, typename in_t, typename acc_t, typename Launch>
void backward_launches(const BackwardLaunch<in_t, acc_t>& p, Launch launch) {
  const Geometry& g = p.g;
  const acc_t* const no_means = nullptr;
  launch(g.neurons, bn_backward_kernel<SURROGATE, kReduce, in_t, acc_t>, p.y, g, p.terms_acc, p.k, p.k_per_layer,
         p.v_init, p.v_init_stride, p.opts, p.grad_spikes, p.grad_v_last, p.batch_statistics, no_means, no_means,
         p.neuron_values, p.grad_v_init, static_cast<in_t*>(nullptr));
  launch(g.blocks() * rows_per_block(g.S), bn_row_sums_kernel<acc_t>, static_cast<const acc_t*>(p.neuron_values), 3, g,
         p.slots);
  launch(g.C, bn_channel_sums_kernel, static_cast<const double*>(p.slots), 3, g, p.channel_sums);
  if (p.k_per_layer) {
    launch(1, bn_layer_sum_kernel, static_cast<const double*>(p.channel_sums + 2 * g.C), g.C, p.layer_grad_k);
  }
  if (p.grad_y == nullptr) return;
  launch(g.C, bn_mean_grads_kernel<acc_t>, static_cast<const double*>(p.channel_sums), g.per_channel(g.T), g.C,
         p.mean_grads);
  launch(g.neurons, bn_backward_kernel<SURROGATE, kWriteGradY, in_t, acc_t>, p.y, g, p.terms_acc, p.k, p.k_per_layer,
         p.v_init, p.v_init_stride, p.opts, p.grad_spikes, p.grad_v_last, p.batch_statistics,
         static_cast<const acc_t*>(p.mean_grads), static_cast<const acc_t*>(p.mean_grads + g.C),
         static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr), p.grad_y);
}

}  // namespace bn
}  // namespace plif
