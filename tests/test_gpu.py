"""GPU tests of the CUDA and Triton backends (run by bench/gpu_check.sh on a GPU machine).

Every check compares against a float64 reference. Low-precision results must be
at most twice as far from it as torch's own result in the same dtype
(torchvision's unfused block, cuDNN); float32 results must
be within 1e-5, since both kernels compute float32 in full float32 (no TF32).

Without a CUDA GPU the whole module is skipped: the Triton kernels are tested on
the CPU under Triton's interpreter in tests/triton instead.
"""

import copy

import pytest
import torch
import torchvision

import mnv2_kernels
from mnv2_kernels import _extension
from mnv2_kernels.triton_kernels import is_available as triton_available

from conftest import BLOCK_SHAPES, autocast_errors, block_id, make_pair, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

BACKENDS = ("cuda", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_BOUND = 1e-5


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    # On a GPU machine both backends must exist: a missing one is a build failure, not a skip.
    if name == "cuda":
        assert _extension.has_cuda_kernels(), f"the extension has no CUDA kernels: {mnv2_kernels.build_info()}"
    else:
        assert triton_available(), "Triton is not usable on this GPU machine"
    with mnv2_kernels.use_backend(name):
        yield name


def dtype_id(d):
    return str(d).replace("torch.", "")


def gpu_pair(shape, dtype, seed=0):
    inp, oup, stride, t, _ = shape
    tv, fused = make_pair(inp, oup, stride, t, seed=seed)
    return tv.cuda().to(dtype).eval(), fused.cuda().to(dtype).eval()


def make_input(shape, n, dtype, channels_last, seed=1):
    inp, _, _, _, h = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, inp, h, h, device="cuda", generator=g).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def check_err(got, ref64, torch_result, dtype, what):
    err = rel_err(got, ref64)
    assert err == err, f"{what}: NaN"
    if dtype == torch.float32:
        assert err <= FP32_BOUND, f"{what}: float32 error {err:.3g} > {FP32_BOUND}"
    else:
        torch_err = rel_err(torch_result, ref64)
        assert err <= 2 * torch_err, (
            f"{what}: {dtype_id(dtype)} error {err:.3g} > 2 x torch's own {torch_err:.3g}")
    return err


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=block_id)
def test_forward_17_blocks(shape, dtype, channels_last, backend):
    tv, fused = gpu_pair(shape, dtype)
    x = make_input(shape, 8, dtype, channels_last)
    with torch.no_grad():
        ref = copy.deepcopy(tv).double()(x.double())
        theirs = tv(x)
        ours = fused(x)
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    check_err(ours, ref, theirs, dtype, f"{backend} {block_id(shape)}")


def test_forward_writes_every_output(backend):
    """Output allocated over poisoned memory: every element must be written (no NaN left)."""
    shape = BLOCK_SHAPES[3]
    tv, fused = gpu_pair(shape, torch.float16)
    x = make_input(shape, 3, torch.float16, True)
    torch.cuda.empty_cache()
    poison = torch.full((64 << 20,), float("nan"), device="cuda")
    del poison  # the caching allocator hands this NaN-filled block out again
    with torch.no_grad():
        y = fused(x)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (5, 3), (9, 11)], ids=str)
@pytest.mark.parametrize("cfg", [(16, 16, 1, 6), (24, 40, 2, 6), (8, 8, 1, 1), (20, 12, 2, 3)], ids=str)
def test_forward_odd_sizes(cfg, size, backend):
    inp, oup, stride, t = cfg
    tv, fused = make_pair(inp, oup, stride, t, seed=3)
    tv, fused = tv.cuda().eval(), fused.cuda().eval()
    x = torch.randn(2, inp, *size, device="cuda")
    with torch.no_grad():
        ref = copy.deepcopy(tv).double()(x.double())
        ours = fused(x)
    assert rel_err(ours, ref) <= FP32_BOUND


