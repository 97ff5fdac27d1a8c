// The binding layer: op schemas, argument checks, output shapes and allocation, and dispatch to
// the CPU or CUDA kernels. All checks live here; the kernels trust their parameters.
//
// The public ops (namespace plif_cuda) take what the neuron needs: the tensors, the neuron's
// parameters and options (keyword-only), whether a backward will follow; the op decides what to
// keep for it (save_mode_for). CUDA tensors reach the same kernels through one of two launchers,
// each behind ops of its own with the same schema: multistep_forward/backward launch the kernels
// nvcc compiled into this library (plif_cuda.cu, built with PLIF_WITH_CUDA);
// multistep_forward_nvrtc/backward_nvrtc launch them compiled at run time through NVRTC, by way
// of plif_cuda_internal::nvrtc_launch_*, which plif_cuda/cupy_backend.py implements. The CUDA
// registration needs no CUDA header, so a library built without a toolkit still serves CUDA
// tensors through the NVRTC ops. Meta kernels (for torch.compile and fake tensors) share the
// output shapes with the real ones.
//
// Layout contract (the Python layer arranges it, see plif_cuda/functional.py): x is a
// [T, *S] tensor whose steps are each contiguous, at any distance apart (stride 0 included:
// one step broadcast over time, as y.expand(T, ...) gives); k and v_init are contiguous and
// either hold one value or one value per neuron of S, in the compute dtype (float64 for
// float64 inputs, float32 otherwise). v_last (and so its gradient) is in the compute dtype too:
// it is the state a layer carries into its next call, and rounding it there would make a split
// sequence differ from one call; spikes, v_seq and grad_x have x's dtype and are contiguous.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <exception>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "plif_cpu_buffers.h"
#include "plif_dtypes.h"
#include "plif_launch.h"
#include "plif_math.h"
#include "plif_op_options.h"

// Written by setup.py into its build folder: the torch the library was built against, and the
// CUDA architectures of its kernels or why they were not built.
#if __has_include("plif_build_info.h")
#include "plif_build_info.h"
#else
#define PLIF_TORCH_VERSION "unknown (built without setup.py)"
#define PLIF_CUDA_ARCHS ""
#define PLIF_CUDA_SKIPPED_BECAUSE "unknown (built without setup.py)"
#endif

