"""Batch statistics of the fused block's batch norms in training, without the hidden
tensor in autograd: the PyTorch kernels of ``mnv2::channel_moments`` and of
``mnv2::depthwise_moments`` on CUDA (the CPU kernel of the latter is C++), and both
operators' explicit backwards. Each operator saves only its inputs (and a per-channel
mean) and recomputes in its backward.
"""

from typing import Optional

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import _extension
from .ops import output_size
from .reference import activation_fn


def acc_dtype(x: Tensor) -> torch.dtype:
    """Statistics are accumulated in at least float32."""
    return torch.promote_types(x.dtype, torch.float32)


# ----------------------------------------------------------------------------
# channel_moments: bn1's statistics follow from x's as W mean and diag(W cov W^T).

def channel_moments_torch(x: Tensor):
    """Per-channel mean (C,) and biased covariance (C, C) of x over (N, H, W)."""
    c = x.shape[1]
    xf = x.to(acc_dtype(x)).transpose(0, 1).reshape(c, -1)
    mean = xf.mean(1)
    xc = xf - mean[:, None]  # centred before the product: no cancellation
    return mean, (xc @ xc.T) / xf.shape[1]


def _channel_moments_backward(ctx, g_mean, g_cov):
    (x,) = ctx.saved_tensors
    n, c, h, w = x.shape
    xf = x.to(acc_dtype(x)).transpose(0, 1).reshape(c, -1)
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


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def project_moments_torch(mean: Tensor, cov: Tensor, w: Tensor, b: Optional[Tensor]):
    """(w mean + b, diag(w cov w^T)) in cov's dtype: the statistics of w x + b from x's."""
    wa = w.to(cov.dtype)
    m = wa @ mean
    if b is not None:
        m = m + b.to(cov.dtype)
    return m, ((wa @ cov) * wa).sum(1).clamp_min(0)


def _project_moments_backward(ctx, g_m, g_v):
    mean, cov, w, b = ctx.saved_tensors
    wa = w.to(cov.dtype)
    gm = g_m if g_m is not None else mean.new_zeros(w.shape[0])
    gv = g_v if g_v is not None else mean.new_zeros(w.shape[0])
    # clamp_min(0) passes the gradient where its input is >= 0, as torch's
    gv = gv * ((wa @ cov) * wa).sum(1).ge(0)
    g_mean = wa.T @ gm
    g_cov = (wa * gv[:, None]).T @ wa
    # d (w_h^T C w_h) / d w_h = (C + C^T) w_h
    g_w = gm[:, None] * mean[None, :] + gv[:, None] * (wa @ (cov + cov.T))
    return g_mean, g_cov, g_w.to(w.dtype), None if b is None else gm.to(b.dtype)


# ----------------------------------------------------------------------------
# depthwise_moments: bn2's statistics, of z2 = dw(relu6(w_expand x + b_expand)) before
# the depthwise bias.

def _hidden_chunks(x, hidden):
    """Hidden-channel slices of about x's width: the statistics are separable per hidden
    channel, so only one input-sized slice of the expansion exists at a time (paper
    section 5.1)."""
    step = max(1, x.shape[1])
    return [slice(k, min(k + step, hidden)) for k in range(0, hidden, step)]


