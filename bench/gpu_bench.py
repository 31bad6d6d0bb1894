"""GPU benchmarks of the fused block: the 17 MobileNetV2-1.0 blocks and the whole
model, CUDA and Triton backends against torchvision eager (cuDNN) and
torch.compile, plus peak memory of inference and of a training step.

    python -m bench.gpu_bench --out DIR [--batch 256] [--dtypes float16,bfloat16]
                              [--compile-mode max-autotune] [--no-train] [--dry-run]

Every figure is a median of CUDA-event timings after a warm-up, and every ratio
compares two implementations measured in this one run. --dry-run runs the same
steps on the CPU with tiny sizes (Triton under TRITON_INTERPRET=1) so the script
is rehearsed before a GPU appears.

Writes DIR/gpu_bench.json and prints a short table.
"""

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time

import torch
import torchvision

import mnv2_kernels
from mnv2_kernels import _extension
from mnv2_kernels.model import mobilenet_block_shapes
from mnv2_kernels.testing import randomize_batch_norm
from mnv2_kernels.triton_kernels import is_available as triton_available
from torchvision.models.mobilenetv2 import InvertedResidual

CL = torch.channels_last
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def log(*args):
    print(*args, flush=True)


class Timer:
    """Median milliseconds of fn() over repetitions, with CUDA events (or the wall
    clock on the CPU in dry runs)."""

    def __init__(self, device, min_reps=5, max_reps=50, budget_s=0.4, max_warmup=None):
        self.device, self.min_reps, self.max_reps, self.budget_s = device, min_reps, max_reps, budget_s
        self.max_warmup = max_warmup

    def __call__(self, fn, warmup=2):
        if self.max_warmup is not None:
            warmup = min(warmup, self.max_warmup)
        for _ in range(warmup):
            fn()
        times = []
        start = time.perf_counter()
        while len(times) < self.max_reps and (len(times) < self.min_reps
                                               or time.perf_counter() - start < self.budget_s):
            if self.device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def measure(row, label, timer, make_fn, warmup=2, peak=False):
    """row[label] = median ms of the callable make_fn() builds (and its peak CUDA bytes
    if asked); a failure to build or run it is recorded as row[label + "_error"], not
    raised, so one broken implementation does not end the run."""
    try:
        fn = make_fn()
        row[label] = timer(fn, warmup=warmup)
        if peak:
            row[f"{label}_peak_bytes"] = peak_bytes(fn)
    except Exception as exc:
        row[f"{label}_error"] = repr(exc)[:300]


