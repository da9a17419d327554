"""Cost of one speculative step (draft + tree + verify + accept + commit) against one plain decode step.

    python benchmarks/step_overhead.py [--model smollm2-135m] [--device cpu] [--dtype fp32]

The ratio is the break-even tau: a tree pays off when its heads emit more tokens per step than this.
Random heads are enough for timing (a step costs the same whatever is accepted, up to the commit copy).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import hardware, md_table, median_ms, write_results  # noqa: E402

from amphista_engine.generation import PlainDecoder  # noqa: E402
from amphista_engine.heads import random_heads  # noqa: E402
from amphista_engine.kernels.linear_setup import LinearSetup  # noqa: E402
from amphista_engine.kv_cache import KVCache  # noqa: E402
from amphista_engine.loading import load_model, parse_dtype  # noqa: E402
from amphista_engine.sampling import SamplingParams  # noqa: E402
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec  # noqa: E402

TREES = ["chain-4", "dynamic-8", "tree-16", "dynamic-16", "tree-32", "dynamic-32", "mc_sim_7b_63", "dynamic-64"]


def time_steps(decoder, prompt, device, repeats):
    with torch.inference_mode():
        decoder.prefill([prompt])
        return median_ms(decoder.step, device, repeats=repeats, warmup=2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--trees", default=",".join(TREES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = parse_dtype(args.dtype)
    loaded = load_model(args.model, dtype=dtype, device=args.device, max_seq_len=2048)
    linears = LinearSetup.for_device(args.device, dtype)      # the linears as the Engine runs them
    model = linears.apply(loaded.model)
    prompt = torch.randint(0, loaded.config.vocab_size, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    cache = KVCache.for_model(loaded.config, 1, 2048, dtype, args.device)
    plain = time_steps(PlainDecoder(model, cache, SamplingParams()), prompt, args.device, args.repeats)
    rows = [{"method": "plain", "tree": "-", "nodes": 1, "step_ms": plain, "ratio_vs_plain": 1.0}]
    for kind in ("medusa", "amphista"):
        heads = linears.apply(random_heads(kind, model, num_heads=4).to(args.device, dtype))
        for tree in args.trees.split(","):
            spec = TreeSpec(tree, 4, args.device)
            dec = SpeculativeDecoder(model, cache, heads, spec, SamplingParams())
            ms = time_steps(dec, prompt, args.device, args.repeats)
            rows.append({"method": kind, "tree": tree, "nodes": spec.num_nodes, "step_ms": ms,
                         "ratio_vs_plain": ms / plain})
            print(rows[-1], file=sys.stderr)
    table = md_table(rows, ["method", "tree", "nodes", "step_ms", "ratio_vs_plain"])
    write_results(f"step_overhead_{Path(str(args.model)).stem}_{args.device}_{args.dtype}", rows,
                  {"hardware": hardware(args.device), "model": args.model, "dtype": args.dtype,
                   "linears": linears.describe(),
                   "prompt_tokens": args.prompt_tokens,
                   "note": "ratio_vs_plain = break-even tau for that tree"}, table, args.out)


if __name__ == "__main__":
    main()