# ---------------------------------------------------------------------------- tensor cores
# (cin, hidden, cout, stride, residual, expand, (H, W)): shapes that exercise the padding of
# the fp16 / bf16 forward's tensor-core path (16-row WMMA tiles, Cout rounded up to 16,
# hidden chunks of 32 with a partial last chunk, Cin sub-chunks of 32).
TC_CONFIGS = [
    (16, 96, 16, 1, True, True, (9, 7)),       # Cout 16, whole chunks, 7-wide image
    (24, 144, 24, 1, True, True, (11, 13)),    # Cout 24 (padded ys / weight columns), last kc 16
    (16, 60, 40, 2, False, True, (9, 11)),     # stride 2, last kc 28 (a k step reads its padding)
    (40, 72, 12, 2, False, True, (5, 3)),      # Cin 40: two K sub-chunks (the second nk 8)
    (3, 33, 17, 1, False, True, (1, 1)),       # 1x1 image, Cin 3, last kc 1
    (32, 32, 16, 1, False, False, (10, 10)),   # t == 1: no expand
    (160, 960, 320, 1, False, True, (7, 7)),   # largest MobileNetV2 block: 7x7 tile, most smem
]


@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("cfg", TC_CONFIGS, ids=str)
def test_forward_tensor_cores(cfg, dtype, channels_last):
    """The CUDA fp16 / bf16 forward (TF32 tensor cores) against the float64 CUDA kernel
    (FFMA) on the same dtype-rounded inputs: the expand is exact up to fp32 accumulation,
    so only a2's TF32 rounding (2^-11) and the output rounding remain. The output is
    allocated over NaN-poisoned memory: every element must be written and finite."""
    assert _extension.has_cuda_kernels(), f"the extension has no CUDA kernels: {mnv2_kernels.build_info()}"
    cin, hidden, cout, stride, residual, expand, (h, w) = cfg
    g = torch.Generator(device="cuda").manual_seed(11)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device="cuda", generator=g)).to(dtype)

    x = rnd(2, cin, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    we = rnd(hidden, cin, scale=2 * cin ** -0.5) if expand else None
    be = rnd(hidden, scale=0.5) if expand else None
    args = [x, we, be, rnd(hidden, 3, 3, scale=0.5), rnd(hidden, scale=0.5),
            rnd(cout, hidden, scale=2 * hidden ** -0.5), rnd(cout, scale=0.5)]
    op = torch.ops.mnv2.fused_inverted_residual
    with torch.no_grad():
        ref = op(*[a.double() if a is not None else None for a in args], stride, residual)
        torch.cuda.empty_cache()
        poison = torch.full((64 << 20,), float("nan"), device="cuda")
        del poison  # the caching allocator hands this NaN-filled block out again
        ours = op(*args, stride, residual)
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert torch.isfinite(ours).all(), "an output element was not written (or is not finite)"
    bound = 2e-3 if dtype == torch.float16 else 1e-2  # output rounding 2^-11 / 2^-8, plus a2's TF32
    err = rel_err(ours, ref)
    assert err <= bound, f"{dtype_id(dtype)} {cfg}: error {err:.3g} > {bound}"


# ---------------------------------------------------------------------------- backward
def _grads(module, x):
    y = module(x)
    # (not randn_like: that follows y's memory format, which differs between implementations)
    g = torch.randn(y.shape, device=y.device).to(y.dtype)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, [x] + params, g)
    return y, grads


def _check_backward(shape, dtype, batch, backend):
    """Eval-mode block (BN folded) at ``batch``: the gradients of x and of every parameter
    against float64, within twice torch's own error (torch's float32 convolutions use TF32
    on this GPU, cudnn.allow_tf32, so the float32 bound is max(2 x torch's error, 1e-4))."""
    tv, fused = gpu_pair(shape, dtype)
    x = make_input(shape, batch, dtype, True).requires_grad_()
    torch.manual_seed(5)
    _, ours = _grads(fused, x)
    torch.manual_seed(5)
    _, theirs = _grads(tv, x)
    x64 = x.detach().double().requires_grad_()
    torch.manual_seed(5)
    _, ref = _grads(copy.deepcopy(tv).double(), x64)
    names = ["x"] + [n for n, _ in tv.named_parameters()]
    for name, a, b, r in zip(names, ours, theirs, ref):
        err = rel_err(a, r)
        torch_err = rel_err(b, r)
        bound = 2 * torch_err if dtype != torch.float32 else max(2 * torch_err, 1e-4)
        assert err <= bound, f"{backend} {block_id(shape)} batch {batch} grad {name}: {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=block_id)
def test_backward_17_blocks(shape, dtype, backend):
    """Eval-mode block (BN folded): gradients of x and every parameter."""
    _check_backward(shape, dtype, 8, backend)


