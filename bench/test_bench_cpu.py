"""pytest-benchmark suite on the CPU: one group per block shape and batch, plus
the whole model; forward (inference) and forward + backward (train mode).
Run through `make bench` (python -m bench.run), which also writes the summary."""

import functools

import pytest
import torch

from bench.cases import (BLOCKS, block_flops, block_name, forward_impls, make_block, make_model,
                         model_flops, train_step_impls)

FORWARD_IMPLS = ["torchvision-nchw", "torchvision-cl", "reference-cl", "fused-cl", "fused-nchw",
                 "torch-compile", "onnxruntime", "openvino"]


@functools.lru_cache(maxsize=None)
def _forward_case(index, batch):
    module, make_x = make_block(BLOCKS[index]) if index >= 0 else make_model()
    name = f"block{index + 1:02d}" if index >= 0 else "mobilenet_v2"
    return forward_impls(module, make_x(batch), is_block=index >= 0, name=name)


def _forward_fn(index, batch, impl):
    impls = _forward_case(index, batch)
    if impl not in impls:
        pytest.skip(f"{impl} is not installed (pip install .[peers])")
    return impls[impl]


# The train step of the goals: batch 8 at 160x160 for the whole model; the
# blocks at their own resolution in MobileNetV2-1.0 at 224.
TRAIN_BATCH, TRAIN_RESOLUTION = 8, 160
TRAIN_IMPLS = ["torchvision-cl", "torchvision-ckpt-cl", "fused-cl"]


@functools.lru_cache(maxsize=None)
def _train_case(index):
    module, make_x = make_block(BLOCKS[index]) if index >= 0 else make_model(TRAIN_RESOLUTION)
    return train_step_impls(module, make_x(TRAIN_BATCH))


def _run(benchmark, group, impl, fn, flops, batch):
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, flops=flops, batch=batch, threads=torch.get_num_threads())
    fn()  # warm-up outside the timing (weights packed, allocator primed)
    benchmark(fn)


@pytest.mark.parametrize("impl", FORWARD_IMPLS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1:02d}")
def test_block_forward(benchmark, index, batch, impl):
    fn = _forward_fn(index, batch, impl)
    _run(benchmark, f"forward b{batch} {block_name(index, BLOCKS[index])}", impl, fn,
         block_flops(BLOCKS[index], batch), batch)


@pytest.mark.parametrize("impl", [i for i in FORWARD_IMPLS if i != "reference-cl"])
@pytest.mark.parametrize("batch", [1, 8])
def test_model_forward(benchmark, batch, impl):
    _run(benchmark, f"forward b{batch} model mobilenet_v2 224x224", impl, _forward_fn(-1, batch, impl),
         model_flops(batch), batch)


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1:02d}")
def test_block_train_step(benchmark, index, impl):
    _run(benchmark, f"train-step b{TRAIN_BATCH} {block_name(index, BLOCKS[index])}", impl,
         _train_case(index)[impl], 3 * block_flops(BLOCKS[index], TRAIN_BATCH), TRAIN_BATCH)


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
def test_model_train_step(benchmark, impl):
    """forward + loss + backward + SGD (momentum) step of the whole model"""
    r = TRAIN_RESOLUTION
    _run(benchmark, f"train-step b{TRAIN_BATCH} model mobilenet_v2 {r}x{r}", impl, _train_case(-1)[impl],
         3 * model_flops(TRAIN_BATCH, r), TRAIN_BATCH)
