#!/usr/bin/env bash
# The one-shot GPU suite (issue 6), for a bare CUDA machine with torch and triton installed and no internet:
#   1. builds the CUDA extension for the local GPU only (its compute capability; pip editable install,
#      falling back to CMake straight into amphista_engine/ if pip cannot build),
#   2. runs the GPU tests: python_tests/test_cuda_*.py, test_kernels_triton.py, the Engine and bench GPU
#      tests in test_engine.py / test_evaluation.py, and those of test_acceptance.py / test_gpu_suite_qa.py,
#   3. runs every kernel microbenchmark (benchmarks/kernels/run_all.py, when present),
#   4. times end-to-end decode steps, plain vs Medusa vs Amphista, CUDA graphs on and off, on random-weight
#      Llama-7B and SmolLM2-135M shapes in bf16 (benchmarks/latency_gpu.py), and runs `amphista bench` on the
#      7B shape,
#   5. profiles a plain 7B-shaped step kernel by kernel, cuBLAS vs the fused Triton layers
#      (benchmarks/profile_step_gpu.py: where the gap to the bandwidth floor goes),
#   6. measures whether bf16 greedy speculative decoding keeps plain greedy's tokens, per backend
#      (benchmarks/gpu_greedy_agreement.py),
# in under 9 minutes, writing JSON + markdown to --out DIR (default ./gpu_results) with the card, driver, date,
# commit and torch/CUDA versions: summary.md / summary.json, latency.{json,md}, kernels.json, tests.xml and
# the whole log (suite.log). Commit the results under benchmarks/results/ when they are worth keeping.
#
#   bash benchmarks/gpu_suite.sh [--out DIR] [--skip-build] [--budget SECONDS] [--dry-run]
#
# Through the workplace's device tool (at most 8 files come back), pack the folder:
#   timeout 560 bash benchmarks/gpu_suite.sh --out /tmp/g; tar czf $OUT/gpu_results.tgz -C /tmp/g .
# --dry-run prints every stage's command and time limit without running anything (and without a GPU).
# Nothing here needs gguf, tokenizers or a checkpoint. On a machine without a CUDA device it stops at once
# with one line ("gpu_suite: no CUDA device ...") and exit status 2. Exit status 1: some stage failed (every
# stage still runs, and the summary says which).
set -uo pipefail

OUT=./gpu_results
SKIP_BUILD=0
DRY_RUN=0
BUDGET=510                      # seconds for all stages (at most: build 200, tests 190, kernels 100, latency 150, ...)
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;   # '2,23p' left out the exit statuses
    *) echo "gpu_suite: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"

# ---- 0. a CUDA device, checked before anything slow ----------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  :
elif ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_suite: no CUDA device (nvidia-smi is missing or lists no GPU); nothing to run on this machine" >&2
  exit 2
fi
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_suite: no CUDA device usable by torch ($PY: torch.cuda.is_available() is False or torch is missing)" >&2
  exit 2
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
[ "$DRY_RUN" = 1 ] || exec > >(tee "$OUT/suite.log") 2>&1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's package, whatever pip managed
START=$(date +%s)
STAGES="$OUT/stages.tsv"
: > "$STAGES"

# run_stage NAME MAX_SECONDS RESERVE_FOR_LATER_STAGES CMD...: runs CMD (a program, not a shell function:
# `timeout` execs it) under a time limit that fits the budget, and records its status in $STAGES.
run_stage() {
  local name="$1" max="$2" reserve="$3"; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) - reserve ))
  local limit=$(( left < max ? left : max ))
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped (time budget spent)"; printf '%s\tskipped\t0\n' "$name" >> "$STAGES"; return 0
  fi
  echo "== $name (at most ${limit}s): $(printf '%q ' "$@")"    # quoted: the line runs as printed
  if [ "$DRY_RUN" = 1 ]; then printf '%s\tok\t0\n' "$name" >> "$STAGES"; return 0; fi
  local t0=$(date +%s) rc
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  [ $rc -eq 0 ] || status="failed(rc=$rc)"
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && status="timeout(${limit}s)"   # 137: killed after the grace period
  echo "== $name: $status in ${dt}s"
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >> "$STAGES"
  return $rc
}

if [ "$DRY_RUN" = 1 ]; then
  ARCH=90
else
  ARCH="$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}')")"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
fi
echo "python: $PY ($("$PY" -V 2>&1)); compute capability: sm_$ARCH; budget ${BUDGET}s; out: $OUT"

