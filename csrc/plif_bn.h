// Fused BatchNorm + PLIF on the CPU: the per-channel statistics, the normalise-and-fire forward and
// the two-pass backward, each a walk of blocks of neurons through all T steps with the neuron
// math of plif_math.h. Included by plif_bn_cpu*.cpp only. Built with -ffp-contract=off (setup.py),
// so the normalisation rounds twice, as the arithmetic order of docs/batchnorm.md says.
//
// Layout: y is [T, N, C, *spatial]; a step's neurons are its N * C * S values (S the product of
// the spatial sizes, 1 for [T, N, C]) in memory order, neuron i of channel (i / S) % C. Every
// step is contiguous; steps are y_step elements apart (0: one step broadcast over time, which is
// normalised with the statistics of that one step). Outputs are contiguous [T, N, C, *spatial].
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "plif_bn_math.h"
#include "plif_cpu_buffers.h"
#include "plif_cpu_kernels.h"  // the PLIF kernel's stream_row, prefetch_row, exceeds_cache, PLIF_ISA_CLONES
#include "plif_math.h"

namespace plif {
namespace bn {

// Neuron-steps per thread below which a second thread costs more than it saves.
constexpr index_t kMinNeuronStepsPerThread = index_t(1) << 17;

// Per-channel sums of per-neuron values, deterministic for any number of threads: each block
// sums its neurons row by row (a row: one sample's S neurons of one channel) into its own slots,
// and per_channel adds the slots block by block, row by row. Block boundaries depend on the
// shape only.
class RowSums {
 public:
  RowSums(const Geometry& g, int quantities)
      : g_(g),
        quantities_(quantities),
        rows_per_block_(rows_per_block(g.S)),
        slots_(static_cast<size_t>(g.blocks() * rows_per_block_ * quantities), 0.0) {}

  // values[q][j]: quantity q of neuron n0 + j, for the `count` neurons of block `block`.
  template <typename value_t>
  void add_block(index_t block, index_t n0, index_t count, const value_t* const* values) {
    double* slot = slots_.data() + block * rows_per_block_ * quantities_;
    for (index_t start = 0; start < count; slot += quantities_) {
      const index_t row_end = std::min(count, ((n0 + start) / g_.S + 1) * g_.S - n0);
      for (int q = 0; q < quantities_; ++q) slot[q] = sum_in_fixed_order(values[q] + start, row_end - start);
      start = row_end;
    }
  }

  // out[q * C + c]: quantity q summed over channel c's neurons.
  void per_channel(double* out) const {
    std::fill(out, out + quantities_ * g_.C, 0.0);
    for (index_t block = 0; block < g_.blocks(); ++block) {
      const index_t n0 = block * kBlock;
      const index_t first_row = n0 / g_.S;
      const index_t last_row = (std::min(n0 + kBlock, g_.neurons) - 1) / g_.S;
      const double* slot = slots_.data() + block * rows_per_block_ * quantities_;
      for (index_t row = first_row; row <= last_row; ++row, slot += quantities_) {
        for (int q = 0; q < quantities_; ++q) out[q * g_.C + row % g_.C] += slot[q];
      }
    }
  }

 private:
  Geometry g_;
  int quantities_;
  index_t rows_per_block_;
  std::vector<double> slots_;
};

// Calls fn(block, n0, count, scratch) for every block, blocks split among the threads; scratch
// is a per-thread buffer of scratch_values values.
template <typename scratch_t, typename Fn>
void for_each_block(const Geometry& g, index_t scratch_values, Fn fn) {
  const index_t blocks = g.blocks();
  const index_t grain = std::max<index_t>(1, kMinNeuronStepsPerThread / std::max<index_t>(1, g.T * kBlock));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<scratch_t> scratch(static_cast<size_t>(scratch_values));
    for (int64_t block = begin; block < end; ++block) {
      const index_t n0 = block * kBlock;
      fn(block, n0, std::min(kBlock, g.neurons - n0), scratch.data());
    }
  });
}

