"""Python side of the ``mnv2::`` operators (schemas live in csrc/ops.cpp).

* ``fused_inverted_residual``: the fused block on BN-folded weights. Its CPU
  kernel is C++ (csrc/cpu); here it gets a fake kernel, autograd (the backward
  is the fused ``fused_inverted_residual_backward`` operator, which recomputes
  the hidden activations row by row) and a FLOP formula.
* ``channel_moments`` and ``depthwise_moments``: batch statistics for
  train-mode batch norm. Their kernels are written here in PyTorch; each saves
  only its inputs and recomputes in its explicit backward.

Everything is registered only when the compiled extension (which defines the
schemas) is loaded.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format
from torch.utils.flop_counter import register_flop_formula

from . import _extension


def fused_inverted_residual(
    x: Tensor,
    w_expand: Optional[Tensor],
    b_expand: Optional[Tensor],
    w_dw: Tensor,
    b_dw: Tensor,
    w_project: Tensor,
    b_project: Tensor,
    stride: int,
    residual: bool,
    backend: Optional[str] = None,
) -> Tensor:
    """The fused block on BN-folded weights.

    Args:
        x: input (N, Cin, H, W), NCHW or channels_last (or any strides).
        w_expand, b_expand: expand 1x1 (hidden, Cin) and bias (hidden); None when t == 1.
        w_dw, b_dw: depthwise 3x3 (hidden, 3, 3) and bias (hidden).
        w_project, b_project: project 1x1 (Cout, hidden) and bias (Cout).
        stride: 1 or 2.
        residual: add x to the output (needs stride 1 and Cin == Cout).
        backend: "triton" runs ``mnv2::triton_fused_inverted_residual``; anything
            else the dispatcher's kernel for x's device (C++ CPU or CUDA), which
            checks every argument. None: the selected backend (``use_backend``).

    Returns:
        (N, Cout, Ho, Wo) in x's memory format.
    """
    if backend is None:
        from . import backends

        backend = backends.get_backend()
        if backend == "auto" and x.device.type == "cuda":
            backend = backends.resolve(x)  # CUDA kernel or Triton
    if backend == "triton":
        return triton_op()(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual)
    if backend == "reference":
        from .reference import inverted_residual

        return inverted_residual(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual)
    return torch.ops.mnv2.fused_inverted_residual.default(
        x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual
    )


_TRITON_OP = None


def triton_op():
    """torch.ops.mnv2.triton_fused_inverted_residual.default; the first call imports
    Triton and registers the operator (mnv2_kernels' import does it already where
    a CUDA GPU is present, so that torch.compile never traces the registration)."""
    global _TRITON_OP
    if _TRITON_OP is None:
        from .triton_kernels import ops as triton_ops

        triton_ops.register()
        _TRITON_OP = torch.ops.mnv2.triton_fused_inverted_residual.default
    return _TRITON_OP


_PACKED_OP = None


def packed_op():
    """torch.ops.mnv2.fused_inverted_residual_packed.default, looked up once (the
    attribute chain costs microseconds on the per-block inference path)."""
    global _PACKED_OP
    if _PACKED_OP is None:
        _PACKED_OP = torch.ops.mnv2.fused_inverted_residual_packed.default
    return _PACKED_OP


ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2}


def pack_pointwise(weight: Tensor, bias: Tensor) -> Tensor:
    """A 1x1 convolution's (cout, cin) weight and (cout,) bias laid out for this machine's
    CPU kernel (opaque), for pointwise_conv."""
    return torch.ops.mnv2.pack_pointwise.default(weight, bias)


def pointwise_conv(x: Tensor, packed: Tensor, cout: int, activation: Optional[str] = None) -> Tensor:
    """act(conv1x1(x) + bias) with weights from pack_pointwise, on a channels_last CPU input
    (the result is channels_last); activation None, "relu" or "relu6". Inference only."""
    return torch.ops.mnv2.pointwise_conv_packed.default(x, packed, cout, ACTIVATIONS[activation])


def pack_stem(weight: Tensor, bias: Tensor) -> Tensor:
    """A 3x3 convolution's (cout, C, 3, 3) weight and (cout,) bias laid out for stem_block
    (opaque): pack_pointwise of the weight as a (cout, 9 C) matrix, column (kh * 3 + kw) * C + c."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"mnv2: pack_stem needs a (cout, C, 3, 3) weight, got shape {tuple(weight.shape)}")
    return pack_pointwise(weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1), bias)