namespace plif {
namespace {

using at::Tensor;
using SymSizes = std::vector<c10::SymInt>;
using ForwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using BackwardOutputs = std::tuple<Tensor, Tensor, Tensor>;

// What a forward keeps for its backward: x itself (autograd keeps it) and the checkpoint rows of
// H in the compute dtype (at most 0.5 B per neuron-step more in float32), for every dtype: the
// backward recomputes H bit for bit and takes dH/dk = X - (V[t-1] - V_r), exact for every tau
// (docs/precision.md). The rule may depend on the dtype only: a Meta kernel computes the same
// output shapes without seeing the device.
SaveMode save_mode_for(at::ScalarType /*x_dtype*/, bool needs_backward) {
  return needs_backward ? kSaveCheckpoints : kSaveNothing;
}

// ---- output shapes: shared by the kernels' allocation and the Meta kernels ----------------------
// checkpoint_rows (plif_params.h) for sizes that may be symbolic (torch.compile's dynamic shapes).
c10::SymInt checkpoint_rows_of(const c10::SymInt& steps) {
  return steps > 0 ? (steps - 1) / static_cast<int64_t>(kCheckpointSteps) : c10::SymInt(0);
}

struct ForwardSizes {
  SymSizes spikes, v_last, v_seq, h_seq;
};

// For x [T, *S]: spikes [T, *S], v_last [*S], v_seq [T, *S] (or empty), and h_seq: every H
// [T, *S], H's checkpoint rows [(T-1)/K, *S] (kSaveCheckpoints), or empty.
ForwardSizes forward_sizes(c10::SymIntArrayRef x, bool store_v_seq, SaveMode save) {
  const SymSizes all(x.begin(), x.end());
  SymSizes rows = all;
  rows[0] = checkpoint_rows_of(all[0]);
  const SymSizes none{0};
  return {all, SymSizes(all.begin() + 1, all.end()), store_v_seq ? all : none,
          save == kSaveH             ? all
          : save == kSaveCheckpoints ? rows
                                     : none};
}

// grad_x has the shape of the forward's x, grad_k and grad_v_init as many values as k and v_init,
// or none where the caller does not ask for them.
struct BackwardSizes {
  SymSizes grad_x, grad_k, grad_v_init;
};

// Which of the one-per-parameter gradients the caller asks for (the backward op's needs_grad_k,
// needs_grad_v_init).
struct AskedGradients {
  bool k, v_init;
};

BackwardSizes backward_sizes(const Tensor& shape_source, const Tensor& k, const Tensor& v_init, AskedGradients asked) {
  const c10::SymInt none(0);
  return {SymSizes(shape_source.sym_sizes().begin(), shape_source.sym_sizes().end()),
          {asked.k ? k.sym_numel() : none},
          {asked.v_init ? v_init.sym_numel() : none}};
}

// Every output of the kernels, the [N] ones included (at 2^20 neurons v_last, grad_k and
// grad_v_init are 4 MiB each, a thousand fresh-page faults apiece): on CPU from the
// page-resident cache (plif_cpu_buffers.h), which passes small requests on to torch's allocator.
Tensor empty_output(const SymSizes& sizes, const at::TensorOptions& options) {
  const at::IntArrayRef concrete = c10::asIntArrayRefUnchecked(sizes);
  return options.device().is_cpu() ? empty_cpu_output(concrete, options) : at::empty(concrete, options);
}

Tensor empty_meta(const SymSizes& sizes, const at::TensorOptions& options) { return at::empty_symint(sizes, options); }

template <typename Allocate>
ForwardOutputs allocate_forward(const Tensor& x, bool store_v_seq, SaveMode save, Allocate allocate) {
  const ForwardSizes sizes = forward_sizes(x.sym_sizes(), store_v_seq, save);
  const auto acc = x.options().dtype(compute_type_of(x.scalar_type()));
  return {allocate(sizes.spikes, x.options()), allocate(sizes.v_last, acc), allocate(sizes.v_seq, x.options()),
          allocate(sizes.h_seq, acc)};
}

template <typename Allocate>
BackwardOutputs allocate_backward(const Tensor& shape_source, const Tensor& k, const Tensor& v_init,
                                  AskedGradients asked, const at::TensorOptions& acc, at::ScalarType x_dtype,
                                  Allocate allocate) {
  const BackwardSizes sizes = backward_sizes(shape_source, k, v_init, asked);
  return {allocate(sizes.grad_x, acc.dtype(x_dtype)), allocate(sizes.grad_k, acc), allocate(sizes.grad_v_init, acc)};
}

// ---- argument checks -----------------------------------------------------------------------------
void check_per_neuron(const Tensor& t, const char* name, const c10::Device& device, at::ScalarType x_dtype,
                      int64_t neurons) {
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but x is on ", device);
  TORCH_CHECK(t.scalar_type() == compute_type_of(x_dtype), name, " must have dtype ", compute_type_of(x_dtype),
              " for x of dtype ", x_dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == 1 || t.numel() == neurons, name, " must hold 1 or ", neurons,
              " values (one per neuron), got ", t.numel());
}

void check_seq(const Tensor& t, const char* name, const Tensor& like, at::ScalarType x_dtype) {
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but expected ", like.device());
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x_dtype, name, " must have dtype ", x_dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_x_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "x must be float16, bfloat16, float32 or float64, got ", t);
}

// x as the kernels read it: every step x[t] contiguous (size-1 dims anywhere), the steps any
// stride apart. A broadcast or sliced time dimension is read in place, not copied.
void check_steps_contiguous(const Tensor& x) {
  int64_t expected = 1;
  for (int64_t d = x.dim() - 1; d >= 1; --d) {
    if (x.size(d) == 1) continue;
    TORCH_CHECK(x.stride(d) == expected, "every step of x must be contiguous (x[t].is_contiguous()), got sizes ",
                x.sizes(), " and strides ", x.strides());
    expected *= x.size(d);
  }
}

// Elements from one step of x to the next (N where there is only one step, whose stride means
// nothing).
int64_t step_stride(const Tensor& x, int64_t N) { return x.size(0) > 1 ? x.stride(0) : N; }

// The CUDA backward recomputes H from x and the checkpoints (kSaveCheckpoints), the one form of
// the saved state that gives an exact dL/dk; the CPU kernel also runs from every H.
void check_cuda_backward_has_checkpoints(const c10::Device& device, bool checkpoints) {
  TORCH_CHECK(checkpoints || device.is_cpu(),
              "the CUDA backward needs x and the checkpoint rows of H (a forward that saved checkpoints)");
}

// k's and v_init's stride: 0 where the tensor holds one value for every neuron.
int64_t per_neuron_stride(const Tensor& t) { return t.numel() == 1 ? 0 : 1; }

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// ---- the two launchers of the CUDA kernels -------------------------------------------------------
enum class Launcher { kCompiled, kNvrtc };

// A kernel argument as the NVRTC launcher op takes it: a tensor where the kernel gets a
// pointer (None for a null one, as ptr_or_null decides), then the scalar block.
c10::IValue pointer_argument(const Tensor& t) { return t.defined() && t.numel() > 0 ? c10::IValue(t) : c10::IValue(); }
c10::IValue pointer_argument(const std::optional<Tensor>& t) { return t ? pointer_argument(*t) : c10::IValue(); }

// The NVRTC launcher: the op `op_name` with the kernel's tensors, then its scalar block. The
// caller's device guard makes the tensors' device current, as for the nvcc launcher.
template <typename Params>
void launch_nvrtc(const char* op_name, std::vector<c10::IValue> arguments, const Params& p) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(op_name, "");
  TORCH_CHECK(op.hasKernelForDispatchKey(c10::DispatchKey::CUDA),
              "the NVRTC launcher is not loaded: import plif_cuda.cupy_backend (backend='cupy' does)");
  with_scalar_arguments(p, [&](auto... scalars) {
    auto as_ivalue = [](auto scalar) {
      if constexpr (std::is_floating_point_v<decltype(scalar)>) {
        return c10::IValue(static_cast<double>(scalar));
      } else {
        return c10::IValue(static_cast<int64_t>(scalar));
      }
    };
    (arguments.push_back(as_ivalue(scalars)), ...);
  });
  op.callBoxed(&arguments);
}