// ---- statistics ------------------------------------------------------------------------------
template <typename in_t>
PLIF_ISA_CLONES void statistics_block(const in_t* y, const Geometry& g, index_t block, index_t n0, index_t count,
                                      RowSums& sums) {
  double sum[kBlock] = {}, sum_of_squares[kBlock] = {};
  const bool stream = exceeds_cache<in_t>(g.distinct_steps(), g.neurons, 1);
  for (index_t t = 0; t < g.distinct_steps(); ++t) {
    const in_t* const row = y + t * g.y_step + n0;
    if (t + 1 < g.distinct_steps()) prefetch_row<kBlock>(row + g.y_step, stream);
    for (index_t j = 0; j < count; ++j) {
      const double value = load_as<double>(row[j]);
      sum[j] += value;
      sum_of_squares[j] += value * value;
    }
  }
  const double* const values[2] = {sum, sum_of_squares};
  sums.add_block(block, n0, count, values);
}

// Per channel: the mean and biased variance of y over the distinct steps, float64.
template <typename in_t>
void channel_statistics(const in_t* y, const Geometry& g, double* mean, double* variance) {
  RowSums sums(g, 2);
  for_each_block<char>(
      g, 0, [&](index_t block, index_t n0, index_t count, char*) { statistics_block(y, g, block, n0, count, sums); });
  std::vector<double> totals(static_cast<size_t>(2 * g.C));
  sums.per_channel(totals.data());
  const double count = g.per_channel(g.distinct_steps());
  for (index_t c = 0; c < g.C; ++c) batch_moments(totals[c], totals[g.C + c], count, mean[c], variance[c]);
}

// A block's per-neuron copies of its channels' terms.
template <typename acc_t>
struct BlockTerms {
  acc_t scale[kBlock];
  acc_t shift[kBlock];
  acc_t k[kBlock];
};

// Fills terms[j] for neurons n0 .. n0 + count - 1 from per-channel (or one-value) sources.
template <typename acc_t>
void fill_per_neuron(const Geometry& g, index_t n0, index_t count, const acc_t* per_channel, bool one_value,
                     acc_t* out) {
  if (one_value) {
    std::fill(out, out + count, per_channel[0]);
    return;
  }
  // Run by run: a block spans one channel of a conv layer's output, or a few.
  index_t row = n0 / g.S;
  for (index_t j = 0; j < count; ++row) {
    const index_t run_end = std::min(count, (row + 1) * g.S - n0);
    std::fill(out + j, out + run_end, per_channel[row % g.C]);
    j = run_end;
  }
}

// Everything a pass reads about the channels and the neuron, in the compute type.
template <typename in_t, typename acc_t>
struct Args : NeuronInputs<in_t, acc_t> {
  const acc_t* scale;   // [C]
  const acc_t* shift;   // [C]
  const acc_t* mean;    // [C], backward only
  const acc_t* invstd;  // [C], backward only
};

template <typename in_t, typename acc_t>
void fill_block_terms(const Args<in_t, acc_t>& a, index_t n0, index_t count, BlockTerms<acc_t>& terms) {
  fill_per_neuron(a.g, n0, count, a.scale, false, terms.scale);
  fill_per_neuron(a.g, n0, count, a.shift, false, terms.shift);
  fill_per_neuron(a.g, n0, count, a.k, a.k_per_layer, terms.k);
}

// ---- forward: normalise and fire -----------------------------------------------------------------
// Passes larger than the last-level cache (`stream`) prefetch each step's next rows as
// non-temporal lines and write their [T, ...] outputs through an L1 staging row with
// non-temporal stores, as the PLIF kernel does (plif_cpu_kernels.h says why).
template <int SURROGATE, typename in_t, typename acc_t>
PLIF_ISA_CLONES void forward_block(const Args<in_t, acc_t>& a, in_t* spikes, acc_t* v_last, index_t n0, index_t count,
                                   bool stream) {
  const Options<acc_t> o = a.opts;
  BlockTerms<acc_t> terms;
  fill_block_terms(a, n0, count, terms);
  acc_t v[kBlock];
  in_t staging[kBlock];
  for (index_t j = 0; j < count; ++j) v[j] = a.v_init[(n0 + j) * a.v_init_stride];
  for (index_t t = 0; t < a.g.T; ++t) {
    const in_t* __restrict__ const y_row = a.y + t * a.g.y_step + n0;
    if (t + 1 < a.g.T) prefetch_row<kBlock>(y_row + a.g.y_step, stream);
    in_t* const out_row = spikes + t * a.g.neurons + n0;
    in_t* __restrict__ const spike_row = stream ? staging : out_row;
    for (index_t j = 0; j < count; ++j) {
      const acc_t z = normalise(load_as<acc_t>(y_row[j]), terms.scale[j], terms.shift[j]);
      acc_t h;
      spike_row[j] = store_as<in_t>(forward_neuron<SURROGATE>(v[j], z, terms.k[j], o, h));
    }
    if (stream) stream_row(out_row, staging, count * sizeof(in_t));
  }
  for (index_t j = 0; j < count; ++j) v_last[n0 + j] = v[j];
  if (stream) fence_streamed_rows();
}

