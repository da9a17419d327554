#!/usr/bin/env bash
# Rebuilds the Amphista and Medusa heads shipped for smollm2-135m (amphista_engine/data/heads/) and measures
# their tau on MT-Bench first turns. This is the CPU-budget recipe recorded in benchmarks/results/TRAINING.md
# (2 shared CPU cores, ~1 hour); see that file for a larger recipe. Every step is resumable: rerun the script
# after an interruption and it continues (distill skips finished prompts; train resumes from trainer_state.pt).
#
#   scripts/train_smollm2_heads.sh            # CPU recipe as shipped
#   RUN=runs/big LIMIT=8000 MAX_NEW=512 BATCH=64 STEPS=600 BATCH_TOKENS=16384 LR=1e-3 WARMUP=100 \
#   LOSS_POSITIONS=0 MSE=0 EVAL_TOKENS=256 PER_CATEGORY=10 DEVICE=cuda scripts/train_smollm2_heads.sh
#                                              # a larger run (see TRAINING.md, "What a real run should change")
set -euo pipefail
cd "$(dirname "$0")/.."

AMPHISTA=${AMPHISTA:-"python -m amphista_engine.cli"}   # or: amphista (same subcommands)
PROMPTS=${PROMPTS:-../shared/data/train_prompts.jsonl}
QUESTIONS=${QUESTIONS:-../shared/data/mt_bench.jsonl}
RUN=${RUN:-runs/smollm2}
DEVICE=${DEVICE:-cpu}
LIMIT=${LIMIT:-80}          # prompts, balanced by source (seeded round-robin): the shipped run's count
STEPS=${STEPS:-36}          # optimizer steps, identical for both kinds
MAX_NEW=${MAX_NEW:-192}; BATCH=${BATCH:-16}; BATCH_TOKENS=${BATCH_TOKENS:-2048}; LR=${LR:-5e-4}; WARMUP=${WARMUP:-4}
LOSS_POSITIONS=${LOSS_POSITIONS:-128}; MSE=${MSE:-1.0}; EVAL_TOKENS=${EVAL_TOKENS:-32}; PER_CATEGORY=${PER_CATEGORY:-1}
SHIP=${SHIP:-amphista_engine/data/heads}
mkdir -p "$RUN"

# 1. Self-distillation data: greedy answers of the target, chat template, batched.
$AMPHISTA distill --prompts "$PROMPTS" --out "$RUN/distill.jsonl" --model smollm2-135m --device "$DEVICE" \
    --limit "$LIMIT" --batch-size "$BATCH" --max-new-tokens "$MAX_NEW" --balance-by-source --seed 0

# 2. Heads: same data, steps and seed for both kinds; target hidden states cached once and shared.
for KIND in amphista medusa; do
    RESUME=""
    [ -f "$RUN/heads-$KIND/trainer_state.pt" ] && RESUME="--resume"
    $AMPHISTA train --data "$RUN/distill.jsonl" --out "$RUN/heads-$KIND" --model smollm2-135m --device "$DEVICE" \
        --kind "$KIND" --num-heads 4 --loss kl --lambda 0.8 --mse-weight "$MSE" --loss-positions "$LOSS_POSITIONS" \
        --steps "$STEPS" --batch-tokens "$BATCH_TOKENS" --lr "$LR" --warmup "$WARMUP" --clip 1.0 --seed 0 --save-dtype bf16 \
        --cache-hidden "$RUN/hidden" --eval-every "$STEPS" --eval-max-seqs 8 --log "$RUN/train-$KIND.jsonl" \
        $RESUME
    mkdir -p "$SHIP/smollm2-135m-$KIND"
    cp "$RUN/heads-$KIND/config.json" "$RUN/heads-$KIND/model.safetensors" "$SHIP/smollm2-135m-$KIND/"
done

# 3. tau on MT-Bench first turns (greedy, default static tree), the first question of every category.
for KIND in amphista medusa; do
    $AMPHISTA eval-tau --questions "$QUESTIONS" --heads "$SHIP/smollm2-135m-$KIND" --speculative "$KIND" \
        --device "$DEVICE" --per-category "$PER_CATEGORY" --max-new-tokens "$EVAL_TOKENS" --out "$RUN/tau-$KIND.json"
done
for KIND in amphista medusa; do
    $AMPHISTA eval-tau --questions "$QUESTIONS" --heads "$SHIP/smollm2-135m-$KIND" --speculative "$KIND" \
        --device "$DEVICE" --tree dynamic-63 --per-category "$PER_CATEGORY" --max-new-tokens "$EVAL_TOKENS" --out "$RUN/tau-$KIND-dynamic63.json"
done
