"""Launch-parameter sweeps for the kernels the first H200 run found slow, timed side by side in one process.

    python benchmarks/kernels/tune.py --out DIR [--budget SECONDS]      # GPU
    TRITON_INTERPRET=1 python benchmarks/kernels/tune.py --out DIR --quick   # CPU smoke run (interpreter)

Sweeps (each variant is checked against the torch reference on the same inputs before it is timed; a
variant that is wrong or fails to compile is recorded as such, never as fast):
  * triton tree attention: split count, keys per tile, warps, pipeline stages, and the split merge in the
    same launch (merge="kernel") at 1-8x the heuristic's split count;
  * cuda tree attention: split count, and its split merge in the same launch or by a second one;
  * triton fused_sal_input: column tile, K tile, warps, stages;
  * triton few-row linear, bare on the 7B / 13B / SmolLM2 layers the kernel loses or wins on (one row, and 64
    rows for the exact path's trees) beside cuBLAS, and one fused form (w13 +norm): column tile, K tile,
    warps, stages.
The current heuristic's choice is always one of the variants ("default"), so the table says directly how
far the best measured configuration is from what the engine runs today. Times are the median of CUDA-graph
replays, L2 flushed before each (see _bench.Bench; --warm-l2: back to back, as before 2026-12-07). Writes
tune.json and tune.md (best per case first) to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench import SHAPES, TINY, Bench, linear_bytes, meta, parse_args, with_pdl  # noqa: E402

import torch  # noqa: E402

from amphista_engine.kernels import reference  # noqa: E402
from amphista_engine.tree import build_tree  # noqa: E402

TREES = {1: None, 16: "tree-16", 64: "mc_sim_7b_63"}
TA_CONFIGS = [(64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3), (32, 4, 3), (32, 2, 4)]
FI_CONFIGS = list(itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3, 4)))
# 8 warps lost to 4 in every few-row case of the 2026-12-04 sweeps
LIN_CONFIGS = list(itertools.product((32, 64), (64, 128, 256), (4,), (2, 3, 4)))


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class Sweep:
    def __init__(self, bench: Bench, budget: float, tol: float):
        self.bench, self.deadline, self.tol = bench, time.monotonic() + budget, tol
        self.rows: list[dict] = []

    def time_variant(self, op: str, case: str, variant: str, fn, ref, nbytes: float, default: bool = False):
        row = {"op": op, "case": case, "variant": variant, "default": default, "l2": self.bench.l2_mode}
        if time.monotonic() > self.deadline:
            row["status"] = "skipped (budget)"
        else:
            try:
                err = rel_err(fn(), ref)
                row["rel_err"] = round(err, 6)
                if not err < self.tol:                  # NaN fails too
                    row["status"] = "WRONG"
                else:
                    us = self.bench.time_us(fn, "torch")[0]   # launcher called directly: no dispatch
                    gbs = nbytes / (us * 1e-6) / 1e9
                    row.update(status="ok", us=round(us, 2), GBps=round(gbs, 1),
                               pct_bw=round(100 * gbs / self.bench.copy_bandwidth_gbs(), 1))
            except Exception as exc:                    # a config Triton cannot compile, or out of resources
                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        self.rows.append(row)
        print(row, flush=True)


def tree_attention_cases(bench: Bench):
    if bench.quick:
        return [(TINY, 128, 1), (TINY, 128, 16)]
    s7, sm = SHAPES["llama-7b"], SHAPES["smollm2-135m"]
    return [(s7, 1024, 1), (s7, 4096, 1), (s7, 2048, 16), (s7, 1024, 64), (s7, 4096, 64), (s7, 256, 1),
            (sm, 2048, 1), (sm, 2048, 64)]


def sweep_tree_attention(sw: Sweep, bench: Bench):
    from amphista_engine.kernels import cuda_ops
    from amphista_engine.kernels.backend import cuda_available, triton_runs_on
    from amphista_engine.kernels.triton_kernels import tree_attention as ta
    dev, dt = bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    for sh, P, N in tree_attention_cases(bench):
        H, Hkv, D = sh.n_heads, sh.n_kv_heads, sh.head_dim
        tree = build_tree(TREES[N]).to(dev) if N > 1 else None
        bits = tree.ancestor_bits[None] if tree is not None else torch.ones(1, 1, dtype=torch.long, device=dev)
        kv_len = -(-(P + N) // 128) * 128
        q = torch.randn(1, N, H, D, device=dev, dtype=dt).transpose(1, 2)
        k = torch.randn(1, Hkv, kv_len, D, device=dev, dtype=dt)
        v = torch.randn(1, Hkv, kv_len, D, device=dev, dtype=dt)
        prefix = torch.full((1,), P, device=dev)
        ref = reference.tree_attention(q.float(), k.float(), v.float(), prefix, bits, kv_len)
        nbytes = esize * (2 * Hkv * (P + N) * D + 2 * H * N * D)
        case = f"{sh.name} P={P} N={N}"
        if triton_runs_on(dev.type):
            G = H // Hkv
            block_m = min(64, max(16, ta.next_pow2(N * G)))
            heur = ta.pick_splits(Hkv * ta.cdiv(N * G, block_m), kv_len, N * G, dev)
            for mult, (bn, warps, stages) in itertools.product((1, 2, 4), TA_CONFIGS):
                splits = heur * mult
                fn = lambda s=splits, bn=bn, w=warps, st=stages: ta.tree_attention(
                    q, k, v, prefix, bits, kv_len, num_splits=s, block_n=bn, num_warps=w, num_stages=st)
                sw.time_variant("triton tree_attention", case, f"splits={splits} ({mult}x) block_n={bn} warps={warps} "
                                f"stages={stages}", fn, ref, nbytes, default=(mult, bn, warps, stages) == (1, 64, 4, 2))
            # Programmatic dependent launch: each call of the timed chain starts while the last one drains.
            sw.time_variant("triton tree_attention", case, "heuristic, pdl",
                            with_pdl(lambda: ta.tree_attention(q, k, v, prefix, bits, kv_len)), ref, nbytes)
            # Loads bounded by the host's window instead of the prefix length (window=True, 2026-12-04c): fewer
            # registers and no load waiting for the length, against the window tail's extra bytes.
            for mult in (1, 2):
                splits = heur * mult
                sw.time_variant("triton tree_attention", case, f"splits={splits} ({mult}x), window",
                                lambda s=splits: ta.tree_attention(q, k, v, prefix, bits, kv_len, num_splits=s,
                                                                   window=True), ref, nbytes)
            sw.time_variant("triton tree_attention", case, "heuristic, window, pdl",
                            with_pdl(lambda: ta.tree_attention(q, k, v, prefix, bits, kv_len, window=True)), ref,
                            nbytes)
            # pick_splits rounds 2 x SMs / program groups up: on the 7B shape 9 splits x 32 heads = 288 programs for
            # an H100's 2 x 132 slots, a short second wave. Rounded down they fit one (the cuda kernel: 1.10x at
            # P=1024 with 8 splits, but 0.93x at 4096; h100_2026-12-05_tune). Untimed for Triton as of 2026-12-06.
            one_wave = max(1, 2 * ta.sm_count(dev) // (Hkv * ta.cdiv(N * G, block_m)))
            if one_wave < heur:
                sw.time_variant("triton tree_attention", case, f"splits={one_wave} (one wave)",
                                lambda s=one_wave: ta.tree_attention(q, k, v, prefix, bits, kv_len, num_splits=s),
                                ref, nbytes)
            # Merging in the same launch removes a fixed cost, so more (shorter) splits may pay off with it.
            for mult, bn in itertools.product((1, 2, 4, 8), (64, 32)):
                splits = heur * mult
                fn = lambda s=splits, bn=bn: ta.tree_attention(q, k, v, prefix, bits, kv_len, num_splits=s,
                                                                block_n=bn, merge="kernel")
                sw.time_variant("triton tree_attention", case, f"splits={splits} ({mult}x) block_n={bn} merge=kernel",
                                fn, ref, nbytes)
        if dev.type == "cuda" and cuda_available():
            heur = cuda_ops.num_splits(Hkv, -(-(H // Hkv) * N // 64), kv_len, dev)
            for splits in sorted({heur, 1, 2, 4, 8, 16, 32, 64}):
                fn = lambda s=splits: cuda_ops.tree_attention(q, k, v, prefix, bits, kv_len, splits=s)
                sw.time_variant("cuda tree_attention", case, f"splits={splits}", fn, ref, nbytes, default=splits == heur)
                if splits > 1:
                    fn = lambda s=splits: cuda_ops.tree_attention(q, k, v, prefix, bits, kv_len, splits=s,
                                                                  merge="launch" if N * H // Hkv <= 16 else "kernel")
                    sw.time_variant("cuda tree_attention", case, f"splits={splits}, the other merge", fn, ref,
                                    nbytes)


def sweep_fused_input(sw: Sweep, bench: Bench):
    from amphista_engine.kernels.backend import triton_runs_on
    from amphista_engine.kernels.triton_kernels import fused_input as fi
    if not triton_runs_on(bench.device.type):
        return
    dev, dt = bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    cases = [(TINY, 1, 5)] if bench.quick else [(SHAPES["llama-7b"], 1, 1), (SHAPES["llama-7b"], 1, 5),
                                                 (SHAPES["smollm2-135m"], 1, 1)]
    configs = FI_CONFIGS[:2] if bench.quick else FI_CONFIGS
    for sh, B, M in cases:
        d = sh.d
        hidden = torch.randn(B, M, d, device=dev, dtype=dt)
        tokens = torch.randint(0, sh.vocab, (B, M), device=dev)
        emb = torch.randn(sh.vocab, d, device=dev, dtype=dt)
        w = torch.randn(d, 2 * d, device=dev, dtype=dt) * (2 * d) ** -0.5
        ref = reference.fused_sal_input(hidden.float(), tokens, emb.float(), w.float())
        nbytes = esize * (2 * d * d + 3 * B * M * d)
        case = f"{sh.name} B={B} M={M}"
        fn = lambda: fi.fused_sal_input(hidden, tokens, emb, w)
        sw.time_variant("triton fused_sal_input", case, "heuristic", fn, ref, nbytes, default=True)
        for bn, bk, warps, stages in configs:
            fn = lambda bn=bn, bk=bk, w_=warps, st=stages: fi.fused_sal_input(
                hidden, tokens, emb, w, block_n=bn, block_k=bk, num_warps=w_, num_stages=st)
            sw.time_variant("triton fused_sal_input", case, f"block_n={bn} block_k={bk} warps={warps} stages={stages}",
                            fn, ref, nbytes)


def markdown(rows: list[dict], m: dict) -> str:
    lines = [f"# Launch-parameter sweeps, {m.get('device')}, {m.get('date')}", "",
             *(f"- {k}: {v}" for k, v in m.items()), "",
             "## Best vs default per case", "",
             "| op | case | default us | best us | best variant | best %bw | speedup |", "|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["op"], r["case"]) for r in rows))
    for op, case in keys:
        ok = [r for r in rows if r["op"] == op and r["case"] == case and r.get("status") == "ok"]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["us"])
        dflt = next((r for r in ok if r["default"]), None)
        d_us = dflt["us"] if dflt else float("nan")
        lines.append(f"| {op} | {case} | {d_us} | {best['us']} | {best['variant']} | {best['pct_bw']} | "
                     f"{d_us / best['us']:.2f}x |")
    bad = [r for r in rows if r.get("status") not in ("ok",) and not str(r.get("status")).startswith("skipped")]
    lines += ["", f"Variants wrong or failing: {len(bad)}"] + [f"- {r['op']} {r['case']} {r['variant']}: {r['status']}"
                                                             for r in bad[:30]]
    lines += ["", "## All variants", "", "| op | case | variant | status | us | %bw | rel err |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['case']} | {r['variant']}{' (default)' if r['default'] else ''} | {r.get('status')} | "
              f"{r.get('us', '')} | {r.get('pct_bw', '')} | {r.get('rel_err', '')} |" for r in rows]
    return "\n".join(lines) + "\n"


def sweep_fused_linear(sw: Sweep, bench: Bench):
    import torch.nn.functional as F
    from amphista_engine.kernels.backend import triton_runs_on
    from amphista_engine.kernels.triton_kernels import linear as lin
    if not triton_runs_on(bench.device.type):
        return
    dev, dt = bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()

    def layers(sh):
        q, kv = sh.n_heads * sh.head_dim, sh.n_kv_heads * sh.head_dim
        return {"wqkv": (q + 2 * kv, sh.d), "wo": (sh.d, q), "w13": (2 * sh.intermediate_size, sh.d),
                "w2": (sh.d, sh.intermediate_size), "lm_head": (sh.vocab, sh.d)}

    # shape, layer, rows, prologue, residual. Bare products first: the routed default runs them unfused
    # (2026-12-04b), and on that run the kernel lost to cuBLAS on 13B's wqkv (0.81x) and SmolLM2's LM head
    # (0.66x). 64 rows: the exact path's tree steps (four 16-row blocks a program). One fused form stays for
    # the record. Each case also times cuBLAS ("cublas (torch)"), so the table says whether any launch
    # configuration beats it.
    if bench.quick:
        cases = [(TINY, "w13", 1, None, False), (TINY, "w13", 1, "norm", False)]
    else:
        s7, s13, sm = SHAPES["llama-7b"], SHAPES["llama-13b"], SHAPES["smollm2-135m"]
        cases = [(s7, "w13", 1, None, False), (s13, "wqkv", 1, None, False), (sm, "lm_head", 1, None, False),
                 (s7, "wqkv", 1, None, False), (s7, "w2", 1, None, False), (s7, "wo", 1, None, False),
                 (s13, "w13", 1, None, False), (s7, "w13", 64, None, False), (s7, "w13", 1, "norm", False)]
    configs = LIN_CONFIGS[:2] if bench.quick else LIN_CONFIGS
    for sh, layer, rows, prologue, residual in cases:
        n, k = layers(sh)[layer]
        w = torch.randn(n, k, device=dev, dtype=dt) * k ** -0.5
        x = torch.randn(rows, 2 * k if prologue == "silu" else k, device=dev, dtype=dt)
        g = torch.rand(k, device=dev, dtype=dt) + 0.5 if prologue == "norm" else None
        r = torch.randn(rows, n, device=dev, dtype=dt) if residual else None
        ref = reference.fused_linear(x.float(), w.float(), None if g is None else g.float(), 1e-5,
                                     silu=prologue == "silu", residual=None if r is None else r.float())
        kw = dict(norm_weight=g, eps=1e-5, silu=prologue == "silu", residual=r)
        nbytes = linear_bytes(esize, n, k, x.numel(), rows, g is not None, residual)
        extra = "+norm" if prologue == "norm" else "+silu" if prologue else "bare"
        case = f"{sh.name} {layer} {extra}{'+residual' if residual else ''} {n}x{k} M={rows}"
        sw.time_variant("triton linear", case, "heuristic", lambda w=w: lin.linear(x, w, **kw), ref, nbytes,
                        default=True)
        if not prologue and not residual:
            sw.time_variant("triton linear", case, "cublas (torch)", lambda w=w: F.linear(x, w), ref, nbytes)
            sw.time_variant("triton linear", case, "heuristic, pdl (L2 prefetch before the wait)",
                            with_pdl(lambda w=w: lin.linear(x, w, **kw)), ref, nbytes)
        if prologue:          # the prologue on the whole 16-row tile, as before ONE_ROW (2026-12-04)
            sw.time_variant("triton linear", case, "heuristic, 16-row prologue",
                            lambda w=w: lin.linear(x, w, one_row=False, **kw), ref, nbytes)
        for bn, bk, warps, stages in configs:
            fn = lambda w=w, bn=bn, bk=bk, nw=warps, st=stages: lin.linear(x, w, block_n=bn, block_k=bk, num_warps=nw,
                                                                            num_stages=st, **kw)
            sw.time_variant("triton linear", case, f"block_n={bn} block_k={bk} warps={warps} stages={stages}",
                            fn, ref, nbytes)
        del w


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=150.0,
                    help="seconds (45%% few-row linear, 35%% tree attention, 20%% fused input); later variants are "
                         "skipped")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warm-l2", action="store_true", help="GPU: no L2 flush between timed calls (see _bench)")
    args = ap.parse_args(argv)
    bench = Bench(parse_args("tune", (["--quick"] if args.quick else []) + ["--reps", str(args.reps)]
                             + (["--warm-l2"] if args.warm_l2 else [])))
    from amphista_engine.kernels.backend import cuda_available, triton_runs_on
    if not triton_runs_on(bench.device.type) and not (bench.cuda and cuda_available()):
        print("tune: nothing to sweep here: the sweeps need Triton on a CUDA device or the CUDA extension "
              "(on a CPU: TRITON_INTERPRET=1 python benchmarks/kernels/tune.py --quick --out DIR)", file=sys.stderr)
        return 2
    sw = Sweep(bench, args.budget, tol=2e-2 if bench.dtype != torch.float32 else 1e-4)
    args.out.mkdir(parents=True, exist_ok=True)
    m = meta(bench)
    with torch.inference_mode():
        for part, share in ((sweep_fused_linear, 0.45), (sweep_tree_attention, 0.35), (sweep_fused_input, 0.2)):
            sw.deadline = time.monotonic() + share * args.budget
            part(sw, bench)
            (args.out / "tune.json").write_text(json.dumps({"meta": m, "rows": sw.rows}, indent=1))
            (args.out / "tune.md").write_text(markdown(sw.rows, m))
    print(markdown(sw.rows, m).split("## All variants")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