// The nvcc launcher (plif_cuda.cu), where the library has it.
#ifdef PLIF_WITH_CUDA
template <typename in_t, typename acc_t>
void launch_compiled(const ForwardParams<in_t, acc_t>& p) {
  forward_cuda(p);
}
template <typename in_t, typename acc_t>
void launch_compiled(const BackwardParams<in_t, acc_t>& p) {
  backward_cuda(p);
}
#else
template <typename Params>
void launch_compiled(const Params&) {
  TORCH_CHECK(false,
              "plif_cuda was built without its compiled CUDA kernels; backend='cupy' runs them compiled at run time");
}
#endif

// `values` ([N], reached only without a time step) as `count` values: themselves (count N), or
// their sum (count 1) in an order fixed by N: on CPU plif_math.h's sum_in_fixed_order, on CUDA
// torch's reduction, whose order depends only on the shape.
Tensor sum_to_count(const Tensor& values, int64_t count) {
  if (count != 1 || values.numel() == 1) return values;
  if (values.is_cuda()) return at::sum(values, at::kDouble).to(values.scalar_type());
  const Tensor doubles = values.to(at::kDouble).contiguous();
  return at::scalar_tensor(sum_in_fixed_order(doubles.data_ptr<double>(), doubles.numel()), values.options());
}

// The row of a GPU backward's per-block partial sums for a parameter that is one value (shared),
// else an empty tensor (null): one double per block of a grid of one thread per neuron, the most
// blocks a launch takes (plif_launch.h).
Tensor gpu_partials(const Tensor& like, bool shared, int64_t neurons) {
  if (like.is_cpu() || !shared) return at::empty({0}, like.options().dtype(at::kDouble));
  return at::empty({launch_blocks(neurons, neurons)}, like.options().dtype(at::kDouble));
}

// ---- the forward ---------------------------------------------------------------------------------
template <Launcher launcher>
ForwardOutputs forward_saving(const Tensor& x, const Tensor& k, const Tensor& v_init, const Neuron& neuron,
                              bool store_v_seq, SaveMode save) {
  TORCH_CHECK(x.dim() >= 1, "x must have a time dimension");
  check_x_dtype(x.scalar_type());
  check_steps_contiguous(x);
  const int64_t T = x.size(0);
  const int64_t N = c10::multiply_integers(x.sizes().slice(1));
  check_per_neuron(k, "k", x.device(), x.scalar_type(), N);
  check_per_neuron(v_init, "v_init", x.device(), x.scalar_type(), N);

  Tensor spikes, v_last, v_seq, h_seq;
  std::tie(spikes, v_last, v_seq, h_seq) = allocate_forward(x, store_v_seq, save, empty_output);
  if (N == 0) return {spikes, v_last, v_seq, h_seq};
  if (T == 0) {
    v_last.view({N}).copy_(v_init.reshape({-1}).expand({N}));
    return {spikes, v_last, v_seq, h_seq};
  }

  dispatch_types(x.scalar_type(), "x", [&](auto in_v, auto acc_v) {
    using in_t = decltype(in_v);
    using acc_t = decltype(acc_v);
    // ForwardParams' fields, in their order.
    const ForwardParams<in_t, acc_t> p{x.data_ptr<in_t>(),
                                       k.data_ptr<acc_t>(),
                                       v_init.data_ptr<acc_t>(),
                                       spikes.data_ptr<in_t>(),
                                       v_last.data_ptr<acc_t>(),
                                       ptr_or_null<in_t>(v_seq),
                                       ptr_or_null<acc_t>(h_seq),
                                       per_neuron_stride(k),
                                       per_neuron_stride(v_init),
                                       T,
                                       N,
                                       step_stride(x, N),
                                       make_options<acc_t>(neuron, save == kSaveCheckpoints)};
    if (x.is_cpu()) {
      forward_cpu(p);
    } else {
      const c10::DeviceGuard guard(x.device());
      if constexpr (launcher == Launcher::kNvrtc) {
        launch_nvrtc("plif_cuda_internal::nvrtc_launch_forward",
                     {pointer_argument(x), pointer_argument(k), pointer_argument(v_init), pointer_argument(spikes),
                      pointer_argument(v_last), pointer_argument(v_seq), pointer_argument(h_seq)},
                     p);
      } else {
        launch_compiled(p);
      }
    }
  });
  return {spikes, v_last, v_seq, h_seq};
}

