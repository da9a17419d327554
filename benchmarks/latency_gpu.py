"""End-to-end decode-step latency on random-weight models: plain vs Medusa vs Amphista, CUDA graphs on/off.

    python benchmarks/latency_gpu.py --out gpu_results            # Llama-7B and SmolLM2-135M shapes, bf16
    python benchmarks/latency_gpu.py --smoke --device cpu --out /tmp/x   # tiny shapes, seconds (CI)

No checkpoint, tokenizer or network: the models are `Transformer(ModelConfig(...))` built on the meta device
and materialised on the GPU with random weights (a step costs the same whatever the weights are; random
heads accept almost nothing, so a speculative step here is its full cost for about one token). Each row is
the median wall time of `decoder.step()` plus the host sync the generation loop does after it.

Targets recorded (issue 6, on an H100): plain decode of the Llama-7B shape at >= 85% of the memory-bandwidth
floor (weight bytes / measured device copy bandwidth); a 64-node speculative step <= 1.35x a plain step on
the 7B shape; SmolLM2-135M plain decode >= 3x transformers' eager `generate` (when transformers is
installed); and the effect of CUDA graphs on every configuration.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from amphista_engine.config import ModelConfig  # noqa: E402
from amphista_engine.cuda_graphs import DecodeGraphs  # noqa: E402
from amphista_engine.evaluation import shapes  # noqa: E402
from amphista_engine.evaluation.env import commit, env_var, sync  # noqa: E402
from amphista_engine.evaluation.shapes import random_heads, shape_config  # noqa: E402
from amphista_engine.generation import PlainDecoder  # noqa: E402
from amphista_engine.kernels import gpu_exact  # noqa: E402
from amphista_engine.kernels.backend import PDL_ENV, triton_runs_on  # noqa: E402
from amphista_engine.kernels import routed_linear  # noqa: E402
from amphista_engine.kernels.routed_linear import route_linears  # noqa: E402
from amphista_engine.kv_cache import KVCache  # noqa: E402
from amphista_engine.model import Transformer  # noqa: E402
from amphista_engine.sampling import SamplingParams  # noqa: E402
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec  # noqa: E402

SHAPES = {name: shape_config(name) for name in ("llama-7b", "smollm2-135m")}
SMOKE = shape_config("tiny")
TREES = ("mc_sim_7b_63", "dynamic-64", "tree-16")


def random_model(cfg: ModelConfig, device, dtype, max_seq_len: int, seed: int = 0) -> Transformer:
    return shapes.random_model(cfg, device, dtype, max_seq_len, seed, allow_large=True)


def weight_bytes(model: Transformer) -> int:
    """Bytes a decode step must read: every weight once; the embedding table only when it is also the LM
    head (tied), otherwise a decode step reads one of its rows."""
    tied = model.output.weight is model.tok_embeddings.weight
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (name.startswith("tok_embeddings") and not tied):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def copy_bandwidth_gbs(device, mib: int) -> float:
    """Device memory bandwidth as a large device-to-device copy moves it: (read + write bytes) / time. On a GPU the
    time is the device's (CUDA events), as kernels/_bench.py measures its ceiling: host clocks around the sync
    added ~10 us of launch and sync to each 1 GiB copy, a ceiling ~2% low in every suite run to 2026-12-05 (H100:
    2943 GB/s here, 3010 in the kernels stage), so the floor was ~2% high and each % of it ~2% too generous."""
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(10):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            dst.copy_(src)          # the GPU busy as the timed copy is queued: no launch gap after `start`
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            continue
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times) / 1e9


def time_steps(decoder, prompt, steps: int, warmup: int) -> float:
    """Median ms of decoder.step() plus the sync the generation loop pays after it. prompt: token ids, or a list
    of them (a batch)."""
    with torch.inference_mode():
        decoder.prefill(prompt if prompt and isinstance(prompt[0], list) else [prompt])
        for _ in range(warmup):              # graphs: eager warm-up, then capture + replay
            decoder.step()
        sync(decoder.device)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out, count = decoder.step()
            count.tolist()                   # what generation.run does every step
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def transformers_ms_per_token(cfg: ModelConfig, device, dtype, prompt_len: int, new_tokens: int):
    """transformers' eager `generate` (greedy, no cache tricks) on the same shape, random weights: ms per decode
    forward, (time of new_tokens + 1 tokens - time of 1) / new_tokens as ar_latency.py measures it. The first token
    comes from the prompt's forward, which the plain step it is compared with does not include."""
    try:
        import transformers
    except Exception as err:                 # not installed on this machine: recorded, not fatal
        return None, f"transformers unavailable ({type(err).__name__})"
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings, rms_norm_eps=cfg.norm_eps)
    model = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)

    def seconds(new: int) -> float:
        with torch.inference_mode():
            sync(device)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            sync(device)
        return time.perf_counter() - t

    seconds(new_tokens + 1)                  # warm-up
    ms = (seconds(new_tokens + 1) - seconds(1)) * 1e3 / new_tokens
    return ms, f"transformers {transformers.__version__}"


