#!/bin/bash
# Session 14: one more stage for both shipped kinds, KL at every position of the 10,000 prompts, trained against
# the 16,384-token draft vocabulary the heads now draft over (the twelfth session trained at 8,192 and widened the
# set afterwards). `scripts/continue_heads.sh` with --init-from the shipped heads (fresh AdamW, warmup 40, cosine
# from 1.5e-4 to 0, seed 0), 1000 steps each, the same shards and hidden-state cache as the twelfth session.
# Run from the repo root; every stage resumes on a rerun. Amphista first (its tau decides whether Medusa follows).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=benchmarks/results/training_smollm2/distill
P10="$D/distill-0.jsonl.gz $D/distill-3000.jsonl.gz $D/distill-6000.jsonl.gz $D/distill-7000.jsonl.gz"
P10="$P10 $D/distill-8000.jsonl.gz $D/distill-9000.jsonl.gz"
R=${RUN:-runs/s14}
mkdir -p "$R"
stage() {  # kind run-dir threads
    KIND=$1 DATA="$P10" RUN=$R/$2 HIDDEN=runs/continue/hidden STEPS=1000 LR=1.5e-4 LOSS_POSITIONS=0 EVAL_EVERY=250 \
        OMP_NUM_THREADS=$3 scripts/continue_heads.sh >> "$R/$2.log" 2>&1
}
trees() {  # kind run-dir: refit the tuned-* trees to the new heads and save them in their config.json
    [ -f "$R/trees-$1.json" ] || OMP_NUM_THREADS=2 python -m amphista_engine.cli tree-search --data $P10 \
        --heads "$R/$2/heads" --model smollm2-135m --device cpu --cache-hidden runs/continue/hidden --nodes 16,32,63 \
        --save --out "$R/trees-$1.json" > "$R/trees-$1.log" 2>&1
}
stage amphista a1 2       # 4.3 s per step on 2 threads (AMD EPYC), 72 min; then tau on both trees, 17 min
trees amphista a1
if [ "${1:-}" = "--with-medusa" ]; then
    stage medusa m1 2     # ~3 s per step on 2 threads, ~50 min; then tau on both trees
    trees medusa m1
fi
