#!/bin/bash
# Session 21: a fresh machine (runs/ empty: session 20's trained heads and the bf16 hidden cache were gone) with AVX2
# only (no AVX-512 BF16: a bf16 matmul runs at 1/8 of fp32's speed), so no training stage fits the session. Work:
#   run_session21.sh distill        the rest of session 20's sampled general answers (its two workers, resumed from
#                                   the committed shards, fp32 target): all 2,308 general prompts x 2 answers
#   run_session21.sh trees KIND     static trees fitted to the shipped heads with held-out positions weighed to
#                                   MT-Bench's category mix (tree-search --source-weights; see MIX below), saved in a
#                                   copy of the heads (runs/s21/KIND) as mix-64: 63 draft nodes + the root, the size of
#                                   mc_sim_7b_63
#   run_session21.sh tau KIND TREE  all 80 MT-Bench first turns with the shipped heads (session16/tau_split.sh)
# Run from the repo root; every stage resumes on a rerun.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
R=${RUN:-runs/s21}
mkdir -p "$R"
source benchmarks/results/training_smollm2/session21/mtbench_mix.sh   # D, DATA, MIX
case "${1:?distill | trees KIND | tau KIND TREE}" in
distill)
    GENERAL=alpaca_en_demo,truthfulqa,wizardlm_testset,selfinstruct_seed,vicuna_bench,fastchat_dummy
    worker() {  # START END SOURCES: session 20's workers, with an fp32 target (this CPU has no fast bf16)
        [ -f "$R/distill-general-s2-$1.jsonl" ] || gunzip -c "$D/distill-general-s2-$1.jsonl.gz" > "$R/distill-general-s2-$1.jsonl"
        OMP_NUM_THREADS=1 python -m amphista_engine.cli distill --prompts ../shared/data/train_prompts.jsonl \
            --model smollm2-135m --device cpu --dtype fp32 --batch-size 64 --max-new-tokens 256 \
            --balance-by-source --seed 0 --sources $3 --samples 2 --temperature 0.7 \
            --out "$R/distill-general-s2-$1.jsonl" --offset "$1" --limit "$2" > "$R/distill-general-s2-$1.log" 2>&1
    }
    worker 0 3110 $GENERAL & worker 3110 8000 alpaca_en_demo,truthfulqa & wait
    for s in 0 3110; do gzip -9 -c "$R/distill-general-s2-$s.jsonl" > "$D/distill-general-s2-$s.jsonl.gz"; done ;;
trees)
    [ -d "$R/$2" ] || cp -r "amphista_engine/data/heads/smollm2-135m-$2" "$R/$2"
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python -m amphista_engine.cli tree-search --data $DATA --heads "$R/$2" \
        --device cpu --nodes 64 --prefix mix --source-weights "$MIX" --cache-hidden "$R/hidden" \
        --out "$R/trees-$2.json" --save ;;
tau)
    H=amphista_engine/data/heads/smollm2-135m-$2
    case "$3" in mix-*) H=$R/$2 ;; esac        # the copy that holds the fitted trees (same weights)
    benchmarks/results/training_smollm2/session16/tau_split.sh "$2" "$H" "$3" "$R/tau80-$2-$3.json" ;;
*) echo "unknown stage: $1"; exit 2 ;;
esac
