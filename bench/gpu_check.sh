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
#
# Steps: env, build, tests (bench/shard_pytest.py: tests/test_gpu.py in min(8, CPUs)
# concurrent pytest processes, so the Triton JIT compiles run in parallel without
# pytest-xdist; dry run: tests/triton in 2), warm (bench/gpu_warm.py: the benchmark's
# Triton compiles in parallel processes), bench, memory, interop, [ncu], [sanitize],
# summary. Each step's status and seconds go to steps.tsv, the summary and, last, the
# terminal. Exit status 1 when a step did not end ok. GPU_CHECK_SHARDS overrides the
# number of test (and warm-up) processes.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

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
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
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
LOG="$OUT/check.log"
STEPS="$OUT/steps.tsv"
: > "$LOG"
: > "$STEPS"
START=$(date +%s)
step() { echo "== [$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# The planned steps; those never reached (a failed build exits) are listed as such.
PLAN=(env)
[ $BUILD = 1 ] && PLAN+=(build)
[ $TESTS = 1 ] && PLAN+=(tests)
if [ $BENCH = 1 ]; then PLAN+=(warm bench memory); [ $DRY = 0 ] && PLAN+=(interop); fi
[ $NCU = 1 ] && [ $DRY = 0 ] && PLAN+=(ncu)
[ $SANITIZE = 1 ] && [ $DRY = 0 ] && PLAN+=(sanitize)
PLAN+=(summary)
CUR_STEP=""
CUR_START=0
begin() {  # begin NAME DESCRIPTION...: a step starts
  CUR_STEP=$1; CUR_START=$(date +%s); shift
  step "$*"
}
record() {  # record NAME STATUS SECONDS
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$STEPS"
}
end_step() {  # end_step RC [STATUS]: the step ends; STATUS defaults to ok / timed out / failed (rc N)
  local status=${2:-}
  if [ -z "$status" ]; then
    case $1 in 0) status=ok ;; 124|137) status="timed out" ;; *) status="failed (rc $1)" ;; esac
  fi
  record "$CUR_STEP" "$status" $(( $(date +%s) - CUR_START ))
  echo "   $CUR_STEP: $status ($(( $(date +%s) - CUR_START )) s)" | tee -a "$LOG"
  CUR_STEP=""
}
skip_step() {  # skip_step NAME WHY
  record "$1" "skipped ($2)" 0
  echo "   $1: skipped ($2)" | tee -a "$LOG"
}
# shellcheck disable=SC2317  # (invoked from the EXIT trap)
steps_table() {
  local name status secs
  echo "gpu_check steps (of ${BUDGET} s; $(( $(date +%s) - START )) s in all):"
  while IFS=$'\t' read -r name status secs; do
    printf '  %-9s %5s s  %s\n' "$name" "$secs" "$status"
  done < "$STEPS"
}
# On every exit (also after a failed step or a signal): the steps not reached are
# recorded, the summary written (bench.gpu_summary needs only the standard library),
# the step table printed last, and the summary, the log and one tarball of everything
# go to $DEST, because the GPU lease brings back at most 8 files.
# shellcheck disable=SC2317  # (the EXIT trap)
finish() {
  local rc=$? s
  trap - EXIT
  trap '' TERM INT  # a second signal must not cut the summary short
  [ -n "$CUR_STEP" ] && end_step "$rc" "interrupted (the script exited with rc $rc)"
  for s in "${PLAN[@]}"; do
    [ "$s" = summary ] || cut -f1 "$STEPS" | grep -qx "$s" || record "$s" "not reached" 0
  done
  begin summary "summary"
  timeout 60 "$PY" -m bench.gpu_summary "$OUT" 2>&1 | tee -a "$LOG"
  end_step "${PIPESTATUS[0]}"
  timeout 60 "$PY" -m bench.gpu_summary "$OUT" >/dev/null 2>&1  # again, with the summary's own time
  steps_table | tee -a "$LOG"
  cp -f "$OUT"/summary.md "$OUT"/summary.json "$OUT"/check.log "$DEST"/ 2>/dev/null
  tar -czf "$DEST/gpu_check.tar.gz" -C "$OUT" . 2>/dev/null
  echo "gpu_check: summary and gpu_check.tar.gz (every log and JSON) in $DEST"
  # exit status: 1 when a step did not end ok (or skipped), so that make gpu-check-dry fails
  [ "$rc" = 0 ] && cut -f2 "$STEPS" | grep -qvE '^(ok|skipped)' && rc=1
  exit "$rc"
}
# The whole script keeps within GPU_CHECK_BUDGET seconds (default 540, under a lease's
# 600 s per call), so that the summary and the tarball are always written: each step's
# time limit is cut to what is left, less a reserve for the summary and the floors of
# the steps after it (a dry run on the CPU is slower: 1800 s by default).
if [ $DRY = 1 ]; then BUDGET=${GPU_CHECK_BUDGET:-1800}; else BUDGET=${GPU_CHECK_BUDGET:-540}; fi
trap finish EXIT
trap 'exit 143' TERM INT
# FLOOR: the seconds a step keeps even when the steps before it ran long. On a GPU,
# 540 s: env ~10, build ~100-200 (nvcc on one .cu file), tests 150 at most, warm 60,
# bench the rest (300 at most), memory 60, interop 45, summary 30 in reserve.
declare -A FLOOR=([tests]=90 [warm]=30 [bench]=120 [memory]=45 [interop]=30 [ncu]=60 [sanitize]=60)
[ $DRY = 1 ] && FLOOR[memory]=0
later() {  # later STEP: the floors of the planned steps after STEP
  local s seen=0 sum=0
  for s in "${PLAN[@]}"; do
    [ $seen = 1 ] && sum=$(( sum + ${FLOOR[$s]:-0} ))
    [ "$s" = "$1" ] && seen=1
  done
  echo $sum
}
cap() {  # cap SECONDS [STEP]: the smaller of SECONDS and the time left (less the floors
         # of the steps after STEP, but at least half of it), at least 1 (timeout 0 never stops)
  local left=$(( START + BUDGET - 30 - $(date +%s) )) c
  c=$(( left - $(later "${2:-}") ))
  [ $c -lt $(( left / 2 )) ] && c=$(( left / 2 ))
  [ $c -gt "$1" ] && c=$1
  [ "$c" -lt 1 ] && c=1
  echo "$c"
}

