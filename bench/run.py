"""`make bench`: the pytest-benchmark suite, its ratio summary, and the memory report.

    python -m bench.run [--quick] [pytest-benchmark options...]

Writes under bench/results/<machine>/:
    benchmark.json   pytest-benchmark's raw results
    benchmark.md     ratios against torchvision channels_last, from the same run
    memory.md/.json  the memory report (python -m mnv2_kernels.memory_report)
"""

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from mnv2_kernels.memory_report import machine_info, machine_slug

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "torchvision-cl"
COLUMNS = ["torchvision-nchw", "torchvision-cl", "reference-cl", "fused-cl", "fused-nchw"]


def summarize(bench_json: dict, machine: dict) -> str:
    groups = defaultdict(dict)
    flops = {}
    for b in bench_json["benchmarks"]:
        impl = b["extra_info"]["impl"]
        groups[b["group"]][impl] = b["stats"]["median"]
        flops[b["group"]] = b["extra_info"]["flops"]
    lines = [
        "# CPU benchmark: fused inverted residual vs torchvision (fp32)",
        "",
        f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
        f"fused kernels: {machine['cpu_isa']}.",
        "",
        "Median time per call (ms) from one pytest-benchmark run; ratios are implementation / "
        f"{BASELINE} (below 1 is faster). Forward runs in inference mode (eval, no_grad); the "
        "train step is forward + backward in train mode. GFLOP/s counts the block's "
        "multiply-adds x2 (train step: x3 of the forward).",
        "",
    ]
    sections = defaultdict(list)
    for group in groups:
        kind, batch, name = group.split(" ", 2)
        sections[(kind, batch)].append((name, group))
    wins = {}
    for (kind, batch), entries in sorted(sections.items(), key=lambda kv: (kv[0][0] != "forward", kv[0][1])):
        impls = [c for c in COLUMNS if any(c in groups[g] for _, g in entries)]
        lines += [f"## {kind}, batch {batch[1:]}", "",
                  "| case | " + " | ".join(f"{i} ms" for i in impls) + " | "
                  + " | ".join(f"{i} / {BASELINE}" for i in impls if i != BASELINE)
                  + " | fused-cl GFLOP/s |",
                  "|---|" + "---:|" * (2 * len(impls))]
        for name, group in sorted(entries):
            times = groups[group]
            base = times.get(BASELINE)
            cells = [f"{times[i] * 1e3:.3f}" if i in times else "" for i in impls]
            ratios = [f"{times[i] / base:.2f}" if i in times and base else ""
                      for i in impls if i != BASELINE]
            fused = times.get("fused-cl")
            gflops = f"{flops[group] / fused / 1e9:.1f}" if fused else ""
            lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + f" | {gflops} |")
            if fused and base:
                wins[(kind, batch, name)] = fused / base
        lines.append("")
    fwd_b1 = {k: v for k, v in wins.items() if k[0] == "forward" and k[1] == "b1" and k[2].startswith("block")}
    if fwd_b1:
        slower = [k[2] for k, v in fwd_b1.items() if v >= 1.0]
        lines += ["## Verdict", "",
                  f"Forward at batch 1, fused-cl / torchvision-cl over the {len(fwd_b1)} blocks: "
                  f"best {min(fwd_b1.values()):.2f}, worst {max(fwd_b1.values()):.2f}; "
                  + ("faster on every block." if not slower else f"NOT faster on: {', '.join(slower)}."), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke run, not for figures)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory report")
    args, extra = parser.parse_known_args(argv)
    machine = machine_info()
    out = os.path.join(ROOT, "bench", "results", machine_slug(machine))
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "benchmark.json")
    timing = (["--benchmark-min-rounds=1", "--benchmark-max-time=0.01", "--benchmark-warmup=off"]
              if args.quick else
              ["--benchmark-min-rounds=7", "--benchmark-max-time=0.5", "--benchmark-warmup=on",
               "--benchmark-warmup-iterations=2"])
    rc = pytest.main([os.path.join(ROOT, "bench", "test_bench_cpu.py"), "-q", "-p", "no:cacheprovider",
                      f"--benchmark-json={json_path}", "--benchmark-disable-gc",
                      "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name", *timing, *extra])
    if rc != 0:
        raise SystemExit(f"benchmark suite failed (pytest exit code {rc})")
    with open(json_path) as f:
        summary = summarize(json.load(f), machine)
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write(summary)
    print(summary)
    print(f"written to {os.path.relpath(out, ROOT)}/benchmark.md and benchmark.json")
    if not args.no_memory:
        subprocess.run([sys.executable, "-m", "mnv2_kernels.memory_report", "--out", out], check=True)


if __name__ == "__main__":
    main()
