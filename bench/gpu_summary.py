"""Summary of one bench/gpu_check.sh run: summary.md and summary.json in DIR.

    python -m bench.gpu_summary DIR

Reads DIR/gpu_bench.json (bench.gpu_bench), DIR/tests.xml (pytest's junit
report; from bench.shard_pytest, one testsuite per shard, with
DIR/tests_shards.json saying which shards did not finish and what they did not run),
DIR/env.json and DIR/steps.tsv (written by gpu_check.sh: each step's status and
seconds) and, when present, DIR/ncu.csv (DRAM bytes per kernel) and
DIR/sanitize.log. Prints the goal table last.
"""

import csv
import json
import os
import sys
import xml.etree.ElementTree as ET

GOALS = {
    "block_vs_eager": 0.5,      # fused / torchvision eager, per block, forward fp16 CL
    "block_vs_compile": 0.7,    # fused / torch.compile(max-autotune), per block
    "model_vs_compile": 1.5,    # whole-model throughput, fused / compile (at least)
    "dram_vs_io": 1.3,          # DRAM bytes / (input + output + weights)
    "train_peak": 0.4,          # training-step peak memory, fused / eager
    "train_time": 1.0,          # training-step time, fused / eager
}


def load(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def parse_tests(path):
    if not os.path.exists(path):
        return {"ran": False}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:  # a report cut short: the summary is still written
        return {"ran": False, "error": f"{path}: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root)
    out = {"ran": True, "tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            for tag in ("failure", "error"):
                node = case.find(tag)
                if node is not None:
                    msg = (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
                    out["failed"].append(f"{case.get('name')}: {msg}")
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    shards = load(os.path.join(os.path.dirname(path), "tests_shards.json"))
    if shards:
        out["shards"] = len(shards["shards"])
        out["wall_s"] = shards.get("wall_s")
        out["not_run"] = shards["totals"]["not_run"]
        out["unfinished_shards"] = [
            {"shard": r["shard"], "status": r["status"], "not_run": len(r["not_run"]), "running": r["running"],
             "log": r["log"]} for r in shards["shards"] if not r["finished"]]
    return out


def parse_steps(path):
    """[{step, status, seconds}] of gpu_check.sh's steps.tsv (name TAB status TAB seconds)."""
    steps = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 3:
                    steps.append({"step": parts[0], "status": parts[1],
                                  "seconds": int(parts[2]) if parts[2].isdigit() else None})
    return steps


def tests_headline(tests):
    if not tests.get("ran"):
        return "## Tests: not run" + (f" ({tests['error']})" if tests.get("error") else "")
    line = (f"## Tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
            f"{tests['skipped']} skipped")
    if tests.get("not_run"):
        line += f", {tests['not_run']} NOT RUN"
    if "shards" in tests:
        line += f" ({tests['shards']} shards, {tests['wall_s']:.0f} s"
        unfinished = tests.get("unfinished_shards")
        line += f"; shards not finished: {', '.join(str(u['shard']) for u in unfinished)})" if unfinished else ")"
    return line


def parse_ncu(path):
    """{kernel launch index: {metric: bytes}} rows of ncu --csv --page raw output."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    for r in csv.DictReader(lines):
        rows.append(r)
    return rows


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def summarize(d):
    bench = load(os.path.join(d, "gpu_bench.json"), {})
    env = load(os.path.join(d, "env.json"), {})
    tests = parse_tests(os.path.join(d, "tests.xml"))
    steps = parse_steps(os.path.join(d, "steps.tsv"))
    backends = bench.get("backends", [])
    lines = ["# GPU check", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- compile baseline: torch.compile(mode={bench.get('compile_mode')!r})", ""]
    if steps:
        lines += ["## Steps", "", "| step | status | seconds |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['status']} | {fmt(r['seconds'], 'd')} |" for r in steps]
        lines += [f"| total | | {sum(r['seconds'] or 0 for r in steps)} |", ""]
    lines.append(tests_headline(tests))
    if tests.get("ran"):
        for u in tests.get("unfinished_shards", []):
            lines.append(f"- shard {u['shard']} did not finish ({u['status']}): {u['not_run']} tests not run"
                         + (f", stopped in {u['running']}" if u["running"] else "") + f"; see {u['log']}")
        lines += [f"- FAILED {f}" for f in tests["failed"][:40]]
        if len(tests["failed"]) > 40:
            lines.append(f"- ... {len(tests['failed']) - 40} more")
    lines.append("")
    verdict = []

    blocks = bench.get("blocks", [])
    if blocks:
        lines += ["## Forward per block (ms, median; ratios fused / baseline)", ""]
        head = "| block | dtype | eager | compile | " + " | ".join(backends) + " | " + " | ".join(
            f"{b}/eager | {b}/compile" for b in backends) + " |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in blocks:
            cells = [r["name"], r["dtype"], fmt(r.get("eager"), ".3f"), fmt(r.get("compile"), ".3f")]
            cells += [fmt(r.get(b), ".3f") if b in r else "error" for b in backends]
            for b in backends:
                cells += [fmt(ratio(r.get(b), r.get("eager"))), fmt(ratio(r.get(b), r.get("compile")))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for b in backends:
            for dt in sorted({r["dtype"] for r in blocks}):
                rs = [r for r in blocks if r["dtype"] == dt]
                ve = [ratio(r.get(b), r.get("eager")) for r in rs]
                vc = [ratio(r.get(b), r.get("compile")) for r in rs]
                if all(v is not None for v in ve):
                    ok = sum(v <= GOALS["block_vs_eager"] for v in ve)
                    verdict.append(f"{b} {dt} blocks vs eager <= {GOALS['block_vs_eager']}: {ok}/{len(ve)} met, "
                                   f"worst {max(ve):.2f}")
                if vc and all(v is not None for v in vc):
                    ok = sum(v <= GOALS["block_vs_compile"] for v in vc)
                    verdict.append(f"{b} {dt} blocks vs compile <= {GOALS['block_vs_compile']}: {ok}/{len(vc)} "
                                   f"met, worst {max(vc):.2f}")
        if "cuda" in backends and "triton" in backends:
            rs = [r for r in blocks if r.get("cuda") and r.get("triton")]
            wins = sum(r["cuda"] <= r["triton"] for r in rs)
            verdict.append(f"cuda no slower than triton: {wins}/{len(rs)} block runs")
        for r in blocks:
            for b in backends:
                if f"{b}_error" in r:
                    lines.append(f"- {r['name']} {r['dtype']} {b}: {r[f'{b}_error']}")

    for r in bench.get("model", []):
        lines += [f"## Whole model forward, {r['dtype']}, batch {r['batch']}", ""]
        for k in ("eager", "compile", *backends):
            if k in r:
                ips = r["batch"] / r[k] * 1e3
                peak = r.get(f"{k}_peak_bytes")
                lines.append(f"- {k}: {r[k]:.2f} ms ({ips:.0f} images/s)"
                             + (f", inference peak above weights+input {peak / 2**20:.0f} MiB" if peak else ""))
            elif f"{k}_error" in r:
                lines.append(f"- {k}: ERROR {r[f'{k}_error']}")
        for b in backends:
            s = ratio(r.get("compile"), r.get(b))
            if s is not None:
                verdict.append(f"{b} {r['dtype']} model throughput vs compile >= {GOALS['model_vs_compile']}: "
                               f"{s:.2f}x {'met' if s >= GOALS['model_vs_compile'] else 'MISSED'}")
            s = ratio(r.get("eager"), r.get(b))
            if s is not None:
                verdict.append(f"{b} {r['dtype']} model throughput vs eager: {s:.2f}x")
        lines.append("")

    for r in bench.get("train", []):
        lines += [f"## Training step, {r['dtype']}, batch {r['batch']}", ""]
        for k in ("eager", *backends):
            if k in r:
                peak = r.get(f"{k}_peak_bytes")
                lines.append(f"- {k}: {r[k]:.2f} ms" + (f", peak {peak / 2**20:.0f} MiB" if peak else ""))
            elif f"{k}_error" in r:
                lines.append(f"- {k}: ERROR {r[f'{k}_error']}")
        for b in backends:
            t = ratio(r.get(b), r.get("eager"))
            m = ratio(r.get(f"{b}_peak_bytes"), r.get("eager_peak_bytes"))
            if t is not None:
                verdict.append(f"{b} train step time vs eager <= {GOALS['train_time']}: {t:.2f} "
                               f"{'met' if t <= GOALS['train_time'] else 'MISSED'}")
            if m is not None:
                verdict.append(f"{b} train step peak vs eager <= {GOALS['train_peak']}: {m:.2f} "
                               f"{'met' if m <= GOALS['train_peak'] else 'MISSED'}")
        lines.append("")

    dram = load(os.path.join(d, "dram.json"))
    if dram:
        lines += ["## DRAM bytes per block (ncu), forward", "",
                  "| block | backend | read+write MB | io MB | ratio |", "|---|---|---|---|---|"]
        for r in dram:
            lines.append(f"| {r['block']} | {r['backend']} | {r['bytes'] / 1e6:.1f} | {r['io_bytes'] / 1e6:.1f} | "
                         f"{r['bytes'] / r['io_bytes']:.2f} |")
        for b in sorted({r["backend"] for r in dram}):
            rs = [r["bytes"] / r["io_bytes"] for r in dram if r["backend"] == b]
            verdict.append(f"{b} DRAM/io <= {GOALS['dram_vs_io']}: {sum(v <= GOALS['dram_vs_io'] for v in rs)}/"
                           f"{len(rs)} met, worst {max(rs):.2f}")
        lines.append("")
    san = os.path.join(d, "sanitize.log")
    if os.path.exists(san):
        with open(san) as f:
            tail = [line.rstrip() for line in f if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
        lines += ["## compute-sanitizer", ""] + [f"- {t}" for t in tail] + [""]
    mem = os.path.join(d, "memory", "memory.md")
    if os.path.exists(mem):
        # the memory report on CUDA (python -m bench.memory_report --device cuda)
        with open(mem) as f:
            text = f.read().split("\n")
        goals = [line for line in text[text.index("## Goals (memory)") + 1:] if line.startswith(("-", " "))] \
            if "## Goals (memory)" in text else []
        lines += ["## Memory report (CUDA, fp32; full table in memory/memory.md)", ""] + goals + [""]
        verdict += [g[2:] for g in goals if g.startswith("- ")]
    lines += ["## Goals", ""] + [f"- {v}" for v in verdict]
    summary = {"env": env, "steps": steps, "tests": tests, "bench": bench, "verdict": verdict}
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(d, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    d = argv[0] if argv else os.environ.get("OUT", "bench/results")
    lines = summarize(d)
    # the short table last: tests and goals
    start = next((i for i, line in enumerate(lines) if line.startswith("## Tests")), 0)
    print("\n".join(lines[start:start + 1] + lines[lines.index("## Goals"):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
