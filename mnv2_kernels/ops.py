"""Python wrappers of the ``mnv2::`` operators (schemas in csrc/ops.cpp).

The rest of the operators' Python side is registered at import, each in its own
module: fake kernels (``fake``), autograd (``autograd``), FLOP formulas (``flops``)
and the moment operators' PyTorch kernels (``moments``).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _extension

# The depthwise convolution's kernel sizes (MobileNetV2's 3x3 is the default) and its
# padding at dilation 1; a dilated (atrous) depthwise step pads by dilation * (k // 2).
DW_KERNEL = 3
DW_KERNELS = (3, 5, 7)
DW_PAD = DW_KERNEL // 2
# The widest depthwise span dilation * (k - 1) + 1 the kernels take (the C++ core's
# kMaxDwSpan): dilations up to 31 at 3x3, 15 at 5x5 and 10 at 7x7.
MAX_DW_SPAN = 63
# The activations after the expand and after the depthwise step.
BLOCK_ACTIVATIONS = ("relu6", "relu")


def max_dilation(kernel_size: int = DW_KERNEL) -> int:
    """The largest depthwise dilation the kernels take at this kernel size."""
    return (MAX_DW_SPAN - 1) // (kernel_size - 1)


# The largest dilation at 3x3.
MAX_DILATION = max_dilation(DW_KERNEL)
# MobileNetV2's first convolution, fused by stem_block: kernel, stride, padding.
STEM_KERNEL, STEM_STRIDE, STEM_PAD = 3, 2, 1

# Operators looked up once: the attribute chain costs microseconds on the inference
# fast paths, which call them per block.
if _extension.LOADED:
    BLOCK_PACKED = torch.ops.mnv2.fused_inverted_residual_packed.default
    MODEL_PACKED = torch.ops.mnv2.mobilenet_v2_packed.default
else:
    BLOCK_PACKED = MODEL_PACKED = None

ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2}


def output_size(h, w, stride, dilation=1, kernel_size=DW_KERNEL):
    """Output height and width of the block's depthwise step (padding dilation * (k // 2);
    the same for every dilation and kernel size)."""
    span = dilation * (kernel_size - 1) + 1
    pad = dilation * (kernel_size // 2)
    return (h + 2 * pad - span) // stride + 1, (w + 2 * pad - span) // stride + 1


def stem_output_size(h, w):
    """Output height and width of MobileNetV2's first convolution."""
    return (h + 2 * STEM_PAD - STEM_KERNEL) // STEM_STRIDE + 1, (w + 2 * STEM_PAD - STEM_KERNEL) // STEM_STRIDE + 1


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
    dilation: int = 1,
    activation: str = "relu6",
) -> Tensor:
    """The fused block on BN-folded weights.

    Args:
        x: input (N, Cin, H, W), NCHW or channels_last (or any strides).
        w_expand, b_expand: expand 1x1 (hidden, Cin) and bias (hidden); None when t == 1.
        w_dw, b_dw: depthwise (hidden, k, k), k one of DW_KERNELS (3, 5, 7), and bias (hidden).
        w_project, b_project: project 1x1 (Cout, hidden) and bias (Cout).
        stride: 1 or 2.
        residual: add x to the output (needs stride 1 and Cin == Cout).
        dilation: the depthwise taps' spacing (atrous convolution), padding
            dilation * (k // 2); 1 to max_dilation(k). The CUDA kernel takes 1 only.
        activation: "relu6" (MobileNetV2) or "relu" (MNASNet, EfficientNet-Lite, ...),
            after the expand and after the depthwise step. The CUDA kernel takes
            "relu6" at 3x3 only; "auto" picks Triton for the others.
        backend: "triton" runs ``mnv2::triton_fused_inverted_residual``; "reference" the
            plain PyTorch ops; "cpu" and "cuda" the C++ operator's kernel for that device,
            which checks every argument; "auto" the fastest for x. None: the selected
            backend (``use_backend``). A backend that cannot run x (another device's,
            or without the dtype) raises.

    Returns:
        (N, Cout, Ho, Wo) in x's memory format.
    """
    from . import backends

    if backend is None:
        backend = backends.get_backend()
    if backend != "auto" or x.device.type == "cuda":  # (auto elsewhere: the dispatcher's kernel)
        backend = backends.check(backend, x, dilation, w_dw.shape[-1], activation)
    return run_block(backend, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, dilation,
                     activation)


def trailing_args(dilation: int, activation: str) -> tuple:
    """The operators' trailing (dilation, activation) arguments, passed only as far as they
    differ from the defaults, so that graphs of MobileNetV2's blocks (fx, export, ONNX)
    keep the operators' short form."""
    if activation != "relu6":
        return dilation, activation
    return (dilation,) if dilation != 1 else ()


def run_block(backend: str, x: Tensor, w_expand: Optional[Tensor], b_expand: Optional[Tensor], w_dw: Tensor,
              b_dw: Tensor, w_project: Tensor, b_project: Tensor, stride: int, residual: bool,
              dilation: int = 1, activation: str = "relu6") -> Tensor:
    """fused_inverted_residual on a backend already checked against x (backends.check or
    resolve): "triton", "reference", or the dispatcher's kernel for x's device."""
    if backend == "reference":
        from .reference import inverted_residual

        return inverted_residual(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual,
                                 dilation, activation)
    op = triton_op() if backend == "triton" else torch.ops.mnv2.fused_inverted_residual.default
    return op(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual,
              *trailing_args(dilation, activation))


