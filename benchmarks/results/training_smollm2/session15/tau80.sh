#!/bin/bash
# Session 15: tau of the shipped pair on ALL 80 MT-Bench first turns (the bar's question file), not only the 32
# (4 per category) every earlier session measured. eval-tau resumes from its --out file when the heads' weights,
# tree and token budget match, so each run is seeded with the 32-question file of the same heads and computes
# only the 48 questions it lacks. Run from the repo root; one thread per run, two runs side by side; outputs
# in runs/s15 (OUT=...), to be copied here once complete.
#   tau80.sh amphista | medusa
set -euo pipefail
cd "$(dirname "$0")/../../../.."
KIND=$1
T=benchmarks/results/training_smollm2
H=amphista_engine/data/heads/smollm2-135m-$KIND
O=${OUT:-runs/s15}; mkdir -p "$O"
for TREE in mc_sim_7b_63 dynamic-63; do
    out=$O/tau80-$KIND-$TREE.json
    # seed: the committed 32-question run, its heads path rewritten to the shipped copy (same weights, same digest)
    [ -f "$out" ] || python - "$T/tau-$KIND-$TREE.json" "$out" "$H" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
json.dump({"heads": sys.argv[3], "heads_digest": d["heads_digest"], "kind": d["kind"], "tree": d["tree"],
           "max_new_tokens": d["max_new_tokens"], "partial": True, "per_question": d["per_question"]},
          open(sys.argv[2], "w"), indent=2)
PY
    OMP_NUM_THREADS=1 python -m amphista_engine.cli eval-tau --questions ../shared/data/mt_bench.jsonl --heads "$H" \
        --speculative "$KIND" --device cpu --tree "$TREE" --max-new-tokens 256 --out "$out" > "${out%.json}.log" 2>&1 &
done
wait
