"""Worker of tests/test_ddp.py, one process per rank:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT_DIR

Trains small float64 MobileNetV2s (width 0.35, 10 classes, 64x64 input, no dropout) with
DistributedDataParallel on the gloo backend, a few SGD steps each, and saves what the test
compares (torch.save, one file per case and rank, in OUT_DIR). The weights and the batch
come from fixed seeds (make_models, make_batch), so that the test can rebuild them and rerun
the steps in one process.

Cases:
  sync              mnv2_kernels.convert_sync_batchnorm, 4 images per rank, 3 steps.
  sync_ref          the same, first step only, on the 'reference' backend (module by module).
  sync_torch        torch.nn.SyncBatchNorm.convert_sync_batchnorm, first step only: the layers
                    that GPU training uses. DDP refuses them in a CPU model, so its check is
                    bypassed here; the fused blocks, stem and head do their own all-reduce.
  sync_torchvision  torchvision's model with mnv2_kernels.convert_sync_batchnorm, first step
                    only: mnv2_kernels.SyncBatchNorm as a plain module.
  uneven            mnv2_kernels.convert_sync_batchnorm, 3 and 5 images, momentum=None in
                    every batch norm, 2 steps.
  empty             mnv2_kernels.convert_sync_batchnorm, 0 and 8 images, 1 step.
  plain             plain BatchNorm2d (per-process statistics), 4 images per rank, 3 steps,
                    for the fused model; plain_torchvision: the same for torchvision's.
  blocks            single FusedInvertedResidual blocks (t = 6 with residual, t = 1 with
                    stride 2), float32 and float64, 3 and 1 images of 7x7, without DDP: the
                    output, input gradient and all-reduced parameter gradients of a forward
                    and backward, and the running statistics.
  one_value         a block whose batch norms see one value per channel over both
                    processes (1 and 0 images of 1x1): both must raise ValueError.
  ssdlite, deeplab  the paper's applications (width 0.35, small images, 2 images per rank,
                    plain batch norms), fused and on torchvision's blocks (ssdlite_torchvision,
                    deeplab_torchvision), 2 SGD steps on their usual losses: SSD's own, a
                    pixel-wise cross-entropy for DeepLab.
"""

import os
import sys
import time

import torch
import torch.distributed as dist
import torchvision
from torch import nn

import mnv2_kernels
from mnv2_kernels.testing import randomize_batch_norm

WIDTH, CLASSES, SIZE, LR, MOMENTUM = 0.35, 10, 64, 0.05, 0.9


def make_models(seed: int = 0):
    """(fused mobilenet_v2, torchvision's mobilenet_v2) with the same float64 weights."""
    torch.manual_seed(seed)
    tv = torchvision.models.mobilenet_v2(width_mult=WIDTH, num_classes=CLASSES, dropout=0.0)
    randomize_batch_norm(tv, torch.Generator().manual_seed(seed + 1))
    tv = tv.double()
    ours = mnv2_kernels.mobilenet_v2(width_mult=WIDTH, num_classes=CLASSES, dropout=0.0).double()
    ours.load_state_dict(tv.state_dict())
    return ours, tv


