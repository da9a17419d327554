"""Does greedy speculative decoding emit plain greedy decoding's tokens on the GPU, per backend and dtype?

    python benchmarks/gpu_greedy_agreement.py --out gpu_results            # on a CUDA machine
    python benchmarks/gpu_greedy_agreement.py --device cpu --shape tiny --tokens 16 --backends torch --out /tmp/x

In exact arithmetic they are identical. In bf16 a tree verification computes each row with other kernel
shapes than a one-token step (more query rows, another split of the keys), so a near-tie can flip and the
two answers part. On the CPU that was measured and fixed (kernels/cpu_exact.py); this measures the GPU
backends. It is a measurement, not a test: the table says, per backend, dtype and tree, how many tokens each
prompt kept in common with plain decoding. The model is the SmolLM2-135M shape with random N(0, 0.02)
weights (no checkpoint travels to the GPU machine); random heads accept little, so nearly every token comes
from the tree's root row, which is the row that must equal the plain step. The backend "triton-exact" is
triton with the row-invariant decode path (AMPHISTA_EXACT_GREEDY=1, routed linears: kernels/gpu_exact.py),
which should make every row identical.
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

from amphista_engine.evaluation import shapes  # noqa: E402
from amphista_engine.generation import PlainDecoder  # noqa: E402
from amphista_engine.heads import random_heads  # noqa: E402
from amphista_engine.kernels import gpu_exact, resolve, use_backend  # noqa: E402
from amphista_engine.kv_cache import KVCache  # noqa: E402
from amphista_engine.sampling import SamplingParams  # noqa: E402
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def decode(decoder, prompts, n_tokens):
    with torch.inference_mode():
        rows = [[t] for t in decoder.prefill(prompts).tolist()]
        while min(len(r) for r in rows) < n_tokens:
            out, count = decoder.step()
            n, toks = count.tolist(), out.tolist()
            for b, r in enumerate(rows):
                r += toks[b][:n[b]]
    return [r[:n_tokens] for r in rows]


def common_prefix(a, b) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def exact_mode(model, on: bool):
    """The row-invariant decode path for the model, as the Engine sets it up with AMPHISTA_EXACT_GREEDY=1."""
    return gpu_exact.enabled_for(model) if on else contextlib.nullcontext()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--backends", default="triton-exact,torch,triton,cuda")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--trees", default="tree-16,mc_sim_7b_63")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--time-budget", type=float, default=60.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_greedy_agreement: no CUDA device usable by torch; for the smoke run: --device cpu --shape tiny "
              "--backends torch", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.time_budget
    g = torch.Generator().manual_seed(5)
    cfg = shapes.shape_config(args.shape)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (40, 100)]
    rows, notes = [], []
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        (args.out / "greedy_agreement.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=1))
        lines = [f"# Greedy agreement, speculative vs plain ({args.shape} shape, random weights, {args.tokens} tokens, "
                 f"2 prompts, device {torch.cuda.get_device_name() if device.type == 'cuda' else args.device})", "",
                 "| backend | dtype | tree | tokens equal to plain, per prompt | identical |", "|---|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['dtype']} | {r['tree']} | {', '.join(map(str, r['common']))} / {args.tokens} | "
                  f"{'yes' if r['identical'] else 'no'} |" for r in rows]
        lines += [f"- note: {n}" for n in notes]
        (args.out / "greedy_agreement.md").write_text("\n".join(lines) + "\n")
        return lines

    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        model = shapes.random_model(cfg, device, dtype, 1024, seed=0, allow_large=True)
        heads = random_heads("amphista", model, num_heads=4, seed=2).to(device=device, dtype=dtype)
        cache = KVCache.for_model(model.config, len(prompts), 1024, dtype, device)
        for name in args.backends.split(","):
            backend = name.removesuffix("-exact")
            if time.monotonic() > deadline:
                notes.append(f"{name} {dname}: skipped (time budget)")
                continue
            with use_backend(backend):
                got = resolve("tree_attention", device)
            if got != backend:
                notes.append(f"{name} {dname}: backend unavailable here (resolves to {got}), skipped")
                continue
            with use_backend(backend), exact_mode(model, name.endswith("-exact")):
                plain = decode(PlainDecoder(model, cache, SamplingParams()), prompts, args.tokens)
                for tree in args.trees.split(","):
                    spec = decode(SpeculativeDecoder(model, cache, heads, TreeSpec(tree, 4, device), SamplingParams()),
                                  prompts, args.tokens)
                    common = [common_prefix(p, s) for p, s in zip(plain, spec)]
                    rows.append({"backend": name, "dtype": dname, "tree": tree, "common": common,
                                 "identical": spec == plain})
                    print(rows[-1], flush=True)
                    save()
        del model, heads, cache
    print("\n".join(save()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
