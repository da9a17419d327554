#!/usr/bin/env bash
# Held-out tau of dynamic-N trees for the shipped heads (session 35), so `--speculative auto` can weigh them
# beside the fitted mix-N trees: the same data, held-out split and MT-Bench-mix source weights as session 21's
# `run_session21.sh trees` (its MIX), no --save (the dynamic entries are merged into the shipped config.json's
# tree_search_mix record by hand; the refitted mix-N taus must equal the recorded ones, which checks the split).
#   run_dynamic_tau.sh KIND        (KIND: amphista or medusa; run from the repo root; ~10 min a kind, the second
#                                   reuses the first's hidden states)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
R=${RUN:-runs/s35}
mkdir -p "$R"
source benchmarks/results/training_smollm2/session21/mtbench_mix.sh   # D, DATA, MIX
python -m amphista_engine.cli tree-search --data $DATA --heads "amphista_engine/data/heads/smollm2-135m-${1:?KIND}" \
    --device cpu --nodes 4,8,16,32,64 --dynamic 4,8,16,32,64 --prefix mix --source-weights "$MIX" \
    --cache-hidden "$R/hidden" --out "benchmarks/results/training_smollm2/session35/trees-$1.json"
