"""Thread safety of the CPU backend and of the folded/packed-weight caches.

Python threads run blocks concurrently (the operators release the GIL, and each
call runs its own OpenMP team, so the C++ kernels really overlap). Results must
be bitwise those of serial runs at the same torch thread count: the kernels'
work split and reductions depend only on torch.get_num_threads(), never on
timing, and the weight caches (mnv2_kernels/inference.py) must never serve
weights other than the module's current ones.
"""

import copy
import threading
import time

import torch

import mnv2_kernels
from mnv2_kernels import Conv2dNormActivation, FusedInvertedResidual
from mnv2_kernels.inference import DerivedCache

from conftest import make_pair

N_THREADS = 4
ITERATIONS = 3
# (inp, oup, stride, t, H, N): stride 2, residual, t == 1; batch > 1 so the work splits
SHAPES = [(16, 24, 2, 6, 13, 2), (24, 24, 1, 6, 10, 3), (16, 16, 1, 1, 9, 2)]


def _input(shape, seed):
    inp, _, _, _, h, n = shape
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(n, inp, h, h, generator=g)).contiguous(memory_format=torch.channels_last)


def _step(block, x, train):
    """Forward and backward of one block: the output, every gradient and buffer."""
    block.train(train)
    for p in block.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    y = block(x)
    g = torch.Generator().manual_seed(y.numel())
    y.backward(torch.randn(y.shape, generator=g))
    return [y.detach(), x.grad] + [p.grad for p in block.parameters()] + [b.clone() for b in block.buffers()]


def _worker_blocks(i):
    """Thread i's own blocks. Made in the main thread: their random initialisation
    uses torch's global generator, which threads would interleave."""
    blocks = []
    for k, (inp, oup, stride, t, _, _) in enumerate(SHAPES):
        _, fused = make_pair(inp, oup, stride, t, seed=10 * i + k)
        blocks.append(fused)
    return blocks


def _run_worker(i, blocks, shared, shared_inputs, barrier=None):
    """ITERATIONS rounds of: train and eval steps on the thread's own blocks, and
    a no_grad forward of the shared eval-mode model (a first-call race on its
    caches when the threads start together at the barrier)."""
    out = []
    if barrier is not None:
        barrier.wait()
    for it in range(ITERATIONS):
        with torch.no_grad():
            out.append(shared(shared_inputs[i]))
        for k, (shape, block) in enumerate(zip(SHAPES, blocks)):
            x = _input(shape, seed=100 * i + 10 * it + k)
            out.extend(_step(block, x, train=True))
            out.extend(_step(block, x, train=False))
    return out


def _clear_caches(model):
    for m in model.modules():
        if isinstance(m, (FusedInvertedResidual, Conv2dNormActivation)):
            m.clear_cache()  # folded and packed weights, the blocks' records


def _run_threads(target, n):
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = target(i)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _assert_bitwise(got, want, what):
    assert len(got) == len(want), what
    for j, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, j)
        assert torch.equal(a, b), f"{what}: result {j} differs from the serial run"


def test_threads_match_serial(cpu_backend):
    """Four threads: forward + backward on their own blocks (train and eval mode),
    and forward of one shared eval-mode model whose caches they race to fill."""
    torch.manual_seed(0)
    shared = mnv2_kernels.mobilenet_v2(width_mult=0.25).eval()
    mnv2_kernels.testing.randomize_batch_norm(shared)
    shared_inputs = [torch.randn(1, 3, 32, 32) for _ in range(N_THREADS)]
    blocks = [_worker_blocks(i) for i in range(N_THREADS)]
    serial = [_run_worker(i, copy.deepcopy(blocks[i]), shared, shared_inputs) for i in range(N_THREADS)]
    _clear_caches(shared)
    barrier = threading.Barrier(N_THREADS)
    threaded = _run_threads(lambda i: _run_worker(i, blocks[i], shared, shared_inputs, barrier), N_THREADS)
    for i in range(N_THREADS):
        _assert_bitwise(threaded[i], serial[i], f"thread {i}")


def test_cache_stamp_taken_before_compute():
    """An in-place change made by another thread while the cached value is being
    computed must invalidate it (the stamp is the data the value was computed from)."""
    t = torch.zeros(4)
    cache = DerivedCache()

    def compute_while_another_thread_writes():
        value = t.clone()
        writer = threading.Thread(target=t.add_, args=(1,))
        writer.start()
        writer.join()
        return value

    assert torch.equal(cache.get("k", [t], compute_while_another_thread_writes), torch.zeros(4))
    assert torch.equal(cache.get("k", [t], t.clone), torch.ones(4))