@pytest.mark.parametrize("shape", [BLOCK_SHAPES[6], BLOCK_SHAPES[12], BLOCK_SHAPES[16]], ids=block_id)
def test_backward_batch_64(shape, backend):
    """Batch 64, float32, on the blocks with small outputs: the CUDA backward splits their
    items and hidden chunks over many CTAs that hand their sums on in order (the weight
    gradients through one slot, grad_x through one buffer); every gradient against
    float64."""
    _check_backward(shape, torch.float32, 64, backend)


@pytest.mark.parametrize("shape", BLOCK_SHAPES[::3], ids=block_id)
def test_train_mode_block(shape, backend):
    """Train mode (batch statistics): output, gradients and running statistics, float32,
    each within max(2 x torch's own float32 error, 1e-4) of float64 (torch's float32
    convolutions, ours in the batch statistics included, use TF32 here)."""
    tv, fused = gpu_pair(shape, torch.float32)
    tv.train()
    fused.train()
    ref = copy.deepcopy(tv).double()
    x = make_input(shape, 4, torch.float32, True).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    results = []
    for module, inp in ((fused, x), (tv, x), (ref, x64)):
        torch.manual_seed(7)
        results.append(_grads(module, inp))
    (y, ours), (yt, theirs), (y64, refs) = results

    def bound(a, b, r):
        return max(2 * rel_err(b, r), 1e-4)

    assert rel_err(y, y64) <= bound(y, yt, y64)
    for a, b, r in zip(ours, theirs, refs):
        assert rel_err(a, r) <= bound(a, b, r)
    for (name, a), (_, b), (_, r) in zip(fused.named_buffers(), tv.named_buffers(), ref.named_buffers()):
        assert rel_err(a, r) <= bound(a, b, r), name


# ---------------------------------------------------------------------------- dilation
DILATED = [((96, 96, 1, 6, 33), 2), ((160, 160, 1, 6, 17), 4), ((96, 160, 2, 6, 33), 2), ((32, 32, 1, 1, 20), 3)]


def _dilated_pair(shape, dilation, dtype):
    """DeepLab's surgery on both blocks: the depthwise convolution at stride 1, dilation and
    padding d."""
    tv, fused = gpu_pair(shape, dtype)
    for block in (tv, fused):
        dw = block.conv[-3][0]
        dw.stride, dw.dilation, dw.padding = (1, 1), (dilation, dilation), (dilation, dilation)
    return tv, fused


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", DILATED, ids=lambda c: f"{block_id(c[0])}-d{c[1]}")
def test_dilated_block_triton(case, dtype, train):
    """Atrous blocks (Mobile DeepLabv3) on the Triton backend, which 'auto' picks for them:
    output, every gradient and, in train mode, the running statistics against float64,
    within max(2 x torch's own error, 1e-4)."""
    shape, dilation = case
    tv, fused = _dilated_pair(shape, dilation, dtype)
    tv.train(train)
    fused.train(train)
    ref = copy.deepcopy(tv).double()
    x = make_input(shape, 4, dtype, True).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    results = []
    with mnv2_kernels.use_backend("auto"):
        assert mnv2_kernels.backends.resolve(x, dilation) == "triton"
        for module, inp in ((fused, x), (tv, x), (ref, x64)):
            torch.manual_seed(7)
            results.append(_grads(module, inp))
    (y, ours), (yt, theirs), (y64, refs) = results

    def bound(b, r):
        return max(2 * rel_err(b, r), 1e-4)

    assert rel_err(y, y64) <= bound(yt, y64)
    for a, b, r in zip(ours, theirs, refs):
        assert rel_err(a, r) <= bound(b, r)
    for (name, a), (_, b), (_, r) in zip(fused.named_buffers(), tv.named_buffers(), ref.named_buffers()):
        if a.is_floating_point():
            assert rel_err(a, r) <= bound(b, r), name


def test_cuda_backend_refuses_a_dilated_block():
    tv, fused = _dilated_pair(DILATED[0][0], 2, torch.float32)
    x = make_input(DILATED[0][0], 1, torch.float32, True)
    with mnv2_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="dilation 1 only"):
        fused(x)
    with pytest.raises(RuntimeError, match="supports only dilation 1"):
        torch.ops.mnv2.fused_inverted_residual(x, *fused.folded_weights(), 1, True, 2)


