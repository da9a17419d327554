#!/bin/bash
# Session 8: the shipped Amphista heads drafting over the full vocabulary, tau on the bar's 32 first turns (fp32,
# 256 tokens), both bar trees side by side on one thread each; then the held-out walk for full / 16384.
# From the repo root. (Run on 2026-11-27 with the full-vocabulary copy at runs/s8/heads-amphista-fullvocab,
# the same files as make_vocab_heads.py 0 writes.)
set -u
SHARDS="runs/big/distill-0.jsonl runs/next/distill-bf16-1200.jsonl runs/big/distill-3000.jsonl runs/next/distill-bf16-3896.jsonl"
PYTHONPATH=. python benchmarks/results/training_smollm2/session8/make_vocab_heads.py 0 16384
for t in mc_sim_7b_63 dynamic-63; do
  OMP_NUM_THREADS=1 python -m amphista_engine.cli eval-tau --questions ../shared/data/mt_bench.jsonl \
    --heads runs/s8/heads-amphista-v0 --speculative amphista --device cpu --tree $t --per-category 4 \
    --max-new-tokens 256 --out runs/s8/tau-fullvocab-$t.json > runs/s8/tau-fullvocab-$t.log 2>&1 &
done
wait
for n in 0 16384; do
  OMP_NUM_THREADS=2 python -m amphista_engine.cli tree-search --data $SHARDS --heads runs/s8/heads-amphista-v$n \
    --model smollm2-135m --device cpu --cache-hidden runs/big/hidden --nodes 16,32,63 --out runs/s8/trees-v$n.json
done
