"""Bad input gets an error that names the problem; odd but valid input
(strided views, NaN, Inf) gets torchvision's result."""

import pytest
import torch

import mnv2_kernels
from mnv2_kernels import ops, reference
from conftest import FP32_RTOL, make_pair, rel_err
from test_ops import SAMPLES, sample_inputs


@pytest.fixture
def block():
    return make_pair(16, 16, 1, 6)[1].eval()


def test_wrong_rank(block, cpu_backend):
    with pytest.raises(ValueError, match="4-D input"):
        block(torch.randn(16, 8, 8))
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.fused_inverted_residual(torch.randn(4, 5, 6), *sample_inputs(SAMPLES[0])[1:])


def test_wrong_channel_count(block, cpu_backend):
    with pytest.raises(ValueError, match="expects 16 input channels, got 12"):
        block(torch.randn(2, 12, 8, 8))
    x, we, be, wd, bd, wp, bp, stride, res = sample_inputs(SAMPLES[1])
    with pytest.raises(RuntimeError, match="w_expand must have shape"):
        ops.fused_inverted_residual(x[:, :3], we, be, wd, bd, wp, bp, stride, res)


def test_stride_three():
    with pytest.raises(ValueError, match="stride should be 1 or 2"):
        mnv2_kernels.FusedInvertedResidual(16, 16, 3, 6)
    x, we, be, wd, bd, wp, bp, _, _ = sample_inputs(SAMPLES[1])
    with pytest.raises(RuntimeError, match="stride must be 1 or 2, got 3"):
        ops.fused_inverted_residual(x, we, be, wd, bd, wp, bp, 3, False)


def test_mixed_dtypes(block, cpu_backend):
    with pytest.raises(RuntimeError, match="input dtype torch.float64 does not match"):
        block(torch.randn(2, 16, 8, 8, dtype=torch.float64))
    x, we, be, wd, bd, wp, bp, stride, res = sample_inputs(SAMPLES[0])
    with pytest.raises(RuntimeError, match="w_dw has dtype Double but x has dtype Float"):
        ops.fused_inverted_residual(x, we, be, wd.double(), bd, wp, bp, stride, res)


def test_mixed_devices(block, cpu_backend):
    with pytest.raises(RuntimeError, match="the input is on meta but the block's parameters are on cpu"):
        block(torch.randn(2, 16, 8, 8, device="meta"))
    x, we, be, wd, bd, wp, bp, stride, res = sample_inputs(SAMPLES[0])
    meta = [t.to("meta") for t in (x, we, be, wd, bd)]
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run a torch.float32 tensor on meta"):
        ops.fused_inverted_residual(*meta, wp, bp.to("meta"), stride, res)
    with pytest.raises(RuntimeError, match="w_project"):
        torch.ops.mnv2.fused_inverted_residual(*meta, wp, bp.to("meta"), stride, res)


def test_half_precision_weights_must_match_the_input(cpu_backend):
    # float16/bfloat16 run (in float32 inside); a mix of dtypes is refused, as by convolutions
    args = list(sample_inputs(SAMPLES[0], dtype=torch.bfloat16))
    args[3] = args[3].float()
    with pytest.raises(RuntimeError, match="w_dw has dtype Float but x has dtype BFloat16"):
        ops.fused_inverted_residual(*args)
    block = make_pair(16, 16, 1, 6)[1].eval().half()
    with pytest.raises(RuntimeError, match="input dtype torch.float32 does not match the parameters' dtype torch.float16"):
        block(torch.randn(2, 16, 8, 8))


def test_operator_names_the_bad_weight():
    x, we, be, wd, bd, wp, bp, stride, res = sample_inputs(SAMPLES[0])
    cases = {
        "b_dw must have shape": (x, we, be, wd, bd[:-1], wp, bp, stride, res),
        "w_project must have shape": (x, we, be, wd, bd, wp[:, :-1], bp, stride, res),
        "b_project must have shape": (x, we, be, wd, bd, wp, bp[:-1], stride, res),
        "w_dw must be 3-D": (x, we, be, wd.flatten(1), bd, wp, bp, stride, res),
        "w_expand and b_expand must be given together": (x, we, None, wd, bd, wp, bp, stride, res),
        "residual needs stride 1 and Cin == Cout": (x, we, be, wd, bd, wp, bp, 2, True),
    }
    for message, args in cases.items():
        with pytest.raises(RuntimeError, match=message):
            ops.fused_inverted_residual(*args)