def environment(device) -> dict:
    from amphista_engine._ext import extension_error, load_extension
    from amphista_engine.kernels import get_backend
    ext = load_extension()
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
            "torch": torch.__version__, "cuda_runtime_torch": torch.version.cuda, "python": platform.python_version(),
            "device": (torch.cuda.get_device_name() if torch.device(device).type == "cuda"
                       else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"),
            "kernel_backend": get_backend(torch.device(device)),
            "extension": (f"built for sm_{','.join(ext.built_archs())}, CUDA {ext.cuda_version()}" if ext else
                          f"missing: {extension_error()}")}
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    return meta


@contextlib.contextmanager
def routed(model, mode: str = "auto", fused: bool = False):
    """Within the block, `model`'s linears are routed in `mode` (kernels/routed_linear.py; "auto", the Engine's
    CUDA default: each product on the faster of the Triton GEMM and cuBLAS, kernels/linear_choice.py), the
    layers fused around the GEMVs or not (model.Block.forward_fused); back to cuBLAS, unfused, after."""
    route_linears(model)
    model.fuse_decode_layers = fused
    try:
        with routed_linear.set_mode(mode):
            yield model
    finally:
        route_linears(model, on=False)
        model.fuse_decode_layers = False


def mode_rows(label, context, model, cache, trees, prompt, steps, plain_ms, floor_ms, shape_name) -> list[dict]:
    """Rows '<kind>, <label>' for the plain step and the first 64-node Amphista tree, graphs on, run inside
    context() (a mode switch), against the plain graph-replayed step of the same run (plain_ms)."""
    device = next(model.parameters()).device
    tree64 = next((t for t in trees if TreeSpec(t, 4, "cpu").num_nodes == 64), trees[0])
    graphs, rows = DecodeGraphs(), []
    with context():
        try:
            heads = random_heads("amphista", model)
            spec64 = TreeSpec(tree64, heads.num_heads, device)
            for kind, tree, nodes, dec in (
                    ("plain", "-", 1, PlainDecoder(model, cache, SamplingParams())),
                    ("amphista", tree64, spec64.num_nodes,
                     SpeculativeDecoder(model, cache, heads, spec64, SamplingParams()))):
                graphs.attach(dec)
                ms = time_steps(dec, prompt, steps, 3)
                rows.append({"model": shape_name, "method": f"{kind}, {label}", "tree": tree, "nodes": nodes,
                             "graphs": True, "step_ms": round(ms, 3), "ratio_vs_plain": round(ms / plain_ms, 3),
                             "pct_of_bw_floor": round(100 * floor_ms / ms, 1) if nodes == 1 else None})
                print(rows[-1], file=sys.stderr)
            del heads
        finally:
            graphs.clear()
    return rows


