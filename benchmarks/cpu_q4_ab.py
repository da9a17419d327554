"""4-bit weights on the CPU against the dequantized fp32 path, end to end on MT-Bench first turns, interleaved.

Engines on the same GGUF file in one process: quant="none" (the Q4_1 weights dequantized to fp32, packed for
oneDNN), the same in bf16 where oneDNN has bf16 (--engines), and quant="q4" (the file's 4-bit codes through torch's
int4 CPU kernel, kernels/cpu_quant.py), each decoding plainly, with the shipped Amphista heads on the given trees and
on the tree `--speculative auto` picks for it; the runs of one question back to back in a
rotating order so drift hits them alike. Reports ms per token, tau, speedups over fp32 plain decoding and over the
engine's own plain decoding, checks that every greedy speculative answer equals its engine's plain one, how many
leading tokens q4's plain answer shares with fp32's, and what `--speculative auto` picks for each engine.
Writes benchmarks/results/cpu_q4_ab.{json,md} (or --out DIR).

    OMP_NUM_THREADS=2 python benchmarks/cpu_q4_ab.py [--trees mix-4,mix-8] [--questions 16]
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.evaluation.questions import read_questions  # noqa: E402
from amphista_engine.shipped_heads import shipped_heads  # noqa: E402
from amphista_engine.speculation_check import CACHE_ENV, check_speculation  # noqa: E402
from benchmarks.common import engines_here, hardware, md_table, write_results  # noqa: E402

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="fp32,bf16,q4",
                    help="fp32 and bf16 (dequantized); q4 (the file's 4-bit codes, fp32 between linears)")
    ap.add_argument("--trees", default="mix-4,mix-8", help="trees every engine decodes on, besides auto's pick")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    heads = shipped_heads("smollm2-135m", "amphista")
    setups = {"fp32": ("fp32", "none"), "bf16": ("bf16", "none"), "q4": ("fp32", "q4")}
    names = engines_here(args.engines)
    engines = {n: Engine.from_pretrained("smollm2-135m", device="cpu", dtype=setups[n][0], max_seq_len=1024,
                                         heads=heads, quant=setups[n][1]) for n in names}
    os.environ[CACHE_ENV] = "off"             # what --speculative auto picks here, timed now (not from a cache)
    checks = {n: check_speculation(e) for n, e in engines.items()}
    configs = []
    for n in names:
        trees = args.trees.split(",") + [checks[n].tree] * (checks[n].tree is not None)
        configs += [(n, None)] + [(n, t) for t in dict.fromkeys(trees)]
    qs = read_questions(MT_BENCH, per_category=-(-args.questions // 8), limit=args.questions)
    toks, secs, steps = {}, {}, {}
    same = {c: 0 for c in configs if c[1]}
    shared = []
    for i, q in enumerate(qs):
        order = configs[i % len(configs):] + configs[:i % len(configs)]      # rotate who goes first
        outs = {}
        for c in order:
            quant, tree = c
            r = engines[quant].generate(q["turns"][0], max_new_tokens=args.max_new_tokens,
                                        speculative=None if tree is None else "amphista", tree=tree)
            outs[c] = r.token_ids
            toks[c] = toks.get(c, 0) + r.stats.step_tokens
            secs[c] = secs.get(c, 0) + r.stats.decode_ms / 1e3
            steps[c] = steps.get(c, 0) + r.stats.decode_steps
        for c in same:
            same[c] += outs[c] == outs[(c[0], None)]
        if "q4" in names:
            shared.append(_shared_prefix(outs[(names[0], None)], outs[("q4", None)]))
        print(f"{i + 1}/{len(qs)}", {f"{c[0]}/{c[1] or 'plain'}": round(secs[c] / toks[c] * 1e3, 1) for c in configs},
              file=sys.stderr)
    ms = {c: secs[c] / toks[c] * 1e3 for c in configs}
    rows, first = [], f"vs {names[0]} plain"      # the first engine's plain decoding (fp32 unless --engines says)
    for c in configs:
        quant, tree = c
        rows.append({"weights": {"fp32": "fp32 (dequantized)", "bf16": "bf16 (dequantized)",
                                 "q4": "q4 (file's codes)"}[quant],
                     "decoding": ("plain" if tree is None else f"amphista {tree}")
                     # auto names its best tree even where it decodes plainly (pays False)
                     + (" (auto's pick)" if (tree == checks[quant].tree if checks[quant].pays else tree is None)
                        else ""),
                     "tau": toks[c] / steps[c], "ms/token": ms[c], "tok/s": 1e3 / ms[c],
                     first: ms[(names[0], None)] / ms[c], "vs own plain": ms[(quant, None)] / ms[c],
                     "greedy == own plain": f"{same[c]}/{len(qs)}" if tree else ""})
    meta = {"hardware": hardware("cpu"), "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "model": "smollm2-135m (GGUF Q4_1)",
            "heads": "shipped amphista", "questions": f"{len(qs)} MT-Bench first turns, greedy, "
            f"{args.max_new_tokens} new tokens",
            f"q4 plain vs {names[0]} plain, shared leading tokens": {"per question": shared,
                                                              "identical answers": sum(
                                                                  s == args.max_new_tokens for s in shared)},
            "auto's pick": {q: c.tree if c.pays else "plain" for q, c in checks.items()},
            "auto's reason": {q: c.reason for q, c in checks.items()},
            "auto's timings": {q: c.compared for q, c in checks.items()}}
    write_results("cpu_q4_ab", rows, meta,
                  md_table(rows, ["weights", "decoding", "tau", "ms/token", "tok/s", first, "vs own plain",
                                  "greedy == own plain"]), args.out)


if __name__ == "__main__":
    main()