def test_empty_height_or_width(block, cpu_backend):
    with pytest.raises(ValueError, match="height and width >= 1"):
        block(torch.randn(2, 16, 0, 8))


def _strided_views(n, c, h, w):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return 2 * torch.randn(*shape, generator=g)  # scaled before the view is taken

    return {
        "spatially strided": r(n, c, 2 * h, 2 * w)[:, :, ::2, ::2],
        "channel slice of channels_last": r(n, c + 3, h, w).contiguous(
            memory_format=torch.channels_last)[:, 2:c + 2],
        "N,H,C,W permuted": r(n, h, c, w).permute(0, 2, 1, 3),
        "broadcast (stride 0)": r(1, c, 1, w).expand(n, c, h, w),
    }


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("view", list(_strided_views(1, 1, 1, 1)))
def test_inputs_contiguous_in_neither_format(view, mode, cpu_backend):
    tv, fused = make_pair(24, 24, 1, 6)
    x = _strided_views(3, 24, 9, 7)[view]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    tv.train(mode == "train")
    fused.train(mode == "train")
    assert rel_err(fused(x), tv(x)) <= FP32_RTOL


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_nan_and_inf_propagate_as_in_torchvision(layout, mode, grad, cpu_backend):
    tv, fused = make_pair(24, 24, 1, 6)
    x = torch.randn(2, 24, 9, 9)
    x[0, 3, 2, 2] = float("nan")
    x[0, 5, 6, 7] = float("inf")
    x[1, 0, 4, 4] = float("-inf")
    x[1, 7, 0, 8] = float("inf")
    x = x.contiguous(memory_format=layout)
    tv.train(mode == "train")
    fused.train(mode == "train")
    with torch.set_grad_enabled(grad):
        ref, got = tv(x), fused(x)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(torch.isposinf(got), torch.isposinf(ref))
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    if finite.any():
        assert rel_err(got[finite], ref[finite]) <= FP32_RTOL
    if mode == "eval":  # one bad pixel must not poison the whole image
        assert finite.any()


# ---------------------------------------------------------------------------
# Hostile input: huge sizes, zero sizes, wrong shapes, dtype and
# device mixes, NaN and Inf with gradients. What each case gets is listed in
# README.md, "Limits".

def _bad_shape_cases():
    """(message, args) with one parameter of the wrong shape each."""
    x, we, be, wd, bd, wp, bp, stride, res = sample_inputs(SAMPLES[0])  # Cin 4, hidden 24, Cout 4
    xt1 = x  # t == 1 block: hidden == Cin
    wd1, bd1, wp1 = wd[:4], bd[:4], wp[:, :4]
    return {
        "w_expand must have shape": (x, we[:, :-1], be, wd, bd, wp, bp, stride, res),
        "b_expand must have shape": (x, we, be[:-1], wd, bd, wp, bp, stride, res),
        "the depthwise kernel must be 3x3, 5x5 or 7x7": (x, we, be, wd[:, :, :2], bd, wp, bp, stride, res),
        "w_dw must be 3-D": (x, we, be, wd.flatten(1), bd, wp, bp, stride, res),
        "b_dw must have shape": (x, we, be, wd, bd[:, None], wp, bp, stride, res),
        "w_project must have shape": (x, we, be, wd, bd, wp[:, :-1], bp, stride, res),
        "w_project must be 2-D": (x, we, be, wd, bd, wp[0], bp, stride, res),
        "b_project must have shape": (x, we, be, wd, bd, wp, bp[:-1], stride, res),
        "without w_expand .t == 1. w_dw must have x's 4 channels, got 24": (xt1, None, None, wd, bd, wp, bp,
                                                                          stride, res),
        "residual needs stride 1 and Cin == Cout": (xt1, None, None, wd1, bd1, wp1[:3], bp[:3], stride, True),
    }


