"""The operators: gradcheck in float64 (the CPU kernel runs float64 too), opcheck
of every mnv2:: operator with and without requires_grad,
torch.compile(fullgraph=True), the two reference forms, and FLOP counting."""

import copy

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import mnv2_kernels
from mnv2_kernels import moments, ops, reference
from conftest import FP32_RTOL, randomize_bn, rel_err

# (N, Cin, H, W, Cout, t, stride, residual, layout)
SAMPLES = [
    (2, 4, 5, 6, 4, 6, 1, True, torch.contiguous_format),
    (2, 4, 5, 6, 3, 6, 1, False, torch.channels_last),
    (1, 4, 7, 5, 5, 6, 2, False, torch.contiguous_format),
    (3, 3, 4, 4, 3, 1, 1, True, torch.channels_last),
    (2, 5, 6, 3, 4, 1, 2, False, torch.contiguous_format),
    (0, 4, 3, 3, 4, 6, 1, True, torch.contiguous_format),
    (2, 8, 1, 1, 6, 3, 2, False, torch.channels_last),
]


def sample_inputs(sample, dtype=torch.float32, requires_grad=False, seed=0):
    """Arguments of mnv2::fused_inverted_residual for one SAMPLES entry."""
    n, cin, h, w, cout, t, stride, residual, fmt = sample
    g = torch.Generator().manual_seed(seed)
    hidden = cin * t

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_(requires_grad)

    x = (2 * torch.randn(n, cin, h, w, generator=g, dtype=dtype)).contiguous(memory_format=fmt)
    x.requires_grad_(requires_grad)
    we, be = (r(hidden, cin, scale=0.5), r(hidden)) if t != 1 else (None, None)
    return (x, we, be, r(hidden, 3, 3, scale=0.5), r(hidden), r(cout, hidden, scale=0.3), r(cout),
            stride, residual)