@pytest.mark.parametrize("kernel_size, activation, match", [
    (5, "relu6", "a 3x3 depthwise kernel only"), (7, "relu6", "a 3x3 depthwise kernel only"),
    (3, "relu", "the ReLU6 activation only")])
def test_cuda_backend_refuses_the_family_and_auto_runs_triton(kernel_size, activation, match):
    """The CUDA kernel computes MobileNetV2's block only: "cuda" refuses 5x5, 7x7 and ReLU
    with the reason, the operator too, and "auto" runs such a block on Triton."""
    fused = mnv2_kernels.FusedInvertedResidual(16, 16, 1, 6, kernel_size=kernel_size,
                                               activation=activation).cuda().eval()
    x = torch.randn(2, 16, 14, 14, device="cuda")
    with mnv2_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match=match):
        fused(x)
    weights = fused.folded_weights()
    with pytest.raises(RuntimeError, match="supports only (a 3x3 depthwise kernel|the ReLU6 activation)"):
        torch.ops.mnv2.fused_inverted_residual(x, *weights, 1, True, 1, activation)
    assert mnv2_kernels.backends.resolve(x, 1, kernel_size, activation) == "triton"
    with torch.no_grad(), mnv2_kernels.use_backend("auto"):
        y, y_torch = fused(x), fused._forward_modules(x)
        y64 = copy.deepcopy(fused).double()._forward_modules(x.double())
    # (within twice torch's own float32 error: its convolutions may use TF32)
    assert rel_err(y, y64) <= max(2 * rel_err(y_torch, y64), 1e-4)


# ---------------------------------------------------------------------------- the block family
# ((Cin, hidden, Cout, stride, side), kernel size, activation): EfficientNet-Lite0's 5x5 blocks,
# an MCUNet-like 7x7 block, 7x7 at stride 2 with ReLU, MNASNet's 5x5 stride-2 ReLU block, a
# 3x3 ReLU block without the expand.
FAMILY = [((40, 240, 40, 1, 28), 5, "relu6"), ((80, 480, 112, 1, 14), 5, "relu6"), ((48, 288, 48, 1, 14), 7, "relu6"),
          ((24, 144, 40, 2, 28), 7, "relu"), ((24, 72, 40, 2, 56), 5, "relu"), ((32, 32, 16, 1, 20), 3, "relu")]


def family_id(case):
    (cin, hidden, cout, stride, side), k, activation = case
    return f"{cin}-{hidden}-{cout}-s{stride}-{side}x{side}-k{k}-{activation}"


def _family_args(shape, k, dtype, n=4, seed=3):
    """Operator arguments (BN-folded weights) of a family block in ``dtype``, channels_last,
    whose expand and depthwise outputs go past 6 in places (ReLU and ReLU6 differ)."""
    cin, hidden, cout, stride, side = shape
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*s, scale=1.0, shift=0.0):
        return (scale * torch.randn(*s, device="cuda", generator=g) + shift).to(dtype)

    x = rnd(n, cin, side, side).contiguous(memory_format=torch.channels_last)
    expand = hidden != cin
    we = rnd(hidden, cin, scale=2 * cin ** -0.5) if expand else None
    be = rnd(hidden, scale=2.0, shift=1.0) if expand else None
    return [x, we, be, rnd(hidden, k, k, scale=2.0 / k), rnd(hidden, scale=2.0),
            rnd(cout, hidden, scale=2 * hidden ** -0.5), rnd(cout, scale=0.5), stride, stride == 1 and cin == cout]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FAMILY, ids=family_id)
