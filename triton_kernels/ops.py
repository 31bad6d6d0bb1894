"""Operator registration of the Triton backend.

``register()`` defines

    mnv2::triton_fused_inverted_residual(Tensor x, Tensor? w_expand, Tensor? b_expand,
        Tensor w_dw, Tensor b_dw, Tensor w_project, Tensor b_project, int stride,
        bool residual, int dilation=1, str activation="relu6") -> Tensor
    mnv2::triton_fused_inverted_residual_backward(Tensor grad_y, <same arguments>)
        -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)

with ``torch.library.triton_op`` (kernels launched through
``torch.library.wrap_triton``, so torch.compile(fullgraph=True) traces into
them), and autograd on the forward operator (saves x and the weights only;
the backward operator recomputes the rest). The depthwise kernel size is w_dw's,
(hidden, k, k) with k 3, 5 or 7 (padding k // 2); ``dilation`` dilates the depthwise
step (padding dilation * (k // 2), the output size of dilation 1: atrous MobileNetV2);
``activation`` ("relu6" or "relu") follows the expand and the depthwise step.

Interpreter notes (decided by trying, torch 2.14 / triton 3.8): under
TRITON_INTERPRET=1, wrap_triton hands the interpreted kernel back unwrapped.
A triton_op then works in eager mode, but any tracing (fake tensors,
make_fx/AOT dispatch, torch.compile, opcheck's test_aot_dispatch_*) launches
the interpreter on fake/functional tensors and fails ("Attempted to access
the data pointer on an invalid python storage"). So under the interpreter
``register()`` uses ``torch.library.custom_op`` with raw launches and explicit
fake kernels (opaque to torch.compile, but correct everywhere, and opcheck
passes); on a CUDA machine it uses ``triton_op`` + ``wrap_triton``.
``USED_TRITON_OP`` says which was used. The tests also exercise the triton_op
path in eager mode under a private operator name (``_define``). On an H200
with torch 2.11 / triton 3.6 the triton_op path was checked: eager autograd
and torch.compile(fullgraph=True) of forward + backward match eager.

Importing this module imports triton (through ``fused_ir``).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import autocast, decompositions, flops
from ..autograd import register_block_autograd
from . import fused_ir

FWD = "mnv2::triton_fused_inverted_residual"
BWD = "mnv2::triton_fused_inverted_residual_backward"

FWD_SCHEMA = ("(Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_dw, Tensor b_dw, "
              "Tensor w_project, Tensor b_project, int stride, bool residual, int dilation=1, "
              "str activation=\"relu6\") -> Tensor")
BWD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_dw, Tensor b_dw, "
              "Tensor w_project, Tensor b_project, int stride, bool residual, int dilation=1, "
              "str activation=\"relu6\") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

USED_TRITON_OP = None  # set by register(): True (triton_op) or False (custom_op fallback)


def _op_exists(name):
    ns, op = name.split("::")
    try:
        getattr(getattr(torch.ops, ns), op)
        return True
    except (AttributeError, RuntimeError):
        return False


def _fake_forward(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, dilation=1,
                  activation="relu6"):
    _, cout = fused_ir.check_inputs(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual,
                                    dilation=dilation, activation=activation)
    ho, wo = fused_ir.output_size(x.shape[2], x.shape[3], stride, dilation, kernel_size=fused_ir.kernel_size(w_dw))
    return fused_ir.output_like(x, cout, ho, wo)


def _fake_backward(grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, dilation=1,
                   activation="relu6"):
    hidden, cout = fused_ir.check_inputs(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride,
                                         residual, grad_y=grad_y, dilation=dilation, activation=activation)
    cin = x.shape[1]
    k = fused_ir.kernel_size(w_dw)
    has = w_expand is not None
    from torch._prims_common import suggest_memory_format
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x)),
        x.new_empty((hidden, cin) if has else (0, 0)),
        x.new_empty((hidden,) if has else (0,)),
        x.new_empty((hidden, k, k)),
        x.new_empty((hidden,)),
        x.new_empty((cout, hidden)),
        x.new_empty((cout,)),
    )


def _triton_op_usable() -> bool:
    """Whether to define the operators with triton_op: not under the interpreter
    (see the module docstring), and only where torch has triton_op/wrap_triton."""
    if fused_ir.INTERPRET:
        return False
    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        return False
    try:
        torch.library.wrap_triton(fused_ir._fwd_kernel)
    except Exception:
        return False
    return True


def _define(fwd_name: str, bwd_name: str, use_triton_op: bool) -> None:
    """Defines the forward/backward operators under the given names, with autograd."""

    def fwd_impl(x: Tensor, w_expand: Optional[Tensor], b_expand: Optional[Tensor], w_dw: Tensor,
                 b_dw: Tensor, w_project: Tensor, b_project: Tensor, stride: int, residual: bool,
                 dilation: int = 1, activation: str = "relu6") -> Tensor:
        return fused_ir.forward(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual,
                                dilation, activation, traceable=use_triton_op)

    def bwd_impl(grad_y: Tensor, x: Tensor, w_expand: Optional[Tensor], b_expand: Optional[Tensor],
                 w_dw: Tensor, b_dw: Tensor, w_project: Tensor, b_project: Tensor, stride: int,
                 residual: bool, dilation: int = 1,
                 activation: str = "relu6") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return fused_ir.backward(grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride,
                                 residual, dilation, activation, traceable=use_triton_op)

    if use_triton_op:
        fwd_op = torch.library.triton_op(fwd_name, fwd_impl, mutates_args=(), schema=FWD_SCHEMA)
        bwd_op = torch.library.triton_op(bwd_name, bwd_impl, mutates_args=(), schema=BWD_SCHEMA)
        if fused_ir.INTERPRET:
            # triton_op's fake kernel is the function itself, which would launch
            # the interpreter on fake tensors.
            fwd_op.register_fake(_fake_forward)
            bwd_op.register_fake(_fake_backward)
    else:
        fwd_op = torch.library.custom_op(fwd_name, fwd_impl, mutates_args=(), schema=FWD_SCHEMA)
        bwd_op = torch.library.custom_op(bwd_name, bwd_impl, mutates_args=(), schema=BWD_SCHEMA)
        fwd_op.register_fake(_fake_forward)
        bwd_op.register_fake(_fake_backward)

    ns, bwd_short = bwd_name.split("::")
    register_block_autograd(fwd_name, lambda: getattr(getattr(torch.ops, ns), bwd_short).default)
    # as the C++ operator's: FLOP formulas, autocast, the decomposition the ONNX exporter uses
    fwd_packet = getattr(getattr(torch.ops, ns), fwd_name.split("::")[1])
    flops.register(fwd_packet, getattr(getattr(torch.ops, ns), bwd_short))
    autocast.register(fwd_name)
    decompositions.register(fwd_packet.default)


def register() -> None:
    """Defines mnv2::triton_fused_inverted_residual and its backward operator,
    with autograd. Idempotent: later calls do nothing."""
    global USED_TRITON_OP
    import mnv2_kernels  # noqa: F401  (loads the C++ library that defines the mnv2 namespace, if built)

    if _op_exists(FWD):
        if USED_TRITON_OP is None:
            USED_TRITON_OP = _triton_op_usable()
        return
    use_triton_op = _triton_op_usable()
    _define(FWD, BWD, use_triton_op)
    USED_TRITON_OP = use_triton_op

