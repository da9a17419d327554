#!/bin/bash
# Session 25: weight averages ("soups") of the shipped heads and session 24's stage, for both kinds. Session 24's
# stage (session24/run_session24.sh amphista / medusa: 1000 steps from the shipped heads) moved the weights ~10%;
# the midpoint of the two checkpoints walks the held-out split better than either end on both static trees (see
# TRAINING.md, "Twenty-fifth session"), so the candidate is the 0.5 soup of each kind. Run from the repo root.
#   run_session25.sh soup KIND         the 0.5 soup of the previously shipped heads and runs/s24/KIND/heads (seconds)
#   run_session25.sh trees KIND        mix-64 (session 21's MT-Bench mix) and tuned-16/32/63 fitted to the soup on
#                                      the 684 held-out sequences (HIDDEN_TREES=runs/mix/hidden: minutes)
#   run_session25.sh tau KIND TREE     all 80 MT-Bench first turns (session16/tau_split.sh, ~25 min)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=benchmarks/results/training_smollm2/distill
R=${RUN:-runs/s25}
GREEDY=""
for s in 0 3000 6000 7000 8000 9000 10000 11000 12000 13000; do GREEDY="$GREEDY $D/distill-$s.jsonl.gz"; done
G=10.7
MIX=alpaca_en_demo=$G,truthfulqa=$G,wizardlm_testset=$G,selfinstruct_seed=$G,vicuna_bench=$G,fastchat_dummy=$G
MIX=$MIX,t0_p3=3.98,gpteacher_roleplay=1.69,gsm8k_train=2.38
search() {  # KIND ARGS...
    local k=$1; shift
    OMP_NUM_THREADS=2 python -m amphista_engine.cli tree-search --data $GREEDY --heads "$R/$k/heads" --device cpu \
        --cache-hidden "${HIDDEN_TREES:-$R/hidden-trees}" --save "$@"
}
case "${1:?soup KIND | trees KIND | tau KIND TREE}" in
soup)   # A = the heads shipped before this session (git 69f4762: the package now ships the soup itself)
    A=$R/previous-$2; mkdir -p "$A"
    for f in config.json model.safetensors; do
        git show "69f4762:amphista_engine/data/heads/smollm2-135m-$2/$f" > "$A/$f"
    done
    python "$(dirname "$0")/soup_heads.py" "$A" "${FROM:-runs/s24}/$2/heads" 0.5 "$R/$2/heads" ;;
trees)
    search "$2" --nodes 64 --prefix mix --source-weights "$MIX" --out "$R/trees-$2.json"
    search "$2" --nodes 16,32,63 --out "$R/trees-tuned-$2.json" ;;
tau) benchmarks/results/training_smollm2/session16/tau_split.sh "$2" "$R/$2/heads" "$3" "$R/tau80-$2-$3.json" ;;
*) echo "unknown stage: $1"; exit 2 ;;
esac
