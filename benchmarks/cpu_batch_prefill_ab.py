"""Grouped vs padded prefill of a batch of unequal prompts on the CPU, interleaved in one process.

A batch used to prefill as one forward padded to its longest prompt, so short prompts beside a long one cost as
much as it did (generation.prefill_groups now prefills them in groups of like length). This times generate_batch
on batches of one long prompt (a document to summarize) beside MT-Bench first turns, `grouped` (the default) and
`padded` (prefill_groups forced to one group), plain and Amphista, each batch's arms back to back in a rotating
order. Checks that both arms give every row the same tokens. Reports the batches' prefill ms and wall seconds.
Writes benchmarks/results/cpu_batch_prefill_ab.{json,md} (or --out DIR).

    OMP_NUM_THREADS=2 python benchmarks/cpu_batch_prefill_ab.py [--batch 5] [--batches 3] [--max-new-tokens 16]
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from amphista_engine import generation  # noqa: E402
from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.evaluation.questions import read_questions  # noqa: E402
from benchmarks.common import ab_parser, hardware, md_table, write_results  # noqa: E402

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"
ARMS = ("grouped", "padded")
LONG = "Summarize the following notes in three sentences.\n" + "\n".join(
    f"Note {i}: the team measured topic {i * 7 % 13} again and found its history longer than expected." for i in
    range(30))


def main():
    ap = ab_parser(__doc__, trees="")
    ap.add_argument("--batch", type=int, default=5, help="rows per batch: one long prompt and batch - 1 short ones")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--quant", default="auto")
    ap.set_defaults(max_new_tokens=16)
    args = ap.parse_args()
    if args.batch < 2 or args.batches < 1:
        ap.error("--batch must be at least 2 and --batches at least 1")
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", heads="default", quant=args.quant,
                                    max_batch_size=args.batch, max_seq_len=1024)
    tree = args.trees or None
    short = [q["turns"][0] for q in read_questions(MT_BENCH, limit=(args.batch - 1) * args.batches)]
    grouped = generation.prefill_groups
    padded = lambda lengths, covers_all=False: [list(range(len(lengths)))]   # noqa: E731
    stats = {(m, a): {"prefill_ms": 0.0, "seconds": 0.0} for m in ("plain", "amphista") for a in ARMS}
    unequal, lengths = 0, []
    engine.generate_batch([LONG, "Hi"], max_new_tokens=2, speculative="amphista", tree=tree)    # warm up
    for i in range(args.batches):
        batch = [LONG] + short[i * (args.batch - 1):(i + 1) * (args.batch - 1)]
        lengths.append([len(engine.encode_prompt(p)) for p in batch])
        for method in ("plain", "amphista"):
            outs = {}
            for arm in ARMS[i % 2:] + ARMS[:i % 2]:
                generation.prefill_groups = grouped if arm == "grouped" else padded
                t = time.perf_counter()
                res = engine.generate_batch(batch, max_new_tokens=args.max_new_tokens,
                                            speculative=None if method == "plain" else "amphista", tree=tree)
                stats[method, arm]["seconds"] += time.perf_counter() - t
                stats[method, arm]["prefill_ms"] += res[0].stats.prefill_ms
                outs[arm] = [r.token_ids for r in res]
            generation.prefill_groups = grouped
            unequal += sum(a != b for a, b in zip(outs["grouped"], outs["padded"]))
        print(f"batch {i + 1}/{args.batches} prompt tokens {lengths[-1]}",
              {f"{m} {a}": round(s["prefill_ms"]) for (m, a), s in stats.items()}, file=sys.stderr)
    rows = [{"method": m, "arm": a, "prefill_ms": s["prefill_ms"] / args.batches, "seconds": s["seconds"],
             "prefill_speedup": stats[m, "padded"]["prefill_ms"] / s["prefill_ms"]} for (m, a), s in stats.items()]
    table = md_table(rows, ["method", "arm", "prefill_ms", "seconds", "prefill_speedup"])
    table += f"\n\nprefill_ms: per batch (mean); rows whose tokens differ between the arms: {unequal}"
    meta = {"hardware": hardware("cpu"), "threads": torch.get_num_threads(), "quant": engine.quant,
            "tree": tree or "engine default", "batch": args.batch, "batches": args.batches,
            "max_new_tokens": args.max_new_tokens, "prompt_tokens": lengths}
    write_results("cpu_batch_prefill_ab", rows, meta, table, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
