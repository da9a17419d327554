"""Where a decode step's GPU time goes: torch.profiler over decode steps, kernels grouped by what they do.

    python benchmarks/profile_step_gpu.py --out gpu_results                  # Llama-7B shape, bf16
    python benchmarks/profile_step_gpu.py --device cpu --shape tiny --out /tmp/p   # smoke run (CPU ops only)

A GEMV-bound plain step should spend nearly all its GPU time in the weight matmuls. For each method (plain,
Amphista on --tree), each way of running the weight products (cuBLAS; routed as the Engine does on CUDA, each
shape on the faster of the few-row Triton GEMM and cuBLAS; the Triton GEMM for all, with and without the fused
layers of model.Block.forward_fused) and each graph mode, this reports the step's wall
time, its summed kernel time and launches, the gap between them (launch gaps, host work), the share of each
kernel group, and for plain steps the share of the bandwidth floor (weight bytes / measured copy bandwidth, as in
latency_gpu.py). An H200 run (benchmarks/results/gpu/h200_2026-11-28_profile/) put 0.5 ms of a 4.3 ms 7B step
outside the weight GEMVs. Random weights of the real shape (no checkpoint travels to the GPU machine).
"""
from __future__ import annotations

import argparse
import contextlib
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

from amphista_engine.cuda_graphs import DecodeGraphs  # noqa: E402
from amphista_engine.evaluation import shapes  # noqa: E402
from amphista_engine.evaluation.env import commit, sync  # noqa: E402
from amphista_engine.generation import PlainDecoder  # noqa: E402
from amphista_engine.kernels import get_backend  # noqa: E402
from amphista_engine.kv_cache import KVCache  # noqa: E402
from amphista_engine.sampling import SamplingParams  # noqa: E402
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec  # noqa: E402
from benchmarks.latency_gpu import copy_bandwidth_gbs, routed, weight_bytes  # noqa: E402  (one definition of the floor)

# The first pattern that matches names the group (cuBLAS / CUTLASS / nvjet kernel names vary by version).
GROUPS = [("attention", r"tree_att|attn|attention|flash|fmha|sdpa|softmax"),
          ("matmul", r"gemm|gemv|cutlass|xmma|nvjet|sm90_|sm80_|splitk|cublas|matmul|_linear_kernel"),
          ("norm", r"norm"), ("rope / kv write", r"rope|rotary|qkv|kv_"),
          ("kv cache", r"compact|scatter|index_put"),
          ("acceptance/sampling", r"accept|argmax|topk|sort|multinomial|greedy|typical|reduce_kernel"),
          ("copy/cast", r"copy|cast|to_copy|fill|memcpy|memset"), ("elementwise", r"elementwise|silu|mul|add|vectorized")]


def group_of(name: str) -> str:
    low = name.lower()
    for g, pat in GROUPS:
        if re.search(pat, low):
            return g
    return "other"


def profile_decoder(decoder, prompt, steps: int, device) -> dict:
    """Wall ms per step (each step synced and its tokens read, as the generation loop does), then the same
    steps under the profiler: device kernels on a GPU (graph replays included), top-level ops on a CPU."""
    with torch.inference_mode():
        decoder.prefill([prompt])
        for _ in range(3):                   # eager warm-up, then graph capture when graphs are attached
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
        kernels[evt.name][0] += evt.time_range.elapsed_us()
        kernels[evt.name][1] += 1
    per_step = {k: (us / steps / 1e3, n / steps) for k, (us, n) in kernels.items()}
    groups = defaultdict(lambda: [0.0, 0.0])
    for k, (ms, n) in per_step.items():
        groups[group_of(k)][0] += ms
        groups[group_of(k)][1] += n
    busy = sum(ms for ms, _ in per_step.values())
    top = sorted(per_step.items(), key=lambda kv: -kv[1][0])[:20]
    return {"wall_ms": round(wall_ms, 3), "kernel_ms": round(busy, 3), "gap_ms": round(wall_ms - busy, 3),
            "kernels_per_step": round(sum(n for _, n in per_step.values()), 1),
            "groups": {g: {"ms": round(ms, 3), "launches": round(n, 1)} for g, (ms, n) in
                       sorted(groups.items(), key=lambda kv: -kv[1][0])},
            "top": [{"kernel": k[:140], "ms": round(ms, 4), "launches": round(n, 1)} for k, (ms, n) in top]}


