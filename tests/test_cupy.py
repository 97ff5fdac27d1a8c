"""The CuPy backend: its NVRTC build (CPU, no GPU needed), its ops' contract, and on a GPU its
results against the reference and, bit for bit, against the compiled extension."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plif_cuda import _nvrtc, backends, cupy_backend, ops, plif_multistep
from plif_cuda.reference import compute_dtype
from plif_cuda.surrogate import SURROGATE_IDS

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def run_doctor(*args):
    return subprocess.run(
        [sys.executable, "-m", "plif_cuda", "doctor", *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=600,
    )


def _nvrtc_missing(name: str | None = None) -> str | None:
    """Why NVRTC (through binding ``name``, or any) cannot compile here, or None. A CPU build of
    torch brings neither cuda-bindings nor the NVRTC library; CI's CUDA build of torch brings both,
    and .ci/run also runs the doctor's compile outside pytest, so there these tests never skip."""
    try:
        _nvrtc.nvrtc_binding(name).version()
    except Exception as error:  # ImportError, or a binding whose NVRTC library does not load
        return f"no NVRTC{'' if name is None else ' through ' + name} here: {error}"
    return None


needs_nvrtc = pytest.mark.skipif(_nvrtc_missing() is not None, reason=str(_nvrtc_missing()))
needs_cuda_bindings = pytest.mark.skipif(
    _nvrtc_missing("cuda-bindings") is not None, reason=str(_nvrtc_missing("cuda-bindings"))
)


# ---- the NVRTC build, checked without a GPU -------------------------------------------------------
@needs_nvrtc
def test_doctor_compiles_every_variant_for_sm_90():
    result = run_doctor("--nvrtc-arch", "sm_90")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--fmad=false" in result.stdout
    ok_lines = [line for line in result.stdout.splitlines() if line.strip().startswith("ok ")]
    assert len(ok_lines) == len(_nvrtc.VARIANTS)
    for dtype in _nvrtc.VARIANTS:
        line = next(line for line in ok_lines if str(dtype) in line.split())
        for name in _nvrtc.program(dtype)[1]:
            assert name in line


@needs_nvrtc
def test_doctor_fails_on_a_bad_arch_and_prints_the_nvrtc_log():
    result = run_doctor("--nvrtc-arch", "sm_1")
    assert result.returncode != 0
    assert "FAILED" in result.stdout
    assert "gpu-architecture" in result.stdout, "the NVRTC log should say what was wrong"


def test_doctor_without_nvrtc_arch_reports_backends():
    result = run_doctor()
    assert result.returncode == 0, result.stderr
    for backend in ("cpu", "cuda", "cupy", "torch"):
        assert re.search(rf"^\s+cuda\s+{backend}\s+(available|unavailable: .+)$", result.stdout, re.MULTILINE)
    assert "compiled extension" in result.stdout


@needs_cuda_bindings
def test_both_nvrtc_bindings_build_the_same_kernels():
    if _nvrtc_missing("cupy") is not None:
        pytest.skip(_nvrtc_missing("cupy"))
    from_cupy = _nvrtc.compile_variant(torch.bfloat16, "sm_80", _nvrtc.nvrtc_binding("cupy"))
    from_bindings = _nvrtc.compile_variant(torch.bfloat16, "sm_80", _nvrtc.nvrtc_binding("cuda-bindings"))
    assert from_cupy.lowered_names == from_bindings.lowered_names
    assert from_cupy.image.rstrip(b"\0") == from_bindings.image.rstrip(b"\0")
    again = _nvrtc.compile_variant(torch.bfloat16, "sm_80", _nvrtc.nvrtc_binding("cuda-bindings"))
    assert again.image == from_bindings.image, "the NVRTC build must be reproducible"


