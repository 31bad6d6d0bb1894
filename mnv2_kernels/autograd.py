"""Autograd of the fused block's operators, shared by the C++ operator
(``mnv2::fused_inverted_residual``) and the Triton one: the forward saves only the input
and the (parameter-sized) weights; the backward operator recomputes the rest."""

from typing import Callable

import torch

from . import _extension
from .ops import trailing_args


def register_block_autograd(forward_name: str, backward_op: Callable[[], object]) -> None:
    """Registers autograd for ``forward_name``, an operator with
    mnv2::fused_inverted_residual's signature. ``backward_op()`` returns the backward
    operator: (grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride,
    residual, dilation, activation) -> the 7 gradients of x and the weights (the expand's empty when
    t == 1)."""

    def setup_context(ctx, inputs, output):
        x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual = inputs[:9]
        ctx.save_for_backward(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project)
        ctx.stride = stride
        ctx.residual = residual
        ctx.dilation = inputs[9] if len(inputs) > 9 else 1
        ctx.activation = inputs[10] if len(inputs) > 10 else "relu6"

    def backward(ctx, grad_y):
        x, w_expand, b_expand, w_dw, b_dw, w_project, b_project = ctx.saved_tensors
        grads = list(backward_op()(grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project,
                                   ctx.stride, ctx.residual, *trailing_args(ctx.dilation, ctx.activation)))
        if w_expand is None:
            grads[1] = grads[2] = None
        needs = ctx.needs_input_grad
        return tuple(g if needs[i] else None for i, g in enumerate(grads)) + (None,) * (len(needs) - 7)

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


if _extension.LOADED:
    register_block_autograd("mnv2::fused_inverted_residual",
                            lambda: torch.ops.mnv2.fused_inverted_residual_backward.default)