# ---- 1. build for this GPU only --------------------------------------------------------------------------
# pip builds through setup.py -> CMake for AMPHISTA_CUDA_ARCH only; --no-index: nothing may be fetched. The CPU
# extension (csrc/cpu) comes along but no GPU stage needs it: a failure there must not fail this build.
BUILD_PIP=(env AMPHISTA_CUDA_ARCH="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" AMPHISTA_CPU_OPTIONAL=1
           "$PY" -m pip install -e . --no-build-isolation --no-deps --no-index -q)
# The fallback: plain CMake, the .so lands where `import amphista_engine._C` looks.
BUILD_CMAKE=(bash -c "cmake -S . -B build/gpu-suite -G Ninja -DAMPHISTA_CUDA_ARCH=$ARCH -DPython_EXECUTABLE='$PY' \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_LIBRARY_OUTPUT_DIRECTORY='$ROOT/amphista_engine' >/dev/null \
  && cmake --build build/gpu-suite -j $(nproc)")
CHECK_EXT='
import sys
from amphista_engine._ext import extension_error, load_extension
m = load_extension()
if m is None:
    sys.exit(f"extension not importable: {extension_error()}")
archs = ",".join(m.built_archs())
print(f"amphista_engine._C: built for sm_{archs}, CUDA runtime {m.cuda_version()}, driver supports {m.driver_version()}")
import amphista_engine, amphista_engine.kernels, amphista_engine.cuda_graphs, amphista_engine.speculative
print("package imports without gguf/tokenizers: ok")
'
if [ "$SKIP_BUILD" = 0 ]; then
  if ! run_stage build-pip 200 250 "${BUILD_PIP[@]}"; then
    echo "pip build failed; building with CMake directly"
    run_stage build-cmake 150 250 "${BUILD_CMAKE[@]}"
  fi
fi
run_stage extension 30 240 "$PY" -c "$CHECK_EXT"

# ---- 2. GPU tests -------------------------------------------------------------------------------------------
TESTS=(python_tests/test_cuda_*.py python_tests/test_engine.py python_tests/test_evaluation.py)
[ -f python_tests/test_kernels_triton.py ] && TESTS+=(python_tests/test_kernels_triton.py)
# GPU tests in files of CPU tests: acceptance on the device without a host sync (written 2026-11-27, never run on a
# GPU before 2026-12-05), and this suite's own QA (a NaN mid-answer under CUDA graphs; its CPU tests are *_on_cpu).
TESTS+=(python_tests/test_acceptance.py::test_cuda_matches_cpu_without_host_sync python_tests/test_gpu_suite_qa.py)
# (2026-12-05, session 48) per-row max_new_tokens through CUDA graphs: an ended row's cache length must stop there
TESTS+=(python_tests/test_per_row_max_tokens.py::test_per_row_limits_under_cuda_graphs)
# (2026-12-07, session 64) tree attention's sliding window on the CUDA kernel and a windowed model on the device
TESTS+=(python_tests/test_tree_attention_window_qa.py)
# (2026-12-07, session 65) prompt lookup (alone and beside the heads) captured in CUDA graphs
TESTS+=(python_tests/test_prompt_lookup.py::test_lookup_under_cuda_graphs)
# The benchmarks' CPU smoke tests (*_on_cpu) are CI's: here they only take time from the latency stage.
# Routed products pick the Triton GEMM or cuBLAS by timing both (kernels/linear_choice.py). Timed beside 7 other
# test workers the choices are noise: the tests keep theirs in memory, and the benchmark stages after them
# measure afresh into $OUT/cache/linear_choices.json (what the routed rows ran, per shape).
PYTEST=(env AMPHISTA_CACHE_DIR=off "$PY" -m pytest -q -p no:cacheprovider -rfEs --junitxml "$OUT/tests.xml"
        -k "not on_cpu")
# Tests spread one by one over the workers when pytest-xdist is there (one GPU is plenty). By file, on
# 2026-12-04, the Triton file alone held one worker for 123 of the stage's 153 s, and the latency stage after
# it had 20 s left: its Amphista and SmolLM2 rows were skipped.
# On an H100 (2026-12-05) 354 tests held 825 s of worker time and the stage ran into its limit at 170 s, two
# long tests at its tail: 12 workers that steal queued tests from each other now (pytest-xdist >= 3.2), and the
# longest test (68 s) split in two. The stage's limit went to 190 s, the agreement stage's budget down to 20 s.
XDIST_DIST=$("$PY" -c "import xdist; v = tuple(int(p) for p in xdist.__version__.split('.')[:2]); \
print('worksteal' if v >= (3, 2) else 'load')" 2>/dev/null || true)
[ "$DRY_RUN" = 1 ] || [ -z "$XDIST_DIST" ] || PYTEST+=(-n 12 --dist "$XDIST_DIST")
run_stage tests 190 250 "${PYTEST[@]}" "${TESTS[@]}"
export AMPHISTA_CACHE_DIR="$OUT/cache"

