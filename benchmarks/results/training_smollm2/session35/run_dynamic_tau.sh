#!/usr/bin/env bash
# Held-out tau of dynamic-N trees for the shipped heads (session 35), so `--speculative auto` can weigh them
# beside the fitted mix-N trees: the same data, held-out split and MT-Bench-mix source weights as session 21's
# `run_session21.sh trees` (its MIX), no --save (the dynamic entries are merged into the shipped config.json's
# tree_search_mix record by hand; the refitted mix-N taus must equal the recorded ones, which checks the split).
#   run_dynamic_tau.sh KIND        (KIND: amphista or medusa; run from the repo root; ~10 min a kind, the second
#                                   reuses the first's hidden states)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=benchmarks/results/training_smollm2/distill
R=${RUN:-runs/s35}
mkdir -p "$R"
DATA=""
for s in 0 3000 6000 7000 8000 9000 10000 11000 12000 13000; do DATA="$DATA $D/distill-$s.jsonl.gz"; done
G=10.7
MIX=alpaca_en_demo=$G,truthfulqa=$G,wizardlm_testset=$G,selfinstruct_seed=$G,vicuna_bench=$G,fastchat_dummy=$G
MIX=$MIX,t0_p3=3.98,gpteacher_roleplay=1.69,gsm8k_train=2.38
python -m amphista_engine.cli tree-search --data $DATA --heads "amphista_engine/data/heads/smollm2-135m-${1:?KIND}" \
    --device cpu --nodes 4,8,16,32,64 --dynamic 4,8,16,32,64 --prefix mix --source-weights "$MIX" \
    --cache-hidden "$R/hidden" --out "benchmarks/results/training_smollm2/session35/trees-$1.json"