def sample_id(s):
    return f"n{s[0]}-c{s[1]}-{s[2]}x{s[3]}-o{s[4]}-t{s[5]}-s{s[6]}-{'res' if s[7] else 'nores'}-" + (
        "cl" if s[8] == torch.channels_last else "nchw")


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s[0] > 0], ids=sample_id)
def test_gradcheck_float64(sample):
    args = sample_inputs(sample, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.fused_inverted_residual, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("t", [1, 6])
def test_gradcheck_moment_ops_float64(t):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.channel_moments(x), (x,))
    hidden = 3 * t
    we = (0.5 * torch.randn(hidden, 3, dtype=torch.float64, generator=g)).requires_grad_()
    be = torch.randn(hidden, dtype=torch.float64, generator=g).requires_grad_()
    wd = torch.randn(hidden, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    for stride in (1, 2):
        if t == 1:
            args = (x, None, None, wd, stride)
        else:
            args = (x, we, be, wd, stride)
        assert torch.autograd.gradcheck(ops.depthwise_moments, args)
    if t > 1:
        # bn1's statistics from x's: through channel_moments, and on their own with a
        # covariance that is not symmetric (every input's gradient, the clamp's mask included)
        assert torch.autograd.gradcheck(lambda x, w, b: ops.project_moments(*ops.channel_moments(x), w, b),
                                        (x, we, be))
        mean = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_()
        cov = torch.randn(3, 3, dtype=torch.float64, generator=g).requires_grad_()
        assert torch.autograd.gradcheck(ops.project_moments, (mean, cov, we, None))


MOMENT_CFGS = [(3, 6, 1, (5, 4)), (4, 6, 2, (7, 5)), (5, 1, 1, (3, 6)), (6, 1, 2, (4, 4)),
               (16, 6, 2, (9, 11)), (24, 6, 1, (8, 8)), (8, 6, 1, (1, 1)), (8, 6, 2, (1, 5))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("cfg", MOMENT_CFGS, ids=str)
def test_depthwise_moments_cpu_kernel_matches_pytorch(cfg, channels_last, dtype):
    """The C++ statistics kernel against the PyTorch composition, including a mean
    far from zero (variance by cancellation) and 1x1 images."""
    cin, t, stride, (h, w) = cfg
    g = torch.Generator().manual_seed(cin * t + stride)
    hidden = cin * t
    x = torch.randn(3, cin, h, w, dtype=dtype, generator=g) + 2.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    we = (torch.randn(hidden, cin, dtype=dtype, generator=g) / cin ** 0.5) if t != 1 else None
    be = torch.randn(hidden, dtype=dtype, generator=g) if t != 1 else None
    wd = torch.randn(hidden, 3, 3, dtype=dtype, generator=g) / 3 + 1.0  # mean >> std
    mean, var = torch.ops.mnv2.depthwise_moments(x, we, be, wd, stride)
    x64 = x.double()
    ref_mean, ref_var = moments.depthwise_moments_torch(
        x64, None if we is None else we.double(), None if be is None else be.double(), wd.double(), stride)
    assert mean.dtype == dtype and var.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(mean, ref_mean) <= tol
    assert rel_err(var, ref_var) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("cfg", MOMENT_CFGS, ids=str)
def test_depthwise_moments_fused_backward_matches_pytorch(cfg, channels_last, dtype):
    """The CPU kernel of depthwise_moments' backward (the fused backward kernel in
    moments mode) against the chunked PyTorch backward, each with only the mean,
    only the variance, and both incoming gradients."""
    cin, t, stride, (h, w) = cfg
    g = torch.Generator().manual_seed(cin + t + stride)
    hidden = cin * t
    x = torch.randn(2, cin, h, w, dtype=dtype, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    we = (torch.randn(hidden, cin, dtype=dtype, generator=g) / cin ** 0.5) if t != 1 else None
    be = torch.randn(hidden, dtype=dtype, generator=g) if t != 1 else None
    wd = torch.randn(hidden, 3, 3, dtype=dtype, generator=g) / 3
    with torch.no_grad():
        mean, _ = ops.depthwise_moments(x, we, be, wd, stride)
    gm = torch.randn(hidden, dtype=mean.dtype, generator=g)
    gv = torch.randn(hidden, dtype=mean.dtype, generator=g)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for g_mean, g_var in ((gm, None), (None, gv), (gm, gv)):
        fused = moments.depthwise_moments_backward_fused(x, we, be, wd, stride, mean, g_mean, g_var)
        generic = moments.depthwise_moments_backward_torch(x, we, be, wd, stride, g_mean, g_var)
        for a, b in zip(fused, generic):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.shape == b.shape
                assert rel_err(a, b) <= tol, (g_mean is not None, g_var is not None)
        assert fused[0].is_contiguous(memory_format=torch.channels_last if channels_last
                                      else torch.contiguous_format)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", [(4, 4, 1, 6), (4, 5, 2, 6), (4, 4, 1, 1), (3, 5, 2, 1)], ids=str)
def test_gradcheck_module_float64(cfg, train, cpu_backend):
    """Through the module: BN folding, batch statistics (train) and the fused
    operator, with respect to the input and every parameter."""
    inp, oup, stride, t = cfg
    torch.manual_seed(2)
    block = mnv2_kernels.FusedInvertedResidual(inp, oup, stride, t).double().train(train)
    randomize_bn(block)
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    buffers = {n: b for n, b in block.named_buffers()}

    def f(x, *ps):
        state = dict(zip(names, ps))
        state.update({n: b.clone() for n, b in buffers.items()})  # running stats are updated in place
        return torch.func.functional_call(block, state, (x,))

    x = (2 * torch.randn(3, inp, 5, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


# opcheck is slow (it traces and compiles); these cover both strides, t of 1 and 6,
# the residual, both layouts and an empty batch.
OPCHECK_SAMPLES = [SAMPLES[0], SAMPLES[2], SAMPLES[3], SAMPLES[5]]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=sample_id)
def test_opcheck_fused(sample, requires_grad):
    args = sample_inputs(sample, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.mnv2.fused_inverted_residual.default, args)


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=sample_id)
def test_opcheck_backward_pack_and_packed(sample):
    x, we, be, wd, bd, wp, bp, stride, residual = sample_inputs(sample)
    y = ops.fused_inverted_residual(x, we, be, wd, bd, wp, bp, stride, residual)
    gy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.mnv2.fused_inverted_residual_backward.default,
                          (gy, x, we, be, wd, bd, wp, bp, stride, residual))
    torch.library.opcheck(torch.ops.mnv2.pack_weights.default, (we, be, wd, bd, wp, bp))
    packed = torch.ops.mnv2.pack_weights(we, be, wd, bd, wp, bp)
    hidden, cout = wd.shape[0], wp.shape[0]
    packed_args = (x, packed, hidden, cout, we is not None, stride, residual)
    torch.library.opcheck(torch.ops.mnv2.fused_inverted_residual_packed.default, packed_args)
    assert torch.equal(torch.ops.mnv2.fused_inverted_residual_packed(*packed_args), y)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_moment_ops(requires_grad):
    for sample in OPCHECK_SAMPLES[:3]:
        x, we, be, wd, _, _, _, stride, _ = sample_inputs(sample, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.mnv2.channel_moments.default, (x,))
        if we is not None:
            mean, cov = ops.channel_moments(x)
            torch.library.opcheck(torch.ops.mnv2.project_moments.default, (mean, cov, we, be))
        torch.library.opcheck(torch.ops.mnv2.depthwise_moments.default, (x, we, be, wd, stride))


def test_inference_ops_refuse_to_differentiate():
    x, we, be, wd, bd, wp, bp, stride, residual = sample_inputs(SAMPLES[0], requires_grad=True)
    packed = torch.ops.mnv2.pack_weights(we, be, wd, bd, wp, bp)
    y = torch.ops.mnv2.fused_inverted_residual_packed(x, packed.detach(), wd.shape[0], wp.shape[0],
                                                      True, stride, residual)
    with pytest.raises(RuntimeError, match="derivative for mnv2::fused_inverted_residual_packed is not implemented"):
        y.sum().backward()
    w = torch.ops.mnv2.pack_weights(we, be, wd, bd, wp, bp)
    with pytest.raises(RuntimeError, match="derivative for mnv2::pack_weights is not implemented"):
        w.sum().backward()


# (N, Cin, H, W, Cout): the head's shape at batch 1 and 2, the classifier's at batch 1 (one
# row: the matrix-vector path), and awkward ones (Cout not a multiple of any vector width,
# more rows than one item, one pixel, an empty batch)
POINTWISE_SHAPES = [(1, 320, 7, 7, 1280), (2, 320, 7, 7, 1280), (1, 1280, 1, 1, 1000), (3, 5, 9, 11, 21),
                    (1, 1, 1, 1, 1), (1, 33, 1, 1, 100), (2, 17, 13, 12, 70), (0, 4, 3, 3, 5)]


def _pointwise_tol(x, cin):
    """Relative error allowed for a sum of cin products in x's dtype: sqrt(cin) units of
    rounding (the usual growth of a float sum's error), and at least 1e-6 (float32) or
    1e-13 (float64). (cin reaches 1280 in the classifier.)"""
    if x.dtype == torch.float32:
        return max(1e-6, cin ** 0.5 * 2.0 ** -24)
    return max(1e-13, cin ** 0.5 * 2.0 ** -53)


def _pointwise_case(shape, activation, dtype, seed):
    """A channels_last input, a (cout, cin) weight and bias, and act(conv1x1) in float64."""
    n, cin, h, w, cout = shape
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, cin, h, w, generator=g, dtype=dtype)).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, generator=g, dtype=dtype)
    bias = torch.randn(cout, generator=g, dtype=dtype)
    ref = torch.nn.functional.conv2d(x.double(), weight.double().view(cout, cin, 1, 1), bias.double())
    ref = {"relu": ref.clamp(min=0), "relu6": ref.clamp(0, 6)}.get(activation, ref)
    return x, weight, bias, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", POINTWISE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_pointwise_conv_matches_conv2d(shape, activation, dtype):
    x, weight, bias, ref = _pointwise_case(shape, activation, dtype, shape[1] * shape[4])
    y = ops.pointwise_conv(x, ops.pack_pointwise(weight, bias), shape[4], activation)
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, ref) <= _pointwise_tol(x, shape[1])


