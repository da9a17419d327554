#!/bin/bash
# Session 10: the training data lost with the previous machine, redistilled in bf16 (batch 64) by two workers.
# (Run from the repo root; the shards were then gzipped here. `ONLY_DISTILL=1 scripts/train_smollm2_heads.sh` does the same.)
cd /work/main
export OMP_NUM_THREADS=1
D="python -m amphista_engine.cli distill --prompts ../shared/data/train_prompts.jsonl --model smollm2-135m --device cpu --dtype bf16 --batch-size 64 --max-new-tokens 256 --balance-by-source --seed 0"
$D --out runs/s10/distill-0.jsonl --offset 0 --limit 3000 > runs/s10/distill-0.log 2>&1 &
$D --out runs/s10/distill-3000.jsonl --offset 3000 --limit 6000 > runs/s10/distill-3000.log 2>&1 &
wait
