"""The inverted-residual family on the CPU kernel: 5x5 and 7x7 depthwise steps, ReLU as well
as ReLU6, and the torchvision and timm models built on them.

Ground truth is always the unfused modules. A block is torchvision's InvertedResidual with
its depthwise convolution replaced by a k x k one (padding k // 2) and, for ReLU, its
activations replaced by nn.ReLU; the fused block is made from a copy of it. Models are
torchvision's MNASNet and timm's MobileNetV2, EfficientNet-Lite, MNASNet, SPNASNet and
FBNet with random weights, converted by ``convert_model`` and compared with themselves
unconverted. Also: the constructor's ``kernel_size`` and ``activation``, the operators
(gradcheck, opcheck, statistics, FLOPs), the memory contract at 5x5 and 7x7, stochastic
depth, and the blocks that are left unfused and named.
"""

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.mobilenetv2 import InvertedResidual

import mnv2_kernels
from mnv2_kernels import FusedInvertedResidual, ops
from conftest import FP32_RTOL, randomize_bn, rel_err
from test_blocks import LAYOUTS, _block_errors, _compare_block, _input
from test_memory import assert_nothing_hidden_sized

timm = pytest.importorskip("timm", reason="timm is a test dependency (make test installs it)")

ACTIVATIONS = {"relu6": nn.ReLU6, "relu": nn.ReLU}
# (inp, oup, stride, t): with and without the residual, t == 1 and t > 1, stride 1 and 2
SHAPES = [(16, 16, 1, 6), (16, 24, 1, 6), (16, 24, 2, 6), (24, 24, 1, 1), (24, 16, 2, 1)]


def family_block(inp, oup, stride, t, k, activation, seed=0, dtype=torch.float32):
    """torchvision's block with a k x k depthwise convolution and the activation, random
    batch-norm state; the unfused ground truth."""
    torch.manual_seed(seed)
    block = InvertedResidual(inp, oup, stride, t)
    stage = block.conv[-3]
    hidden = stage[0].in_channels
    stage[0] = nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False)
    for s in block.conv[:-2]:
        s[2] = ACTIVATIONS[activation](inplace=True)
    randomize_bn(block)
    return block.to(dtype)


def family_pair(case, dtype=torch.float32, fmt=torch.contiguous_format):
    inp, oup, stride, t, k, act = case
    tv = family_block(inp, oup, stride, t, k, act, seed=sum(case[:5]), dtype=dtype).to(memory_format=fmt)
    return tv, FusedInvertedResidual.from_torchvision(copy.deepcopy(tv))


CASES = [(*s, k, act) for k in (3, 5, 7) for act in ACTIVATIONS for s in SHAPES]


def case_id(c):
    inp, oup, s, t, k, act = c
    return f"{inp}-{oup}-s{s}-t{t}-k{k}-{act}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_block_matches_unfused(case, mode, layout, cpu_backend):
    fmt = LAYOUTS[layout]
    _compare_block(lambda: family_pair(case, fmt=fmt), lambda seed: _input(2, case[0], 11, 9, fmt, seed),
                   train=mode == "train")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", [c for c in CASES if c[4] != 3], ids=case_id)
def test_block_matches_unfused_float64(case, mode, layout, cpu_backend):
    fmt = LAYOUTS[layout]
    tv, fused = family_pair(case, torch.float64, fmt)
    x = _input(3, case[0], 9, 10, fmt, dtype=torch.float64)
    assert not _block_errors(tv, fused, x, train=mode == "train", tol=1e-10)