@pytest.mark.parametrize("message", list(_bad_shape_cases()))
def test_each_bad_weight_shape_is_named(message):
    args = _bad_shape_cases()[message]
    with pytest.raises(RuntimeError, match=message):
        ops.fused_inverted_residual(*args)
    # the backward operator makes the same checks
    gy = torch.zeros(2, 4, 5, 6)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.mnv2.fused_inverted_residual_backward(gy, *args)


@pytest.mark.parametrize("message", list(_bad_shape_cases()))
def test_each_bad_weight_shape_is_named_by_the_fake_kernel(message):
    """On meta tensors (torch.compile's shape propagation) the fake kernel
    rejects the same arguments and names the same parameter."""
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in _bad_shape_cases()[message]]
    name = message.split()[0] if not message.startswith("without") else "without w_expand"
    with pytest.raises(RuntimeError, match=name):
        ops.fused_inverted_residual(*args)


def test_meta_tensors_give_the_output_shape():
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in sample_inputs(SAMPLES[2])]
    y = ops.fused_inverted_residual(*args)
    assert y.device.type == "meta" and y.shape == (1, 5, 4, 3)


def test_bad_grad_y():
    x, we, be, wd, bd, wp, bp, stride, res = sample_inputs(SAMPLES[0])
    for gy, message in [(torch.zeros(2, 4, 5, 5), "grad_y must have shape"),
                        (torch.zeros(2, 4, 5, 6, dtype=torch.float64), "grad_y must match x's device and dtype")]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.mnv2.fused_inverted_residual_backward(gy, x, we, be, wd, bd, wp, bp, stride, res)


@pytest.mark.parametrize("name", ["x", "w_expand", "b_expand", "w_dw", "b_dw", "w_project", "b_project"])
def test_each_mixed_dtype_is_named(name):
    args = list(sample_inputs(SAMPLES[0]))
    i = ["x", "w_expand", "b_expand", "w_dw", "b_dw", "w_project", "b_project"].index(name)
    args[i] = args[i].double()
    # x in float64: the first weight is named against it
    named = "w_expand" if name == "x" else name
    with pytest.raises(RuntimeError, match=f"{named} has dtype (Float|Double) but x has dtype"):
        ops.fused_inverted_residual(*args)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool], ids=str)
def test_non_float_dtypes(dtype, cpu_backend):
    args = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in sample_inputs(SAMPLES[0])]
    with pytest.raises(RuntimeError, match="the CPU operator supports float32, float64, float16 and bfloat16 "
                                           r"\(the last two computed in float32\), got"):
        torch.ops.mnv2.fused_inverted_residual(*args)
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run .* it supports float32, float64, float16 "
                                           "and bfloat16"):
        ops.fused_inverted_residual(*args)


@pytest.mark.parametrize("name", ["x", "w_expand", "b_dw", "w_project"])
def test_meta_mixed_with_cpu_is_named(name):
    args = list(sample_inputs(SAMPLES[0]))
    i = ["x", "w_expand", "b_expand", "w_dw", "b_dw", "w_project", "b_project"].index(name)
    args[i] = args[i].to("meta")
    named = "w_expand" if name == "x" else name
    with pytest.raises(RuntimeError, match=f"{named} .* must match x"):
        ops.fused_inverted_residual(*args)


def test_sparse_input_is_refused():
    x, *rest = sample_inputs(SAMPLES[0])
    with pytest.raises(NotImplementedError, match="SparseCPU"):
        ops.fused_inverted_residual(x.to_sparse(), *rest)


# --- zero sizes -------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("cfg", [(16, 16, 1, 6), (16, 24, 2, 6), (16, 16, 1, 1)], ids=str)
def test_empty_batch_matches_torchvision(cfg, mode, grad, cpu_backend):
    """Batch 0: the same empty output, untouched running statistics (but
    num_batches_tracked counts the call, as torchvision's does), zero gradients."""
    tv, fused = make_pair(*cfg)
    tv.train(mode == "train")
    fused.train(mode == "train")
    outs = []
    for m in (tv, fused):
        x = torch.randn(0, cfg[0], 7, 7).requires_grad_(grad)
        y = m(x)
        if grad:
            y.sum().backward()
        outs.append((y, x.grad, [p.grad for p in m.parameters()], [b.clone() for b in m.buffers()]))
    (y0, gx0, gp0, b0), (y1, gx1, gp1, b1) = outs
    assert y1.shape == y0.shape and y1.dtype == y0.dtype
    for a, b in zip(b1, b0):
        assert torch.equal(a, b)
    if grad:
        assert gx1.shape == gx0.shape
        for a, b in zip(gp1, gp0):
            assert a is not None and torch.equal(a, b) and torch.count_nonzero(a) == 0


