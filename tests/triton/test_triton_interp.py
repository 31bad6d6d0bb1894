"""The Triton kernels of the fused block against the float64 PyTorch reference.

Runs under Triton's interpreter on the CPU (TRITON_INTERPRET=1, set before
triton is imported; see conftest.py) or, without the interpreter, on a CUDA
GPU. Small shapes only: the interpreter is slow.

The block family (depthwise kernels of 3, 5 and 7, ReLU6 or ReLU) is checked on
its own small cases (FAMILY_CASES); the other cases are MobileNetV2's 3x3 ReLU6
block.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    raise RuntimeError(
        "tests/triton need TRITON_INTERPRET=1 in the environment (set before triton is imported) "
        "or a CUDA GPU: run `TRITON_INTERPRET=1 python -m pytest tests/triton`")

from mnv2_kernels import reference  # noqa: E402
from mnv2_kernels.triton_kernels import fused_ir, interpreting, is_available  # noqa: E402
from mnv2_kernels.triton_kernels import ops as triton_ops  # noqa: E402

triton_ops.register()

DEVICE = "cpu" if interpreting() else "cuda"
OUT_RTOL = 1e-5
GRAD_RTOL = 1e-4
NAMES = ("x", "w_expand", "b_expand", "w_dw", "b_dw", "w_project", "b_project")


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_args(n, cin, h, w, t, cout, stride, residual, channels_last=False, seed=0, dtype=torch.float32,
              kernel_size=3):
    """Modest random data (ReLU6 kinks are rarely hit), fixed seed; a kernel_size x kernel_size
    depthwise step."""
    g = torch.Generator().manual_seed(seed)
    hidden = cin * t

    def r(*shape, scale=0.3, shift=0.0):
        return (scale * torch.randn(*shape, generator=g) + shift).to(dtype).to(DEVICE)

    x = r(n, cin, h, w, scale=0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    we, be = (r(hidden, cin), r(hidden, shift=1.0)) if t != 1 else (None, None)
    return [x, we, be, r(hidden, kernel_size, kernel_size), r(hidden, scale=0.1, shift=0.5), r(cout, hidden),
            r(cout, scale=0.1), stride, residual]


def dyadic(t, bits, bound):
    """t rounded to multiples of 2^-bits within +-bound: sums of a few products of such numbers
    are exact in float32, so that the activations' masks (0 < z < 6, z > 0) are exactly the
    float64 reference's."""
    scale = 2.0 ** bits
    return (t * scale).round().clamp(-bound * scale, bound * scale) / scale


