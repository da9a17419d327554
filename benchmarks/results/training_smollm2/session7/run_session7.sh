#!/bin/bash
# Session 7 (2026-11-27): the shipped session-5 Amphista heads (session5/run_session5.sh, 3000 steps)
# continued from step 3000 to 4500 with the same recipe and data (warm restart of the cosine schedule:
# lr 2.5e-4 at step 3000, 0 at 4500), 2 threads, 47 min; then tau and the fitted trees. Medusa unchanged.

### runs/v6/run.sh
# Session 7: continue the shipped (session-5) Amphista heads from step 3000 to 4500 (warm restart of the cosine
# schedule: lr 0.25e-3 at step 3000, 0 at 4500), same recipe and data. Resumable.
cd /work/main
RUN=runs/v6
A="python -m amphista_engine.cli"
SHARDS="runs/big/distill-0.jsonl runs/next/distill-bf16-1200.jsonl runs/big/distill-3000.jsonl runs/next/distill-bf16-3896.jsonl"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
$A train --data $SHARDS --out $RUN/heads-amphista --model smollm2-135m --device cpu --kind amphista --num-heads 4 --loss kl \
  --lambda 0.8 --mse-weight 0.1 --loss-positions 512 --draft-vocab 8192 --steps ${STEPS:-4500} --batch-tokens 4096 \
  --lr 1e-3 --warmup 40 --clip 1.0 --seed 0 --train-dtype bf16 --save-dtype bf16 --cache-hidden runs/big/hidden \
  --eval-every 500 --eval-max-seqs 32 --save-every 20 --log $RUN/train-amphista.jsonl --resume >> $RUN/train-amphista.log 2>&1
echo "$(date +%T) amphista trained" >> $RUN/run.log

### runs/v6/pipeline.sh
# Session 7: after runs/v6/run.sh (Amphista 3000 -> 4500 steps), tau on the 32 MT-Bench first turns for both
# bar trees (one thread each, side by side), then the fitted trees saved into the heads.
set -u
cd /work/main
RUN=runs/v6
A="python -m amphista_engine.cli"
SHARDS="runs/big/distill-0.jsonl runs/next/distill-bf16-1200.jsonl runs/big/distill-3000.jsonl runs/next/distill-bf16-3896.jsonl"
log() { echo "$(date +%T) $*" >> $RUN/pipeline.log; }
until grep -q "amphista trained" $RUN/run.log 2>/dev/null; do sleep 20; done
log "training done"
for t in mc_sim_7b_63 dynamic-63; do
  OMP_NUM_THREADS=1 $A eval-tau --questions ../shared/data/mt_bench.jsonl --heads $RUN/heads-amphista --speculative amphista \
    --device cpu --tree $t --per-category 4 --max-new-tokens 256 --out $RUN/tau-amphista-$t.json > $RUN/tau-amphista-$t.log 2>&1 &
done
wait
log "tau done"
OMP_NUM_THREADS=2 $A tree-search --data $SHARDS --heads $RUN/heads-amphista --model smollm2-135m --device cpu \
  --cache-hidden runs/big/hidden --nodes 16,32,63 --save --out $RUN/trees-amphista.json > $RUN/trees-amphista.log 2>&1
log "all done"
