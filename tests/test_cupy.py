"""The CuPy backend, checked without a GPU: its NVRTC build of every kernel variant, and the
NVRTC launcher behind the one op (its arguments are the kernel's). On a GPU, tests/test_cuda.py
runs it against the reference and, bit for bit, against the compiled kernels."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plif_cuda import _C, _nvrtc, backends, cupy_backend

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def run_doctor(*args):
    return subprocess.run(
        [sys.executable, "-m", "plif_cuda", "doctor", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
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
        flushed = binding.compile(
            source, _nvrtc.compile_options("compute_90") + ["-ftz=true"], names, want_cubin=False
        ).image.decode()
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


# ---- the NVRTC launcher behind the one op, checked on CPU -----------------------------------------------
def _kernel_parameters(kernel: str) -> list[tuple[str, str]]:
    """(C type, name) of a kernel's parameters, read from its declaration in plif_kernels.cuh."""
    header = (_nvrtc.kernel_source_dir() / _nvrtc.KERNEL_HEADER).read_text()
    declaration = re.search(rf"__global__ void (?:__launch_bounds__\([^)]*\)\s+)?{kernel}\(([^)]*)\)", header).group(1)
    parameters = []
    for parameter in re.split(r",(?![^<]*>)", declaration):  # not the commas of template arguments
        c_type, name = parameter.replace("__restrict__", "").strip().rsplit(" ", 1)
        parameters.append((c_type.strip(), name))
    return parameters


def _numpy_type(c_type: str, acc):
    return np.uint64 if c_type.endswith("*") else {"index_t": np.int64, "int": np.int32, "acc_t": acc}[c_type]


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_nvrtc_launcher_op_takes_the_kernel_parameters(direction):
    """plif_cuda_internal::nvrtc_launch_* (declared by the extension, run by cupy_backend) take the
    kernel's parameters by name and in order: a tensor for each pointer, the scalar block after."""
    schema = getattr(torch.ops.plif_cuda_internal, f"nvrtc_launch_{direction}").default._schema
    parameters = _kernel_parameters(f"plif_{direction}_kernel")
    assert [argument.name for argument in schema.arguments] == [name for _, name in parameters]
    for argument, (c_type, name) in zip(schema.arguments, parameters):
        expected = "Tensor" if c_type.endswith("*") else {"index_t": "int", "int": "int", "acc_t": "float"}[c_type]
        type_name = str(argument.type)
        assert type_name in (expected, f"Optional[{expected}]"), name


class _StreamOfOldTorch:
    """What torch < 2.10 streams offer CuPy: the pointer and device, no __cuda_stream__ protocol."""

    def __init__(self, cuda_stream: int, device_index: int):
        self.cuda_stream, self.device_index = cuda_stream, device_index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nvrtc_launch_arguments_follow_the_kernel_signatures(dtype, monkeypatch):
    """What the NVRTC launcher hands CuPy matches the kernel's parameter list one by one: the
    tensors' own pointers, null for None, and the scalar block in the kernel's C types."""
    launches, streams = [], []

    def record(grid, block, args, stream):
        launches.append((grid, block, args))
        streams.append(stream)

    monkeypatch.setattr(
        cupy_backend, "_kernel_pair", lambda device, dtype: {d: (record, 7) for d in ("forward", "backward")}
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _StreamOfOldTorch(0xC0FFEE, 0))
    acc = np.float64 if dtype == torch.float64 else np.float32
    x, spikes, h_seq = (torch.randn(4, 3, 5, dtype=dtype) for _ in range(3))
    k, v_init, v_last = torch.full((1,), 0.5, dtype=dtype), torch.zeros(15, dtype=dtype), torch.zeros(15, dtype=dtype)
    flags = _C.FLAG_DECAY_INPUT | _C.FLAG_DETACH_RESET | _C.FLAG_SPIKING
    scalars = (0, 1, 4, 3000, 0, 1.0, -0.5, 2.0, _C.SURROGATES.index("erf"), flags)
    cupy_backend._launch_forward(x, k, v_init, spikes, v_last, None, h_seq, *scalars)
    ((grid, block, args),) = launches
    # The vector path (csrc/plif_launch.h forward_shape): 3000 / lanes threads (750 float32, 1500
    # float64) keep 16-byte words of 4 steps in flight, more than 1792 resident threads one neuron each.
    vector_blocks = {torch.float32: 3, torch.float64: 6}[dtype]
    assert (grid, block) == ((vector_blocks,), (256,)), "3000 neurons at 16 bytes per thread and step"
    assert [type(a) for a in args] == [_numpy_type(c, acc) for c, _ in _kernel_parameters("plif_forward_kernel")]
    assert [int(a) for a in args[:7]] == [
        x.data_ptr(),
        k.data_ptr(),
        v_init.data_ptr(),
        spikes.data_ptr(),
        v_last.data_ptr(),
        0,
        h_seq.data_ptr(),
    ]
    assert [float(a) for a in args[7:]] == [float(s) for s in scalars[:-1]] + [float(flags | _C.FLAG_VECTOR_PATH)]
    (stream,) = streams
    assert stream.ptr == 0xC0FFEE, "CuPy launches on torch's current stream"

    # The smooth mode runs one neuron per thread: 12 blocks wanted, capped at the 7 resident ones.
    launches.clear()
    smooth = (*scalars[:-1], flags & ~_C.FLAG_SPIKING)
    cupy_backend._launch_forward(x, k, v_init, spikes, v_last, None, h_seq, *smooth)
    ((grid, _, args),) = launches
    assert grid == (7,) and [float(a) for a in args[7:]] == [float(s) for s in smooth]

    launches.clear()
    grad_x, grad_k = torch.empty_like(x), torch.empty(15, dtype=dtype)
    cupy_backend._launch_backward(
        x, None, None, h_seq, None, k, v_init, grad_x, grad_k, v_last, None, None, 0, 1, 4, 15, 15, 1.0, 0.0, 4.0, 0, 1
    )
    ((grid, _, args),) = launches
    assert grid == (1,)
    assert [type(a) for a in args] == [_numpy_type(c, acc) for c, _ in _kernel_parameters("plif_backward_kernel")]
    assert [int(a) for a in args[:3]] == [x.data_ptr(), 0, 0]


