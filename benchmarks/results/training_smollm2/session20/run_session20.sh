#!/bin/bash
# Session 20: more general-chat contexts. Session 19 found the small general-instruction sources (alpaca,
# truthfulqa, wizardlm, selfinstruct, vicuna_bench, fastchat: 2,308 prompts) used up by prompt 6,000 of the balanced
# order, and weighting their greedy answers up (x2-3, repeats of the same sequence) gave the static tree +0.5%.
# This session adds two sampled answers per general prompt (temperature 0.7, ids ID#s0/ID#s1; the held-out split
# hashes the prompt id, so a prompt's answers stay on one side), so the same weight buys new sequences, not repeats.
# Run from the repo root; every stage resumes on a rerun.
#   run_session20.sh distill     two 1-thread workers over the general prompts (~70 min on 2 cores). The committed
#                                shards were stopped at 49 min for the session clock: 1,664 + 1,792 records, i.e. both
#                                answers of 1,728 of the 2,308 prompts (all of vicuna_bench and fastchat_dummy).
#   run_session20.sh amphista    cache fill of the new sequences (bf16), then 1200 steps from the shipped heads
#   run_session20.sh medusa      the same stage for the shipped Medusa heads
#   run_session20.sh tau KIND TREE   all 80 MT-Bench first turns (session16/tau_split.sh, ~20 min)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=benchmarks/results/training_smollm2/distill
R=${RUN:-runs/s20}
HIDDEN=${HIDDEN:-runs/s18/hidden}      # session 18's bf16 fill of all 14,000 prompts; new sequences are added to it
GENERAL=alpaca_en_demo,truthfulqa,wizardlm_testset,selfinstruct_seed,vicuna_bench,fastchat_dummy
# The general prompts sit at [0, 7711) of the balanced order; 3110 splits them in half (1,154 each). The four small
# sources all sit before it, so the second worker names only the two that reach past it.
SPLIT=3110
WEIGHTS=${WEIGHTS:-alpaca_en_demo=2,wizardlm_testset=2,vicuna_bench=2,selfinstruct_seed=2,truthfulqa=1.5,t0_p3=1.5,gsm8k_train=0.5,gpteacher_codegen=0.5,code_alpaca_2k=0.5,mbpp=0.5}
mkdir -p "$R"
DATA=""
for s in 0 3000 6000 7000 8000 9000 10000 11000 12000 13000; do DATA="$DATA $D/distill-$s.jsonl.gz"; done
DATA="$DATA $D/distill-general-s2-0.jsonl.gz $D/distill-general-s2-$SPLIT.jsonl.gz"
stage() {   # KIND STEPS
    KIND=$1 DATA="${DATA# }" RUN=$R/$1 HIDDEN=$HIDDEN STEPS=$2 LR=2e-4 LOSS_POSITIONS=512 FILL_DTYPE=bf16 \
        EVAL_EVERY=300 TREES="" OMP_NUM_THREADS=2 EXTRA="--source-weights $WEIGHTS" \
        scripts/continue_heads.sh >> "$R/$1.log" 2>&1
}
case "${1:?distill | amphista | medusa | tau KIND TREE}" in
distill)
    for s in 0 $SPLIT; do [ -f "$D/distill-general-s2-$s.jsonl.gz" ] && { echo "$D/distill-general-s2-$s.jsonl.gz exists"; exit 1; }; done
    worker() {  # START END SOURCES: the committed shards' settings (workers.sh), plus the sources and the sampling
        OMP_NUM_THREADS=1 python -m amphista_engine.cli distill --prompts ../shared/data/train_prompts.jsonl \
            --model smollm2-135m --device cpu --dtype bf16 --batch-size 64 --max-new-tokens 256 \
            --balance-by-source --seed 0 --sources $3 --samples 2 --temperature 0.7 \
            --out "$R/distill-general-s2-$1.jsonl" --offset "$1" --limit "$2" > "$R/distill-general-s2-$1.log" 2>&1
    }
    worker 0 $SPLIT $GENERAL & worker $SPLIT 8000 alpaca_en_demo,truthfulqa & wait
    for s in 0 $SPLIT; do gzip -9 -c "$R/distill-general-s2-$s.jsonl" > "$D/distill-general-s2-$s.jsonl.gz"; done ;;
amphista|medusa) stage "$1" "${STEPS:-1200}" ;;
tau) benchmarks/results/training_smollm2/session16/tau_split.sh "$2" "$R/$2/heads" "$3" "$R/tau80-$2-$3.json" ;;
*) echo "unknown stage: $1"; exit 2 ;;
esac