@pytest.mark.parametrize("shape", [(2, 16, 0, 8), (2, 16, 8, 0), (0, 16, 0, 0)], ids=str)
@pytest.mark.parametrize("t", [6, 1])
def test_zero_height_or_width_is_an_error_as_in_torchvision(shape, t, cpu_backend):
    """torchvision raises ("Kernel size can't be greater than actual input
    size"); so do the module (ValueError) and the operator."""
    tv, fused = make_pair(16, 16, 1, t)
    for mode in (True, False):
        with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
            tv.train(mode)(torch.randn(shape))
        with pytest.raises(ValueError, match="height and width >= 1"):
            fused.train(mode)(torch.randn(shape))
    x, we, be, wd, bd, wp, bp, stride, res = sample_inputs(SAMPLES[0])
    with pytest.raises(RuntimeError, match="x must have height and width >= 1"):
        ops.fused_inverted_residual(torch.randn(shape[0], 4, *shape[2:]), we, be, wd, bd, wp, bp, stride, res)


def test_zero_channels_are_an_error():
    x, we, be, wd, bd, wp, bp, stride, res = sample_inputs(SAMPLES[0])
    cases = [  # no input channels, no hidden channels, no output channels
        (x[:, :0], we[:, :0], be, wd, bd, wp, bp, stride, False),
        (x, we[:0], be[:0], wd[:0], bd[:0], wp[:, :0], bp, stride, res),
        (x, we, be, wd, bd, wp[:0], bp[:0], stride, False),
    ]
    for args in cases:
        with pytest.raises(RuntimeError, match="channel counts must be >= 1"):
            ops.fused_inverted_residual(*args)


# --- huge sizes -------------------------------------------------------------

def _lazy_buffer(elements):
    """An uninitialised float32 buffer: untouched pages cost no memory, so an
    8 GiB allocation holds a few scattered small views."""
    try:
        return torch.empty(elements, dtype=torch.float32)
    except RuntimeError as exc:  # strict overcommit or a ulimit
        pytest.skip(f"cannot reserve {elements * 4 / 2**30:.1f} GiB of address space: {exc}")


def _view_into(buf, shape, strides, offset, src):
    view = buf.as_strided(shape, strides, offset)
    view.copy_(src)
    return view


@pytest.mark.parametrize("where", ["batch", "channel", "width"])
def test_element_offsets_beyond_int32(where, cpu_backend):
    """x (and grad_y) are views whose element offsets pass 2**31 (2**31 + 2**20
    elements reserved, a few pages touched): the kernels index with int64 and
    must match the float64 reference on a dense copy, forward and backward."""
    big = 2**31
    buf = _lazy_buffer(big + 2**20)
    g = torch.Generator().manual_seed(0)
    n, c, h, w = 2, 5, 4, 6
    src = 2 * torch.randn(n, c, h, w, generator=g)
    # One dimension's stride takes its last index past 2**31; the other three are
    # packed below that stride, so the view does not overlap itself.
    dim = {"batch": 0, "channel": 1, "width": 3}[where]
    shape = (n, c, h, w)
    strides, step = [0] * 4, 1
    for d in reversed(range(4)):
        if d != dim:
            strides[d], step = step, step * shape[d]
    strides[dim] = big // (shape[dim] - 1) + 1024
    x = _view_into(buf, shape, strides, 4096, src)
    assert (shape[dim] - 1) * strides[dim] > big
    hidden, cout = 6 * c, c
    we, be = 0.5 * torch.randn(hidden, c, generator=g), torch.randn(hidden, generator=g)
    wd, bd = 0.5 * torch.randn(hidden, 3, 3, generator=g), torch.randn(hidden, generator=g)
    wp, bp = 0.3 * torch.randn(cout, hidden, generator=g), torch.randn(cout, generator=g)
    weights = (we, be, wd, bd, wp, bp)
    y = ops.fused_inverted_residual(x, *weights, 1, True)
    x64 = src.double()
    w64 = [t.double() for t in weights]
    assert rel_err(y, reference.inverted_residual(x64, *w64, 1, True)) <= FP32_RTOL
    # backward, with grad_y also a view beyond 2**31 (the residual reads it at x's positions)
    gy_src = torch.randn(n, cout, h, w, generator=g)
    gy = _view_into(buf, shape, strides, 8192, gy_src)
    grads = torch.ops.mnv2.fused_inverted_residual_backward(gy, x, *weights, 1, True)
    leaves = [x64.requires_grad_()] + [t.requires_grad_() for t in w64]
    reference.inverted_residual(*leaves, 1, True).backward(gy_src.double())
    for got, leaf in zip(grads, leaves):
        assert rel_err(got, leaf.grad) <= FP32_RTOL