def test_shared_parameters_launch_the_finishing_sum(monkeypatch):
    """A shared k's and v_init's per-block partials are summed by one thread after the backward,
    with its grid's block count, as the nvcc launcher does; per-neuron ones launch nothing more."""
    launched = []
    monkeypatch.setattr(
        cupy_backend,
        "_kernel_pair",
        lambda device, dtype: {
            d: (lambda grid, block, args, stream, d=d: launched.append((d, grid, block, args)), 7)
            for d in _nvrtc.kernel_names(dtype)
        },
    )
    monkeypatch.setattr(cupy_backend, "_cupy_stream", lambda stream: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    x = torch.randn(9, 5).bfloat16()
    h_seq, k, grad_k, grad_v_init = torch.zeros(1, 5), torch.full((1,), 0.5), torch.zeros(1), torch.zeros(1)
    partials = torch.zeros(2, 7, dtype=torch.float64)
    scalars = (0, 0, 9, 5, 5, 1.0, 0.0, 4.0, 0, _C.FLAG_SPIKING | _C.FLAG_H_CHECKPOINTS)
    cupy_backend._launch_backward(x, None, None, h_seq, x, k, k, x, grad_k, grad_v_init, *partials, *scalars)
    (backward, finish) = launched
    assert backward[0] == "backward" and finish[:3] == ("finish_shares", (1,), (1,))
    finish_parameters = _kernel_parameters("plif_finish_shares_kernel")
    assert [type(a) for a in finish[3]] == [_numpy_type(c, np.float32) for c, _ in finish_parameters]
    pointers = [partials[0].data_ptr(), partials[1].data_ptr(), grad_k.data_ptr(), grad_v_init.data_ptr()]
    assert [int(a) for a in finish[3]] == [*pointers, 1], "5 neurons: one block of partials"
    launched.clear()
    cupy_backend._launch_backward(x, None, None, h_seq, x, k, k, x, grad_k, grad_v_init, None, None, *scalars)
    assert [d for d, *_ in launched] == ["backward"]


def test_half_backward_launches_its_lanes_path(monkeypatch):
    """The half types' backward takes two neurons per thread where N is even and the tensors on
    4-byte words (csrc/plif_launch.h backward_shape), as the nvcc launcher does: N / 2 threads and
    the path flag; an odd N one neuron per thread."""
    launched = []
    monkeypatch.setattr(
        cupy_backend,
        "_kernel_pair",
        lambda device, dtype: {
            d: (lambda grid, block, args, stream: launched.append((grid, args)), 7) for d in ("backward",)
        },
    )
    monkeypatch.setattr(cupy_backend, "_cupy_stream", lambda stream: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    flags = _C.FLAG_SPIKING | _C.FLAG_H_CHECKPOINTS
    for neurons, grid, path in ((1000, 2, _C.FLAG_VECTOR_PATH), (999, 4, 0)):
        x = torch.randn(9, neurons).half()
        h_seq, k, grad = torch.zeros(1, neurons), torch.full((1,), 0.5), torch.zeros(neurons)
        scalars = (0, 0, 9, neurons, neurons, 1.0, 0.0, 4.0, 0, flags)
        cupy_backend._launch_backward(x, None, None, h_seq, x, k, k, x, grad, grad, None, None, *scalars)
        ((launched_grid, args),) = launched
        assert launched_grid == (grid,) and int(args[-1]) == flags | path, neurons
        launched.clear()


def test_cuda_tensors_reach_the_op_in_every_build():
    """The ops' CUDA registration does not depend on the compiled CUDA kernels: an extension
    built without a toolkit serves CUDA tensors through the NVRTC launcher's ops."""
    for name in ("multistep_forward", "multistep_backward", "multistep_forward_nvrtc", "multistep_backward_nvrtc"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"plif_cuda::{name}", "CUDA")


NEURON = dict(v_threshold=1.0, v_reset=0.0, decay_input=True, detach_reset=False, surrogate="sigmoid", alpha=4.0)


def _backward_case(**overrides):
    args = dict(
        grad_spikes=torch.zeros(4, 6),
        grad_v_last=torch.zeros(6),
        grad_v_seq=None,
        h_seq=torch.zeros(4, 6),
        x=None,
        k=torch.full((1,), 0.5),
        v_init=torch.zeros(1),
    )
    args.update(overrides)
    return args


BAD_BACKWARD = {
    "grad_spikes shape": (_backward_case(grad_spikes=torch.zeros(4, 5)), "grad_spikes must have shape"),
    "grad_v_seq dtype": (
        _backward_case(grad_v_seq=torch.zeros(4, 6, dtype=torch.float64)),
        "grad_v_seq must have dtype",
    ),
    "grad_v_last count": (_backward_case(grad_v_last=torch.zeros(5)), "grad_v_last must be a contiguous"),
    "h_seq dtype": (_backward_case(h_seq=torch.zeros(4, 6, dtype=torch.float64)), "h_seq must have dtype"),
    "k count": (_backward_case(k=torch.zeros(2)), "k must hold 1 or 6 values"),
}


@pytest.mark.parametrize("launcher", ("compiled", "nvrtc"))
@pytest.mark.parametrize("case", BAD_BACKWARD, ids=list(BAD_BACKWARD))
def test_backward_op_checks(case, launcher):
    args, message = BAD_BACKWARD[case]
    op = (
        torch.ops.plif_cuda.multistep_backward
        if launcher == "compiled"
        else torch.ops.plif_cuda.multistep_backward_nvrtc
    )
    with pytest.raises(RuntimeError, match=re.escape(message)):
        op(**args, x_dtype=torch.float32, **NEURON, spiking=True)


def test_cpu_tensors_run_the_cpu_kernel_through_either_launchers_op():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) + 0.6
    k, v_init = torch.full((1,), 0.4), torch.zeros(7)
    options = dict(NEURON, surrogate="atan", alpha=2.0, spiking=True, store_v_seq=True, needs_backward=True)
    compiled = torch.ops.plif_cuda.multistep_forward(x, k, v_init, **options)
    nvrtc = torch.ops.plif_cuda.multistep_forward_nvrtc(x, k, v_init, **options)
    assert compiled[0].any()
    for a, b in zip(compiled, nvrtc):
        assert torch.equal(a, b)
    # Meta kernels, autograd formula and schema are the compiled launcher's.
    torch.library.opcheck(torch.ops.plif_cuda.multistep_forward_nvrtc, (x.requires_grad_(), k, v_init), options)


def test_each_launchers_forward_differentiates_through_its_own_backward():
    """The autograd formula calls the backward op of the forward's launcher."""
    x = torch.randn(4, 6, requires_grad=True)
    k, v_init = torch.full((1,), 0.5), torch.zeros(1)
    options = dict(NEURON, spiking=True, store_v_seq=False, needs_backward=True)
    for forward, backward in (
        (torch.ops.plif_cuda.multistep_forward, torch.ops.plif_cuda.multistep_backward),
        (torch.ops.plif_cuda.multistep_forward_nvrtc, torch.ops.plif_cuda.multistep_backward_nvrtc),
    ):
        calls = []

        class RecordBackward(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                calls.append(func)
                return func(*args, **(kwargs or {}))

        spikes = forward(x, k, v_init, **options)[0]
        with RecordBackward():
            spikes.sum().backward()
        backward_calls = [call for call in calls if call.name().startswith("plif_cuda::multistep_backward")]
        assert backward_calls == [backward.default]


def test_unavailable_reasons_say_why():
    assert "CUDA tensors" in backends.unavailable_reason("cupy", torch.device("cpu"))
    assert backends.forward_op("cupy") is torch.ops.plif_cuda.multistep_forward_nvrtc
    assert backends.forward_op("cuda") is torch.ops.plif_cuda.multistep_forward
    reason = cupy_backend.unavailable_reason()
    if not torch.cuda.is_available():
        assert reason is not None and ("CUDA device" in reason or "cupy" in reason)