def _pointwise_nan_case():
    """A 6 -> 9 pointwise case whose first image holds a NaN: x, weight, bias, packed."""
    x = torch.randn(2, 6, 3, 4).contiguous(memory_format=torch.channels_last)
    x[0, 2, 1, 1] = float("nan")
    weight, bias = torch.randn(9, 6), torch.randn(9)
    return x, weight, bias, ops.pack_pointwise(weight, bias)


def test_pointwise_conv_nan_and_opcheck():
    x, weight, bias, packed = _pointwise_nan_case()
    y = ops.pointwise_conv(x, packed, 9, "relu6")
    ref = torch.nn.functional.conv2d(x, weight.view(9, 6, 1, 1), bias).clamp(0, 6)
    assert torch.equal(y.isnan(), ref.isnan()) and y.isnan().any()  # NaN passes ReLU6, as in torch
    torch.library.opcheck(torch.ops.mnv2.pack_pointwise.default, (weight, bias))
    torch.library.opcheck(torch.ops.mnv2.pointwise_conv_packed.default, (x.nan_to_num(), packed, 9, 2))


def test_pointwise_conv_bad_input():
    weight, bias = torch.randn(9, 6), torch.randn(9)
    packed = ops.pack_pointwise(weight, bias)
    x = torch.randn(2, 6, 3, 4)
    with pytest.raises(RuntimeError, match="needs a channels_last"):
        ops.pointwise_conv(x, packed, 9)
    x = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="activation must be 0"):
        torch.ops.mnv2.pointwise_conv_packed(x, packed, 9, 3)
    with pytest.raises(RuntimeError, match="not packed for a 6 -> 10 pointwise"):
        ops.pointwise_conv(x, packed, 10)  # same padded size: only the trailer tells
    with pytest.raises(RuntimeError, match="not packed for a 5 -> 9 pointwise"):
        ops.pointwise_conv(x[:, :5].contiguous(memory_format=torch.channels_last), packed, 9)
    with pytest.raises(RuntimeError, match="x's device and dtype"):
        ops.pointwise_conv(x.double(), packed, 9)
    with pytest.raises(RuntimeError, match=r"\(cout,\) bias"):
        ops.pack_pointwise(weight, torch.randn(8))
    with pytest.raises(RuntimeError, match=r"\(cout, cin\) weight"):
        ops.pack_pointwise(weight.view(9, 6, 1, 1), bias)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        ops.pack_pointwise(weight.half(), bias.half())
    w = weight.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="derivative for mnv2::pack_pointwise is not implemented"):
        ops.pack_pointwise(w, bias).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", POINTWISE_SHAPES + [(2, 9, 10, 7, 130)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_pointwise_conv_mean_matches_conv2d_then_pool(shape, activation, dtype):
    # (130 output channels: two whole column groups of 64 and a partial one; 70 rows: more
    # than one block of rows through the scratch)
    n, cin, h, w, cout = shape
    x, weight, bias, ref = _pointwise_case(shape, activation, dtype, cin * cout + 1)
    y = ops.pointwise_conv_mean(x, ops.pack_pointwise(weight, bias), cout, activation)
    ref = torch.nn.functional.adaptive_avg_pool2d(ref, (1, 1)).flatten(1)
    assert y.shape == ref.shape == (n, cout) and y.dtype == dtype and y.is_contiguous()
    assert rel_err(y, ref) <= _pointwise_tol(x, cin)


