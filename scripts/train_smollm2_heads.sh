#!/usr/bin/env bash
# Rebuilds the Amphista and Medusa heads shipped for smollm2-135m (amphista_engine/data/heads/) and measures
# their tau on MT-Bench first turns. Defaults = the first stage of the shipped heads' recipe (draft vocab 8192);
# the later stages (continue_heads.sh, the soup of two runs) and their data sizes and wall times are recorded in
# benchmarks/results/TRAINING.md. Every step is resumable: rerun the script after an
# interruption and it continues (distill skips finished prompts, the hidden cache keeps what it has, train
# resumes from trainer_state.pt, eval-tau skips answered questions).
#
#   scripts/train_smollm2_heads.sh                      # the recipe's first stage, on the CPU
#   RANGES="0:8000" BATCH=64 DEVICE=cuda PARALLEL=0 STEPS=1000 BATCH_TOKENS=16384 LOSS_POSITIONS=0 \
#       scripts/train_smollm2_heads.sh                  # a larger run on a GPU (see TRAINING.md)
#   ONLY_DISTILL=1 scripts/train_smollm2_heads.sh       # complete the committed shards and commit-ready gzip
#                                                       # them back (benchmarks/results/training_smollm2/distill/)
#
# On a CPU every job runs with one OpenMP thread and independent jobs run side by side (two distill workers
# on disjoint prompt ranges, then both kinds at once): on 2 cores that is ~1.2x the throughput of one
# 2-thread job, and far better than oversubscribed threads.
set -euo pipefail
# Settings come from the environment only: `--help` (or any argument) used to start the whole multi-hour run,
# which ends by copying new heads over the shipped ones.
if [ $# -gt 0 ]; then
    case "$1" in
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
        *) echo "train_smollm2_heads: unknown argument '$1': settings are environment variables (see --help)" >&2
           exit 64 ;;
    esac
fi
cd "$(dirname "$0")/.."

