#!/bin/bash
# Session 4 (2026-11-27): session-3 recipe on 3x the data (prompts [0, 6000) of the balanced order).
# The medusa:dynamic-63 tau run was started by hand after the others (its lock had been taken to free a core); same command.
set -u
cd /work/main
RUN=runs/v4
A="python -m amphista_engine.cli"
log() { echo "$(date +%T) $*" >> $RUN/pipeline.log; }
while pgrep -f "amphista_engine.cli distill" >/dev/null; do sleep 15; done
log "distill done: $(wc -l runs/next/distill-bf16-*.jsonl | tail -1)"
SHARDS="runs/big/distill-0.jsonl runs/next/distill-bf16-1200.jsonl runs/big/distill-3000.jsonl runs/next/distill-bf16-3896.jsonl"
OMP_NUM_THREADS=2 $A train --data $SHARDS --out $RUN/hidden-fill --model smollm2-135m --fill-cache --cache-hidden runs/big/hidden \
   --batch-tokens 4096 --device cpu > $RUN/fill.log 2>&1
log "fill done"
export OMP_NUM_THREADS=1
train() {
  $A train --data $SHARDS --out $RUN/heads-$1 --model smollm2-135m --device cpu --kind $1 --num-heads 4 --loss kl \
    --lambda 0.8 --mse-weight 0.1 --loss-positions 512 --draft-vocab 8192 --steps ${STEPS:-1000} --batch-tokens 4096 \
    --lr 1e-3 --warmup 40 --clip 1.0 --seed 0 --train-dtype bf16 --save-dtype bf16 --cache-hidden runs/big/hidden \
    --eval-every 100 --eval-max-seqs 32 --save-every 20 --log $RUN/train-$1.jsonl \
    $( [ -f $RUN/heads-$1/trainer_state.pt ] && echo --resume ) > $RUN/train-$1.log 2>&1
  touch $RUN/$1.trained; log "$1 trained"
}
evaltau() {  # kind tree
  while [ ! -f $RUN/$1.trained ]; do sleep 10; done
  $A eval-tau --questions ../shared/data/mt_bench.jsonl --heads $RUN/heads-$1 --speculative $1 --device cpu \
    --tree $2 --per-category 4 --max-new-tokens 256 --out $RUN/tau-$1-$2.json > $RUN/tau-$1-$2.log 2>&1
  log "tau $1 $2 done"
}
queue() { for job in "$@"; do mkdir $RUN/lock-$job 2>/dev/null && evaltau ${job%%:*} ${job##*:}; done; true; }
( train medusa; queue medusa:mc_sim_7b_63 amphista:dynamic-63 medusa:dynamic-63 amphista:mc_sim_7b_63 ) &
( train amphista; queue amphista:mc_sim_7b_63 medusa:dynamic-63 amphista:dynamic-63 medusa:mc_sim_7b_63 ) &
wait
log "tau done"
for k in amphista medusa; do
  $A tree-search --data $SHARDS --heads $RUN/heads-$k --model smollm2-135m --device cpu --cache-hidden runs/big/hidden \
    --nodes 16,32,63 --save --out $RUN/trees-$k.json > $RUN/trees-$k.log 2>&1 &
done
wait
log "all done"
