"""`make bench`: the pytest-benchmark suite, its ratio summary, and the memory report.

    python -m bench.run [--quick] [pytest-benchmark options...]

Writes under bench/results/<machine>/:
    benchmark.json   pytest-benchmark's raw results (several MB; not committed)
    summary.json     the compact record of the run: machine, and per case each implementation's
                     best and median time, rounds, FLOPs and the fused / peer ratios
    benchmark.md     ratios of the fused block to torchvision, torch.compile, ONNX Runtime and
                     OpenVINO from the same run, GFLOP/s and the fraction of the measured FMA peak
    model_paired.md  the whole model against its peers in interleaved rounds (python -m bench.paired_model)
    profile_b1.md    the whole model at batch 1 layer by layer (python -m bench.profile_model)
    cpu_plan.md      this machine's caches, the GEMM register tile and each block's plan (the
                     CPU kernel's tiles at batch 1, 8 and 32)
    memory.md/.json  the memory report (python -m bench.memory_report)
    applications.md SSDLite and Mobile DeepLabv3 on fused blocks against torchvision's: training
                     peak memory and time, batch-1 inference, the largest DeepLab batch within
                     4 GB (python -m bench.applications)
    family.md/.json  torchvision's MNASNet 1.0 and timm's EfficientNet-Lite0 converted: the whole
                     model against its peers in paired rounds (batch 1 and 8), EfficientNet-Lite0's
                     5x5 blocks against the FMA peak, training-step peak memory (python -m bench.family)
"""

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from bench.machine import machine_info, machine_slug

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSED = "fused-cl"
PEERS = ["torchvision-cl", "torchvision-ckpt-cl", "torch-compile", "onnxruntime", "openvino"]
ALL = ["torchvision-nchw", "torchvision-cl", "torchvision-ckpt-cl", "reference-cl", "fused-cl", "fused-nchw",
       "torch-compile", "onnxruntime", "openvino"]


def measure_fma_peak(threads: int):
    """GFLOP/s of the FMA loop in build/cmake/fma_peak (built by the core's CMake), or None."""
    tool = os.path.join(ROOT, "build", "cmake", "fma_peak")
    if not os.path.exists(tool):
        return None
    out = subprocess.run([tool, str(threads)], capture_output=True, text=True)
    for token in out.stdout.split("fma_peak_gflops")[1:]:
        return float(token.split()[0])
    return None


