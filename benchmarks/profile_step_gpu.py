"""Where a decode step's GPU time goes: torch.profiler over eager steps, kernels grouped by what they do.

    python benchmarks/profile_step_gpu.py --out gpu_results                  # Llama-7B shape, bf16, plain + Amphista
    python benchmarks/profile_step_gpu.py --device cpu --shape tiny --out /tmp/p   # smoke run (CPU ops only)

The plain 7B step ran at 62% of the bandwidth floor on an H200 (benchmarks/results/gpu/). A GEMV-bound step
should spend nearly all its GPU time in the weight matmuls; this says how much goes elsewhere (attention,
norms, RoPE, KV writes, sampling, copies) and how much the step's wall time exceeds its summed kernel time.
Random weights of the real shape (no checkpoint travels to the GPU machine).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from amphista_engine.evaluation import shapes  # noqa: E402
from amphista_engine.evaluation.env import sync  # noqa: E402
from amphista_engine.generation import PlainDecoder  # noqa: E402
from amphista_engine.kernels import get_backend  # noqa: E402
from amphista_engine.kv_cache import KVCache  # noqa: E402
from amphista_engine.sampling import SamplingParams  # noqa: E402
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec  # noqa: E402

GROUPS = [("matmul", r"gemm|gemv|cutlass|xmma|sm90_|splitk|cublas|matmul"),
          ("attention", r"attn|attention|flash|fmha|sdpa|softmax"),
          ("norm", r"norm"), ("rope", r"rope|rotary"), ("kv cache", r"kv_|compact|scatter|index_put"),
          ("acceptance/sampling", r"accept|argmax|topk|sort|multinomial|greedy|typical"),
          ("copy/cast", r"copy|cast|to_copy|fill|memcpy|memset"), ("elementwise", r"elementwise|silu|mul|add|vectorized")]


def group_of(name: str) -> str:
    low = name.lower()
    for g, pat in GROUPS:
        if re.search(pat, low):
            return g
    return "other"


def profile_decoder(decoder, prompt, steps: int, device) -> dict:
    with torch.inference_mode():
        decoder.prefill([prompt])
        for _ in range(3):
            decoder.step()
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            decoder.step()[1].tolist()
        sync(device)
        wall_ms = (time.perf_counter() - t) * 1e3 / steps
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                decoder.step()[1].tolist()
            sync(device)
    kernels = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if device.type == "cuda" and evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if device.type != "cuda" and evt.cpu_parent is not None:
            continue
        us = evt.time_range.elapsed_us()
        kernels[evt.name][0] += us
        kernels[evt.name][1] += 1
    per_step = {k: (us / steps / 1e3, n / steps) for k, (us, n) in kernels.items()}
    groups = defaultdict(lambda: [0.0, 0.0])
    for k, (ms, n) in per_step.items():
        groups[group_of(k)][0] += ms
        groups[group_of(k)][1] += n
    busy = sum(ms for ms, _ in per_step.values())
    top = sorted(per_step.items(), key=lambda kv: -kv[1][0])[:20]
    return {"eager_wall_ms": round(wall_ms, 3), "kernel_ms": round(busy, 3),
            "kernels_per_step": round(sum(n for _, n in per_step.values()), 1),
            "groups": {g: {"ms": round(ms, 3), "launches": round(n, 1)} for g, (ms, n) in
                       sorted(groups.items(), key=lambda kv: -kv[1][0])},
            "top": [{"kernel": k[:140], "ms": round(ms, 4), "launches": round(n, 1)} for k, (ms, n) in top]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--methods", default="plain,amphista")
    ap.add_argument("--tree", default="mc_sim_7b_63")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    cfg = shapes.shape_config(args.shape)
    model = shapes.random_model(cfg, device, dtype, 1024, seed=0, allow_large=True)
    cache = KVCache.for_model(model.config, 1, 1024, dtype, device)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    res = {"meta": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": args.shape,
                    "dtype": "bfloat16", "backend": get_backend(device), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps}}
    lines = [f"# Decode-step GPU time by kernel group ({args.shape}, bf16, eager, backend {res['meta']['backend']}, "
             f"{res['meta']['device']}, {res['meta']['date']})", ""]
    printed = 0
    for method in args.methods.split(","):
        if method == "plain":
            dec = PlainDecoder(model, cache, SamplingParams())
        else:
            dec = SpeculativeDecoder(model, cache, shapes.random_heads(method, model), TreeSpec(args.tree, 4, device),
                                     SamplingParams())
        r = res[method] = profile_decoder(dec, prompt, args.steps, device)
        lines += [f"## {method}{'' if method == 'plain' else ' (' + args.tree + ')'}: eager wall {r['eager_wall_ms']} ms "
                  f"per step, summed kernel time {r['kernel_ms']} ms, {r['kernels_per_step']} launches per step", "",
                  "| group | ms per step | launches |", "|---|---|---|"]
        lines += [f"| {g} | {v['ms']} | {v['launches']} |" for g, v in r["groups"].items()]
        lines += ["", "| kernel | ms per step | launches |", "|---|---|---|"]
        lines += [f"| `{t['kernel'][:100]}` | {t['ms']} | {t['launches']} |" for t in r["top"]] + [""]
        print("\n".join(lines[printed:]), flush=True)
        printed = len(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(res, indent=1))
    (args.out / "profile.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
