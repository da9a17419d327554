#!/bin/bash
# Distils prompt ranges of the seeded, source-balanced order of train_prompts.jsonl in parallel, one 1-thread
# worker per range, with the settings every committed shard used (bf16, batch 64, 256 new tokens, seed 0).
#   workers.sh RUN_DIR START:END [START:END ...]   -> RUN_DIR/distill-START.jsonl (+ .log) per range
# Keep each range <= 1,024 prompts (16 batches of 64) so a range is one length-sorting window and its shard is
# complete before it is used. Run from the repo root; gzip the shards into this folder afterwards.
set -u
run=$1; shift
mkdir -p "$run"
export OMP_NUM_THREADS=1
for range in "$@"; do
    start=${range%:*}; end=${range#*:}
    python -m amphista_engine.cli distill --prompts ../shared/data/train_prompts.jsonl --model smollm2-135m \
        --device cpu --dtype bf16 --batch-size 64 --max-new-tokens 256 --balance-by-source --seed 0 \
        --out "$run/distill-$start.jsonl" --offset "$start" --limit "$end" > "$run/distill-$start.log" 2>&1 &
done
wait
