"""What a speculative step costs a batch on a GPU: batch size x tree size, against the plain step of that batch.

A batch of B rows verifies B x N tree rows. The untimed GPU tree of a batch (speculative.default_tree) keeps them
within speculative.GPU_ROWS, a roofline bound (a product stays bound by reading the weights for a few hundred
rows); this measures it: the Llama-7B shape with random weights (no checkpoint; random heads accept almost nothing,
so a step here is its full cost for about one token), bf16, CUDA graphs and routed linears as the Engine runs them,
Amphista heads on dynamic-N trees. Each cell is the median wall time of `decoder.step()` plus the host sync the
generation loop pays, as a ratio to the plain step of the same batch: speculation pays for a batch where its tau
exceeds that ratio. It also prints the tree default_tree picks per batch.

    python benchmarks/batch_tree_gpu.py --out gpu_results [--batches 1,4,8,16,32,64] [--nodes 4,8,16,32,64]
    python benchmarks/batch_tree_gpu.py --smoke --device cpu --out /tmp/x     # tiny shapes, seconds (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from amphista_engine.cuda_graphs import DecodeGraphs  # noqa: E402
from amphista_engine.evaluation.env import commit  # noqa: E402
from amphista_engine.evaluation.shapes import random_heads, shape_config  # noqa: E402
from amphista_engine.generation import PlainDecoder  # noqa: E402
from amphista_engine.kv_cache import KVCache  # noqa: E402
from amphista_engine.sampling import SamplingParams  # noqa: E402
from amphista_engine.speculative import GPU_ROWS, SpeculativeDecoder, TreeSpec, default_tree  # noqa: E402
from benchmarks.latency_gpu import environment, random_model, routed, time_steps  # noqa: E402


def run(args, save=lambda res: None) -> dict:
    """save(res) after each batch's row: the session runs this under `timeout`, whose signal lost every row."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = shape_config("tiny" if args.smoke else args.shape)
    batches = [int(b) for b in args.batches.split(",")]
    nodes = [int(n) for n in args.nodes.split(",")]
    max_seq = args.prompt_tokens + args.steps * 8 + 256
    model = random_model(cfg, device, dtype, max_seq)
    heads = random_heads("amphista", model)
    cuda = device.type == "cuda"
    deadline = time.monotonic() + args.time_budget
    rows, notes = [], []
    meta = {**environment(device), "shape": "tiny" if args.smoke else args.shape, "dtype": args.dtype,
            "prompt_tokens": args.prompt_tokens, "steps": args.steps, "gpu_rows": GPU_ROWS, "commit": commit(),
            "what": "step ms of dynamic-N / plain step ms of the same batch (graphs on, routed linears on CUDA)"}
    res = {"meta": meta, "rows": rows, "notes": notes}
    g = torch.Generator().manual_seed(0)
    with routed(model) if cuda else contextlib.nullcontext():
        for B in batches:
            if time.monotonic() > deadline:
                notes.append(f"batch {B} and larger: skipped (time budget {args.time_budget}s)")
                break
            cache = KVCache.for_model(cfg, B, max_seq, dtype, device)
            prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_tokens), generator=g).tolist()
            graphs = DecodeGraphs(enabled=cuda)
            try:
                plain = time_steps(graphs.attach(PlainDecoder(model, cache, SamplingParams())), prompts,
                                   args.steps, 3 if cuda else 1)
                row = {"batch": B, "plain_ms": round(plain, 3), "default_tree": default_tree(4, "cuda", None, batch=B)}
                for n in nodes:
                    spec = TreeSpec(f"dynamic-{n}", heads.num_heads, device)
                    dec = graphs.attach(SpeculativeDecoder(model, cache, heads, spec, SamplingParams()))
                    row[f"dynamic-{n}"] = round(time_steps(dec, prompts, args.steps, 3 if cuda else 1) / plain, 3)
            finally:
                graphs.clear()
            rows.append(row)
            print(row, file=sys.stderr)
            save(res)
            del cache
    return res


def markdown(res: dict) -> str:
    rows = res["rows"]
    trees = [k for k in rows[0] if k.startswith("dynamic-")] if rows else []
    lines = [f"# batch x tree on {res['meta'].get('device', '?')}", "",
             "\n".join(f"- {k}: {v}" for k, v in res["meta"].items()), "",
             "| batch | plain ms | " + " | ".join(trees) + " | default_tree |",
             "|---|---|" + "---|" * len(trees) + "---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['plain_ms']} | " + " | ".join(str(r[t]) for t in trees)
                     + f" | {r['default_tree']} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in res["notes"]]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_results"))
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--batches", default="1,4,8,16,32,64")
    ap.add_argument("--nodes", default="4,8,16,32,64")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--time-budget", type=float, default=120.0, help="seconds; later batches are skipped")
    ap.add_argument("--smoke", action="store_true", help="tiny model, small batches (checks the script runs)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batches, args.nodes, args.steps, args.prompt_tokens = "1,2", "4,8", 2, 16
    if args.device == "cuda" and not torch.cuda.is_available():
        print("batch_tree_gpu: no CUDA device (use --smoke --device cpu to check the script)", file=sys.stderr)
        return 2
    def save(res):
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "batch_tree.json").write_text(json.dumps(res, indent=1))
        (args.out / "batch_tree.md").write_text(markdown(res))

    res = run(args, save)
    save(res)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
