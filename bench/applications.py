"""The paper's applications on the fused backbone against torchvision's blocks (CPU, fp32):
SSDLite at 320x320 and Mobile DeepLabv3 (output stride 16, no ASPP) at 513x513.

    python -m bench.applications [--rounds 3] [--budget-gb 4] [--no-search]
                                 [--ssd-batch 8] [--deeplab-batch 4] [--deeplab-side 513] [--write]

* Training step (train mode, forward with the task's loss, backward): peak memory and time
  of the fused model, torchvision's blocks eagerly, and torchvision's blocks each wrapped in
  torch.utils.checkpoint (bench.memory_report.checkpoint_blocks), SSDLite at batch 8 and
  DeepLab at batch 4.
* Inference at batch 1 (eval, no gradient): the fused model against torchvision's blocks on
  a channels_last model and input (SSDLite: the network, without box decoding and NMS).
* The largest DeepLab 513x513 training batch whose step peak stays within a memory budget
  (predicted from the peaks at batches 2 and 4, then measured at it and one past it).

Peaks are resident memory above what was in use before the call (mnv2_kernels.memory.
peak_bytes: /proc/self/clear_refs, with malloc serving large blocks by mmap; Linux only).
Times are paired: each round times every implementation in turn, in a rotating order, and
the table gives the median over rounds of each one's time over torchvision's. Prints
markdown; --write also saves it as bench/results/<machine>/applications.md.
"""

import argparse
import copy
import os
import statistics
import sys
import time

MMAP_THRESHOLD = "65536"

if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
    # malloc reads this at start-up: run again with it set (as bench.memory_report)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    os.execve(sys.executable, [sys.executable, "-m", "bench.applications", *sys.argv[1:]], env)

import torch  # noqa: E402

from bench.machine import machine_info, machine_slug  # noqa: E402
from bench.memory_report import checkpoint_blocks  # noqa: E402
from mnv2_kernels.detection import ssdlite320_mobilenet_v2  # noqa: E402
from mnv2_kernels.memory import peak_bytes  # noqa: E402
from mnv2_kernels.segmentation import deeplabv3_mobilenet_v2  # noqa: E402

IMPLS = ("fused", "torchvision", "torchvision+checkpoint")
MB = 1e6


def _models(build):
    """{implementation: model}: the fused model, and torchvision's blocks with its weights,
    eager and checkpointed per block."""
    torch.manual_seed(0)
    fused = build(fused=True)
    unfused = build(fused=False)
    unfused.load_state_dict(fused.state_dict())
    return {"fused": fused, "torchvision": unfused,
            "torchvision+checkpoint": checkpoint_blocks(copy.deepcopy(unfused))}


def ssdlite_task(batch):
    """(builder, training step factory, inference factory) for SSDLite at 320x320."""
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 320, 320, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(3, 2, generator=g) * 160
        targets.append({"boxes": torch.cat([xy, xy + 40 + torch.rand(3, 2, generator=g) * 100], dim=1),
                        "labels": torch.randint(1, 91, (3,), generator=g)})

    def train_step(model):
        model.train()

        def step():
            losses = model(images, targets)
            sum(losses.values()).backward()
            model.zero_grad(set_to_none=True)
        return step

    def inference(model, channels_last):
        # the network (backbone and heads) on the resized, normalised image: SSD's box decoding
        # and NMS are the same for both, and with untrained weights (every score near 1/91,
        # all above score_thresh) they would dominate the time
        model.eval()
        image = model.transform([images[0]])[0].tensors
        if channels_last:
            model.to(memory_format=torch.channels_last)
            image = image.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.no_grad():
                return model.head(list(model.backbone(image).values()))
        return run

    return lambda fused: ssdlite320_mobilenet_v2(fused=fused), train_step, inference


def deeplab_task(batch, side=513):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, side, side, generator=g)
    target = torch.randint(0, 21, (batch, side, side), generator=g)

    def train_step(model):
        model.train()

        def step():
            out = model(x)["out"]
            torch.nn.functional.cross_entropy(out, target).backward()
            model.zero_grad(set_to_none=True)
        return step

    def inference(model, channels_last):
        model.eval()
        image = x[:1]
        if channels_last:
            model.to(memory_format=torch.channels_last)
            image = image.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.no_grad():
                return model(image)
        return run

    return lambda fused: deeplabv3_mobilenet_v2(fused=fused), train_step, inference


