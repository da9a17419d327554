"""Plain vs Amphista decoding in fp32 and bf16 on the CPU, interleaved in one process (A/B on a noisy machine).

Each round generates one prompt with every configuration in turn, so slow phases of the machine hit all of them;
the median ms/token over rounds is reported with tau, and every speculative answer is compared with the plain
answer of the same dtype (greedy). bf16 on a CPU with AMX uses packed oneDNN weights (kernels/cpu_packed.py).

    OMP_NUM_THREADS=2 python benchmarks/cpu_dtype_ab.py --rounds 4 --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amphista_engine import Engine  # noqa: E402
from benchmarks.common import timed_rounds  # noqa: E402

PROMPTS = ["Write a long story about a dragon and a knight.",
           "Explain how a hash table works, with a Python example."]

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default=str(ROOT / "amphista_engine/data/heads/smollm2-135m-amphista"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    engines = {dt: Engine.from_pretrained("smollm2-135m", device="cpu", dtype=dt, max_seq_len=1024, heads=args.heads,
                                          quant="none")
               for dt in ("fp32", "bf16")}
    cfgs = [("fp32", None, None), ("fp32", "amphista", "tree-16"), ("fp32", "amphista", "tree-32"),
            ("bf16", None, None), ("bf16", "amphista", "tree-16"), ("bf16", "amphista", "tree-32"),
            ("bf16", "amphista", "mc_sim_7b_63")]
    for dt, spec, tree in cfgs:                                   # warm-up
        engines[dt].generate(PROMPTS[0], max_new_tokens=8, speculative=spec, tree=tree)

    def generate(c, r):
        dt, spec, tree = c
        return engines[dt].generate(PROMPTS[r % len(PROMPTS)], max_new_tokens=args.max_new_tokens, speculative=spec,
                                    tree=tree)
    # each speculative answer against the plain answer of its dtype
    ms, tau, mismatches = timed_rounds(args.rounds, cfgs, generate,
                                       lambda c: None if c[1] is None else (c[0], None, None))
    base = statistics.median(ms[cfgs[0]])
    print("| dtype | method | tree | ms/token (median) | tau | vs fp32 plain | greedy mismatches |")
    print("|---|---|---|---|---|---|---|")
    for c in cfgs:
        m = statistics.median(ms[c])
        print(f"| {c[0]} | {c[1] or 'plain'} | {c[2] or '-'} | {m:.1f} | {statistics.mean(tau[c]):.2f} | "
              f"{base / m:.2f}x | {mismatches[c]}/{args.rounds if c[1] else '-'} |")


if __name__ == "__main__":
    main()
