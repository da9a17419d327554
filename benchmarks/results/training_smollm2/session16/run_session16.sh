#!/bin/bash
# Session 16: 2,000 more prompts (balanced order [10000, 12000), 12,000 in all) and one more stage for the
# shipped Amphista heads, judged on all 80 MT-Bench first turns (the 32-question subset flattered the static
# tree by 1.3%, fifteenth session). Run from the repo root; every stage resumes on a rerun.
#   run_session16.sh distill     two 1-thread workers (~27 min on 2 cores), shards gzipped into ../distill/
#   run_session16.sh amphista    cache fill for the new sequences, STEPS (1200) at 512 positions, lr 2e-4, then
#                                tau on both trees, all 80 questions (one thread each, side by side)
#   run_session16.sh medusa      the same stage for the shipped Medusa heads (keeps the pair like for like)
# The sixteenth session stopped the amphista stage's own tau runs (2 x ~40 min did not fit its time) and measured
# the static tree with tau_split.sh instead (two halves of the 80 questions side by side, ~20 min).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=benchmarks/results/training_smollm2/distill
R=${RUN:-runs/s16}
mkdir -p "$R"
case "${1:?distill | amphista | medusa}" in
distill)
    for s in 10000 11000; do [ -f "$D/distill-$s.jsonl.gz" ] && { echo "$D/distill-$s.jsonl.gz exists"; exit 1; }; done
    $D/workers.sh "$R" 10000:11000 11000:12000
    for s in 10000 11000; do gzip -9 -c "$R/distill-$s.jsonl" > "$D/distill-$s.jsonl.gz"; done ;;
amphista|medusa)
    DATA=""
    for s in 0 3000 6000 7000 8000 9000 10000 11000; do DATA="$DATA $D/distill-$s.jsonl.gz"; done
    KIND=$1 DATA="${DATA# }" RUN=$R/$1 HIDDEN=runs/continue/hidden STEPS=${STEPS:-1200} LR=2e-4 LOSS_POSITIONS=512 \
        EVAL_EVERY=300 OMP_NUM_THREADS=2 scripts/continue_heads.sh >> "$R/$1.log" 2>&1 ;;
*) echo "unknown stage: $1"; exit 2 ;;
esac
