"""Shared helpers: the 17 MobileNetV2 block shapes, torchvision blocks with
randomised batch-norm state, and the error measure used by the tests."""

import copy

import pytest
import torch
import torchvision
from torchvision.models.mobilenetv2 import InvertedResidual

import mnv2_kernels
from mnv2_kernels import FusedInvertedResidual
from mnv2_kernels.testing import randomize_batch_norm as randomize_bn  # noqa: F401

# The fp32 bound against torchvision: relative error at most 1e-4 (normwise, see rel_err).
FP32_RTOL = 1e-4


def torchvision_block_shapes(width_mult=1.0, resolution=224):
    """(inp, oup, stride, expand_ratio, H) of every block of torchvision's
    MobileNetV2, read off the model itself with forward hooks."""
    model = torchvision.models.mobilenet_v2(width_mult=width_mult)
    shapes = []
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: shapes.append(
                (inp[0].shape[1], out.shape[1], mod.stride,
                 mod.conv[1][0].out_channels // inp[0].shape[1] if len(mod.conv) == 4 else 1,
                 inp[0].shape[2])))
        for m in model.features if isinstance(m, InvertedResidual)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    return shapes


BLOCK_SHAPES = torchvision_block_shapes()
assert len(BLOCK_SHAPES) == 17, BLOCK_SHAPES


def block_id(shape):
    inp, oup, stride, t, h = shape
    return f"{inp}-{oup}-s{stride}-t{t}-{h}x{h}"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error |got - ref| / |ref| (absolute when ref is all zeros)."""
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    num = (got - ref).norm().item()
    den = ref.norm().item()
    return num / den if den > 0 else num


def make_pair(inp, oup, stride, t, seed=0, dtype=torch.float32, **bn_kwargs):
    """A torchvision InvertedResidual with random BN state and an independent fused copy."""
    torch.manual_seed(seed)
    norm = None
    if bn_kwargs:
        norm = lambda c: torch.nn.BatchNorm2d(c, **bn_kwargs)  # noqa: E731
    tv = InvertedResidual(inp, oup, stride, t, norm_layer=norm).to(dtype)
    randomize_bn(tv)
    fused = FusedInvertedResidual.from_torchvision(copy.deepcopy(tv))
    return tv, fused


def near_relu6_kink(tv, x, train, margin=1e-5):
    """Whether a float64 run of the torchvision block has a ReLU6 input within
    `margin` of 0 or 6 (a ReLU input within `margin` of 0): there the gradient changes by a whole term for a rounding
    difference in the input, so fp32 gradients of two correct implementations
    may legitimately disagree."""
    ref = copy.deepcopy(tv).double().train(train)
    close = []
    hooks = [m.register_forward_pre_hook(
        lambda mod, inp: close.append(bool(torch.minimum(inp[0].abs(), (inp[0] - 6).abs()).min() < margin)))
        for m in ref.modules() if isinstance(m, torch.nn.ReLU6)]
    # (ReLU, in the family's blocks: its one kink at 0)
    hooks += [m.register_forward_pre_hook(lambda mod, inp: close.append(bool(inp[0].abs().min() < margin)))
              for m in ref.modules() if type(m) is torch.nn.ReLU]
    with torch.no_grad():
        ref(x.double())
    for h in hooks:
        h.remove()
    return any(close)


@pytest.fixture
def cpu_backend():
    """Runs the test on the compiled CPU kernel; fails if it is missing."""
    with mnv2_kernels.use_backend("cpu"):
        yield


# Hypothesis budgets (tests/test_fuzz.py, tests/triton): HYPOTHESIS_PROFILE=ci (the
# default: seeded, the same examples every run, well under a minute) or fuzz (make fuzz).
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", derandomize=True, database=None, max_examples=200, deadline=None,
                          print_blob=True, suppress_health_check=_SLOW_OK)
settings.register_profile("fuzz", max_examples=5000, deadline=60_000, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.load_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "ci"))


# tests/triton runs in a process of its own with TRITON_INTERPRET=1 (make
# triton-test), or against a GPU: the interpreter must be chosen before triton's import.
collect_ignore = []
if __import__("os").environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    collect_ignore.append("triton")


def autocast_errors(tv, ours, x, device_type, dtype, train):
    """Under ``torch.autocast(device_type, dtype)``: (our output dtype, torchvision's, our
    error, torchvision's error), the errors normwise against torchvision's float64 run
    without autocast. Each run starts from a copy of the modules (train mode updates the
    running statistics)."""
    ref_model = copy.deepcopy(tv).double().train(train)
    with torch.no_grad():
        ref = ref_model(x.double())
    outs = []
    for model in (ours, tv):
        model = copy.deepcopy(model).train(train)
        with torch.autocast(device_type, dtype=dtype):
            y = model(x)
        outs.append(y)
    return outs[0].dtype, outs[1].dtype, rel_err(outs[0].float(), ref), rel_err(outs[1].float(), ref)