template <int SURROGATE, typename in_t, typename acc_t>
void forward_all(const Args<in_t, acc_t>& a, in_t* spikes, acc_t* v_last) {
  const bool stream = exceeds_cache<in_t>(a.g.T, a.g.neurons, 2);
  for_each_block<char>(a.g, 0, [&](index_t, index_t n0, index_t count, char*) {
    forward_block<SURROGATE>(a, spikes, v_last, n0, count, stream);
  });
}

// ---- backward --------------------------------------------------------------------------------------
// The gradients arriving at the block's outputs, and what the backward writes.
template <typename in_t, typename acc_t>
struct Gradients {
  const in_t* grad_spikes;      // [T, neurons] or null
  const acc_t* grad_v_last;     // [neurons] or null
  in_t* grad_y;                 // [T, neurons]: written by a kWriteGradY pass or by finish_grad_y_block
  acc_t* grad_z;                // [T, neurons]: dL/dz between a kStoreGradZ pass and finish_grad_y_block
  acc_t* grad_v_init;           // [neurons] or null (written by the kReduce pass)
  bool batch_statistics;        // the normalisation used the batch's statistics (training)
  const acc_t* mean_grad;       // [C]: sum of dL/dz over the channel / its count (for dL/dy)
  const acc_t* mean_grad_xhat;  // [C]: sum of dL/dz * xhat / its count (for dL/dy)
};

// Where dL/dy's type is the compute type, dL/dz waits in dL/dy's own buffer for finish_grad_y_block;
// the half types keep it in a float32 scratch, since their buffer would round it.
template <typename in_t, typename acc_t>
constexpr bool kGradZInGradY = std::is_same<in_t, acc_t>::value;

// dL/dz's rows in y's values (the unit exceeds_cache counts streams in).
template <typename in_t, typename acc_t>
constexpr int64_t kGradZStreams = sizeof(acc_t) / sizeof(in_t);

// The [T, neurons] rows a backward pass writes: dL/dy (kWriteGradY), dL/dz in the compute type
// (kStoreGradZ), or none.
template <int PASS, typename in_t, typename acc_t>
auto written_rows(const Gradients<in_t, acc_t>& gr) {
  if constexpr ((PASS & kStoreGradZ) != 0) {
    return gr.grad_z;
  } else {
    return (PASS & kWriteGradY) != 0 ? gr.grad_y : static_cast<in_t*>(nullptr);
  }
}

