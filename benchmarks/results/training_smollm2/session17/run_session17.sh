#!/bin/bash
# Session 17: 2,000 more prompts (balanced order [12000, 14000), 14,000 in all) for the next stage of both kinds.
# The sixteenth session's stage (+2,000 prompts, 1200 steps at 512 positions, lr 2e-4) gave Amphista's static tree
# +0.45% on all 80 MT-Bench first turns; this session shipped that pair and distilled the next 2,000 prompts.
# Run from the repo root; every stage resumes on a rerun.
#   run_session17.sh distill     two 1-thread workers (~25 min on 2 cores), shards gzipped into ../distill/
#   run_session17.sh amphista    from the shipped heads: cache fill for the new sequences (~15 min), 1200 steps at
#                                512 positions, lr 2e-4 (~60 min on 2 threads); tau with ../session16/tau_split.sh
#   run_session17.sh medusa      the same stage for the shipped Medusa heads (~20 min), to keep the pair like for like
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=benchmarks/results/training_smollm2/distill
R=${RUN:-runs/s17}
mkdir -p "$R"
case "${1:?distill | amphista | medusa}" in
distill)
    for s in 12000 13000; do [ -f "$D/distill-$s.jsonl.gz" ] && { echo "$D/distill-$s.jsonl.gz exists"; exit 1; }; done
    $D/workers.sh "$R" 12000:13000 13000:14000
    for s in 12000 13000; do gzip -9 -c "$R/distill-$s.jsonl" > "$D/distill-$s.jsonl.gz"; done ;;
amphista|medusa)
    DATA=""
    for s in 0 3000 6000 7000 8000 9000 10000 11000 12000 13000; do DATA="$DATA $D/distill-$s.jsonl.gz"; done
    KIND=$1 DATA="${DATA# }" RUN=$R/$1 HIDDEN=runs/continue/hidden STEPS=${STEPS:-1200} LR=2e-4 LOSS_POSITIONS=512 \
        EVAL_EVERY=300 TREES="" OMP_NUM_THREADS=2 scripts/continue_heads.sh >> "$R/$1.log" 2>&1 ;;
*) echo "unknown stage: $1"; exit 2 ;;
esac
