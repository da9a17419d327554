"""Does a speculative batch gain from dropping its ended rows? End to end on MT-Bench first turns, interleaved.

A batch runs until its longest answer ends. Plain decoding has dropped ended rows since the batch engine landed
(generation.run, keep_rows); a speculative batch kept verifying a whole tree for every ended row until the
session-46 change. This times `generate_batch` on batches of MT-Bench first turns three ways in one process:
plain, speculative keeping its ended rows (`keep`), speculative dropping them (`drop`, the default), each batch's
runs back to back in a rotating order. Checks that every row's tokens equal plain greedy's. Reports the wall time
of the batches (prefill included) and new tokens per second.
Writes benchmarks/results/cpu_batch_drop_ab.{json,md} (or --out DIR).

    OMP_NUM_THREADS=2 python benchmarks/cpu_batch_drop_ab.py [--batch 4] [--batches 4] [--max-new-tokens 128]
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.evaluation.questions import read_questions  # noqa: E402
from amphista_engine.speculative import SpeculativeDecoder  # noqa: E402
from benchmarks.common import ab_parser, hardware, md_table, write_results  # noqa: E402

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"
ARMS = ("plain", "keep", "drop")


def main():
    ap = ab_parser(__doc__, trees="")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--quant", default="auto")
    args = ap.parse_args()
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", heads="default", quant=args.quant,
                                    max_batch_size=args.batch, max_seq_len=1024)
    tree = args.trees or None
    questions = read_questions(MT_BENCH, limit=args.batch * args.batches)
    prompts = [q["turns"][0] for q in questions]
    real_drop = SpeculativeDecoder.can_drop_rows
    secs, tokens, mismatched = dict.fromkeys(ARMS, 0.0), dict.fromkeys(ARMS, 0), 0
    engine.generate_batch(prompts[:2], max_new_tokens=8, speculative="amphista", tree=tree)      # warm up
    for i in range(args.batches):
        batch, outs = prompts[i * args.batch:(i + 1) * args.batch], {}
        for arm in ARMS[i % 3:] + ARMS[:i % 3]:
            SpeculativeDecoder.can_drop_rows = real_drop if arm == "drop" else (lambda self: False)
            t = time.perf_counter()
            res = engine.generate_batch(batch, max_new_tokens=args.max_new_tokens,
                                        speculative=None if arm == "plain" else "amphista", tree=tree)
            secs[arm] += time.perf_counter() - t
            tokens[arm] += sum(r.stats.new_tokens for r in res)
            outs[arm] = [r.token_ids for r in res]
        SpeculativeDecoder.can_drop_rows = real_drop
        mismatched += sum(a != b for arm in ("keep", "drop") for a, b in zip(outs[arm], outs["plain"]))
        print(f"batch {i + 1}/{args.batches}", {a: round(secs[a], 2) for a in ARMS},
              "lengths", [len(t) for t in outs["plain"]], file=sys.stderr)
    rows = [{"arm": a, "seconds": secs[a], "new_tokens": tokens[a], "tok_per_s": tokens[a] / secs[a],
             "speedup_vs_plain": secs["plain"] / secs[a]} for a in ARMS]
    table = md_table(rows, ["arm", "seconds", "new_tokens", "tok_per_s", "speedup_vs_plain"])
    table += f"\n\ndrop vs keep: {secs['keep'] / secs['drop']:.3f}x; rows unequal to plain greedy: {mismatched}"
    meta = {"hardware": hardware("cpu"), "threads": torch.get_num_threads(), "quant": engine.quant,
            "tree": tree or "engine default", "batch": args.batch, "batches": args.batches,
            "max_new_tokens": args.max_new_tokens}
    write_results("cpu_batch_drop_ab", rows, meta, table, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
