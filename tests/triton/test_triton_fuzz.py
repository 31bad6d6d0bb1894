"""A few hypothesis examples of the Triton kernels (forward and fused backward, with a
depthwise step of 3x3, 5x5 or 7x7 dilated by 1, 2 or 4, ReLU6 or ReLU) against the float64
reference, and NaN / Inf propagation.

Run with tests/triton (TRITON_INTERPRET=1 on the CPU, see conftest.py). The
interpreter takes seconds per block, so the shapes are tiny (H, W <= 8,
channels <= 16) and the CI profile draws 3 examples (30 under
HYPOTHESIS_PROFILE=fuzz); tests/test_fuzz.py fuzzes the CPU kernel at length.
Float32 data are dyadic, as in tests/test_fuzz.py, so that the activations' masks are
exactly the reference's. The larger kernels take fewer channels (their taps cost the
interpreter more).
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mnv2_kernels import reference
from test_triton_interp import DEVICE, GRAD_RTOL, NAMES, OUT_RTOL, _moments_reference, block_reference, rel_err
from mnv2_kernels.triton_kernels import fused_ir

EXAMPLES = 30 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 3


def _dyadic(t, bits, bound):
    scale = 2.0 ** bits
    return (t * scale).round().clamp(-bound * scale, bound * scale) / scale


def _args(n, cin, cout, t, stride, h, w, residual, channels_last, seed, dilation=1, kernel_size=3,
          activation="relu6"):
    """The operator's arguments, the dilation and the activation last."""
    g = torch.Generator().manual_seed(seed)
    hidden = cin * t

    def r(*shape, scale=1.0, bits=6, bound=2.0):
        return _dyadic(scale * torch.randn(*shape, generator=g), bits, bound).to(DEVICE)

    x = r(n, cin, h, w, scale=2.0, bits=4, bound=8.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    we, be = (r(hidden, cin, scale=0.5), r(hidden)) if t != 1 else (None, None)
    # (the depthwise weights scale as 1.5 / kernel_size: its outputs keep their size, and reach
    # both of ReLU6's kinks, at every kernel size)
    return [x, we, be, r(hidden, kernel_size, kernel_size, scale=1.5 / kernel_size), r(hidden),
            r(cout, hidden, scale=0.3), r(cout), stride, residual, dilation, activation]


@st.composite
def blocks(draw):
    stride = draw(st.sampled_from([1, 2]))
    kernel_size = draw(st.sampled_from(fused_ir.DW_KERNELS))
    max_c = 16 if kernel_size == 3 else 8
    cin = draw(st.integers(1, max_c))
    cout = cin if draw(st.booleans()) else draw(st.integers(1, max_c))
    return dict(n=draw(st.integers(1, 2)), cin=cin, cout=cout, t=draw(st.sampled_from([1, 2, 6])),
                stride=stride, h=draw(st.integers(1, 8)), w=draw(st.integers(1, 8)),
                residual=stride == 1 and cin == cout and draw(st.booleans()),
                channels_last=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
                dilation=draw(st.sampled_from([1, 2, 4])), kernel_size=kernel_size,
                activation=draw(st.sampled_from(fused_ir.ACTIVATIONS)))


@settings(max_examples=EXAMPLES)
@given(block=blocks())
def test_triton_matches_reference(block):
    args = _args(**block)
    a64 = [a.detach().double().cpu().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    y64 = block_reference(*a64)
    gy64 = torch.randn(y64.shape, generator=torch.Generator().manual_seed(block["seed"]), dtype=torch.float64)
    y64.backward(gy64)

    y = fused_ir.forward(*args)
    assert y.shape == y64.shape
    assert rel_err(y, y64) <= OUT_RTOL, block
    gy = gy64.float().to(DEVICE)
    if block["channels_last"]:
        gy = gy.contiguous(memory_format=torch.channels_last)
    grads = fused_ir.backward(gy, *args)
    for name, got, arg, ref in zip(NAMES, grads, args, a64):
        if arg is None:
            continue
        assert got.shape == arg.shape, name
        assert rel_err(got, ref.grad) <= GRAD_RTOL, (name, block)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
@pytest.mark.parametrize("activation", fused_ir.ACTIVATIONS)
def test_nan_and_inf_propagate_as_in_the_reference(activation):
    """ReLU6 keeps a NaN (torch.clamp does: relu6(nan) = nan) and clamps +-Inf; ReLU keeps a
    NaN and +Inf (a 5x5 depthwise step)."""
    for t in (2, 1):
        args = _args(1, 4, 4, t, 1, 8, 8, True, False, seed=3, kernel_size=5, activation=activation)
        x = args[0].clone()
        x[0, 1, 2, 2] = float("nan")
        x[0, 2, 0, 4] = float("inf")
        x[0, 3, 4, 0] = float("-inf")
        args[0] = x
        ref = reference.inverted_residual(*[a.double().cpu() if isinstance(a, torch.Tensor) else a for a in args])
        assert torch.isnan(ref).any(), t
        got = fused_ir.forward(*args).cpu()
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), t
        assert torch.equal(torch.isposinf(got), torch.isposinf(ref)), t
        assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), t
        finite = torch.isfinite(ref)
        assert finite.any() and rel_err(got[finite], ref[finite]) <= OUT_RTOL, t


@settings(max_examples=EXAMPLES)
@given(block=blocks())
def test_train_mode_statistics_at_batch_1(block):
    """bn2's batch statistics by the Triton kernel at batch 1 with outputs of at most 8x8:
    one (image, tile) item without dilation, so one split on a GPU (the case that once failed
    to compile there, tests/test_triton_compile.py), against the float64 statistics of
    PyTorch ops."""
    from mnv2_kernels.moments import depthwise_moments_torch

    block = dict(block, n=1)
    x, we, be, wd = _args(**block)[:4]
    stride, dilation, activation = block["stride"], block["dilation"], block["activation"]
    mean, var = fused_ir.moments(x, we, be, wd, stride, dilation, activation)
    if dilation == 1 and block["kernel_size"] == 3 and activation == "relu6":
        ref_mean, ref_var = depthwise_moments_torch(
            *(None if a is None else a.double().cpu() for a in (x, we, be, wd)), stride)
    else:
        z2 = _moments_reference(x, we, be, wd, stride, dilation, activation)[2].detach()
        ref_var, ref_mean = torch.var_mean(z2, dim=(0, 2, 3), correction=0)
    # (means near 0 are judged against the standard deviation, not their own size)
    scale = ref_var.sqrt().clamp_min(1e-3)
    assert ((mean.double().cpu() - ref_mean) / scale).abs().max() <= 1e-5, block
    assert rel_err(var, ref_var) <= OUT_RTOL, block
