#!/bin/bash
# tau on all 80 MT-Bench first turns in half the wall time: two 1-thread eval-tau runs on alternate questions
# (each gets 5 of every category's 10), then the merged rows seed one eval-tau run on the whole file, which
# resumes every question (same heads digest, tree and token budget), computes nothing and writes the summary
# with eval-tau's own aggregation. Run from the repo root.
#   tau_split.sh KIND HEADS TREE OUT.json
set -euo pipefail
cd "$(dirname "$0")/../../../.."
KIND=$1 HEADS=$2 TREE=$3 OUT=$4
Q=../shared/data/mt_bench.jsonl
W=${OUT%.json}.parts; mkdir -p "$W"
awk "NR % 2 == 1" "$Q" > "$W/q0.jsonl"; awk "NR % 2 == 0" "$Q" > "$W/q1.jsonl"
run() { OMP_NUM_THREADS=1 python -m amphista_engine.cli eval-tau --questions "$W/q$1.jsonl" --heads "$HEADS" \
            --speculative "$KIND" --device cpu --tree "$TREE" --max-new-tokens 256 --out "$W/part$1.json" \
            > "$W/part$1.log" 2>&1; }
run 0 & run 1 & wait
python - "$W/part0.json" "$W/part1.json" "$OUT" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
keys = ("heads", "heads_digest", "kind", "tree", "max_new_tokens")
assert all(a[k] == b[k] for k in keys) and not a.get("partial") and not b.get("partial"), "a half is unfinished"
json.dump({**{k: a[k] for k in keys}, "partial": True, "per_question": a["per_question"] + b["per_question"]},
          open(sys.argv[3], "w"), indent=2)
PY
OMP_NUM_THREADS=2 python -m amphista_engine.cli eval-tau --questions "$Q" --heads "$HEADS" --speculative "$KIND" \
    --device cpu --tree "$TREE" --max-new-tokens 256 --out "$OUT" | tee "${OUT%.json}.log"