def stem_block(image: Tensor, stem_packed: Tensor, packed: Tensor, channels: int, cout: int,
               stride: int) -> Tensor:
    """block(relu6(conv3x3(image, stride 2, padding 1) + b)) for a CPU block without expansion
    or residual, in one pass that never stores the stem's output: stem_packed from pack_stem,
    packed from pack_weights. Inference only."""
    return torch.ops.mnv2.stem_block_packed.default(image, stem_packed, packed, channels, cout, stride)


def pointwise_conv_mean(x: Tensor, packed: Tensor, cout: int, activation: Optional[str] = None) -> Tensor:
    """(N, cout) = the mean over (H, W) of pointwise_conv(x, packed, cout, activation): the
    model's head and global average pooling in one pass that never stores the head's output.
    Channels_last CPU input; inference only."""
    return torch.ops.mnv2.pointwise_conv_mean_packed.default(x, packed, cout, ACTIVATIONS[activation])


def mobilenet_v2_packed(image: Tensor, stem_packed: Tensor, first_packed: Tensor, first_args,
                        blocks, block_args, head_packed: Tensor, head_args, classifier_packed: Tensor,
                        classes: int) -> Tensor:
    """MobileNetV2's whole CPU inference in one operator call (no return to Python between
    layers): stem_block(image, stem_packed, first_packed, *first_args), then the packed
    block operator per block (``block_args``: hidden, cout, has_expand, stride, residual for
    each, flattened), then pointwise_conv_mean(h, head_packed, *head_args) (activation as
    an int, see ACTIVATIONS) and the classifier, pointwise_conv on the pooled rows with
    ``classifier_packed`` -> (N, classes). Inference only."""
    return torch.ops.mnv2.mobilenet_v2_packed.default(image, stem_packed, first_packed, first_args, blocks,
                                                     block_args, head_packed, head_args, classifier_packed,
                                                     classes)


def channel_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean (C,) and biased covariance (C, C) of x over (N, H, W)."""
    return torch.ops.mnv2.channel_moments.default(x)


def depthwise_moments(
    x: Tensor, w_expand: Optional[Tensor], b_expand: Optional[Tensor], w_dw: Tensor, stride: int
) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of dw3x3(relu6(w_expand x + b_expand)), no dw bias."""
    return torch.ops.mnv2.depthwise_moments.default(x, w_expand, b_expand, w_dw, stride)


def output_size(h, w, stride):
    """Output height and width of the block's 3x3, padding-1 depthwise step."""
    return (h - 1) // stride + 1, (w - 1) // stride + 1