@pytest.mark.parametrize("k", [5, 7])
@pytest.mark.parametrize("activation", ["relu6", "relu", nn.ReLU])
def test_constructor_builds_the_family_block(k, activation):
    """kernel_size and activation as keywords; the state_dict is the unfused block's."""
    act = activation if isinstance(activation, str) else "relu"
    fused = FusedInvertedResidual(16, 24, 2, 6, kernel_size=k, activation=activation)
    dw = fused.conv[1][0]
    assert dw.kernel_size == (k, k) and dw.padding == (k // 2, k // 2) and dw.stride == (2, 2)
    assert all(type(s[2]) is ACTIVATIONS[act] for s in fused.conv[:2])
    tv = family_block(16, 24, 2, 6, k, act)
    assert list(fused.state_dict()) == list(tv.state_dict())
    fused.load_state_dict(tv.state_dict())
    tv.eval()
    fused.eval()
    x = torch.randn(2, 16, 9, 9)
    assert rel_err(fused(x), tv(x)) <= FP32_RTOL
    # MobileNetV2's defaults
    default = FusedInvertedResidual(16, 24, 2, 6)
    assert default.conv[1][0].kernel_size == (3, 3) and type(default.conv[1][2]) is nn.ReLU6


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=4), "kernel_size must be 3, 5 or 7"),
    (dict(kernel_size=9), "kernel_size must be 3, 5 or 7"),
    (dict(activation="gelu"), "activation must be 'relu6' or 'relu'"),
    (dict(activation=nn.Hardswish), "activation must be 'relu6' or 'relu'"),
])
def test_constructor_rejects_what_the_kernels_do_not_compute(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedInvertedResidual(16, 16, 1, 6, **kwargs)


def test_mixed_activations_are_refused():
    block = family_block(16, 16, 1, 6, 5, "relu6")
    block.conv[0][2] = nn.ReLU()
    with pytest.raises(TypeError, match="ReLU6 \\(or ReLU, the same in both stages\\)"):
        FusedInvertedResidual.from_torchvision(block)


def test_activation_replaced_in_place_is_followed(cpu_backend):
    """torchvision's quantization preparation replaces ReLU6 by ReLU in place; the fused
    block reads its stages on every call."""
    tv, fused = family_pair((16, 16, 1, 6, 5, "relu6"))
    tv.eval()
    fused.eval()
    x = 4 * torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert rel_err(fused(x), tv(x)) <= FP32_RTOL
        for block in (tv, fused):
            for stage in block.conv[:2]:
                stage[2] = nn.ReLU(inplace=True)
        y_tv, y_f = tv(x), fused(x)
    assert rel_err(y_f, y_tv) <= FP32_RTOL


def _args(n, cin, h, w, cout, t, stride, residual, k, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = cin * t

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()

    x = (2 * torch.randn(n, cin, h, w, generator=g, dtype=dtype)).requires_grad_()
    we, be = (r(hidden, cin, scale=0.5), r(hidden)) if t != 1 else (None, None)
    return (x, we, be, r(hidden, k, k, scale=0.5), r(hidden), r(cout, hidden, scale=0.3), r(cout), stride, residual)


OP_CASES = [(2, 4, 6, 5, 4, 3, 1, True, 5), (1, 5, 7, 6, 3, 1, 2, False, 7), (2, 3, 4, 4, 3, 2, 1, True, 7)]


@pytest.mark.parametrize("activation", ["relu6", "relu"])
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: f"k{c[-1]}-t{c[5]}-s{c[6]}")
def test_gradcheck_and_opcheck(case, activation):
    args = _args(*case)

    def fn(*a):
        return ops.fused_inverted_residual(*a, activation=activation)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.mnv2.fused_inverted_residual.default, plain + (1, activation))
    y = torch.ops.mnv2.fused_inverted_residual(*plain, 1, activation)
    torch.library.opcheck(torch.ops.mnv2.fused_inverted_residual_backward.default,
                          (torch.randn_like(y),) + plain + (1, activation))
    packed = ops.pack_weights(*plain[1:7])
    x, stride, residual, k = plain[0], case[6], case[7], case[8]
    packed_args = (x, packed, plain[3].shape[0], plain[5].shape[0], plain[1] is not None, stride, residual, 1, k,
                   activation)
    torch.library.opcheck(torch.ops.mnv2.fused_inverted_residual_packed.default, packed_args)
    assert rel_err(torch.ops.mnv2.fused_inverted_residual_packed(*packed_args), y) <= 1e-12
    torch.library.opcheck(torch.ops.mnv2.depthwise_moments.default, (x, *plain[1:4], stride, 1, activation))


@pytest.mark.parametrize("activation", ["relu6", "relu"])
@pytest.mark.parametrize("k", [5, 7])
def test_depthwise_moments_match_pytorch(k, activation):
    x, we, be, wd, *_ = _args(2, 4, 9, 7, 4, 6, 2, False, k, seed=3)
    act = nn.functional.relu6 if activation == "relu6" else nn.functional.relu
    z2 = nn.functional.conv2d(act(nn.functional.conv2d(x, we[:, :, None, None], be)), wd[:, None], None, 2, k // 2,
                              groups=wd.shape[0])
    var, mean = torch.var_mean(z2, dim=(0, 2, 3), correction=0)
    got_mean, got_var = ops.depthwise_moments(x, we, be, wd, 2, 1, activation)
    assert rel_err(got_mean, mean) <= 1e-12 and rel_err(got_var, var) <= 1e-12
    g = torch.randn(2, wd.shape[0], dtype=torch.float64)
    leaves = (x, we, be, wd)
    expected = torch.autograd.grad((mean * g[0]).sum() + (var * g[1]).sum(), leaves)
    got = torch.autograd.grad((got_mean * g[0]).sum() + (got_var * g[1]).sum(), leaves)
    for e, a in zip(expected, got):
        assert rel_err(a, e) <= 1e-10


