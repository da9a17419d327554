#!/usr/bin/env bash
# The device check for the kernels, one command for one GPU session (about 5 minutes on an H100):
#   1. every kernel against the torch reference on the GPU (the same tests CI runs in the interpreter),
#   2. the microbenchmarks at Llama-7B / Llama-13B / SmolLM2-135M shapes, prefix 128..4096; the table
#      goes to benchmarks/results/kernels_<card>.{json,md} (and to $OUT/kernels.json when $OUT is set).
# Extra arguments go to run_all.py, e.g. --shapes llama-7b --prefixes 1024,4096 for a shorter run.
# Without a CUDA device it stops at once with one line and exit status 2.
set -euo pipefail
cd "$(dirname "$0")/../.."
# Without a GPU the tests below would crawl through the Triton interpreter: stop at once instead.
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device usable by torch; nothing to run on this machine" \
       "(on a CPU: python benchmarks/kernels/run_all.py --quick)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
python -m pytest -q -x -p no:cacheprovider python_tests/test_kernels_triton.py
python benchmarks/kernels/run_all.py --json "${OUT:-benchmarks/results}/kernels.json" "$@"