def block_macs(x_shape, hidden: int, cout: int, stride: int, has_expand: bool) -> int:
    """Multiply-adds of one block: expand + depthwise + project (BN and ReLU6 excluded)."""
    n, cin, h, w = x_shape
    ho, wo = output_size(h, w, stride)
    expand = n * h * w * cin * hidden if has_expand else 0
    return expand + n * ho * wo * hidden * 9 + n * ho * wo * hidden * cout


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Statistics are accumulated in at least float32."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_block_meta(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual):
    """Shape checks of the fake kernels (the C++ kernel makes the same ones)."""
    torch._check(x.dim() == 4, lambda: f"mnv2: x must be 4-D (N, C, H, W), got {x.dim()}-D")
    torch._check(stride in (1, 2), lambda: f"mnv2: stride must be 1 or 2, got {stride}")
    for name, t in (("w_expand", w_expand), ("b_expand", b_expand), ("w_dw", w_dw), ("b_dw", b_dw),
                    ("w_project", w_project), ("b_project", b_project)):
        if t is not None:
            torch._check(t.device == x.device and t.dtype == x.dtype,
                         lambda: f"mnv2: {name} ({t.dtype} on {t.device}) must match x ({x.dtype} on {x.device})")
    hidden = w_dw.shape[0]
    cin = x.shape[1]
    torch._check(tuple(w_dw.shape) == (hidden, 3, 3), lambda: "mnv2: w_dw must be (hidden, 3, 3)")
    torch._check((w_expand is None) == (b_expand is None),
                 lambda: "mnv2: w_expand and b_expand must be given together")
    if w_expand is not None:
        torch._check(tuple(w_expand.shape) == (hidden, cin), lambda: "mnv2: w_expand must be (hidden, Cin)")
        torch._check(tuple(b_expand.shape) == (hidden,), lambda: "mnv2: b_expand must be (hidden,)")
    else:
        torch._check(hidden == cin, lambda: "mnv2: without w_expand, w_dw must have Cin channels")
    torch._check(tuple(b_dw.shape) == (hidden,), lambda: "mnv2: b_dw must be (hidden,)")
    torch._check(w_project.dim() == 2 and w_project.shape[1] == hidden,
                 lambda: "mnv2: w_project must be (Cout, hidden)")
    cout = w_project.shape[0]
    torch._check(tuple(b_project.shape) == (cout,), lambda: "mnv2: b_project must be (Cout,)")
    torch._check(not residual or (stride == 1 and cin == cout),
                 lambda: "mnv2: residual needs stride 1 and Cin == Cout")
    return hidden, cout


# ----------------------------------------------------------------------------
# PyTorch kernels of the moment operators and their explicit backwards.

def _channel_moments_impl(x: Tensor) -> Tuple[Tensor, Tensor]:
    c = x.shape[1]
    xf = x.to(_acc_dtype(x)).transpose(0, 1).reshape(c, -1)
    mean = xf.mean(1)
    xc = xf - mean[:, None]  # centred before the product: no cancellation
    return mean, (xc @ xc.T) / xf.shape[1]


def _channel_moments_backward(ctx, g_mean, g_cov):
    (x,) = ctx.saved_tensors
    n, c, h, w = x.shape
    xf = x.to(_acc_dtype(x)).transpose(0, 1).reshape(c, -1)
    m = xf.shape[1]
    xc = xf - xf.mean(1, keepdim=True)
    # d cov = (1/M) sum_p xc_p xc_p^T; the mean's own derivative cancels because sum_p xc_p = 0.
    g = torch.zeros_like(xc)
    if g_mean is not None:
        g = g + g_mean[:, None] / m
    if g_cov is not None:
        g = g + ((g_cov + g_cov.T) @ xc) / m
    gx = g.reshape(c, n, h, w).transpose(0, 1).to(x.dtype)
    return gx.contiguous(memory_format=suggest_memory_format(x))


def _hidden_chunks(x, hidden):
    """Hidden-channel slices of about x's width: the statistics are separable per
    hidden channel, so only one input-sized slice of the expansion exists at a
    time (paper section 5.1)."""
    step = max(1, x.shape[1])
    return [slice(k, min(k + step, hidden)) for k in range(0, hidden, step)]


def _depthwise_chunk(x, w_expand, b_expand, w_dw, stride, k):
    """(z1 or None, a1, z2) of hidden channels k, in the accumulation dtype."""
    acc = _acc_dtype(x)
    xa = x.to(acc)
    z1 = None
    if w_expand is None:
        a1 = xa[:, k]
    else:
        z1 = torch.nn.functional.conv2d(xa, w_expand[k].to(acc)[:, :, None, None], b_expand[k].to(acc))
        a1 = torch.nn.functional.relu6(z1)
    z2 = torch.nn.functional.conv2d(a1, w_dw[k].to(acc)[:, None], None, stride=stride, padding=1,
                                    groups=a1.shape[1])
    return z1, a1, z2