# ---- 3. kernel microbenchmarks --------------------------------------------------------------------------
# Prefixes 1024 and 4096: the ends of the tree-attention target's range (>= 1024; 4096 no longer fits in L2), and
# two points for gpu_decide's fixed-cost fit (512 and 2048 until 2026-12-04c). The 7B and SmolLM2 shapes: with the
# 13B one too the stage ran into its 100 s limit on an H100 (2026-12-05; tree attention alone 77 s), and the
# latency stage after it had 26 s. gpu_tune.sh sweeps the 13B shapes.
if [ -f benchmarks/kernels/run_all.py ]; then
  run_stage kernels 80 170 "$PY" benchmarks/kernels/run_all.py --shapes llama-7b,smollm2-135m \
      --prefixes 1024,4096 --reps 20 --json "$OUT/kernels.json"
else
  echo "== kernels: benchmarks/kernels/run_all.py not present, skipped"
  printf 'kernels\tabsent\t0\n' >> "$STAGES"
fi

# ---- 4. end-to-end decode steps -------------------------------------------------------------------------
# Its --time-budget stops new configurations 30 s before the stage's own limit (a configuration under way runs on;
# a SIGINT at the limit keeps the rows measured). The reserve is the later stages' limits: bench took 12-21 s and
# profile 12-19 s on 2026-11-28..12-05, agreement its whole budget. (With 185 s reserved, 2026-12-04b's run ended
# 180 s inside its budget, this stage's --time-budget cut to 86 s; on 2026-12-05 the H100's tests and kernels left it
# 26 s, and only the plain rows ran.)
LEFT=$(( BUDGET - ($(date +%s) - START) - 105 ))
LEFT=$(( LEFT < 150 ? LEFT : 150 ))
run_stage latency 150 105 "$PY" benchmarks/latency_gpu.py --out "$OUT" \
    --time-budget $(( LEFT > 60 ? LEFT - 30 : LEFT / 2 ))
# The user-facing latency CLI (issue 7) on the same 7B shape: graph-replayed steps, break-even tau per tree.
run_stage bench 35 70 "$PY" -m amphista_engine.cli bench --random-weights --shape llama-7b --device cuda \
    --trees tree-16,mc_sim_7b_63,dynamic-64 --repeats 10 --out "$OUT"
run_stage profile 30 40 "$PY" benchmarks/profile_step_gpu.py --shape llama-7b --steps 10 --out "$OUT"

# ---- 6. bf16 greedy agreement, speculative vs plain, per backend (a measurement, not a test) ---------------
run_stage agreement 40 0 "$PY" benchmarks/gpu_greedy_agreement.py --out "$OUT" --time-budget 20

# ---- 7. summary -----------------------------------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_suite: dry run, nothing executed"
  exit 0
fi
"$PY" - "$OUT" "$START" <<'EOF'
import json, platform, subprocess, sys, time
from datetime import datetime, timezone
from pathlib import Path
import torch
out, start = Path(sys.argv[1]), int(sys.argv[2])
def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""
stages = [dict(zip(("stage", "status", "seconds"), l.split("\t"))) for l in (out / "stages.tsv").read_text().splitlines() if l]
try:
    card = torch.cuda.get_device_name()
except Exception:          # torch cannot see the card any more: what nvidia-smi says
    card = sh(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) or "unknown"
meta = {"card": card, "driver": sh(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": sh(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
        "dirty": bool(sh(["git", "status", "--porcelain", "--untracked-files=no"])),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "total_seconds": int(time.time()) - start}
lat = json.loads((out / "latency.json").read_text()) if (out / "latency.json").exists() else None
summary = {"meta": meta, "stages": stages, "targets": lat["targets"] if lat else None}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
lines = [f"# GPU suite: {meta['card']}, {meta['date']}", ""] + [f"- {k}: {v}" for k, v in meta.items()]
lines += ["", "| stage | status | seconds |", "|---|---|---|"] + [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in stages]
if lat:
    lines += ["", (out / "latency.md").read_text()]
if (out / "profile.md").exists():
    lines += ["", (out / "profile.md").read_text().split("\n## ")[0]]
if (out / "greedy_agreement.md").exists():
    lines += ["", (out / "greedy_agreement.md").read_text()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

if grep -qv -P '\t(ok|absent)\t' "$STAGES"; then
  echo "gpu_suite: some stages failed (see $OUT/summary.md)"
  exit 1
fi
echo "gpu_suite: all stages passed in $(( $(date +%s) - START ))s; results in $OUT"