// One block: recompute H[0..T-1] and dH/dk from y (the forward's expressions, so its bits; dH/dk
// as dh_dk_of from the normalised input, what neuron_backward computes from V[t-1]), then walk back
// in time. `h` holds 2 * T * kBlock values: H's rows, then dH/dk's.
template <int SURROGATE, int PASS, typename in_t, typename acc_t>
PLIF_ISA_CLONES_WITH_AVX512 void backward_block(const Args<in_t, acc_t>& a, const Gradients<in_t, acc_t>& gr,
                                                index_t block, index_t n0, index_t count, acc_t* h, RowSums* sums,
                                                bool stream) {
  const Options<acc_t> o = a.opts;
  const Geometry& g = a.g;
  BlockTerms<acc_t> terms;
  fill_block_terms(a, n0, count, terms);
  acc_t mean[kBlock], invstd[kBlock];
  fill_per_neuron(g, n0, count, a.mean, false, mean);
  fill_per_neuron(g, n0, count, a.invstd, false, invstd);

  acc_t* const dh_dk = h + g.T * kBlock;
  // Recompute.
  {
    acc_t v[kBlock];
    for (index_t j = 0; j < count; ++j) v[j] = a.v_init[(n0 + j) * a.v_init_stride];
    for (index_t t = 0; t < g.T; ++t) {
      const in_t* __restrict__ const y_row = a.y + t * g.y_step + n0;
      if (t + 1 < g.T) prefetch_row<kBlock>(y_row + g.y_step, stream);
      acc_t* __restrict__ const h_row = h + t * kBlock;
      acc_t* __restrict__ const dh_dk_row = dh_dk + t * kBlock;
      for (index_t j = 0; j < count; ++j) {
        const acc_t x = normalise(load_as<acc_t>(y_row[j]), terms.scale[j], terms.shift[j]);
        dh_dk_row[j] = dh_dk_of<true>(v[j], x, o);
        forward_neuron<SURROGATE>(v[j], x, terms.k[j], o, h_row[j]);
      }
    }
  }

  acc_t mean_grad[kBlock], mean_grad_xhat[kBlock];
  if constexpr ((PASS & kWriteGradY) != 0) {
    if (gr.batch_statistics) {
      fill_per_neuron(g, n0, count, gr.mean_grad, false, mean_grad);
      fill_per_neuron(g, n0, count, gr.mean_grad_xhat, false, mean_grad_xhat);
    } else {
      std::fill(mean_grad, mean_grad + count, acc_t(0));
      std::fill(mean_grad_xhat, mean_grad_xhat + count, acc_t(0));
    }
  }
  acc_t grad_h_next[kBlock] = {}, grad_k_sum[kBlock] = {}, sum_grad[kBlock] = {}, sum_grad_xhat[kBlock] = {};
  acc_t grad_v[kBlock] = {}, grad_s[kBlock] = {};
  auto* const rows = written_rows<PASS>(gr);
  using row_t = std::remove_pointer_t<decltype(rows)>;
  row_t staging[kBlock];
  const bool through_spike = gr.grad_spikes != nullptr;
  if (through_spike) prefetch_row<kBlock>(gr.grad_spikes + (g.T - 1) * g.neurons + n0, stream);
  for (index_t t = g.T - 1; t >= 0; --t) {
    const acc_t* __restrict__ const h_row = h + t * kBlock;
    const acc_t* __restrict__ const dh_dk_row = dh_dk + t * kBlock;
    const bool grad_v_arrives = t == g.T - 1 && gr.grad_v_last != nullptr;
    if (grad_v_arrives) {
      for (index_t j = 0; j < count; ++j) grad_v[j] = gr.grad_v_last[n0 + j];
    }
    if (through_spike) {
      const in_t* const row = gr.grad_spikes + t * g.neurons + n0;
      if (t > 0) prefetch_row<kBlock>(row - g.neurons, stream);
      for (index_t j = 0; j < count; ++j) grad_s[j] = load_as<acc_t>(row[j]);
    }
    const bool through_membrane = gr.grad_v_last != nullptr || (t < g.T - 1 && through_spike);
    const in_t* __restrict__ const y_row = a.y + t * g.y_step + n0;
    row_t* const out_row = (PASS & kWritesRows) != 0 ? rows + t * g.neurons + n0 : nullptr;
    row_t* __restrict__ const written_row = stream ? staging : out_row;
    for (index_t j = 0; j < count; ++j) {
      const acc_t y = load_as<acc_t>(y_row[j]);
      const acc_t ht = h_row[j];
      const acc_t grad_z = backward_neuron_given_surrogate(
          ht, acc_t(1) - fire<SURROGATE>(ht, o), surrogate_grad<SURROGATE>(ht - o.v_threshold, o), dh_dk_row[j],
          terms.k[j], grad_v[j], grad_s[j], through_spike, through_membrane, o, grad_h_next[j], grad_k_sum[j]);
      const acc_t xhat = (y - mean[j]) * invstd[j];
      if constexpr ((PASS & kReduce) != 0) {
        sum_grad[j] += grad_z;
        sum_grad_xhat[j] = fma_(grad_z, xhat, sum_grad_xhat[j]);
      }
      if constexpr ((PASS & kWriteGradY) != 0) {
        written_row[j] = store_as<in_t>(grad_y_of(grad_z, xhat, terms.scale[j], mean_grad[j], mean_grad_xhat[j]));
      }
      if constexpr ((PASS & kStoreGradZ) != 0) written_row[j] = grad_z;
    }
    if (grad_v_arrives) {
      for (index_t j = 0; j < count; ++j) grad_v[j] = acc_t(0);
    }
    if constexpr ((PASS & kWritesRows) != 0) {
      if (stream) stream_row(out_row, staging, count * sizeof(row_t));
    }
  }
  if constexpr ((PASS & kWritesRows) != 0) {
    if (stream) fence_streamed_rows();
  }
  if constexpr ((PASS & kReduce) != 0) {
    const bool any_grad = gr.grad_spikes != nullptr || gr.grad_v_last != nullptr;
    acc_t grad_k[kBlock];
    for (index_t j = 0; j < count; ++j) {
      grad_k[j] = any_grad ? grad_k_sum[j] : acc_t(0);
    }
    if (gr.grad_v_init != nullptr) {
      for (index_t j = 0; j < count; ++j) gr.grad_v_init[n0 + j] = (acc_t(1) - terms.k[j]) * grad_h_next[j];
    }
    const acc_t* const values[3] = {sum_grad, sum_grad_xhat, grad_k};
    sums->add_block(block, n0, count, values);
  }
}