def test_family_block_triton(case, dtype):
    """Depthwise kernels of 5 and 7, and ReLU, on the Triton operator (autograd): the output
    and every gradient against float64, within max(2 x torch's own error, 1e-4) (torch: the
    unfused block in ``dtype``, cuDNN; its float32 convolutions use TF32)."""
    from mnv2_kernels import reference

    shape, k, activation = case
    args = _family_args(shape, k, dtype)
    op = torch.ops.mnv2.triton_fused_inverted_residual
    ho = (shape[4] - 1) // shape[3] + 1
    gy = torch.randn(args[0].shape[0], shape[2], ho, ho, device="cuda",
                     generator=torch.Generator(device="cuda").manual_seed(9))

    def run(fn, dt):
        leaves = [a.detach().to(dt).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        y = fn(*leaves, 1, activation)
        return y, torch.autograd.grad(y, [a for a in leaves[:7] if a is not None], gy.to(dt))

    (y, ours), (yt, theirs), (y64, refs) = (run(op, dtype), run(reference.inverted_residual, dtype),
                                            run(reference.inverted_residual, torch.float64))
    other = "relu" if activation == "relu6" else "relu6"
    with torch.no_grad():
        assert rel_err(reference.inverted_residual(*[a.double() if isinstance(a, torch.Tensor) else a
                                                     for a in args], 1, other), y64) > 1e-3

    def bound(b, r):
        return max(2 * rel_err(b, r), 1e-4)

    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, y64) <= bound(yt, y64)
    names = [n for n, a in zip(("x", "w_expand", "b_expand", "w_dw", "b_dw", "w_project", "b_project"), args)
             if a is not None]
    for name, a, b, r in zip(names, ours, theirs, refs):
        assert rel_err(a, r) <= bound(b, r), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", FAMILY[1:5], ids=family_id)
def test_family_depthwise_moments_triton(case, dtype):
    """Train-mode bn2 statistics of family blocks by the Triton kernels (the moments kernel,
    and the fused backward kernels in moments mode) against float64 PyTorch on the same
    (rounded) inputs."""
    import torch.nn.functional as F

    from mnv2_kernels import reference
    from mnv2_kernels.triton_kernels import fused_ir

    assert triton_available(), "Triton is not usable on this GPU machine"
    shape, k, activation = case
    x, we, be, wd = _family_args(shape, k, dtype)[:4]
    stride, hidden = shape[3], wd.shape[0]
    mean, var = fused_ir.moments(x, we, be, wd, stride, 1, activation)
    x64, we64, be64, wd64 = (a.detach().double().requires_grad_() for a in (x, we, be, wd))
    a1 = reference.activation_fn(activation)(F.conv2d(x64, we64[:, :, None, None], be64))
    z2 = F.conv2d(a1, wd64[:, None], None, stride=stride, padding=k // 2, groups=hidden)
    var64, mean64 = torch.var_mean(z2, dim=(0, 2, 3), correction=0)
    assert rel_err(mean, mean64) < FP32_BOUND and rel_err(var, var64) < FP32_BOUND
    g = torch.Generator(device="cuda").manual_seed(5)
    alpha, beta = torch.randn(hidden, device="cuda", generator=g), torch.randn(hidden, device="cuda", generator=g)
    grads = fused_ir.moments_backward(x, we, be, wd, stride, alpha, beta, 1, activation)
    loss = (alpha.double()[None, :, None, None] * z2 + 0.5 * beta.double()[None, :, None, None] * z2 * z2).sum()
    refs = torch.autograd.grad(loss, [x64, we64, be64, wd64])
    bound = 1e-4 if dtype == torch.float32 else 1e-2  # gradients are rounded to dtype (bf16: 2^-8)
    for name, a, b in zip(("x", "w_expand", "b_expand", "w_dw"), grads, refs):
        assert a.shape == b.shape and rel_err(a, b) < bound, name


# ---------------------------------------------------------------------------- ops
def _op_args(dtype, stride=1, residual=True):
    torch.manual_seed(0)
    cin, hidden, cout = 16, 48, 16 if residual else 24
    x = torch.randn(2, cin, 9, 7, device="cuda", dtype=dtype)
    w = lambda *s: (torch.randn(*s, device="cuda") * 0.3).to(dtype)  # noqa: E731
    return (x, w(hidden, cin), w(hidden), w(hidden, 3, 3), w(hidden), w(cout, hidden), w(cout),
            stride, residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_opcheck(backend, dtype):
    op = (torch.ops.mnv2.triton_fused_inverted_residual if backend == "triton"
          else torch.ops.mnv2.fused_inverted_residual)
    args = list(_op_args(dtype))
    for i in range(7):
        args[i] = args[i].requires_grad_()
    torch.library.opcheck(op, tuple(args), test_utils=("test_schema", "test_faketensor",
                                                       "test_autograd_registration",
                                                       "test_aot_dispatch_dynamic"))


def test_compile_fullgraph(backend):
    shape = BLOCK_SHAPES[5]
    _, fused = gpu_pair(shape, torch.float16)
    x = make_input(shape, 4, torch.float16, True)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), fused(x)) <= 1e-3


