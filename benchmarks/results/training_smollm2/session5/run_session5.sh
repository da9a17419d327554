#!/bin/bash
# Session 5 (2026-11-27): the session-4 recipe and data, 3000 steps instead of 1000 (runs/v5/run.sh, then
# runs/v5/pipeline.sh). Both runs resumed from trainer_state.pt several times: started in session 4 (steps
# 0-~440), resumed at the start of session 5, and again after the epoch-boundary fix (BatchPlan, commit
# 066b692): Medusa crashed at step 1685 with the old step -> batch map and resumed from 1680, Amphista was
# restarted at step 1180 before reaching it; Amphista ran its last steps with OMP_NUM_THREADS=2.
# A rebuild from scratch with the fixed code gives the same batches up to the end of epoch 1 (step ~1124), then its own order.

### runs/v5/run.sh
# Session 4 -> 5: the session-3 recipe on the 6,000-prompt data for 3000 steps (5.3 epochs) instead of 1000.
# Resumable: rerun this script; each kind continues from its trainer_state.pt.
cd /work/main
RUN=runs/v5
A="python -m amphista_engine.cli"
SHARDS="runs/big/distill-0.jsonl runs/next/distill-bf16-1200.jsonl runs/big/distill-3000.jsonl runs/next/distill-bf16-3896.jsonl"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
train() {
  $A train --data $SHARDS --out $RUN/heads-$1 --model smollm2-135m --device cpu --kind $1 --num-heads 4 --loss kl \
    --lambda 0.8 --mse-weight 0.1 --loss-positions 512 --draft-vocab 8192 --steps 3000 --batch-tokens 4096 \
    --lr 1e-3 --warmup 40 --clip 1.0 --seed 0 --train-dtype bf16 --save-dtype bf16 --cache-hidden runs/big/hidden \
    --eval-every 250 --eval-max-seqs 32 --save-every 20 --log $RUN/train-$1.jsonl \
    $( [ -f $RUN/heads-$1/trainer_state.pt ] && echo --resume ) >> $RUN/train-$1.log 2>&1
  echo "$(date +%T) $1 trained" >> $RUN/run.log
}
for k in ${@:-amphista medusa}; do train $k & done; wait

### runs/v5/pipeline.sh
# Session 5: wait for run.sh's 3000-step trainings, then tau (as in runs/v4) and fitted trees.
set -u
cd /work/main
RUN=runs/v5
A="python -m amphista_engine.cli"
SHARDS="runs/big/distill-0.jsonl runs/next/distill-bf16-1200.jsonl runs/big/distill-3000.jsonl runs/next/distill-bf16-3896.jsonl"
export OMP_NUM_THREADS=1
log() { echo "$(date +%T) $*" >> $RUN/pipeline.log; }
trained() { python - "$RUN/heads-$1/config.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))["extra"]["training"]
sys.exit(0 if t["step"] == t["total_steps"] == 3000 else 1)
PY
}
evaltau() {  # kind tree
  until trained $1 && ! pgrep -f "out $RUN/heads-$1 " >/dev/null; do sleep 20; done
  log "tau $1 $2 start"
  $A eval-tau --questions ../shared/data/mt_bench.jsonl --heads $RUN/heads-$1 --speculative $1 --device cpu \
    --tree $2 --per-category 4 --max-new-tokens 256 --out $RUN/tau-$1-$2.json > $RUN/tau-$1-$2.log 2>&1
  log "tau $1 $2 done"
}
queue() { for job in "$@"; do mkdir $RUN/lock-$job 2>/dev/null && evaltau ${job%%:*} ${job##*:}; done; true; }
( queue medusa:mc_sim_7b_63 medusa:dynamic-63 amphista:dynamic-63 amphista:mc_sim_7b_63 ) &
( queue amphista:mc_sim_7b_63 amphista:dynamic-63 medusa:dynamic-63 medusa:mc_sim_7b_63 ) &
wait
log "tau done"
for k in amphista medusa; do
  $A tree-search --data $SHARDS --heads $RUN/heads-$k --model smollm2-135m --device cpu --cache-hidden runs/big/hidden \
    --nodes 16,32,63 --save --out $RUN/trees-$k.json > $RUN/trees-$k.log 2>&1 &
done
wait
log "all done"
