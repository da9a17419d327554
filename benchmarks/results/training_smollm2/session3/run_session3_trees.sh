#!/bin/bash
# After pipeline.sh: fit trees to both heads, then tau on the fitted 63-node trees.
set -u
cd /work/main
RUN=runs/v3
SHARDS="runs/big/distill-0.jsonl runs/big/distill-3000.jsonl"
A="python -m amphista_engine.cli"
log() { echo "$(date +%T) post: $*" >> $RUN/pipeline.log; }
export OMP_NUM_THREADS=1
waitfor() { while ! grep -q "$1" $RUN/pipeline.log 2>/dev/null; do sleep 15; done; }
ts() { $A tree-search --data $SHARDS --heads $RUN/heads-$1 --device cpu --cache-hidden runs/big/hidden \
        --nodes 16,32,63 --save --out $RUN/trees-$1.json > $RUN/trees-$1.log 2>&1; }
evaltau() {
  $A eval-tau --questions ../shared/data/mt_bench.jsonl --heads $RUN/heads-$1 --speculative $1 --device cpu \
    --tree $2 --per-category 4 --max-new-tokens 256 --out $RUN/tau-$1-$2.json >> $RUN/tau-$1-$2.log 2>&1
}
waitfor "medusa dynamic done"
waitfor "amphista trained"
ts medusa; ts amphista; log "trees fitted"
evaltau medusa tuned-63 & m=$!
evaltau amphista tuned-63; log "amphista tuned done"
wait $m; log "medusa tuned done"
log "post done"
