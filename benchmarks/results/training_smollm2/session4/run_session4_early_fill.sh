#!/bin/bash
cd /work/main
while pgrep -f "out runs/next/distill-bf16-1200.jsonl" >/dev/null; do sleep 10; done
echo "$(date +%T) early fill start" >> runs/v4/pipeline.log
OMP_NUM_THREADS=1 python -m amphista_engine.cli train --data runs/next/distill-bf16-1200.jsonl --out runs/v4/hidden-fill-early \
  --model smollm2-135m --fill-cache --cache-hidden runs/big/hidden --batch-tokens 4096 --device cpu > runs/v4/early_fill.log 2>&1
echo "$(date +%T) early fill done" >> runs/v4/pipeline.log
