"""Which tree size decodes fastest on this CPU? End to end on MT-Bench first turns, interleaved.

Plain decoding and the shipped Amphista heads on several trees (the old CPU default tree-16 and the heads'
fitted mix-N trees), the runs of one question back to back in a rotating order so drift hits them alike.
Reports ms per token, tau and the speedup over plain decoding, checks that every greedy speculative answer
equals the plain one, and says which tree `--speculative auto` picks here (speculation_check.py).
A tree named `dynamic-N@torch` is dynamic-N built by the torch ops (tree.dynamic_tree_buffers) instead of the
cpu backend's native builder: the same tree, so the same tokens, at the torch ops' cost.
Writes benchmarks/results/cpu_tree_size_ab.{json,md} (or --out DIR).

    OMP_NUM_THREADS=2 python benchmarks/cpu_tree_size_ab.py [--trees tree-16,mix-4,dynamic-4@torch,...] [--questions 16]
"""
import contextlib
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.kernels import cpu_ops  # noqa: E402
from amphista_engine.evaluation.questions import read_questions  # noqa: E402
from amphista_engine.shipped_heads import shipped_heads  # noqa: E402
from amphista_engine.speculation_check import CACHE_ENV, check_speculation, expected_tau  # noqa: E402
from benchmarks.common import hardware, md_table, write_results  # noqa: E402

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"


@contextlib.contextmanager
def tree_builder(tree):
    """name@torch: the cpu backend declines the dynamic tree, so the torch reference builds it."""
    native = cpu_ops.dynamic_tree
    if tree is not None and tree.endswith("@torch"):
        cpu_ops.dynamic_tree = lambda *a, **k: NotImplemented
    try:
        yield None if tree is None else tree.removesuffix("@torch")
    finally:
        cpu_ops.dynamic_tree = native


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="tree-16,mix-4,mix-8,mix-16,mix-32")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--quant", default="none", help="none (the committed results) or q4 (kernels/cpu_quant.py)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    e = Engine.from_pretrained("smollm2-135m", device="cpu", dtype=args.dtype, max_seq_len=1024,
                               heads=shipped_heads("smollm2-135m", "amphista"), quant=args.quant)
    os.environ[CACHE_ENV] = "off"             # what --speculative auto picks here, timed now (not from a cache)
    check = check_speculation(e)
    trees = args.trees.split(",")
    configs = [None] + trees
    qs = read_questions(MT_BENCH, per_category=-(-args.questions // 8), limit=args.questions)
    toks, secs, steps, same = {}, {}, {}, {t: 0 for t in trees}
    for i, q in enumerate(qs):
        plain_ids = None
        order = configs[i % len(configs):] + configs[:i % len(configs)]      # rotate who goes first
        outs = {}
        for tree in order:
            with tree_builder(tree) as name:
                r = e.generate(q["turns"][0], max_new_tokens=args.max_new_tokens,
                               speculative=None if tree is None else "amphista", tree=name)
            outs[tree] = r.token_ids
            toks[tree] = toks.get(tree, 0) + r.stats.step_tokens
            secs[tree] = secs.get(tree, 0) + r.stats.decode_ms / 1e3
            steps[tree] = steps.get(tree, 0) + r.stats.decode_steps
        plain_ids = outs[None]
        for t in trees:
            same[t] += outs[t] == plain_ids
        print(f"{i + 1}/{len(qs)}", {str(t): round(secs[t] / toks[t] * 1e3, 1) for t in configs}, file=sys.stderr)
    plain_ms = secs[None] / toks[None] * 1e3
    rows = [{"decoding": "plain", "nodes": 1, "held-out tau": "", "tau": 1.0, "ms/token": plain_ms,
             "speedup": 1.0, "greedy == plain": ""}]
    for t in trees:
        ms = secs[t] / toks[t] * 1e3
        rows.append({"decoding": f"amphista {t}" + (" (auto's pick)" if t == check.tree else ""),
                     "nodes": e._tree_spec(t.removesuffix("@torch")).num_nodes,
                     "held-out tau": expected_tau(e.heads.config, t.removesuffix("@torch")) or "",
                     "tau": toks[t] / steps[t], "ms/token": ms, "speedup": plain_ms / ms,
                     "greedy == plain": f"{same[t]}/{len(qs)}"})
    meta = {"hardware": hardware("cpu"), "threads": torch.get_num_threads(), "model": f"smollm2-135m {args.dtype}, quant {e.quant}",
            "heads": "shipped amphista", "questions": f"{len(qs)} MT-Bench first turns, greedy, "
            f"{args.max_new_tokens} new tokens", "auto's pick": check.tree, "auto's reason": check.reason,
            "auto's timings": check.compared}
    write_results("cpu_tree_size_ab", rows, meta,
                  md_table(rows, ["decoding", "nodes", "held-out tau", "tau", "ms/token", "speedup",
                                  "greedy == plain"]), args.out)


if __name__ == "__main__":
    main()
