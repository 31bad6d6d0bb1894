"""Memory footprint of the fused block against torchvision, per block and for
the whole MobileNetV2-1.0 at 224.

    python -m bench.memory_report [--batches 1 32] [--sweep 1 2 4 8 16 32]
                                  [--device cpu|cuda] [--out DIR] [--no-plot]

For each block (at its input resolution) and the whole model, for inference
(eval, no_grad) and a training step (train mode, forward + backward), it
measures

* peak bytes: the high-water mark of resident memory during the call, above
  what was resident before it (so the model and the input are excluded). The
  kernel is asked to reset the high-water mark (/proc/self/clear_refs) and
  malloc to serve every large block with mmap (MALLOC_MMAP_THRESHOLD_), so
  resident memory follows live tensors, including allocations made inside C++
  kernels and on worker threads;
* saved bytes: what autograd keeps for backward (saved_tensors_hooks, each
  storage once, the module's own parameters and buffers excluded);

for the fused model, torchvision eager, and torchvision with every block
wrapped in torch.utils.checkpoint (what a user would otherwise reach for).
The stem (3x3 convolution + BN + ReLU6) is reported on its own row as well.

It also writes

* a resolution table in the style of the MobileNetV2 paper's Table 3: the
  largest tensor the model materialises at each spatial resolution, in
  channels and in KB at 16 bits (batch 1), recorded from every operator's
  output during a forward pass, next to the paper's published column;
* the training-step peak of the whole model against the batch size;
* a PNG plot of both (matplotlib) linked from memory.md, and the goal table.

On CUDA (--device cuda) the peak is torch.cuda.max_memory_allocated above
what was allocated before the call. On the CPU it is Linux only.
"""

import argparse
import copy
import json
import os
import sys
from typing import Callable, Dict, List

MMAP_THRESHOLD = "65536"

if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
    # malloc reads this at start-up: run again with it set
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    os.execve(sys.executable, [sys.executable, "-m", "bench.memory_report", *sys.argv[1:]], env)

import torch  # noqa: E402
import torch.utils.checkpoint  # noqa: E402
from torch import nn  # noqa: E402

from mnv2_kernels.memory import peak_bytes, saved_bytes  # noqa: E402

from bench.machine import machine_info, machine_slug  # noqa: E402

MB = 1e6


