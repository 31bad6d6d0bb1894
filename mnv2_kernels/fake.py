"""Fake (meta) kernels of the compiled ``mnv2::`` operators: output shapes, dtypes and
memory formats for torch.compile, torch.export and meta tensors, with the checks that
the C++ kernels make on shapes."""

import torch
from torch._prims_common import suggest_memory_format

from . import _extension
from .moments import acc_dtype
from .ops import BLOCK_ACTIVATIONS, DW_KERNEL, DW_KERNELS, max_dilation, output_size, stem_output_size


def check_kernel_size(kernel_size):
    torch._check(kernel_size in DW_KERNELS,
                 lambda: f"mnv2: the depthwise kernel size must be 3, 5 or 7, got {kernel_size}")


def check_dilation(dilation, kernel_size=DW_KERNEL):
    torch._check(1 <= dilation <= max_dilation(kernel_size),
                 lambda: f"mnv2: dilation must be between 1 and {max_dilation(kernel_size)} for a "
                         f"{kernel_size}x{kernel_size} depthwise kernel, got {dilation}")


def check_activation(activation):
    torch._check(activation in BLOCK_ACTIVATIONS,
                 lambda: f'mnv2: activation must be "relu6" or "relu", got "{activation}"')


def check_depthwise(w_dw, dilation, activation):
    """The depthwise weights (hidden, k, k), k in DW_KERNELS; returns k."""
    torch._check(w_dw.dim() == 3 and w_dw.shape[1] == w_dw.shape[2] and w_dw.shape[1] in DW_KERNELS,
                 lambda: "mnv2: the depthwise kernel must be 3x3, 5x5 or 7x7: w_dw must be (hidden, k, k) with "
                         f"k 3, 5 or 7, got {tuple(w_dw.shape)}")
    k = w_dw.shape[1]
    check_dilation(dilation, k)
    check_activation(activation)
    return k


def check_block(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, dilation=1,
                activation="relu6"):
    """The shape checks of the block's kernels; returns (hidden, cout)."""
    torch._check(x.dim() == 4, lambda: f"mnv2: x must be 4-D (N, C, H, W), got {x.dim()}-D")
    torch._check(stride in (1, 2), lambda: f"mnv2: stride must be 1 or 2, got {stride}")
    check_depthwise(w_dw, dilation, activation)
    for name, t in (("w_expand", w_expand), ("b_expand", b_expand), ("w_dw", w_dw), ("b_dw", b_dw),
                    ("w_project", w_project), ("b_project", b_project)):
        if t is not None:
            torch._check(t.device == x.device and t.dtype == x.dtype,
                         lambda: f"mnv2: {name} ({t.dtype} on {t.device}) must match x ({x.dtype} on {x.device})")
    hidden = w_dw.shape[0]
    cin = x.shape[1]
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


def _like_x(x, shape):
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


def _check_4d(t, name="x"):
    torch._check(t.dim() == 4, lambda: f"mnv2: {name} must be 4-D (N, C, H, W), got {t.dim()}-D")


def block(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, dilation=1,
          activation="relu6"):
    _, cout = check_block(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, dilation,
                          activation)
    return _like_x(x, (x.shape[0], cout, *output_size(x.shape[2], x.shape[3], stride)))


def block_backward(grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, dilation=1,
                   activation="relu6"):
    hidden, cout = check_block(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, dilation,
                               activation)
    he = hidden if w_expand is not None else 0
    return (_like_x(x, x.shape), x.new_empty((he, x.shape[1] if w_expand is not None else 0)), x.new_empty((he,)),
            x.new_empty(tuple(w_dw.shape)), x.new_empty((hidden,)), x.new_empty((cout, hidden)),
            x.new_empty((cout,)))


def pack_weights(w_expand, b_expand, w_dw, b_dw, w_project, b_project):
    cin = w_expand.shape[1] if w_expand is not None else w_dw.shape[0]
    check_depthwise(w_dw, 1, "relu6")
    numel = _extension._C.packed_numel(cin, w_dw.shape[0], w_project.shape[0], w_expand is not None,
                                       w_dw.dtype == torch.float64, w_dw.shape[1])
    return w_dw.new_empty((numel,))


