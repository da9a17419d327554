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

from benchmarks.common import (StepTimes, ab_parser, answer_on, before_after_runs,  # noqa: E402
                               equal_answers, hardware, md_table, smollm2_with_shipped_heads, write_results)


def main():
    args = ab_parser(__doc__, trees="mix-4,mix-8").parse_args()
    engine, heads = smollm2_with_shipped_heads()
    if heads.res._codes is None:
        sys.exit("the heads did not get their codes: needs the CPU extension and 4-bit weights (quant auto)")
    native_mix, codes, real_step = heads._mix_native, heads.res._codes, heads.step
    times = StepTimes()

    def timed_step(*a, **k):
        t = time.perf_counter()
        out = real_step(*a, **k)
        times.add(t)
        return out

    heads.step = timed_step

    def run(config, question):
        side, tree = config
        times.config, times.skip_next = config, True
        heads._mix_native = native_mix if side == "after" else (lambda z: NotImplemented)
        heads.res._codes = codes if side == "after" else None
        return answer_on(engine, question, tree, args.max_new_tokens)

    qs, configs, toks, secs, steps, outs = before_after_runs(engine, args, run)
    rows = []
    for side, tree in configs:
        c = (side, tree)
        rows.append({"decoding": tree, "heads": side, "tau": toks[c] / steps[c], "tok/s": toks[c] / secs[c],
                     "heads ms/step": times.ms_per_call(c),
                     "equals plain": equal_answers(outs, c, ("after", "plain"), len(qs))})
    meta = {"hardware": hardware("cpu"), "questions": len(qs), "max_new_tokens": args.max_new_tokens,
            "model": "smollm2-135m, 4-bit (quant auto), fp32 between",
            "before": "AEB layer loop (torch ops around the 4-bit products), float ResBlocks (einsum)",
            "after": "AEB + final norm as one decoder-stack call, ResBlocks on int8 codes in one product"}
    write_results("cpu_heads_native_ab", rows, meta,
                  md_table(rows, ["decoding", "heads", "tau", "tok/s", "heads ms/step", "equals plain"]), args.out)


if __name__ == "__main__":
    main()