def profile_methods(args, model, cache, prompt, device, graph_modes, linear, heads, res, lines, details,
                    floor_ms):
    """Profiles each of args.methods with the model's linears as they are set up now (`linear` labels them)."""
    for method in args.methods.split(","):
        for use_graphs in graph_modes:
            if method == "plain":
                dec = PlainDecoder(model, cache, SamplingParams())
            else:
                heads.setdefault(method, shapes.random_heads(method, model))
                dec = SpeculativeDecoder(model, cache, heads[method], TreeSpec(args.tree, 4, device), SamplingParams())
            graphs = DecodeGraphs()
            if use_graphs:
                graphs.attach(dec)
            key = f"{method}{'' if method == 'plain' else ' (' + args.tree + ')'}, {linear}, graphs {'on' if use_graphs else 'off'}"
            r = res["runs"][key] = profile_decoder(dec, prompt, args.steps, device)
            graphs.clear()
            pct = round(100 * floor_ms / r["wall_ms"], 1) if method == "plain" else ""
            lines.append(f"| {key.split(',')[0]} | {linear} | {'on' if use_graphs else 'off'} | {r['wall_ms']} | "
                         f"{r['kernel_ms']} | {r['gap_ms']} | {r['kernels_per_step']} | {pct} |")
            print(lines[-1], flush=True)
            details += [f"## {key}", "", "| group | ms per step | launches |", "|---|---|---|"]
            details += [f"| {g} | {v['ms']} | {v['launches']} |" for g, v in r["groups"].items()]
            details += ["", "| kernel | ms per step | launches |", "|---|---|---|"]
            details += [f"| `{t['kernel'][:100]}` | {t['ms']} | {t['launches']} |" for t in r["top"]] + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--methods", default="plain,amphista")
    ap.add_argument("--tree", default="mc_sim_7b_63")
    ap.add_argument("--linear", default="cublas,auto,triton,triton-unfused",
                    help="any of cublas, auto (routed, unfused: the Engine's default on CUDA, each shape on the "
                         "faster of kernel and cuBLAS, kernels/linear_choice.py), triton (routed to the kernel, "
                         "fused layers), triton-unfused (routed to the kernel, norms and activation as their own "
                         "launches)")
    ap.add_argument("--graphs", default="on", help="on and/or off (CUDA graphs; always off on a CPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("profile_step_gpu: no CUDA device usable by torch; use --device cpu for the smoke run", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    cfg = shapes.shape_config(args.shape)
    model = shapes.random_model(cfg, device, dtype, 1024, seed=0, allow_large=True)
    cache = KVCache.for_model(model.config, 1, 1024, dtype, device)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    bw = copy_bandwidth_gbs(device, 1024 if device.type == "cuda" else 16)
    floor_ms = weight_bytes(model) / (bw * 1e9) * 1e3
    graph_modes = [g == "on" for g in args.graphs.split(",")] if device.type == "cuda" else [False]
    res = {"meta": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": args.shape,
                    "dtype": "bfloat16", "backend": get_backend(device), "torch": torch.__version__, "commit": commit(),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps,
                    "prompt_tokens": args.prompt_tokens, "weight_GB": round(weight_bytes(model) / 1e9, 3),
                    "copy_bandwidth_GBps": round(bw, 1), "bw_floor_ms": round(floor_ms, 3)}, "runs": {}}
    m = res["meta"]
    lines = [f"# Decode-step GPU time by kernel group ({args.shape}, bf16, backend {m['backend']}, {m['device']}, "
             f"{m['date']}, commit {m['commit']})", "",
             f"- weights {m['weight_GB']} GB at {m['copy_bandwidth_GBps']} GB/s copy bandwidth: floor {m['bw_floor_ms']} ms",
             f"- prompt {args.prompt_tokens} tokens, {args.steps} steps; wall = per step with its sync and token read", "",
             "| method | weight products | graphs | wall ms | kernel ms | gap ms | launches | % of floor |",
             "|---|---|---|---|---|---|---|---|"]
    details = []
    linears = args.linear.split(",")
    if not set(linears) <= {"cublas", "auto", "triton", "triton-unfused"}:
        ap.error(f"--linear {args.linear}: expected cublas, auto, triton and/or triton-unfused")
    for linear in linears:
        ways = contextlib.nullcontext() if linear == "cublas" else \
            routed(model, "auto" if linear == "auto" else "on", fused=linear == "triton")
        with ways:
            profile_methods(args, model, cache, prompt, device, graph_modes, linear, {}, res, lines, details,
                            floor_ms)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(res, indent=1))
    (args.out / "profile.md").write_text("\n".join(lines + [""] + details) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
