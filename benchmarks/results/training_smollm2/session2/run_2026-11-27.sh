#!/bin/bash
# The 2026-11-27 CPU run: stop the distill workers at a batch boundary at STOP, then cache, train, eval.
set -u
cd /work/main
RUN=runs/big
STOP=${STOP:-"03:40"}
A="python -m amphista_engine.cli"
log() { echo "$(date +%T) $*" >> $RUN/pipeline.log; }
# wait until STOP, then kill each worker right after it writes a batch
while [ "$(date +%H:%M)" \< "$STOP" ]; do sleep 20; done
log "stopping distill workers"
for f in distill distill2; do
  n0=$(wc -l < $RUN/$f.jsonl)
  pid=$(pgrep -f "out $RUN/$f.jsonl")
  while [ "$(wc -l < $RUN/$f.jsonl)" = "$n0" ] && kill -0 $pid 2>/dev/null; do sleep 2; done
  kill $pid; log "$f stopped at $(wc -l < $RUN/$f.jsonl) records"
done
sleep 3
mv $RUN/distill.jsonl $RUN/distill-0.jsonl; mv $RUN/distill2.jsonl $RUN/distill-3000.jsonl
SHARDS="$RUN/distill-0.jsonl $RUN/distill-3000.jsonl"
log "fill cache"
OMP_NUM_THREADS=2 $A train --data $SHARDS --out $RUN/hidden-fill --fill-cache --cache-hidden $RUN/hidden \
   --batch-tokens 4096 --device cpu > $RUN/fill.log 2>&1
log "fill done"
export OMP_NUM_THREADS=1
train() {
  $A train --data $SHARDS --out $RUN/heads-$1 --model smollm2-135m --device cpu --kind $1 --num-heads 4 --loss kl \
    --lambda 0.8 --mse-weight 0.1 --loss-positions 512 --draft-vocab 8192 --steps ${STEPS:-240} --batch-tokens 4096 \
    --lr 1e-3 --warmup 20 --clip 1.0 --seed 0 --save-dtype bf16 --cache-hidden $RUN/hidden --eval-every 40 \
    --eval-max-seqs 32 --save-every 20 --log $RUN/train-$1.jsonl $( [ -f $RUN/heads-$1/trainer_state.pt ] && echo --resume ) \
    > $RUN/train-$1.log 2>&1
}
evaltau() {
  $A eval-tau --questions ../shared/data/mt_bench.jsonl --heads $RUN/heads-$1 --speculative $1 --device cpu \
    --tree $2 --per-category ${PER_CAT:-2} --max-new-tokens 256 --out $RUN/tau-$1-$2.json > $RUN/tau-$1-$2.log 2>&1
}
( train medusa; log "medusa trained"; evaltau medusa mc_sim_7b_63; log "medusa static done";
  evaltau medusa dynamic-63; log "medusa dynamic done";
  while [ ! -f $RUN/amphista.trained ]; do sleep 10; done
  evaltau amphista dynamic-63; log "amphista dynamic done" ) &
( train amphista; touch $RUN/amphista.trained; log "amphista trained"; evaltau amphista mc_sim_7b_63;
  log "amphista static done" ) &
wait
log "all done"