def _depthwise_moments_impl(x, w_expand, b_expand, w_dw, stride):
    means, variances = [], []
    for k in _hidden_chunks(x, w_dw.shape[0]):
        _, _, z2 = _depthwise_chunk(x, w_expand, b_expand, w_dw, stride, k)
        var, mean = torch.var_mean(z2, dim=(0, 2, 3), correction=0)
        means.append(mean)
        variances.append(var)
    return torch.cat(means), torch.cat(variances)


def _triton_moments_usable(x: Tensor) -> bool:
    """The Triton statistics kernels serve CUDA tensors of the GPU dtypes."""
    if x.device.type != "cuda" or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    from . import triton_kernels

    return triton_kernels.is_available()


def _depthwise_moments_cuda(x, w_expand, b_expand, w_dw, stride):
    if _triton_moments_usable(x):
        from .triton_kernels import fused_ir

        return fused_ir.moments(x, w_expand, b_expand, w_dw, stride)
    return _depthwise_moments_impl(x, w_expand, b_expand, w_dw, stride)


def _depthwise_moments_backward(ctx, g_mean, g_var):
    x, w_expand, b_expand, w_dw, mean = ctx.saved_tensors
    if ((x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64))
            or _triton_moments_usable(x)):
        return _depthwise_moments_backward_fused(x, w_expand, b_expand, w_dw, ctx.stride, mean, g_mean, g_var)
    return _depthwise_moments_backward_generic(ctx, g_mean, g_var)


def _depthwise_moments_backward_generic(ctx, g_mean, g_var):
    """PyTorch ops over hidden-channel slices of the input's width (any device)."""
    x, w_expand, b_expand, w_dw, _ = ctx.saved_tensors
    stride = ctx.stride
    acc = _acc_dtype(x)
    xa = x.to(acc)
    g_x = torch.zeros_like(xa)
    g_w = torch.zeros_like(w_expand, dtype=acc) if w_expand is not None else None
    g_b = torch.zeros_like(b_expand, dtype=acc) if b_expand is not None else None
    g_w_dw = torch.zeros_like(w_dw, dtype=acc)
    for k in _hidden_chunks(x, w_dw.shape[0]):
        z1, a1, z2 = _depthwise_chunk(x, w_expand, b_expand, w_dw, stride, k)
        count = z2.shape[0] * z2.shape[2] * z2.shape[3]
        g_z2 = torch.zeros_like(z2)
        if g_mean is not None:
            g_z2 = g_z2 + (g_mean[k].to(acc) / count)[None, :, None, None]
        if g_var is not None:
            mean = z2.mean(dim=(0, 2, 3), keepdim=True)
            g_z2 = g_z2 + (2.0 * g_var[k].to(acc) / count)[None, :, None, None] * (z2 - mean)
        g_a1, g_wd_k, _ = torch.ops.aten.convolution_backward(
            g_z2, a1, w_dw[k].to(acc)[:, None], None, [stride, stride], [1, 1], [1, 1], False,
            [0, 0], a1.shape[1], [True, True, False])
        g_w_dw[k] = g_wd_k[:, 0]
        if w_expand is None:
            g_x[:, k] = g_a1
            continue
        g_z1 = torch.where((z1 > 0) & (z1 < 6), g_a1, torch.zeros_like(g_a1))
        g_b[k] = g_z1.sum(dim=(0, 2, 3))
        g_x_k, g_w_k, _ = torch.ops.aten.convolution_backward(
            g_z1, xa, w_expand[k].to(acc)[:, :, None, None], None, [1, 1], [0, 0], [1, 1], False,
            [0, 0], 1, [True, True, False])
        g_x += g_x_k
        g_w[k] = g_w_k[:, :, 0, 0]
    g_x = g_x.to(x.dtype).contiguous(memory_format=suggest_memory_format(x))
    if w_expand is None:
        return g_x, None, None, g_w_dw.to(w_dw.dtype), None
    return g_x, g_w.to(w_expand.dtype), g_b.to(b_expand.dtype), g_w_dw.to(w_dw.dtype), None


