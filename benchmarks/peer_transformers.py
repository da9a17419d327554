"""Peer comparison: the same prompts through Hugging Face transformers' `generate` and through our engine
(plain decoding, Medusa and Amphista), same weights, dtype and device, in one run.

    python benchmarks/peer_transformers.py [--model smollm2-135m] [--device cpu] [--dtype fp32]
        [--questions ../shared/data/mt_bench.jsonl] [--limit 8] [--max-new-tokens 128]
        [--methods ar,medusa,amphista] [--heads-medusa DIR] [--heads-amphista DIR] [--tree NAME] [--out DIR]

Every speedup we report over our own plain decoding then also has a row against the library users would
otherwise use. transformers gets the very same tensors (`ar_latency.to_transformers`), so only the engines
differ; the table also says how many greedy answers are token-for-token identical across engines.
Timing: each prompt runs through every engine in turn (load on the machine spreads evenly), device-synced
wall time of the whole generate call (prefill included), one untimed warm-up per engine first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ar_latency import require_transformers, to_transformers  # noqa: E402
from common import hardware, md_table, sync, write_results  # noqa: E402

from amphista_engine import Engine  # noqa: E402
from amphista_engine.evaluation.questions import read_questions  # noqa: E402
from amphista_engine.shipped_heads import shipped_heads  # noqa: E402

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"
FALLBACK_PROMPTS = ["Explain speculative decoding in two sentences.", "Write a haiku about the sea.",
                    "What is 17 * 23? Show your work.", "Write a Python function that reverses a string."]


def until_eos(ids: list[int], eos: set[int]) -> list[int]:
    """Tokens before the first EOS: our engine never returns the EOS itself, transformers does."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--questions", default=str(DEFAULT_QUESTIONS),
                    help="Spec-Bench-format JSONL; first turns are the prompts (built-in prompts if missing)")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--methods", default="ar,medusa,amphista")
    ap.add_argument("--heads-medusa", default=None, help="default: the heads shipped for --model")
    ap.add_argument("--heads-amphista", default=None, help="default: the heads shipped for --model")
    ap.add_argument("--tree", default=None)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    require_transformers("peer_transformers")

    if Path(args.questions).is_file():
        prompts = [q["turns"][0] for q in read_questions(args.questions, limit=args.limit)]
    else:
        print(f"note: {args.questions} not found; using {len(FALLBACK_PROMPTS)} built-in prompts", file=sys.stderr)
        prompts = FALLBACK_PROMPTS[:args.limit]
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, max_seq_len=2048,
                                    quant="none")     # transformers multiplies the same dequantized weights
    device, eos = engine.device, set(engine.eos_ids)

    heads = {}
    for m in [m.strip() for m in args.methods.split(",") if m.strip() not in ("", "ar", "plain")]:
        path = getattr(args, f"heads_{m}", None) or shipped_heads(args.model, m)
        if path is None:
            print(f"note: no {m} heads given or shipped for {args.model}; skipping {m}", file=sys.stderr)
            continue
        heads[m] = engine.load_heads(str(path))

    hf = to_transformers(engine.loaded, engine.dtype, device)
    n = args.max_new_tokens

    # Each engine takes a prompt {"messages", "ids"}: ours renders the messages itself, transformers gets the
    # ids that rendering produced, so both see the same chat-formatted tokens.
    def run_hf(prompt, max_new):
        ids = prompt["ids"]
        x = torch.tensor([ids], device=device)
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                              eos_token_id=sorted(eos), pad_token_id=min(eos) if eos else 0)
        return until_eos(out[0, len(ids):].tolist(), eos), None

    def run_ours(method):
        def go(prompt, max_new):
            if method != "ar":
                engine.load_heads(heads[method])
            res = engine.generate(prompt["messages"], max_new_tokens=max_new,
                                  speculative=None if method == "ar" else method,
                                  tree=None if method == "ar" else args.tree)
            return list(res.token_ids), res.stats
        return go

    engines = {"transformers generate": run_hf, "amphista-engine plain": run_ours("ar")}
    engines.update({f"amphista-engine {m}": run_ours(m) for m in heads})
    encoded = []
    for p in prompts:
        msgs = [{"role": "user", "content": p}]
        encoded.append({"messages": msgs, "ids": engine.encode_prompt(msgs)})

    for fn in engines.values():               # untimed warm-up
        fn(encoded[0], min(n, 16))
    totals = {name: {"tokens": 0, "wall": 0.0, "steps": 0, "step_tokens": 0, "answers": []} for name in engines}
    for prompt in encoded:
        for name, fn in engines.items():
            sync(device)
            t = time.perf_counter()
            toks, stats = fn(prompt, n)
            sync(device)
            tot = totals[name]
            tot["wall"] += time.perf_counter() - t
            tot["tokens"] += len(toks)
            tot["answers"].append(toks)
            if stats is not None:
                tot["steps"] += stats.decode_steps
                tot["step_tokens"] += stats.step_tokens
        print(f"prompt {len(totals['transformers generate']['answers'])}/{len(encoded)} done", file=sys.stderr)

    base_hf = totals["transformers generate"]
    base_plain = totals["amphista-engine plain"]
    rows = []
    for name, tot in totals.items():
        tps = tot["tokens"] / tot["wall"]
        rows.append({
            "engine": name, "prompts": len(encoded), "new_tokens": tot["tokens"], "wall_s": tot["wall"],
            "tokens_per_s": tps,
            "tau": tot["step_tokens"] / tot["steps"] if tot["steps"] else (1.0 if "transformers" in name else 0.0),
            "speedup_vs_transformers": tps / (base_hf["tokens"] / base_hf["wall"]),
            "speedup_vs_our_plain": tps / (base_plain["tokens"] / base_plain["wall"]),
            "same_as_transformers": sum(a == b for a, b in zip(tot["answers"], base_hf["answers"])),
            "same_as_our_plain": sum(a == b for a, b in zip(tot["answers"], base_plain["answers"])),
        })
    table = md_table(rows, ["engine", "prompts", "new_tokens", "tokens_per_s", "tau", "speedup_vs_transformers",
                            "speedup_vs_our_plain", "same_as_transformers", "same_as_our_plain"])
    import transformers
    write_results(f"peer_transformers_{Path(str(args.model)).stem}_{args.device}_{args.dtype}", rows,
                  {"hardware": hardware(device), "model": args.model, "dtype": args.dtype, "max_new_tokens": n,
                   "prompts": f"first turns of {args.questions}" if Path(args.questions).is_file() else "built-in",
                   "tree": args.tree or "default", "transformers": transformers.__version__,
                   "heads": json.dumps({m: str(getattr(args, f'heads_{m}') or shipped_heads(args.model, m))
                                        for m in heads}),
                   "note": "tokens_per_s = new tokens (EOS excluded) / wall time of whole generate calls, greedy"},
                  table, args.out)


if __name__ == "__main__":
    main()
