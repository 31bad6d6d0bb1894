"""Benchmark cases: the 17 MobileNetV2-1.0 blocks at 224 and the whole model,
each implementation built by a factory that returns a ready-to-time callable."""

import copy
from typing import Callable, Dict, Tuple

import torch
import torchvision
from torchvision.models.mobilenetv2 import InvertedResidual

import mnv2_kernels
from mnv2_kernels import ops, reference
from mnv2_kernels.model import mobilenet_block_shapes
from mnv2_kernels.testing import randomize_batch_norm

from bench import peers

CL = torch.channels_last
NCHW = torch.contiguous_format


BLOCKS = mobilenet_block_shapes()


def block_name(i: int, shape) -> str:
    inp, oup, stride, t, h = shape
    return f"block{i + 1:02d} {inp}->{oup} t{t} s{stride} {h}x{h}"


def block_flops(shape, batch: int) -> int:
    inp, oup, stride, t, h = shape
    return 2 * ops.block_macs((batch, inp, h, h), inp * t, oup, stride, t != 1)


def model_flops(batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        torchvision.models.mobilenet_v2().eval()(torch.zeros(1, 3, 224, 224))
    return batch * fc.get_total_flops()


# Forward implementations: name -> factory(module, x) -> callable, all in inference mode.
def _module_forward(module, x):
    def run():
        with torch.no_grad():
            return module(x)
    return run


def _fused_copy(tv_module: torch.nn.Module, is_block: bool) -> torch.nn.Module:
    """A block: converted. The model: mnv2_kernels.mobilenet_v2() with the torchvision
    weights, so its stem and head are ours too."""
    if is_block:
        return mnv2_kernels.convert_model(copy.deepcopy(tv_module))
    model = mnv2_kernels.mobilenet_v2()
    model.load_state_dict(tv_module.state_dict())
    return model


def forward_impls(tv_module: torch.nn.Module, x: torch.Tensor, is_block: bool, name: str,
                  with_peers: bool = True) -> Dict[str, Callable]:
    """Ready-to-time forwards of one case. The fused module runs on the CPU kernel;
    peers that are not installed are left out."""
    tv = copy.deepcopy(tv_module).eval()
    fused = _fused_copy(tv_module, is_block).eval()
    impls = {
        "torchvision-nchw": _module_forward(tv, x.contiguous(memory_format=NCHW)),
        "torchvision-cl": _module_forward(copy.deepcopy(tv).to(memory_format=CL), x.contiguous(memory_format=CL)),
        "fused-cl": _module_forward(fused, x.contiguous(memory_format=CL)),
        "fused-nchw": _module_forward(fused, x.contiguous(memory_format=NCHW)),
    }
    if is_block:
        with torch.no_grad():
            weights = fused.folded_weights()
        stride, res = fused.stride, fused.use_res_connect
        xc = x.contiguous(memory_format=CL)

        def ref():
            with torch.no_grad():
                return reference.inverted_residual(xc, *weights, stride, res)
        impls["reference-cl"] = ref
    if with_peers:
        impls["torch-compile"] = peers.compiled_forward(copy.deepcopy(tv), x)
        onnx_path = peers.export_onnx(copy.deepcopy(tv), x, name)
        for peer, factory in (("onnxruntime", peers.onnxruntime_forward), ("openvino", peers.openvino_forward)):
            fn = factory(onnx_path, x)
            if fn is not None:
                impls[peer] = fn
    return impls


def train_step_impls(tv_module: torch.nn.Module, x: torch.Tensor) -> Dict[str, Callable]:
    """Forward + backward in train mode (batch statistics), channels_last."""
    tv = copy.deepcopy(tv_module).train().to(memory_format=CL)
    fused = _fused_copy(tv_module, isinstance(tv_module, InvertedResidual)).train().to(memory_format=CL)
    xc = x.contiguous(memory_format=CL).requires_grad_()

    def step(module):
        def run():
            module.zero_grad(set_to_none=True)
            xc.grad = None
            y = module(xc)
            y.backward(torch.ones_like(y))
        return run

    return {"torchvision-cl": step(tv), "fused-cl": step(fused)}


def make_block(shape) -> Tuple[torch.nn.Module, Callable[[int], torch.Tensor]]:
    inp, oup, stride, t, h = shape
    torch.manual_seed(0)
    block = InvertedResidual(inp, oup, stride, t)
    randomize_batch_norm(block)
    return block, lambda batch: torch.randn(batch, inp, h, h)


def make_model() -> Tuple[torch.nn.Module, Callable[[int], torch.Tensor]]:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2()
    randomize_batch_norm(model)
    return model, lambda batch: torch.randn(batch, 3, 224, 224)