# ---------------------------------------------------------------- environment
begin env "environment"
timeout 60 "$PY" - "$OUT/env.json" "$DRY" <<'PYEOF'
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
end_step $?

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1
fi

# ---------------------------------------------------------------- build
if [ $BUILD = 1 ]; then
  begin build "build (pip install -e . against $("$PY" -c 'import torch; print(torch.__version__)'))"
  if [ $DRY = 1 ]; then
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} timeout "$(cap 600 build)" "$PY" -m pip install -q -e . \
      --no-build-isolation --no-deps >"$OUT/build.log" 2>&1
  else
    MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 MNV2_BUILD_CUDA=1 MNV2_PTXAS_VERBOSE=1 \
      timeout "$(cap 300 build)" "$PY" -m pip install -e . --no-build-isolation --no-deps -v >"$OUT/build.log" 2>&1
  fi
  rc=$?
  if [ $rc != 0 ]; then
    grep -n -m 20 -E "error|Error" "$OUT/build.log" | tee -a "$LOG"
    tail -30 "$OUT/build.log"
    step "BUILD FAILED (rc $rc); full log in $OUT/build.log"
    end_step $rc
    exit 1
  fi
  grep -E "ptxas info|spill|Used [0-9]+ registers" "$OUT/build.log" | sed 's/^ *//' | sort -u > "$OUT/ptxas.txt" || true
  "$PY" -c "import mnv2_kernels; print(mnv2_kernels.build_info())" 2>&1 | tee -a "$LOG"
  end_step 0
fi

# ---------------------------------------------------------------- tests
# bench/shard_pytest.py: the test ids split into K shards (the tests of one block shape,
# dtype and backend together), K pytest processes at once on the one GPU (Triton's
# on-disk cache shared), the junit reports merged into tests.xml, tests_shards.json
# and tests.log. At its time limit it stops the shards (SIGINT, then SIGKILL), keeps
# their partial results and names the shards that did not finish.
NPROC=$(nproc 2>/dev/null || echo 2)
if [ $TESTS = 1 ]; then
  if [ $DRY = 1 ]; then
    TEST_PATHS=(tests/triton); SHARDS=${GPU_CHECK_SHARDS:-$(( NPROC < 2 ? NPROC : 2 ))}; TCAP=$(cap 600 tests)
  else
    TEST_PATHS=(tests/test_gpu.py); SHARDS=${GPU_CHECK_SHARDS:-$(( NPROC < 8 ? NPROC : 8 ))}; TCAP=$(cap 150 tests)
  fi
  begin tests "tests: ${TEST_PATHS[*]} in $SHARDS concurrent pytest processes (limit $TCAP s)"
  # the runner stops itself within TCAP; timeout is the backstop (the runner merges on SIGTERM)
  timeout -k 10 $(( TCAP + 15 )) "$PY" -m bench.shard_pytest --out "$OUT" --shards "$SHARDS" --timeout "$TCAP" \
    "${TEST_PATHS[@]}" >"$OUT/tests-runner.log" 2>&1
  rc=$?
  tail -4 "$OUT/tests.log" 2>/dev/null | tee -a "$LOG"
  case $rc in
    0) end_step 0 ;;
    1) end_step 1 "ran; tests failed" ;;
    2) end_step 2 "$(grep -o "shards not finished: [0-9, ]*" "$OUT/tests.log")" ;;
    *) end_step $rc ;;
  esac
