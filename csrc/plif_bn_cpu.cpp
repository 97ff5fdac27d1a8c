// The fused BatchNorm + PLIF ops (plif_cuda/batchnorm.py calls them): schemas, argument checks,
// the per-channel terms, and the CPU forward (plif_bn.h). The Python layer arranges the layout:
// y is [T, N, C, *spatial] with every step contiguous (steps any distance apart, 0 included);
// k holds one value or one per channel, v_init one value or one per neuron of a step, both
// contiguous in the compute dtype (float64 for float64 y, float32 otherwise).
//
// channel_terms, the forward's third output and the backward's input, is [5, C] float64: the
// mean and 1/sqrt(var + eps) that normalised y, scale = gamma * invstd, shift = beta - mean * scale
// (rounded to the compute dtype where used) and the unbiased batch variance (for the running
// statistics; the running variance itself where the running statistics normalised).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "plif_bn.h"
#include "plif_bn_cuda.h"
#include "plif_cpu_buffers.h"
#include "plif_dtypes.h"
#include "plif_op_options.h"

namespace plif {
namespace bn {

template <typename in_t, typename acc_t>
void forward_cpu(const Args<in_t, acc_t>& a, in_t* spikes, acc_t* v_last) {
  if (a.opts.spiking) return forward_all<kSpikingForward>(a, spikes, v_last);
  forward_all<kRuntime>(a, spikes, v_last);
}

#define PLIF_BN_INSTANTIATE_FORWARD(in_t, acc_t) \
  template void forward_cpu<in_t, acc_t>(const Args<in_t, acc_t>&, in_t*, acc_t*);
PLIF_FOR_EACH_TYPE_PAIR(PLIF_BN_INSTANTIATE_FORWARD)

namespace {

using at::Tensor;

Geometry geometry_of(const Tensor& y) {
  TORCH_CHECK(y.dim() >= 3, "y must be [T, N, C, ...], got ", y.dim(), " dimensions");
  int64_t expected = 1;
  for (int64_t d = y.dim() - 1; d >= 1; --d) {
    if (y.size(d) == 1) continue;
    TORCH_CHECK(y.stride(d) == expected, "every step of y must be contiguous, got sizes ", y.sizes(), " and strides ",
                y.strides());
    expected *= y.size(d);
  }
  Geometry g;
  g.T = y.size(0);
  g.C = y.size(2);
  g.S = c10::multiply_integers(y.sizes().slice(3));
  g.neurons = c10::multiply_integers(y.sizes().slice(1));
  g.y_step = g.T > 1 ? y.stride(0) : g.neurons;
  return g;
}

void check_compute(const Tensor& t, const char* name, const Tensor& y, int64_t many) {
  TORCH_CHECK(t.device() == y.device(), name, " is on ", t.device(), " but y is on ", y.device());
  TORCH_CHECK(t.scalar_type() == compute_type_of(y.scalar_type()), name, " must have dtype ",
              compute_type_of(y.scalar_type()), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == 1 || t.numel() == many, name, " must hold 1 or ", many, " values, got ", t.numel());
}

void check_channels(const std::optional<Tensor>& t, const char* name, int64_t C) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, name, " must have shape [", C, "], got ", t->sizes());
  TORCH_CHECK(c10::isFloatingType(t->scalar_type()), name, " must be floating point, got ", t->scalar_type());
}

// The neuron's Options for the fused kernels: X is given to the backward step, dH/dk from it
// (plif_bn_math.h neuron_backward), as a checkpointed backward's is.
template <typename acc_t>
Options<acc_t> bn_options(const Neuron& neuron) {
  return make_options<acc_t>(neuron, true);
}

// The fields of every pass's arguments (the CPU kernels' Args, the GPU launches').
template <typename in_t, typename acc_t>
void set_neuron_inputs(NeuronInputs<in_t, acc_t>& p, const Tensor& y, const Geometry& g, const Tensor& k,
                       const Tensor& v_init, const Neuron& neuron) {
  p.g = g;
  p.y = y.data_ptr<in_t>();
  p.k = k.data_ptr<acc_t>();
  p.k_per_layer = k.numel() == 1;
  p.v_init = v_init.data_ptr<acc_t>();
  p.v_init_stride = v_init.numel() == 1 ? 0 : 1;
  p.opts = bn_options<acc_t>(neuron);
}

// The CPU kernels' view of the channels and the neuron; `terms` (the compute-dtype copy of
// channel_terms) must outlive it.
template <typename in_t, typename acc_t>
Args<in_t, acc_t> make_args(const Tensor& y, const Geometry& g, const Tensor& terms, const Tensor& k,
                            const Tensor& v_init, const Neuron& neuron) {
  Args<in_t, acc_t> a;
  set_neuron_inputs(a, y, g, k, v_init, neuron);
  const acc_t* rows = terms.data_ptr<acc_t>();
  a.mean = rows + kMean * g.C;
  a.invstd = rows + kInvstd * g.C;
  a.scale = rows + kScale * g.C;
  a.shift = rows + kShift * g.C;
  return a;
}

#ifdef PLIF_WITH_CUDA
template <typename T>
T* data_or_null(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

Tensor doubles_or_undefined(const std::optional<Tensor>& t) { return t ? t->to(at::kDouble).contiguous() : Tensor(); }

// The forward on CUDA tensors: every buffer of the launch (plif_bn_kernels.cuh) on their device.
std::tuple<Tensor, Tensor, Tensor> forward_on_gpu(const Tensor& y, const Geometry& g,
                                                  const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias,
                                                  const std::optional<Tensor>& running_mean,
                                                  const std::optional<Tensor>& running_var, double eps, const Tensor& k,
                                                  const Tensor& v_init, const Neuron& neuron) {
  const c10::DeviceGuard guard(y.device());
  const auto acc_type = compute_type_of(y.scalar_type());
  const auto doubles = y.options().dtype(at::kDouble);
  Tensor spikes = at::empty(y.sizes(), y.options());
  Tensor v_last = at::empty(y.sizes().slice(1), y.options().dtype(acc_type));
  Tensor terms = at::empty({kChannelTerms, g.C}, doubles);
  if (g.T * g.neurons == 0) {
    // Nothing to launch over: the CPU op's terms, on the device.
    terms.fill_(NAN);
    if (running_mean) {
      const Tensor mean = running_mean->to(at::kDouble), var = running_var->to(at::kDouble);
      const Tensor invstd = 1.0 / (var + eps).sqrt();
      const Tensor scale = (weight ? weight->to(at::kDouble) : at::ones_like(mean)) * invstd;
      terms[kMean].copy_(mean);
      terms[kInvstd].copy_(invstd);
      terms[kScale].copy_(scale);
      terms[kShift].copy_((bias ? bias->to(at::kDouble) : at::zeros_like(mean)) - mean * scale);
      terms[kUnbiasedVar].copy_(var);
    }
    if (g.neurons > 0) v_last.view({g.neurons}).copy_(v_init.reshape({-1}).expand({g.neurons}));
    return {spikes, v_last, terms};
  }
  const Tensor gamma = doubles_or_undefined(weight), beta = doubles_or_undefined(bias);
  const Tensor mean = doubles_or_undefined(running_mean), var = doubles_or_undefined(running_var);
  const Tensor neuron_values = at::empty({running_mean ? 0 : 2 * g.neurons}, doubles);
  const Tensor slots = at::empty({g.blocks() * rows_per_block(g.S) * 2}, doubles);
  const Tensor channel_sums = at::zeros({2, g.C}, doubles);
  const Tensor terms_acc = at::empty({kChannelTerms, g.C}, y.options().dtype(acc_type));
  dispatch_types(y.scalar_type(), "y", [&](auto in_v, auto acc_v) {
    using in_t = decltype(in_v);
    using acc_t = decltype(acc_v);
    ForwardLaunch<in_t, acc_t> p;
    set_neuron_inputs(p, y, g, k, v_init, neuron);
    p.gamma = data_or_null<double>(gamma);
    p.beta = data_or_null<double>(beta);
    p.running_mean = data_or_null<double>(mean);
    p.running_var = data_or_null<double>(var);
    p.eps = eps;
    p.spikes = spikes.data_ptr<in_t>();
    p.v_last = v_last.data_ptr<acc_t>();
    p.terms = terms.data_ptr<double>();
    p.terms_acc = terms_acc.data_ptr<acc_t>();
    p.neuron_values = data_or_null<double>(neuron_values);
    p.slots = slots.data_ptr<double>();
    p.channel_sums = channel_sums.data_ptr<double>();
    forward_cuda(p);
  });
  return {spikes, v_last, terms};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_on_gpu(
    const std::optional<Tensor>& grad_spikes, const std::optional<Tensor>& grad_v_last, const Tensor& y,
    const Geometry& g, const Tensor& channel_terms, const Tensor& k, const Tensor& v_init, bool batch_statistics,
    bool need_grad_y, bool need_grad_v_init, const Neuron& neuron) {
  const c10::DeviceGuard guard(y.device());
  const auto acc_type = compute_type_of(y.scalar_type());
  const auto doubles = y.options().dtype(at::kDouble);
  const auto accs = y.options().dtype(acc_type);
  Tensor grad_y = need_grad_y ? at::empty(y.sizes(), y.options()) : at::empty({0}, y.options());
  Tensor grad_v_init = need_grad_v_init ? at::empty(y.sizes().slice(1), accs) : at::empty({0}, accs);
  Tensor channel_sums = at::zeros({3, g.C}, doubles);
  Tensor layer_grad_k = at::zeros({1}, doubles);
  if (g.T * g.neurons == 0) {
    grad_y.zero_();
    grad_v_init.zero_();
  } else {
    const Tensor terms_acc = channel_terms.contiguous().to(acc_type);
    const Tensor neuron_values = at::empty({3 * g.neurons}, accs);
    const Tensor slots = at::empty({g.blocks() * rows_per_block(g.S) * 3}, doubles);
    const Tensor mean_grads = at::empty({2, g.C}, accs);
    dispatch_types(y.scalar_type(), "y", [&](auto in_v, auto acc_v) {
      using in_t = decltype(in_v);
      using acc_t = decltype(acc_v);
      BackwardLaunch<in_t, acc_t> p;
      set_neuron_inputs(p, y, g, k, v_init, neuron);
      p.terms_acc = terms_acc.data_ptr<acc_t>();
      p.grad_spikes = grad_spikes ? grad_spikes->data_ptr<in_t>() : nullptr;
      p.grad_v_last = grad_v_last ? grad_v_last->data_ptr<acc_t>() : nullptr;
      p.batch_statistics = batch_statistics;
      p.grad_y = need_grad_y ? grad_y.data_ptr<in_t>() : nullptr;
      p.grad_v_init = need_grad_v_init ? grad_v_init.data_ptr<acc_t>() : nullptr;
      p.neuron_values = neuron_values.data_ptr<acc_t>();
      p.slots = slots.data_ptr<double>();
      p.channel_sums = channel_sums.data_ptr<double>();
      p.mean_grads = mean_grads.data_ptr<acc_t>();
      p.layer_grad_k = layer_grad_k.data_ptr<double>();
      backward_cuda(p);
    });
  }
  const Tensor grad_k = k.numel() == 1 ? layer_grad_k : channel_sums[2];
  return {grad_y, channel_sums[1].clone(), channel_sums[0].clone(), grad_k.to(acc_type).reshape(k.sizes()).clone(),
          grad_v_init};
}
#endif

std::tuple<Tensor, Tensor, Tensor> bn_plif_forward(const Tensor& y, const std::optional<Tensor>& weight,
                                                   const std::optional<Tensor>& bias,
                                                   const std::optional<Tensor>& running_mean,
                                                   const std::optional<Tensor>& running_var, const Tensor& k,
                                                   const Tensor& v_init, double eps, double v_threshold,
                                                   std::optional<double> v_reset, bool decay_input, bool detach_reset,
                                                   c10::string_view surrogate, double alpha, bool spiking) {
  const Neuron neuron = neuron_of(v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, spiking);
  const Geometry g = geometry_of(y);
  check_channels(weight, "weight", g.C);
  check_channels(bias, "bias", g.C);
  check_channels(running_mean, "running_mean", g.C);
  check_channels(running_var, "running_var", g.C);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "running_mean and running_var must be given together");
  check_compute(k, "k", y, g.C);
  check_compute(v_init, "v_init", y, g.neurons);
  const auto acc_type = compute_type_of(y.scalar_type());
  const auto doubles = y.options().dtype(at::kDouble);
#ifdef PLIF_WITH_CUDA
  if (y.is_cuda()) {
    return forward_on_gpu(y, g, weight, bias, running_mean, running_var, eps, k, v_init, neuron);
  }
#endif

  // mean and variance: the running statistics, or the batch's (the biased variance normalises).
  Tensor moments = at::empty({2, g.C}, doubles);
  if (running_mean) {
    moments[0].copy_(*running_mean);
    moments[1].copy_(*running_var);
  } else if (g.T * g.neurons > 0) {
    dispatch_types(y.scalar_type(), "y", [&](auto in_v, auto) {
      using in_t = decltype(in_v);
      channel_statistics(y.data_ptr<in_t>(), g, moments.data_ptr<double>(), moments.data_ptr<double>() + g.C);
    });
  } else {
    moments.fill_(NAN);
  }
  const Tensor gamma = weight ? weight->to(at::kDouble).contiguous() : Tensor();
  const Tensor beta = bias ? bias->to(at::kDouble).contiguous() : Tensor();
  Tensor terms = at::empty({kChannelTerms, g.C}, doubles);
  const double* const mean = moments.data_ptr<double>();
  for (index_t c = 0; c < g.C; ++c) {
    fill_channel_terms(mean[c], mean[g.C + c], gamma.defined() ? gamma.data_ptr<double>()[c] : 1.0,
                       beta.defined() ? beta.data_ptr<double>()[c] : 0.0, eps, g.per_channel(g.distinct_steps()),
                       !running_mean, terms.data_ptr<double>() + c, g.C);
  }

  // Outputs from the page-resident cache the PLIF op uses (plif_cpu_buffers.h): a fresh 64 MiB
  // tensor costs its page faults every step.
  Tensor spikes = empty_cpu_output(y.sizes(), y.options());
  Tensor v_last = empty_cpu_output(y.sizes().slice(1), y.options().dtype(acc_type));
  if (g.neurons == 0) return {spikes, v_last, terms};
  if (g.T == 0) {
    v_last.view({g.neurons}).copy_(v_init.reshape({-1}).expand({g.neurons}));
    return {spikes, v_last, terms};
  }
  const Tensor terms_acc = terms.to(acc_type);
  dispatch_types(y.scalar_type(), "y", [&](auto in_v, auto acc_v) {
    using in_t = decltype(in_v);
    using acc_t = decltype(acc_v);
    const Args<in_t, acc_t> a = make_args<in_t, acc_t>(y, g, terms_acc, k, v_init, neuron);
    forward_cpu(a, spikes.data_ptr<in_t>(), v_last.data_ptr<acc_t>());
  });
  return {spikes, v_last, terms};
}

// Returns dL/dy ([T, *step] in y's dtype, empty unless need_grad_y), dL/dgamma and dL/dbeta
// ([C] float64), dL/dk (k's shape, compute dtype) and dL/dv_init ([*step] compute dtype, empty
// unless need_grad_v_init).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_plif_backward(
    const std::optional<Tensor>& grad_spikes, const std::optional<Tensor>& grad_v_last, const Tensor& y,
    const Tensor& channel_terms, const Tensor& k, const Tensor& v_init, bool batch_statistics, bool need_grad_y,
    bool need_grad_v_init, double v_threshold, std::optional<double> v_reset, bool decay_input, bool detach_reset,
    c10::string_view surrogate, double alpha, bool spiking) {
  const Neuron neuron = neuron_of(v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, spiking);
  const Geometry g = geometry_of(y);
  TORCH_CHECK(channel_terms.scalar_type() == at::kDouble && channel_terms.dim() == 2 &&
                  channel_terms.size(0) == kChannelTerms && channel_terms.size(1) == g.C,
              "channel_terms must be float64 [", int(kChannelTerms), ", ", g.C, "], got ", channel_terms.sizes());
  check_compute(k, "k", y, g.C);
  check_compute(v_init, "v_init", y, g.neurons);
  if (grad_spikes) {
    TORCH_CHECK(grad_spikes->sizes() == y.sizes() && grad_spikes->scalar_type() == y.scalar_type() &&
                    grad_spikes->is_contiguous() && grad_spikes->device() == y.device(),
                "grad_spikes must be contiguous, with y's shape and dtype");
  }
  const auto acc_type = compute_type_of(y.scalar_type());
  if (grad_v_last) {
    TORCH_CHECK(grad_v_last->numel() == g.neurons && grad_v_last->scalar_type() == acc_type &&
                    grad_v_last->is_contiguous() && grad_v_last->device() == y.device(),
                "grad_v_last must be contiguous, one value per neuron of a step, in the compute dtype");
  }
#ifdef PLIF_WITH_CUDA
  if (y.is_cuda()) {
    return backward_on_gpu(grad_spikes, grad_v_last, y, g, channel_terms, k, v_init, batch_statistics, need_grad_y,
                           need_grad_v_init, neuron);
  }
#endif
  Tensor grad_y = need_grad_y ? empty_cpu_output(y.sizes(), y.options()) : at::empty({0}, y.options());
  Tensor grad_v_init = need_grad_v_init ? empty_cpu_output(y.sizes().slice(1), y.options().dtype(acc_type))
                                        : at::empty({0}, y.options().dtype(acc_type));
  Tensor channel_sums = at::zeros({3, g.C}, y.options().dtype(at::kDouble));
  if (g.T * g.neurons == 0) {
    if (need_grad_y) grad_y.zero_();
    if (need_grad_v_init) grad_v_init.fill_(0);
  } else {
    const Tensor terms_acc = channel_terms.contiguous().to(acc_type);
    dispatch_types(y.scalar_type(), "y", [&](auto in_v, auto acc_v) {
      using in_t = decltype(in_v);
      using acc_t = decltype(acc_v);
      const Args<in_t, acc_t> a = make_args<in_t, acc_t>(y, g, terms_acc, k, v_init, neuron);
      Gradients<in_t, acc_t> gr;
      gr.grad_spikes = grad_spikes ? grad_spikes->data_ptr<in_t>() : nullptr;
      gr.grad_v_last = grad_v_last ? grad_v_last->data_ptr<acc_t>() : nullptr;
      gr.grad_y = need_grad_y ? grad_y.data_ptr<in_t>() : nullptr;
      gr.grad_v_init = need_grad_v_init ? grad_v_init.data_ptr<acc_t>() : nullptr;
      gr.batch_statistics = batch_statistics;
      gr.mean_grad = gr.mean_grad_xhat = nullptr;
      gr.grad_z = nullptr;
      backward_cpu(a, gr, need_grad_y, channel_sums.data_ptr<double>());
    });
  }
  // dL/dk per channel, or their sum in channel order for one k. Each output its own tensor (not
  // views of channel_sums: an op's outputs must not alias).
  Tensor grad_k = channel_sums[2];
  if (k.numel() == 1) grad_k = at::scalar_tensor(sum_in_fixed_order(grad_k.data_ptr<double>(), g.C), grad_k.options());
  return {grad_y, channel_sums[1].clone(), channel_sums[0].clone(), grad_k.to(acc_type).reshape(k.sizes()).clone(),
          grad_v_init};
}

}  // namespace