def _depthwise_moments_backward_fused(x, w_expand, b_expand, w_dw, stride, mean, g_mean, g_var):
    """The fused kernels of the backward (C++ on the CPU, Triton on CUDA): with M values per channel,
    d mean / d z2 = 1/M and d var / d z2 = 2 (z2 - mean) / M, so
    grad_z2 = alpha + beta * z2 with beta = 2 g_var / M, alpha = g_mean / M - beta mean."""
    n, _, h, w = x.shape
    ho, wo = output_size(h, w, stride)
    count = n * ho * wo
    zeros = torch.zeros_like(mean)
    beta = 2.0 * g_var / count if g_var is not None else zeros
    alpha = (g_mean / count if g_mean is not None else zeros) - beta * mean
    if x.device.type == "cpu":
        g_x, g_w, g_b, g_wd = torch.ops.mnv2.depthwise_moments_backward.default(
            x, w_expand, b_expand, w_dw, stride, alpha.to(x.dtype), beta.to(x.dtype))
    else:
        from .triton_kernels import fused_ir

        g_x, g_w, g_b, g_wd = fused_ir.moments_backward(x, w_expand, b_expand, w_dw, stride, alpha, beta)
    if w_expand is None:
        return g_x, None, None, g_wd, None
    return g_x, g_w, g_b, g_wd, None


# ----------------------------------------------------------------------------
# Registration.