def make_batch(total: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(total, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (total,), generator=g)


BLOCKS = [(16, 16, 1, 6), (16, 8, 2, 1)]  # (inp, oup, stride, expand_ratio)
BLOCK_COUNTS = [3, 1]  # images per rank


def make_block(shape, dtype, seed: int = 3):
    """(fused block in train mode, combined input, output gradient) of one block shape."""
    inp, oup, stride, t = shape
    torch.manual_seed(seed)
    block = mnv2_kernels.FusedInvertedResidual(inp, oup, stride, t)
    randomize_batch_norm(block, torch.Generator().manual_seed(seed + 1))
    block = block.to(dtype).train()
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(sum(BLOCK_COUNTS), inp, 7, 7, generator=g, dtype=dtype)
    ho = (7 - 1) // stride + 1
    gy = torch.randn(x.shape[0], oup, ho, ho, generator=g, dtype=dtype)
    return block, x, gy


APP_WIDTH, APP_IMAGES = 0.35, 2  # images per rank


def make_application(app: str, fused: bool, rank: int):
    """(float64 model in train mode, loss(model)) of SSDLite (96x96) or DeepLabv3 (output
    stride 16, 65x65), fused or on torchvision's blocks, with the same weights either way
    and this rank's share of a fixed batch."""
    from mnv2_kernels.detection import ssdlite320_mobilenet_v2
    from mnv2_kernels.segmentation import deeplabv3_mobilenet_v2

    torch.manual_seed(5)
    if app == "ssdlite":
        model = ssdlite320_mobilenet_v2(fused=fused, size=(96, 96), width_mult=APP_WIDTH, num_classes=5)
    else:
        model = deeplabv3_mobilenet_v2(fused=fused, width_mult=APP_WIDTH, num_classes=5)
    randomize_batch_norm(model, torch.Generator().manual_seed(6))
    model = model.double().train()
    g = torch.Generator().manual_seed(7 + rank)
    if app == "ssdlite":
        images = [torch.rand(3, 96, 96, generator=g, dtype=torch.float64) for _ in range(APP_IMAGES)]
        targets = []
        for _ in range(APP_IMAGES):
            xy = torch.rand(2, 2, generator=g, dtype=torch.float64) * 40
            targets.append({"boxes": torch.cat([xy, xy + 20 + torch.rand(2, 2, generator=g, dtype=torch.float64) * 30],
                                               dim=1), "labels": torch.randint(1, 5, (2,), generator=g)})
        return model, lambda m: sum(m(images, targets).values())
    x = torch.rand(APP_IMAGES, 3, 65, 65, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (APP_IMAGES, 65, 65), generator=g)
    return model, lambda m: nn.functional.cross_entropy(m(x)["out"], target)


def train_application(model: nn.Module, loss_of, steps: int):
    """SGD on loss_of(model); the train() dict without buffers_1."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    result = {"losses": []}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model)
        loss.backward()
        opt.step()
        result["losses"].append(loss.detach().clone())
        if step == 0:
            result["grads"] = {n: p.grad.detach().clone() for n, p in inner.named_parameters()}
    result["params"] = {n: p.detach().clone() for n, p in inner.named_parameters()}
    result["buffers"] = {n: b.detach().clone() for n, b in inner.named_buffers()}
    return result


def set_momentum_none(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None


def train(model: nn.Module, x, labels, steps: int, total: int):
    """SGD with momentum; the loss is this process's summed cross-entropy scaled by
    world_size / total, so that DDP's gradient average is the gradient of the mean
    loss over the combined batch of ``total`` images, whatever each process's share.

    Returns a dict: losses (per step), grads (after the first backward), params_1 and
    buffers_1 (after the first step), params and buffers (after the last)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    state = lambda: ({n: p.detach().clone() for n, p in inner.named_parameters()},  # noqa: E731
                     {n: b.detach().clone() for n, b in inner.named_buffers()})
    result = {"losses": []}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), labels, reduction="sum") * (world / total)
        loss.backward()
        opt.step()
        result["losses"].append(loss.detach().clone())
        if step == 0:
            result["grads"] = {n: p.grad.detach().clone() for n, p in inner.named_parameters()}
            result["params_1"], result["buffers_1"] = state()
    result["params"], result["buffers"] = state()
    return result


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    mnv2_kernels.set_backend("cpu")

    def save(case, **result):
        torch.save(result, os.path.join(out, f"{case}_rank{rank}.pt"))

    def run(case, counts, steps, *, convert="ours", model="fused", momentum_none=False, backend="cpu"):
        start = time.monotonic()
        ours, tv = make_models()
        net = ours if model == "fused" else tv
        if momentum_none:
            set_momentum_none(net)
        total = sum(counts)
        x, labels = make_batch(total)
        lo = sum(counts[:rank])
        x, labels = x[lo:lo + counts[rank]], labels[lo:lo + counts[rank]]
        check = nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle
        if convert == "ours":
            net = mnv2_kernels.convert_sync_batchnorm(net)
        elif convert == "torch":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None
        try:
            ddp = nn.parallel.DistributedDataParallel(net)
        finally:
            nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle = check
        with mnv2_kernels.use_backend(backend):
            save(case, **train(ddp, x, labels, steps, total))
        if rank == 0:
            print(f"{case}: {time.monotonic() - start:.1f} s", flush=True)

    run("sync", [4, 4], 3)
    run("sync_ref", [4, 4], 1, backend="reference")
    run("sync_torch", [4, 4], 1, convert="torch")
    run("sync_torchvision", [4, 4], 1, model="torchvision")
    run("uneven", [3, 5], 2, momentum_none=True)
    run("empty", [0, 8], 1)
    run("plain", [4, 4], 3, convert=None)
    run("plain_torchvision", [4, 4], 3, convert=None, model="torchvision")

    blocks = {}
    for shape in BLOCKS:
        for dtype in (torch.float32, torch.float64):
            block, x, gy = make_block(shape, dtype)
            counts = BLOCK_COUNTS
            lo = sum(counts[:rank])
            block = mnv2_kernels.convert_sync_batchnorm(block)
            xr = x[lo:lo + counts[rank]].clone().requires_grad_()
            y = block(xr)
            y.backward(gy[lo:lo + counts[rank]])
            grads = {n: p.grad.clone() for n, p in block.named_parameters()}
            for g in grads.values():
                dist.all_reduce(g)
            blocks[(shape, dtype)] = {"y": y.detach(), "x_grad": xr.grad, "grads": grads,
                                      "buffers": {n: b.clone() for n, b in block.named_buffers()}}
    save("blocks", blocks=blocks)

    for app in ("ssdlite", "deeplab"):
        for fused in (True, False):
            case = app if fused else f"{app}_torchvision"
            start = time.monotonic()
            model, step = make_application(app, fused, rank)
            save(case, **train_application(nn.parallel.DistributedDataParallel(model), step, 2))
            if rank == 0:
                print(f"{case}: {time.monotonic() - start:.1f} s", flush=True)

    block = mnv2_kernels.convert_sync_batchnorm(mnv2_kernels.FusedInvertedResidual(8, 8, 1, 6).double())
    try:
        block(torch.randn(1 - rank, 8, 1, 1, dtype=torch.float64))
        error = None
    except ValueError as e:
        error = str(e)
    save("one_value", error=error)

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Every result is saved: leave without the interpreter's finalization, during which Gloo's
    # worker threads can still release tensors and abort the process ("terminate called
    # without an active exception", seen under load) after the work has succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
