"""The CPU op's page-resident output buffers: reused only once released, never aliased."""
import gc
import os
import subprocess
import sys

import torch

import plif_cuda

# Large enough (>= 1 MiB per [T, ...] output) to come from the buffer cache.
SHAPE = (4, 1 << 17)


def _run(x, w):
    return plif_cuda.plif_multistep(x, w, backend="cpu")


def test_live_outputs_are_never_shared():
    x = torch.randn(SHAPE)
    w = torch.tensor(0.3)
    first_spikes, first_v, _ = _run(x, w)
    kept = first_spikes.clone()
    second_spikes, _, _ = _run(x * 2, w)
    assert first_spikes.data_ptr() != second_spikes.data_ptr()
    assert torch.equal(first_spikes, kept)


def test_released_buffer_is_reused_with_fresh_results():
    w = torch.tensor(-0.2)
    x1, x2 = torch.randn(SHAPE), torch.randn(SHAPE)
    spikes, _, _ = _run(x1, w)
    released = spikes.data_ptr()
    del spikes
    gc.collect()
    spikes2, _, _ = _run(x2, w)
    assert spikes2.data_ptr() == released  # the most recently released block of that size
    expected, _, _ = plif_cuda.plif_multistep(x2, w, backend="torch")
    assert torch.equal(spikes2, expected)


def test_buffers_survive_autograd_and_backward_outputs():
    x = torch.randn(SHAPE, requires_grad=True)
    w = torch.tensor(0.1, requires_grad=True)
    grads = []
    for _ in range(3):
        spikes, v_last, _ = _run(x, w)
        grads.append(torch.autograd.grad((spikes * 0.5).sum() + v_last.sum(), [x, w]))
    for grad_x, grad_w in grads[1:]:
        assert torch.equal(grad_x, grads[0][0])
        assert torch.equal(grad_w, grads[0][1])


def test_empty_cpu_cache_releases_the_cached_buffers():
    spikes, v_last, _ = _run(torch.randn(SHAPE), torch.tensor(0.0))
    del spikes, v_last
    gc.collect()
    assert plif_cuda.cpu_cache_bytes() >= SHAPE[0] * SHAPE[1] * 4
    plif_cuda.empty_cpu_cache()
    assert plif_cuda.cpu_cache_bytes() == 0
    x = torch.randn(SHAPE)
    spikes, _, _ = _run(x, torch.tensor(0.0))
    expected, _, _ = plif_cuda.plif_multistep(x, torch.tensor(0.0), backend="torch")
    assert torch.equal(spikes, expected)


def test_cache_turned_off_still_gives_the_reference_results():
    code = (
        "import torch, plif_cuda\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(4, 1 << 17)\n"
        "for _ in range(2):\n"
        "    s, v, _ = plif_cuda.plif_multistep(x, torch.tensor(0.0), backend='cpu')\n"
        "r, rv, _ = plif_cuda.plif_multistep(x, torch.tensor(0.0), backend='torch')\n"
        "print(int(torch.equal(s, r) and torch.equal(v, rv)))\n"
    )
    env = dict(os.environ, PLIF_CPU_CACHE_MB="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