def test_cache_follows_data_assignment(cpu_backend):
    """``p.data = ...`` swaps the data without touching the version counter
    (torch.nn.utils.vector_to_parameters does it): the cache must see it."""
    block = FusedInvertedResidual(16, 16, 1, 6).eval()
    x = _input((16, 16, 1, 6, 8, 2), seed=3)
    with torch.no_grad():
        block(x)
        weight = block.conv[2].weight
        weight.data = weight.data * 2
        y = block(x)
        block.clear_cache()
        assert torch.equal(y, block(x))


def test_mutation_during_forward_invalidates_cache(cpu_backend):
    """Deterministic version of the race: a parameter changes in place (as another
    thread's optimizer step would) while the block folds and packs its weights;
    the next call must use the new weights."""
    tv, block = make_pair(24, 24, 1, 6, seed=4)
    block.eval()
    x = _input((24, 24, 1, 6, 9, 2), seed=5)
    weight = block.conv[2].weight
    new_weight = torch.randn_like(weight)
    fold = block.folded_weights

    def fold_while_another_thread_writes():
        weights = fold()
        writer = threading.Thread(target=lambda: weight.detach().copy_(new_weight))
        writer.start()
        writer.join()
        return weights

    with torch.no_grad():
        block.folded_weights = fold_while_another_thread_writes
        block(x)  # computed from the old weights, while they change
        del block.folded_weights
        y = block(x)
        block.clear_cache()
        assert torch.equal(y, block(x))


def test_mutation_while_threads_read(cpu_backend):
    """Reader threads run a shared eval-mode block under no_grad while a writer
    thread changes a parameter in place, 12 times, half of them while the readers
    are refolding and repacking after the previous change. Every call that does
    not overlap a change must return exactly the serial result of the weights
    current at the time (a stale cache would return older ones), every reader
    sees every even-numbered version, and the last call of each reader returns
    the last weights' result.

    Calls that overlap a change are not checked: they may read a half-written
    parameter, as with any PyTorch module (there are no locks), so their result
    is not defined bitwise."""
    _, block = make_pair(24, 24, 1, 6, seed=6)
    block.eval()
    weight = block.conv[2].weight
    g = torch.Generator().manual_seed(7)
    versions = [weight.detach().clone()] + [torch.randn(weight.shape, generator=g) * 0.2 for _ in range(12)]
    inputs = [_input((24, 24, 1, 6, 9, 2), seed=20 + i) for i in range(N_THREADS)]
    expected = []
    with torch.no_grad():
        for w in versions:
            weight.copy_(w)
            block.clear_cache()
            expected.append([block(x) for x in inputs])
        weight.copy_(versions[0])
    block.clear_cache()

    started = finished = 0  # changes begun and completed
    clean = [-1] * N_THREADS  # per reader: the last change it has seen with a call not overlapping one
    done = threading.Event()

    def reader(i):
        log = []
        with torch.no_grad():
            while True:
                last = done.is_set()
                f0 = finished
                s0 = started
                y = block(inputs[i])
                s1 = started
                log.append((f0, s0, s1, y))
                if f0 == s0 == s1:
                    clean[i] = s0
                if last:
                    return log

    def writer():
        nonlocal started, finished
        try:
            change_all()
        finally:
            done.set()

    def change_all():
        nonlocal started, finished
        for k in range(1, len(versions)):
            if k % 2:
                # every reader has made a call on (even) weights k - 1, however slow
                # the calls are; change k lands at any point of their next calls
                deadline = time.monotonic() + 60
                while min(clean) < k - 1 and time.monotonic() < deadline:
                    time.sleep(0.0005)
            else:
                # soon after change k - 1, while readers refold and repack the weights
                time.sleep(0.001)
            started = k
            with torch.no_grad():
                weight.copy_(versions[k])
            finished = k

    writer_thread = threading.Thread(target=writer)
    writer_thread.start()
    logs = _run_threads(reader, N_THREADS)
    writer_thread.join()
    for i, log in enumerate(logs):
        for f0, s0, s1, y in log:
            if f0 == s0 == s1:
                assert torch.equal(y, expected[s0][i]), f"reader {i}: not the result of weights {s0}"
        assert torch.equal(log[-1][3], expected[-1][i]), f"reader {i}: last call not on the last weights"
        seen = {s0 for f0, s0, s1, _ in log if f0 == s0 == s1}
        assert seen >= set(range(0, len(versions), 2)), f"reader {i}: weights {sorted(seen)} only"
