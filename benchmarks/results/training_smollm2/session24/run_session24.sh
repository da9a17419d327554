#!/bin/bash
# Session 24: session 20's stage (the one that gave static tau 2.497 before its heads were lost with their machine)
# on all twelve committed shards, now with both sampled answers of every general prompt, sized for an AVX2-only
# CPU: fp32 fill and training, 1000 steps instead of 1200 (to leave the session time for the tau run), and the
# hidden cache holds only what the steps read (`train --fill-planned`). The fill was run for 1200 steps: 9,619 of
# 22,022 sequences, 2.27M of 4.45M tokens (the weighted mix walks 0.64 of an epoch in 1200 steps, and the math
# and code sources at weight 0.5 give a third of theirs); 1000 steps read a subset of those. Same start (the
# shipped heads), learning rate, positions, loss, seed and source weights as session 20.
# Run from the repo root; every stage resumes on a rerun.
#   run_session24.sh amphista       fill (46 min for the new states on 2 threads), then 1000 steps (~75 min)
#   run_session24.sh medusa         the same stage for the shipped Medusa heads (reads the same cache)
#   run_session24.sh trees KIND     mix-64 fitted to the new heads as session 21 fitted it to the shipped ones (the
#                                   same held-out split and MT-Bench-mix weights; with HIDDEN_TREES=runs/mix/hidden,
#                                   session 21's cache of those 684 sequences, only the heads run: minutes)
#   run_session24.sh tau KIND TREE  all 80 MT-Bench first turns (session16/tau_split.sh, ~25 min)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=benchmarks/results/training_smollm2/distill
R=${RUN:-runs/s24}
HIDDEN=${HIDDEN:-$R/hidden}     # session 24 ran with HIDDEN=runs/s22/hidden (session 22's fp32 fill, 5,612 sequences)
WEIGHTS=${WEIGHTS:-alpaca_en_demo=2,wizardlm_testset=2,vicuna_bench=2,selfinstruct_seed=2,truthfulqa=1.5,t0_p3=1.5,gsm8k_train=0.5,gpteacher_codegen=0.5,code_alpaca_2k=0.5,mbpp=0.5}
DATA=""
for s in 0 3000 6000 7000 8000 9000 10000 11000 12000 13000; do DATA="$DATA $D/distill-$s.jsonl.gz"; done
DATA="$DATA $D/distill-general-s2-0.jsonl.gz $D/distill-general-s2-3110.jsonl.gz"
# session 21's MT-Bench category mix over the held-out positions (run_session21.sh explains the weights)
G=10.7
MIX=alpaca_en_demo=$G,truthfulqa=$G,wizardlm_testset=$G,selfinstruct_seed=$G,vicuna_bench=$G,fastchat_dummy=$G
MIX=$MIX,t0_p3=3.98,gpteacher_roleplay=1.69,gsm8k_train=2.38
GREEDY=""
for s in 0 3000 6000 7000 8000 9000 10000 11000 12000 13000; do GREEDY="$GREEDY $D/distill-$s.jsonl.gz"; done
mkdir -p "$R"
stage() {   # KIND STEPS
    KIND=$1 DATA="${DATA# }" RUN=$R/$1 HIDDEN=$HIDDEN STEPS=$2 LR=2e-4 LOSS_POSITIONS=512 FILL_DTYPE=fp32 \
        FILL_PLANNED=1 TRAIN_DTYPE=fp32 EVAL_EVERY=300 TREES="" OMP_NUM_THREADS=2 \
        EXTRA="--source-weights $WEIGHTS" scripts/continue_heads.sh >> "$R/$1.log" 2>&1
}
case "${1:?amphista | medusa | trees KIND | tau KIND TREE}" in
amphista|medusa) stage "$1" "${STEPS:-1000}" ;;
trees)      # session 21's tree search (greedy shards: the same held-out split), saved in the new heads as mix-64
    OMP_NUM_THREADS=2 python -m amphista_engine.cli tree-search --data $GREEDY --heads "$R/$2/heads" --device cpu \
        --nodes 64 --prefix mix --source-weights "$MIX" --cache-hidden "${HIDDEN_TREES:-$R/hidden-trees}" \
        --out "$R/trees-$2.json" --save ;;
tau) benchmarks/results/training_smollm2/session16/tau_split.sh "$2" "$R/$2/heads" "$3" "$R/tau80-$2-$3.json" ;;
*) echo "unknown stage: $1"; exit 2 ;;
esac
