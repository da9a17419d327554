"""CPU decoding (bf16 or fp32) with position-ordered attention (kernels/cpu_exact.py) vs the plain SDPA path, A/B.

Interleaved in one process: each round runs one MT-Bench first turn with every configuration, ordered
attention on and off (off also turns off the 32-row linear pieces), so slow phases of the machine hit all
of them. Reports median ms/token, tau, and how many speculative answers differ from the plain answer of
the same mode (greedy): with ordered attention there must be none.

    OMP_NUM_THREADS=2 python benchmarks/cpu_ordered_attention_ab.py --rounds 8 --max-new-tokens 128 [--dtype fp32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amphista_engine import Engine  # noqa: E402
from amphista_engine.kernels import cpu_packed  # noqa: E402
from benchmarks.common import timed_rounds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default=str(ROOT / "amphista_engine/data/heads/smollm2-135m-amphista"))
    ap.add_argument("--questions", default=str(ROOT.parent / "shared/data/mt_bench.jsonl"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--trees", default="tree-16,tuned-16,dynamic-24,mc_sim_7b_63")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args()
    qs = [json.loads(line) for line in open(args.questions)]
    prompts = [q["turns"][0] for q in qs[::max(1, len(qs) // args.rounds)]][:args.rounds]
    if args.dtype == "fp32":
        os.environ["AMPHISTA_EXACT_GREEDY"] = "1"     # fp32 orders its steps only when asked (kernels/cpu_exact.py)
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", dtype=args.dtype, max_seq_len=1024, heads=args.heads,
                                quant="none")
    chunked = cpu_packed.CHUNKED_UP_TO

    def mode(ordered: bool):
        engine.model.ordered_attention = ordered
        cpu_packed.CHUNKED_UP_TO = chunked if ordered else 0

    cfgs = [(o, t) for o in (True, False) for t in [None] + args.trees.split(",")]
    for o, t in cfgs:                                                # warm-up
        mode(o)
        engine.generate(prompts[0], max_new_tokens=8, speculative=t and "amphista", tree=t)

    def generate(c, r):
        o, t = c
        mode(o)
        return engine.generate(prompts[r], max_new_tokens=args.max_new_tokens, speculative=t and "amphista", tree=t)
    # each speculative answer against the plain answer of its attention mode
    ms, tau, mismatches = timed_rounds(len(prompts), cfgs, generate, lambda c: None if c[1] is None else (c[0], None),
                                       progress=True)
    print("| attention | method | tree | ms/token (median) | tau | vs plain, same attention | greedy mismatches |")
    print("|---|---|---|---|---|---|---|")
    for c in cfgs:
        o, t = c
        m, base = statistics.median(ms[c]), statistics.median(ms[(o, None)])
        print(f"| {'ordered' if o else 'SDPA'} | {'amphista' if t else 'plain'} | {t or '-'} | {m:.1f} | "
              f"{statistics.mean(tau[c]):.2f} | {base / m:.2f}x | {f'{mismatches[c]}/{len(prompts)}' if t else '-'} |")


if __name__ == "__main__":
    main()
