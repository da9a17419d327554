#!/bin/bash
# Session 19: session 18's stage (prompts [0, 14000), 1200 steps at 512 positions, lr 2e-4, from the shipped heads,
# the same bf16-filled hidden cache) with one change: the source mix. Prompts since the tenth session came from the
# five large sources only (gsm8k, two code sets, t0, roleplay): the small general-instruction sources were used up by
# prompt 6,000. MT-Bench's weak categories (extraction, humanities, stem, writing: 2.21-2.33 static vs 2.75-3.14 for
# math and coding) are general chat, so this stage weighs the general sources up and code/math down.
# Run from the repo root; every stage resumes on a rerun.
#   run_session19.sh amphista    1200 steps from the shipped Amphista heads (~55 min on 2 threads)
#   run_session19.sh medusa      the same stage for the shipped Medusa heads (~20 min)
#   run_session19.sh tau KIND TREE   all 80 MT-Bench first turns (session16/tau_split.sh, ~20 min)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=benchmarks/results/training_smollm2/distill
R=${RUN:-runs/s19}
HIDDEN=${HIDDEN:-runs/s18/hidden}      # session 18's bf16 fill of all 14,000 prompts (run_session18.sh fill)
WEIGHTS=${WEIGHTS:-alpaca_en_demo=3,wizardlm_testset=3,vicuna_bench=3,selfinstruct_seed=3,truthfulqa=2,t0_p3=1.5,gsm8k_train=0.5,gpteacher_codegen=0.5,code_alpaca_2k=0.5,mbpp=0.5}
mkdir -p "$R"
DATA=""
for s in 0 3000 6000 7000 8000 9000 10000 11000 12000 13000; do DATA="$DATA $D/distill-$s.jsonl.gz"; done
stage() {   # KIND STEPS
    KIND=$1 DATA="${DATA# }" RUN=$R/$1 HIDDEN=$HIDDEN STEPS=$2 LR=2e-4 LOSS_POSITIONS=512 FILL_DTYPE=bf16 \
        EVAL_EVERY=300 TREES="" OMP_NUM_THREADS=2 EXTRA="--source-weights $WEIGHTS" \
        scripts/continue_heads.sh >> "$R/$1.log" 2>&1
}
case "${1:?amphista | medusa | tau KIND TREE}" in
amphista|medusa) stage "$1" "${STEPS:-1200}" ;;
tau) benchmarks/results/training_smollm2/session16/tau_split.sh "$2" "$R/$2/heads" "$3" "$R/tau80-$2-$3.json" ;;
*) echo "unknown stage: $1"; exit 2 ;;
esac
