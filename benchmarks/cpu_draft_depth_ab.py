"""The heads' pass cut to what a step uses, next to a 4-bit target on the CPU, in one process: the speculative decoder
asks the heads for the first `tree depth` heads' logits, from only as many accepted rows as some batch row accepted
(`after`), against all K heads' logits from the tree's D + 1 rows (`before`: the heads' step called without a depth,
its rows padded back), toggled question by question in rotating order.

Reports the heads' time per speculative step (AmphistaHeads.step after a step's verification; the prefill's pass over
the prompt not counted), tokens/s and tau per tree; every answer is checked against plain decoding.

    python benchmarks/cpu_draft_depth_ab.py [--trees mix-4,mix-8,dynamic-4] [--questions 16] [--max-new-tokens 128]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (StepTimes, ab_parser, answer_on, before_after_runs,  # noqa: E402
                               equal_answers, hardware, md_table, smollm2_with_shipped_heads, write_results)


def main():
    args = ab_parser(__doc__, trees="mix-4,mix-8,dynamic-4").parse_args()
    engine, heads = smollm2_with_shipped_heads()
    real_step = type(heads).step.__get__(heads)
    times = StepTimes()

    def timed_step(hidden, next_tokens, count, kv_len, depth=None):
        t = time.perf_counter()
        if times.config[0] == "before":
            # as before: every head's drafts, from the tree's D + 1 rows whatever the step accepted
            pad = (depth or 0) + 1 - hidden.shape[1]
            if pad > 0:
                hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], pad, hidden.shape[2])], 1)
                next_tokens = torch.cat([next_tokens, next_tokens.new_zeros(next_tokens.shape[0], pad)], 1)
            depth = None
        out = real_step(hidden, next_tokens, count, kv_len, depth)
        times.add(t)
        return out

    heads.step = timed_step             # takes a depth: the decoder passes it, `before` drops it

    def run(config, question):
        side, tree = config
        times.config, times.skip_next = config, True
        return answer_on(engine, question, tree, args.max_new_tokens)

    qs, configs, toks, secs, steps, outs = before_after_runs(engine, args, run)
    rows = []
    plain_ms = secs[("after", "plain")] / steps[("after", "plain")] * 1e3
    for side, tree in configs:
        c = (side, tree)
        step_ms = secs[c] / steps[c] * 1e3
        rows.append({"decoding": tree, "heads pass": "-" if tree == "plain" else "all heads, D + 1 rows" if side == "before"
                     else "tree's depth, accepted rows",
                     "tau": toks[c] / steps[c], "tok/s": toks[c] / secs[c], "step ms": step_ms,
                     "plain steps a step": step_ms / plain_ms, "heads ms/step": times.ms_per_call(c),
                     "equals plain": equal_answers(outs, c, ("after", "plain"), len(qs))})
    meta = {"hardware": hardware("cpu"), "questions": len(qs), "max_new_tokens": args.max_new_tokens,
            "model": "smollm2-135m, 4-bit (quant auto), shipped Amphista heads (4 heads, 16,384-token draft vocabulary)",
            "before": "the heads score all 4 heads' drafts every step, from the tree's D + 1 rows",
            "after": "the first `tree depth` heads' drafts (heads.step(..., depth=...)), from the accepted rows"}
    write_results("cpu_draft_depth_ab", rows, meta,
                  md_table(rows, ["decoding", "heads pass", "tau", "tok/s", "step ms", "plain steps a step",
                                  "heads ms/step", "equals plain"]), args.out)


if __name__ == "__main__":
    main()
