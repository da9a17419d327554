#!/usr/bin/env bash
# Trains the shipped smollm2-135m Amphista heads further on the committed distillation data, then measures tau
# on the MT-Bench bar's 80 first turns. Made for a session without a GPU whose checkout is fresh (runs/ empty):
# the trainer state of earlier runs is gone, so training starts from the shipped bf16 weights with a fresh
# optimiser (`train --init-from`, warmup then cosine to 0) instead of `--resume`. Every step is resumable:
# rerun the script after an interruption.
#
#   scripts/continue_heads.sh                          # 1500 steps, lr 1.5e-4, then tau on both trees
#   STEPS=3000 LR=2e-4 scripts/continue_heads.sh
#   RUN=runs/wide EXTRA="--sal-intermediate-size 2048 --aeb-intermediate-size 2048" scripts/continue_heads.sh
#                                                      # wider MLPs (31.5 MB in bf16, under the 32 MB cap)
#   SHIP_TO=amphista_engine/data/heads/smollm2-135m-amphista scripts/continue_heads.sh   # also replaces them
#
# On 2 cores (AMD EPYC, measured): filling the hidden cache takes ~40 min for 6,000 prompts (~105 min for 14,000 in
# fp32, ~60 min with FILL_DTYPE=bf16), a cached step ~1.8 s (1500 steps
# ~45 min); each tau run ~40 min on all 80 questions (both at once).
set -euo pipefail
# Settings come from the environment only: `--help` (or any argument) used to start the whole run.
if [ $# -gt 0 ]; then
    case "$1" in
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
        *) echo "continue_heads: unknown argument '$1': settings are environment variables (see --help)" >&2
           exit 64 ;;
    esac
fi
cd "$(dirname "$0")/.."

A=${AMPHISTA:-"python -m amphista_engine.cli"}
KIND=${KIND:-amphista}
FROM=${FROM:-amphista_engine/data/heads/smollm2-135m-$KIND}
COMMITTED=${COMMITTED:-benchmarks/results/training_smollm2/distill}
RUN=${RUN:-runs/continue}
HIDDEN=${HIDDEN:-$RUN/hidden}                     # another run's cache: only new sequences are computed
STEPS=${STEPS:-1500}; LR=${LR:-1.5e-4}; LOSS_POSITIONS=${LOSS_POSITIONS:-512}
WARMUP=${WARMUP:-$(( STEPS < 40 ? STEPS : 40 ))}   # train refuses a warmup longer than the run (smoke runs)
BATCH_TOKENS=${BATCH_TOKENS:-4096}; EVAL_EVERY=${EVAL_EVERY:-300}
TREES=${TREES-"mc_sim_7b_63 dynamic-63"}; EVAL_TOKENS=${EVAL_TOKENS:-256}
PER_CATEGORY=${PER_CATEGORY-}   # questions per category; empty (default) = all 80, 4 = the 32 of sessions 2-15
QUESTIONS=${QUESTIONS:-../shared/data/mt_bench.jsonl}
SHIP_TO=${SHIP_TO:-}
# TREES="" skips the tau runs (one stage of a longer job).
# The source's draft vocabulary (warm starts must keep it); 0 = the source drafts over the whole vocabulary.
DRAFT_VOCAB=${DRAFT_VOCAB:-$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['draft_vocab_size'])" "$FROM/config.json")}
EXTRA=${EXTRA:-}                                   # more `train` flags, e.g. a wider layout
mkdir -p "$RUN"

shards=()
if [ -n "${DATA:-}" ]; then
    read -r -a shards <<< "$DATA"
else
    for f in "$COMMITTED"/*.jsonl.gz; do [ -f "$f" ] && shards+=("$f"); done
fi
[ "${#shards[@]}" -gt 0 ] || { echo "no training data: no shards in $COMMITTED and DATA is empty"; exit 1; }

# the target's hidden states, once (2 threads); training then skips the target forward. FILL_DTYPE=bf16 computes
# them with a bf16 target: 1.8x faster on an AVX-512-BF16 CPU (eighteenth session), states within ~2% of fp32's
FILL_DTYPE=${FILL_DTYPE:-fp32}
# bf16 autocast trains ~1.5x faster on AVX-512-BF16 CPUs; on AVX2-only ones a bf16 matmul is 8x slower than fp32
TRAIN_DTYPE=${TRAIN_DTYPE:-bf16}
# FILL_PLANNED=1 fills only the sequences the STEPS steps read (and the held-out ones): a stage that walks part of
# an epoch of a weighted mix needs a fraction of the data (twenty-fourth session: 51% of the tokens)
planned=()
[ -n "${FILL_PLANNED:-}" ] && planned=(--fill-planned --steps "$STEPS" --seed 0 --eval-max-seqs 32 $EXTRA)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} $A train --data "${shards[@]}" --out "$RUN/hidden-fill" --model smollm2-135m \
    --device cpu --fill-cache --cache-hidden "$HIDDEN" --batch-tokens "$BATCH_TOKENS" --dtype "$FILL_DTYPE" \
    "${planned[@]}"

# the shipped recipe (TRAINING.md) except the start and the schedule; the draft vocabulary is the source's
RESUME=""
[ -f "$RUN/heads/trainer_state.pt" ] && RESUME="--resume"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} $A train --data "${shards[@]}" --out "$RUN/heads" --model smollm2-135m \
    --device cpu --kind "$KIND" --num-heads 4 --init-from "$FROM" --loss kl --lambda 0.8 --mse-weight 0.1 \
    --loss-positions "$LOSS_POSITIONS" --draft-vocab "$DRAFT_VOCAB" --steps "$STEPS" --batch-tokens "$BATCH_TOKENS" \
    --lr "$LR" --warmup "$WARMUP" --clip 1.0 --seed 0 --train-dtype "$TRAIN_DTYPE" --save-dtype bf16 \
    --cache-hidden "$HIDDEN" --eval-every "$EVAL_EVERY" --eval-max-seqs 32 --save-every 20 \
    --log "$RUN/train.jsonl" $RESUME $EXTRA

per_cat=()
[ -n "$PER_CATEGORY" ] && per_cat=(--per-category "$PER_CATEGORY")
pids=()
for TREE in $TREES; do      # one thread each, side by side
    OMP_NUM_THREADS=1 $A eval-tau --questions "$QUESTIONS" --heads "$RUN/heads" --speculative "$KIND" \
        --device cpu --tree "$TREE" "${per_cat[@]}" --max-new-tokens "$EVAL_TOKENS" --out "$RUN/tau-$TREE.json" &
    pids+=($!)
done
# a bare `wait` exits 0 whatever the runs did (and SHIP_TO then replaced the shipped heads all the same)
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done
[ "$rc" -eq 0 ] || { echo "continue_heads: an eval-tau run failed (exit $rc); nothing shipped" >&2; exit "$rc"; }

if [ -n "$SHIP_TO" ]; then
    cp "$RUN/heads/config.json" "$RUN/heads/model.safetensors" "$SHIP_TO/"
fi
