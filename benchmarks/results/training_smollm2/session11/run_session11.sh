#!/bin/bash
# Session 11: the shipped (step-6000) Amphista heads trained on with 2,000 more prompts (8,000 in all).
# The step-6000 heads had seen their 1.44M tokens ~17 times: held-out loss flat since step 3000 (10.59) while
# the training loss fell 7.3 -> 6.3, so more data, not more steps. Run from the repo root after
# distill/run_session11.sh (its shards gzipped into distill/).
set -euo pipefail
cd /work/main
D=benchmarks/results/training_smollm2/distill
DATA="$D/distill-0.jsonl.gz $D/distill-3000.jsonl.gz $D/distill-6000.jsonl.gz $D/distill-7000.jsonl.gz"
DATA="$DATA" RUN=runs/continue STEPS=${STEPS:-1100} LR=${LR:-2e-4} EVAL_EVERY=${EVAL_EVERY:-275} scripts/continue_heads.sh