template <Launcher launcher>
ForwardOutputs multistep_forward(const Tensor& x, const Tensor& k, const Tensor& v_init, double v_threshold,
                                 std::optional<double> v_reset, bool decay_input, bool detach_reset,
                                 c10::string_view surrogate, double alpha, bool spiking, bool store_v_seq,
                                 bool needs_backward) {
  const Neuron neuron = neuron_of(v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, spiking);
  return forward_saving<launcher>(x, k, v_init, neuron, store_v_seq, save_mode_for(x.scalar_type(), needs_backward));
}

SaveMode checked_save_mode(int64_t save) {
  TORCH_CHECK(save == kSaveNothing || save == kSaveH || save == kSaveCheckpoints,
              "save must be 0 (nothing), 1 (every H) or 2 (checkpoints), got ", save);
  return static_cast<SaveMode>(save);
}

// plif_cuda_internal::multistep_forward_saving: the forward keeping what `save` says, whatever
// the dtype, for the tests and benchmarks that compare the save modes.
ForwardOutputs forward_saving_op(const Tensor& x, const Tensor& k, const Tensor& v_init, double v_threshold,
                                 std::optional<double> v_reset, bool decay_input, bool detach_reset,
                                 c10::string_view surrogate, double alpha, bool spiking, bool store_v_seq,
                                 int64_t save) {
  const Neuron neuron = neuron_of(v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, spiking);
  return forward_saving<Launcher::kCompiled>(x, k, v_init, neuron, store_v_seq, checked_save_mode(save));
}

ForwardOutputs forward_saving_meta(const Tensor& x, const Tensor& k, const Tensor& v_init, double v_threshold,
                                   std::optional<double> v_reset, bool decay_input, bool detach_reset,
                                   c10::string_view surrogate, double alpha, bool spiking, bool store_v_seq,
                                   int64_t save) {
  TORCH_CHECK(x.dim() >= 1, "x must have a time dimension");
  check_x_dtype(x.scalar_type());
  neuron_of(v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, spiking);
  return allocate_forward(x, store_v_seq, checked_save_mode(save), empty_meta);
}

ForwardOutputs multistep_forward_meta(const Tensor& x, const Tensor& k, const Tensor& v_init, double v_threshold,
                                      std::optional<double> v_reset, bool decay_input, bool detach_reset,
                                      c10::string_view surrogate, double alpha, bool spiking, bool store_v_seq,
                                      bool needs_backward) {
  return forward_saving_meta(x, k, v_init, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, spiking,
                             store_v_seq, save_mode_for(x.scalar_type(), needs_backward));
}

// ---- the backward --------------------------------------------------------------------------------
void check_h_seq(const Tensor& h_seq, at::ScalarType x_dtype) {
  TORCH_CHECK(h_seq.dim() >= 1, "h_seq must have a time dimension");
  TORCH_CHECK(h_seq.scalar_type() == compute_type_of(x_dtype), "h_seq must have dtype ", compute_type_of(x_dtype));
}

