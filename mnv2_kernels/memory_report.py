"""Memory footprint of the fused block against torchvision, per block and for
the whole MobileNetV2-1.0 at 224.

    python -m mnv2_kernels.memory_report [--batches 1 32] [--out DIR]

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
Linux only. Writes a markdown table (and prints it).
"""

import argparse
import copy
import gc
import json
import os
import platform
import sys
from typing import Callable, Dict, List

MMAP_THRESHOLD = "65536"

if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
    # malloc reads this at start-up: run again with it set
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    os.execve(sys.executable, [sys.executable, "-m", "mnv2_kernels.memory_report", *sys.argv[1:]], env)

import torch  # noqa: E402
import torch.utils.checkpoint  # noqa: E402
from torch import nn  # noqa: E402


MB = 1e6


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_bytes(fn: Callable[[], object]) -> int:
    """Resident high-water mark during fn, above the resident memory before it."""
    gc.collect()
    base = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    result = fn()
    peak = _status("VmHWM:") - base
    del result
    return max(peak, 0)


def saved_bytes(module: nn.Module, fn: Callable[[], torch.Tensor]) -> int:
    own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    saved: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(saved.values())


class Checkpointed(nn.Module):
    """A block whose activations are recomputed in backward (torch.utils.checkpoint)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        if torch.is_grad_enabled() and self.training:
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        return self.block(x)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    from torchvision.models.mobilenetv2 import InvertedResidual

    if isinstance(model, InvertedResidual):
        return Checkpointed(model)
    for name, child in list(model.named_children()):
        if isinstance(child, InvertedResidual):
            setattr(model, name, Checkpointed(child))
        else:
            checkpoint_blocks(child)
    return model


def implementations(tv_model: nn.Module) -> Dict[str, nn.Module]:
    from .model import convert_model

    return {
        "fused": convert_model(copy.deepcopy(tv_model)),
        "torchvision": copy.deepcopy(tv_model),
        "torchvision+checkpoint": checkpoint_blocks(copy.deepcopy(tv_model)),
    }


def measure(module: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    module.eval()
    with torch.no_grad():
        module(x)  # warm up (the fused block packs its weights once)
        inference = peak_bytes(lambda: module(x))
    module.train()
    xg = x.clone().requires_grad_()

    def step():
        y = module(xg)
        y.backward(torch.ones_like(y))
        return None

    step()
    module.zero_grad(set_to_none=True)
    train_peak = peak_bytes(step)
    module.zero_grad(set_to_none=True)
    saved = saved_bytes(module, lambda: module(xg))
    return {"inference_peak": inference, "train_peak": train_peak, "train_saved": saved}


def run(batches: List[int], progress: bool = True) -> List[dict]:
    import torchvision

    from torchvision.models.mobilenetv2 import InvertedResidual

    from .model import mobilenet_block_shapes

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2().eval()
    cases = [(f"block{i + 1:02d} {inp}->{oup} s{stride} {h}x{h}", InvertedResidual(inp, oup, stride, t).eval(),
              (inp, h, h)) for i, (inp, oup, stride, t, h) in enumerate(mobilenet_block_shapes())]
    cases.append(("model mobilenet_v2 224x224", tv, (3, 224, 224)))
    work = [(name, m, s, n) for n in batches for name, m, s in cases]
    rows = []
    iterator = work
    if progress:
        try:
            from tqdm import tqdm

            iterator = tqdm(work, desc="memory", unit="case")
        except ImportError:
            pass
    for name, module, shape, n in iterator:
        x = torch.randn(n, *shape).contiguous(memory_format=torch.channels_last)
        for impl, m in implementations(module).items():
            m.to(memory_format=torch.channels_last)
            rows.append({"case": name, "batch": n, "impl": impl, **measure(m, x)})
    return rows


def to_markdown(rows: List[dict], machine: dict) -> str:
    lines = [
        "# Memory footprint: fused vs torchvision (CPU, fp32, channels_last)",
        "",
        f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}.",
        "",
        "Peak: resident high-water mark during the call above what was resident before it "
        "(model and input excluded). Saved: bytes autograd keeps for backward (parameters "
        "excluded). MB = 1e6 bytes. Ratios are fused / torchvision.",
        "",
        "| case | batch | inference peak MB (fused / tv / ratio) | train-step peak MB (fused / tv / tv+ckpt / ratio) "
        "| saved for backward MB (fused / tv / tv+ckpt / ratio) |",
        "|---|---:|---|---|---|",
    ]
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["case"], r["batch"]), {})[r["impl"]] = r
    for (case, batch), impls in by_case.items():
        f, t, c = impls["fused"], impls["torchvision"], impls["torchvision+checkpoint"]

        def ratio(a, b):
            return f"{a / b:.2f}" if b else "n/a"

        lines.append(
            f"| {case} | {batch} "
            f"| {f['inference_peak'] / MB:.2f} / {t['inference_peak'] / MB:.2f} / "
            f"{ratio(f['inference_peak'], t['inference_peak'])} "
            f"| {f['train_peak'] / MB:.2f} / {t['train_peak'] / MB:.2f} / {c['train_peak'] / MB:.2f} / "
            f"{ratio(f['train_peak'], t['train_peak'])} "
            f"| {f['train_saved'] / MB:.2f} / {t['train_saved'] / MB:.2f} / {c['train_saved'] / MB:.2f} / "
            f"{ratio(f['train_saved'], t['train_saved'])} |")
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from . import _extension

    isa = _extension.cpu_isa() if _extension.LOADED else "none (reference backend)"
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_isa": isa}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--out", default=None, help="folder for memory.md and memory.json "
                        "(default: bench/results/<machine>)")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("memory_report measures resident memory through /proc: Linux only")
    machine = machine_info()
    rows = run(args.batches)
    text = to_markdown(rows, machine)
    out = args.out or os.path.join("bench", "results", machine_slug(machine))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "memory.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "memory.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)
    print(text)
    print(f"written to {out}/memory.md")


def machine_slug(machine: dict) -> str:
    name = "".join(c if c.isalnum() else "-" for c in machine["cpu"].lower()).strip("-")
    while "--" in name:
        name = name.replace("--", "-")
    return f"{name}-{machine['threads']}t"


if __name__ == "__main__":
    main()