AMPHISTA=${AMPHISTA:-"python -m amphista_engine.cli"}   # or: amphista (same subcommands)
PROMPTS=${PROMPTS:-../shared/data/train_prompts.jsonl}
QUESTIONS=${QUESTIONS:-../shared/data/mt_bench.jsonl}
RUN=${RUN:-runs/smollm2}
DEVICE=${DEVICE:-cpu}
# Prompt ranges start:end[:dtype] ([start, end) of the seeded, source-balanced prompt order), one distill
# worker (and shard) each, run two at a time; dtype defaults to DISTILL_DTYPE. The shipped heads were trained
# on [0, 6000) with the first 2,096 prompts distilled in fp32; that data was lost with its machine, and the
# committed redistillation (tenth session, COMMITTED below) is all bf16: answers differ only at near-ties.
RANGES=${RANGES:-"0:3000 3000:6000"}
MAX_NEW=${MAX_NEW:-256}; BATCH=${BATCH:-64}
# committed shards (gzipped): each seeds the shard of the same name under $RUN, and distill only adds what
# it lacks; COMMITTED= (empty) distills from scratch
COMMITTED=${COMMITTED-benchmarks/results/training_smollm2/distill}
# bf16 distills ~1.9x faster than fp32 on an AMX CPU (its greedy answers differ only at near-ties)
DISTILL_DTYPE=${DISTILL_DTYPE:-bf16}
STEPS=${STEPS:-3000}; BATCH_TOKENS=${BATCH_TOKENS:-4096}; LR=${LR:-1e-3}
WARMUP=${WARMUP:-$(( STEPS < 40 ? STEPS : 40 ))}   # train refuses a warmup longer than the run (smoke runs)
AMPHISTA_STEPS=${AMPHISTA_STEPS:-4500}   # Amphista continues from STEPS to here (warm restart); <= STEPS: off
KLALL_STEPS=${KLALL_STEPS:-6000}         # then on to here with KL at every answer position; <= AMPHISTA_STEPS: off
# bf16 autocast: fp32 master weights, bf16 matmuls (AMX / tensor cores): 1.8x faster steps on an AMX CPU
TRAIN_DTYPE=${TRAIN_DTYPE:-bf16}
LOSS_POSITIONS=${LOSS_POSITIONS:-512}; MSE=${MSE:-0.1}; DRAFT_VOCAB=${DRAFT_VOCAB:-8192}
PARALLEL=${PARALLEL:-1}          # 1: both kinds train at once (one thread each on a CPU)
EVAL_TOKENS=${EVAL_TOKENS:-256}; PER_CATEGORY=${PER_CATEGORY-}  # questions per category; empty (default) = all 80, 4 = the 32 of sessions 2-15
SHIP=${SHIP:-amphista_engine/data/heads}
mkdir -p "$RUN"
if [ "$DEVICE" = cpu ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

# 1. Self-distillation data: greedy answers of the target, chat template, batched; one shard per range.
shards=()
pids=()
for r in $RANGES; do
    IFS=: read -r start end dtype <<< "$r"
    shard="$RUN/distill-$start.jsonl"
    shards+=("$shard")
    if [ -n "$COMMITTED" ] && [ ! -s "$shard" ] && [ -f "$COMMITTED/distill-$start.jsonl.gz" ]; then
        gzip -dc "$COMMITTED/distill-$start.jsonl.gz" > "$shard"
    fi
    $AMPHISTA distill --prompts "$PROMPTS" --out "$shard" --model smollm2-135m --device "$DEVICE" \
        --offset "$start" --limit "$end" --batch-size "$BATCH" --max-new-tokens "$MAX_NEW" \
        --dtype "${dtype:-$DISTILL_DTYPE}" --balance-by-source --seed 0 &
    pids+=($!)
    if [ "${#pids[@]}" -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
if [ "${ONLY_DISTILL:-0}" = 1 ]; then
    [ -n "$COMMITTED" ] || { echo "ONLY_DISTILL=1 needs COMMITTED (where the gzipped shards go)"; exit 1; }
    mkdir -p "$COMMITTED"
    for shard in "${shards[@]}"; do
        # complete lines only: a record is one line, and a killed worker may leave a partial last one
        n=$(wc -l < "$shard"); head -n "$n" "$shard" | gzip -9 > "$COMMITTED/$(basename "$shard").gz"
    done
    ls -la "$COMMITTED"; exit 0
fi

# 2. One target forward over all sequences into the hidden-state cache (both kinds read it).
$AMPHISTA train --data "${shards[@]}" --out "$RUN/hidden-fill" --model smollm2-135m --device "$DEVICE" \
    --fill-cache --cache-hidden "$RUN/hidden" --batch-tokens "$BATCH_TOKENS"

# 3. Heads: same data, steps, seed and draft vocabulary for both kinds; then the Amphista heads continue to
#    AMPHISTA_STEPS with a warm restart of the cosine schedule (the shipped heads: 3000, then on to 4500), then
#    to KLALL_STEPS with KL at every answer position (--loss-positions 0; on to 6000).
steps_done() {   # the step the heads in $1 were saved at (0 if none)
    python -c "import json, sys; print(json.load(open(sys.argv[1]))['extra']['training']['step'])" \
        "$RUN/heads-$1/config.json" 2>/dev/null || echo 0
}
train_to() {     # KIND TOTAL_STEPS [LOSS_POSITIONS]: train (or resume) until the heads reach TOTAL_STEPS
    local KIND=$1 TOTAL=$2 POSITIONS=${3:-$LOSS_POSITIONS} RESUME=""
    [ "$(steps_done "$KIND")" -ge "$TOTAL" ] && return 0
    [ -f "$RUN/heads-$KIND/trainer_state.pt" ] && RESUME="--resume"
    $AMPHISTA train --data "${shards[@]}" --out "$RUN/heads-$KIND" --model smollm2-135m --device "$DEVICE" \
        --kind "$KIND" --num-heads 4 --loss kl --lambda 0.8 --mse-weight "$MSE" --loss-positions "$POSITIONS" \
        --draft-vocab "$DRAFT_VOCAB" --steps "$TOTAL" --batch-tokens "$BATCH_TOKENS" --lr "$LR" --warmup "$WARMUP" \
        --clip 1.0 --seed 0 --train-dtype "$TRAIN_DTYPE" --save-dtype bf16 --cache-hidden "$RUN/hidden" \
        --eval-every 100 --eval-max-seqs 32 --save-every 20 --log "$RUN/train-$KIND.jsonl" $RESUME
}
train_kind() {
    local KIND=$1
    train_to "$KIND" "$STEPS"
    if [ "$KIND" = amphista ] && [ "$AMPHISTA_STEPS" -gt "$STEPS" ]; then
        train_to amphista "$AMPHISTA_STEPS"
    fi
    if [ "$KIND" = amphista ] && [ "$KLALL_STEPS" -gt "$AMPHISTA_STEPS" ]; then
        train_to amphista "$KLALL_STEPS" 0
    fi
    # static trees fitted to these heads on the held-out split of the same data (tuned-16/32/63)
    $AMPHISTA tree-search --data "${shards[@]}" --heads "$RUN/heads-$KIND" --model smollm2-135m --device "$DEVICE" \
        --cache-hidden "$RUN/hidden" --nodes 16,32,63 --save --out "$RUN/trees-$KIND.json"
    mkdir -p "$SHIP/smollm2-135m-$KIND"
    cp "$RUN/heads-$KIND/config.json" "$RUN/heads-$KIND/model.safetensors" "$SHIP/smollm2-135m-$KIND/"
}
if [ "$PARALLEL" = 1 ]; then
    train_kind amphista & a=$!
    train_kind medusa & m=$!
    wait $a; wait $m
else
    train_kind amphista; train_kind medusa
fi

# 4. tau on MT-Bench first turns (greedy), static 63-node tree and the dynamic tree, PER_CATEGORY questions of
#    every category (empty = all 80); the two kinds side by side.
per_cat=()
[ -n "$PER_CATEGORY" ] && per_cat=(--per-category "$PER_CATEGORY")
pids=()
for TREE in mc_sim_7b_63 dynamic-63 tuned-63; do
    for KIND in amphista medusa; do
        $AMPHISTA eval-tau --questions "$QUESTIONS" --heads "$SHIP/smollm2-135m-$KIND" --speculative "$KIND" \
            --device "$DEVICE" --tree "$TREE" "${per_cat[@]}" --max-new-tokens "$EVAL_TOKENS" \
            --out "$RUN/tau-$KIND-$TREE.json" &
        pids+=($!)
    done
    # a bare `wait` exits 0 whatever the runs did; each is waited for before a failure stops the script
    rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    [ "$rc" -eq 0 ] || { echo "train_smollm2_heads: an eval-tau run on $TREE failed (exit $rc)" >&2; exit "$rc"; }
    pids=()
done
