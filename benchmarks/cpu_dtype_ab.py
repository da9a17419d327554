"""Plain vs Amphista decoding in fp32 and bf16 on the CPU, interleaved in one process (A/B on a noisy machine).

Each round generates one prompt with every configuration in turn, so slow phases of the machine hit all of them;
the median ms/token over rounds is reported with tau, and every speculative answer is compared with the plain
answer of the same dtype (greedy). bf16 on a CPU with AMX uses packed oneDNN weights (kernels/cpu_packed.py).

    OMP_NUM_THREADS=2 python benchmarks/cpu_dtype_ab.py --rounds 4 --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from amphista_engine import Engine

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
    ms = {c: [] for c in cfgs}
    tau = {c: [] for c in cfgs}
    plain, mismatches = {}, {c: 0 for c in cfgs}
    for r in range(args.rounds):
        p = r % len(PROMPTS)
        for c in cfgs:
            dt, spec, tree = c
            out = engines[dt].generate(PROMPTS[p], max_new_tokens=args.max_new_tokens, speculative=spec, tree=tree)
            ms[c].append(1000 / out.stats.decode_tokens_per_s)
            tau[c].append(out.stats.tau)
            if spec is None:
                plain[(dt, p)] = out.token_ids
            elif out.token_ids != plain[(dt, p)]:
                mismatches[c] += 1
    base = statistics.median(ms[cfgs[0]])
    print("| dtype | method | tree | ms/token (median) | tau | vs fp32 plain | greedy mismatches |")
    print("|---|---|---|---|---|---|---|")
    for c in cfgs:
        m = statistics.median(ms[c])
        print(f"| {c[0]} | {c[1] or 'plain'} | {c[2] or '-'} | {m:.1f} | {statistics.mean(tau[c]):.2f} | "
              f"{base / m:.2f}x | {mismatches[c]}/{args.rounds if c[1] else '-'} |")


if __name__ == "__main__":
    main()