@pytest.mark.slow
def test_element_count_beyond_int32(cpu_backend):
    """A stride-0 batch of 131073 copies of one 256 x 8 x 8 image: x has
    2**31 + 16384 elements (no memory), the output 2.1M. Every image's output
    must be the one image's (forward only: grad_x would be 8 GiB)."""
    c, h = 256, 8
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, c, h, h, generator=g).contiguous(memory_format=torch.channels_last)
    n = 2**31 // (c * h * h) + 1
    x = base.expand(n, c, h, h)
    assert x.numel() > 2**31
    wd, bd = 0.5 * torch.randn(c, 3, 3, generator=g), torch.randn(c, generator=g)
    wp, bp = 0.3 * torch.randn(1, c, generator=g), torch.randn(1, generator=g)
    with torch.no_grad():
        y = ops.fused_inverted_residual(x, None, None, wd, bd, wp, bp, 2, False)
    assert y.shape == (n, 1, 4, 4)
    ref = reference.inverted_residual(base.double(), None, None, wd.double(), bd.double(), wp.double(),
                                      bp.double(), 2, False)
    assert rel_err(y[0], ref[0]) <= FP32_RTOL
    assert torch.equal(y, y[:1].expand_as(y))


def test_impossible_output_size_is_an_allocation_error(cpu_backend):
    """A stride-0 batch of 2**40 images needs a 4 PiB output: a RuntimeError
    from the allocator, not a crash."""
    x, we, be, wd, bd, wp, bp, stride, res = sample_inputs(SAMPLES[0])
    huge = x[:1].expand(2**40, *x.shape[1:])
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        ops.fused_inverted_residual(huge, we, be, wd, bd, wp, bp, stride, res)


# --- NaN and Inf, with gradients ---------------------------------------------

def _masks(t):
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("cfg", [(24, 24, 1, 6), (16, 24, 2, 6), (16, 16, 1, 1), (8, 16, 2, 1)], ids=str)
def test_nan_and_inf_masks_of_output_and_gradients_as_in_torchvision(cfg, mode, cpu_backend):
    """NaN, +Inf and -Inf at inner, edge and corner pixels (t == 1 feeds them
    straight into the depthwise step): the NaN / +Inf / -Inf positions of the
    output, of the input gradient and of every parameter gradient are
    torchvision's, and the finite outputs agree."""
    inp = cfg[0]
    tv, fused = make_pair(*cfg)
    tv.train(mode == "train")
    fused.train(mode == "train")
    x = torch.randn(2, inp, 8, 8, generator=torch.Generator().manual_seed(5))
    x[0, 1, 3, 3] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    x[1, 3, 7, 4] = float("-inf")
    x[1, 0, 2, 7] = float("inf")
    results = []
    for m in (tv, fused):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(6)))
        results.append((y.detach(), xi.grad, [p.grad for p in m.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    for what, a, b in [("output", y1, y0), ("grad x", gx1, gx0)] + [
            (f"grad {n}", p, q) for (n, _), p, q in zip(tv.named_parameters(), gp1, gp0)]:
        for kind, ma, mb in zip(("nan", "+inf", "-inf"), _masks(a), _masks(b)):
            assert torch.equal(ma, mb), (what, kind, int(ma.sum()), int(mb.sum()))
    finite = torch.isfinite(y0)
    if finite.any():
        assert rel_err(y1[finite], y0[finite]) <= FP32_RTOL
    if mode == "eval":
        assert finite.any()
