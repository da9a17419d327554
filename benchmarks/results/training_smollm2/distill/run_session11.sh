#!/bin/bash
# Session 11: 2,000 more prompts (balanced order [6000, 8000)), same settings as session 10, by two workers.
# Each worker's 1,000 prompts fit in one length-sorting window (16 batches of 64), so a shard is complete
# before it is used. (Run from the repo root; the shards were then gzipped here.)
cd /work/main
export OMP_NUM_THREADS=1
D="python -m amphista_engine.cli distill --prompts ../shared/data/train_prompts.jsonl --model smollm2-135m --device cpu --dtype bf16 --batch-size 64 --max-new-tokens 256 --balance-by-source --seed 0"
$D --out runs/s11/distill-6000.jsonl --offset 6000 --limit 7000 > runs/s11/distill-6000.log 2>&1 &
$D --out runs/s11/distill-7000.jsonl --offset 7000 --limit 8000 > runs/s11/distill-7000.log 2>&1 &
wait