def test_pointwise_conv_mean_nan_opcheck_and_bad_input():
    x, weight, bias, packed = _pointwise_nan_case()
    y = ops.pointwise_conv_mean(x, packed, 9, "relu6")
    ref = torch.nn.functional.conv2d(x, weight.view(9, 6, 1, 1), bias).clamp(0, 6).mean((2, 3))
    assert torch.equal(y.isnan(), ref.isnan()) and y[0].isnan().any() and not y[1].isnan().any()
    assert rel_err(y[1], ref[1]) <= 1e-6
    x = x.nan_to_num()
    torch.library.opcheck(torch.ops.mnv2.pointwise_conv_mean_packed.default, (x, packed, 9, 2))
    with pytest.raises(RuntimeError, match="pointwise_conv_mean_packed needs a channels_last"):
        ops.pointwise_conv_mean(x.contiguous(), packed, 9)
    with pytest.raises(RuntimeError, match="activation must be 0"):
        torch.ops.mnv2.pointwise_conv_mean_packed(x, packed, 9, -1)
    with pytest.raises(RuntimeError, match="not packed for a 6 -> 10 pointwise"):
        ops.pointwise_conv_mean(x, packed, 10)
    with pytest.raises(RuntimeError, match="x's device and dtype"):
        ops.pointwise_conv_mean(x.double(), packed, 9)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.pointwise_conv_mean(x[0], packed, 9)
    with pytest.raises(RuntimeError, match="derivative for mnv2::pointwise_conv_mean_packed is not implemented"):
        ops.pointwise_conv_mean(x.clone().requires_grad_(), packed, 9).sum().backward()


