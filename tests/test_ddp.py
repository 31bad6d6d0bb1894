"""Distributed data-parallel training, on the CPU with the gloo backend.

One ``torchrun --standalone --nproc_per_node=2`` launch of tests/ddp_worker.py trains
small float64 MobileNetV2s under DistributedDataParallel (see its docstring for the
cases); the tests compare what each rank saved with one process:

- SyncBatchNorm (mnv2_kernels.convert_sync_batchnorm, or torch's): the DDP gradients
  after the first step, and the parameters and running statistics after the last, equal
  torchvision's model with plain BatchNorm2d trained in one process on the combined
  batch; with even, uneven (3 + 5) and empty (0 + 8) shares of the batch.
- plain BatchNorm2d: each process normalises with its own statistics, exactly as
  torchvision's model under DDP does.
- single blocks (t = 6 and t = 1), float32 and float64, without DDP: outputs, gradients
  and running statistics equal torchvision's block on the combined batch; one value per
  channel over the whole group raises on every rank.

Tolerances (float64, normwise relative): 1e-9 for first-step gradients, where the only
differences are summation orders (measured ~3e-13: unit roundoff 1.1e-16 amplified by
train-mode batch norms over a few values per channel); 1e-8 for the state after 2-3 SGD
steps, which amplify those differences (measured ~1.3e-10; one-process runs of
torchvision's model and ours, or of torchvision's NCHW and channels_last, differ by
~1.5e-10 there). A gradient that is exactly zero in exact arithmetic (a batch norm's
beta whose output feeds a train-mode batch norm through a linear layer, which removes
it) is rounding noise on both sides and is bounded by 1e-13 of the largest gradient.
"""

import functools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

import ddp_worker as W
import mnv2_kernels
from conftest import FP32_RTOL, rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
GRAD_RTOL, STATE_RTOL, ZERO_ATOL = 1e-9, 1e-8, 1e-13

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build")


@pytest.fixture(autouse=True)
def one_thread():
    """One thread here too, as in each worker: on the 2-core development machines more
    threads only oversubscribe the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """Runs tests/ddp_worker.py on 2 processes once; returns load(case, rank)."""
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # localhost only, whatever the host's network
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "ddp_worker.py"), str(out)]
    start = time.monotonic()
    # a session of its own, so that a hung run is ended with its workers, not just torchrun
    proc = subprocess.Popen(cmd, env=env, cwd=os.path.dirname(HERE), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the DDP worker did not finish in 300 s (a hung collective?)\n{stdout[-3000:]}\n"
                    f"{stderr[-6000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    print(f"DDP worker: {time.monotonic() - start:.1f} s\n{stdout}")
    return lambda case, rank: torch.load(out / f"{case}_rank{rank}.pt", weights_only=False)


@functools.cache
def one_process(steps: int, total: int, momentum_none: bool):
    """torchvision's model with plain BatchNorm2d, trained in one process on the whole
    batch that the worker split (the worker builds every case from the same seeds);
    ddp_worker.train's dict."""
    ours, _ = W.make_models()
    tv = torchvision.models.mobilenet_v2(width_mult=W.WIDTH, num_classes=W.CLASSES, dropout=0.0).double()
    tv.load_state_dict(ours.state_dict())
    if momentum_none:
        W.set_momentum_none(tv)
    x, labels = W.make_batch(total)
    return W.train(tv, x, labels, steps, total)


def assert_close(got, ref, rtol, what):
    """Every tensor of the dict ``got`` against ``ref``'s: normwise relative error at most
    rtol, except exactly-zero gradients (see the module docstring); integers exactly."""
    scale = max((r.double().norm().item() for r in ref.values() if r.is_floating_point()), default=0.0)
    assert set(got) == set(ref), what
    for name, r in ref.items():
        g = got[name]
        if not r.is_floating_point():
            assert torch.equal(g, r), (what, name, g, r)
        elif r.double().norm() <= ZERO_ATOL * scale:
            assert g.double().norm() <= ZERO_ATOL * scale, (what, name)
        else:
            assert rel_err(g, r) <= rtol, (what, name, rel_err(g, r))


SYNC_CASES = {  # case: (steps, images per rank, momentum None)
    "sync": (3, [4, 4], False),
    "sync_ref": (1, [4, 4], False),
    "sync_torch": (1, [4, 4], False),
    "sync_torchvision": (1, [4, 4], False),
    "uneven": (2, [3, 5], True),
    "empty": (1, [0, 8], False),
}


@needs_gloo
@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_sync_batchnorm_ddp_equals_one_process_on_the_whole_batch(worker, case):
    steps, counts, momentum_none = SYNC_CASES[case]
    # one reference run serves every case on the same 8 images (3 steps, states after 1 and 3)
    ref = one_process(max(steps, 3) if not momentum_none else steps, sum(counts), momentum_none)
    last = "" if steps > 1 else "_1"
    for rank in (0, 1):
        got = worker(case, rank)
        assert_close(got["grads"], ref["grads"], GRAD_RTOL, (case, rank, "gradients after step 1"))
        for key in ("params", "buffers"):  # buffers: running_mean/var, num_batches_tracked
            rtol = STATE_RTOL if steps > 1 else GRAD_RTOL
            assert_close(got[key + last], ref[key + last], rtol, (case, rank, f"{key} after {steps} steps"))
    # the ranks' losses are their shares of the one-process loss
    for step in range(steps):
        loss = sum(worker(case, rank)["losses"][step] for rank in (0, 1)) / 2
        assert abs(loss - ref["losses"][step]) <= 1e-9 * abs(ref["losses"][step]), (case, step)


