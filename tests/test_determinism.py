"""Run-to-run determinism of the CPU backend: for a fixed torch thread count the
forward and every gradient are bitwise repeatable, within a process and across
processes (the kernels' work split depends only on torch.get_num_threads(), and
partial sums are reduced in a fixed order; no atomics).

Across thread counts results may differ in the last bits (see README,
"Determinism"). GPU determinism is tested in tests/test_gpu.py.
"""

import copy
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_pair

# (inp, oup, stride, t, H, N): stride 2, residual, t == 1, and a 7x7 batch-1 block
# whose forward splits the hidden channels between threads
SHAPES = [(16, 24, 2, 6, 15, 3), (24, 24, 1, 6, 14, 2), (32, 16, 1, 1, 12, 2), (64, 64, 1, 6, 7, 1)]
SHAPE_IDS = [f"{i}-{o}-s{s}-t{t}-{h}x{h}-n{n}" for i, o, s, t, h, n in SHAPES]


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def num_threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


def _results(shape, train, dtype=torch.float32, channels_last=True):
    """Output, input gradient, every parameter gradient and every buffer of one
    forward + backward of a fresh block."""
    inp, oup, stride, t, h, n = shape
    _, block = make_pair(inp, oup, stride, t, seed=sum(shape), dtype=dtype)
    block.train(train)
    g = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(n, inp, h, h, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = block(x)
    y.backward(torch.randn(y.shape, generator=g, dtype=dtype))
    return [y.detach(), x.grad] + [p.grad for p in block.parameters()] + list(block.buffers())


def _digests(thread_counts):
    before = torch.get_num_threads()
    digests = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            h = hashlib.sha256()
            for shape in SHAPES:
                for train in (False, True):
                    for r in _results(shape, train):
                        h.update(r.detach().contiguous().numpy().tobytes())
            digests.append(h.hexdigest())
    finally:
        torch.set_num_threads(before)
    return digests


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_repeatable(shape, train, dtype, num_threads, cpu_backend):
    first = _results(shape, train, dtype)
    for _ in range(2):
        again = _results(shape, train, dtype)
        for j, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"result {j} differs between two runs"


def test_repeatable_across_processes(cpu_backend):
    """Another process (other addresses, allocations, thread start-up) gives the
    same bits, for 1 and 2 threads."""
    env = dict(os.environ, MNV2_BACKEND="cpu")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "1", "2"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == _digests([1, 2])


if __name__ == "__main__":  # the other process of test_repeatable_across_processes
    print(*_digests([int(a) for a in sys.argv[1:]]))