template <int SURROGATE, int PASS, typename in_t, typename acc_t>
void backward_pass(const Args<in_t, acc_t>& a, const Gradients<in_t, acc_t>& gr, RowSums* sums) {
  // Streams in y's values: y, dL/dS and the written rows (dL/dz's are compute-type values).
  const int64_t written = (PASS & kWriteGradY) != 0 ? 1 : (PASS & kStoreGradZ) != 0 ? kGradZStreams<in_t, acc_t> : 0;
  const bool stream = exceeds_cache<in_t>(a.g.T, a.g.neurons, 2 + written);
  for_each_block<acc_t>(a.g, 2 * a.g.T * kBlock, [&](index_t block, index_t n0, index_t count, acc_t* h) {
    backward_block<SURROGATE, PASS>(a, gr, block, n0, count, h, sums, stream);
  });
}

// dL/dy from the dL/dz a kStoreGradZ pass left, no neuron arithmetic: in place where dL/dz is in
// dL/dy's own buffer (its type is the compute type), else from the half types' float32 rows.
template <typename in_t, typename acc_t>
PLIF_ISA_CLONES void finish_grad_y_block(const Args<in_t, acc_t>& a, const Gradients<in_t, acc_t>& gr, index_t n0,
                                         index_t count, bool stream) {
  constexpr bool kInPlace = kGradZInGradY<in_t, acc_t>;
  const Geometry& g = a.g;
  acc_t scale[kBlock], mean[kBlock], invstd[kBlock], mean_grad[kBlock], mean_grad_xhat[kBlock];
  fill_per_neuron(g, n0, count, a.scale, false, scale);
  fill_per_neuron(g, n0, count, a.mean, false, mean);
  fill_per_neuron(g, n0, count, a.invstd, false, invstd);
  fill_per_neuron(g, n0, count, gr.mean_grad, false, mean_grad);
  fill_per_neuron(g, n0, count, gr.mean_grad_xhat, false, mean_grad_xhat);
  in_t staging[kInPlace ? 1 : kBlock];
  for (index_t t = 0; t < g.T; ++t) {
    const in_t* __restrict__ const y_row = a.y + t * g.y_step + n0;
    const acc_t* const grad_z_row = gr.grad_z + t * g.neurons + n0;
    in_t* const out_row = gr.grad_y + t * g.neurons + n0;
    if (t + 1 < g.T) {
      prefetch_row<kBlock>(y_row + g.y_step, stream);
      prefetch_row<kBlock>(grad_z_row + g.neurons, stream);
    }
    if constexpr (kInPlace) {
      in_t* __restrict__ const grad_row = out_row;
      for (index_t j = 0; j < count; ++j) {
        const acc_t xhat = (load_as<acc_t>(y_row[j]) - mean[j]) * invstd[j];
        grad_row[j] = grad_y_of(grad_row[j], xhat, scale[j], mean_grad[j], mean_grad_xhat[j]);
      }
    } else {
      const acc_t* __restrict__ const grad_z = grad_z_row;
      in_t* __restrict__ const grad_row = stream ? staging : out_row;
      for (index_t j = 0; j < count; ++j) {
        const acc_t xhat = (load_as<acc_t>(y_row[j]) - mean[j]) * invstd[j];
        grad_row[j] = store_as<in_t>(grad_y_of(grad_z[j], xhat, scale[j], mean_grad[j], mean_grad_xhat[j]));
      }
      if (stream) stream_row(out_row, staging, count * sizeof(in_t));
    }
  }
  if (!kInPlace && stream) fence_streamed_rows();
}