def _table(entries, groups, flops, peak):
    present = [p for p in PEERS if any(p in groups[g] for _, g in entries)]
    head = ["case", f"{FUSED} ms"] + [f"{p} ms" for p in present] + [f"{FUSED} / {p}" for p in present]
    head += [f"{FUSED} GFLOP/s"] + (["% of FMA peak"] if peak else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    ratios = {}
    for name, group in sorted(entries):
        t = groups[group]
        fused = t.get(FUSED)
        cells = [f"{fused * 1e3:.3f}" if fused else ""] + [f"{t[p] * 1e3:.3f}" if p in t else "" for p in present]
        for p in present:
            r = fused / t[p] if fused and p in t else None
            ratios[(name, p)] = r
            cells.append(f"{r:.2f}" if r else "")
        gflops = flops[group] / fused / 1e9 if fused else None
        cells.append(f"{gflops:.1f}" if gflops else "")
        if peak:
            cells.append(f"{100 * gflops / peak:.0f}%" if gflops else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines, ratios


def _raw_table(entries, groups):
    present = [i for i in ALL if any(i in groups[g] for _, g in entries)]
    lines = ["| case | " + " | ".join(f"{i} ms" for i in present) + " |", "|---|" + "---:|" * len(present)]
    for name, group in sorted(entries):
        lines.append(f"| {name} | " + " | ".join(
            f"{groups[group][i] * 1e3:.3f}" if i in groups[group] else "" for i in present) + " |")
    return lines


def _verdict(ratios_by_section):
    """The performance goals, checked against this run."""
    lines = ["## Goals", ""]

    def check(label, items, bound):
        items = [(k, v) for k, v in items if v is not None]
        if not items:
            return
        misses = [f"{k} ({v:.2f})" for k, v in items if v > bound]
        worst = max(v for _, v in items)
        lines.append(f"- {label} <= {bound}: worst {worst:.2f} -> "
                     + ("met" if not misses else "missed by " + ", ".join(misses)))

    for batch in ("b1", "b8"):
        r = ratios_by_section.get(("forward", batch), {})
        blocks = lambda peer: [(n.split()[0], v) for (n, p), v in r.items() if p == peer and n.startswith("block")]  # noqa: E731
        model = lambda peer: [("model", v) for (n, p), v in r.items() if p == peer and n.startswith("model")]  # noqa: E731
        if batch == "b1":
            check(f"forward {batch}: every block, fused / torchvision-cl", blocks("torchvision-cl"), 1.0)
        check(f"forward {batch}: every block, fused / onnxruntime", blocks("onnxruntime"), 1.0)
        check(f"forward {batch}: whole model, fused / onnxruntime", model("onnxruntime"), 1.0)
        check(f"forward {batch}: whole model, fused / openvino", model("openvino"), 1.0)
        check(f"forward {batch}: whole model, fused / torch-compile", model("torch-compile"), 0.5)
        check(f"forward {batch}: whole model, fused / torchvision-cl", model("torchvision-cl"), 0.25)
    for (kind, batch), r in ratios_by_section.items():
        if kind != "train-step":
            continue
        model = lambda peer: [("model", v) for (n, p), v in r.items() if p == peer and n.startswith("model")]  # noqa: E731
        check(f"train step {batch}: whole model, fused / torchvision-cl", model("torchvision-cl"), 1.3)
        check(f"train step {batch}: whole model, fused / torchvision-ckpt-cl", model("torchvision-ckpt-cl"), 1.0)
    return lines + [""]


def compact_summary(bench_json: dict, machine: dict) -> dict:
    """The run's record without pytest-benchmark's raw samples: per case (group), each
    implementation's best and median time (s) and rounds, the FLOPs, and the ratios of the
    fused implementation to each other, from the best times as in benchmark.md."""
    cases = defaultdict(lambda: {"impls": {}})
    for b in bench_json["benchmarks"]:
        case = cases[b["group"]]
        case["flops"] = b["extra_info"]["flops"]
        case["impls"][b["extra_info"]["impl"]] = {
            "min": b["stats"]["min"], "median": b["stats"]["median"], "rounds": b["stats"]["rounds"]}
    for case in cases.values():
        fused = case["impls"].get(FUSED)
        if fused:
            case["fused_over"] = {name: fused["min"] / t["min"] for name, t in case["impls"].items()
                                  if name != FUSED and t["min"] > 0}
    return {"machine": machine, "fused": FUSED, "cases": dict(sorted(cases.items()))}


def summarize(bench_json: dict, machine: dict) -> str:
    groups = defaultdict(dict)
    flops = {}
    for b in bench_json["benchmarks"]:
        # the best of the rounds: background load on a shared machine only ever adds time
        groups[b["group"]][b["extra_info"]["impl"]] = b["stats"]["min"]
        flops[b["group"]] = b["extra_info"]["flops"]
    peak = machine.get("fma_peak_gflops")
    lines = [
        "# CPU benchmark: fused inverted residual vs torchvision and peers (fp32)",
        "",
        f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
        f"fused kernels: {machine['cpu_isa']}, measured FMA peak: "
        + (f"{peak:.1f} GFLOP/s" if peak else "not measured") + ".",
        "",
        "Best time per call (ms, the minimum over the rounds of one pytest-benchmark run: "
        "background load on a shared machine only adds time; summary.json has the medians). "
        "Ratios are fused (channels_last) / "
        "peer: below 1 is faster. Forward runs in inference mode (eval, no_grad); ONNX Runtime and "
        "OpenVINO run the torchvision module exported to ONNX with the same thread count; "
        "torch-compile is Inductor's default mode on the channels_last torchvision module. The "
        "train step is forward, loss, backward and an SGD (momentum) update in train mode; "
        "torchvision-ckpt-cl wraps every block in torch.utils.checkpoint. GFLOP/s counts multiply-adds x2 "
        "(train step: x3 of the forward).",
        "",
    ]
    sections = defaultdict(list)
    for group in groups:
        kind, batch, name = group.split(" ", 2)
        sections[(kind, batch)].append((name, group))
    ratios_by_section = {}
    order = sorted(sections, key=lambda k: (k[0] != "forward", k[1]))
    for key in order:
        kind, batch = key
        table, ratios = _table(sections[key], groups, flops, peak)
        ratios_by_section[key] = ratios
        lines += [f"## {kind}, batch {batch[1:]}", ""] + table + [""]
    lines += _verdict(ratios_by_section)
    for key in order:
        lines += [f"## all implementations, {key[0]}, batch {key[1][1:]} (ms)", ""]
        lines += _raw_table(sections[key], groups) + [""]
    return "\n".join(lines)


def cpu_plan_markdown() -> str:
    """This machine's caches and register tile, and the CPU kernel's forward plan for each
    block of MobileNetV2 at 224 x 224, batch 1, 8 and 32, with this process's threads."""
    import torch

    import mnv2_kernels

    info = mnv2_kernels.build_info()
    c = info["cpu_caches"]
    threads = torch.get_num_threads()
    lines = ["## CPU kernel plan", "",
             f"ISA {mnv2_kernels.cpu_isa()}, {threads} threads; caches per core: L1d {c['l1d'] // 1024} KiB, "
             f"L2 {c['l2'] // 1024} KiB, L3 {c['l3_per_core'] // 1024} KiB ({c['source']}); forward working-set "
             f"budget {info['cpu_forward_cache_budget_bytes'] // 1024} KiB; GEMM register tile "
             f"{info['cpu_gemm_tile']}.", ""]
    model = mnv2_kernels.mobilenet_v2().eval()
    for batch in (1, 8, 32):
        lines += [f"### batch {batch}", "",
                  "| block | shape | bands x rows | col tiles x cols | hidden splits x channels | chunk | "
                  "rows per step | scratch KiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for p in mnv2_kernels.cpu_plans(model, (batch, 3, 224, 224), threads=threads):
            lines.append(f"| {p['block']} | {p['shape']} | {p['bands']} x {p['rows_per_band']} | "
                         f"{p['col_tiles']} x {p['cols_per_tile']} | {p['hidden_splits']} x {p['split_channels']} | "
                         f"{p['hidden_chunk']} | {p['rows_per_step']} | {p['scratch_bytes'] / 1024:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke run, not for figures)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory report")
    args, extra = parser.parse_known_args(argv)
    machine = machine_info()
    # measured before and after the suite; the larger counts (a busy core halves one reading)
    peak_before = measure_fma_peak(machine["threads"])
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
    peak_after = measure_fma_peak(machine["threads"])
    readings = [p for p in (peak_before, peak_after) if p]
    machine["fma_peak_gflops"] = max(readings) if readings else None
    print(f"FMA peak readings (GFLOP/s, before and after the suite): {peak_before}, {peak_after}")
    with open(json_path) as f:
        raw = json.load(f)
    summary = summarize(raw, machine)
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write(summary)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(compact_summary(raw, machine), f, indent=1)
    print(summary)
    print(f"written to {os.path.relpath(out, ROOT)}/benchmark.md, summary.json and benchmark.json (raw)")
    plan = cpu_plan_markdown()
    with open(os.path.join(out, "cpu_plan.md"), "w") as f:
        f.write(plan)
    print(plan)
    if not args.quick:
        # the whole model against its peers in interleaved rounds (robust to load that comes
        # and goes), then where its batch-1 time goes, layer by layer
        paired = subprocess.run([sys.executable, "-m", "bench.paired_model"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        with open(os.path.join(out, "model_paired.md"), "w") as f:
            f.write(paired)
        print(paired)
        profile = subprocess.run([sys.executable, "-m", "bench.profile_model", "--batch", "1"], cwd=ROOT,
                                 check=True, capture_output=True, text=True).stdout
        with open(os.path.join(out, "profile_b1.md"), "w") as f:
            f.write(profile)
        print(profile)
    if not args.no_memory:
        subprocess.run([sys.executable, "-m", "bench.memory_report", "--out", out], check=True)
    if not args.quick:
        subprocess.run([sys.executable, "-m", "bench.applications", "--write"], cwd=ROOT, check=True)
        # other families on the fused block: MNASNet and EfficientNet-Lite (timm's: reported as
        # not available when timm is not installed)
        subprocess.run([sys.executable, "-m", "bench.family", "--write", "--out", out, "--rounds", "11"], cwd=ROOT,
                       check=True)


if __name__ == "__main__":
    main()