class Checkpointed(nn.Module):
    """A block whose activations are recomputed in backward (torch.utils.checkpoint)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        if torch.is_grad_enabled() and self.training:
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        return self.block(x)


def checkpoint_blocks(model: nn.Module, types: tuple = ()) -> nn.Module:
    """Every block of `types` (default: torchvision's InvertedResidual) wrapped in
    torch.utils.checkpoint, in place (a block itself is returned wrapped)."""
    if not types:
        from torchvision.models.mobilenetv2 import InvertedResidual

        types = (InvertedResidual,)
    if isinstance(model, types):
        return Checkpointed(model)
    for name, child in list(model.named_children()):
        if isinstance(child, types):
            setattr(model, name, Checkpointed(child))
        else:
            checkpoint_blocks(child, types)
    return model


def _fused_model(tv_model: nn.Module) -> nn.Module:
    """The fused counterpart: a block converted in place; the whole model as our own
    mobilenet_v2 (fused blocks, and a stem and head that fold their batch norms in
    inference) loaded with torchvision's weights."""
    from torchvision.models import MobileNetV2 as TorchvisionMobileNetV2

    from mnv2_kernels.model import convert_model, mobilenet_v2

    if isinstance(tv_model, TorchvisionMobileNetV2):
        fused = mobilenet_v2(num_classes=tv_model.classifier[-1].out_features)
        fused.load_state_dict(tv_model.state_dict())
        return fused
    if _is_torchvision_stem(tv_model):
        from mnv2_kernels.modules import Conv2dNormActivation

        conv = tv_model[0]
        fused = Conv2dNormActivation(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                                     norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
        fused.load_state_dict(tv_model.state_dict())
        return fused
    return convert_model(copy.deepcopy(tv_model))


def _is_torchvision_stem(m: nn.Module) -> bool:
    from torchvision.ops.misc import Conv2dNormActivation

    return type(m) is Conv2dNormActivation


def implementations(tv_model: nn.Module) -> Dict[str, nn.Module]:
    return {
        "fused": _fused_model(tv_model),
        "torchvision": copy.deepcopy(tv_model),
        "torchvision+checkpoint": checkpoint_blocks(copy.deepcopy(tv_model)),
    }


IMPLS = ("fused", "torchvision", "torchvision+checkpoint")


def _train_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    module.train()
    xg = x.clone().requires_grad_()

    def step():
        y = module(xg)
        y.backward(torch.ones_like(y))
        return None

    return step


def train_peak(module: nn.Module, x: torch.Tensor) -> int:
    step = _train_step(module, x)
    step()  # warm-up
    module.zero_grad(set_to_none=True)
    peak = peak_bytes(step, x.device.type)
    module.zero_grad(set_to_none=True)
    return peak


def measure(module: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    module.eval()
    with torch.no_grad():
        module(x)  # warm up (the fused block packs its weights once)
        inference = peak_bytes(lambda: module(x), x.device.type)
    peak = train_peak(module, x)
    xg = x.clone().requires_grad_()
    saved = saved_bytes(module, lambda: module(xg))
    return {"inference_peak": inference, "train_peak": peak, "train_saved": saved}


def _progress(items, desc: str, progress: bool):
    items = list(items)
    if progress:
        try:
            from tqdm import tqdm

            return tqdm(items, desc=desc, unit="case")
        except ImportError:
            print(f"{desc}: {len(items)} cases (pip install tqdm for a progress bar)", file=sys.stderr)
    return items


def cases(resolution: int = 224):
    """(name, torchvision module, input shape without batch, in + out bytes per image at fp32 or
    None) for the stem, the 17 blocks and the whole model."""
    import torchvision
    from torchvision.models.mobilenetv2 import InvertedResidual

    from mnv2_kernels.model import mobilenet_block_shapes

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2().eval()
    stem = tv.features[0]
    s = (resolution - 1) // 2 + 1
    out = [(f"stem 3->32 s2 {resolution}x{resolution}", copy.deepcopy(stem), (3, resolution, resolution),
            4 * (3 * resolution * resolution + 32 * s * s))]
    for i, (inp, oup, stride, t, h) in enumerate(mobilenet_block_shapes(resolution=resolution)):
        ho = (h - 1) // stride + 1
        out.append((f"block{i + 1:02d} {inp}->{oup} s{stride} {h}x{h}", InvertedResidual(inp, oup, stride, t).eval(),
                    (inp, h, h), 4 * (inp * h * h + oup * ho * ho)))
    out.append((f"model mobilenet_v2 {resolution}x{resolution}", tv, (3, resolution, resolution), None))
    return out


def run(batches: List[int], device: str = "cpu", dtype: torch.dtype = torch.float32,
        progress: bool = True) -> List[dict]:
    work = [(c, n) for n in batches for c in cases()]
    rows = []
    for (name, module, shape, io_bytes), n in _progress(work, "memory", progress):
        x = torch.randn(n, *shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        for impl, m in implementations(module).items():
            m.to(device=device, dtype=dtype, memory_format=torch.channels_last)
            row = {"case": name, "batch": n, "impl": impl, **measure(m, x)}
            if io_bytes is not None:
                row["io_bytes"] = n * io_bytes * x.element_size() // 4
            rows.append(row)
            del m
    return rows


def batch_sweep(batches: List[int], device: str = "cpu", dtype: torch.dtype = torch.float32,
                progress: bool = True) -> List[dict]:
    """The whole model's training-step peak at each batch size."""
    name, tv, shape, _ = cases()[-1]
    rows = []
    work = [(n, impl) for n in batches for impl in IMPLS]
    for n, impl in _progress(work, "train peak vs batch", progress):
        m = implementations(tv)[impl].to(device=device, dtype=dtype, memory_format=torch.channels_last)
        x = torch.randn(n, *shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        rows.append({"batch": n, "impl": impl, "train_peak": train_peak(m, x)})
        del m, x
    return rows


# The MobileNetV2 paper (Sandler et al. 2018), Table 3: the largest number of channels /
# memory (KB at 16 bits) to materialise at each spatial resolution.
PAPER_TABLE3 = {112: (16, 400), 56: (32, 200), 28: (64, 100), 14: (160, 62), 7: (320, 32), 1: (1280, 2)}
PAPER_MAX_KB = 400


def resolution_table(resolution: int = 224) -> Dict[str, Dict[str, Dict[int, int]]]:
    """impl -> {"all": {side: channels}, "blocks": {side: channels}}: the most channels of one
    tensor that an operator allocated (or a view of such an allocation) at each square spatial side during an inference forward at batch 1. "blocks" counts only what is
    produced inside the inverted-residual blocks (their expansions and outputs)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torchvision.models.mobilenetv2 import InvertedResidual

    from mnv2_kernels.modules import FusedInvertedResidual

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.depth = 0
            self.all: Dict[int, int] = {}
            self.blocks: Dict[int, int] = {}

            self.fresh = set()  # storages that operators allocated during the recording

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs:
                    self.fresh.add(ptr)
                # a 4-d view of a fresh allocation counts too: a 1x1 convolution on
                # channels_last input is one matrix product whose result is viewed as NCHW
                if t.dim() == 4 and t.shape[2] == t.shape[3] and ptr in self.fresh:
                    side, c = t.shape[2], t.shape[1]
                    self.all[side] = max(self.all.get(side, 0), c)
                    if self.depth:
                        self.blocks[side] = max(self.blocks.get(side, 0), c)
            return out

    _, tv, shape, _ = cases(resolution)[-1]
    x = torch.randn(1, *shape).contiguous(memory_format=torch.channels_last)
    result = {}
    for impl in ("fused", "torchvision"):
        model = implementations(tv)[impl].eval().to(memory_format=torch.channels_last)
        rec = Recorder()
        handles = []
        for mod in model.modules():
            if isinstance(mod, (InvertedResidual, FusedInvertedResidual)):
                handles.append(mod.register_forward_pre_hook(lambda *_: setattr(rec, "depth", rec.depth + 1)))
                handles.append(mod.register_forward_hook(lambda *_: setattr(rec, "depth", rec.depth - 1)))
        with torch.no_grad():
            model(x)  # warm-up: weights folded and packed once, outside the recording
            with rec:
                model(x)
        for h in handles:
            h.remove()
        result[impl] = {"all": rec.all, "blocks": rec.blocks}
    return result


def _kb16(channels: int, side: int) -> float:
    return channels * side * side * 2 / 1000


def resolution_markdown(table) -> List[str]:
    sides = sorted({s for impl in table.values() for view in impl.values() for s in view} | set(PAPER_TABLE3),
                   reverse=True)

    def cell(view, side):
        c = view.get(side)
        return f"{c} / {_kb16(c, side):.0f}" if c else "-"

    def max_kb(view):
        return max(_kb16(c, s) for s, c in view.items())

    f, t = table["fused"], table["torchvision"]
    lines = [
        "## Largest tensor materialised per resolution (paper Table 3 style)",
        "",
        "Channels / KB at 16 bits of the largest tensor any operator produces at each spatial "
        "resolution during an inference forward (batch 1, 224x224; views of the input and of "
        "the weights excluded). *blocks*: produced inside the inverted-residual blocks only. KB = 1000 bytes, "
        "as the paper's figures are.",
        "",
        "| resolution | fused: blocks | fused: every tensor | torchvision: blocks | torchvision: every tensor "
        "| paper's MobileNetV2 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for side in sides:
        paper = PAPER_TABLE3.get(side)
        lines.append(f"| {side}x{side} | {cell(f['blocks'], side)} | {cell(f['all'], side)} "
                     f"| {cell(t['blocks'], side)} | {cell(t['all'], side)} "
                     f"| {f'{paper[0]} / {paper[1]}' if paper else '-'} |")
    lines.append(f"| **max** | **{max_kb(f['blocks']):.0f}K** | **{max_kb(f['all']):.0f}K** "
                 f"| **{max_kb(t['blocks']):.0f}K** | **{max_kb(t['all']):.0f}K** | **{PAPER_MAX_KB}K** |")
    lines += [
        "",
        "The paper counts each bottleneck's output at its block's input resolution (160 channels "
        "at 14x14 is block 14's output, which is 7x7) and leaves out the stem's 32-channel output "
        "and the 1280-channel head convolution at 7x7, which every implementation materialises; "
        "those two make up the fused model's *every tensor* maxima. Inside the blocks the fused "
        "model materialises only bottleneck tensors, never an expansion.",
        "",
    ]
    return lines


def _ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"


def goals_markdown(rows: List[dict]) -> List[str]:
    """The memory goals, checked against this run."""
    lines = ["## Goals (memory)", ""]
    by = {(r["case"], r["batch"], r["impl"]): r for r in rows}
    batches = sorted({r["batch"] for r in rows})
    model = next((r["case"] for r in rows if r["case"].startswith("model")), None)
    stem = next((r["case"] for r in rows if r["case"].startswith("stem")), None)
    if model is None:
        return []
    n = max(batches)
    f, t, c = (by[(model, n, i)] for i in IMPLS)
    for label, a, b, bound in (
            (f"training-step peak, whole model, batch {n}: fused / torchvision", f, t, 0.25),
            (f"training-step peak, whole model, batch {n}: fused / torchvision+checkpoint", f, c, 0.8)):
        r = a["train_peak"] / b["train_peak"]
        lines.append(f"- {label} <= {bound}: {r:.2f} -> {'met' if r <= bound else 'missed'}")
    for n in batches:
        blocks = [r for r in rows if r["batch"] == n and r["impl"] == "fused" and r["case"].startswith("block")]
        largest = max(blocks, key=lambda r: r["io_bytes"])
        bound = 1.25 * largest["io_bytes"]
        peak = by[(model, n, "fused")]["inference_peak"]
        lines.append(
            f"- inference peak, whole model, batch {n}: {peak / MB:.2f} MB <= 1.25 x (largest block's input + "
            f"output: {largest['case'].split()[0]}, {largest['io_bytes'] / MB:.2f} MB) = {bound / MB:.2f} MB: "
            f"{peak / largest['io_bytes']:.2f}x -> {'met' if peak <= bound else 'missed'}")
        if stem is not None:
            sf = by[(stem, n, "fused")]
            st = by[(stem, n, "torchvision")]
            lines.append(f"  - the stem on its own (input excluded): fused {sf['inference_peak'] / MB:.2f} MB, "
                         f"torchvision {st['inference_peak'] / MB:.2f} MB; its input + output "
                         f"{sf['io_bytes'] / MB:.2f} MB")
    return lines + [""]


def sweep_markdown(sweep: List[dict]) -> List[str]:
    if not sweep:
        return []
    by = {(r["batch"], r["impl"]): r["train_peak"] for r in sweep}
    lines = ["## Training-step peak of the whole model against the batch size (MB)", "",
             "| batch | " + " | ".join(IMPLS) + " | fused / torchvision | fused / torchvision+checkpoint |",
             "|---:|" + "---:|" * (len(IMPLS) + 2)]
    for n in sorted({r["batch"] for r in sweep}):
        f, t, c = (by[(n, i)] for i in IMPLS)
        lines.append(f"| {n} | {f / MB:.1f} | {t / MB:.1f} | {c / MB:.1f} | {_ratio(f, t)} | {_ratio(f, c)} |")
    return lines + [""]


def to_markdown(rows: List[dict], machine: dict, table=None, sweep=None, plot=None) -> str:
    device = machine.get("device", "cpu")
    peak_text = ("torch.cuda.max_memory_allocated above what was allocated before the call"
                 if device != "cpu" else "resident high-water mark during the call above what was "
                 "resident before it")
    lines = [
        f"# Memory footprint: fused vs torchvision ({device}, {machine.get('dtype', 'float32')}, channels_last)",
        "",
        f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}"
        + (f", {machine['gpu']}" if machine.get("gpu") else "") + ".",
        "",
        f"Peak: {peak_text} (model and input excluded). Saved: bytes autograd keeps for backward "
        "(parameters excluded). MB = 1e6 bytes. Ratios are fused / torchvision. The fused whole "
        "model is mnv2_kernels.mobilenet_v2 with torchvision's weights; the stem row is its first "
        "layer on its own.",
        "",
    ]
    if plot:
        lines += [f"![bytes per block and training peak against batch size]({plot})", ""]
    lines += goals_markdown(rows)
    lines += [
        "## Per block and whole model",
        "",
        "| case | batch | inference peak MB (fused / tv / ratio) | train-step peak MB (fused / tv / tv+ckpt / ratio) "
        "| saved for backward MB (fused / tv / tv+ckpt / ratio) |",
        "|---|---:|---|---|---|",
    ]
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["case"], r["batch"]), {})[r["impl"]] = r
    for (case, batch), impls in by_case.items():
        f, t, c = (impls[i] for i in IMPLS)
        lines.append(
            f"| {case} | {batch} "
            f"| {f['inference_peak'] / MB:.2f} / {t['inference_peak'] / MB:.2f} / "
            f"{_ratio(f['inference_peak'], t['inference_peak'])} "
            f"| {f['train_peak'] / MB:.2f} / {t['train_peak'] / MB:.2f} / {c['train_peak'] / MB:.2f} / "
            f"{_ratio(f['train_peak'], t['train_peak'])} "
            f"| {f['train_saved'] / MB:.2f} / {t['train_saved'] / MB:.2f} / {c['train_saved'] / MB:.2f} / "
            f"{_ratio(f['train_saved'], t['train_saved'])} |")
    lines.append("")
    lines += sweep_markdown(sweep or [])
    if table:
        lines += resolution_markdown(table)
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], sweep: List[dict], path: str) -> bool:
    """Bytes per block (inference and training step, at the largest batch) and the whole model's
    training peak against the batch size, one PNG. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install .[bench])", file=sys.stderr)
        return False
    n = max(r["batch"] for r in rows)
    names = [r["case"] for r in rows if r["batch"] == n and r["impl"] == "fused" and not r["case"].startswith("model")]
    by = {(r["case"], r["impl"]): r for r in rows if r["batch"] == n}
    fig, axes = plt.subplots(3, 1, figsize=(12, 12))
    width = 0.27
    for ax, key, title in ((axes[0], "inference_peak", f"inference peak per layer, batch {n}"),
                           (axes[1], "train_peak", f"training-step peak per layer, batch {n}")):
        for k, impl in enumerate(IMPLS):
            ax.bar([i + (k - 1) * width for i in range(len(names))],
                   [max(by[(c, impl)][key], 1) / MB for c in names], width, label=impl)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([c.split()[0] for c in names], rotation=45)
        ax.set_yscale("log")
        ax.set_ylabel("MB")
        ax.set_title(title)
        ax.legend()
    ax = axes[2]
    for impl in IMPLS:
        pts = sorted((r["batch"], r["train_peak"] / MB) for r in sweep if r["impl"] == impl)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("MB")
    ax.set_title("whole model (224x224): training-step peak against batch size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--sweep", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32],
                        help="batch sizes of the whole model's training-peak sweep (none: skip it)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=None, help="folder for memory.md, memory.json and memory.png "
                        "(default: bench/results/<machine>)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not sys.platform.startswith("linux"):
        raise SystemExit("memory_report measures resident memory through /proc: Linux only")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("memory_report --device cuda: no CUDA device")
    dtype = getattr(torch, args.dtype)
    if args.device == "cpu" and dtype != torch.float32:
        raise SystemExit("memory_report: the CPU kernels run float32 (and float64); use --dtype float32")
    machine = machine_info()
    machine.update(device=args.device, dtype=args.dtype)
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    progress = not args.no_progress
    rows = run(args.batches, args.device, dtype, progress)
    sweep = batch_sweep(args.sweep, args.device, dtype, progress) if args.sweep else []
    table = resolution_table()
    out = args.out or os.path.join("bench", "results", machine_slug(machine))
    os.makedirs(out, exist_ok=True)
    png = None
    if not args.no_plot and plot(rows, sweep or [], os.path.join(out, "memory.png")):
        png = "memory.png"
    text = to_markdown(rows, machine, table, sweep, png)
    with open(os.path.join(out, "memory.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "memory.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows, "sweep": sweep, "resolution_table": table}, f, indent=1)
    print(text)
    print(f"written to {out}/memory.md" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
