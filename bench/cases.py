"""Benchmark cases: the 17 MobileNetV2-1.0 blocks at 224 and the whole model,
each implementation built by a factory that returns a ready-to-time callable."""

import copy
from typing import Callable, Dict, Tuple

import torch
import torchvision
from torchvision.models.mobilenetv2 import InvertedResidual

import mnv2_kernels
from mnv2_kernels import flops, reference
from mnv2_kernels.model import mobilenet_block_shapes
from mnv2_kernels.testing import randomize_batch_norm

from bench import peers
from bench.memory_report import checkpoint_blocks

CL = torch.channels_last
NCHW = torch.contiguous_format


BLOCKS = mobilenet_block_shapes()


def block_name(i: int, shape) -> str:
    inp, oup, stride, t, h = shape
    return f"block{i + 1:02d} {inp}->{oup} t{t} s{stride} {h}x{h}"


def block_flops(shape, batch: int) -> int:
    inp, oup, stride, t, h = shape
    return 2 * flops.block_macs((batch, inp, h, h), inp * t, oup, stride, t != 1)


def model_flops(batch: int, resolution: int = 224) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        torchvision.models.mobilenet_v2().eval()(torch.zeros(1, 3, resolution, resolution))
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
    """One training step, channels_last, train mode (batch statistics): forward, a loss,
    backward and an SGD update with momentum. torchvision eager, torchvision with every
    block under torch.utils.checkpoint (what a user short of memory reaches for), and
    the fused model."""
    is_block = isinstance(tv_module, InvertedResidual)
    modules = {
        "torchvision-cl": copy.deepcopy(tv_module),
        "torchvision-ckpt-cl": checkpoint_blocks(copy.deepcopy(tv_module)),
        "fused-cl": _fused_copy(tv_module, is_block),
    }
    xc = x.contiguous(memory_format=CL)
    if is_block:
        loss_fn = lambda y: (y * y).mean()  # noqa: E731
    else:
        labels = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0))
        loss_fn = lambda y: torch.nn.functional.cross_entropy(y, labels)  # noqa: E731

    def step(module):
        module.train().to(memory_format=CL)
        opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

        def run():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(module(xc))
            loss.backward()
            opt.step()
        return run

    return {name: step(m) for name, m in modules.items()}


def make_block(shape) -> Tuple[torch.nn.Module, Callable[[int], torch.Tensor]]:
    inp, oup, stride, t, h = shape
    torch.manual_seed(0)
    block = InvertedResidual(inp, oup, stride, t)
    randomize_batch_norm(block)
    return block, lambda batch: torch.randn(batch, inp, h, h)


def make_model(resolution: int = 224) -> Tuple[torch.nn.Module, Callable[[int], torch.Tensor]]:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2()
    randomize_batch_norm(model)
    return model, lambda batch: torch.randn(batch, 3, resolution, resolution)