@needs_gloo
def test_plain_batchnorm_ddp_equals_torchvision_ddp(worker):
    """Plain BatchNorm2d under DDP: per-process statistics, as torchvision's model."""
    for rank in (0, 1):
        ours, tv = worker("plain", rank), worker("plain_torchvision", rank)
        assert_close(ours["grads"], tv["grads"], GRAD_RTOL, (rank, "gradients after step 1"))
        assert_close(ours["params"], tv["params"], STATE_RTOL, (rank, "parameters after 3 steps"))
        assert_close(ours["buffers"], tv["buffers"], STATE_RTOL, (rank, "buffers after 3 steps"))
    # and that is not what SyncBatchNorm computes (the sync tests are not vacuous)
    sync = worker("sync", 0)["grads"]
    assert max(rel_err(g, sync[n]) for n, g in worker("plain", 0)["grads"].items()) > 0.1


@needs_gloo
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", W.BLOCKS, ids=lambda s: f"{s[0]}-{s[1]}-s{s[2]}-t{s[3]}")
def test_sync_block_equals_torchvision_block_on_the_whole_batch(worker, shape, dtype):
    """One block (t = 1 included), 3 + 1 images: the output and input-gradient slices,
    the summed parameter gradients and the running statistics equal torchvision's block
    with plain BatchNorm2d on the 4 images."""
    fused, x, gy = W.make_block(shape, dtype)
    tv = InvertedResidual(*shape).to(dtype)
    tv.load_state_dict(fused.state_dict())
    tv.train()
    x = x.clone().requires_grad_()
    y = tv(x)
    y.backward(gy)
    tol = FP32_RTOL if dtype == torch.float32 else 1e-10
    lo = 0
    for rank, count in enumerate(W.BLOCK_COUNTS):
        got = worker("blocks", rank)["blocks"][(shape, dtype)]
        assert rel_err(got["y"], y[lo:lo + count]) <= tol, rank
        assert rel_err(got["x_grad"], x.grad[lo:lo + count]) <= tol, rank
        assert_close(got["grads"], {n: p.grad for n, p in tv.named_parameters()}, tol, rank)
        assert_close(got["buffers"], dict(tv.named_buffers()), tol, rank)
        lo += count


@needs_gloo
@needs_gloo
@pytest.mark.parametrize("app", ["ssdlite", "deeplab"])
def test_applications_train_under_ddp_as_on_torchvisions_blocks(worker, app):
    """SSDLite and DeepLabv3 under DistributedDataParallel: the fused model's losses,
    all-reduced first-step gradients, and parameters and running statistics after two steps
    equal the same model's on torchvision's blocks, on every rank."""
    for rank in (0, 1):
        ours, tv = worker(app, rank), worker(f"{app}_torchvision", rank)
        for got, want in zip(ours["losses"], tv["losses"]):
            assert abs(got - want) <= GRAD_RTOL * abs(want), (app, rank)
        assert_close(ours["grads"], tv["grads"], GRAD_RTOL, f"{app} rank {rank} grads")
        assert_close(ours["params"], tv["params"], STATE_RTOL, f"{app} rank {rank} params")
        assert_close(ours["buffers"], tv["buffers"], STATE_RTOL, f"{app} rank {rank} buffers")
    assert_close(worker(app, 0)["grads"], worker(app, 1)["grads"], 0.0, f"{app}: the ranks' gradients")


def test_one_value_per_channel_over_the_group_raises_on_every_rank(worker):
    for rank in (0, 1):
        error = worker("one_value", rank)["error"]
        assert error is not None and "more than 1 value per channel" in error, (rank, error)


@pytest.mark.parametrize("convert", ["mnv2_kernels", "torch"])
def test_sync_batchnorm_without_a_process_group_is_batchnorm(convert, cpu_backend):
    """Without torch.distributed initialised, converted models compute exactly what the
    plain ones do (train mode: gradients and running statistics; eval mode: outputs)."""
    assert not (dist.is_available() and dist.is_initialized())
    ours, _ = W.make_models()
    plain = W.make_models()[0]
    converter = (mnv2_kernels.convert_sync_batchnorm if convert == "mnv2_kernels"
                 else nn.SyncBatchNorm.convert_sync_batchnorm)
    params, buffers = list(ours.parameters()), list(ours.buffers())
    synced = converter(ours)
    kind = mnv2_kernels.SyncBatchNorm if convert == "mnv2_kernels" else nn.SyncBatchNorm
    assert sum(isinstance(m, kind) for m in synced.modules()) == 52
    assert all(a is b for a, b in zip(params, synced.parameters()))  # shared, not copied
    assert all(a is b for a, b in zip(buffers, synced.buffers()))
    x, labels = W.make_batch(4)
    for model in (synced, plain):
        nn.functional.cross_entropy(model.train()(x), labels).backward()
    for (n, a), b in zip(synced.named_parameters(), plain.parameters()):
        assert torch.equal(a.grad, b.grad), n
    for (n, a), b in zip(synced.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), n
    with torch.no_grad():  # eval: folded running statistics
        assert torch.equal(synced.eval()(x), plain.eval()(x))


def test_convert_sync_batchnorm_converts_torch_sync_layers_too():
    bn = nn.SyncBatchNorm(8, momentum=None, eps=1e-3)
    out = mnv2_kernels.convert_sync_batchnorm(bn)
    assert type(out) is mnv2_kernels.SyncBatchNorm
    assert out.weight is bn.weight and out.running_var is bn.running_var
    assert (out.momentum, out.eps) == (None, 1e-3)
    assert mnv2_kernels.convert_sync_batchnorm(out) is out
