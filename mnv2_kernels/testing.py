"""Helpers shared by the tests and the benchmarks."""

import torch
from torch import nn


def randomize_batch_norm(module: nn.Module, generator=None) -> None:
    """Random running statistics and affine parameters for every batch norm in
    ``module``, so that comparisons exercise the folding (never the defaults)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                    m.running_var.uniform_(0.5, 2.0, generator=generator)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=generator)
                    m.bias.uniform_(-0.5, 0.5, generator=generator)