# (N, C, H, W image, block channels, Cout, block stride): MobileNetV2's stem + first block,
# then odd image sides, channels not a multiple of any vector width, stride 2, one pixel
STEM_SHAPES = [(1, 3, 224, 224, 32, 16, 1), (2, 3, 9, 7, 5, 3, 1), (1, 2, 13, 10, 17, 9, 2),
               (2, 4, 1, 1, 8, 8, 1), (0, 3, 8, 8, 8, 4, 1)]


def _stem_inputs(shape, dtype, fmt, seed=0):
    n, c, h, w, ch, cout, stride = shape
    g = torch.Generator().manual_seed(seed + c * 7 + ch)
    image = (2 * torch.randn(n, c, h, w, generator=g, dtype=dtype)).contiguous(memory_format=fmt)
    ws, bs = torch.randn(ch, c, 3, 3, generator=g, dtype=dtype), torch.randn(ch, generator=g, dtype=dtype)
    wd, bd = torch.randn(ch, 3, 3, generator=g, dtype=dtype), torch.randn(ch, generator=g, dtype=dtype)
    wp, bp = torch.randn(cout, ch, generator=g, dtype=dtype), torch.randn(cout, generator=g, dtype=dtype)
    return image, (ws, bs), (wd, bd, wp, bp), stride


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", STEM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_stem_block_matches_conv_then_block(shape, fmt, dtype):
    image, (ws, bs), (wd, bd, wp, bp), stride = _stem_inputs(shape, dtype, fmt)
    ch, cout = ws.shape[0], wp.shape[0]
    packed = torch.ops.mnv2.pack_weights(None, None, wd, bd, wp, bp)
    y = ops.stem_block(image, ops.pack_stem(ws, bs), packed, ch, cout, stride)
    x = torch.nn.functional.conv2d(image.double(), ws.double(), bs.double(), 2, 1).clamp(0, 6)
    ref = reference.inverted_residual(x, None, None, wd.double(), bd.double(), wp.double(), bp.double(),
                                      stride, False)
    assert y.shape == ref.shape and y.dtype == dtype
    if ref.numel():  # (an empty batch has no layout to keep)
        assert y.is_contiguous(memory_format=fmt)
        assert rel_err(y, ref) <= (1e-5 if dtype == torch.float32 else 1e-12)


