"""The memory contract.

* Autograd saves only the input, parameter-sized tensors and per-channel
  vectors (measured with saved_tensors_hooks, each storage counted once).
* The eval-mode CPU forward allocates nothing of hidden size or larger
  (measured with torch.profiler, profile_memory=True).
"""

import pytest
import torch

from mnv2_kernels import _C

from conftest import BLOCK_SHAPES, block_id, make_pair


def saved_tensors(fn):
    """Runs fn; returns ({storage pointer: (bytes, shapes saved)} for backward, fn's result)."""
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        saved.setdefault(s.data_ptr(), (s.nbytes(), []))[1].append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def _sizes(block, n, inp, h):
    _, _, dw, _, proj, _ = block._parts()
    hidden, cout = dw.out_channels, proj.out_channels
    ho = (h - 1) // block.stride + 1
    item = 4
    return dict(
        hidden_channels=hidden,
        x=n * inp * h * h * item,
        out=n * cout * ho * ho * item,
        hidden=n * hidden * ho * ho * item,  # the smaller of the two hidden tensors
        params=sum(p.numel() for p in block.parameters()) * item,
        vectors=32 * (hidden + cout + inp) * item,  # generous: a few dozen per-channel vectors
    )


def _extras(block, x, saved):
    """Saved storages other than x's and the module's own parameters and buffers."""
    known = {x.untyped_storage().data_ptr()} | {
        p.untyped_storage().data_ptr() for p in (*block.parameters(), *block.buffers())}
    return {ptr: v for ptr, v in saved.items() if ptr not in known}


def _activations(saved):
    return [shape for _, shapes in saved.values() for shape in shapes if len(shape) == 4
            and shape[2:] != (3, 3) and shape[2:] != (1, 1)]


@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=block_id)
def test_eval_saves_input_parameters_and_vectors_only(shape, cpu_backend):
    inp, oup, stride, t, h = shape
    _, block = make_pair(inp, oup, stride, t)
    block.eval()
    x = torch.randn(2, inp, h, h, requires_grad=True)
    saved, y = saved_tensors(lambda: block(x))
    sz = _sizes(block, 2, inp, h)
    assert x.untyped_storage().data_ptr() in saved
    extras = _extras(block, x, saved)
    assert _activations(extras) == []  # the only activation saved is x itself
    # beyond x and the module's own tensors: the folded weights and per-channel vectors
    assert sum(b for b, _ in extras.values()) <= sz["params"] + sz["vectors"], sz
    y.sum().backward()  # and the graph still works


@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=block_id)
def test_train_saves_nothing_hidden_sized(shape, cpu_backend):
    """Train mode: besides the input and parameter-sized tensors, only the
    pre-bn3 output (bottleneck-sized, what bn3's own backward needs) is saved."""
    inp, oup, stride, t, h = shape
    _, block = make_pair(inp, oup, stride, t)
    block.train()
    x = torch.randn(2, inp, h, h, requires_grad=True)
    saved, y = saved_tensors(lambda: block(x))
    sz = _sizes(block, 2, inp, h)
    extras = _extras(block, x, saved)
    ho = (h - 1) // stride + 1
    assert _activations(extras) == [(2, oup, ho, ho)]  # bn3's input, never a hidden activation
    assert sum(b for b, _ in extras.values()) <= sz["out"] + 2 * sz["params"] + sz["vectors"], sz
    y.sum().backward()


def assert_nothing_hidden_sized(block, x, train):
    """A block's call on x saves for backward only x, parameter-sized tensors and, in train
    mode, bn3's (bottleneck-sized) input; and no allocation of its training step (forward and
    backward) is as large as the hidden tensor. x: (n, inp, h, h), requiring grad."""
    n, inp, h, _ = x.shape
    block.train(train)
    sz = _sizes(block, n, inp, h)
    saved, y = saved_tensors(lambda: block(x))
    assert _activations(_extras(block, x, saved)) == ([tuple(y.shape)] if train else [])

    def step():
        block(x).square().sum().backward()

    step()
    assert _largest_allocation(step) < sz["hidden"]