template <Launcher launcher>
BackwardOutputs multistep_backward(const std::optional<Tensor>& grad_spikes, const std::optional<Tensor>& grad_v_last,
                                   const std::optional<Tensor>& grad_v_seq, const Tensor& h_seq,
                                   const std::optional<Tensor>& x, const Tensor& k, const Tensor& v_init,
                                   at::ScalarType x_dtype, double v_threshold, std::optional<double> v_reset,
                                   bool decay_input, bool detach_reset, c10::string_view surrogate, double alpha,
                                   bool spiking, bool needs_grad_k, bool needs_grad_v_init) {
  const AskedGradients asked{needs_grad_k, needs_grad_v_init};
  const Neuron neuron = neuron_of(v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, spiking);
  check_x_dtype(x_dtype);
  check_h_seq(h_seq, x_dtype);
  TORCH_CHECK(h_seq.is_contiguous(), "h_seq must be contiguous");
  // With x (kSaveCheckpoints), h_seq holds H's checkpoint rows and x gives the shape.
  const Tensor& shape_source = x ? *x : h_seq;
  if (x) {
    TORCH_CHECK(x->dim() >= 1, "x must have a time dimension");
    TORCH_CHECK(x->device() == h_seq.device(), "x is on ", x->device(), " but h_seq is on ", h_seq.device());
    TORCH_CHECK(x->scalar_type() == x_dtype, "x must have dtype ", x_dtype, ", got ", x->scalar_type());
    check_steps_contiguous(*x);
    const SymSizes expected = forward_sizes(x->sym_sizes(), false, kSaveCheckpoints).h_seq;
    const at::IntArrayRef expected_sizes = c10::asIntArrayRefUnchecked(expected);
    TORCH_CHECK(h_seq.sizes() == expected_sizes, "h_seq must hold the checkpoint rows of x: shape ", expected_sizes,
                ", got ", h_seq.sizes());
  }
  const int64_t T = shape_source.size(0);
  const int64_t N = c10::multiply_integers(shape_source.sizes().slice(1));
  check_per_neuron(k, "k", h_seq.device(), x_dtype, N);
  check_per_neuron(v_init, "v_init", h_seq.device(), x_dtype, N);
  if (grad_spikes) check_seq(*grad_spikes, "grad_spikes", shape_source, x_dtype);
  if (grad_v_seq) check_seq(*grad_v_seq, "grad_v_seq", shape_source, x_dtype);
  if (grad_v_last) {
    TORCH_CHECK(grad_v_last->numel() == N && grad_v_last->is_contiguous() &&
                    grad_v_last->scalar_type() == h_seq.scalar_type() && grad_v_last->device() == h_seq.device(),
                "grad_v_last must be a contiguous ", h_seq.scalar_type(), " tensor of ", N, " values on ",
                h_seq.device());
  }

  // dL/dk and dL/dv_init hold as many values as k and v_init: one (the sum over the neurons)
  // or one per neuron; none where the caller does not ask for them.
  Tensor grad_x, grad_k, grad_v_init;
  std::tie(grad_x, grad_k, grad_v_init) =
      allocate_backward(shape_source, k, v_init, asked, h_seq.options(), x_dtype, empty_output);
  if (N == 0 || T == 0) {
    // No step: nothing reaches k, and dL/dv_init is dL/dV[T-1] (zero for N = 0).
    grad_k.zero_();
    if (grad_v_last && N > 0 && asked.v_init)
      grad_v_init.copy_(sum_to_count(grad_v_last->reshape({N}), v_init.numel()));
    else
      grad_v_init.zero_();
    return {grad_x, grad_k, grad_v_init};
  }
  check_cuda_backward_has_checkpoints(h_seq.device(), x.has_value());
  // An unasked gradient (an empty tensor) reaches the kernels as a null pointer, which they spend
  // nothing on: no stores, no sums.
  // Where k (v_init) is one value and asked for, the GPU kernels sum its shares per thread block
  // into a row of partials (one per block of the widest grid), which the launcher then finishes.
  const Tensor grad_k_partials = gpu_partials(h_seq, k.numel() == 1 && asked.k, N);
  const Tensor grad_v_init_partials = gpu_partials(h_seq, v_init.numel() == 1 && asked.v_init, N);

  dispatch_types(x_dtype, "x", [&](auto in_v, auto acc_v) {
    using in_t = decltype(in_v);
    using acc_t = decltype(acc_v);
    // BackwardParams' fields, in their order.
    const BackwardParams<in_t, acc_t> p{grad_spikes ? ptr_or_null<in_t>(*grad_spikes) : nullptr,
                                        grad_v_last ? ptr_or_null<acc_t>(*grad_v_last) : nullptr,
                                        grad_v_seq ? ptr_or_null<in_t>(*grad_v_seq) : nullptr,
                                        ptr_or_null<acc_t>(h_seq),
                                        x ? x->data_ptr<in_t>() : nullptr,
                                        k.data_ptr<acc_t>(),
                                        v_init.data_ptr<acc_t>(),
                                        grad_x.data_ptr<in_t>(),
                                        ptr_or_null<acc_t>(grad_k),
                                        ptr_or_null<acc_t>(grad_v_init),
                                        ptr_or_null<double>(grad_k_partials),
                                        ptr_or_null<double>(grad_v_init_partials),
                                        per_neuron_stride(k),
                                        per_neuron_stride(v_init),
                                        T,
                                        N,
                                        x ? step_stride(*x, N) : N,
                                        make_options<acc_t>(neuron, x.has_value())};
    if (h_seq.is_cpu()) {
      backward_cpu(p);
    } else {
      const c10::DeviceGuard guard(h_seq.device());
      if constexpr (launcher == Launcher::kNvrtc) {
        launch_nvrtc("plif_cuda_internal::nvrtc_launch_backward",
                     {pointer_argument(grad_spikes), pointer_argument(grad_v_last), pointer_argument(grad_v_seq),
                      pointer_argument(h_seq), pointer_argument(x), pointer_argument(k), pointer_argument(v_init),
                      pointer_argument(grad_x), pointer_argument(grad_k), pointer_argument(grad_v_init),
                      pointer_argument(grad_k_partials), pointer_argument(grad_v_init_partials)},
                     p);
      } else {
        launch_compiled(p);
      }
    }
  });
  return {grad_x, grad_k, grad_v_init};
}

