#!/bin/bash
# Session 8: train (run_klall.sh, resumable), then tau on the bar's 32 first turns for both bar trees.
cd /work/main
RUN=runs/s8
bash $RUN/run_klall.sh
grep -q trained $RUN/run_klall.done 2>/dev/null || exit 1
for t in mc_sim_7b_63 dynamic-63; do
  OMP_NUM_THREADS=1 python -m amphista_engine.cli eval-tau --questions ../shared/data/mt_bench.jsonl --heads $RUN/klall \
    --speculative amphista --device cpu --tree $t --per-category 4 --max-new-tokens 256 \
    --out $RUN/tau-klall-$t.json > $RUN/tau-klall-$t.log 2>&1 &
done
wait
echo "$(date +%T) tau done" >> $RUN/run_klall.done
