"""Batch-norm folding and batch-norm bookkeeping, differentiable by autograd.

``bn(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
``b' = beta + (b - m) * g / sqrt(v + eps)``, where (m, v) are the running
statistics (eval) or the batch statistics (train). Gradients flow through the
fold to the convolution weight, gamma and beta (and, in train mode, through the
statistics to the input).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn


def fold_bn(
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """Folds a batch norm with statistics (mean, var) into the preceding convolution.

    Args:
        weight: convolution weight (Cout, ...).
        bias: convolution bias (Cout,) or None.
        bn_weight, bn_bias: the affine gamma and beta (None when affine=False).
        mean, var: the statistics to normalise with (var biased).
        eps: the batch norm's eps.

    Returns:
        (folded weight with weight's shape, folded bias (Cout,)).
    """
    dtype = weight.dtype
    if dtype in (torch.float16, torch.bfloat16):
        # fold in float32 and round once: the folded weights then carry one
        # rounding, as the unfused module's weights do
        up = lambda t: None if t is None else t.float()  # noqa: E731
        w, b = fold_bn(weight.float(), up(bias), up(bn_weight), up(bn_bias), mean.float(), var.float(), eps)
        return w.to(dtype), b.to(dtype)
    scale = torch.rsqrt(var + eps)
    if bn_weight is not None:
        scale = bn_weight * scale
    shift = -mean if bias is None else bias - mean
    folded_bias = shift * scale
    if bn_bias is not None:
        folded_bias = folded_bias + bn_bias
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), folded_bias


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether ``bn`` normalises with batch statistics, as nn.BatchNorm2d.forward decides."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return False  # FrozenBatchNorm2d and the like: always running statistics
    buffers = bn._buffers  # (not bn.running_mean: Module.__getattr__ is slow on a hot path)
    return bn.training or (buffers.get("running_mean") is None and buffers.get("running_var") is None)


def running_stats(bn: nn.Module) -> Tuple[Tensor, Tensor]:
    return bn.running_mean, bn.running_var


def check_batch_count(count: int, size) -> None:
    """Train-mode batch norm needs more than one value per channel (as F.batch_norm)."""
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


@torch.no_grad()
def update_running_stats(bn: nn.Module, mean: Tensor, var: Tensor, count: int) -> None:
    """Updates bn's running statistics with a batch's (mean, biased var) over ``count``
    values, exactly as nn.BatchNorm2d in train mode does (momentum None included)."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return
    if not (bn.training and bn.track_running_stats) or bn.running_mean is None:
        return
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if count == 0:
        return  # an empty batch is only counted, as F.batch_norm does
    unbiased = var * (count / (count - 1))
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype) * factor + bn.running_mean * (1 - factor))
    bn.running_var.copy_(unbiased.to(bn.running_var.dtype) * factor + bn.running_var * (1 - factor))