def test_stem_block_nan_opcheck_and_bad_input():
    image, (ws, bs), (wd, bd, wp, bp), stride = _stem_inputs(STEM_SHAPES[1], torch.float32,
                                                             torch.channels_last)
    stem, packed = ops.pack_stem(ws, bs), torch.ops.mnv2.pack_weights(None, None, wd, bd, wp, bp)
    image[0, 1, 4, 3] = float("inf")  # padded stem channels must stay exactly 0, not inf * 0
    y = ops.stem_block(image, stem, packed, 5, 3, 1)
    x = torch.nn.functional.conv2d(image, ws, bs, 2, 1).clamp(0, 6)
    ref = reference.inverted_residual(x, None, None, wd, bd, wp, bp, 1, False)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert rel_err(y[finite], ref[finite]) <= 1e-5
    image = image.nan_to_num(posinf=1.0)
    torch.library.opcheck(torch.ops.mnv2.stem_block_packed.default, (image, stem, packed, 5, 3, 1))
    with pytest.raises(RuntimeError, match="image must be 4-D"):
        ops.stem_block(image[0], stem, packed, 5, 3, 1)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        ops.stem_block(image, stem, packed, 5, 3, 3)
    with pytest.raises(RuntimeError, match="packed stem weights were not packed for a 3x3 convolution from 2"):
        ops.stem_block(image[:, :2], stem, packed, 5, 3, 1)
    with pytest.raises(RuntimeError, match="packed block weights were not packed for a 5 -> 4"):
        ops.stem_block(image, stem, packed, 5, 4, 1)  # same padded size: only the trailer tells
    with pytest.raises(RuntimeError, match="packed block weights were not packed for a 6 -> 3"):
        ops.stem_block(image, stem, packed, 6, 3, 1)
    with pytest.raises(RuntimeError, match="image's device and dtype"):
        ops.stem_block(image.double(), stem, packed, 5, 3, 1)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        ops.stem_block(image.half(), stem.half(), packed.half(), 5, 3, 1)
    with pytest.raises(ValueError, match=r"\(cout, C, 3, 3\) weight"):
        ops.pack_stem(ws[:, :, :2], bs)
    with pytest.raises(RuntimeError, match="derivative for mnv2::stem_block_packed is not implemented"):
        ops.stem_block(image.clone().requires_grad_(), stem, packed, 5, 3, 1).sum().backward()


def test_packed_block_refuses_weights_packed_for_another_shape():
    # hidden 12 -> 13 and Cout 3 -> 4 keep every padded size: only the packed trailer tells
    x, we, be, wd, bd, wp, bp, stride, residual = sample_inputs(SAMPLES[1])
    packed = torch.ops.mnv2.pack_weights(we, be, wd, bd, wp, bp)
    hidden, cout = wd.shape[0], wp.shape[0]
    for h, c in [(hidden + 1, cout), (hidden, cout + 1)]:
        with pytest.raises(RuntimeError, match="not packed for this block"):
            torch.ops.mnv2.fused_inverted_residual_packed(x, packed, h, c, True, stride, False)
    torch.ops.mnv2.fused_inverted_residual_packed(x, packed, hidden, cout, True, stride, False)


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s[0] > 0], ids=sample_id)
def test_op_matches_both_reference_forms(sample):
    args = sample_inputs(sample, torch.float64)
    y = ops.fused_inverted_residual(*args)
    assert rel_err(y, reference.inverted_residual(*args)) <= 1e-12
    for chunk in (1, 4, 1000):
        assert rel_err(reference.inverted_residual_chunked(*args, chunk=chunk), y) <= 1e-12


def _three_blocks():
    """t == 1, a stride-2 expansion and a residual block: every operator path."""
    return torch.nn.Sequential(
        mnv2_kernels.FusedInvertedResidual(8, 8, 1, 1),
        mnv2_kernels.FusedInvertedResidual(8, 16, 2, 6),
        mnv2_kernels.FusedInvertedResidual(16, 16, 1, 6))