def _register():
    # fused_inverted_residual ------------------------------------------------
    @torch.library.register_fake("mnv2::fused_inverted_residual")
    def _(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual):
        _, cout = _check_block_meta(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project,
                                    stride, residual)
        ho, wo = output_size(x.shape[2], x.shape[3], stride)
        return torch.empty((x.shape[0], cout, ho, wo), dtype=x.dtype, device=x.device,
                           memory_format=suggest_memory_format(x))

    @torch.library.register_fake("mnv2::fused_inverted_residual_backward")
    def _(grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual):
        hidden, cout = _check_block_meta(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project,
                                         stride, residual)
        cin = x.shape[1]
        he = hidden if w_expand is not None else 0
        new = lambda *shape: x.new_empty(shape)  # noqa: E731
        return (
            torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x)),
            new(he, cin if w_expand is not None else 0),
            new(he),
            new(hidden, 3, 3),
            new(hidden),
            new(cout, hidden),
            new(cout),
        )

    def setup_fused(ctx, inputs, output):
        x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual = inputs
        # The input and the (param-sized) weights only: the backward recomputes the rest.
        ctx.save_for_backward(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project)
        ctx.stride = stride
        ctx.residual = residual

    def backward_fused(ctx, grad_y):
        x, w_expand, b_expand, w_dw, b_dw, w_project, b_project = ctx.saved_tensors
        grads = torch.ops.mnv2.fused_inverted_residual_backward.default(
            grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, ctx.stride, ctx.residual)
        grads = list(grads)
        if w_expand is None:
            grads[1] = grads[2] = None
        needs = ctx.needs_input_grad
        return tuple(g if needs[i] else None for i, g in enumerate(grads)) + (None, None)

    torch.library.register_autograd("mnv2::fused_inverted_residual", backward_fused,
                                    setup_context=setup_fused)

    @register_flop_formula(torch.ops.mnv2.fused_inverted_residual)
    def _(x_shape, w_expand_shape, b_expand_shape, w_dw_shape, b_dw_shape, w_project_shape,
          b_project_shape, stride, residual, *args, out_shape=None, **kwargs) -> int:
        return 2 * block_macs(x_shape, w_dw_shape[0], w_project_shape[0], stride,
                              w_expand_shape is not None)

    @register_flop_formula(torch.ops.mnv2.fused_inverted_residual_backward)
    def _(grad_y_shape, x_shape, w_expand_shape, b_expand_shape, w_dw_shape, b_dw_shape,
          w_project_shape, b_project_shape, stride, residual, *args, out_shape=None, **kwargs) -> int:
        # As torch counts convolution backward: input and weight gradients of each
        # convolution, twice the forward. The forward recomputation is not counted.
        return 4 * block_macs(x_shape, w_dw_shape[0], w_project_shape[0], stride,
                              w_expand_shape is not None)

    # pack_weights / fused_inverted_residual_packed (inference with cached weights)
    @torch.library.register_fake("mnv2::pack_weights")
    def _(w_expand, b_expand, w_dw, b_dw, w_project, b_project):
        cin = w_expand.shape[1] if w_expand is not None else w_dw.shape[0]
        numel = _extension._C.packed_numel(cin, w_dw.shape[0], w_project.shape[0],
                                           w_expand is not None, w_dw.dtype == torch.float64)
        return w_dw.new_empty((numel,))

    @torch.library.register_fake("mnv2::fused_inverted_residual_packed")
    def _(x, packed, hidden, cout, has_expand, stride, residual):
        torch._check(x.dim() == 4, lambda: f"mnv2: x must be 4-D (N, C, H, W), got {x.dim()}-D")
        ho, wo = output_size(x.shape[2], x.shape[3], stride)
        return torch.empty((x.shape[0], cout, ho, wo), dtype=x.dtype, device=x.device,
                           memory_format=suggest_memory_format(x))

    @register_flop_formula(torch.ops.mnv2.fused_inverted_residual_packed)
    def _(x_shape, packed_shape, hidden, cout, has_expand, stride, residual, *args, out_shape=None,
          **kwargs) -> int:
        return 2 * block_macs(x_shape, hidden, cout, stride, has_expand)

    # pack_pointwise / pointwise_conv_packed (the model's head, inference) ----
    @torch.library.register_fake("mnv2::pack_pointwise")
    def _(weight, bias):
        torch._check(weight.dim() == 2, lambda: "mnv2: pack_pointwise needs a (cout, cin) weight")
        numel = _extension._C.pointwise_packed_numel(weight.shape[1], weight.shape[0],
                                                     weight.dtype == torch.float64)
        return weight.new_empty((numel,))

    @torch.library.register_fake("mnv2::pointwise_conv_packed")
    def _(x, packed, cout, activation):
        torch._check(x.dim() == 4, lambda: f"mnv2: x must be 4-D (N, C, H, W), got {x.dim()}-D")
        return torch.empty((x.shape[0], cout, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    @torch.library.register_fake("mnv2::stem_block_packed")
    def _(image, stem_packed, packed, channels, cout, stride):
        torch._check(image.dim() == 4, lambda: f"mnv2: image must be 4-D (N, C, H, W), got {image.dim()}-D")
        h, w = output_size(image.shape[2], image.shape[3], 2)
        ho, wo = output_size(h, w, stride)
        return torch.empty((image.shape[0], cout, ho, wo), dtype=image.dtype, device=image.device,
                           memory_format=suggest_memory_format(image))

    def stem_block_macs(image_shape, channels, cout, stride) -> int:
        n, c, h, w = image_shape
        sh, sw = output_size(h, w, 2)
        return n * sh * sw * channels * 9 * c + block_macs((n, channels, sh, sw), channels, cout, stride, False)

    @register_flop_formula(torch.ops.mnv2.stem_block_packed)
    def _(image_shape, stem_shape, packed_shape, channels, cout, stride, *args, out_shape=None,
          **kwargs) -> int:
        return 2 * stem_block_macs(image_shape, channels, cout, stride)

    @torch.library.register_fake("mnv2::pointwise_conv_mean_packed")
    def _(x, packed, cout, activation):
        torch._check(x.dim() == 4, lambda: f"mnv2: x must be 4-D (N, C, H, W), got {x.dim()}-D")
        return x.new_empty((x.shape[0], cout))

    @register_flop_formula(torch.ops.mnv2.pointwise_conv_mean_packed)
    def _(x_shape, packed_shape, cout, activation, *args, out_shape=None, **kwargs) -> int:
        n, c, h, w = x_shape
        return 2 * n * h * w * c * cout

    @torch.library.register_fake("mnv2::mobilenet_v2_packed")
    def _(image, stem_packed, first_packed, first_args, blocks, block_args, head_packed, head_args,
          classifier_packed, classes):
        torch._check(image.dim() == 4, lambda: f"mnv2: image must be 4-D (N, C, H, W), got {image.dim()}-D")
        return image.new_empty((image.shape[0], classes))

    @register_flop_formula(torch.ops.mnv2.mobilenet_v2_packed)
    def _(image_shape, stem_shape, first_shape, first_args, block_shapes, block_args, head_shape,
          head_args, classifier_shape, classes, *args, out_shape=None, **kwargs) -> int:
        n, _, h, w = image_shape
        channels, c, stride = first_args
        macs = stem_block_macs(image_shape, channels, c, stride)
        h, w = output_size(*output_size(h, w, 2), stride)
        for i in range(0, len(block_args), 5):
            hidden, cout, has_expand, stride, _residual = block_args[i:i + 5]
            macs += block_macs((n, c, h, w), hidden, cout, stride, bool(has_expand))
            c = cout
            h, w = output_size(h, w, stride)
        macs += n * h * w * c * head_args[0] + n * head_args[0] * classes
        return 2 * macs

    # channel_moments ----------------------------------------------------------
    torch.library.register_kernel("mnv2::channel_moments", ("cpu", "cuda"), _channel_moments_impl)

    @torch.library.register_fake("mnv2::channel_moments")
    def _(x):
        torch._check(x.dim() == 4, lambda: "mnv2: channel_moments needs a 4-D input")
        c = x.shape[1]
        acc = _acc_dtype(x)
        return x.new_empty((c,), dtype=acc), x.new_empty((c, c), dtype=acc)

    def setup_saving_inputs(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    torch.library.register_autograd("mnv2::channel_moments", _channel_moments_backward,
                                    setup_context=setup_saving_inputs)

    # depthwise_moments --------------------------------------------------------
    # the CPU kernel is C++ (csrc/cpu: the fused backward kernel's row walk in statistics mode)
    # CUDA: the Triton statistics kernel (streamed, nothing hidden-sized), or PyTorch ops over
    # hidden-channel slices where Triton is unavailable
    torch.library.register_kernel("mnv2::depthwise_moments", "cuda", _depthwise_moments_cuda)

    @torch.library.register_fake("mnv2::depthwise_moments")
    def _(x, w_expand, b_expand, w_dw, stride):
        torch._check(x.dim() == 4, lambda: "mnv2: depthwise_moments needs a 4-D input")
        hidden = w_dw.shape[0]
        acc = _acc_dtype(x)
        return x.new_empty((hidden,), dtype=acc), x.new_empty((hidden,), dtype=acc)

    def setup_depthwise(ctx, inputs, output):
        x, w_expand, b_expand, w_dw, stride = inputs
        # the inputs and the (per-channel) mean: nothing hidden-sized
        ctx.save_for_backward(x, w_expand, b_expand, w_dw, output[0])
        ctx.stride = stride

    torch.library.register_autograd("mnv2::depthwise_moments", _depthwise_moments_backward,
                                    setup_context=setup_depthwise)

    @torch.library.register_fake("mnv2::depthwise_moments_backward")
    def _(x, w_expand, b_expand, w_dw, stride, alpha, beta):
        he = w_dw.shape[0] if w_expand is not None else 0
        return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x)),
                x.new_empty((he, x.shape[1] if w_expand is not None else 0)), x.new_empty((he,)),
                x.new_empty(tuple(w_dw.shape)))


if _extension.LOADED:
    _register()


def _register_triton_early():
    """Registers the Triton operators at import where that cannot disturb
    TRITON_INTERPRET (which must be set before triton's own import): on a
    machine with a CUDA GPU, or when the interpreter is already requested."""
    from . import triton_kernels

    if triton_kernels.is_available():
        try:
            triton_op()
        except Exception as exc:  # pragma: no cover - an unusable Triton install
            import warnings

            warnings.warn(f"mnv2_kernels: the Triton backend could not be registered ({exc!r})",
                          RuntimeWarning, stacklevel=2)

