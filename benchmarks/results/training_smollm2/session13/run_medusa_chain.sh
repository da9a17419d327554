#!/bin/bash
# Session 13: retrain the shipped Medusa heads along the Amphista heads' own training history, so that the two
# shipped checkpoints have had the same data, steps and seed. Both kinds shared the fifth session's run (3000
# steps on 6,000 prompts, `session5/run_session5.sh`); the shipped Medusa heads are that run's. Amphista then had:
#   session 7     +1500 steps, 6,000 prompts, KL at 512 positions  (--resume: warm cosine restart, lr 2.5e-4 -> 0)
#   sessions 8-9  +1500 steps, 6,000 prompts, KL at every position (--resume: lr 1.5e-4 -> 0)
#   session 11    +1100 steps, 8,000 prompts  (--init-from, lr 2e-4, warmup 40, cosine)
#   session 12    +1200 steps, 10,000 prompts (--init-from, lr 2e-4), then the 16,384-token draft vocabulary
# Each Medusa stage below is `scripts/continue_heads.sh` (--init-from the previous stage, fresh AdamW, warmup 40,
# cosine from LR to 0, seed 0, the committed shards of the same prompt range). Differences from Amphista's
# history, all forced by what is left of it: the trainer states of sessions 5-9 are gone, so stages 1-2 start
# fresh optimisers at the learning rate Amphista's schedule had there instead of resuming, and the first 2,096
# prompts are the tenth session's bf16 redistillation, not the lost fp32 shards.
# Run from the repo root; each stage is skipped once its heads are complete, so a rerun resumes (it first waits
# for a training of the same stage that is still running, e.g. one left by a killed earlier instance).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=benchmarks/results/training_smollm2/distill
R=${RUN:-runs/s13}
P6="$D/distill-0.jsonl.gz $D/distill-3000.jsonl.gz"
P8="$P6 $D/distill-6000.jsonl.gz $D/distill-7000.jsonl.gz"
P10="$P8 $D/distill-8000.jsonl.gz $D/distill-9000.jsonl.gz"
done_at() { python -c "import json,sys; t=json.load(open(sys.argv[1]))['extra']['training']; sys.exit(t['step']!=t['total_steps'])" "$1/config.json" 2>/dev/null; }
stage() {  # name from data steps lr threads loss-positions (0 = every position)
    while pgrep -f -- "--out $R/$1/heads " > /dev/null; do sleep 20; done
    done_at "$R/$1/heads" && return 0
    KIND=medusa FROM=$2 DATA=$3 STEPS=$4 LR=$5 OMP_NUM_THREADS=$6 RUN=$R/$1 HIDDEN=runs/continue/hidden TREES="" \
        LOSS_POSITIONS=$7 EVAL_EVERY=300 scripts/continue_heads.sh >> "$R/$1.log" 2>&1
    echo "$(date +%T) $1 done" >> "$R/chain.log"
}
mkdir -p "$R"
stage m1 amphista_engine/data/heads/smollm2-135m-medusa "$P6" 1500 2.5e-4 "${T1:-1}" 512
stage m2 "$R/m1/heads" "$P6" 1500 1.5e-4 "${T2:-2}" 0
stage m3 "$R/m2/heads" "$P8" 1100 2e-4 "${T2:-2}" 512
stage m4 "$R/m3/heads" "$P10" 1200 2e-4 "${T2:-2}" 512
# the same 16,384-token draft vocabulary the shipped Amphista heads draft over (old 8,192 first)
[ -f "$R/medusa-v16384/model.safetensors" ] || PYTHONPATH=. python \
    benchmarks/results/training_smollm2/session12/make_vocab_heads.py "$R/m4/heads" "$R/medusa-v16384" 16384
OMP_NUM_THREADS=2 python -m amphista_engine.cli tree-search --data $P10 --heads "$R/medusa-v16384" --model smollm2-135m \
    --device cpu --cache-hidden runs/continue/hidden --nodes 16,32,63 --save --out "$R/trees-medusa.json" > "$R/trees.log" 2>&1
echo "$(date +%T) chain done" >> "$R/chain.log"