def _depthwise_chunk(x, w_expand, b_expand, w_dw, stride, dilation, k, activation="relu6"):
    """(z1 or None, a1, z2) of hidden channels k, in the accumulation dtype."""
    acc = acc_dtype(x)
    xa = x.to(acc)
    z1 = None
    if w_expand is None:
        a1 = xa[:, k]
    else:
        z1 = torch.nn.functional.conv2d(xa, w_expand[k].to(acc)[:, :, None, None], b_expand[k].to(acc))
        a1 = activation_fn(activation)(z1)
    z2 = torch.nn.functional.conv2d(a1, w_dw[k].to(acc)[:, None], None, stride=stride,
                                    padding=dilation * (w_dw.shape[-1] // 2), dilation=dilation, groups=a1.shape[1])
    return z1, a1, z2


def depthwise_moments_torch(x, w_expand, b_expand, w_dw, stride, dilation=1, activation="relu6"):
    """Mean and biased variance per hidden channel by PyTorch ops over hidden-channel
    slices of the input's width (any device)."""
    means, variances = [], []
    for k in _hidden_chunks(x, w_dw.shape[0]):
        _, _, z2 = _depthwise_chunk(x, w_expand, b_expand, w_dw, stride, dilation, k, activation)
        var, mean = torch.var_mean(z2, dim=(0, 2, 3), correction=0)
        means.append(mean)
        variances.append(var)
    return torch.cat(means), torch.cat(variances)


def _triton_usable(x: Tensor) -> bool:
    """The Triton statistics kernels serve CUDA tensors of the GPU dtypes."""
    if x.device.type != "cuda" or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    from . import triton_kernels

    return triton_kernels.is_available()


def _depthwise_moments_cuda(x, w_expand, b_expand, w_dw, stride, dilation=1, activation="relu6"):
    """CUDA: the Triton statistics kernel (streamed, nothing hidden-sized), or PyTorch ops
    over hidden-channel slices where Triton is unavailable."""
    if _triton_usable(x):
        from .triton_kernels import fused_ir

        return fused_ir.moments(x, w_expand, b_expand, w_dw, stride, dilation, activation=activation)
    return depthwise_moments_torch(x, w_expand, b_expand, w_dw, stride, dilation, activation)


def _save_depthwise(ctx, inputs, output):
    x, w_expand, b_expand, w_dw, stride = inputs[:5]
    # the inputs and the (per-channel) mean: nothing hidden-sized
    ctx.save_for_backward(x, w_expand, b_expand, w_dw, output[0])
    ctx.stride = stride
    ctx.dilation = inputs[5] if len(inputs) > 5 else 1
    ctx.activation = inputs[6] if len(inputs) > 6 else "relu6"
    ctx.n_inputs = len(inputs)


def _depthwise_moments_backward(ctx, g_mean, g_var):
    x, w_expand, b_expand, w_dw, mean = ctx.saved_tensors
    if x.device.type == "cpu" or _triton_usable(x):  # (CPU float16/bfloat16: computed in float32)
        grads = depthwise_moments_backward_fused(x, w_expand, b_expand, w_dw, ctx.stride, mean, g_mean, g_var,
                                                 ctx.dilation, ctx.activation)
    else:
        grads = depthwise_moments_backward_torch(x, w_expand, b_expand, w_dw, ctx.stride, g_mean, g_var,
                                                 ctx.dilation, ctx.activation)
    return (*grads,) + (None,) * (ctx.n_inputs - 4)


def depthwise_moments_backward_torch(x, w_expand, b_expand, w_dw, stride, g_mean: Optional[Tensor],
                                     g_var: Optional[Tensor], dilation: int = 1, activation: str = "relu6"):
    """The gradients (x, w_expand, b_expand, w_dw) by PyTorch ops over hidden-channel slices
    of the input's width (any device); the expand's are None when w_expand is None."""
    acc = acc_dtype(x)
    xa = x.to(acc)
    g_x = torch.zeros_like(xa)
    g_w = torch.zeros_like(w_expand, dtype=acc) if w_expand is not None else None
    g_b = torch.zeros_like(b_expand, dtype=acc) if b_expand is not None else None
    g_w_dw = torch.zeros_like(w_dw, dtype=acc)
    for k in _hidden_chunks(x, w_dw.shape[0]):
        z1, a1, z2 = _depthwise_chunk(x, w_expand, b_expand, w_dw, stride, dilation, k, activation)
        count = z2.shape[0] * z2.shape[2] * z2.shape[3]
        g_z2 = torch.zeros_like(z2)
        if g_mean is not None:
            g_z2 = g_z2 + (g_mean[k].to(acc) / count)[None, :, None, None]
        if g_var is not None:
            mean = z2.mean(dim=(0, 2, 3), keepdim=True)
            g_z2 = g_z2 + (2.0 * g_var[k].to(acc) / count)[None, :, None, None] * (z2 - mean)
        g_a1, g_wd_k, _ = torch.ops.aten.convolution_backward(
            g_z2, a1, w_dw[k].to(acc)[:, None], None, [stride, stride], [dilation * (w_dw.shape[-1] // 2)] * 2,
            [dilation, dilation], False, [0, 0], a1.shape[1], [True, True, False])
        g_w_dw[k] = g_wd_k[:, 0]
        if w_expand is None:
            g_x[:, k] = g_a1
            continue
        passes = (z1 > 0) & (z1 < 6) if activation == "relu6" else z1 > 0
        g_z1 = torch.where(passes, g_a1, torch.zeros_like(g_a1))
        g_b[k] = g_z1.sum(dim=(0, 2, 3))
        g_x_k, g_w_k, _ = torch.ops.aten.convolution_backward(
            g_z1, xa, w_expand[k].to(acc)[:, :, None, None], None, [1, 1], [0, 0], [1, 1], False,
            [0, 0], 1, [True, True, False])
        g_x += g_x_k
        g_w[k] = g_w_k[:, :, 0, 0]
    g_x = g_x.to(x.dtype).contiguous(memory_format=suggest_memory_format(x))
    if w_expand is None:
        return g_x, None, None, g_w_dw.to(w_dw.dtype)
    return g_x, g_w.to(w_expand.dtype), g_b.to(b_expand.dtype), g_w_dw.to(w_dw.dtype)


def depthwise_moments_backward_fused(x, w_expand, b_expand, w_dw, stride, mean, g_mean: Optional[Tensor],
                                     g_var: Optional[Tensor], dilation: int = 1, activation: str = "relu6"):
    """The gradients (x, w_expand, b_expand, w_dw) by the fused kernels (C++ on the CPU,
    Triton on CUDA): with M values per channel, d mean / d z2 = 1/M and
    d var / d z2 = 2 (z2 - mean) / M, so grad_z2 = alpha + beta * z2 with
    beta = 2 g_var / M, alpha = g_mean / M - beta mean."""
    n, _, h, w = x.shape
    ho, wo = output_size(h, w, stride, dilation, w_dw.shape[-1])
    count = n * ho * wo
    zeros = torch.zeros_like(mean)
    beta = 2.0 * g_var / count if g_var is not None else zeros
    alpha = (g_mean / count if g_mean is not None else zeros) - beta * mean
    if x.device.type == "cpu":
        g_x, g_w, g_b, g_wd = torch.ops.mnv2.depthwise_moments_backward.default(
            x, w_expand, b_expand, w_dw, stride, alpha.to(acc_dtype(x)), beta.to(acc_dtype(x)),
            dilation, activation)
    else:
        from .triton_kernels import fused_ir

        g_x, g_w, g_b, g_wd = fused_ir.moments_backward(x, w_expand, b_expand, w_dw, stride, alpha, beta,
                                                        dilation, activation=activation)
    if w_expand is None:
        return g_x, None, None, g_wd
    return g_x, g_w, g_b, g_wd


if _extension.LOADED:
    torch.library.register_kernel("mnv2::channel_moments", ("cpu", "cuda"), channel_moments_torch)
    torch.library.register_kernel("mnv2::project_moments", ("cpu", "cuda"), project_moments_torch)
    torch.library.register_autograd("mnv2::project_moments", _project_moments_backward,
                                    setup_context=_save_inputs)
    torch.library.register_autograd("mnv2::channel_moments", _channel_moments_backward,
                                    setup_context=_save_inputs)
    # (the CPU kernel of depthwise_moments is C++: csrc/cpu/stats_ops.cpp)
    torch.library.register_kernel("mnv2::depthwise_moments", "cuda", _depthwise_moments_cuda)
    torch.library.register_autograd("mnv2::depthwise_moments", _depthwise_moments_backward,
                                    setup_context=_save_depthwise)
