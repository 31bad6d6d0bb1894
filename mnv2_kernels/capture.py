"""The layers' forward when a graph is being recorded rather than values computed.

* ``torch.fx`` (``symbolic_trace``, torchvision's ``create_feature_extractor``): a fused
  block is a leaf. Its call is recorded as ``call_module``, so the traced module runs
  the block's own forward, the fused operator, and never the unfused computation. A block
  that is the traced root itself is recorded as a call of ``fused_block`` on its
  ``conv`` submodule (the graph has no node for the root module). Inside
  ``trace_unfused()`` blocks are traced module by module instead, as torchvision's,
  so that nodes inside a block (its hidden tensors) can be graph outputs.
* ``torch.jit.trace`` (and the TorchScript ONNX exporter, which traces): the cached
  and packed inference paths are skipped, so that every trace of a call records the
  same operators on the parameters. The ONNX exporters get standard operators only:
  under the TorchScript exporter the layers run torchvision's unfused modules, and
  under the dynamo exporter (``dynamo=True``, which records the fused operator with
  ``torch.export``) the fused operators decompose into convolutions, clamps and adds
  (``mnv2_kernels.decompositions``).
* ``torch.compile`` and ``torch.export``: as for ``torch.jit.trace``, no cached value
  derived from the parameters enters the graph.
"""

import contextlib

import torch
from torch import Tensor, nn

_UNFUSED = [False]  # inside trace_unfused()


@contextlib.contextmanager
def trace_unfused():
    """Inside this context torch.fx traces each fused block module by module, with
    torchvision's node names (``features.14.conv.0`` and so on), so that a feature
    extractor can return a tensor from inside a block (the expanded hidden tensor, as
    SSDLite takes). The traced module then computes those blocks unfused; outside the
    context each block is one fused node."""
    previous = _UNFUSED[0]
    _UNFUSED[0] = True
    try:
        yield
    finally:
        _UNFUSED[0] = previous


def is_fx_proxy(x) -> bool:
    return isinstance(x, torch.fx.Proxy)


def recording() -> bool:
    """Whether torch.compile, torch.export or torch.jit.trace is recording this call: the
    layers then record operators on their parameters and read no cache."""
    # (torch.compile reads is_compiling() as True, so it never reaches _is_tracing, which it
    # cannot trace)
    return torch.compiler.is_compiling() or torch._C._is_tracing()


def packed_paths_allowed() -> bool:
    """Whether the packed CPU inference operators may run: not while a graph is recorded,
    nor under CPU autocast (they compute in the weights' dtype, autocast asks for its own)."""
    if torch.compiler.is_compiling():
        return False
    # (on every inference call of every layer: the cheapest checks first)
    return not (torch._C._is_tracing()
                or (torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled("cpu")))


def unfused_for_export() -> bool:
    """Under the TorchScript ONNX exporter: the layers run torchvision's modules, which it
    translates to standard ONNX operators."""
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()


def fx_leaf(module: nn.Module, x) -> "torch.fx.Proxy":
    """Records ``module(x)`` as one node of the fx graph that ``x`` (a Proxy) belongs to:
    ``call_module`` of the module's path, or, for the traced root (a fused block), a call
    of ``fused_block`` on its ``conv`` submodule."""
    if _UNFUSED[0]:
        return module._forward_modules(x)
    tracer = x.tracer
    path = tracer.path_of_module(module)
    if path:
        return tracer.create_proxy("call_module", path, (x,), {})
    conv = tracer.create_proxy("get_attr", "conv", (), {})
    return tracer.create_proxy("call_function", fused_block,
                               (x, conv, module.stride, module.use_res_connect, module.out_channels), {})


def keeps_torchvision_layers_whole(x) -> bool:
    """Whether the fx tracer of ``x`` (a Proxy) records torchvision's
    Conv2dNormActivation as one node: torchvision's feature-extraction tracer does (its
    ``leaf_modules`` lists torchvision.ops' modules); torch.fx's own traces into it. Ours
    then does the same, so that the node names are torchvision's."""
    return any(getattr(c, "__name__", None) == "Conv2dNormActivation"
               and getattr(c, "__module__", "").startswith("torchvision.")
               for c in getattr(x.tracer, "leaf_modules", ()))


def fused_block(x: Tensor, conv: nn.Sequential, stride: int, residual: bool, out_channels: int) -> Tensor:
    """A fused block's forward given its ``conv`` submodule (the traced graph of a block
    that was the fx root). The block built around ``conv`` is kept on it, with its caches,
    and follows conv's train/eval mode."""
    from .modules import FusedInvertedResidual

    block = conv.__dict__.get("_mnv2_block")
    if block is None or block.stride != stride or block.use_res_connect != residual:
        block = FusedInvertedResidual.around(conv, stride, residual, out_channels)
        object.__setattr__(conv, "_mnv2_block", block)  # not a submodule: no cycle in the tree
    block.training = conv.training
    return block(x)