def block_packed(x, packed, hidden, cout, has_expand, stride, residual, dilation=1, kernel_size=DW_KERNEL,
                 activation="relu6"):
    _check_4d(x)
    check_kernel_size(kernel_size)
    check_dilation(dilation, kernel_size)
    check_activation(activation)
    return _like_x(x, (x.shape[0], cout, *output_size(x.shape[2], x.shape[3], stride)))


def pack_pointwise(weight, bias):
    torch._check(weight.dim() == 2, lambda: "mnv2: pack_pointwise needs a (cout, cin) weight")
    numel = _extension._C.pointwise_packed_numel(weight.shape[1], weight.shape[0], weight.dtype == torch.float64)
    return weight.new_empty((numel,))


def pointwise_conv_packed(x, packed, cout, activation):
    _check_4d(x)
    return torch.empty((x.shape[0], cout, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def stem_block_packed(image, stem_packed, packed, channels, cout, stride):
    _check_4d(image, "image")
    h, w = stem_output_size(image.shape[2], image.shape[3])
    return _like_x(image, (image.shape[0], cout, *output_size(h, w, stride)))


def pointwise_conv_mean_packed(x, packed, cout, activation):
    _check_4d(x)
    return x.new_empty((x.shape[0], cout))


def mobilenet_v2_packed(image, stem_packed, first_packed, first_args, blocks, block_args, head_packed, head_args,
                        classifier_packed, classes):
    _check_4d(image, "image")
    return image.new_empty((image.shape[0], classes))


def channel_moments(x):
    torch._check(x.dim() == 4, lambda: "mnv2: channel_moments needs a 4-D input")
    c = x.shape[1]
    acc = acc_dtype(x)
    return x.new_empty((c,), dtype=acc), x.new_empty((c, c), dtype=acc)


def project_moments(mean, cov, w, b):
    torch._check(mean.dim() == 1 and cov.dim() == 2 and w.dim() == 2,
                 lambda: "mnv2: project_moments needs a (C,) mean, a (C, C) cov and a (hidden, C) w")
    return cov.new_empty((w.shape[0],)), cov.new_empty((w.shape[0],))


def depthwise_moments(x, w_expand, b_expand, w_dw, stride, dilation=1, activation="relu6"):
    torch._check(x.dim() == 4, lambda: "mnv2: depthwise_moments needs a 4-D input")
    check_depthwise(w_dw, dilation, activation)
    acc = acc_dtype(x)
    return x.new_empty((w_dw.shape[0],), dtype=acc), x.new_empty((w_dw.shape[0],), dtype=acc)


def depthwise_moments_backward(x, w_expand, b_expand, w_dw, stride, alpha, beta, dilation=1, activation="relu6"):
    check_depthwise(w_dw, dilation, activation)
    he = w_dw.shape[0] if w_expand is not None else 0
    return (_like_x(x, x.shape), x.new_empty((he, x.shape[1] if w_expand is not None else 0)),
            x.new_empty((he,)), x.new_empty(tuple(w_dw.shape)))


if _extension.LOADED:
    for _name, _fake in (("fused_inverted_residual", block),
                         ("fused_inverted_residual_backward", block_backward),
                         ("pack_weights", pack_weights),
                         ("fused_inverted_residual_packed", block_packed),
                         ("pack_pointwise", pack_pointwise),
                         ("pointwise_conv_packed", pointwise_conv_packed),
                         ("stem_block_packed", stem_block_packed),
                         ("pointwise_conv_mean_packed", pointwise_conv_mean_packed),
                         ("mobilenet_v2_packed", mobilenet_v2_packed),
                         ("channel_moments", channel_moments),
                         ("project_moments", project_moments),
                         ("depthwise_moments", depthwise_moments),
                         ("depthwise_moments_backward", depthwise_moments_backward)):
        torch.library.register_fake(f"mnv2::{_name}")(_fake)
