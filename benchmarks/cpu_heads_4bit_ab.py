"""Drafting heads with 4-bit layers next to a 4-bit target, against heads packed in the model dtype, end to end.

Engines with 4-bit target weights (`--quant auto` on SmolLM2's Q4_1 file) quantize the heads' layer linears to 4
bits too (kernels/cpu_quant.quantize_heads): a step of Amphista heads reads ~11M weights in their fusion, SAL and
AEB layers, ~44 MB in fp32, which took ~4.8 of its ~5.8 ms. Both engines run in one process, question by question
in a rotating order; tau says what the quantization did to the drafts, and speculative answers must equal the
engine's plain ones (verification is unchanged).

    OMP_NUM_THREADS=2 python benchmarks/cpu_heads_4bit_ab.py [--trees mix-4,mix-8] [--questions 16]
"""
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.evaluation.questions import read_questions  # noqa: E402
from amphista_engine.shipped_heads import shipped_heads  # noqa: E402
from benchmarks.common import ab_parser, hardware, md_table, rotating_runs, write_results  # noqa: E402

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"


def main():
    ap = ab_parser(__doc__, trees='mix-4,mix-8')
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    heads = shipped_heads("smollm2-135m", "amphista")
    engines = {}
    for kind in ("packed", "4-bit"):
        e = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=1024, quant="q4")
        if kind == "packed":                # the heads as before: packed for oneDNN in the model dtype
            e.linears = dataclasses.replace(e.linears, quant="none")
        e.load_heads(heads)
        engines[kind] = e
    configs = [(k, t) for t in [None] + args.trees.split(",") for k in engines]
    qs = read_questions(MT_BENCH, per_category=-(-args.questions // 8), limit=args.questions)

    def run(c, q):
        kind, tree = c
        return engines[kind].generate(q["turns"][0], max_new_tokens=args.max_new_tokens,
                                      speculative=None if tree is None else "amphista", tree=tree)

    toks, secs, steps, outs = rotating_runs(qs, configs, run, lambda c: f"{c[0]}/{c[1] or 'plain'}")
    rows = []
    for kind, tree in configs:
        c = (kind, tree)
        ms = secs[c] / toks[c] * 1e3
        base = ("packed", tree)
        rows.append({"heads": kind, "decoding": "plain" if tree is None else f"amphista {tree}",
                     "tau": toks[c] / steps[c], "ms/token": ms, "tok/s": 1e3 / ms,
                     "vs packed heads": secs[base] / toks[base] * 1e3 / ms,
                     "equal own plain": "" if tree is None else sum(
                         outs[c + (i,)] == outs[(kind, None, i)] for i in range(len(qs)))})
    meta = {"hardware": hardware("cpu"), "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "model": "smollm2-135m (GGUF Q4_1), 4-bit target",
            "heads": "shipped amphista", "questions": f"{len(qs)} MT-Bench first turns, greedy, "
            f"{args.max_new_tokens} new tokens"}
    write_results("cpu_heads_4bit_ab", rows, meta,
                  md_table(rows, ["heads", "decoding", "tau", "ms/token", "tok/s", "vs packed heads",
                                  "equal own plain"]), args.out)


if __name__ == "__main__":
    main()
