#!/usr/bin/env bash
# The GPU check: builds the extension against this machine's torch, runs the
# GPU tests, the GPU benchmarks and the memory comparison, and writes summary.md and summary.json
# to $OUT (default bench/results/gpu-latest). The short goal table is printed last.
#
#   bench/gpu_check.sh [--dry-run] [--no-build] [--no-tests] [--no-bench]
#                      [--compile-mode MODE] [--ncu] [--sanitize] [--blocks 1,2,...]
#
# --dry-run (or no GPU): the same steps on the CPU with tiny sizes, the Triton
# kernels under TRITON_INTERPRET=1, so this script is never first run on a GPU.
# Each step has its own time limit, cut to what is left of GPU_CHECK_BUDGET (540 s), so
# the summary is written even when one hangs.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0; BUILD=1; TESTS=1; BENCH=1; NCU=0; SANITIZE=0; COMPILE_MODE=max-autotune; BLOCKS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-build) BUILD=0 ;;
    --no-tests) TESTS=0 ;;
    --no-bench) BENCH=0 ;;
    --ncu) NCU=1 ;;
    --sanitize) SANITIZE=1 ;;
    --compile-mode) COMPILE_MODE=$2; shift ;;
    --blocks) BLOCKS=$2; shift ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -x .venv/bin/python ] && [ $DRY = 1 ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  [ $DRY = 0 ] && echo "gpu_check: no CUDA GPU here: dry run on the CPU"
  DRY=1
fi
# One default Triton config per kernel unless asked: autotuning compiles every config
# for every block shape, minutes of a short GPU lease.
export MNV2_TRITON_AUTOTUNE=${MNV2_TRITON_AUTOTUNE:-0}
# Every step writes to a work folder; on exit (also after a failed step) the summary,
# the log and one tarball of everything go to $OUT, because the GPU lease brings back
# at most 8 files.
DEST=${OUT:-bench/results/gpu-latest}
OUT=build/gpu-check-work
rm -rf "$OUT"
mkdir -p "$OUT" "$DEST"
finish() {
  [ -f "$OUT/summary.md" ] || timeout 60 $PY -m bench.gpu_summary "$OUT" >/dev/null 2>&1
  cp -f "$OUT"/summary.md "$OUT"/summary.json "$OUT"/check.log "$DEST"/ 2>/dev/null
  tar -czf "$DEST/gpu_check.tar.gz" -C "$OUT" . 2>/dev/null
  echo "gpu_check: summary and gpu_check.tar.gz (every log and JSON) in $DEST"
}
trap finish EXIT
trap 'exit 143' TERM INT
LOG="$OUT/check.log"
: > "$LOG"
START=$(date +%s)
step() { echo "== [$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
# The whole script keeps within GPU_CHECK_BUDGET seconds (default 540, under a lease's
# 600 s per call), so that the summary and the tarball are always written: each step's
# time limit is cut to what is left, less a reserve for the summary.
# (a dry run on the CPU is slower: 1800 s by default).
if [ $DRY = 1 ]; then BUDGET=${GPU_CHECK_BUDGET:-1800}; else BUDGET=${GPU_CHECK_BUDGET:-540}; fi
cap() {  # cap SECONDS: the smaller of SECONDS and the time left, at least 1 (timeout 0 never stops)
  local left=$(( START + BUDGET - 30 - $(date +%s) ))
  [ $left -lt 1 ] && left=1
  echo $(( $1 < left ? $1 : left ))
}

# ---------------------------------------------------------------- environment
$PY - "$OUT/env.json" "$DRY" <<'PYEOF'
import json, subprocess, sys, torch
import os
env = {"torch": torch.__version__, "MNV2_TRITON_AUTOTUNE": os.environ.get("MNV2_TRITON_AUTOTUNE", "0"), "cuda": torch.version.cuda, "python": sys.version.split()[0]}
try:
    import triton
    env["triton"] = triton.__version__
except Exception as exc:
    env["triton"] = f"unavailable ({exc})"
if torch.cuda.is_available() and sys.argv[2] == "0":
    p = torch.cuda.get_device_properties(0)
    env["gpu"] = p.name
    env["sms"] = p.multi_processor_count
    env["memory_gib"] = round(p.total_memory / 2**30, 1)
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
else:
    env["gpu"] = "none (dry run on the CPU, Triton interpreter)"
try:
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip() or "unknown"
    if subprocess.run(["git", "diff", "--quiet", "HEAD"]).returncode:
        env["commit"] += " (+ uncommitted changes)"
except OSError:
    env["commit"] = "unknown"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(env)
PYEOF

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1
fi

# ---------------------------------------------------------------- build
if [ $BUILD = 1 ]; then
  step "build (pip install -e . against $($PY -c 'import torch; print(torch.__version__)'))"
  if [ $DRY = 1 ]; then
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} timeout $(cap 600) $PY -m pip install -q -e . --no-build-isolation --no-deps \
      >"$OUT/build.log" 2>&1
  else
    MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 MNV2_BUILD_CUDA=1 MNV2_PTXAS_VERBOSE=1 \
      timeout $(cap 300) $PY -m pip install -e . --no-build-isolation --no-deps -v >"$OUT/build.log" 2>&1
  fi
  rc=$?
  if [ $rc != 0 ]; then
    grep -n -m 20 -E "error|Error" "$OUT/build.log" | tee -a "$LOG"
    tail -30 "$OUT/build.log"
    step "BUILD FAILED (rc $rc); full log in $OUT/build.log"
    exit 1
  fi
  grep -E "ptxas info|spill|Used [0-9]+ registers" "$OUT/build.log" | sed 's/^ *//' | sort -u > "$OUT/ptxas.txt" || true
  $PY -c "import mnv2_kernels; print(mnv2_kernels.build_info())" 2>&1 | tee -a "$LOG"
fi

# ---------------------------------------------------------------- tests
if [ $TESTS = 1 ]; then
  if [ $DRY = 1 ]; then
    step "tests: Triton interpreter (tests/triton), quick"
    timeout $(cap 600) $PY -m pytest tests/triton -q -x --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
  else
    XDIST=""
    $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
    step "tests: tests/test_gpu.py $XDIST"
    timeout $(cap 240) $PY -m pytest tests/test_gpu.py -q $XDIST --junitxml="$OUT/tests.xml" -p no:cacheprovider \
      >"$OUT/tests.log" 2>&1
  fi
  echo "pytest rc $?" | tee -a "$LOG"
  tail -5 "$OUT/tests.log" | tee -a "$LOG"
fi

# ---------------------------------------------------------------- benchmarks
if [ $BENCH = 1 ]; then
  step "benchmarks (compile mode $COMPILE_MODE)"
  ARGS=(--out "$OUT" --compile-mode "$COMPILE_MODE")
  [ -n "$BLOCKS" ] && ARGS+=(--blocks "$BLOCKS")
  [ $DRY = 1 ] && ARGS+=(--dry-run --dtypes float32 --blocks "${BLOCKS:-1,2,4}")
  timeout $(cap 420) $PY -m bench.gpu_bench "${ARGS[@]}" 2>&1 | tee -a "$LOG" | grep -v "^  block" || true
fi

# ---------------------------------------------------------------- memory report (CUDA)
if [ $BENCH = 1 ]; then
  step "memory report: python -m bench.memory_report --device cuda"
  if [ $DRY = 1 ]; then
    echo "dry run: no CUDA device, memory report skipped" | tee -a "$LOG"
  else
    timeout $(cap 120) $PY -m bench.memory_report --device cuda --batches 1 32 --sweep 1 8 32 64 \
      --no-progress --out "$OUT/memory" >"$OUT/memory.log" 2>&1
    echo "memory report rc $?" | tee -a "$LOG"
    grep -A8 "^## Goals" "$OUT/memory/memory.md" 2>/dev/null | tee -a "$LOG"
  fi
  if [ $DRY = 0 ]; then
    step "interoperability: python -m bench.interop --device cuda (fx, TorchScript, FLOPs, autocast)"
    timeout $(cap 90) $PY -m bench.interop --device cuda --out "$OUT/interop" >"$OUT/interop.log" 2>&1
    echo "interop rc $?" | tee -a "$LOG"
  fi
fi

# ---------------------------------------------------------------- ncu: DRAM bytes per block
if [ $NCU = 1 ] && [ $DRY = 0 ]; then
  step "ncu DRAM bytes"
  NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -n "$NCU_BIN" ]; then
    timeout $(cap 240) "$NCU_BIN" --profile-from-start off --csv --page raw --clock-control none \
      --metrics dram__bytes_read.sum,dram__bytes_write.sum \
      $PY -m bench.gpu_dram run >"$OUT/ncu.csv" 2>"$OUT/ncu.err"
    $PY -m bench.gpu_dram parse "$OUT/ncu.csv" "$OUT/ncu.err" "$OUT/dram.json" 2>&1 | tee -a "$LOG"
    rm -f "$OUT/ncu.err"
  else
    echo "ncu not found" | tee -a "$LOG"
  fi
fi

# ---------------------------------------------------------------- compute-sanitizer
if [ $SANITIZE = 1 ] && [ $DRY = 0 ]; then
  step "compute-sanitizer memcheck + racecheck (small case, CUDA backend)"
  : > "$OUT/sanitize.log"
  for tool in memcheck racecheck; do
    timeout $(cap 150) compute-sanitizer --tool $tool $PY bench/gpu_sanitize.py >>"$OUT/sanitize.log" 2>&1
  done
  grep -E "SUMMARY" "$OUT/sanitize.log" | tee -a "$LOG"
fi

# ---------------------------------------------------------------- summary
step "summary"
$PY -m bench.gpu_summary "$OUT"