@needs_cuda_bindings
def test_cuda_bindings_compile_leaves_the_process_intact():
    """NVRTC's outputs go into fresh buffers, never into CPython's shared bytes objects (writing
    into `b" " * 1` once broke every later torch.load in the process)."""
    code = (
        "import io, torch\n"
        "from plif_cuda import _nvrtc\n"
        "_nvrtc.compile_variant(torch.bfloat16, 'sm_80', _nvrtc.nvrtc_binding('cuda-bindings'))\n"
        "buffer = io.BytesIO()\n"
        "torch.save(torch.nn.Linear(4, 8).state_dict(), buffer)\n"
        "buffer.seek(0)\n"
        "print(tuple(torch.load(buffer)['weight'].shape))\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(8, 4)"


# Arithmetic that flushes denormals; libdevice's own approximations (ex2.approx.ftz inside expf)
# are written for either mode and do not count.
_FTZ_ARITHMETIC = re.compile(r"\b(add|sub|mul|div|fma|setp\.\w+)\.(rn\.)?ftz\.f32")


@needs_nvrtc
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_build_keeps_denormals(dtype):
    """CuPy's RawModule would add -ftz=true; our build must not flush, as the nvcc build does not."""
    binding = _nvrtc.nvrtc_binding()
    source, names = _nvrtc.program(dtype)
    ptx = binding.compile(source, _nvrtc.compile_options("compute_90"), names, want_cubin=False).image.decode()
    assert not _FTZ_ARITHMETIC.search(ptx)
    if dtype != torch.float64:
        flushed = binding.compile(source, _nvrtc.compile_options("compute_90") + ["-ftz=true"], names,
                                  want_cubin=False).image.decode()
        assert _FTZ_ARITHMETIC.search(flushed), "the check must see flushing when it is asked for"


def test_runtime_arch_prefers_a_cubin_then_the_newest_ptx():
    supported = [75, 80, 86, 89, 90, 100]
    assert _nvrtc.runtime_arch((9, 0), supported) == "sm_90"
    assert _nvrtc.runtime_arch((8, 7), supported) == "compute_86"
    assert _nvrtc.runtime_arch((12, 0), supported) == "compute_100"
    with pytest.raises(RuntimeError, match="compute capability 70"):
        _nvrtc.runtime_arch((7, 0), supported)


def test_kernel_sources_of_an_installed_package_come_first(tmp_path, monkeypatch):
    assert (_nvrtc.kernel_source_dir() / _nvrtc.KERNEL_HEADER).is_file()
    package = tmp_path / "plif_cuda"
    (package / "csrc").mkdir(parents=True)
    (package / "csrc" / _nvrtc.KERNEL_HEADER).write_text("// installed copy\n")
    monkeypatch.setattr(_nvrtc, "_PACKAGE_DIR", package)
    assert _nvrtc.kernel_source_dir() == package / "csrc"
    (package / "csrc" / _nvrtc.KERNEL_HEADER).unlink()
    with pytest.raises(FileNotFoundError, match=_nvrtc.KERNEL_HEADER):
        _nvrtc.kernel_source_dir()


def test_cuda_include_dir_has_the_half_headers():
    folder = _nvrtc.cuda_include_dir()
    assert (folder / "cuda_fp16.h").is_file() and (folder / "cuda_bf16.h").is_file()


# ---- the ops' contract, checked on CPU and meta tensors ----------------------------------------------
@pytest.mark.skipif(not ops.extension_available(), reason="the compiled extension is not built")
@pytest.mark.parametrize("name", ["multistep_forward", "multistep_backward"])
def test_schema_equals_the_compiled_ops(name):
    compiled = str(getattr(torch.ops.plif_cuda, name).default._schema)
    cupy_op = str(getattr(torch.ops.plif_cuda, name + "_cupy").default._schema)
    assert cupy_op == compiled.replace(f"plif_cuda::{name}(", f"plif_cuda::{name}_cupy(", 1)


def test_ops_exist_without_the_compiled_extension():
    """The CuPy backend is for machines that could not build the extension: its ops, fake
    kernels and autograd must not depend on it."""
    script = (
        "import sys; sys.modules['plif_cuda._C'] = None\n"
        "import torch\n"
        "from plif_cuda import cupy_backend, ops\n"
        "assert not ops.extension_available()\n"
        "x = torch.empty(3, 4, device='meta', requires_grad=True)\n"
        "out = cupy_backend.forward_op()(x, torch.empty(1, device='meta'), torch.empty(1, device='meta'),\n"
        "                                1.0, 0.0, False, True, False, 0, 4.0, True, False, True)\n"
        "assert [tuple(t.shape) for t in out] == [(3, 4), (4,), (0,), (3, 4)]\n"
        "out[0].sum().backward()\n"
        "assert x.grad.shape == (3, 4)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_fake_kernel_gives_the_output_shapes():
    x = torch.empty(5, 3, 4, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, device="meta")
    v_init = torch.empty(12, device="meta")
    spikes, v_last, v_seq, h_seq = cupy_backend.forward_op()(
        x, k, v_init, 1.0, 0.0, False, True, False, 0, 4.0, True, True, True)
    assert spikes.shape == x.shape and v_seq.shape == x.shape and v_last.shape == (3, 4)
    assert spikes.dtype == torch.bfloat16 and h_seq.dtype == torch.float32 and h_seq.shape == x.shape


def _forward_case(x=None, k=None, v_init=None, surrogate=0, spiking=True):
    x = torch.zeros(4, 6) if x is None else x
    k = torch.full((1,), 0.5) if k is None else k
    v_init = torch.zeros(6) if v_init is None else v_init
    return x, k, v_init, surrogate, spiking


BAD_FORWARD = {
    "x without time dim": (_forward_case(x=torch.tensor(1.0)), "x must have a time dimension"),
    "x not contiguous": (_forward_case(x=torch.zeros(6, 4).t()), "x must be contiguous"),
    "k dtype": (_forward_case(k=torch.full((1,), 0.5, dtype=torch.float64)), "k must have dtype"),
    "k not contiguous": (_forward_case(k=torch.zeros(12)[::2]), "k must be contiguous"),
    "v_init count": (_forward_case(v_init=torch.zeros(5)), "v_init must hold 1 or 6 values"),
    "surrogate id": (_forward_case(surrogate=7), "surrogate id out of range"),
    "super_spike smooth": (_forward_case(surrogate=SURROGATE_IDS["super_spike"], spiking=False), "super_spike"),
}


@pytest.mark.parametrize("case", BAD_FORWARD, ids=list(BAD_FORWARD))
def test_forward_checks_mirror_the_extension(case):
    (x, k, v_init, surrogate, spiking), message = BAD_FORWARD[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        cupy_backend.check_forward_args(x, k, v_init, surrogate, spiking)
    if ops.extension_available():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.plif_cuda.multistep_forward(x, k, v_init, 1.0, 0.0, False, True, False, surrogate, 1.0,
                                                  spiking, False, False)


def test_forward_checks_refuse_integer_input():
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16, float32 or float64"):
        cupy_backend.check_forward_args(torch.zeros(3, 2, dtype=torch.int32), torch.zeros(1), torch.zeros(1), 0, True)


def _backward_case(**overrides):
    args = dict(grad_spikes=torch.zeros(4, 6), grad_v_last=torch.zeros(6), grad_v_seq=None,
                h_seq=torch.zeros(4, 6), k=torch.full((1,), 0.5), v_init=torch.zeros(1))
    args.update(overrides)
    return args


BAD_BACKWARD = {
    "grad_spikes shape": (_backward_case(grad_spikes=torch.zeros(4, 5)), "grad_spikes must have shape"),
    "grad_v_seq dtype": (_backward_case(grad_v_seq=torch.zeros(4, 6, dtype=torch.float64)),
                         "grad_v_seq must have dtype"),
    "grad_v_last count": (_backward_case(grad_v_last=torch.zeros(5)), "grad_v_last must be a contiguous"),
    "h_seq dtype": (_backward_case(h_seq=torch.zeros(4, 6, dtype=torch.float64)), "h_seq must have dtype"),
    "k count": (_backward_case(k=torch.zeros(2)), "k must hold 1 or 6 values"),
}


@pytest.mark.parametrize("case", BAD_BACKWARD, ids=list(BAD_BACKWARD))
def test_backward_checks_mirror_the_extension(case):
    args, message = BAD_BACKWARD[case]
    positional = [args[n] for n in ("grad_spikes", "grad_v_last", "grad_v_seq", "h_seq", "k", "v_init")]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        cupy_backend.check_backward_args(*positional, torch.float32, 0, True)
    if ops.extension_available():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.plif_cuda.multistep_backward(*positional, torch.float32, 1.0, 0.0, False, True, False, 0,
                                                   4.0, True)


def _kernel_parameter_types(kernel: str, acc) -> list:
    """numpy types of a kernel's parameters, read from its declaration in plif_kernels.cuh."""
    header = (_nvrtc.kernel_source_dir() / _nvrtc.KERNEL_HEADER).read_text()
    declaration = re.search(rf"__global__ void {kernel}\(([^)]*)\)", header).group(1)
    types = []
    for parameter in re.split(r",(?![^<]*>)", declaration):  # not the commas of template arguments
        c_type = parameter.replace("__restrict__", "").strip().rsplit(" ", 1)[0].strip()
        if c_type.endswith("*"):
            types.append(np.uint64)
        else:
            types.append({"index_t": np.int64, "int": np.int32, "acc_t": acc}[c_type])
    return types


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_launch_arguments_follow_the_kernel_signatures(dtype, monkeypatch):
    """The arguments packed for CuPy match the kernels' parameter lists one by one, pointers
    are the tensors' own, and absent outputs are null."""
    launches = []
    monkeypatch.setattr(cupy_backend, "_launch", lambda *call: launches.append(call))
    acc = np.float64 if dtype == torch.float64 else np.float32
    x = torch.randn(4, 3, 5, dtype=dtype)
    k, v_init = torch.full((1,), 0.5, dtype=dtype), torch.zeros(15, dtype=dtype)
    spikes, v_last, v_seq, h_seq = cupy_backend._multistep_forward(
        x, k, v_init, 1.0, -0.5, False, True, True, SURROGATE_IDS["erf"], 2.0, True, False, True)
    (direction, _, launched_dtype, neurons, args), = launches
    assert (direction, launched_dtype, neurons) == ("forward", dtype, 15)
    assert [type(a) for a in args] == _kernel_parameter_types("plif_forward_kernel", acc)
    assert [int(a) for a in args[:7]] == [x.data_ptr(), k.data_ptr(), v_init.data_ptr(), spikes.data_ptr(),
                                          v_last.data_ptr(), 0, h_seq.data_ptr()]
    assert [float(a) for a in args[7:14]] == [0, 1, 4, 15, 1.0, -0.5, 2.0]
    assert int(args[14]) == SURROGATE_IDS["erf"] and int(args[15]) == 2 | 4 | 8

    launches.clear()
    grad_spikes = torch.randn_like(x)
    cupy_backend._multistep_backward(grad_spikes, None, None, h_seq, k, v_init, dtype, 1.0, -0.5, True, False,
                                     False, 0, 4.0, False)
    (direction, _, _, _, args), = launches
    assert direction == "backward"
    assert [type(a) for a in args] == _kernel_parameter_types("plif_backward_kernel", acc)
    assert [int(a) for a in args[:3]] == [grad_spikes.data_ptr(), 0, 0]
    assert float(args[14]) == 0.0, "soft reset passes v_reset = 0, as the extension does"
    assert int(args[17]) == 1


def test_unavailable_reasons_say_why():
    assert "CUDA tensors" in backends.unavailable_reason("cupy", torch.device("cpu"))
    reason = cupy_backend.unavailable_reason()
    if not torch.cuda.is_available():
        assert reason is not None and ("CUDA device" in reason or "cupy" in reason)


# ---- on a GPU -------------------------------------------------------------------------------------------
needs_cupy_gpu = pytest.mark.skipif(
    cupy_backend.unavailable_reason() is not None, reason=f"cupy backend: {cupy_backend.unavailable_reason()}"
)
GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

OPTION_SETS = {
    "hard": dict(v_reset=0.0),
    "hard-detach-nodecay": dict(v_reset=-0.5, detach_reset=True, decay_input=False),
    "soft": dict(v_reset=None, store_v_seq=True),
    "soft-detach": dict(v_reset=None, detach_reset=True, decay_input=False, store_v_seq=True),
    "smooth": dict(spiking=False, store_v_seq=True),
}


def _inputs(shape, dtype, w_shape, device="cuda", seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5 + 0.4).to(device=device, dtype=dtype)
    acc = compute_dtype(dtype)
    w = (torch.randn(w_shape, generator=generator, dtype=torch.float64) * 0.5).to(device=device, dtype=acc)
    v_init = (torch.rand(shape[1:], generator=generator, dtype=torch.float64) * 0.5).to(device=device, dtype=acc)
    return x, w, v_init


def _run(backend, x, w, v_init, **options):
    """Outputs and the gradients of a random-weighted sum of every output."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, v_init)]
    spikes, v_last, v_seq = plif_multistep(*leaves, backend=backend, **options)
    generator = torch.Generator().manual_seed(99)
    loss = 0
    for out in (spikes, v_last, v_seq):
        if out is not None:
            weights = torch.randn(out.shape, generator=generator, dtype=torch.float64)
            loss = loss + (out * weights.to(device=out.device, dtype=out.dtype)).sum()
    loss.backward()
    return (spikes, v_last, v_seq), [leaf.grad for leaf in leaves]


@needs_cupy_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_SETS, ids=list(OPTION_SETS))
@pytest.mark.parametrize("surrogate", sorted(SURROGATE_IDS))
@pytest.mark.parametrize("w_shape", [(), (3, 1), (3, 7)], ids=["layer", "channel", "neuron"])
def test_matches_the_reference(dtype, options, surrogate, w_shape):
    options = dict(OPTION_SETS[options], surrogate=surrogate)
    if not options.get("spiking", True) and surrogate == "super_spike":
        pytest.skip("super_spike has no smooth primitive")
    x, w, v_init = _inputs((9, 3, 7), dtype, w_shape)
    (outs, grads), (ref_outs, ref_grads) = _run("cupy", x, w, v_init, **options), _run("torch", x, w, v_init, **options)
    tolerance = GRAD_TOLERANCE[dtype]
    if options.get("spiking", True):
        assert torch.equal(outs[0], ref_outs[0]), "spikes differ from the reference"
    for out, ref in zip(outs, ref_outs):
        assert (out is None) == (ref is None)
        if out is not None:
            assert out.dtype == dtype and out.device == x.device
            torch.testing.assert_close(out, ref, rtol=tolerance, atol=tolerance)
    w_terms = x.numel() // max(1, w.numel())
    for grad, ref, terms in zip(grads, ref_grads, (1, w_terms, x.shape[0])):
        torch.testing.assert_close(grad.double(), ref.double(), rtol=tolerance, atol=tolerance * terms ** 0.5)


@needs_cupy_gpu
@pytest.mark.parametrize("neurons", [1, 3, 257, 1001])
def test_odd_neuron_counts_in_fp16(neurons):
    x, w, v_init = _inputs((5, neurons), torch.float16, ())
    (outs, grads), (ref_outs, ref_grads) = _run("cupy", x, w, v_init), _run("torch", x, w, v_init)
    assert torch.equal(outs[0], ref_outs[0])
    torch.testing.assert_close(outs[1], ref_outs[1], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=2e-3, atol=2e-3)


def _op_args(dtype, surrogate, options, neurons_k):
    x, _, _ = _inputs((11, 5, 9), dtype, ())
    acc = compute_dtype(dtype)
    k = torch.rand(neurons_k, device="cuda", dtype=acc) * 0.8 + 0.1
    v_init = torch.rand(45, device="cuda", dtype=acc) - 0.2
    v_reset = options.get("v_reset", 0.0)
    scalars = (1.0, 0.0 if v_reset is None else v_reset, v_reset is None, options.get("decay_input", True),
               options.get("detach_reset", False), SURROGATE_IDS[surrogate], 1.7, options.get("spiking", True))
    return x, k, v_init, scalars


@needs_cupy_gpu
@pytest.mark.skipif(not ops.extension_has_cuda(), reason="the compiled extension has no CUDA kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_SETS, ids=list(OPTION_SETS))
@pytest.mark.parametrize("surrogate", sorted(SURROGATE_IDS))
@pytest.mark.parametrize("neurons_k", [1, 45], ids=["shared-k", "per-neuron-k"])
def test_bit_equal_to_the_compiled_extension(dtype, options, surrogate, neurons_k):
    options = OPTION_SETS[options]
    if not options.get("spiking", True) and surrogate == "super_spike":
        pytest.skip("super_spike has no smooth primitive")
    x, k, v_init, scalars = _op_args(dtype, surrogate, options, neurons_k)
    ours = torch.ops.plif_cuda.multistep_forward_cupy(x, k, v_init, *scalars, True, True)
    theirs = torch.ops.plif_cuda.multistep_forward(x, k, v_init, *scalars, True, True)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    grads = [torch.randn_like(x), torch.randn_like(x[0]), torch.randn_like(x)]
    ours = torch.ops.plif_cuda.multistep_backward_cupy(*grads, ours[3], k, v_init, dtype, *scalars)
    theirs = torch.ops.plif_cuda.multistep_backward(*grads, theirs[3], k, v_init, dtype, *scalars)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@needs_cupy_gpu
def test_gradients_are_deterministic():
    x, w, v_init = _inputs((16, 64, 65), torch.float32, ())
    first = _run("cupy", x, w, v_init, store_v_seq=True)[1]
    second = _run("cupy", x, w, v_init, store_v_seq=True)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_cupy_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_tensors_device_and_keeps_the_current_device():
    torch.cuda.set_device(0)
    x, w, v_init = _inputs((6, 40), torch.float32, (), device="cuda:1")
    (outs, grads) = _run("cupy", x, w, v_init)
    assert torch.cuda.current_device() == 0
    assert outs[0].device == torch.device("cuda:1")
    (ref_outs, ref_grads) = _run("cupy", *(t.to("cuda:0") for t in (x, w, v_init)))
    assert torch.cuda.current_device() == 0
    assert torch.equal(outs[0].cpu(), ref_outs[0].cpu()) and torch.equal(grads[0].cpu(), ref_grads[0].cpu())


@needs_cupy_gpu
def test_runs_on_the_current_side_stream():
    x, w, v_init = _inputs((8, 1 << 16), torch.float32, ())
    x_doubled = x * 2  # kept alive, so that the allocator cannot hand its memory to x_late below
    expected = plif_multistep(x_doubled, w, v_init, backend="cupy")[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The input is written on the side stream behind a long sleep: a kernel launched on any
        # other stream would read it before it is ready.
        torch.cuda._sleep(50_000_000)
        x_late = x * 2
        spikes = plif_multistep(x_late, w, v_init, backend="cupy")[0]
    side.synchronize()
    assert torch.equal(spikes, expected)


@needs_cupy_gpu
def test_empty_inputs():
    x = torch.zeros(0, 3, device="cuda")
    k, v_init = torch.full((1,), 0.5, device="cuda"), torch.full((3,), 0.25, device="cuda")
    _, v_last, _, _ = torch.ops.plif_cuda.multistep_forward_cupy(x, k, v_init, 1.0, 0.0, False, True, False, 0,
                                                                 4.0, True, False, True)
    assert torch.equal(v_last, v_init)
    spikes, v_last, _, _ = torch.ops.plif_cuda.multistep_forward_cupy(
        torch.zeros(4, 0, device="cuda"), k, torch.zeros(1, device="cuda"), 1.0, 0.0, False, True, False, 0, 4.0,
        True, False, True)
    assert spikes.shape == (4, 0) and v_last.shape == (0,)


@needs_cupy_gpu
def test_opcheck():
    x, k, v_init, scalars = _op_args(torch.float32, "atan", {}, 45)
    torch.library.opcheck(torch.ops.plif_cuda.multistep_forward_cupy.default, (x, k, v_init, *scalars, True, True))
