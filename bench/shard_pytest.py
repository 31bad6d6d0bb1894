"""pytest in K concurrent processes without pytest-xdist (bench/gpu_check.sh's test step).

    python -m bench.shard_pytest --out DIR [--shards K] [--timeout S] PATH... [-- PYTEST_ARGS...]

Collects the test ids of PATH (pytest --collect-only), splits them into K shards
and runs one pytest process per shard at the same time (on a GPU machine all of
them share the one GPU). The tests of the Triton backend are dominated by Triton's
JIT compiles, which run on the CPU, so K processes compile K kernels at once;
Triton's on-disk cache is shared, so a kernel one shard compiled is loaded, not
compiled again, by a shard that needs it later. Tests that compile the same kernels
(the same block shape, dtype and backend, whatever the test function or memory
layout) go to the same shard, so that two shards rarely compile one kernel at once.

Writes to DIR:
  tests-shard{i}.log / .xml   each shard's pytest output and its junit report
  tests-shard{i}.jsonl        each test's result as it is reported (this module,
                              loaded into the shard as a pytest plugin): it survives
                              a shard that is killed or crashes, which loses its .xml
  tests.xml                   all shards merged into one junit report (one testsuite
                              per shard), as bench/gpu_summary.py reads it
  tests_shards.json           per shard: status, seconds, counts, the tests it did not
                              run and the test it was running when it was stopped
  tests.log                   the merged report (its last line: the totals)

--timeout bounds the whole run, collection and merge included: at the deadline the
shards still running get SIGINT (pytest then stops and writes its report), SIGKILL
--grace seconds later. SIGTERM to this process does the same at once, then merges.
Exit status: 0 all passed, 1 failures or errors, 2 a shard did not finish, 3 no tests.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

RESULTS_ENV = "MNV2_SHARD_RESULTS"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ the plugin side
# Loaded into each shard with -p bench.shard_pytest; active only where RESULTS_ENV is set.
def _record(entry):
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _record({"nodeid": nodeid, "event": "start"})


def pytest_runtest_logfinish(nodeid, location):
    _record({"nodeid": nodeid, "event": "finish"})


def pytest_runtest_logreport(report):
    # one record per call, and per setup or teardown that did not pass
    if not os.environ.get(RESULTS_ENV) or (report.when != "call" and report.passed):
        return
    if report.skipped:
        outcome = "skipped"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    else:
        outcome = "passed"
    message = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        text = str(report.longrepr).strip().splitlines()
        message = crash.message if crash is not None else (text[-1] if text else "")
    _record({"nodeid": report.nodeid, "event": report.when, "outcome": outcome,
             "duration": round(report.duration, 3), "message": message[:500],
             "text": report.longreprtext[-4000:] if report.failed else ""})


# ------------------------------------------------------------------ sharding
SHAPE = re.compile(r"\d+-\d+-s\d+-t\d+-\d+x\d+(?:_\d+)?")
LAYOUTS = {"cl", "nchw"}
# test functions whose names say they cost more: a whole model (every block shape's
# kernels), torch.compile or opcheck's compiled paths (extra seconds per test)
HEAVY = (("model", 3.0), ("compile", 2.0), ("opcheck", 1.0))


def group_key(nodeid):
    """Tests likely to compile the same Triton kernels share a key: those of one block
    shape (tests/conftest.py's block_id; pytest's _0/_1 suffixes of repeated shapes
    dropped), backend and dtype across test functions, the rest per test function
    and parameters; the memory layout (cl / nchw) never separates two tests."""
    func, _, params = nodeid.partition("[")
    params = params[:-1] if params.endswith("]") else params
    shape = SHAPE.search(params)
    if shape:
        params = params[:shape.start()] + params[shape.end():]
        shape = shape.group(0).split("_")[0]
    tokens = tuple(t for t in params.split("-") if t and t not in LAYOUTS)
    return ("shape", shape) + tokens if shape else (func,) + tokens


def weight(ids):
    """A rough cost of a group: a compile set (about 1-2 s) unless every test in it runs
    the precompiled CUDA backend, a little per test, more for the HEAVY ones."""
    compiles = any("cuda" not in re.split(r"[\[\]-]", i) for i in ids)
    heavy = sum(w for i in ids for name, w in HEAVY if name in i.partition("[")[0].rpartition("::")[2])
    return (1.0 if compiles else 0.0) + 0.2 * len(ids) + heavy


def split(ids, k):
    """k lists of test ids: whole groups, the heaviest first to the least loaded shard
    (each list in collection order)."""
    groups = {}
    for i in ids:
        groups.setdefault(group_key(i), []).append(i)
    order = {i: n for n, i in enumerate(ids)}
    shards, loads = [[] for _ in range(k)], [0.0] * k
    for g in sorted(groups.values(), key=lambda g: (-weight(g), order[g[0]])):
        j = loads.index(min(loads))
        shards[j] += g
        loads[j] += weight(g)
    return [sorted(s, key=order.get) for s in shards if s]


def collect(paths, extra, env, timeout):
    """The test ids pytest collects from paths (None when collection fails)."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           "-p", "no:warnings", *extra, *paths]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "collection timed out"
    ids = list(dict.fromkeys(line.strip() for line in r.stdout.splitlines()
                             if "::" in line and not line.startswith(" ")))
    if r.returncode != 0 or not ids:
        return None, (r.stdout + r.stderr).strip()[-2000:]
    return ids, ""