_TRITON_OP = None


def triton_op():
    """torch.ops.mnv2.triton_fused_inverted_residual.default; the first call imports
    Triton and registers the operator (mnv2_kernels' import does it already where a
    CUDA GPU is present, so that torch.compile never traces the registration)."""
    global _TRITON_OP
    if _TRITON_OP is None:
        from .triton_kernels import ops as triton_ops

        triton_ops.register()
        _TRITON_OP = torch.ops.mnv2.triton_fused_inverted_residual.default
    return _TRITON_OP


def register_triton_early():
    """Registers the Triton operators at import where that cannot disturb
    TRITON_INTERPRET (which must be set before triton's own import): on a machine with
    a CUDA GPU, or when the interpreter is already requested."""
    from . import triton_kernels

    if triton_kernels.is_available():
        try:
            triton_op()
        except Exception as exc:  # pragma: no cover - an unusable Triton install
            import warnings

            warnings.warn(f"mnv2_kernels: the Triton backend could not be registered ({exc!r})",
                          RuntimeWarning, stacklevel=2)


def pack_weights(w_expand: Optional[Tensor], b_expand: Optional[Tensor], w_dw: Tensor, b_dw: Tensor,
                 w_project: Tensor, b_project: Tensor) -> Tensor:
    """A block's BN-folded weights laid out for this machine's CPU kernel (opaque), for
    fused_inverted_residual_packed."""
    return torch.ops.mnv2.pack_weights.default(w_expand, b_expand, w_dw, b_dw, w_project, b_project)


def fused_inverted_residual_packed(x: Tensor, packed: Tensor, hidden: int, cout: int, has_expand: bool,
                                   stride: int, residual: bool, dilation: int = 1, kernel_size: int = DW_KERNEL,
                                   activation: str = "relu6") -> Tensor:
    """The fused block on weights from pack_weights (CPU, inference only); kernel_size is
    that of the packed depthwise weights."""
    return BLOCK_PACKED(x, packed, hidden, cout, has_expand, stride, residual, dilation, kernel_size, activation)


def pack_pointwise(weight: Tensor, bias: Tensor) -> Tensor:
    """A 1x1 convolution's (cout, cin) weight and (cout,) bias laid out for this machine's
    CPU kernel (opaque), for pointwise_conv."""
    return torch.ops.mnv2.pack_pointwise.default(weight, bias)


def pointwise_conv(x: Tensor, packed: Tensor, cout: int, activation: Optional[str] = None) -> Tensor:
    """act(conv1x1(x) + bias) with weights from pack_pointwise, on a channels_last CPU input
    (the result is channels_last); activation None, "relu" or "relu6". Inference only."""
    return torch.ops.mnv2.pointwise_conv_packed.default(x, packed, cout, ACTIVATIONS[activation])


def pack_stem(weight: Tensor, bias: Tensor) -> Tensor:
    """The stem convolution's (cout, C, STEM_KERNEL, STEM_KERNEL) weight and (cout,) bias
    laid out for stem_block (opaque): pack_pointwise of the weight as a (cout, k * k * C)
    matrix, column (kh * k + kw) * C + c."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (STEM_KERNEL, STEM_KERNEL):
        raise ValueError(f"mnv2: pack_stem needs a (cout, C, {STEM_KERNEL}, {STEM_KERNEL}) weight, "
                         f"got shape {tuple(weight.shape)}")
    return pack_pointwise(weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1), bias)


def stem_block(image: Tensor, stem_packed: Tensor, packed: Tensor, channels: int, cout: int,
               stride: int) -> Tensor:
    """block(relu6(stem(image) + b)) for a CPU block without expansion or residual, in one
    pass that never stores the stem's output: stem_packed from pack_stem, packed from
    pack_weights. Inference only."""
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
    block operator per block (``block_args``: hidden, cout, has_expand, stride, residual,
    dilation, kernel_size and relu6 (1: ReLU6, 0: ReLU) for each, flattened), then pointwise_conv_mean(h, head_packed, *head_args) (activation as
    an int, see ACTIVATIONS) and the classifier, pointwise_conv on the pooled rows with
    ``classifier_packed`` -> (N, classes). Inference only."""
    return MODEL_PACKED(image, stem_packed, first_packed, first_args, blocks, block_args, head_packed,
                        head_args, classifier_packed, classes)


def channel_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean (C,) and biased covariance (C, C) of x over (N, H, W)."""
    return torch.ops.mnv2.channel_moments.default(x)


def project_moments(mean: Tensor, cov: Tensor, w: Tensor, b: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The per-channel mean and biased variance of w x + b from x's mean (C,) and covariance
    (C, C): (w mean + b, diag(w cov w^T)), in cov's dtype; w (hidden, C), b (hidden,)."""
    return torch.ops.mnv2.project_moments.default(mean, cov, w, b)


def depthwise_moments(
    x: Tensor, w_expand: Optional[Tensor], b_expand: Optional[Tensor], w_dw: Tensor, stride: int, dilation: int = 1,
    activation: str = "relu6",
) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of dw(act(w_expand x + b_expand)), no dw bias."""
    return torch.ops.mnv2.depthwise_moments.default(x, w_expand, b_expand, w_dw, stride,
                                                    *trailing_args(dilation, activation))
