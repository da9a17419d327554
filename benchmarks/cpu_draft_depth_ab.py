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

from amphista_engine import Engine  # noqa: E402
from amphista_engine.shipped_heads import shipped_heads  # noqa: E402
from benchmarks.common import ab_parser, first_turns, hardware, md_table, rotating_runs, write_results  # noqa: E402


def main():
    args = ab_parser(__doc__, trees="mix-4,mix-8,dynamic-4").parse_args()
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=1024)
    heads = engine.load_heads(str(shipped_heads("smollm2-135m", "amphista")))
    real_step = type(heads).step.__get__(heads)
    spent = {}
    current = [None, False]

    def timed_step(hidden, next_tokens, count, kv_len, depth=None):
        t = time.perf_counter()
        if current[0][0] == "before":
            # as before: every head's drafts, from the tree's D + 1 rows whatever the step accepted
            pad = (depth or 0) + 1 - hidden.shape[1]
            if pad > 0:
                hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], pad, hidden.shape[2])], 1)
                next_tokens = torch.cat([next_tokens, next_tokens.new_zeros(next_tokens.shape[0], pad)], 1)
            depth = None
        out = real_step(hidden, next_tokens, count, kv_len, depth)
        if current[1]:                  # the prefill's pass over the whole prompt: not a decoding step's
            current[1] = False
            return out
        ms, n = spent.get(current[0], (0.0, 0))
        spent[current[0]] = (ms + (time.perf_counter() - t) * 1e3, n + 1)
        return out

    heads.step = timed_step             # takes a depth: the decoder passes it, `before` drops it

    def run(config, question):
        side, tree = config
        current[0], current[1] = config, True
        spec = tree != "plain"
        return engine.generate(question, max_new_tokens=args.max_new_tokens,
                               speculative="amphista" if spec else None, tree=tree if spec else None)

    qs = first_turns(args.questions)
    trees = [t for t in args.trees.split(",") if t]
    configs = [("after", "plain")] + [(s, t) for t in trees for s in ("before", "after")]
    engine.generate(qs[0], max_new_tokens=8)                               # warm-up
    toks, secs, steps, outs = rotating_runs(qs, configs, run)
    rows = []
    plain_ms = secs[("after", "plain")] / steps[("after", "plain")] * 1e3
    for side, tree in configs:
        c = (side, tree)
        ms, n = spent.get(c, (0.0, 0))
        same = sum(outs[c + (i,)] == outs[("after", "plain", i)] for i in range(len(qs)))
        step_ms = secs[c] / steps[c] * 1e3
        rows.append({"decoding": tree, "heads pass": "-" if tree == "plain" else "all heads, D + 1 rows" if side == "before"
                     else "tree's depth, accepted rows",
                     "tau": toks[c] / steps[c], "tok/s": toks[c] / secs[c], "step ms": step_ms,
                     "plain steps a step": step_ms / plain_ms, "heads ms/step": ms / n if n else 0.0,
                     "equals plain": f"{same}/{len(qs)}"})
    meta = {"hardware": hardware("cpu"), "questions": len(qs), "max_new_tokens": args.max_new_tokens,
            "model": "smollm2-135m, 4-bit (quant auto), shipped Amphista heads (4 heads, 16,384-token draft vocabulary)",
            "before": "the heads score all 4 heads' drafts every step, from the tree's D + 1 rows",
            "after": "the first `tree depth` heads' drafts (heads.step(..., depth=...)), from the accepted rows"}
    write_results("cpu_draft_depth_ab", rows, meta,
                  md_table(rows, ["decoding", "heads pass", "tau", "tok/s", "step ms", "plain steps a step",
                                  "heads ms/step", "equals plain"]), args.out)


if __name__ == "__main__":
    main()
