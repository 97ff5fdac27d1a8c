// The binding layer: op schemas, argument checks, output allocation, and dispatch to the
// CPU or CUDA kernels. All checks live here; the kernels trust their parameters. CUDA tensors
// reach the same kernels through one of two launchers (the ops' `launcher` argument): the
// kernels nvcc compiled into this library (plif_cuda.cu, built with PLIF_WITH_CUDA), or the
// same kernels compiled at run time through NVRTC and launched by plif_cuda/cupy_backend.py,
// which implements the nvrtc_launch_* ops below. The CUDA registration needs no CUDA header,
// so a library built without a toolkit still serves CUDA tensors through the NVRTC launcher.
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

#include <tuple>
#include <type_traits>
#include <vector>

#include "plif_cpu_buffers.h"
#include "plif_launch.h"

extern "C" {
// A Python module with nothing in it: importing plif_cuda._C loads the library, whose static
// initialisers register the ops below.
// Its one attribute, HAS_COMPILED_CUDA_KERNELS, says whether the nvcc launcher exists.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef PLIF_WITH_CUDA
  constexpr long kHasCompiledCudaKernels = 1;
#else
  constexpr long kHasCompiledCudaKernels = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "HAS_COMPILED_CUDA_KERNELS", kHasCompiledCudaKernels) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

namespace plif {
namespace {

using at::Tensor;

at::ScalarType compute_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

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

template <typename acc_t>
Options<acc_t> make_options(double v_threshold, double v_reset, bool soft_reset, bool decay_input,
                            bool detach_reset, int64_t surrogate, double alpha, bool spiking, bool h_checkpoints) {
  TORCH_CHECK(surrogate >= kSigmoid && surrogate <= kErf, "surrogate id out of range: ", surrogate);
  TORCH_CHECK(spiking || surrogate != kSuperSpike, "super_spike has no primitive: spiking=False is unavailable");
  Options<acc_t> o;
  o.v_threshold = static_cast<acc_t>(v_threshold);
  o.v_reset = soft_reset ? acc_t(0) : static_cast<acc_t>(v_reset);
  o.alpha = static_cast<acc_t>(alpha);
  o.surrogate = static_cast<int>(surrogate);
  o.soft_reset = soft_reset;
  o.decay_input = decay_input;
  o.detach_reset = detach_reset;
  o.spiking = spiking;
  o.h_checkpoints = h_checkpoints;
  return o;
}

// Every output, the [N] ones included (at 2^20 neurons v_last, grad_k and grad_v_init are
// 4 MiB each, a thousand fresh-page faults apiece): on CPU from the page-resident cache
// (plif_cpu_buffers.h), which passes small requests on to torch's allocator.
Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? empty_cpu_output(sizes, options) : at::empty(sizes, options);
}

// The CUDA backward recomputes H from x and the checkpoints (save=2), the one form of the saved
// state that gives an exact dL/dk; the CPU kernel also runs from every H.
void check_cuda_backward_has_checkpoints(const c10::Device& device, bool checkpoints) {
  TORCH_CHECK(checkpoints || device.is_cpu(),
              "the CUDA backward needs x and the checkpoint rows of H (a forward with save=2)");
}

// The shape of H's checkpoint rows for x [T, *S] (kSaveCheckpoints): [(T-1)/K, *S].
std::vector<int64_t> checkpoint_sizes(const Tensor& x) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes[0] = checkpoint_rows(sizes[0]);
  return sizes;
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// The ops' `launcher` argument; plif_cuda/ops.py names the same values.
enum Launcher : int64_t { kCompiledLauncher = 0, kNvrtcLauncher = 1 };

void check_launcher(int64_t launcher) {
  TORCH_CHECK(launcher == kCompiledLauncher || launcher == kNvrtcLauncher,
              "launcher must be 0 (compiled kernels) or 1 (NVRTC), got ", launcher);
}

// A kernel argument as the NVRTC launcher op takes it: a tensor where the kernel gets a
// pointer (None for a null one, as ptr_or_null decides), then the scalar block.
c10::IValue pointer_argument(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? c10::IValue(t) : c10::IValue();
}
c10::IValue pointer_argument(const std::optional<Tensor>& t) {
  return t ? pointer_argument(*t) : c10::IValue();
}

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
  TORCH_CHECK(false, "plif_cuda was built without its compiled CUDA kernels; backend='cupy' runs them compiled at run time");
}
#endif

