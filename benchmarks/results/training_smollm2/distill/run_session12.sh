#!/bin/bash
# Session 12: 2,000 more prompts (balanced order [8000, 10000)), same settings as session 10, by two workers.
# Each worker's 1,000 prompts fit in one length-sorting window (16 batches of 64), so a shard is complete
# before it is used. (Run from the repo root; the shards were then gzipped here.)
cd /work/main
export OMP_NUM_THREADS=1
D="python -m amphista_engine.cli distill --prompts ../shared/data/train_prompts.jsonl --model smollm2-135m --device cpu --dtype bf16 --batch-size 64 --max-new-tokens 256 --balance-by-source --seed 0"
$D --out runs/s12/distill-8000.jsonl --offset 8000 --limit 9000 > runs/s12/distill-8000.log 2>&1 &
$D --out runs/s12/distill-9000.jsonl --offset 9000 --limit 10000 > runs/s12/distill-9000.log 2>&1 &
wait