def paired_times(fns, rounds):
    """{name: [seconds per round]}: every round times each function once, in a rotating order."""
    names = list(fns)
    for fn in fns.values():
        fn()  # warm-up (weight packing, first-call allocations)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times, name, base):
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def training_rows(task_name, task, rounds):
    build, train_step, _ = task
    models = _models(build)
    steps = {name: train_step(m) for name, m in models.items()}
    peaks = {}
    for name, step in steps.items():
        step()
        peaks[name] = peak_bytes(step)
    times = paired_times(steps, rounds)
    rows = []
    for name in IMPLS:
        rows.append(f"| {task_name} | {name} | {peaks[name] / MB:.0f} | {peaks[name] / peaks['torchvision']:.2f} | "
                    f"{statistics.median(times[name]):.2f} | {ratio(times, name, 'torchvision'):.2f} |")
    return rows


def inference_rows(task_name, task, rounds):
    build, _, inference = task
    models = _models(build)
    fns = {"fused": inference(models["fused"], False),
           "fused channels_last": inference(copy.deepcopy(models["fused"]), True),
           "torchvision channels_last": inference(models["torchvision"], True)}
    times = paired_times(fns, rounds)
    return [f"| {task_name} | {name} | {1e3 * statistics.median(times[name]):.1f} | "
            f"{ratio(times, name, 'torchvision channels_last'):.2f} |" for name in fns]


def largest_batch(build, budget, side=513, limit=256):
    """The largest DeepLab side x side training batch whose step peak is within budget bytes,
    and its peak; 0 when batch 2 does not fit (train mode needs 2 images for the image-pooling
    branch's batch norm). A step's peak grows linearly with the batch: the line through the
    peaks at batches 2 and 4 predicts the answer, which is then measured on both sides (a
    step further each way until the fit changes), so every figure is a measured one."""
    measured = {}

    def peak_at(batch):
        if batch not in measured:
            _, train_step, _ = deeplab_task(batch, side)
            step = train_step(build())
            step()
            measured[batch] = peak_bytes(step)
        return measured[batch]

    if peak_at(2) > budget:
        return 0, 0
    slope = max((peak_at(4) - peak_at(2)) / 2, 1.0)
    guess = int(min(limit, max(2, 2 + (budget - peak_at(2)) // slope)))
    while guess > 2 and peak_at(guess) > budget:
        guess -= 1
    while guess < limit and peak_at(guess + 1) <= budget:
        guess += 1
    return guess, peak_at(guess)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, default=4.0)
    parser.add_argument("--no-search", action="store_true", help="skip the largest-batch search")
    parser.add_argument("--ssd-batch", type=int, default=8)
    parser.add_argument("--deeplab-batch", type=int, default=4)
    parser.add_argument("--deeplab-side", type=int, default=513)
    parser.add_argument("--write", action="store_true", help="also write bench/results/<machine>/applications.md")
    args = parser.parse_args(argv)
    side = args.deeplab_side
    machine = machine_info()
    lines = ["## SSDLite and Mobile DeepLabv3: fused against torchvision's blocks", "",
             f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, ISA {machine['cpu_isa']}; "
             f"median of {args.rounds} paired rounds.", "",
             "### Training step", "",
             "| model | implementation | peak MB | peak / torchvision | step s | time / torchvision |",
             "|---|---|---|---|---|---|"]
    lines += training_rows(f"SSDLite 320x320, batch {args.ssd_batch}", ssdlite_task(args.ssd_batch), args.rounds)
    lines += training_rows(f"DeepLabv3 OS16 {side}x{side}, batch {args.deeplab_batch}",
                           deeplab_task(args.deeplab_batch, side), args.rounds)
    lines += ["", "### Inference, batch 1", "",
              "| model | implementation | ms | time / torchvision channels_last |", "|---|---|---|---|"]
    lines += inference_rows("SSDLite 320x320 (network)", ssdlite_task(1), max(args.rounds, 5))
    lines += inference_rows(f"DeepLabv3 OS16 {side}x{side}", deeplab_task(1, side), max(args.rounds, 5))
    if not args.no_search:
        budget = args.budget_gb * 1e9
        lines += ["", f"### Largest DeepLabv3 {side}x{side} training batch within {args.budget_gb:g} GB", "",
                  "| implementation | batch | step peak MB |", "|---|---|---|"]
        builds = {"fused": lambda: deeplabv3_mobilenet_v2(fused=True),
                  "torchvision": lambda: deeplabv3_mobilenet_v2(fused=False),
                  "torchvision+checkpoint": lambda: checkpoint_blocks(deeplabv3_mobilenet_v2(fused=False))}
        for name, build in builds.items():
            batch, peak = largest_batch(build, budget, side)
            lines.append(f"| {name} | {batch} | {peak / MB:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.write:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", machine_slug(machine))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "applications.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