def run(args, save=None) -> dict:
    """All configurations; `save(result)` is called after each model shape, so a run stopped by a timeout
    still leaves what it measured."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(1)           # tiny CPU matmuls: thread wake-ups on a shared machine dominate
    shapes = {"smoke": SMOKE} if args.smoke else {k: SHAPES[k] for k in args.models.split(",") if k}
    trees = args.trees.split(",") if args.trees else (["tree-16", "dynamic-16"] if args.smoke else list(TREES))
    graph_modes = [False] if device.type != "cuda" else [False, True]
    deadline = time.monotonic() + args.time_budget
    bw = copy_bandwidth_gbs(device, 16 if args.smoke else 1024)
    rows, targets, notes = [], {}, []
    prompt_len = args.prompt_tokens
    max_seq = prompt_len + args.steps * 8 + 256
    meta = {**environment(device), "dtype": args.dtype, "prompt_tokens": prompt_len, "steps": args.steps,
            "copy_bandwidth_GBps": round(bw, 1),
            # gpu_decide.py reads it: runs before 2026-12-07 timed the copy with host clocks (a ceiling ~2% low)
            "copy_timing": "cuda events" if device.type == "cuda" else "host clock"}
    res = {"meta": meta, "targets": targets, "rows": rows, "notes": notes}
    if save is not None:        # the rows, targets and notes fill in place: an interrupted run saves them (main)
        save(res)
    for shape_name, cfg in shapes.items():
        if time.monotonic() > deadline:
            notes.append(f"{shape_name}: skipped (time budget {args.time_budget}s)")
            continue
        t0 = time.perf_counter()
        model = random_model(cfg, device, dtype, max_seq)
        wbytes = weight_bytes(model)
        floor_ms = wbytes / (bw * 1e9) * 1e3
        cache = KVCache.for_model(cfg, 1, max_seq, dtype, device)
        prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        print(f"# {shape_name}: {wbytes / 1e9:.2f} GB of weights, floor {floor_ms:.3f} ms/step at {bw:.0f} GB/s "
              f"(built in {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        plain = {}
        graphs = DecodeGraphs()
        for use_graphs in graph_modes:
            dec = PlainDecoder(model, cache, SamplingParams())
            if use_graphs:
                graphs.attach(dec)
            ms = time_steps(dec, prompt, args.steps, 3 if use_graphs else 1)
            plain[use_graphs] = ms
            rows.append({"model": shape_name, "method": "plain", "tree": "-", "nodes": 1, "graphs": use_graphs,
                         "step_ms": round(ms, 3), "ratio_vs_plain": 1.0,
                         "pct_of_bw_floor": round(100 * floor_ms / ms, 1)})
            print(rows[-1], file=sys.stderr)
        # A/B against cuBLAS in the rows above, same model, same cache, same run: the linears routed as the
        # Engine does on CUDA (kernels/routed_linear.py: each shape on the faster of the few-row Triton GEMM and
        # cuBLAS, kernels/linear_choice.py), and every product forced onto the Triton GEMM, each layer fused
        # around it (norms, activation, residual adds inside the GEMVs: model.Block.forward_fused) and not.
        # The default rows launch the Triton kernels with programmatic dependent launch where the GPU has it
        # (triton_kernels/common.py; sm_90+); the forced rows without it (AMPHISTA_PDL=0), and last the unfused
        # Triton step with it: every kernel of the step Triton, each launched while the previous one drains.
        use_graphs = device.type == "cuda"
        for mode, fused, label in (("auto", False, "plain, routed (default)"), ("on", True, "plain, triton linear"),
                                   ("on", False, "plain, triton linear unfused"),
                                   ("on", False, "plain, triton linear unfused, pdl")):
            routed_graphs = DecodeGraphs()
            try:
                pdl_env = "1" if label.endswith("pdl") else None if mode == "auto" else "0"
                with routed(model, mode, fused), env_var(PDL_ENV, pdl_env):
                    dec = PlainDecoder(model, cache, SamplingParams())
                    if use_graphs:
                        routed_graphs.attach(dec)
                    ms = time_steps(dec, prompt, args.steps, 3 if use_graphs else 1)
            finally:
                routed_graphs.clear()
            rows.append({"model": shape_name, "method": label, "tree": "-", "nodes": 1, "graphs": use_graphs,
                         "step_ms": round(ms, 3), "ratio_vs_plain": round(ms / plain[use_graphs], 3),
                         "pct_of_bw_floor": round(100 * floor_ms / ms, 1)})
            print(rows[-1], file=sys.stderr)
        # Opt-in GPU modes against the rows above, plain and on the first 64-node tree, graphs on:
        # the exact-greedy path (kernels/gpu_exact.py, AMPHISTA_EXACT_GREEDY=1): what bf16 greedy output equal
        # to plain greedy output costs; tree attention merging its splits always in the same launch
        # (AMPHISTA_TREE_MERGE=kernel) and always by a second launch (=launch), against the default "auto".
        modes = []
        if device.type == "cuda" and triton_runs_on("cuda"):
            # the Engine's CUDA default: the target's products routed, each on the GEMM that timed faster
            modes.append(("routed (default)", lambda m=model: routed(m)))
        if device.type == "cuda" and dtype != torch.float32:
            modes.append(("exact greedy", lambda m=model: gpu_exact.enabled_for(m)))
        if device.type == "cuda" and triton_runs_on("cuda"):
            from amphista_engine.kernels.split_merge import merge_mode
            modes.append(("no pdl", lambda: env_var(PDL_ENV, "0")))    # PDL is the default on sm_90+
            modes.append(("merge in kernel", lambda: merge_mode("kernel")))
            modes.append(("merge by launch", lambda: merge_mode("launch")))
        for label, context in modes:
            if time.monotonic() < deadline:
                rows += mode_rows(label, context, model, cache, trees, prompt, args.steps, plain[True], floor_ms,
                                  shape_name)
        # Full-vocabulary heads on every tree; with --draft-vocab also Amphista over that many tokens on the
        # largest trees (the drafting LM head shrinks by V / V').
        variants = [("medusa", 0), ("amphista", 0)] + [("amphista", dv) for dv in args.draft_vocab if dv]
        sizes = {t: TreeSpec(t, 4, "cpu").num_nodes for t in trees}
        largest = [t for t in trees if sizes[t] == max(sizes.values())]
        for kind, dv in variants:
            if time.monotonic() > deadline:
                notes.append(f"{shape_name} {kind} V'={dv or cfg.vocab_size}: skipped (time budget {args.time_budget}s)")
                continue
            heads = random_heads(kind, model, draft_vocab=min(dv, cfg.vocab_size))
            for tree in (trees if not dv else largest):
                for use_graphs in graph_modes:
                    if time.monotonic() > deadline:
                        notes.append(f"{shape_name} {kind} {tree} graphs={use_graphs}: skipped (time budget)")
                        continue
                    spec = TreeSpec(tree, heads.num_heads, device)
                    dec = SpeculativeDecoder(model, cache, heads, spec, SamplingParams())
                    if use_graphs:
                        graphs.attach(dec)
                    ms = time_steps(dec, prompt, args.steps, 3 if use_graphs else 1)
                    rows.append({"model": shape_name, "method": kind if not dv else f"{kind} V'={heads.config.draft_vocab_size}",
                                 "tree": tree, "nodes": spec.num_nodes,
                                 "graphs": use_graphs, "step_ms": round(ms, 3),
                                 "ratio_vs_plain": round(ms / plain[use_graphs], 3), "pct_of_bw_floor": None})
                    print(rows[-1], file=sys.stderr)
            del heads
        best = plain[True] if True in plain else plain[False]
        targets[shape_name] = {"weight_GB": round(wbytes / 1e9, 3), "copy_bandwidth_GBps": round(bw, 1),
                               "bw_floor_ms": round(floor_ms, 3), "plain_step_ms": round(best, 3),
                               "plain_pct_of_floor": round(100 * floor_ms / best, 1),
                               "graphs_speedup_plain": round(plain[False] / plain[True], 3) if True in plain else None}
        for method, key in (("plain, routed (default)", "plain_routed"), ("plain, triton linear", "plain_triton_linear"),
                            ("plain, triton linear unfused", "plain_triton_linear_unfused"),
                            ("plain, triton linear unfused, pdl", "plain_triton_linear_unfused_pdl"),
                            ("plain, merge in kernel", "plain_merge_kernel"), ("plain, merge by launch", "plain_merge_launch")):
            found = [r for r in rows if r["model"] == shape_name and r["method"] == method]
            if found:
                targets[shape_name][f"{key}_step_ms"] = found[0]["step_ms"]
                targets[shape_name][f"{key}_pct_of_floor"] = found[0]["pct_of_bw_floor"]
        for r in rows:
            if r["model"] == shape_name and r["nodes"] == 64 and r["graphs"] == (True in plain):
                targets[shape_name][f"{r['method']}_{r['tree']}_ratio"] = r["ratio_vs_plain"]
        if shape_name == "smollm2-135m" and device.type == "cuda" and not args.no_transformers:
            ms, what = transformers_ms_per_token(cfg, device, dtype, prompt_len, 64)
            targets[shape_name]["transformers_generate_ms_per_token"] = None if ms is None else round(ms, 3)
            targets[shape_name]["speedup_vs_transformers"] = None if ms is None else round(ms / best, 2)
            notes.append(f"smollm2-135m baseline: {what}")
        targets[shape_name]["graph_stats"] = graphs.stats.to_dict()
        graphs.clear()
        del model, cache, graphs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if save is not None:
            save(res)
    return res


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Decode-step latency, {m['device']}, {m['date']}", "",
             *(f"- {k}: {v}" for k, v in m.items()), "",
             "| model | method | tree | nodes | graphs | step ms | x plain | % of bw floor |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        pct = "" if r["pct_of_bw_floor"] is None else r["pct_of_bw_floor"]
        lines.append(f"| {r['model']} | {r['method']} | {r['tree']} | {r['nodes']} | {'on' if r['graphs'] else 'off'} | "
                     f"{r['step_ms']:.3f} | {r['ratio_vs_plain']:.3f} | {pct} |")
    lines += ["", "## Targets (issue 6, H100)", "",
              "- plain 7B decode >= 85% of the bandwidth floor; 64-node speculative step <= 1.35x plain (7B); "
              "SmolLM2 plain >= 3x transformers generate", ""]
    for name, t in res["targets"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} = {v}" for k, v in t.items()))
    lines += [f"- note: {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_results"))
    ap.add_argument("--models", default="llama-7b,smollm2-135m")
    ap.add_argument("--trees", default="", help=f"comma-separated (default {','.join(TREES)})")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--prompt-tokens", type=int, default=200)   # stays inside one 128-slot KV bucket below
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--time-budget", type=float, default=150.0, help="seconds; later configurations are skipped")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model and trees (checks the script runs)")
    ap.add_argument("--draft-vocab", default="8192", type=lambda v: [int(x) for x in v.split(",") if x],
                    help="comma list of draft-vocabulary sizes also timed for Amphista on the largest trees ('' = none)")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("latency_gpu: no CUDA device (torch.cuda.is_available() is False); use --device cpu --smoke",
              file=sys.stderr)
        return 2
    if args.smoke:
        args.prompt_tokens = min(args.prompt_tokens, 40)
        args.steps = min(args.steps, 5)
    args.out.mkdir(parents=True, exist_ok=True)

    saved = {}

    def save(res):
        saved["res"] = res
        (args.out / "latency.json").write_text(json.dumps(res, indent=1))
        (args.out / "latency.md").write_text(markdown(res))

    try:
        res = run(args, save)
    except KeyboardInterrupt:   # the GPU suite's stage limit (SIGINT): keep the rows of the shape cut short
        if "res" in saved:
            saved["res"]["notes"].append("interrupted (SIGINT, e.g. the suite's stage time limit): the rows "
                                         "measured until then; targets only for shapes that finished")
            save(saved["res"])
        print(f"latency_gpu: interrupted; what was measured is in {args.out / 'latency.json'}", file=sys.stderr)
        return 130
    save(res)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
