#!/usr/bin/env bash
# The committed CPU evaluation (issue 7): SmolLM2-135M-Instruct with its shipped Medusa and Amphista heads
# (amphista_engine/data/heads/) on all 80 MT-Bench questions (both turns), greedy, at most 256 new tokens per
# turn, plain decoding (ar) as the baseline measured in the same run. bf16 with packed oneDNN weights: on this
# AMX CPU it is the fast path, and position-ordered attention (kernels/cpu_exact.py) keeps every speculative
# answer identical to the plain one. --quant none: the dequantized weights, as the committed run (before 4-bit
# weights became the CPU default for this file). Writes answers.jsonl, summary.json/.md and the plots to
# benchmarks/results/mt_bench_cpu. Resumable: rerun the same command to continue an interrupted run.
# Two cores, nothing else running: ~90 min.
#
# Extra arguments are appended, and a later flag wins, so a smoke run with other heads is e.g.
#   scripts/eval_mt_bench_cpu.sh --limit 2 --max-new-tokens 16 --heads-medusa DIR --heads-amphista DIR --out /tmp/x
# QUESTIONS=path overrides the question file (default: ../shared/data/mt_bench.jsonl from the repo root).
set -euo pipefail
# --help went straight to `amphista eval --help`, which never says what this script runs: both, then
case "${1-}" in -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; echo ;; esac
cd "$(dirname "$0")/.."
QUESTIONS="${QUESTIONS:-../shared/data/mt_bench.jsonl}"
exec python -m amphista_engine.cli eval \
    --questions "$QUESTIONS" --model smollm2-135m --methods ar,medusa,amphista \
    --max-new-tokens 256 --device cpu --dtype bf16 --quant none --warmup 1 --plot \
    --out benchmarks/results/mt_bench_cpu "$@"
