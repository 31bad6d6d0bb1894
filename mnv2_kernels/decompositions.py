"""The fused block's operators as standard PyTorch operators, for graph consumers that
cannot run them: registered in torch's decomposition table (``torch._decomp``), where
the ONNX exporter (``torch.onnx.export(..., dynamo=True)``) finds them, so that an
exported model holds Conv, Clip and Add rather than an ``mnv2`` node that no ONNX
runtime knows. ``torch.compile`` and ``torch.export`` keep the fused operators: they
decompose only the operators their own tables list.
"""

import torch
from torch._decomp import decomposition_table, register_decomposition

from . import _extension
from .reference import inverted_residual


def register(op) -> None:
    """Registers the unfused computation as ``op``'s decomposition (an operator with
    mnv2::fused_inverted_residual's signature); once per operator."""
    if op not in decomposition_table:
        register_decomposition(op)(inverted_residual)


if _extension.LOADED:
    register(torch.ops.mnv2.fused_inverted_residual.default)