@pytest.mark.parametrize("mode,dtype,tol", [
    ("eval", torch.float32, FP32_RTOL),
    # Train-mode batch norm over small stages is ill-conditioned: in fp32 even
    # torchvision's compiled and eager whole-model gradients differ by ~2e-4 at
    # this size. In float64 both must agree to 1e-9 (three blocks: compiling
    # the whole model's float64 training graph takes minutes).
    ("train", torch.float64, 1e-9),
], ids=["eval-fp32-model", "train-fp64-blocks"])
def test_compile_fullgraph_matches_eager(mode, dtype, tol, cpu_backend):
    torch.manual_seed(3)
    if mode == "eval":
        model = mnv2_kernels.mobilenet_v2(width_mult=0.35, dropout=0.0)
        x = torch.randn(2, 3, 48, 48)
    else:
        model = _three_blocks().double()
        x = torch.randn(3, 8, 12, 12, dtype=dtype)
    randomize_bn(model)
    model.train(mode == "train")
    eager = copy.deepcopy(model)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    outs = []
    for m in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=dtype))
        outs.append((y.detach(), xi.grad, [p.grad for p in m.parameters()], list(m.buffers())))
    (y0, gx0, gp0, b0), (y1, gx1, gp1, b1) = outs
    assert rel_err(y1, y0) <= tol
    assert rel_err(gx1, gx0) <= tol
    # gradients that are zero in exact arithmetic (see test_model) compare against the scale
    scale = max(g.norm().item() for g in gp0)
    for a, b in zip(gp1, gp0):
        assert (a - b).norm() <= tol * max(b.norm().item(), 1e-5 * scale)
    for a, b in zip(b1, b0):
        assert rel_err(a, b) <= tol


def test_flop_counter_counts_the_fused_block_like_torchvision(cpu_backend):
    torch.manual_seed(4)
    tv = torchvision.models.mobilenet_v2().eval()
    ours = mnv2_kernels.convert_model(copy.deepcopy(tv)).eval()
    x = torch.randn(1, 3, 224, 224)
    counts = []
    for model in (tv, ours):
        with FlopCounterMode(display=False) as fc:
            model(x)  # autograd path
        counts.append(fc.get_total_flops())
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)  # cached-weights path
        counts.append(fc.get_total_flops())
    assert len(set(counts)) == 1, counts
    # MobileNetV2-1.0 at 224 is known as ~300M multiply-adds
    assert 290e6 < counts[0] / 2 < 310e6


def test_flop_counter_backward_counts_input_and_weight_gradients(cpu_backend):
    """The backward counts as torch counts a convolution's: input and weight
    gradient each as costly as the forward, so 2x the forward. (torch's own
    formula counts a depthwise weight gradient `groups` times too often, so a
    torchvision block's total is not a useful reference; its 1x1 parts are.)"""
    tv = torchvision.models.mobilenetv2.InvertedResidual(24, 24, 1, 6).eval()
    ours = mnv2_kernels.FusedInvertedResidual.from_torchvision(copy.deepcopy(tv)).eval()
    x = torch.randn(2, 24, 28, 28, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        ours(x).sum().backward()
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert counts["mnv2.fused_inverted_residual_backward"] == 2 * counts["mnv2.fused_inverted_residual"]
    depthwise = tv.conv[1][0]
    tv.conv[1][0] = torch.nn.Identity()  # count torchvision's 1x1 convolutions alone
    with FlopCounterMode(display=False) as fc:
        tv(x).sum().backward()
    dw_forward_flops = 2 * 2 * 28 * 28 * depthwise.out_channels * 9
    assert fc.get_total_flops() == 3 * (counts["mnv2.fused_inverted_residual"] - dw_forward_flops)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_precision_is_float32_at_the_edges(dtype, cpu_backend):
    """float16/bfloat16 CPU tensors: the float32 kernels on the upcast arguments, the
    results rounded once to the input's dtype (the statistics stay float32)."""
    for sample in SAMPLES[:4]:
        args = sample_inputs(sample, dtype=dtype)
        up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
        y = ops.fused_inverted_residual(*args)
        assert y.dtype == dtype
        assert torch.equal(y, ops.fused_inverted_residual(*up).to(dtype))
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        grads = torch.ops.mnv2.fused_inverted_residual_backward(gy, *args)
        grads32 = torch.ops.mnv2.fused_inverted_residual_backward(gy.float(), *up)
        for g, g32 in zip(grads, grads32):
            assert g.dtype == dtype and torch.equal(g, g32.to(dtype))
        x, we, be, wd, _, _, _, stride, _ = args
        mean, var = ops.depthwise_moments(x, we, be, wd, stride)
        mean32, var32 = ops.depthwise_moments(x.float(), *(a.float() if a is not None else None
                                                          for a in (we, be, wd)), stride)
        assert mean.dtype == var.dtype == torch.float32
        assert torch.equal(mean, mean32) and torch.equal(var, var32)