@pytest.mark.parametrize("k", [5, 7])
def test_flops_count_the_kernel_taps(k, cpu_backend):
    tv, fused = family_pair((16, 24, 2, 6, k, "relu"))
    x = torch.randn(2, 16, 14, 14)
    counts = []
    for block in (tv.eval(), fused.eval()):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            block(x)
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("k", [5, 7])
def test_block_allocates_and_saves_nothing_hidden_sized(k, train, cpu_backend):
    _, fused = family_pair((96, 96, 1, 6, k, "relu"))
    x = torch.randn(8, 96, 14, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert_nothing_hidden_sized(fused, x, train)


def test_operators_reject_kernels_and_activations_they_do_not_compute(cpu_backend):
    x, we, be, wd, bd, wp, bp, *_ = (a.detach() if isinstance(a, torch.Tensor) else a
                                     for a in _args(1, 4, 5, 5, 4, 6, 1, True, 3, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="the depthwise kernel must be 3x3, 5x5 or 7x7"):
        torch.ops.mnv2.fused_inverted_residual(x, we, be, torch.randn(24, 4, 4), bd, wp, bp, 1, True)
    with pytest.raises(RuntimeError, match="the depthwise kernel must be 3x3, 5x5 or 7x7"):
        torch.ops.mnv2.fused_inverted_residual(x, we, be, torch.randn(24, 5, 3), bd, wp, bp, 1, True)
    with pytest.raises(RuntimeError, match='activation must be "relu6" or "relu", got "gelu"'):
        torch.ops.mnv2.fused_inverted_residual(x, we, be, wd, bd, wp, bp, 1, True, 1, "gelu")
    with pytest.raises(RuntimeError, match="dilation must be between 1 and 10 for a 7x7"):
        torch.ops.mnv2.fused_inverted_residual(x, we, be, torch.randn(24, 7, 7), bd, wp, bp, 1, True, 11)
    packed = ops.pack_weights(we, be, torch.randn(24, 5, 5), bd, wp, bp)
    with pytest.raises(RuntimeError, match="were not packed for this block"):
        ops.fused_inverted_residual_packed(x, packed, 24, 4, True, 1, True, 1, 3)
    with pytest.raises(RuntimeError, match="kernel size must be 3, 5 or 7, got 4"):
        ops.fused_inverted_residual_packed(x, packed, 24, 4, True, 1, True, 1, 4)


# -- models ------------------------------------------------------------------------------
# (name, blocks converted): every inverted-residual and depthwise-separable block of the
# architecture. torchvision's MNASNet: its 16 _InvertedResidual blocks (its first,
# depthwise-separable stage is a plain Sequential of layers and stays as it is). timm: the
# first depthwise-separable block and every inverted residual.
MODELS = [
    ("torchvision.mnasnet0_5", 16), ("torchvision.mnasnet0_75", 16), ("torchvision.mnasnet1_0", 16),
    ("torchvision.mnasnet1_3", 16),
    ("timm.mobilenetv2_050", 17), ("timm.mobilenetv2_100", 17), ("timm.mobilenetv2_110d", 22),
    ("timm.mobilenetv2_120d", 26), ("timm.mobilenetv2_140", 17),
    ("timm.efficientnet_lite0", 16), ("timm.efficientnet_lite1", 21), ("timm.efficientnet_lite2", 21),
    ("timm.efficientnet_lite3", 24), ("timm.efficientnet_lite4", 30),
    ("timm.mnasnet_100", 17), ("timm.spnasnet_100", 21), ("timm.fbnetc_100", 21),
]


def make_model(name, **kwargs):
    source, model_name = name.split(".", 1)
    if source == "torchvision":
        return getattr(torchvision.models, model_name)(**kwargs)
    return timm.create_model(model_name, pretrained=False, **kwargs)


def _randomize(model, seed):
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _blocks(model):
    return sum(isinstance(m, FusedInvertedResidual) for m in model.modules())


def _family_blocks(model):
    """The blocks of the kinds convert_model recognises in an unconverted model."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv
    from timm.models._efficientnet_blocks import InvertedResidual as TimmInvertedResidual
    from torchvision.models.mnasnet import _InvertedResidual

    kinds = (InvertedResidual, _InvertedResidual, TimmInvertedResidual, DepthwiseSeparableConv)
    return sum(isinstance(m, kinds) for m in model.modules())


def _check_grads(model, fused, tol=1e-10):
    """Every parameter's gradient against the unconverted model's, relative to the norm of
    the whole gradient: a batch norm followed by another one in train mode has a bias
    gradient that is zero but for rounding, which no per-parameter ratio can measure."""
    total = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters())).item()
    assert total > 0
    for (name, p_ref), p in zip(model.named_parameters(), fused.parameters()):
        assert p.grad is not None and p.grad.shape == p_ref.grad.shape, name
        assert (p.grad - p_ref.grad).norm().item() <= tol * total, name


@pytest.mark.parametrize("name, blocks", MODELS, ids=[m[0] for m in MODELS])
def test_converted_model_equals_unconverted(name, blocks, cpu_backend):
    model = make_model(name)
    _randomize(model, 0)
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every block converts: no warning
        fused = mnv2_kernels.convert_model(copy.deepcopy(model), strict=True)
    assert _blocks(fused) == blocks == _family_blocks(model)
    assert list(fused.state_dict()) == keys
    # eval logits, fp32, both layouts
    model.eval()
    fused.eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        for fmt in LAYOUTS.values():
            assert rel_err(fused(x.contiguous(memory_format=fmt)), ref) <= FP32_RTOL
    # train mode in float64: outputs, every gradient, the running statistics
    model = model.double().train()
    fused = fused.double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(4)  # (the same dropout draws in the classifier)
    y_ref = model(x)
    torch.manual_seed(4)
    y = fused(x)
    assert rel_err(y, y_ref) <= 1e-10
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y_ref.backward(gy)
    y.backward(gy)
    _check_grads(model, fused)
    for (bname, b_ref), b in zip(model.named_buffers(), fused.buffers()):
        assert rel_err(b, b_ref) <= 1e-10, bname


def test_drop_path_applies_to_the_branch_as_in_timm(cpu_backend):
    """Stochastic depth in train mode: the same draws drop the same blocks' branches."""
    model = make_model("timm.efficientnet_lite0", drop_path_rate=0.5).double().train()
    _randomize(model, 4)
    fused = mnv2_kernels.convert_model(copy.deepcopy(model), strict=True)
    assert any(type(m.drop_path).__name__ == "DropPath" for m in fused.modules() if hasattr(m, "drop_path"))
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    outputs = []
    for m in (model, fused):
        torch.manual_seed(11)
        y = m(x)
        y.square().sum().backward()
        outputs.append(y)
    assert rel_err(outputs[1], outputs[0]) <= 1e-10
    _check_grads(model, fused)


@pytest.mark.parametrize("name, left, reason", [
    ("timm.tf_efficientnet_lite0", 4, "Conv2dSame, not an nn.Conv2d (TensorFlow 'same' padding"),
    ("timm.semnasnet_100", 8, "it has squeeze-and-excitation (SqueezeExcite)"),
])
def test_blocks_that_do_not_fit_are_left_and_named(name, left, reason, cpu_backend):
    model = make_model(name).eval()
    _randomize(model, 5)
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match=f"{left} of \\d+ blocks left unfused") as record:
        fused = mnv2_kernels.convert_model(copy.deepcopy(model))
    assert reason in str(record[0].message)
    assert list(fused.state_dict()) == keys and _blocks(fused) > 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= FP32_RTOL
    with pytest.raises(ValueError, match=reason.split(" (")[0].replace("(", "\\(").replace(")", "\\)")):
        mnv2_kernels.convert_model(copy.deepcopy(model), strict=True)


def test_relu_after_the_projection_is_refused():
    block = timm.models._efficientnet_blocks.DepthwiseSeparableConv(16, 16, pw_act=True)
    with pytest.raises(TypeError, match="its projection has an activation"):
        mnv2_kernels.FusedTimmBlock.from_block(block)


# -- drop-in: compile, fx, ONNX ------------------------------------------------------------

class _Stages(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def _small_family_model(name):
    """The first stages of a converted model (its 5x5 blocks included) and the unconverted ones."""
    model = make_model(name).eval()
    _randomize(model, 6)
    if name.startswith("timm"):
        model = _Stages([model.conv_stem, model.bn1, *model.blocks[:4]])
    else:
        model = _Stages(model.layers[:11])
    fused = mnv2_kernels.convert_model(copy.deepcopy(model), strict=True)
    return model, fused


@pytest.mark.parametrize("name", ["timm.efficientnet_lite0", "torchvision.mnasnet1_0"])
def test_converted_model_compiles_with_fullgraph(name, cpu_backend):
    model, fused = _small_family_model(name)
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= FP32_RTOL
    model.train()
    fused.train()
    y = compiled(x)  # (train mode: batch statistics, through the same fullgraph)
    torch.manual_seed(0)
    assert rel_err(y, model(x)) <= FP32_RTOL


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_converted_model_exports_to_onnx(dynamo, cpu_backend):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from test_interop import STANDARD_ONNX_DOMAINS, _export

    model, fused = _small_family_model("timm.efficientnet_lite0")
    blob = _export(fused, torch.rand(2, 3, 64, 64), dynamo)
    assert {n.domain for n in onnx.load_from_string(blob).graph.node} <= STANDARD_ONNX_DOMAINS
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 64, 64)
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(y), model(x)) < 1e-5


def test_converted_model_under_fx(cpu_backend):
    model, fused = _small_family_model("timm.efficientnet_lite0")
    traced = torch.fx.symbolic_trace(fused)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(traced(x), model(x)) <= FP32_RTOL