BackwardOutputs multistep_backward_meta(const std::optional<Tensor>& grad_spikes,
                                        const std::optional<Tensor>& grad_v_last,
                                        const std::optional<Tensor>& grad_v_seq, const Tensor& h_seq,
                                        const std::optional<Tensor>& x, const Tensor& k, const Tensor& v_init,
                                        at::ScalarType x_dtype, double v_threshold, std::optional<double> v_reset,
                                        bool decay_input, bool detach_reset, c10::string_view surrogate, double alpha,
                                        bool spiking, bool needs_grad_k, bool needs_grad_v_init) {
  neuron_of(v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, spiking);
  check_x_dtype(x_dtype);
  check_h_seq(h_seq, x_dtype);
  return allocate_backward(x ? *x : h_seq, k, v_init, {needs_grad_k, needs_grad_v_init}, h_seq.options(), x_dtype,
                           empty_meta);
}

}  // namespace

#define PLIF_FORWARD_OUTPUTS "-> (Tensor spikes, Tensor v_last, Tensor v_seq, Tensor h_seq)"
// The backward's needs_grad_k (needs_grad_v_init) false: that gradient is returned empty, and the
// GPU kernels spend nothing on it.
#define PLIF_BACKWARD_ARGUMENTS                                                                        \
  "(Tensor? grad_spikes, Tensor? grad_v_last, Tensor? grad_v_seq, Tensor h_seq, Tensor? x, Tensor k, " \
  "Tensor v_init, *, ScalarType x_dtype, " PLIF_NEURON_OPTIONS                                         \
  ", bool needs_grad_k=True, bool needs_grad_v_init=True) -> (Tensor grad_x, Tensor grad_k, Tensor grad_v_init)"

TORCH_LIBRARY(plif_cuda, m) {
  for (const char* name : {"multistep_forward", "multistep_forward_nvrtc"}) {
    m.def((std::string(name) + "(Tensor x, Tensor k, Tensor v_init, *, " PLIF_NEURON_OPTIONS
                               ", bool store_v_seq, bool needs_backward) " PLIF_FORWARD_OUTPUTS)
              .c_str());
  }
  for (const char* name : {"multistep_backward", "multistep_backward_nvrtc"}) {
    m.def((std::string(name) + PLIF_BACKWARD_ARGUMENTS).c_str());
  }
}

TORCH_LIBRARY(plif_cuda_internal, m) {
  m.def("multistep_forward_saving(Tensor x, Tensor k, Tensor v_init, *, " PLIF_NEURON_OPTIONS
        ", bool store_v_seq, int save) " PLIF_FORWARD_OUTPUTS);
  m.def("save_mode_for(ScalarType x_dtype, bool needs_backward) -> int",
        [](at::ScalarType x_dtype, bool needs_backward) -> int64_t { return save_mode_for(x_dtype, needs_backward); });
  // The NVRTC launcher (plif_cuda/cupy_backend.py implements them for CUDA tensors): the
  // kernels' arguments in their order, tensors for pointers (None: null), then the scalar
  // block of with_scalar_arguments (plif_params.h).
  m.def(
      "nvrtc_launch_forward(Tensor x, Tensor k, Tensor v_init, Tensor(a!) spikes, Tensor(b!) v_last, "
      "Tensor(c!)? v_seq, Tensor(d!)? h_seq, int k_stride, int v_init_stride, int T, int N, int x_step, "
      "float v_threshold, float v_reset, float alpha, int surrogate, int flags) -> ()");
  m.def(
      "nvrtc_launch_backward(Tensor? grad_spikes, Tensor? grad_v_last, Tensor? grad_v_seq, Tensor? h_seq, "
      "Tensor? x, Tensor k, Tensor v_init, Tensor(a!) grad_x, Tensor(b!)? grad_k, Tensor(c!)? grad_v_init, "
      "Tensor(d!)? grad_k_partials, Tensor(e!)? grad_v_init_partials, int k_stride, "
      "int v_init_stride, int T, int N, int x_step, float v_threshold, float v_reset, float alpha, int surrogate, "
      "int flags) -> ()");
}

// CPU tensors run the CPU kernel whichever launcher the op is named for.
TORCH_LIBRARY_IMPL(plif_cuda, CPU, m) {
  m.impl("multistep_forward", &multistep_forward<Launcher::kCompiled>);
  m.impl("multistep_forward_nvrtc", &multistep_forward<Launcher::kNvrtc>);
  m.impl("multistep_backward", &multistep_backward<Launcher::kCompiled>);
  m.impl("multistep_backward_nvrtc", &multistep_backward<Launcher::kNvrtc>);
}