// Per channel: sum dL/dz, sum dL/dz * xhat and sum dL/dk (quantity-major, [3 * C]) after the
// kReduce pass, and dL/dy written where write_grad_y. With batch statistics dL/dy needs the
// channel means of dL/dz first: the reducing pass leaves dL/dz in dL/dy's buffer where its type is
// the compute type, else in a float32 scratch (4 B per neuron-step while the backward runs), and
// finish_grad_y_block makes it dL/dy. So the neuron's backward (recompute, surrogate, recursion),
// which bounds these passes on a CPU, runs once.
template <int SURROGATE, typename in_t, typename acc_t>
void backward_all(const Args<in_t, acc_t>& a, Gradients<in_t, acc_t> gr, bool write_grad_y, double* channel_sums) {
  const bool finish_grad_y = write_grad_y && gr.batch_statistics;
  RowSums sums(a.g, 3);
  at::Tensor scratch;
  if (!write_grad_y) {
    backward_pass<SURROGATE, kReduce>(a, gr, &sums);
  } else if (!finish_grad_y) {
    backward_pass<SURROGATE, kReduce | kWriteGradY>(a, gr, &sums);
  } else {
    if constexpr (kGradZInGradY<in_t, acc_t>) {
      gr.grad_z = gr.grad_y;
    } else {
      scratch =
          empty_cpu_output({a.g.T * a.g.neurons}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
      gr.grad_z = scratch.data_ptr<acc_t>();
    }
    backward_pass<SURROGATE, kReduce | kStoreGradZ>(a, gr, &sums);
  }
  sums.per_channel(channel_sums);
  if (!finish_grad_y) return;
  // The batch statistics' share of dL/dy: the means of dL/dz and dL/dz * xhat over each channel's
  // values of all T steps (a broadcast step's gradient is the sum of its T steps').
  const double count = a.g.per_channel(a.g.T);
  std::vector<acc_t> mean_grad(static_cast<size_t>(a.g.C)), mean_grad_xhat(static_cast<size_t>(a.g.C));
  for (index_t c = 0; c < a.g.C; ++c) {
    mean_grad[c] = static_cast<acc_t>(channel_sums[c] / count);
    mean_grad_xhat[c] = static_cast<acc_t>(channel_sums[a.g.C + c] / count);
  }
  gr.mean_grad = mean_grad.data();
  gr.mean_grad_xhat = mean_grad_xhat.data();
  // Streams in y's values: y and dL/dy, and the half types' dL/dz rows.
  const bool stream =
      exceeds_cache<in_t>(a.g.T, a.g.neurons, 2 + (kGradZInGradY<in_t, acc_t> ? 0 : kGradZStreams<in_t, acc_t>));
  for_each_block<char>(
      a.g, 0, [&](index_t, index_t n0, index_t count, char*) { finish_grad_y_block(a, gr, n0, count, stream); });
}

}  // namespace bn
}  // namespace plif

namespace plif {
namespace bn {

// The entry points, one instantiation per (input, compute) type pair: the forward and statistics
// in plif_bn_cpu.cpp, the backward (one copy per specialised surrogate) in plif_bn_cpu_backward.cpp.
template <typename in_t, typename acc_t>
void forward_cpu(const Args<in_t, acc_t>& a, in_t* spikes, acc_t* v_last);
template <typename in_t, typename acc_t>
void backward_cpu(const Args<in_t, acc_t>& a, const Gradients<in_t, acc_t>& gr, bool write_grad_y,
                  double* channel_sums);

}  // namespace bn
}  // namespace plif
