#!/bin/bash
# Session 8: the shipped (4500-step) Amphista heads continued to 6000 steps with KL at every answer position
# (--loss-positions 0) instead of 512 sampled ones; resume keeps AdamW state and the cosine schedule, whose
# total is now 6000 (lr 1.5e-4 at step 4500, 0 at 6000). Same data, seed and other flags. Resumable.
cd /work/main
RUN=runs/s8
A="python -m amphista_engine.cli"
SHARDS="runs/big/distill-0.jsonl runs/next/distill-bf16-1200.jsonl runs/big/distill-3000.jsonl runs/next/distill-bf16-3896.jsonl"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
$A train --data $SHARDS --out $RUN/klall --model smollm2-135m --device cpu --kind amphista --num-heads 4 --loss kl \
  --lambda 0.8 --mse-weight 0.1 --loss-positions 0 --draft-vocab 8192 --steps ${STEPS:-6000} --batch-tokens 4096 \
  --lr 1e-3 --warmup 40 --clip 1.0 --seed 0 --train-dtype bf16 --save-dtype bf16 --cache-hidden runs/big/hidden \
  --eval-every 300 --eval-max-seqs 32 --save-every 20 --log $RUN/train-klall.jsonl --resume >> $RUN/train-klall.log 2>&1
echo "$(date +%T) trained" >> $RUN/run_klall.done
