#!/bin/bash
# Session-3 CPU run: same data and hidden cache as the 2026-11-27 run, bf16 autocast (AMX), 1000 steps.
set -u
cd /work/main
RUN=runs/v3
SHARDS="runs/big/distill-0.jsonl runs/big/distill-3000.jsonl"
A="python -m amphista_engine.cli"
log() { echo "$(date +%T) $*" >> $RUN/pipeline.log; }
export OMP_NUM_THREADS=1
train() {
  $A train --data $SHARDS --out $RUN/heads-$1 --model smollm2-135m --device cpu --kind $1 --num-heads 4 --loss kl \
    --lambda 0.8 --mse-weight 0.1 --loss-positions 512 --draft-vocab 8192 --steps ${STEPS:-1000} --batch-tokens 4096 \
    --lr 1e-3 --warmup 40 --clip 1.0 --seed 0 --train-dtype bf16 --save-dtype bf16 --cache-hidden runs/big/hidden \
    --eval-every 100 --eval-max-seqs 32 --save-every 20 --log $RUN/train-$1.jsonl \
    $( [ -f $RUN/heads-$1/trainer_state.pt ] && echo --resume ) >> $RUN/train-$1.log 2>&1
}
evaltau() {
  $A eval-tau --questions ../shared/data/mt_bench.jsonl --heads $RUN/heads-$1 --speculative $1 --device cpu \
    --tree $2 --per-category ${PER_CAT:-4} --max-new-tokens 256 --out $RUN/tau-$1-$2.json >> $RUN/tau-$1-$2.log 2>&1
}
( train medusa; log "medusa trained"; evaltau medusa mc_sim_7b_63; log "medusa static done";
  evaltau medusa dynamic-63; log "medusa dynamic done" ) &
m=$!
train amphista; log "amphista trained"
evaltau amphista dynamic-63 & a=$!
wait $m
evaltau amphista mc_sim_7b_63; log "amphista static done"
wait $a; log "amphista dynamic done"
log "all done"