TORCH_LIBRARY_IMPL(plif_cuda, CUDA, m) {
  m.impl("multistep_forward", &multistep_forward<Launcher::kCompiled>);
  m.impl("multistep_forward_nvrtc", &multistep_forward<Launcher::kNvrtc>);
  m.impl("multistep_backward", &multistep_backward<Launcher::kCompiled>);
  m.impl("multistep_backward_nvrtc", &multistep_backward<Launcher::kNvrtc>);
}

TORCH_LIBRARY_IMPL(plif_cuda, Meta, m) {
  m.impl("multistep_forward", &multistep_forward_meta);
  m.impl("multistep_forward_nvrtc", &multistep_forward_meta);
  m.impl("multistep_backward", &multistep_backward_meta);
  m.impl("multistep_backward_nvrtc", &multistep_backward_meta);
}

TORCH_LIBRARY_IMPL(plif_cuda_internal, CPU, m) { m.impl("multistep_forward_saving", &forward_saving_op); }
TORCH_LIBRARY_IMPL(plif_cuda_internal, CUDA, m) { m.impl("multistep_forward_saving", &forward_saving_op); }
TORCH_LIBRARY_IMPL(plif_cuda_internal, Meta, m) { m.impl("multistep_forward_saving", &forward_saving_meta); }

