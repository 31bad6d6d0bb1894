"""Test 6: bad input gets an error that names the problem; odd but valid input
(strided views, NaN, Inf) gets torchvision's result."""

import pytest
import torch

import mnv2_kernels
from mnv2_kernels import ops
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
    with pytest.raises(RuntimeError, match="w_project"):
        ops.fused_inverted_residual(x.to("meta"), we.to("meta"), be.to("meta"), wd.to("meta"),
                                    bd.to("meta"), wp, bp.to("meta"), stride, res)


def test_unsupported_dtype(cpu_backend):
    block = make_pair(16, 16, 1, 6)[1].eval().half()
    with pytest.raises(RuntimeError, match="float16"):
        block(torch.randn(2, 16, 8, 8, dtype=torch.float16))
    args = sample_inputs(SAMPLES[0], dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="supports float32 and float64, got BFloat16"):
        ops.fused_inverted_residual(*args)


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