def _largest_allocation(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    # an event's figure includes its children: the max bounds every single allocation
    return max(e.cpu_memory_usage for e in prof.events())


def _block_with_large_hidden(shape, train):
    """(block, sizes, channels_last x) with a batch large enough that the hidden tensor is at
    least 4x the parameters, so that any hidden-sized allocation would be the largest one."""
    inp, oup, stride, t, h = shape
    _, block = make_pair(inp, oup, stride, t)
    block.train(train)
    per_image = _sizes(block, 1, inp, h)
    n = max(2, -(-4 * per_image["params"] // per_image["hidden"]))
    x = torch.randn(n, inp, h, h).contiguous(memory_format=torch.channels_last)
    return block, _sizes(block, n, inp, h), x


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=block_id)
def test_eval_forward_allocates_nothing_hidden_sized(shape, threads, cpu_backend):
    """The batch is chosen so the hidden tensor is at least 4x the parameters
    (whose folded and packed copies the forward does allocate): then any
    hidden-sized allocation would be the largest one."""
    block, sz, x = _block_with_large_hidden(shape, train=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    _C.reset_max_scratch_bytes()
    try:
        with torch.no_grad():
            block(x)  # packs and caches the weights
            cached = _largest_allocation(lambda: block(x))
        x.requires_grad_()
        with_grad = _largest_allocation(lambda: block(x))
    finally:
        torch.set_num_threads(previous)
    for largest in (cached, with_grad):
        assert largest >= sz["out"]  # the profiler does see the operator's allocations
        assert largest < sz["hidden"], (x.shape, largest, sz)
    # The kernels' per-thread scratch (kept across calls, so not a profiler
    # event) is far below the hidden tensor and does not grow with the batch.
    scratch = _C.max_scratch_bytes()
    assert 0 < scratch < sz["hidden"] / 2, (scratch, sz)
    _C.reset_max_scratch_bytes()
    with torch.no_grad():
        block(torch.cat([x, x]).contiguous(memory_format=torch.channels_last))
    assert _C.max_scratch_bytes() == scratch


def test_report_resolution_table_shows_no_expansion():
    """The memory report's paper-Table-3 view: inside the fused blocks nothing wider than a
    bottleneck is materialised at any resolution, while torchvision materialises the expansions
    (t x the block's input). Recorded from every operator's output, so it can fail."""
    from bench import memory_report
    from mnv2_kernels.model import mobilenet_block_shapes

    table = memory_report.resolution_table(resolution=64)
    bottleneck, expansion = {}, {}
    for inp, oup, stride, t, h in mobilenet_block_shapes(resolution=64):
        ho = (h - 1) // stride + 1
        bottleneck[ho] = max(bottleneck.get(ho, 0), oup)
        if t > 1:
            expansion[h] = max(expansion.get(h, 0), inp * t)
    assert table["fused"]["blocks"] == bottleneck
    for side, width in expansion.items():
        assert table["torchvision"]["blocks"][side] >= width


@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=block_id)
def test_train_step_allocates_nothing_hidden_sized(shape, cpu_backend):
    """Train mode (batch statistics), forward and backward: no single allocation reaches the
    size of the expanded tensor (the profiler sees the C++ operators' outputs and scratch
    tensors too). With t == 1 there is no expansion: the bound is then the input's size,
    which grad_x itself has, plus the parameter-sized and per-channel tensors an event
    allocates next to it (an event's figure includes its children)."""
    block, sz, x = _block_with_large_hidden(shape, train=True)
    t = shape[3]
    x.requires_grad_()

    def step():
        block(x).square().sum().backward()

    step()
    largest = _largest_allocation(step)
    assert largest >= sz["x"]  # grad_x: the profiler does see the backward's allocations
    if t == 1:
        assert largest <= max(sz["x"], sz["out"]) + sz["params"] + sz["vectors"], (x.shape, largest, sz)
    else:
        assert largest < sz["hidden"], (x.shape, largest, sz)