def test_compile_fullgraph_backward(backend):
    shape = BLOCK_SHAPES[4]
    _, fused = gpu_pair(shape, torch.float32)
    x = make_input(shape, 2, torch.float32, True).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)
    torch.manual_seed(2)
    _, eager = _grads(fused, x)
    torch.manual_seed(2)
    _, comp = _grads(compiled, x)
    for a, b in zip(eager, comp):
        assert rel_err(a, b) <= 1e-5


# ---------------------------------------------------------------------------- determinism
def _forward_backward(block, x):
    """Output, input gradient and every parameter gradient of a fresh copy of
    ``block`` (the same running statistics every time), for a fixed grad_y."""
    block = copy.deepcopy(block)
    x = x.clone().requires_grad_()
    y = block(x)
    g = torch.Generator(device=y.device).manual_seed(3)
    gy = torch.randn(y.shape, device=y.device, generator=g).to(y.dtype)
    return [y.detach()] + list(torch.autograd.grad(y, [x] + list(block.parameters()), gy))


@pytest.mark.parametrize("train,dtype", [(False, torch.float32), (False, torch.bfloat16), (True, torch.float32)],
                         ids=["eval-float32", "eval-bfloat16", "train-float32"])
@pytest.mark.parametrize("shape", [BLOCK_SHAPES[1], BLOCK_SHAPES[8], BLOCK_SHAPES[16]], ids=block_id)
def test_backward_deterministic(shape, train, dtype, backend, monkeypatch):
    """Two forward + backward runs are bitwise equal under
    torch.use_deterministic_algorithms(True): the weight gradients are per-program
    partials reduced in a fixed order (no float atomics), and nothing raises.
    Train mode's statistics also run cuBLAS (which needs CUBLAS_WORKSPACE_CONFIG in
    deterministic mode), Triton's moments kernels and torch's batch_norm."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _, fused = gpu_pair(shape, dtype)
    fused.train(train)
    x = make_input(shape, 8, dtype, True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _forward_backward(fused, x)
        second = _forward_backward(fused, x)
    finally:
        torch.use_deterministic_algorithms(before)
    names = ["y", "x"] + [n for n, _ in fused.named_parameters()]
    for name, a, b in zip(names, first, second):
        assert torch.equal(a, b), f"{backend} {block_id(shape)}: {name} differs between two runs"


# ---------------------------------------------------------------------------- memory
@pytest.mark.parametrize("shape", [BLOCK_SHAPES[1], BLOCK_SHAPES[3], BLOCK_SHAPES[16]], ids=block_id)
def test_no_hidden_sized_allocation(shape, backend):
    """Forward and backward allocate far less than one hidden tensor beyond their outputs."""
    inp, oup, stride, t, h = shape
    _, fused = gpu_pair(shape, torch.float16)
    x = make_input(shape, 32, torch.float16, True).requires_grad_()
    ho = (h - 1) // stride + 1
    hidden_bytes = 32 * inp * t * ho * ho * 2
    out_bytes = 32 * oup * ho * ho * 2
    with torch.no_grad():
        fused(x)  # warm-up: compile kernels, build caches
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        y = fused(x)
    torch.cuda.synchronize()
    fwd_extra = torch.cuda.max_memory_allocated() - base - out_bytes
    assert fwd_extra < hidden_bytes / 4, f"forward scratch {fwd_extra} B vs hidden {hidden_bytes} B"
    del y
    y = fused(x)
    g = torch.randn_like(y)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.grad(y, [x] + list(fused.parameters()), g)
    torch.cuda.synchronize()
    params = sum(p.numel() * 4 for p in fused.parameters()) * 4  # grads, folded copies, fp32 partials
    bwd_extra = torch.cuda.max_memory_allocated() - base - x.numel() * 2 - params
    assert bwd_extra < hidden_bytes / 2, f"backward scratch {bwd_extra} B vs hidden {hidden_bytes} B"


# ---------------------------------------------------------------------------- model
def test_whole_model_fp16(backend):
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2()
    mnv2_kernels.testing.randomize_batch_norm(tv)
    tv = tv.cuda().eval()
    ours = mnv2_kernels.convert_model(copy.deepcopy(tv))
    x = torch.randn(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = copy.deepcopy(tv).double()(x.double())
        theirs = tv.half()(x.half())
        got = ours.half()(x.half())
    assert rel_err(got, ref) <= 2 * rel_err(theirs, ref)


# ---------------------------------------------------------------------------- autocast, FLOPs
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("cfg", [(16, 24, 2, 6), (24, 24, 1, 6), (32, 16, 1, 1)], ids=str)
def test_autocast_block(cfg, dtype, channels_last, train, backend):
    """Under torch.autocast("cuda", dtype) the block gives torchvision's output dtype, at
    most twice as far from the float64 result as torchvision's own under the same autocast."""
    tv, ours = make_pair(*cfg)
    tv, ours = tv.cuda(), ours.cuda()
    x = torch.randn(4, cfg[0], 14, 14, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got_dtype, tv_dtype, err, tv_err = autocast_errors(tv, ours, x, "cuda", dtype, train)
    assert got_dtype == tv_dtype
    assert err <= 2 * tv_err, (err, tv_err)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_autocast_model(dtype, train, backend):
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2(num_classes=50, dropout=0.0)
    mnv2_kernels.testing.randomize_batch_norm(tv)
    tv = tv.cuda()
    ours = mnv2_kernels.convert_model(copy.deepcopy(tv))
    x = torch.rand(8, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    got_dtype, tv_dtype, err, tv_err = autocast_errors(tv, ours, x, "cuda", dtype, train)
    assert got_dtype == tv_dtype == dtype
    assert err <= 2 * tv_err, (err, tv_err)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_flop_count_is_torchvisions(train, backend):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2().cuda().train(train)
    ours = mnv2_kernels.mobilenet_v2().cuda().train(train)
    x = torch.rand(2, 3, 96, 96, device="cuda")
    totals = []
    for model in (tv, ours, ours):
        with FlopCounterMode(display=False) as counter:
            model(x)
        totals.append(counter.get_total_flops())
    assert totals[1] == totals[2] == totals[0]


def test_explicit_cpu_backend_refuses_cuda_tensors():
    tv, block = make_pair(16, 16, 1, 6)
    block = block.cuda().eval()
    x = torch.randn(2, 16, 5, 5, device="cuda")
    args = (x, *block.folded_weights(), 1, True)
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run a torch.float32 tensor on cuda"):
        mnv2_kernels.ops.fused_inverted_residual(*args, backend="cpu")
    with mnv2_kernels.use_backend("cpu"), pytest.raises(RuntimeError, match="backend 'cpu' cannot run"):
        block(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", [BLOCK_SHAPES[1], BLOCK_SHAPES[7], BLOCK_SHAPES[13]], ids=block_id)
def test_depthwise_moments_triton(shape, dtype):
    """Train-mode bn2 statistics on CUDA (the Triton moments kernel) and their backward (the
    fused backward kernels in moments mode) against the PyTorch version in float64."""
    from mnv2_kernels import moments, ops

    assert triton_available(), "Triton is not usable on this GPU machine"
    inp, _, stride, t, h = shape
    hidden = inp * t
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(4, inp, h, h, device="cuda", generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    we = (0.3 * torch.randn(hidden, inp, device="cuda", generator=g)).to(dtype)
    be = torch.randn(hidden, device="cuda", generator=g).to(dtype)
    wd = (0.3 * torch.randn(hidden, 3, 3, device="cuda", generator=g)).to(dtype)
    leaves = [a.detach().requires_grad_() for a in (x, we, be, wd)]
    mean, var = ops.depthwise_moments(*leaves, stride)
    leaves64 = [a.detach().double().requires_grad_() for a in (x, we, be, wd)]
    mean64, var64 = moments.depthwise_moments_torch(*leaves64, stride)  # PyTorch ops, float64
    # the inputs are rounded to dtype first, so float32 accumulation is the only error
    assert rel_err(mean, mean64) < FP32_BOUND and rel_err(var, var64) < FP32_BOUND
    gm = torch.randn(hidden, device="cuda", generator=g)
    gv = torch.randn(hidden, device="cuda", generator=g)
    torch.autograd.backward((mean, var), (gm, gv))
    torch.autograd.backward((mean64, var64), (gm.double(), gv.double()))
    for name, a, b in zip(("x", "w_expand", "b_expand", "w_dw"), leaves, leaves64):
        bound = 1e-4 if dtype == torch.float32 else 1e-2  # gradients are rounded to dtype (bf16: 2^-8)
        assert rel_err(a.grad, b.grad) < bound, name
