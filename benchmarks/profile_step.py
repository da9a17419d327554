"""Where a plain decode step's time goes (issue 6's bandwidth floor): per-kernel GPU time of one step.

    python benchmarks/profile_step.py --out gpu_results                  # Llama-7B shape, bf16, on CUDA
    python benchmarks/profile_step.py --shape tiny --device cpu --out /tmp/x   # smoke run (CI)

The latency table says a plain 7B step takes X ms against a floor of Y ms (weight bytes / copy bandwidth).
This splits the difference: the step's wall time with CUDA graphs, the sum of its kernels' device times
(torch.profiler / CUPTI, eager and replayed), and each kernel family's share with the bytes it had to read,
so the gap reads as "GEMV efficiency" vs "time between kernels" vs "small kernels". With `--linear
triton` every nn.Linear goes through the few-row Triton GEMM instead of cuBLAS, and each layer takes the fused
form (norms, activation and residual adds inside the GEMVs, model.Block.forward_fused); the same A/B as
latency_gpu.py's "plain, triton linear" row.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from amphista_engine.cuda_graphs import DecodeGraphs  # noqa: E402
from amphista_engine.evaluation.env import commit, sync  # noqa: E402
from amphista_engine.evaluation.shapes import random_model, shape_config  # noqa: E402
from amphista_engine.generation import PlainDecoder  # noqa: E402
from amphista_engine.kernels.routed_linear import route_linears  # noqa: E402
from amphista_engine.kv_cache import KVCache  # noqa: E402
from amphista_engine.sampling import SamplingParams  # noqa: E402

# Kernel names -> families; the first pattern that matches wins (cuBLAS / CUTLASS / nvjet names vary by
# version, so GEMM is matched broadly).
FAMILIES = [
    ("attention", r"tree_att|attn|attention|flash|split_k|combine"),
    ("gemm", r"gemm|gemv|cutlass|nvjet|sm90_|sm80_|ampere|hopper|cublas|_linear|matmul|few_row"),
    ("norm", r"rms|norm"),
    ("rope/kv-write", r"rope|kv_write|qkv"),
    ("silu_mul", r"silu"),
    ("sampling/argmax", r"argmax|reduce|max|sample|topk|sort"),
    ("copy/elementwise", r"copy|elementwise|fill|index|cat|add|mul"),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, pat in FAMILIES:
        if re.search(pat, low):
            return fam
    return "other"


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    """name -> (total device us, calls) over every device kernel the profiler saw."""
    out: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total is not None:
            if getattr(ev, "is_user_annotation", False):
                continue
            out[ev.name][0] += ev.device_time
            out[ev.name][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def profile_steps(dec, steps: int, device) -> dict:
    """Kernel table per step (name -> (device us, launches)) over `steps` steps under the profiler."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            dec.step()
        sync(device)
    return {k: (us / steps, n / steps) for k, (us, n) in kernel_times(prof).items()}


def wall_ms(dec, steps: int, device) -> float:
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        dec.step()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def summarize(table: dict) -> dict:
    fams: dict[str, list] = defaultdict(lambda: [0.0, 0.0])
    for name, (us, n) in table.items():
        fams[family(name)][0] += us
        fams[family(name)][1] += n
    top = sorted(table.items(), key=lambda kv: -kv[1][0])[:15]
    return {"kernel_us_per_step": round(sum(us for us, _ in table.values()), 1),
            "kernels_per_step": round(sum(n for _, n in table.values()), 1),
            "families": {f: {"us": round(us, 1), "calls": round(n, 1)} for f, (us, n) in
                         sorted(fams.items(), key=lambda kv: -kv[1][0])},
            "top": [{"name": k[:120], "us": round(us, 2), "calls": round(n, 2), "family": family(k)}
                    for k, (us, n) in top]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--linear", default="both", choices=["cublas", "triton", "both"])
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="gpu_results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("profile_step: no CUDA device usable by torch; use --device cpu for the smoke run", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    cfg = shape_config(args.shape)
    max_seq = args.prompt_tokens + 4 * args.steps + 64
    model = random_model(cfg, device, dtype, max_seq, 0, allow_large=True)
    from benchmarks.latency_gpu import copy_bandwidth_gbs, weight_bytes   # one definition of the floor
    wbytes = weight_bytes(model)
    bw = copy_bandwidth_gbs(device, 16 if device.type == "cpu" else 1024)
    floor_ms = wbytes / (bw * 1e9) * 1e3
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    res = {"meta": {"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "dtype": args.dtype, "torch": torch.__version__, "commit": commit(),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "weight_GB": round(wbytes / 1e9, 3), "copy_bandwidth_GBps": round(bw, 1),
                    "bw_floor_ms": round(floor_ms, 3)}, "runs": {}}
    linears = ["cublas", "triton"] if args.linear == "both" else [args.linear]
    with torch.inference_mode():
        for lin in linears:
            route_linears(model, on=(lin == "triton"))
            for graphs_on in ([False, True] if device.type == "cuda" else [False]):
                cache = KVCache.for_model(cfg, 1, max_seq, dtype, device)
                dec = PlainDecoder(model, cache, SamplingParams())
                graphs = DecodeGraphs()
                if graphs_on:
                    graphs.attach(dec)
                dec.prefill([prompt])
                for _ in range(3):
                    dec.step()
                ms = wall_ms(dec, args.steps, device)
                table = profile_steps(dec, args.steps, device)
                s = summarize(table)
                key = f"{lin}, graphs {'on' if graphs_on else 'off'}"
                s["wall_ms"] = round(ms, 3)
                s["pct_of_bw_floor"] = round(100 * floor_ms / ms, 1)
                s["gap_us"] = round(ms * 1e3 - s["kernel_us_per_step"], 1)
                res["runs"][key] = s
                print(f"# {key}: wall {ms:.3f} ms, kernels {s['kernel_us_per_step']:.0f} us in "
                      f"{s['kernels_per_step']:.0f} launches, floor {floor_ms:.3f} ms", file=sys.stderr)
                graphs.clear()
                del dec, cache
        route_linears(model, on=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_step_{args.shape}.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Plain decode step, where the time goes: {args.shape}, {res['meta']['device']}, {args.dtype}", "",
             f"- {res['meta']['date']}, commit {res['meta']['commit']}, torch {torch.__version__}",
             f"- weights {wbytes / 1e9:.2f} GB, copy bandwidth {bw:.0f} GB/s, floor {floor_ms:.3f} ms", "",
             "| run | wall ms | % of floor | kernel us | launches | gap us | " +
             " | ".join(f for f, _ in FAMILIES) + " | other |",
             "|---|---|---|---|---|---|" + "---|" * (len(FAMILIES) + 1)]
    for key, s in res["runs"].items():
        fam = s["families"]
        cells = [str(fam.get(f, {}).get("us", 0)) for f, _ in FAMILIES] + [str(fam.get("other", {}).get("us", 0))]
        lines.append(f"| {key} | {s['wall_ms']} | {s['pct_of_bw_floor']} | {s['kernel_us_per_step']} | "
                     f"{s['kernels_per_step']} | {s['gap_us']} | " + " | ".join(cells) + " |")
    for key, s in res["runs"].items():
        lines += ["", f"## Top kernels, {key}", "", "| kernel | us/step | calls/step | family |", "|---|---|---|---|"]
        lines += [f"| `{t['name'][:90]}` | {t['us']} | {t['calls']} | {t['family']} |" for t in s["top"]]
    (out / f"profile_step_{args.shape}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
