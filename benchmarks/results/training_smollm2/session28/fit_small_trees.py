"""Session 28: mix-N trees of 4..64 nodes fitted to the shipped heads (both kinds) on session 21's held-out split,
weighted to MT-Bench's category mix, for the CPU's choice of tree size (speculation_check.candidate_trees).
Run from the repo root with the held-out hidden-state cache of session 21 (runs/mix/hidden; without it the target
runs over the 684 held-out sequences first, ~30 min):

    OMP_NUM_THREADS=2 python benchmarks/results/training_smollm2/session28/fit_small_trees.py amphista|medusa

Writes trees-KIND.json here. The shipped configs took mix-4/8/16/32 from it (their mix-64 is the same tree).
"""
import sys
from pathlib import Path

from amphista_engine.shipped_heads import shipped_heads
from amphista_engine.training.tree_search import tree_search

D = "benchmarks/results/training_smollm2/distill"
DATA = [f"{D}/distill-{s}.jsonl.gz" for s in (0, 3000, 6000, 7000, 8000, 9000, 10000, 11000, 12000, 13000)]
G = 10.7
MIX = (f"alpaca_en_demo={G},truthfulqa={G},wizardlm_testset={G},selfinstruct_seed={G},vicuna_bench={G},"
       f"fastchat_dummy={G},t0_p3=3.98,gpteacher_roleplay=1.69,gsm8k_train=2.38")

if __name__ == "__main__":
    kind = sys.argv[1]
    tree_search(DATA, shipped_heads("smollm2-135m", kind), nodes=(4, 6, 8, 12, 16, 24, 32, 64),
                out=Path(__file__).parent / f"trees-{kind}.json", cache_hidden="runs/mix/hidden", device="cpu",
                prefix="mix", source_weights=MIX,
                compare=("mc_sim_7b_63", "tree-32", "tree-16", "chain-2", "chain-3", "chain-4"))
