#!/bin/bash
# Session 22: session 20's stage, sized for an AVX2-only CPU (no bf16 matmul: fill and training in fp32) and for one
# session. The hidden cache of all 18 shards would take ~2 h to fill here (~520 tokens/s on 2 threads), so the stage
# trains on a third of the data: both sampled answers of all 2,308 general prompts (the data session 20 only half
# had) and one balanced shard of the five large sources (distill-10000), so math, code and roleplay stay in the mix.
# Same start (the shipped heads), learning rate, positions, loss and source weights as session 20.
# Run from the repo root; every stage resumes on a rerun.
#   run_session22.sh amphista      fp32 cache fill (~40 min), then STEPS (default 500) from the shipped heads
#   run_session22.sh medusa        the same stage for the shipped Medusa heads (reuses the cache)
#   run_session22.sh tau KIND TREE all 80 MT-Bench first turns (session16/tau_split.sh, ~22 min)
# Result (2026-12-03): Amphista 500 steps, mix-64 tau 2.475 vs the shipped 2.486: not shipped (TRAINING.md, "Twenty-second session").
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=benchmarks/results/training_smollm2/distill
R=${RUN:-runs/s22}
# session 20 weights, less mbpp (not in these shards; train refuses weights for absent sources)
WEIGHTS=${WEIGHTS:-alpaca_en_demo=2,wizardlm_testset=2,vicuna_bench=2,selfinstruct_seed=2,truthfulqa=1.5,t0_p3=1.5,gsm8k_train=0.5,gpteacher_codegen=0.5,code_alpaca_2k=0.5}
DATA="$D/distill-general-s2-0.jsonl.gz $D/distill-general-s2-3110.jsonl.gz $D/distill-10000.jsonl.gz"
mkdir -p "$R"
stage() {   # KIND STEPS
    KIND=$1 DATA="$DATA" RUN=$R/$1 HIDDEN=$R/hidden STEPS=$2 LR=2e-4 LOSS_POSITIONS=512 FILL_DTYPE=fp32 \
        TRAIN_DTYPE=fp32 EVAL_EVERY=250 TREES="" OMP_NUM_THREADS=2 EXTRA="--source-weights $WEIGHTS" \
        scripts/continue_heads.sh >> "$R/$1.log" 2>&1
}
case "${1:?amphista | medusa | tau KIND TREE}" in
amphista|medusa) stage "$1" "${STEPS:-500}" ;;
tau)    # new heads carry no fitted trees: mix-64 is the shipped heads' (session 21's tree-search file)
    T=$3; [ "$T" = mix-64 ] && T=benchmarks/results/training_smollm2/session21/trees-$2.json
    benchmarks/results/training_smollm2/session16/tau_split.sh "$2" "$R/$2/heads" "$T" "$R/tau80-$2-$3.json" ;;
*) echo "unknown stage: $1"; exit 2 ;;
esac
