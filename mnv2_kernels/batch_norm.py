"""Batch norm in the fused layers: folding into the convolutions, batch statistics, the
running-statistics bookkeeping of nn.BatchNorm2d, and synchronised batch norm for
distributed data-parallel training on any device.

Folding: ``bn(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
``b' = beta + (b - m) * g / sqrt(v + eps)``, where (m, v) are the running statistics
(eval) or the batch statistics (train). Gradients flow through the fold to the
convolution weight, gamma and beta (and, in train mode, through the statistics to the
input).

Synchronised: the fused block computes its batch statistics itself, so under
``SyncBatchNorm`` it must combine them across processes itself: each process's
per-channel (mean, biased variance, count) is all-reduced as (sum, sum of squares,
count) before folding, with autograd through the all-reduce (all_reduce_moments).
Both ``torch.nn.SyncBatchNorm`` and this module's ``SyncBatchNorm`` are recognised.
They differ only outside the fused blocks: torch's refuses CPU tensors, and
DistributedDataParallel refuses to wrap a CPU model that contains it, so CPU training
(gloo) takes ``mnv2_kernels.convert_sync_batchnorm``, whose layers do the same
all-reduce on any device.
"""

from typing import Optional, Tuple

import torch
import torch.distributed as dist
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
    # (written for TorchScript too: the scripted block folds with it)
    low_precision = dtype == torch.float16 or dtype == torch.bfloat16
    if low_precision:
        # fold in float32 and round once: the folded weights then carry one
        # rounding, as the unfused module's weights do
        weight = weight.float()
        if bias is not None:
            bias = bias.float()
        if bn_weight is not None:
            bn_weight = bn_weight.float()
        if bn_bias is not None:
            bn_bias = bn_bias.float()
    scale = torch.rsqrt(var.to(weight.dtype) + eps)
    if bn_weight is not None:
        scale = bn_weight * scale
    mean = mean.to(weight.dtype)
    shift = -mean if bias is None else bias - mean
    folded_bias = shift * scale
    if bn_bias is not None:
        folded_bias = folded_bias + bn_bias
    folded = weight * scale.reshape([-1] + [1] * (weight.dim() - 1))
    if low_precision:
        return folded.to(dtype), folded_bias.to(dtype)
    return folded, folded_bias


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


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` on any device: in training mode, with torch.distributed
    initialised and more than one process in ``process_group`` (default: the world),
    normalises with the statistics of the whole group's batch and updates the running
    statistics with them (global count, unbiased variance, ``momentum=None`` as a
    cumulative average, ``num_batches_tracked``); otherwise it is ``BatchNorm``.

    Not a subclass of ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses CPU
    models containing that class. Build it with :func:`convert_sync_batchnorm`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        group = sync_process_group(self)
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        if input.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        return sync_batch_norm(input, self, group)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, with
    :class:`mnv2_kernels.SyncBatchNorm` layers (which DistributedDataParallel accepts
    on the CPU): every batch-norm layer (torch's SyncBatchNorm included) is replaced by
    one sharing its parameters and buffers. Returns the converted module (``module``
    itself, changed in place, unless ``module`` is a batch norm)."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


def sync_process_group(bn: Optional[nn.Module]):
    """The process group over which ``bn`` combines its batch statistics, or None.

    As torch.nn.SyncBatchNorm.forward decides: a SyncBatchNorm (torch's or ours) in
    training mode, torch.distributed initialised and more than one process in its
    group (``bn.process_group``, else the default group)."""
    if not isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm)) or not bn.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the processes of ``group``. The backward all-reduces the
    gradient: every process's loss depends on every process's contribution.
    (torch.distributed.nn.functional.all_reduce does the same, but is deprecated in
    torch 2.14 and warns on every call.)"""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def zero_if_empty(t: Tensor, count: int) -> Tensor:
    """``t``, or zeros when this process has no values (count 0: the moments of an empty
    batch are NaN, and NaN * 0 is NaN in the gradients of whatever uses them). A
    torch.where on every process, so that every process builds the same graph."""
    return torch.where(torch.tensor(count > 0, device=t.device), t, 0.0)


def all_reduce_moments(mean: Tensor, var: Tensor, count: int, group) -> Tuple[Tensor, Tensor, int]:
    """Combines every process's batch statistics into the group's, with one all-reduce.

    Args:
        mean, var: this process's per-channel mean and biased variance over ``count``
            values. When count is 0 they are ignored but stay in the autograd graph, so
            that every process runs the same collectives backward (pass them through
            zero_if_empty where they are computed: their NaN would reach the gradients
            of whatever else uses them).
        count: this process's number of values per channel (0 allowed; it may differ
            between processes).
        group: the process group.

    Returns:
        (mean, biased var, total count) over every value of every process; mean and var
        in the dtype of the given ones, differentiable with respect to every process's
        inputs (the backward all-reduces the gradients).

    The all-reduced tensor is ``[sum (C), sum of squares (C), count (1)]`` in float64,
    the sums formed from each process's centred statistics (count * mean and
    count * (var + mean**2)); the variance E[z^2] - E[z]^2 is taken in float64, so the
    cancellation costs ~1e-16 * mean^2 / var relative, far below float32 rounding.
    """
    dtype = mean.dtype
    # torch.where, not a branch: the same graph, hence the same collectives in the same
    # order, on every process whatever its batch size
    m = zero_if_empty(mean.to(torch.float64), count)
    v = zero_if_empty(var.to(torch.float64), count)
    packed = torch.cat([m * count, (v + m * m) * count, m.new_full((1,), float(count))])
    packed = _AllReduceSum.apply(packed, group)
    c = mean.shape[0]
    total = int(packed[-1].item())
    s, q = packed[:c], packed[c:2 * c]
    g_mean = s / max(total, 1)
    g_var = (q / max(total, 1) - g_mean * g_mean).clamp_min(0)
    return g_mean.to(dtype), g_var.to(dtype), total


def check_global_count(total: int, size) -> None:
    """Train-mode batch norm needs more than one value per channel over the whole group.
    Checked after the all-reduce, so that every process raises together (none is left
    waiting in a collective)."""
    if total == 1:
        raise ValueError("Expected more than 1 value per channel when training, got 1 value per channel "
                         f"over all processes of the SyncBatchNorm's group (this process's input size {size})")


def sync_batch_norm(x: Tensor, bn: nn.Module, group) -> Tensor:
    """torch.nn.SyncBatchNorm's train-mode result on any device: batch statistics over
    every process of ``group`` (all_reduce_moments: one all-reduce), running statistics
    updated with the global count. Differentiable; keeps x's memory format."""
    c = x.shape[1]
    count = x.numel() // c
    dims = [d for d in range(x.dim()) if d != 1]
    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if count > 0:
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
    else:
        mean = var = xs.sum(dims)  # zeros, in the graph
    mean, var, total = all_reduce_moments(mean, var, count, group)
    check_global_count(total, tuple(x.shape))
    update_running_stats(bn, mean, var, total)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    shape = [1, c] + [1] * (x.dim() - 2)
    return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)


class BatchNormStep:
    """How one batch norm of a fused block normalises in this call, and the bookkeeping
    of its batch statistics: ``uses_batch`` (train mode, or no running statistics) and
    ``group`` (the process group of a synchronised batch norm in distributed training,
    else None)."""

    def __init__(self, bn: nn.Module):
        self.bn = bn
        self.uses_batch = uses_batch_stats(bn)
        self.group = sync_process_group(bn) if self.uses_batch else None

    def check_count(self, count: int, size) -> None:
        """Train-mode batch norm needs more than one value per channel; a synchronised
        one checks the group's count after its all-reduce instead."""
        if self.group is None:
            check_batch_count(count, size)

    def local_moments(self, mean: Tensor, var: Tensor, n: int) -> Tuple[Tensor, Tensor]:
        """This process's statistics as they enter the all-reduce: zeros for an empty
        batch (see zero_if_empty); unchanged without a group."""
        if self.group is None:
            return mean, var
        return zero_if_empty(mean, n), zero_if_empty(var, n)

    def batch_moments(self, mean: Tensor, var: Tensor, count: int, size) -> Tuple[Tensor, Tensor]:
        """The statistics to normalise with: this process's (mean, biased var) over
        ``count`` values, or the group's (one all-reduce). The running statistics are
        updated with them."""
        if self.group is not None:
            mean, var, count = all_reduce_moments(mean, var, count, self.group)
            check_global_count(count, size)
        update_running_stats(self.bn, mean, var, count)
        return mean, var

    def normalize(self, u: Tensor) -> Tensor:
        """The batch norm applied to u as the module (or, synchronised, as the group) would."""
        return self.bn(u) if self.group is None else sync_batch_norm(u, self.bn, self.group)