# ------------------------------------------------------------------ running
class _Stop(Exception):
    """SIGTERM or SIGINT to this process."""


def _on_signal(signum, frame):
    raise _Stop(signal.Signals(signum).name)


class Shard:
    def __init__(self, index, ids, out, fallback=False):
        self.index, self.ids, self.fallback = index, ids, fallback  # fallback: ids are the paths
        base = os.path.join(out, f"tests-shard{index}")
        self.log, self.xml, self.jsonl = base + ".log", base + ".xml", base + ".jsonl"
        self.proc = self.rc = self.stopped = self.start = self.seconds = None

    def launch(self, extra, env):
        for path in (self.xml, self.jsonl):
            if os.path.exists(path):
                os.remove(path)
        with open(self.log[:-4] + ".ids", "w") as f:
            f.write("\n".join(self.ids) + "\n")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.shard_pytest",
               f"--junitxml={os.path.abspath(self.xml)}", *extra, *self.ids]
        env = dict(env, **{RESULTS_ENV: os.path.abspath(self.jsonl)})
        self.start = time.time()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)

    def poll(self):
        if self.rc is None and self.proc is not None:
            rc = self.proc.poll()
            if rc is not None:
                self.rc, self.seconds = rc, time.time() - self.start
                self._kill_group()  # leftovers, e.g. Inductor's compile workers
                print(f"shard {self.index}: rc {rc} after {self.seconds:.0f} s", flush=True)
        return self.rc

    def interrupt(self, why):
        """SIGINT: pytest stops after the running test and still writes its report."""
        if self.poll() is None:
            self.stopped = why
            try:
                os.kill(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def kill(self):
        if self.poll() is None:
            self.stopped = (self.stopped or "stopped") + ", killed after the grace period"
            self._kill_group()
            self.proc.wait()
            self.poll()

    def _kill_group(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop(shards, why, grace):
    for s in shards:
        s.interrupt(why)
    end = time.time() + grace
    while any(s.poll() is None for s in shards) and time.time() < end:
        time.sleep(0.2)
    for s in shards:
        s.kill()


def run_shards(shards, extra, env, deadline, grace, cap_text):
    """Every shard at once, until all end or the deadline passes (or a signal comes)."""
    try:
        for s in shards:
            s.launch(extra, env)
        while any(s.poll() is None for s in shards) and time.time() < deadline:
            time.sleep(0.5)
        why = f"interrupted at the {cap_text} cap"
    except _Stop as exc:
        why, grace = f"interrupted ({exc})", min(grace, 5)
    stop(shards, why, grace)


# ------------------------------------------------------------------ merging
RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


def read_jsonl(path):
    """{nodeid: result} (the worst of its setup, call and teardown), and the test that
    started and never finished: the one running when the shard stopped."""
    results, running = {}, None
    if not os.path.exists(path):
        return results, running
    with open(path) as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if e["event"] in ("start", "finish"):
                running = e["nodeid"] if e["event"] == "start" else None
                continue
            prev = results.get(e["nodeid"])
            if prev is None or RANK[e["outcome"]] >= RANK[prev["outcome"]]:
                if prev is not None:
                    e["duration"] += prev["duration"]
                results[e["nodeid"]] = e
    return results, running


def read_junit(path):
    """{nodeid: result} from a pytest junit file (only where the jsonl is missing)."""
    results = {}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return results
    for case in root.iter("testcase"):
        nodeid = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        outcome, message = "passed", ""
        for tag, name in (("skipped", "skipped"), ("failure", "failed"), ("error", "error")):
            node = case.find(tag)
            if node is not None:
                outcome, message = name, node.get("message") or ""
        results[nodeid] = {"nodeid": nodeid, "outcome": outcome, "message": message,
                           "duration": float(case.get("time") or 0), "text": ""}
    return results


def shard_status(s):
    if s.stopped:
        return s.stopped
    if s.rc in (0, 1, 5):
        return "finished"
    if s.rc is None:
        return "never started"
    if s.rc < 0:
        return f"crashed (signal {-s.rc})"
    return f"ended with rc {s.rc} ({'usage error' if s.rc == 4 else 'pytest error'})"


def merge(shards, out, wall):
    """tests.xml (one testsuite per shard) and tests_shards.json; returns the report."""
    suites = ET.Element("testsuites", name="sharded pytest")
    totals = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "not_run": 0}
    report = {"shards": [], "collected": 0, "wall_s": round(wall, 1), "totals": totals, "failures": []}
    for s in shards:
        results, running = read_jsonl(s.jsonl)
        if not results and os.path.exists(s.xml):
            results = read_junit(s.xml)
        status = shard_status(s)
        finished = s.stopped is None and s.rc in (0, 1, 5)
        if running is not None:
            results[running] = {"nodeid": running, "outcome": "error", "duration": 0.0, "text": "",
                                "message": f"did not finish: shard {s.index} {status} while this test ran"}
        ids = list(dict.fromkeys(([] if s.fallback else s.ids) + list(results)))
        not_run = [] if s.fallback else [i for i in s.ids if i not in results]
        report["collected"] += len(ids)
        counts = dict.fromkeys(RANK, 0)
        suite = ET.SubElement(suites, "testsuite", name=f"shard{s.index}")
        for nodeid in ids:
            r = results.get(nodeid)
            if r is None:
                continue
            counts[r["outcome"]] += 1
            path, _, name = nodeid.partition("::")
            case = ET.SubElement(suite, "testcase", classname=path.removesuffix(".py").replace("/", "."),
                                 name=name, time=f"{r['duration']:.3f}")
            if r["outcome"] != "passed":
                tag = {"skipped": "skipped", "failed": "failure", "error": "error"}[r["outcome"]]
                ET.SubElement(case, tag, message=r.get("message", "")).text = r.get("text", "")
            if r["outcome"] in ("failed", "error"):
                message = (r.get("message") or "").strip().splitlines()
                report["failures"].append(f"{name}: {message[0][:200] if message else ''}")
        for k, v in (("tests", sum(counts.values())), ("failures", counts["failed"]),
                     ("errors", counts["error"]), ("skipped", counts["skipped"]), ("time", s.seconds or 0)):
            suite.set(k, str(round(v, 1)))
        report["shards"].append({
            "shard": s.index, "finished": finished, "status": status, "rc": s.rc,
            "seconds": round(s.seconds or 0, 1), "tests": len(ids), "passed": counts["passed"],
            "failed": counts["failed"], "errors": counts["error"], "skipped": counts["skipped"],
            "not_run": not_run, "running": running, "log": os.path.basename(s.log)})
        for k, v in (("passed", "passed"), ("failed", "failed"), ("errors", "error"), ("skipped", "skipped")):
            totals[k] += counts[v]
        totals["not_run"] += len(not_run)
    report["unfinished"] = [r["shard"] for r in report["shards"] if not r["finished"]]
    ET.indent(suites)
    path = os.path.join(out, "tests.xml")
    ET.ElementTree(suites).write(path + ".tmp", encoding="utf-8", xml_declaration=True)
    os.replace(path + ".tmp", path)
    with open(os.path.join(out, "tests_shards.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def report_lines(report):
    lines = [f"sharded pytest: {len(report['shards'])} shards, {report['collected']} tests, "
             f"{report['wall_s']:.0f} s"]
    for r in report["shards"]:
        line = (f"shard {r['shard']}: {r['status']}, {r['seconds']:.0f} s: {r['passed']} passed, "
                f"{r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped")
        if r["not_run"]:
            line += f", {len(r['not_run'])} of {r['tests']} NOT RUN"
        if r["running"]:
            line += f"; running when it stopped: {r['running']}"
        lines.append(line + f" ({r['log']})")
    lines += [f"FAILED {f}" for f in report["failures"]]
    t, unfinished = report["totals"], report["unfinished"]
    lines.append(f"== {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped, "
                 f"{t['not_run']} not run in {report['wall_s']:.0f} s"
                 + (f" (shards not finished: {', '.join(map(str, unfinished))})" if unfinished else "") + " ==")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--timeout", type=float, default=240, help="seconds for the whole run, the merge included")
    p.add_argument("--grace", type=float, default=15, help="seconds between SIGINT and SIGKILL")
    args = p.parse_args(argv)
    # the shards run in the repository root, where pytest's node ids are relative to
    paths = []
    for arg in args.paths:
        path, sep, rest = arg.partition("::")
        paths.append(os.path.relpath(os.path.abspath(path), ROOT) + sep + rest)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    k = max(1, args.shards)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # K processes share the CPUs: torch's intra-op threads and Inductor's compile
    # workers split them instead of each taking all
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // k)))
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    shards = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        ids, why = collect(paths, extra, env, timeout=max(10, args.timeout / 3))
        if ids is None:
            # one unsharded run, which reports the collection error itself
            print(f"shard_pytest: collection failed, one unsharded run:\n{why}", flush=True)
            shards = [Shard(0, paths, args.out, fallback=True)]
        else:
            shards = [Shard(i, s, args.out) for i, s in enumerate(split(ids, k))]
            print(f"shard_pytest: {len(ids)} tests in {len(shards)} shards "
                  f"({', '.join(str(len(s.ids)) for s in shards)}), collected in {time.time() - t0:.0f} s",
                  flush=True)
        run_shards(shards, extra, env, t0 + args.timeout - args.grace - 3, args.grace, f"{args.timeout:.0f} s")
    except _Stop as exc:
        stop(shards, f"interrupted ({exc})", 5)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    report = merge(shards, args.out, time.time() - t0)
    lines = report_lines(report)
    with open(os.path.join(args.out, "tests.log"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    if report["collected"] == 0:
        return 3
    if report["unfinished"]:
        return 2
    return 1 if report["totals"]["failed"] or report["totals"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