fi

# ---------------------------------------------------------------- benchmarks
if [ $BENCH = 1 ]; then
  ARGS=(--out "$OUT" --compile-mode "$COMPILE_MODE")
  WARM=(--procs "${GPU_CHECK_SHARDS:-$(( NPROC < 8 ? NPROC : 8 ))}")
  [ -n "$BLOCKS" ] && ARGS+=(--blocks "$BLOCKS") && WARM+=(--blocks "$BLOCKS")
  if [ $DRY = 1 ]; then
    # gpu_bench's dry run times no fused training step: nothing to warm for it
    ARGS+=(--dry-run --dtypes float32 --blocks "${BLOCKS:-1,2,4}")
    WARM=(--procs 2 --dry-run --dtypes float32 --blocks "${BLOCKS:-1,2,4}" --train-dtype=)
  fi
  # the benchmark's first Triton calls per block shape and dtype, K processes at once,
  # so that gpu_bench finds its kernels in Triton's on-disk cache
  WCAP=$(cap 60 warm)
  [ $DRY = 1 ] && WCAP=$(cap 120 warm)
  begin warm "warm: the benchmark's Triton compiles in parallel (python -m bench.gpu_warm ${WARM[*]})"
  timeout -k 5 "$WCAP" "$PY" -m bench.gpu_warm "${WARM[@]}" --timeout $(( WCAP - 3 )) >"$OUT/warm.log" 2>&1
  rc=$?
  tail -1 "$OUT/warm.log" | tee -a "$LOG"
  end_step $rc

  begin bench "benchmarks (compile mode $COMPILE_MODE)"
  timeout "$(cap 300 bench)" "$PY" -m bench.gpu_bench "${ARGS[@]}" 2>&1 | tee -a "$LOG" | grep -v "^  block"
  end_step "${PIPESTATUS[0]}"
fi

# ---------------------------------------------------------------- memory report (CUDA)
if [ $BENCH = 1 ]; then
  if [ $DRY = 1 ]; then
    skip_step memory "dry run: no CUDA device"
  else
    begin memory "memory report: python -m bench.memory_report --device cuda"
    timeout "$(cap 60 memory)" "$PY" -m bench.memory_report --device cuda --batches 1 32 --sweep 1 8 32 64 \
      --no-progress --out "$OUT/memory" >"$OUT/memory.log" 2>&1
    rc=$?
    grep -A8 "^## Goals" "$OUT/memory/memory.md" 2>/dev/null | tee -a "$LOG"
    end_step $rc
    begin interop "interoperability: python -m bench.interop --device cuda (fx, TorchScript, FLOPs, autocast)"
    timeout "$(cap 45 interop)" "$PY" -m bench.interop --device cuda --out "$OUT/interop" >"$OUT/interop.log" 2>&1
    end_step $?
  fi
fi

# ---------------------------------------------------------------- ncu: DRAM bytes per block
if [ $NCU = 1 ] && [ $DRY = 0 ]; then
  begin ncu "ncu DRAM bytes"
  NCU_BIN=$(command -v ncu)
  for f in /opt/nvidia/nsight-compute/*/ncu; do [ -z "$NCU_BIN" ] && [ -x "$f" ] && NCU_BIN=$f; done
  if [ -n "$NCU_BIN" ]; then
    timeout "$(cap 240 ncu)" "$NCU_BIN" --profile-from-start off --csv --page raw --clock-control none \
      --metrics dram__bytes_read.sum,dram__bytes_write.sum \
      "$PY" -m bench.gpu_dram run >"$OUT/ncu.csv" 2>"$OUT/ncu.err"
    rc=$?
    "$PY" -m bench.gpu_dram parse "$OUT/ncu.csv" "$OUT/ncu.err" "$OUT/dram.json" 2>&1 | tee -a "$LOG"
    rm -f "$OUT/ncu.err"
    end_step $rc
  else
    echo "ncu not found" | tee -a "$LOG"
    end_step 0 "skipped (ncu not found)"
  fi
fi

# ---------------------------------------------------------------- compute-sanitizer
if [ $SANITIZE = 1 ] && [ $DRY = 0 ]; then
  begin sanitize "compute-sanitizer memcheck + racecheck (small case, CUDA backend)"
  : > "$OUT/sanitize.log"
  rc=0
  for tool in memcheck racecheck; do
    timeout "$(cap 150 sanitize)" compute-sanitizer --tool $tool "$PY" bench/gpu_sanitize.py >>"$OUT/sanitize.log" 2>&1 \
      || rc=$?
  done
  grep -E "SUMMARY" "$OUT/sanitize.log" | tee -a "$LOG"
  end_step $rc
fi

# ---------------------------------------------------------------- summary
# written by finish (the EXIT trap), which every exit path runs, with the step table last
exit 0