// ---- the Python module plif_cuda._C --------------------------------------------------------------
// Importing it loads the library, whose static initialisers register the ops above. Its
// attributes are the constants Python and the tests read (defined here and in the headers only),
// the build information, and the launch rule and CPU buffer cache as plain functions.
namespace {

template <typename Fn>
PyObject* guarded(Fn fn) {
  try {
    return fn();
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

PyObject* py_launch_blocks(PyObject*, PyObject* args) {
  long long neurons = 0, resident_blocks = 0;
  if (!PyArg_ParseTuple(args, "LL:launch_blocks", &neurons, &resident_blocks)) return nullptr;
  return PyLong_FromLongLong(launch_blocks(neurons, resident_blocks));
}

// The shape bindings' shared argument handling: a dtype's element size (false, with a Python
// ValueError set, where it is none), and a tensor's data_ptr() as the address the rules check.
bool element_bytes_valid(const char* binding, int element_bytes) {
  if (element_bytes == 2 || element_bytes == 4 || element_bytes == 8) return true;
  PyErr_Format(PyExc_ValueError, "%s: element_bytes must be 2, 4 or 8, got %d", binding, element_bytes);
  return false;
}
const void* address(unsigned long long data_ptr) { return reinterpret_cast<const void*>(data_ptr); }

PyObject* py_forward_shape(PyObject*, PyObject* args) {
  long long T = 0, N = 0, x_step = 0, resident_blocks = 0;
  int element_bytes = 0, flags = 0;
  unsigned long long x = 0, spikes = 0, v_seq = 0, h_seq = 0;
  if (!PyArg_ParseTuple(args, "LLLiiLKKKK:forward_shape", &T, &N, &x_step, &element_bytes, &flags, &resident_blocks, &x,
                        &spikes, &v_seq, &h_seq)) {
    return nullptr;
  }
  if (!element_bytes_valid("forward_shape", element_bytes)) return nullptr;
  const LaunchPath launch =
      forward_shape(T, N, x_step, element_bytes, flags,
                    on_vector_words(address(x), address(spikes), address(v_seq), address(h_seq)), resident_blocks);
  return Py_BuildValue("(Li)", static_cast<long long>(launch.blocks), launch.path_flag);
}

PyObject* py_backward_shape(PyObject*, PyObject* args) {
  long long N = 0, x_step = 0, resident_blocks = 0;
  int element_bytes = 0, flags = 0;
  unsigned long long x = 0, grad_spikes = 0, grad_v_seq = 0, grad_x = 0;
  if (!PyArg_ParseTuple(args, "LLiiLKKKK:backward_shape", &N, &x_step, &element_bytes, &flags, &resident_blocks, &x,
                        &grad_spikes, &grad_v_seq, &grad_x)) {
    return nullptr;
  }
  if (!element_bytes_valid("backward_shape", element_bytes)) return nullptr;
  const int word = backward_lanes(element_bytes) * element_bytes;
  const LaunchPath launch = backward_shape(
      N, x_step, element_bytes, flags,
      on_words(word, address(x), address(grad_spikes), address(grad_v_seq), address(grad_x)), resident_blocks);
  return Py_BuildValue("(Li)", static_cast<long long>(launch.blocks), launch.path_flag);
}

PyObject* py_checkpoint_rows(PyObject*, PyObject* args) {
  long long steps = 0;
  if (!PyArg_ParseTuple(args, "L:checkpoint_rows", &steps)) return nullptr;
  return PyLong_FromLongLong(checkpoint_rows(steps));
}

PyObject* py_cpu_cache_bytes(PyObject*, PyObject*) {
  return guarded([] { return PyLong_FromLongLong(cpu_cache_bytes()); });
}

PyObject* py_empty_cpu_cache(PyObject*, PyObject*) {
  return guarded([] {
    empty_cpu_cache();
    Py_RETURN_NONE;
  });
}

PyObject* py_set_cpu_cache_limit(PyObject*, PyObject* args) {
  long long bytes = 0;
  if (!PyArg_ParseTuple(args, "L:set_cpu_cache_limit", &bytes)) return nullptr;
  return guarded([&] { return PyLong_FromLongLong(set_cpu_cache_limit(bytes)); });
}

PyMethodDef module_functions[] = {
    {"launch_blocks", py_launch_blocks, METH_VARARGS,
     "launch_blocks(neurons, resident_blocks): blocks of a GPU launch over `neurons` (plif_launch.h)"},
    {"forward_shape", py_forward_shape, METH_VARARGS,
     "forward_shape(T, N, x_step, element_bytes, flags, resident_blocks, x, spikes, v_seq, h_seq): (blocks, "
     "path flag) of a forward launch, the tensors given by address, 0 for none (plif_launch.h)"},
    {"backward_shape", py_backward_shape, METH_VARARGS,
     "backward_shape(N, x_step, element_bytes, flags, resident_blocks, x, grad_spikes, grad_v_seq, grad_x): "
     "(blocks, path flag) of a backward launch, the tensors given by address, 0 for none (plif_launch.h)"},
    {"checkpoint_rows", py_checkpoint_rows, METH_VARARGS,
     "checkpoint_rows(steps): rows of H a forward of `steps` steps keeps in SAVE_CHECKPOINTS mode"},
    {"cpu_cache_bytes", py_cpu_cache_bytes, METH_NOARGS, "bytes of released CPU outputs kept for reuse"},
    {"empty_cpu_cache", py_empty_cpu_cache, METH_NOARGS, "return the CPU output cache to the system"},
    {"set_cpu_cache_limit", py_set_cpu_cache_limit, METH_VARARGS,
     "set_cpu_cache_limit(bytes): cap the CPU output cache, returning the previous cap"},
    {nullptr, nullptr, 0, nullptr},
};

// Steals `value`; false (with the Python error set) where it or the attribute fails.
bool add_attribute(PyObject* module, const char* name, PyObject* value) {
  if (value == nullptr) return false;
  const int status = PyModule_AddObjectRef(module, name, value);
  Py_DECREF(value);
  return status == 0;
}

bool add_attributes(PyObject* module) {
#ifdef PLIF_WITH_CUDA
  PyObject* has_compiled_cuda = Py_True;
#else
  PyObject* has_compiled_cuda = Py_False;
#endif
  PyObject* surrogates = PyTuple_New(kErf + 1);
  if (surrogates == nullptr) return false;
  for (int id = 0; id <= kErf; ++id) {
    PyObject* name = PyUnicode_FromString(kSurrogateNames[id]);
    if (name == nullptr) {
      Py_DECREF(surrogates);
      return false;
    }
    PyTuple_SET_ITEM(surrogates, id, name);
  }
  const char* skipped_because = PLIF_CUDA_SKIPPED_BECAUSE;
  const std::pair<const char*, long> integers[] = {
      {"SAVE_NOTHING", kSaveNothing},          {"SAVE_H", kSaveH},
      {"SAVE_CHECKPOINTS", kSaveCheckpoints},  {"CHECKPOINT_STEPS", kCheckpointSteps},
      {"THREADS_PER_BLOCK", kThreadsPerBlock}, {"FLAG_SOFT_RESET", kFlagSoftReset},
      {"FLAG_DECAY_INPUT", kFlagDecayInput},   {"FLAG_DETACH_RESET", kFlagDetachReset},
      {"FLAG_SPIKING", kFlagSpiking},          {"FLAG_H_CHECKPOINTS", kFlagHCheckpoints},
      {"FLAG_VECTOR_PATH", kFlagVectorPath},
  };
  for (const auto& [name, value] : integers) {
    if (!add_attribute(module, name, PyLong_FromLong(value))) {
      Py_DECREF(surrogates);
      return false;
    }
  }
  Py_INCREF(has_compiled_cuda);
  return add_attribute(module, "SURROGATES", surrogates) &&
         add_attribute(module, "HAS_COMPILED_CUDA_KERNELS", has_compiled_cuda) &&
         add_attribute(module, "TORCH_VERSION", PyUnicode_FromString(PLIF_TORCH_VERSION)) &&
         add_attribute(module, "CUDA_ARCHS", PyUnicode_FromString(PLIF_CUDA_ARCHS)) &&
         add_attribute(module, "CUDA_SKIPPED_BECAUSE",
                       skipped_because[0] == '\0' ? Py_NewRef(Py_None) : PyUnicode_FromString(skipped_because));
}

}  // namespace
}  // namespace plif

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "plif_cuda's compiled ops, their constants and build information", -1,
                                          plif::module_functions};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && !plif::add_attributes(module)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
