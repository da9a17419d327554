#!/bin/bash
# Session 12: the shipped (session-11) Amphista heads trained on with 2,000 more prompts (10,000 in all), the
# session-11 recipe otherwise (fresh AdamW from the shipped weights, lr 2e-4, warmup 40, cosine, KL at 512
# positions + 0.1 MSE). Run from the repo root after distill/run_session12.sh (its shards gzipped into distill/).
# The hidden-state cache of session 11 (runs/continue/hidden) is reused: only the new sequences are computed.
set -euo pipefail
cd /work/main
D=benchmarks/results/training_smollm2/distill
DATA="$D/distill-0.jsonl.gz $D/distill-3000.jsonl.gz $D/distill-6000.jsonl.gz $D/distill-7000.jsonl.gz"
DATA="$DATA $D/distill-8000.jsonl.gz $D/distill-9000.jsonl.gz"
DATA="$DATA" RUN=runs/continue12 HIDDEN=runs/continue/hidden STEPS=${STEPS:-1200} LR=${LR:-2e-4} EVAL_EVERY=${EVAL_EVERY:-300} scripts/continue_heads.sh
