"""FLOP formulas of the ``mnv2::`` operators for torch.utils.flop_counter.FlopCounterMode:
twice the multiply-adds of the convolutions each computes (batch norm, activations and
the residual add are not counted, as torch does not count them for convolutions). The
batch-norm statistics operators have no formula: torch counts no FLOPs for batch norm.

``register(op)`` adds the block formulas to another operator with the same signature
(the Triton backend's)."""

import torch
from torch.utils.flop_counter import register_flop_formula

from . import _extension
from .ops import DW_KERNEL, STEM_KERNEL, output_size, stem_output_size


def block_macs(x_shape, hidden: int, cout: int, stride: int, has_expand: bool, kernel_size: int = DW_KERNEL) -> int:
    """Multiply-adds of one block: expand + depthwise (k x k) + project (the same at every
    dilation: a dilated depthwise step has the same taps and output size)."""
    n, cin, h, w = x_shape
    ho, wo = output_size(h, w, stride)
    expand = n * h * w * cin * hidden if has_expand else 0
    return expand + n * ho * wo * hidden * kernel_size * kernel_size + n * ho * wo * hidden * cout


def stem_block_macs(image_shape, channels: int, cout: int, stride: int) -> int:
    """Multiply-adds of MobileNetV2's first convolution and the first block."""
    n, c, h, w = image_shape
    sh, sw = stem_output_size(h, w)
    stem = n * sh * sw * channels * STEM_KERNEL * STEM_KERNEL * c
    return stem + block_macs((n, channels, sh, sw), channels, cout, stride, False)


def _block(x_shape, w_expand_shape, b_expand_shape, w_dw_shape, b_dw_shape, w_project_shape,
           b_project_shape, stride, residual, *args, out_shape=None, **kwargs) -> int:
    return 2 * block_macs(x_shape, w_dw_shape[0], w_project_shape[0], stride, w_expand_shape is not None,
                          w_dw_shape[-1])


def _block_backward(grad_y_shape, x_shape, w_expand_shape, b_expand_shape, w_dw_shape, b_dw_shape,
                    w_project_shape, b_project_shape, stride, residual, *args, out_shape=None, **kwargs) -> int:
    # As torch counts convolution backward: input and weight gradients of each
    # convolution, twice the forward. The forward recomputation is not counted.
    return 4 * block_macs(x_shape, w_dw_shape[0], w_project_shape[0], stride, w_expand_shape is not None,
                          w_dw_shape[-1])


def _block_packed(x_shape, packed_shape, hidden, cout, has_expand, stride, residual, dilation=1,
                  kernel_size=DW_KERNEL, *args, out_shape=None, **kwargs) -> int:
    return 2 * block_macs(x_shape, hidden, cout, stride, has_expand, kernel_size)


def _stem_block(image_shape, stem_shape, packed_shape, channels, cout, stride, *args, out_shape=None,
                **kwargs) -> int:
    return 2 * stem_block_macs(image_shape, channels, cout, stride)


def _pointwise(x_shape, packed_shape, cout, activation, *args, out_shape=None, **kwargs) -> int:
    # (the mean of pointwise_conv_mean_packed is not counted, as torch counts no pooling)
    n, c, h, w = x_shape
    return 2 * n * h * w * c * cout


def _model(image_shape, stem_shape, first_shape, first_args, block_shapes, block_args, head_shape,
           head_args, classifier_shape, classes, *args, out_shape=None, **kwargs) -> int:
    n, _, h, w = image_shape
    channels, c, stride = first_args
    macs = stem_block_macs(image_shape, channels, c, stride)
    h, w = output_size(*stem_output_size(h, w), stride)
    for i in range(0, len(block_args), 8):
        hidden, cout, has_expand, stride, _residual, _dilation, kernel_size, _relu6 = block_args[i:i + 8]
        macs += block_macs((n, c, h, w), hidden, cout, stride, bool(has_expand), kernel_size)
        c = cout
        h, w = output_size(h, w, stride)
    macs += n * h * w * c * head_args[0] + n * head_args[0] * classes
    return 2 * macs


def register(forward_op, backward_op) -> None:
    """The block's formulas for a forward and a backward operator with the signatures of
    mnv2::fused_inverted_residual and mnv2::fused_inverted_residual_backward."""
    register_flop_formula(forward_op)(_block)
    register_flop_formula(backward_op)(_block_backward)


if _extension.LOADED:
    register(torch.ops.mnv2.fused_inverted_residual, torch.ops.mnv2.fused_inverted_residual_backward)
    for _op, _formula in ((torch.ops.mnv2.fused_inverted_residual_packed, _block_packed),
                          (torch.ops.mnv2.stem_block_packed, _stem_block),
                          (torch.ops.mnv2.pointwise_conv_packed, _pointwise),
                          (torch.ops.mnv2.pointwise_conv_mean_packed, _pointwise),
                          (torch.ops.mnv2.mobilenet_v2_packed, _model)):
        register_flop_formula(_op)(_formula)