def make_family_args(n, cin, h, w, t, cout, stride, residual, kernel_size, channels_last=False, seed=0):
    """Dyadic data for a block of the family (see dyadic) whose expand and depthwise outputs
    reach beyond 6 in places and below 0 in others, so that ReLU and ReLU6 differ after both
    steps: the depthwise weights scale as 1 / kernel_size, so that its outputs keep their
    size as the taps multiply."""
    g = torch.Generator().manual_seed(seed)
    hidden = cin * t

    def r(*shape, scale=1.0, shift=0.0, bits=6, bound=4.0):
        return dyadic(scale * torch.randn(*shape, generator=g) + shift, bits, bound).to(DEVICE)

    x = r(n, cin, h, w, scale=2.0, bits=4, bound=8.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    we, be = (r(hidden, cin), r(hidden, scale=2.0, shift=2.0)) if t != 1 else (None, None)
    w_dw = r(hidden, kernel_size, kernel_size, scale=3.0 / kernel_size, shift=0.5 / kernel_size)
    return [x, we, be, w_dw, r(hidden, scale=2.0), r(cout, hidden, scale=0.5), r(cout), stride, residual]


def block_reference(*args):
    """The reference of operator arguments, with or without the trailing dilation and
    activation (the kernel size is w_dw's)."""
    return reference.inverted_residual(*args)


def reference_grads(args, grad_y=None, seed=1):
    """(y64, grad_y, grads64) of the float64 reference; grads64[i] is None for absent inputs.
    ``args``: the operator's, with or without the trailing dilation and activation."""
    a64 = [a.detach().double().cpu().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    y = block_reference(*a64)
    if grad_y is None:
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y.backward(grad_y)
    return y.detach(), grad_y, [a.grad if isinstance(a, torch.Tensor) else None for a in a64[:7]]


# (N, Cin, H, W, t, Cout, stride, residual, channels_last)
CASES = [
    (1, 3, 7, 5, 6, 8, 1, False, False),
    (2, 8, 3, 5, 6, 8, 1, True, True),
    (1, 8, 9, 7, 6, 24, 2, False, False),
    (2, 3, 7, 5, 6, 5, 2, False, True),
    (1, 24, 5, 3, 2, 24, 1, True, False),
    (1, 8, 7, 7, 1, 16, 1, False, True),
    (2, 16, 3, 5, 1, 16, 1, True, False),
    (1, 24, 9, 5, 1, 8, 2, False, False),
    (1, 8, 1, 1, 6, 8, 1, True, True),
    (2, 3, 1, 3, 6, 8, 2, False, False),
    (1, 40, 3, 4, 2, 8, 2, False, True),  # Cin over 3 slices of the tiled expand
    (1, 4, 3, 2, 2, 136, 1, False, False),  # Cout over two blocks of the weight-gradient kernel
    (2, 4, 11, 9, 2, 4, 1, True, True),  # several tiles and halos per image
    (1, 4, 10, 9, 2, 8, 2, False, False),
]


def case_id(c):
    n, cin, h, w, t, cout, s, res, cl = c
    return f"n{n}-c{cin}-{h}x{w}-t{t}-o{cout}-s{s}{'-res' if res else ''}{'-cl' if cl else ''}"


def test_available():
    assert is_available()
    assert interpreting() == (os.environ.get("TRITON_INTERPRET") == "1")


# (N, Cin, H, W, t, Cout, stride, residual, channels_last, dilation): atrous blocks (Mobile
# DeepLabv3). Sides smaller than the dilation, a dilation beyond both sides (run as the larger
# side), 1x1 (where it changes nothing), an odd dilation at stride 2 (each phase's input
# lattice starts one row or column before the image, or in it) and an even one (the odd rows
# and columns are under no tap), several tiles per phase.
DILATED_CASES = [
    (1, 8, 9, 7, 6, 8, 1, True, True, 2),
    (2, 3, 7, 5, 6, 8, 1, False, False, 2),
    (1, 8, 9, 7, 6, 16, 2, False, True, 2),
    (1, 16, 7, 6, 1, 16, 1, True, False, 2),
    (2, 8, 3, 5, 6, 8, 1, True, True, 4),
    (1, 8, 3, 5, 1, 8, 2, False, False, 4),
    (1, 4, 11, 9, 2, 4, 1, True, False, 4),
    (1, 4, 10, 9, 2, 8, 2, False, True, 4),
    (1, 8, 1, 1, 6, 8, 1, True, False, 4),
    (2, 4, 7, 5, 2, 8, 2, False, True, 3),
    (1, 4, 3, 5, 6, 4, 1, True, False, 8),
]


def dilated_case_id(c):
    return f"{case_id(c[:9])}-d{c[9]}"


def check_forward_backward(n, cin, h, w, t, cout, stride, residual, cl, dilation=None):
    """fused_ir.forward and backward against the float64 reference (dilated when ``dilation``)."""
    args = make_args(n, cin, h, w, t, cout, stride, residual, channels_last=cl)
    if dilation is not None:
        args.append(dilation)
    check_block(args, cl)


def check_block(args, cl):
    """fused_ir.forward and backward of operator arguments ``args`` (x channels_last when
    ``cl``) against the float64 reference."""
    y64, gy64, g64 = reference_grads(args)

    y = fused_ir.forward(*args)
    assert y.shape == y64.shape and y.dtype == args[0].dtype
    fmt = torch.channels_last if cl else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    assert rel_err(y, y64) <= OUT_RTOL

    gy = gy64.float().to(DEVICE)
    if cl:
        gy = gy.contiguous(memory_format=torch.channels_last)
    grads = fused_ir.backward(gy, *args)
    assert len(grads) == 7
    assert grads[0].is_contiguous(memory_format=fmt)
    for name, got, want, arg in zip(NAMES, grads, g64, args):
        if arg is None:
            assert tuple(got.shape) == ((0, 0) if name == "w_expand" else (0,)), name
            continue
        assert got.shape == arg.shape and got.dtype == arg.dtype, name
        assert rel_err(got, want) <= GRAD_RTOL, (name, rel_err(got, want))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward(case):
    check_forward_backward(*case)


@pytest.mark.parametrize("case", DILATED_CASES, ids=dilated_case_id)
def test_dilated_forward_backward(case):
    check_forward_backward(*case)


def test_dilation_beyond_the_image_runs_as_its_larger_side():
    """Every off-centre tap reads padding once the dilation reaches the larger side: the
    kernels run such a dilation as that side, with the same results."""
    args = make_args(1, 4, 3, 5, 2, 4, 1, True)
    assert torch.equal(fused_ir.forward(*args, 5), fused_ir.forward(*args, 1000))
    y64, _, _ = reference_grads(args + [1000])
    assert rel_err(fused_ir.forward(*args, 1000), y64) <= OUT_RTOL


# The block family: (kernel size, activation, t, stride, residual), every combination, on
# images of a few tiles (the interpreter's tiles hold at most 16 outputs) and one hidden
# chunk (16 channels under the interpreter; the 3x3 cases above and the fuzz have several).
FAMILY_CASES = [(k, act, t, stride, residual)
                for k in fused_ir.DW_KERNELS for act in fused_ir.ACTIVATIONS for t in (1, 6) for stride in (1, 2)
                for residual in ((False, True) if stride == 1 else (False,))]


def family_case_id(c):
    k, act, t, stride, residual = c
    return f"k{k}-{act}-t{t}-s{stride}{'-res' if residual else ''}"


def family_block(k, t, stride, residual, channels_last=None):
    """(args, channels_last) of a FAMILY_CASES block: Cin 2 (t 6) or 4 (t 1), Cout Cin or 3;
    7 x 5 images at stride 1, 9 x 7 at stride 2 (outputs 5 x 4)."""
    cin = 4 if t == 1 else 2
    h, w = (7, 5) if stride == 1 else (9, 7)
    cl = (k + t + stride) % 2 == 0 if channels_last is None else channels_last
    return make_family_args(1, cin, h, w, t, cin if residual else 3, stride, residual, k, channels_last=cl,
                            seed=k * 100 + t * 10 + stride), cl


def assert_activations_clip(x, w_expand, b_expand, w_dw, b_dw, stride):
    """The data reach both activations' kinks: the expand's and the depthwise step's
    outputs are above 6 in places and below 0 in others, so that ReLU and ReLU6 differ."""
    x, w_expand, b_expand, w_dw, b_dw = (None if a is None else a.double().cpu()
                                        for a in (x, w_expand, b_expand, w_dw, b_dw))
    a1 = x
    if w_expand is not None:
        z1 = F.conv2d(x, w_expand[:, :, None, None], b_expand)
        assert (z1 > 6).any() and (z1 < 0).any()
        a1 = z1.clamp(0, 6)
    z2 = F.conv2d(a1, w_dw[:, None], b_dw, stride=stride, padding=w_dw.shape[-1] // 2, groups=w_dw.shape[0])
    assert (z2 > 6).any() and (z2 < 0).any()


@pytest.mark.parametrize("case", FAMILY_CASES, ids=family_case_id)
def test_family_forward_backward(case):
    """Depthwise kernels of 3, 5 and 7 with ReLU6 or ReLU: the output and every gradient
    against the float64 reference."""
    k, act, t, stride, residual = case
    args, cl = family_block(k, t, stride, residual)
    assert_activations_clip(*args[:5], stride)
    check_block(args + [1, act], cl)


# The statistics of the family's blocks: the activation acts only with the expand (z2 is
# the depthwise output before its activation).
FAMILY_MOMENTS_CASES = [(k, act, t, stride) for k in fused_ir.DW_KERNELS for t in (1, 6)
                        for act in (fused_ir.ACTIVATIONS if t != 1 else ("relu6",)) for stride in (1, 2)]


@pytest.mark.parametrize("case", FAMILY_MOMENTS_CASES, ids=lambda c: "k{}-{}-t{}-s{}".format(*c))
def test_family_depthwise_moments(case):
    """Train-mode bn2 statistics of the family's blocks and their backward against float64
    PyTorch."""
    k, act, t, stride = case
    args, cl = family_block(k, t, stride, False)
    check_moments(*args[:4], stride, cl, activation=act)


def test_family_kernel_size_and_activation_reach_the_kernels():
    """ReLU and ReLU6 give different blocks on these data, and so do 5x5 and 7x7 weights from
    3x3 ones padded with zeros (the same block): a kernel that ignored either would fail."""
    args, _ = family_block(5, 6, 1, True)
    relu6, relu = fused_ir.forward(*args, 1, "relu6"), fused_ir.forward(*args, 1, "relu")
    assert rel_err(relu6, relu) > 1e-2
    assert rel_err(relu, block_reference(*[a.double() if isinstance(a, torch.Tensor) else a for a in args],
                                         1, "relu")) <= OUT_RTOL
    small = make_args(1, 4, 7, 6, 2, 4, 1, True)
    y3 = fused_ir.forward(*small)
    for k in (5, 7):
        padded = list(small)
        padded[3] = F.pad(small[3], [(k - 3) // 2] * 4)
        assert torch.allclose(fused_ir.forward(*padded), y3, rtol=1e-5, atol=1e-6), k
        ring = torch.ones(k, k, device=DEVICE)
        c = (k - 3) // 2
        ring[c:c + 3, c:c + 3] = 0
        padded[3] = padded[3] + 0.1 * ring  # the taps outside the 3x3 now count
        assert rel_err(fused_ir.forward(*padded), y3) > 1e-2, k


@pytest.mark.parametrize("k", [5, 7])
def test_family_dilated(k):
    """A dilated 5x5 or 7x7 depthwise step (padding dilation * (k // 2)), odd dilation at
    stride 2 (phases whose input lattices start before the image) with ReLU (3x3:
    DILATED_CASES)."""
    args = make_family_args(1, 2, 6, 5, 6, 3, 2, False, k, seed=k) + [3, "relu"]
    check_block(args, False)


def test_strided_input():
    """Neither NCHW- nor channels_last-contiguous: a sliced view; also an expanded grad_y."""
    args = make_args(1, 8, 5, 3, 6, 8, 1, True)
    base = args[0]
    big = torch.zeros(1, 8, 7, 5, device=DEVICE)
    big[:, :, 1:6, 1:4] = base
    args[0] = big[:, :, 1:6, 1:4]
    assert not args[0].is_contiguous()
    gy64 = torch.full((1, 8, 5, 3), 0.5, dtype=torch.float64)
    y64, _, g64 = reference_grads(args, grad_y=gy64)
    assert rel_err(fused_ir.forward(*args), y64) <= OUT_RTOL
    gy = torch.tensor(0.5, device=DEVICE).expand(1, 8, 5, 3)  # stride-0 gradient, as from y.sum()
    grads = fused_ir.backward(gy, *args)
    for name, got, want in zip(NAMES, grads, g64):
        assert rel_err(got, want) <= GRAD_RTOL, name


def test_deterministic():
    args = make_args(2, 8, 5, 3, 6, 8, 2, False)
    _, gy64, _ = reference_grads(args)
    gy = gy64.float().to(DEVICE)
    g1 = fused_ir.backward(gy, *args)
    g2 = fused_ir.backward(gy, *args)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_empty_batch():
    args = make_args(1, 8, 5, 5, 6, 8, 1, True)
    args[0] = args[0][:0]
    y = fused_ir.forward(*args)
    assert y.shape == (0, 8, 5, 5)
    grads = fused_ir.backward(torch.zeros_like(y), *args)
    assert grads[0].shape == args[0].shape
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_registered_op_autograd():
    """Through the operator and torch.autograd: every gradient flows, only where asked."""
    args = make_args(1, 8, 5, 3, 6, 8, 1, True, channels_last=True)
    y64, gy64, g64 = reference_grads(args)
    leaves = [a.clone().requires_grad_() for a in args[:7]]
    y = torch.ops.mnv2.triton_fused_inverted_residual(*leaves, *args[7:])
    assert rel_err(y, y64) <= OUT_RTOL
    y.backward(gy64.float().to(DEVICE))
    for name, leaf, want in zip(NAMES, leaves, g64):
        assert leaf.grad is not None, name
        assert rel_err(leaf.grad, want) <= GRAD_RTOL, name

    # Only x needs grad, t == 1 (no expand weights).
    args = make_args(1, 8, 5, 5, 1, 8, 2, False)
    x = args[0].clone().requires_grad_()
    w_dw = args[3].clone()
    y = torch.ops.mnv2.triton_fused_inverted_residual(x, None, None, w_dw, *args[4:])
    y.sum().backward()
    _, _, g64 = reference_grads(args, grad_y=torch.ones(y.shape, dtype=torch.float64))
    assert rel_err(x.grad, g64[0]) <= GRAD_RTOL
    assert w_dw.grad is None


def test_registered_op_family():
    """The operator's activation and w_dw's kernel size reach the kernels, the fake kernel,
    autograd and the decomposition; opcheck on both operators."""
    from torch._decomp import decomposition_table

    op = torch.ops.mnv2.triton_fused_inverted_residual
    args = make_family_args(1, 2, 5, 4, 6, 2, 1, True, 7, channels_last=True, seed=7) + [1, "relu"]
    y64, gy64, g64 = reference_grads(args)
    leaves = [a.clone().requires_grad_() for a in args[:7]]
    y = op(*leaves, *args[7:])
    assert rel_err(y, y64) <= OUT_RTOL
    y.backward(gy64.float().to(DEVICE).contiguous(memory_format=torch.channels_last))
    for name, leaf, want in zip(NAMES, leaves, g64):
        assert rel_err(leaf.grad, want) <= GRAD_RTOL, name
    assert rel_err(op(*args[:9], activation="relu"), y64) <= OUT_RTOL
    assert rel_err(decomposition_table[op.default](*args), y64) <= OUT_RTOL

    args = make_args(1, 8, 3, 3, 2, 8, 2, False, kernel_size=5)
    for i in range(7):
        args[i] = args[i].requires_grad_()
    torch.library.opcheck(op.default, tuple(args) + (1, "relu"))
    gy = torch.randn(1, 8, 2, 2, device=DEVICE)
    torch.library.opcheck(torch.ops.mnv2.triton_fused_inverted_residual_backward.default,
                          (gy, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args], 2, "relu"))


def test_registered_op_dilated():
    """The operator's dilation reaches the kernels, the fake kernel, autograd and the
    decomposition; opcheck on both operators."""
    from torch._decomp import decomposition_table

    args = make_args(1, 8, 5, 3, 6, 8, 1, True, channels_last=True) + [2]
    y64, gy64, g64 = reference_grads(args)
    leaves = [a.clone().requires_grad_() for a in args[:7]]
    op = torch.ops.mnv2.triton_fused_inverted_residual
    y = op(*leaves, *args[7:])
    assert rel_err(y, y64) <= OUT_RTOL
    y.backward(gy64.float().to(DEVICE))
    for name, leaf, want in zip(NAMES, leaves, g64):
        assert rel_err(leaf.grad, want) <= GRAD_RTOL, name
    assert rel_err(op(*args[:9], dilation=2), y64) <= OUT_RTOL
    assert rel_err(decomposition_table[op.default](*args), y64) <= OUT_RTOL

    args = make_args(1, 8, 3, 3, 2, 8, 2, False)
    for i in range(7):
        args[i] = args[i].requires_grad_()
    torch.library.opcheck(op.default, tuple(args) + (3,))
    gy = torch.randn(1, 8, 2, 2, device=DEVICE)
    torch.library.opcheck(torch.ops.mnv2.triton_fused_inverted_residual_backward.default,
                          (gy, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args], 4))


def test_register_idempotent():
    """register() defines both operators once (a second definition would raise) and
    records which definition it used: triton_op where it is usable, else custom_op."""
    triton_ops.register()
    triton_ops.register()
    assert triton_ops._op_exists(triton_ops.FWD) and triton_ops._op_exists(triton_ops.BWD)
    assert triton_ops.USED_TRITON_OP is triton_ops._triton_op_usable()
    if interpreting():
        # Interpreted kernels cannot be traced (see ops.py): the custom_op fallback is used.
        assert triton_ops.USED_TRITON_OP is False


def test_triton_op_path_eager():
    """The triton_op + wrap_triton definition, in eager mode, under a private name."""
    fwd, bwd = "mnv2::_test_triton_op_fir", "mnv2::_test_triton_op_fir_backward"
    try:
        torch.ops.mnv2._test_triton_op_fir
    except (AttributeError, RuntimeError):
        triton_ops._define(fwd, bwd, use_triton_op=True)
    args = make_args(1, 8, 5, 5, 6, 8, 2, False)
    y64, gy64, g64 = reference_grads(args)
    x = args[0].clone().requires_grad_()
    y = torch.ops.mnv2._test_triton_op_fir(x, *args[1:])
    assert rel_err(y, y64) <= OUT_RTOL
    y.backward(gy64.float().to(DEVICE))
    assert rel_err(x.grad, g64[0]) <= GRAD_RTOL


def test_opcheck():
    args = make_args(1, 8, 3, 3, 2, 8, 1, True)
    for i in range(7):
        args[i] = args[i].requires_grad_()
    torch.library.opcheck(torch.ops.mnv2.triton_fused_inverted_residual.default, tuple(args))


def test_opcheck_backward_op():
    args = make_args(1, 8, 3, 3, 1, 8, 2, False)
    gy = torch.randn(1, 8, 2, 2, device=DEVICE)
    torch.library.opcheck(torch.ops.mnv2.triton_fused_inverted_residual_backward.default, (gy, *args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_forward(dtype):
    """fp16/bf16 run (fp32 accumulation) and land near the float64 reference."""
    args = make_args(1, 8, 3, 5, 6, 8, 1, True, dtype=dtype)
    y64, gy64, g64 = reference_grads(args)
    y = fused_ir.forward(*args)
    assert y.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    assert rel_err(y, y64) <= tol
    grads = fused_ir.backward(gy64.to(dtype).to(DEVICE), *args)
    for name, got, want, arg in zip(NAMES, grads, g64, args):
        assert got.dtype == dtype, name
        assert rel_err(got, want) <= 2 * tol, name


def bad(args, i, value):
    args = list(args)
    args[i] = value
    return args


def test_bad_input():
    args = make_args(1, 8, 5, 5, 6, 8, 1, True)
    x, we, be, wd, bd, wp, bp = args[:7]
    with pytest.raises(ValueError, match="4-D"):
        fused_ir.forward(*bad(args, 0, x[0]))
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        fused_ir.forward(*bad(args, 7, 3))
    with pytest.raises(ValueError, match="w_expand must be"):
        fused_ir.forward(*bad(args, 1, we[:, :4]))
    with pytest.raises(ValueError, match="w_dw must be"):
        fused_ir.forward(*bad(args, 3, wd[:, :2]))
    with pytest.raises(ValueError, match="w_project must be"):
        fused_ir.forward(*bad(args, 5, wp[:, :4]))
    with pytest.raises(ValueError, match="b_project must be"):
        fused_ir.forward(*bad(args, 6, bp[:3]))
    with pytest.raises(ValueError, match="must match x"):
        fused_ir.forward(*bad(args, 3, wd.double()))
    with pytest.raises(ValueError, match="not supported"):
        fused_ir.forward(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    with pytest.raises(ValueError, match="residual needs stride 1"):
        fused_ir.forward(*bad(args, 7, 2))
    with pytest.raises(ValueError, match="given together"):
        fused_ir.forward(*bad(args, 2, None))
    with pytest.raises(ValueError, match="Cin=8 channels"):
        fused_ir.forward(*bad(bad(args, 1, None), 2, None)[:3], wd.repeat(2, 1, 1), bd.repeat(2), wp.repeat(1, 2),
                         bp, 1, True)
    with pytest.raises(ValueError, match="grad_y must be"):
        fused_ir.backward(torch.zeros(1, 8, 4, 4, device=DEVICE), *args)
    with pytest.raises(ValueError, match="4-D"):
        torch.ops.mnv2.triton_fused_inverted_residual(*bad(args, 0, x[0]))
    for dilation in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="dilation must be an integer >= 1"):
            fused_ir.forward(*args, dilation)
    with pytest.raises(ValueError, match="dilation must be an integer >= 1"):
        fused_ir.backward(torch.zeros(1, 8, 5, 5, device=DEVICE), *args, 0)
    with pytest.raises(ValueError, match="dilation must be an integer >= 1"):
        fused_ir.moments(x, we, be, wd, 1, 0)
    with pytest.raises(ValueError, match="dilation must be an integer >= 1"):
        torch.ops.mnv2.triton_fused_inverted_residual(*args, 0)


@pytest.mark.parametrize("shape", [(48, 4, 4), (48, 9, 9), (48, 1, 1), (48, 3, 5), (48, 5, 3), (48, 2, 2)],
                         ids=lambda s: "x".join(map(str, s[1:])))
def test_bad_kernel_size(shape):
    """A depthwise kernel other than 3x3, 5x5 or 7x7 (or not square) is refused by name, by
    every entry point and by the operators' fake kernels."""
    args = make_args(1, 8, 5, 5, 6, 8, 1, True)
    args[3] = torch.zeros(shape, device=DEVICE)
    match = "depthwise kernel must be 3x3, 5x5 or 7x7"
    with pytest.raises(ValueError, match=match):
        fused_ir.forward(*args)
    with pytest.raises(ValueError, match=match):
        fused_ir.backward(torch.zeros(1, 8, 5, 5, device=DEVICE), *args)
    with pytest.raises(ValueError, match=match):
        fused_ir.moments(*args[:4], 1)
    with pytest.raises(ValueError, match=match):
        fused_ir.moments_backward(*args[:4], 1, torch.zeros(48), torch.zeros(48))
    with pytest.raises(ValueError, match=match):
        torch.ops.mnv2.triton_fused_inverted_residual(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=match):
            torch.ops.mnv2.triton_fused_inverted_residual(*fake)


@pytest.mark.parametrize("activation", ["gelu", "ReLU6", "", None, 6])
def test_bad_activation(activation):
    """An activation other than "relu6" or "relu" is refused by name, before any launch."""
    args = make_args(1, 8, 5, 5, 6, 8, 1, True, kernel_size=5)
    match = "activation must be 'relu6' or 'relu'"
    with pytest.raises(ValueError, match=match):
        fused_ir.forward(*args, 1, activation)
    with pytest.raises(ValueError, match=match):
        fused_ir.backward(torch.zeros(1, 8, 5, 5, device=DEVICE), *args, 1, activation)
    with pytest.raises(ValueError, match=match):
        fused_ir.moments(*args[:4], 1, 1, activation)
    with pytest.raises(ValueError, match=match):
        fused_ir.moments_backward(*args[:4], 1, torch.zeros(48), torch.zeros(48), 1, activation)
    if isinstance(activation, str):  # (the schema takes strings only)
        with pytest.raises(ValueError, match=match):
            torch.ops.mnv2.triton_fused_inverted_residual(*args, 1, activation)
        with pytest.raises(ValueError, match=match):
            torch.ops.mnv2.triton_fused_inverted_residual_backward(torch.zeros(1, 8, 5, 5, device=DEVICE), *args, 1,
                                                                   activation)


MOMENTS_CASES = [
    # n, cin, t, h, w, stride, channels_last
    (2, 8, 3, 7, 5, 1, False),
    (1, 16, 3, 9, 9, 2, True),
    (2, 12, 1, 6, 7, 1, True),
    (2, 12, 1, 5, 6, 2, False),
    (1, 3, 6, 1, 1, 2, False),
    (3, 5, 2, 4, 3, 2, True),
]


# (n, cin, t, h, w, stride, channels_last, dilation)
DILATED_MOMENTS_CASES = [
    (2, 8, 3, 7, 5, 1, False, 2),
    (1, 16, 3, 9, 9, 2, True, 2),
    (2, 12, 1, 6, 7, 1, True, 4),
    (1, 5, 2, 7, 6, 2, False, 3),
    (2, 4, 2, 3, 5, 1, True, 4),
    (1, 3, 6, 1, 1, 1, False, 4),
    (1, 4, 6, 3, 5, 2, False, 4),
]


def _moments_reference(x, w_expand, b_expand, w_dw, stride, dilation=1, activation="relu6"):
    """z2 = dw(act(expand(x))) without bias (w_dw's k x k, dilated, padding dilation * (k // 2)),
    float64 PyTorch with autograd."""
    xa = x.detach().double().cpu().requires_grad_()
    params = [None if t is None else t.detach().double().cpu().requires_grad_() for t in (w_expand, b_expand, w_dw)]
    we, be, wd = params
    a1 = xa if we is None else reference.activation_fn(activation)(F.conv2d(xa, we[:, :, None, None], be))
    z2 = F.conv2d(a1, wd[:, None], None, stride=stride, padding=dilation * (wd.shape[-1] // 2), dilation=dilation,
                  groups=a1.shape[1])
    return xa, params, z2


@pytest.mark.parametrize("case", MOMENTS_CASES, ids=lambda c: "n{}c{}t{}_{}x{}s{}_cl{:d}".format(*c))
def test_depthwise_moments_kernels(case):
    """Train-mode bn2 statistics (the streamed moments kernel) and their backward (the fused
    backward kernels in moments mode) against float64 PyTorch."""
    check_depthwise_moments(*case)


@pytest.mark.parametrize("case", DILATED_MOMENTS_CASES, ids=lambda c: "n{}c{}t{}_{}x{}s{}_cl{:d}_d{}".format(*c))
def test_dilated_depthwise_moments_kernels(case):
    """The same with the depthwise step dilated."""
    check_depthwise_moments(*case)


def check_depthwise_moments(n, cin, t, h, w, stride, channels_last, dilation=1):
    x, we, be, wd, *_ = make_args(n, cin, h, w, t, cin, stride, False, channels_last=channels_last, seed=3)
    check_moments(x, we, be, wd, stride, channels_last, dilation)


def check_moments(x, we, be, wd, stride, channels_last, dilation=1, activation="relu6"):
    """fused_ir.moments and moments_backward against float64 PyTorch."""
    mean, var = fused_ir.moments(x, we, be, wd, stride, dilation, activation)
    xa, params, z2 = _moments_reference(x, we, be, wd, stride, dilation, activation)
    var64, mean64 = torch.var_mean(z2.detach(), dim=(0, 2, 3), correction=0)
    assert mean.dtype == torch.float32 and mean.shape == (wd.shape[0],)
    assert rel_err(mean, mean64) < OUT_RTOL and rel_err(var, var64) < OUT_RTOL

    g = torch.Generator().manual_seed(4)
    alpha = torch.randn(wd.shape[0], generator=g)
    beta = torch.randn(wd.shape[0], generator=g)
    grads = fused_ir.moments_backward(x, we, be, wd, stride, alpha.to(DEVICE), beta.to(DEVICE), dilation, activation)
    loss = (alpha.double()[None, :, None, None] * z2 + 0.5 * beta.double()[None, :, None, None] * z2 * z2).sum()
    loss.backward()
    expected = [xa.grad] + [None if p is None else p.grad for p in params]
    for name, got, ref in zip(("x", "w_expand", "b_expand", "w_dw"), grads, expected):
        if ref is None:
            assert got is None, name
            continue
        assert got.shape == ref.shape, name
        assert rel_err(got, ref) < GRAD_RTOL, name
    assert grads[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_flops_autocast_and_onnx_decomposition_are_registered():
    """The Triton operator counts the C++ operator's FLOPs, follows autocast and decomposes
    for the ONNX exporter as the C++ one does."""
    from torch._decomp import decomposition_table
    from torch.utils.flop_counter import FlopCounterMode

    import mnv2_kernels

    args = make_args(2, 8, 6, 5, 6, 8, 1, True)
    op = torch.ops.mnv2.triton_fused_inverted_residual
    with FlopCounterMode(display=False) as counter:
        op(*args)
    with FlopCounterMode(display=False) as cpp_counter:
        with mnv2_kernels.use_backend("reference"):
            reference.inverted_residual(*args)
    assert counter.get_total_flops() == cpp_counter.get_total_flops() > 0
    assert op.default in decomposition_table
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = op(*args)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), reference.inverted_residual(*args)) < 2e-2