// The tensors positional, the options keyword-only after `*` (the neuron's as the neuron ops take
// them): autograd expects a gradient for the tensors alone.
TORCH_LIBRARY_FRAGMENT(plif_cuda, m) {
  m.def(
      "bn_plif_forward(Tensor y, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "Tensor k, Tensor v_init, *, float eps, " PLIF_NEURON_OPTIONS
      ") -> (Tensor spikes, Tensor v_last, Tensor channel_terms)");
  m.def(
      "bn_plif_backward(Tensor? grad_spikes, Tensor? grad_v_last, Tensor y, Tensor channel_terms, Tensor k, "
      "Tensor v_init, *, bool batch_statistics, bool need_grad_y, bool need_grad_v_init, " PLIF_NEURON_OPTIONS
      ") -> (Tensor grad_y, Tensor grad_weight, Tensor grad_bias, Tensor grad_k, Tensor grad_v_init)");
}

TORCH_LIBRARY_IMPL(plif_cuda, CPU, m) {
  m.impl("bn_plif_forward", &bn_plif_forward);
  m.impl("bn_plif_backward", &bn_plif_backward);
}

#ifdef PLIF_WITH_CUDA
TORCH_LIBRARY_IMPL(plif_cuda, CUDA, m) {
  m.impl("bn_plif_forward", &bn_plif_forward);
  m.impl("bn_plif_backward", &bn_plif_backward);
}
#endif

}  // namespace bn
}  // namespace plif
