#!/usr/bin/env bash
# The GPU suite's companion for tuning sessions (about 5 minutes on a bare CUDA machine):
#   1. builds the extension for the local GPU (as gpu_suite.sh does),
#   2. reruns the GPU tests named by -k (default: those the last suite run failed),
#   3. sweeps launch parameters of the slow kernels (benchmarks/kernels/tune.py),
#   4. times the Llama-7B-shape decode step with the triton and with the cuda backend side by side,
#   5. profiles the plain and the Amphista step by kernel group (benchmarks/profile_step_gpu.py),
#   6. measures bf16/fp32 greedy agreement on the cuda backend.
# Every stage runs under its own time limit, and a failing stage does not stop the rest.
#
#   bash benchmarks/gpu_tune.sh --out DIR [-k PYTEST_EXPR] [--tune-budget SECONDS] [--dry-run]
# --dry-run prints every stage's command and time limit without running anything (and without a GPU).
set -uo pipefail
OUT=./gpu_tune
KEXPR="mask_forms or op_chain"
TUNE_BUDGET=110
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    -k) KEXPR="$2"; shift 2 ;;
    --tune-budget) TUNE_BUDGET="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;     # '2,13p' printed `set -uo pipefail`
    *) echo "gpu_tune: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
     >/dev/null 2>&1; then
  echo "gpu_tune: no CUDA device usable by torch" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
[ "$DRY_RUN" = 1 ] || exec > >(tee "$OUT/tune.log") 2>&1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STATUS=0
stage() {   # stage NAME SECONDS CMD...
  local name="$1" limit="$2"; shift 2
  echo "== $name (at most ${limit}s): $(printf '%q ' "$@")"    # quoted: the line runs as printed
  [ "$DRY_RUN" = 0 ] || return 0
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
  [ $rc -eq 0 ] || STATUS=1
}
if [ "$DRY_RUN" = 1 ]; then
  ARCH=90
else
  ARCH="$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}')")"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv || true
  git rev-parse --short HEAD 2>/dev/null || true
fi

stage build 150 env AMPHISTA_CUDA_ARCH="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" AMPHISTA_CPU_OPTIONAL=1 \
  "$PY" -m pip install -e . --no-build-isolation --no-deps --no-index -q
stage tests 90 env AMPHISTA_CACHE_DIR=off "$PY" -m pytest -q -p no:cacheprovider -rfEs -k "$KEXPR" \
  python_tests/test_kernels_triton.py python_tests/test_cuda_kernels.py python_tests/test_cuda_build.py \
  python_tests/test_cuda_graphs.py
export AMPHISTA_CACHE_DIR="$OUT/cache"     # the routed rows' per-shape GEMM choices, kept
stage sweeps $(( TUNE_BUDGET + 40 )) "$PY" benchmarks/kernels/tune.py --out "$OUT" --budget "$TUNE_BUDGET"
for be in triton cuda; do
  stage "latency-$be" 45 env AMPHISTA_BACKEND=$be "$PY" benchmarks/latency_gpu.py --models llama-7b \
    --trees mc_sim_7b_63 --draft-vocab "" --no-transformers --time-budget 35 --out "$OUT/latency_$be"
done
stage profile 60 "$PY" benchmarks/profile_step_gpu.py --out "$OUT"
stage agreement 50 "$PY" benchmarks/gpu_greedy_agreement.py --backends cuda --dtypes bf16,fp32 \
  --time-budget 30 --out "$OUT"
[ "$DRY_RUN" = 0 ] || { echo "gpu_tune: dry run, nothing executed"; exit 0; }
for be in triton cuda; do
  [ -f "$OUT/latency_$be/latency.md" ] && { echo "--- latency, backend $be"; grep '^| llama' "$OUT/latency_$be/latency.md"; }
done
[ -f "$OUT/tune.md" ] && sed -n '/## Best vs default/,/## All variants/p' "$OUT/tune.md"
exit $STATUS