def peak_bytes(fn):
    """Peak CUDA memory of one fn() call above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def backends_here(device):
    names = []
    if device == "cuda" and _extension.has_cuda_kernels():
        names.append("cuda")
    if triton_available():
        names.append("triton")
    return names


def fused_forward(module, x, backend):
    def run():
        with torch.no_grad(), mnv2_kernels.use_backend(backend):
            return module(x)
    return run


def plain_forward(module, x):
    def run():
        with torch.no_grad():
            return module(x)
    return run


def compiled(module, mode):
    return torch.compile(module, mode=None if mode == "default" else mode)


def _block_case(args, device, dtype, i, shape):
    inp, oup, stride, t, h = shape
    h = h if not args.dry_run else max(2, h // 28)
    torch.manual_seed(i)
    tv = InvertedResidual(inp, oup, stride, t)
    randomize_batch_norm(tv)
    tv = tv.to(device=device, dtype=dtype, memory_format=CL).eval()
    x = torch.randn(args.batch, inp, h, h, device=device).to(dtype).contiguous(memory_format=CL)
    return tv, x, h


def _row(results, section, **key):
    for r in results[section]:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    row = dict(key)
    results[section].append(row)
    return row


def bench_blocks(args, device, dtype, backends, timer, results, phase):
    """phase "fused": eager and the fused backends; phase "compile": the torch.compile
    baseline, added to the same rows (last, because it is slow to build)."""
    for i, shape in enumerate(mobilenet_block_shapes()):
        if args.blocks and (i + 1) not in args.blocks:
            continue
        inp, oup, stride, t, _ = shape
        tv, x, h = _block_case(args, device, dtype, i, shape)
        dname = str(dtype).replace("torch.", "")
        row = _row(results, "blocks", block=i + 1, dtype=dname)
        row.update(name=f"block{i + 1:02d} {inp}->{oup} t{t} s{stride} {h}x{h}", batch=args.batch)
        if phase == "compile":
            measure(row, "compile", timer, lambda: plain_forward(compiled(tv, args.compile_mode), x), warmup=3)
        else:
            fused = mnv2_kernels.convert_model(copy.deepcopy(tv))
            row["eager"] = timer(plain_forward(tv, x))
            for b in backends:
                measure(row, b, timer, lambda: fused_forward(fused, x, b))
            ho = (h - 1) // stride + 1
            item = x.element_size()
            row["io_bytes"] = (x.numel() + args.batch * oup * ho * ho) * item + sum(
                p.numel() * item for p in tv.parameters())
            row["hidden_bytes"] = args.batch * inp * t * ho * ho * item
        save(args, results)
        cols = " ".join(f"{k}={row[k]:.3f}" for k in ("eager", "compile", *backends) if k in row)
        log(f"  {row['name']} {dname}: {cols} ms")


def _fused_model(tv):
    model = mnv2_kernels.mobilenet_v2()
    model.load_state_dict(tv.state_dict())
    return model


def bench_model(args, device, dtype, backends, timer, results, phase):
    torch.manual_seed(0)
    res = 224 if not args.dry_run else 16
    tv = torchvision.models.mobilenet_v2()
    randomize_batch_norm(tv)
    ours = _fused_model(tv).to(device=device, dtype=dtype, memory_format=CL).eval()
    tv = tv.to(device=device, dtype=dtype, memory_format=CL).eval()
    x = torch.randn(args.batch, 3, res, res, device=device).to(dtype).contiguous(memory_format=CL)
    row = _row(results, "model", dtype=str(dtype).replace("torch.", ""))
    row.update(batch=args.batch, resolution=res)
    if phase == "compile":
        measure(row, "compile", timer, lambda: plain_forward(compiled(tv, args.compile_mode), x), warmup=3)
    else:
        row["eager"] = timer(plain_forward(tv, x))
        for b in backends:
            measure(row, b, timer, lambda: fused_forward(ours, x, b))
        # inference peak memory above the weights and the input
        for label, fn in [("eager", plain_forward(tv, x))] + [(b, fused_forward(ours, x, b))
                                                              for b in backends if b in row]:
            if device == "cuda":
                row[f"{label}_peak_bytes"] = peak_bytes(fn)
    save(args, results)
    cols = " ".join(f"{k}={row[k]:.2f}" for k in ("eager", "compile", *backends) if k in row)
    log(f"  model {row['dtype']} batch {args.batch}: {cols} ms")


def bench_train(args, device, dtype, backends, timer, results):
    """One SGD step (forward, cross-entropy, backward, update) in train mode."""
    torch.manual_seed(0)
    res = 224 if not args.dry_run else 16
    tv = torchvision.models.mobilenet_v2()
    ours = _fused_model(tv).to(device=device, dtype=dtype, memory_format=CL).train()
    tv = tv.to(device=device, dtype=dtype, memory_format=CL).train()
    x = torch.randn(args.batch, 3, res, res, device=device).to(dtype).contiguous(memory_format=CL)
    labels = torch.randint(0, 1000, (args.batch,), device=device)

    def step_fn(model, backend=None):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            ctx = mnv2_kernels.use_backend(backend) if backend else contextlib.nullcontext()
            with ctx:
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
                loss.backward()
                opt.step()
        return step

    row = {"dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "resolution": res}
    candidates = [("eager", step_fn(tv))] + [(b, step_fn(ours, b)) for b in backends]
    for label, fn in candidates:
        measure(row, label, timer, lambda: fn, warmup=2, peak=device == "cuda")
    results["train"].append(row)
    save(args, results)
    cols = " ".join(f"{k}={row[k]:.2f}" for k in ("eager", *backends) if k in row)
    log(f"  train step {row['dtype']} batch {args.batch}: {cols} ms")


def save(args, results):
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_bench.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--blocks", default="", help="comma-separated block numbers (1-17); default all")
    p.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode for the baselines: max-autotune, default or none")
    p.add_argument("--no-blocks", action="store_true")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--train-dtype", default="bfloat16")
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal with tiny sizes")
    args = p.parse_args(argv)
    args.blocks = [int(b) for b in args.blocks.split(",") if b]
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu":
        args.dry_run = True
        args.batch = min(args.batch, 2)
        if args.compile_mode == "max-autotune":  # Inductor's CPU autotuning takes many minutes
            args.compile_mode = "none"
    backends = backends_here(device)
    timer = (Timer(device, min_reps=1, max_reps=1, max_warmup=1) if args.dry_run
             else Timer(device, min_reps=5, max_reps=50))
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
               "torch": torch.__version__, "backends": backends, "compile_mode": args.compile_mode,
               "blocks": [], "model": [], "train": []}
    log(f"gpu_bench: device {results['device']}, backends {backends}, batch {args.batch}")
    t0 = time.time()
    # The interpreter needs minutes for one pass of the wide late blocks: dry runs
    # time the whole model and the train step on torchvision only.
    model_backends = [] if args.dry_run else backends
    dtypes = [DTYPES[d] for d in args.dtypes.split(",") if d]
    # Cheap figures first, the slow-to-build torch.compile baselines last, and the
    # JSON rewritten after every row: a run cut short keeps what it measured.
    for dtype in dtypes:
        if not args.no_blocks:
            bench_blocks(args, device, dtype, backends, timer, results, "fused")
        if not args.no_model:
            bench_model(args, device, dtype, model_backends, timer, results, "fused")
    if not args.no_train:
        bench_train(args, device, DTYPES[args.train_dtype] if not args.dry_run else torch.float32,
                    model_backends, timer, results)
    if args.compile_mode != "none":
        for dtype in dtypes:
            # the model first: its autotuning fills the per-convolution cache the blocks reuse
            if not args.no_model:
                bench_model(args, device, dtype, model_backends, timer, results, "compile")
            if not args.no_blocks:
                bench_blocks(args, device, dtype, backends, timer, results, "compile")
    results["seconds"] = time.time() - t0
    save(args, results)
    log(f"gpu_bench: {results['seconds']:.0f} s, wrote {os.path.join(args.out, 'gpu_bench.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