// Dispatch over the four supported (input, compute) type pairs.
template <typename Fn>
void dispatch_types(at::ScalarType t, Fn fn) {
  switch (t) {
    case at::kFloat: fn(float{}, float{}); break;
    case at::kDouble: fn(double{}, double{}); break;
    case at::kHalf: fn(c10::Half{}, float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}, float{}); break;
    default: TORCH_CHECK(false, "x must be float16, bfloat16, float32 or float64, got ", t);
  }
}

// `values` ([N]) as `count` values: themselves (count N), or their sum in float64 (count 1),
// in an order fixed by N: a CUDA reduction's order depends only on the shape; on CPU (reached
// only without a time step) a plain loop, since torch's CPU sum splits by thread count.
Tensor sum_to_count(const Tensor& values, int64_t count) {
  if (count != 1 || values.numel() == 1) return values;
  if (values.is_cuda()) return at::sum(values, at::kDouble).to(values.scalar_type());
  const Tensor doubles = values.to(at::kDouble).contiguous();
  const double* data = doubles.data_ptr<double>();
  double total = 0.0;
  for (int64_t i = 0; i < doubles.numel(); ++i) total += data[i];
  return at::scalar_tensor(total, values.options());
}

// The row of a GPU backward's per-block partial sums for a parameter that is one value (shared),
// else an empty tensor (null): one double per block of a grid of one thread per neuron, the most
// blocks a launch takes (plif_launch.h).
Tensor gpu_partials(const Tensor& like, bool shared, int64_t neurons) {
  if (like.is_cpu() || !shared) return at::empty({0}, like.options().dtype(at::kDouble));
  return at::empty({launch_blocks(neurons, neurons)}, like.options().dtype(at::kDouble));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> multistep_forward(
    const Tensor& x, const Tensor& k, const Tensor& v_init, double v_threshold, double v_reset,
    bool soft_reset, bool decay_input, bool detach_reset, int64_t surrogate, double alpha, bool spiking,
    bool store_v_seq, int64_t save, int64_t launcher) {
  TORCH_CHECK(x.dim() >= 1, "x must have a time dimension");
  check_steps_contiguous(x);
  const int64_t T = x.size(0);
  const int64_t N = c10::multiply_integers(x.sizes().slice(1));
  check_per_neuron(k, "k", x.device(), x.scalar_type(), N);
  check_per_neuron(v_init, "v_init", x.device(), x.scalar_type(), N);
  TORCH_CHECK(save == kSaveNothing || save == kSaveH || save == kSaveCheckpoints,
              "save must be 0 (nothing), 1 (every H) or 2 (checkpoints), got ", save);
  check_launcher(launcher);
  const auto acc_type = compute_type_of(x.scalar_type());

  Tensor spikes = empty_output(x.sizes(), x.options());
  Tensor v_last = empty_output(x.sizes().slice(1), x.options().dtype(acc_type));
  Tensor v_seq = store_v_seq ? empty_output(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor h_seq = save == kSaveH ? empty_output(x.sizes(), x.options().dtype(acc_type))
                 : save == kSaveCheckpoints ? empty_output(checkpoint_sizes(x), x.options().dtype(acc_type))
                                            : at::empty({0}, x.options().dtype(acc_type));
  if (N == 0) return {spikes, v_last, v_seq, h_seq};
  if (T == 0) {
    v_last.view({N}).copy_(v_init.reshape({-1}).expand({N}));
    return {spikes, v_last, v_seq, h_seq};
  }

  dispatch_types(x.scalar_type(), [&](auto in_v, auto acc_v) {
    using in_t = decltype(in_v);
    using acc_t = decltype(acc_v);
    ForwardParams<in_t, acc_t> p;
    p.x = x.data_ptr<in_t>();
    p.k = k.data_ptr<acc_t>();
    p.v_init = v_init.data_ptr<acc_t>();
    p.spikes = spikes.data_ptr<in_t>();
    p.v_last = v_last.data_ptr<acc_t>();
    p.v_seq = ptr_or_null<in_t>(v_seq);
    p.h_seq = ptr_or_null<acc_t>(h_seq);
    p.k_stride = k.numel() == 1 ? 0 : 1;
    p.v_init_stride = v_init.numel() == 1 ? 0 : 1;
    p.T = T;
    p.N = N;
    p.x_step = step_stride(x, N);
    p.opts = make_options<acc_t>(v_threshold, v_reset, soft_reset, decay_input, detach_reset, surrogate, alpha, spiking,
                                 save == kSaveCheckpoints);
    if (x.is_cpu()) {
      forward_cpu(p);
    } else {
      const c10::DeviceGuard guard(x.device());
      if (launcher == kNvrtcLauncher) {
        launch_nvrtc("plif_cuda::nvrtc_launch_forward",
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

std::tuple<Tensor, Tensor, Tensor> multistep_backward(
    const std::optional<Tensor>& grad_spikes, const std::optional<Tensor>& grad_v_last,
    const std::optional<Tensor>& grad_v_seq, const Tensor& h_seq, const std::optional<Tensor>& x, const Tensor& k,
    const Tensor& v_init, at::ScalarType x_dtype, double v_threshold, double v_reset, bool soft_reset,
    bool decay_input, bool detach_reset, int64_t surrogate, double alpha, bool spiking, int64_t launcher) {
  TORCH_CHECK(h_seq.dim() >= 1, "h_seq must have a time dimension");
  TORCH_CHECK(h_seq.scalar_type() == compute_type_of(x_dtype), "h_seq must have dtype ", compute_type_of(x_dtype));
  TORCH_CHECK(h_seq.is_contiguous(), "h_seq must be contiguous");
  // With x (kSaveCheckpoints), h_seq holds H's checkpoint rows and x gives the shape.
  const Tensor& shape_source = x ? *x : h_seq;
  if (x) {
    TORCH_CHECK(x->dim() >= 1, "x must have a time dimension");
    TORCH_CHECK(x->device() == h_seq.device(), "x is on ", x->device(), " but h_seq is on ", h_seq.device());
    TORCH_CHECK(x->scalar_type() == x_dtype, "x must have dtype ", x_dtype, ", got ", x->scalar_type());
    check_steps_contiguous(*x);
    const std::vector<int64_t> expected = checkpoint_sizes(*x);
    TORCH_CHECK(h_seq.sizes() == at::IntArrayRef(expected), "h_seq must hold the checkpoint rows of x: shape ",
                at::IntArrayRef(expected), ", got ", h_seq.sizes());
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
                "grad_v_last must be a contiguous ", h_seq.scalar_type(), " tensor of ", N, " values on ", h_seq.device());
  }
  check_launcher(launcher);
  check_cuda_backward_has_checkpoints(h_seq.device(), x.has_value());

  // dL/dk and dL/dv_init hold as many values as k and v_init: one (the sum over the neurons)
  // or one per neuron.
  Tensor grad_x = empty_output(shape_source.sizes(), h_seq.options().dtype(x_dtype));
  Tensor grad_k = empty_output({k.numel()}, h_seq.options());
  Tensor grad_v_init = empty_output({v_init.numel()}, h_seq.options());
  if (N == 0 || T == 0) {
    // No step: nothing reaches k, and dL/dv_init is dL/dV[T-1] (zero for N = 0).
    grad_k.zero_();
    if (grad_v_last && N > 0) grad_v_init.copy_(sum_to_count(grad_v_last->reshape({N}), v_init.numel()));
    else grad_v_init.zero_();
    return {grad_x, grad_k, grad_v_init};
  }
  // Where k (v_init) is one value, the GPU kernels sum its shares per thread block into a row of
  // partials (one per block of the widest grid), which the launcher then finishes.
  const Tensor grad_k_partials = gpu_partials(h_seq, k.numel() == 1, N);
  const Tensor grad_v_init_partials = gpu_partials(h_seq, v_init.numel() == 1, N);

  dispatch_types(x_dtype, [&](auto in_v, auto acc_v) {
    using in_t = decltype(in_v);
    using acc_t = decltype(acc_v);
    BackwardParams<in_t, acc_t> p;
    p.grad_spikes = grad_spikes ? ptr_or_null<in_t>(*grad_spikes) : nullptr;
    p.grad_v_last = grad_v_last ? ptr_or_null<acc_t>(*grad_v_last) : nullptr;
    p.grad_v_seq = grad_v_seq ? ptr_or_null<in_t>(*grad_v_seq) : nullptr;
    p.h_seq = ptr_or_null<acc_t>(h_seq);
    p.x = x ? x->data_ptr<in_t>() : nullptr;
    p.k = k.data_ptr<acc_t>();
    p.v_init = v_init.data_ptr<acc_t>();
    p.grad_x = grad_x.data_ptr<in_t>();
    p.grad_k = grad_k.data_ptr<acc_t>();
    p.grad_v_init = grad_v_init.data_ptr<acc_t>();
    p.grad_k_partials = ptr_or_null<double>(grad_k_partials);
    p.grad_v_init_partials = ptr_or_null<double>(grad_v_init_partials);
    p.k_stride = k.numel() == 1 ? 0 : 1;
    p.v_init_stride = v_init.numel() == 1 ? 0 : 1;
    p.T = T;
    p.N = N;
    p.x_step = x ? step_stride(*x, N) : N;
    p.opts = make_options<acc_t>(v_threshold, v_reset, soft_reset, decay_input, detach_reset, surrogate, alpha, spiking,
                                 x.has_value());
    if (h_seq.is_cpu()) {
      backward_cpu(p);
    } else {
      const c10::DeviceGuard guard(h_seq.device());
      if (launcher == kNvrtcLauncher) {
        launch_nvrtc("plif_cuda::nvrtc_launch_backward",
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

}  // namespace

TORCH_LIBRARY(plif_cuda, m) {
  m.def(
      "multistep_forward(Tensor x, Tensor k, Tensor v_init, float v_threshold, float v_reset, "
      "bool soft_reset, bool decay_input, bool detach_reset, int surrogate, float alpha, bool spiking, "
      "bool store_v_seq, int save, int launcher=0) -> (Tensor spikes, Tensor v_last, Tensor v_seq, Tensor h_seq)");
  m.def(
      "multistep_backward(Tensor? grad_spikes, Tensor? grad_v_last, Tensor? grad_v_seq, Tensor h_seq, Tensor? x, "
      "Tensor k, Tensor v_init, ScalarType x_dtype, float v_threshold, float v_reset, bool soft_reset, "
      "bool decay_input, bool detach_reset, int surrogate, float alpha, bool spiking, int launcher=0) "
      "-> (Tensor grad_x, Tensor grad_k, Tensor grad_v_init)");
  // The NVRTC launcher (plif_cuda/cupy_backend.py implements them for CUDA tensors): the
  // kernels' arguments in their order, tensors for pointers (None: null), then the scalar
  // block of with_scalar_arguments (plif_params.h).
  m.def(
      "nvrtc_launch_forward(Tensor x, Tensor k, Tensor v_init, Tensor(a!) spikes, Tensor(b!) v_last, "
      "Tensor(c!)? v_seq, Tensor(d!)? h_seq, int k_stride, int v_init_stride, int T, int N, int x_step, "
      "float v_threshold, float v_reset, float alpha, int surrogate, int flags) -> ()");
  m.def(
      "nvrtc_launch_backward(Tensor? grad_spikes, Tensor? grad_v_last, Tensor? grad_v_seq, Tensor? h_seq, "
      "Tensor? x, Tensor k, Tensor v_init, Tensor(a!) grad_x, Tensor(b!) grad_k, Tensor(c!) grad_v_init, "
      "Tensor(d!)? grad_k_partials, Tensor(e!)? grad_v_init_partials, int k_stride, "
      "int v_init_stride, int T, int N, int x_step, float v_threshold, float v_reset, float alpha, int surrogate, "
      "int flags) -> ()");
  // The launch shape of both GPU launchers (plif_launch.h), for the NVRTC one.
  m.def("threads_per_block() -> int", []() -> int64_t { return kThreadsPerBlock; });
  m.def("launch_blocks(int neurons, int resident_blocks) -> int",
        [](int64_t neurons, int64_t resident_blocks) -> int64_t { return launch_blocks(neurons, resident_blocks); });
  // The CPU op's buffer cache (plif_cpu_buffers.h).
  m.def("cpu_cache_bytes() -> int", &cpu_cache_bytes);
  m.def("empty_cpu_cache() -> ()", &empty_cpu_cache);
  m.def("set_cpu_cache_limit(int bytes) -> int", &set_cpu_cache_limit);
}

TORCH_LIBRARY_IMPL(plif_cuda, CPU, m) {
  m.impl("multistep_forward", &multistep_forward);
  m.impl("multistep_backward", &multistep_backward);
}

TORCH_LIBRARY_IMPL(plif_cuda, CUDA, m) {
  m.impl("multistep_forward", &multistep_forward);
  m.impl("multistep_backward", &multistep_backward);
}

}  // namespace plif
