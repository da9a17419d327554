"""The drafting heads' pass next to a 4-bit target on the CPU, with and without its native pieces, in one process:
the Auto-embedding Block as one decoder-stack call and the ResBlocks on int8 codes (`after`) against the AEB's
layer loop and the float ResBlocks (`before`), toggled question by question in rotating order.

Reports the heads' time per speculative step (AmphistaHeads.step after a step's verification: fusion, SAL,
ResBlocks, AEB, draft scores; the prefill's pass over the prompt not counted),
tokens/s and tau per tree; every answer is checked against plain decoding.

    python benchmarks/cpu_heads_native_ab.py [--trees mix-4,mix-8] [--questions 16] [--max-new-tokens 128]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amphista_engine import Engine  # noqa: E402
from amphista_engine.shipped_heads import shipped_heads  # noqa: E402
from benchmarks.common import ab_parser, first_turns, hardware, md_table, rotating_runs, write_results  # noqa: E402


def main():
    args = ab_parser(__doc__, trees="mix-4,mix-8").parse_args()
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=1024)
    heads = engine.load_heads(str(shipped_heads("smollm2-135m", "amphista")))
    if heads.res._codes is None:
        sys.exit("the heads did not get their codes: needs the CPU extension and 4-bit weights (quant auto)")
    native_mix, codes, real_step = heads._mix_native, heads.res._codes, heads.step
    spent = {}

    def timed_step(*a, **k):
        t = time.perf_counter()
        out = real_step(*a, **k)
        if current[1]:                  # the prefill's pass over the whole prompt: not a decoding step's
            current[1] = False
            return out
        key = current[0]
        ms, n = spent.get(key, (0.0, 0))
        spent[key] = (ms + (time.perf_counter() - t) * 1e3, n + 1)
        return out

    heads.step = timed_step
    current = [None, False]

    def run(config, question):
        side, tree = config
        current[0], current[1] = config, True
        heads._mix_native = native_mix if side == "after" else (lambda z: NotImplemented)
        heads.res._codes = codes if side == "after" else None
        spec = tree != "plain"
        return engine.generate(question, max_new_tokens=args.max_new_tokens,
                               speculative="amphista" if spec else None, tree=tree if spec else None)

    qs = first_turns(args.questions)
    trees = [t for t in args.trees.split(",") if t]
    configs = [("after", "plain")] + [(s, t) for t in trees for s in ("before", "after")]
    engine.generate(qs[0], max_new_tokens=8)                               # warm-up
    toks, secs, steps, outs = rotating_runs(qs, configs, run)
    rows = []
    for side, tree in configs:
        c = (side, tree)
        ms, n = spent.get(c, (0.0, 0))
        same = sum(outs[c + (i,)] == outs[("after", "plain", i)] for i in range(len(qs)))
        rows.append({"decoding": tree, "heads": side, "tau": toks[c] / steps[c], "tok/s": toks[c] / secs[c],
                     "heads ms/step": ms / n if n else 0.0, "equals plain": f"{same}/{len(qs)}"})
    meta = {"hardware": hardware("cpu"), "questions": len(qs), "max_new_tokens": args.max_new_tokens,
            "model": "smollm2-135m, 4-bit (quant auto), fp32 between",
            "before": "AEB layer loop (torch ops around the 4-bit products), float ResBlocks (einsum)",
            "after": "AEB + final norm as one decoder-stack call, ResBlocks on int8 codes in one product"}
    write_results("cpu_heads_native_ab", rows, meta,
                  md_table(rows, ["decoding", "heads", "tau", "tok/s", "heads ms/step", "equals plain"]), args.out)


if __name__ == "__main__":
    main()
