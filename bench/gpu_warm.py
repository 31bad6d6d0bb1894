"""Fills Triton's on-disk kernel cache for bench.gpu_bench, in parallel processes.

    python -m bench.gpu_warm [--procs K] [--blocks 1,2,...] [--dtypes float16,bfloat16]
                             [--train-dtype bfloat16] [--batch 256] [--timeout S] [--dry-run]

bench.gpu_bench measures the blocks one after another, so the Triton JIT compiles
of their first calls (about 1-2 s each, per block shape and dtype, forward and,
for the training step, train-mode forward and backward) run one at a time. Here K
processes make those first calls at once with the benchmark's own block cases
(gpu_bench._block_case: the same shapes, batch, dtype and memory format), so the
benchmark then loads the kernels from the cache instead of compiling them.
Best effort: a failure here is printed, not raised; the benchmark records its own.
The torch.compile(max-autotune) baselines are not pre-warmed: their autotuning times
candidate kernels on the GPU, and K processes timing at once would skew its choices.
Under --dry-run (TRITON_INTERPRET=1) nothing is compiled; the run only rehearses
the steps at gpu_bench's dry-run sizes.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args):
    import copy

    import torch

    import mnv2_kernels
    from bench.gpu_bench import DTYPES, _block_case, fused_forward
    from mnv2_kernels.model import mobilenet_block_shapes

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    shapes = mobilenet_block_shapes()
    # every (block shape, dtype, eval or train) once (repeated shapes compile the same
    # kernels), dealt round-robin to the workers
    jobs = {}
    for i, shape in enumerate(shapes):
        if not args.blocks or i + 1 in args.blocks:
            for dname, train in [(d, False) for d in args.dtypes] + [(args.train_dtype, True)] * bool(args.train_dtype):
                jobs.setdefault((shape, dname, train), i)
    failures = 0
    for (shape, dname, train), i in list(jobs.items())[args.worker::args.procs]:
        t0 = time.time()
        try:
            tv, x, _ = _block_case(args, device, DTYPES[dname], i, shape)
            fused = mnv2_kernels.convert_model(copy.deepcopy(tv))
            if train:  # the training step: batch statistics, forward and backward
                fused.train()
                x = x.detach().requires_grad_()
                with mnv2_kernels.use_backend("triton"):
                    y = fused(x)
                    y.backward(torch.randn_like(y))
            else:
                fused_forward(fused, x, "triton")()
            if device == "cuda":
                torch.cuda.synchronize()
            what = "ok"
        except Exception as exc:  # best effort: the benchmark reports its own errors
            failures += 1
            what = f"FAILED {exc!r}"[:300]
        print(f"  warm block {i + 1} {dname}{' train' if train else ''}: {time.time() - t0:.1f} s {what}", flush=True)
    return 1 if failures else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--blocks", default="", help="comma-separated block numbers (1-17); default all")
    p.add_argument("--dtypes", default="float16,bfloat16", help="as gpu_bench --dtypes")
    p.add_argument("--train-dtype", default="bfloat16", help="as gpu_bench --train-dtype; '' for none")
    p.add_argument("--batch", type=int, default=256, help="as gpu_bench --batch")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.blocks = [int(b) for b in args.blocks.split(",") if b]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if args.dry_run:
        args.batch = min(args.batch, 2)  # as gpu_bench on the CPU
    if args.worker is not None:
        return worker(args)
    t0 = time.time()
    passed = list(argv if argv is not None else sys.argv[1:])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # the workers stay in this process group: an outer `timeout` stops them with this one
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    procs, rc = [], 0
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "bench.gpu_warm", *passed, "--worker", str(w)],
                                  cwd=ROOT, env=env) for w in range(args.procs)]
        for proc in procs:
            rc |= proc.wait(timeout=max(1, t0 + args.timeout - time.time()))
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        rc |= 2
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"gpu_warm: {args.procs} processes, {time.time() - t0:.0f} s"
          + ("" if rc == 0 else " (some failed or were stopped at the time limit)"), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
