"""The decisions of benchmarks/GPU_SESSION.md, read off a GPU suite's results: one line per opt-in mode or target
with the numbers that decide it and what they say. It decides nothing by itself (the session commits the flip,
with the run beside it); it saves re-reading five tables in the few minutes a lent GPU leaves.

    python benchmarks/gpu_decide.py benchmarks/results/gpu/h200_2026-12-04b_suite

Reads latency.json (latency_gpu.py) and, where present, kernels.json (kernels/run_all.py). A row the run did not
measure says so. NOISE: differences under 2% between step times of one run are treated as ties.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NOISE = 0.02
SHAPE = "llama-7b"


def step(rows: list[dict], method: str, nodes: int = 1, tree: str | None = None) -> float | None:
    """The graph-replayed step time of `method` on the 7B shape (the first tree of that size if tree is None)."""
    for r in rows:
        if (r["model"] == SHAPE and r["method"] == method and r["nodes"] == nodes and r["graphs"]
                and (tree is None or r["tree"] == tree)):
            return r["step_ms"]
    return None


def faster(a: float | None, b: float | None) -> str:
    """How a compares with b: 'faster', 'slower' or 'tie' (within NOISE); '?' if either is missing."""
    if a is None or b is None:
        return "?"
    return "faster" if a < b * (1 - NOISE) else "slower" if a > b * (1 + NOISE) else "tie"


def fmt(ms: float | None) -> str:
    return "not measured" if ms is None else f"{ms:.3f} ms"


def pdl_row(rows, unfused_pdl, unfused, default_plain, default_amph) -> tuple[str, str, str]:
    """AMPHISTA_PDL, on by default on sm_90+ since 2026-12-05. Runs since then time the default (PDL) against
    `plain, no pdl` / `amphista, no pdl`; older runs had PDL off by default and `plain, pdl` / `amphista, pdl` rows."""
    off_plain, off_amph = step(rows, "plain, no pdl"), step(rows, "amphista, no pdl", 64)
    if off_plain is not None or off_amph is not None:
        on_plain, on_amph = default_plain, default_amph
    else:
        on_plain, on_amph, off_plain, off_amph = (step(rows, "plain, pdl"), step(rows, "amphista, pdl", 64),
                                                  default_plain, default_amph)
    verdicts = [faster(unfused_pdl, unfused), faster(on_plain, off_plain), faster(on_amph, off_amph)]
    seen = set(verdicts) - {"?"}
    # PDL's gain needs Triton neighbours: beside cuBLAS products it can only tie. It stays on while the all-Triton
    # step gains and no row loses beyond noise.
    verdict = ("not measured" if not seen else "turn it off (AMPHISTA_PDL=0 by default)" if "slower" in seen
               else "keep it on for sm_90+ (if the pdl replay test passed)" if verdicts[0] == "faster"
               else "no clear win: recheck")
    return ("AMPHISTA_PDL (on for sm_90+)", f"all Triton {fmt(unfused_pdl)} vs {fmt(unfused)} without; plain "
            f"{fmt(on_plain)} with vs {fmt(off_plain)} without; Amphista 64 nodes {fmt(on_amph)} vs {fmt(off_amph)}",
            verdict)


def decisions(latency: dict, kernels: dict | None) -> list[tuple[str, str, str]]:
    """(decision, evidence, verdict) rows."""
    rows = latency["rows"]
    cublas, routed = step(rows, "plain"), step(rows, "plain, routed (default)")
    fused, unfused = step(rows, "plain, triton linear"), step(rows, "plain, triton linear unfused")
    unfused_pdl = step(rows, "plain, triton linear unfused, pdl")
    amph = step(rows, "amphista", 64)
    out = []

    best = min((t for t in (cublas, unfused) if t is not None), default=None)
    v = {"faster": "keep (beats both)", "tie": "keep", "slower": "look at cache/linear_choices.json: slower than "
         "the better of cuBLAS and the all-Triton step", "?": "not measured"}[faster(routed, best)]
    out.append(("routed products, auto (the CUDA default)",
                f"routed {fmt(routed)}, cuBLAS {fmt(cublas)}, all Triton {fmt(unfused)}; Amphista 64 nodes routed "
                f"{fmt(step(rows, 'amphista, routed (default)', 64))} vs {fmt(amph)}", v))

    out.append(("fuse_decode_layers (off)", f"fused {fmt(fused)} vs unfused {fmt(unfused)}",
                {"faster": "turn it on", "tie": "keep off", "slower": "keep off", "?": "not measured"}[
                    faster(fused, unfused)]))

    out.append(pdl_row(rows, unfused_pdl, unfused, cublas, amph))

    exact = step(rows, "amphista, exact greedy", 64)
    out.append(("AMPHISTA_EXACT_GREEDY (off)", f"Amphista 64 nodes exact {fmt(exact)} vs {fmt(amph)}",
                "not measured" if exact is None or amph is None else
                f"{exact / amph:.2f}x the default tree step: " + ("within noise, consider it"
                                                                   if faster(exact, amph) != "slower" else "keep off")))

    mk, ml = step(rows, "amphista, merge in kernel", 64), step(rows, "amphista, merge by launch", 64)
    pk, pl = step(rows, "plain, merge in kernel"), step(rows, "plain, merge by launch")
    out.append(("AMPHISTA_TREE_MERGE=auto", f"plain in kernel {fmt(pk)} / by launch {fmt(pl)}; Amphista 64 nodes "
                f"{fmt(mk)} / {fmt(ml)}", "not measured" if {pk, pl, mk, ml} == {None} else "keep auto"
                if faster(pk, pl) != "slower" and faster(ml, mk) != "slower" else "recheck the tune sweep"))

    floor = latency["targets"].get(SHAPE, {}).get("bw_floor_ms")
    best_plain = min((t for t in (cublas, routed, unfused, unfused_pdl, step(rows, 'plain, pdl'))
                      if t is not None), default=None)
    pct = None if floor is None or best_plain is None else 100 * floor / best_plain
    # a floor from a host-timed copy (runs before 2026-12-07) is ~2% high: its percentage is ~2% generous
    host_timed = latency.get("meta", {}).get("copy_timing", "host clock") != "cuda events"
    out.append(("target: plain 7B step >= 85% of the bandwidth floor",
                f"best plain step {fmt(best_plain)}, floor {fmt(floor)}"
                + ("; the floor's copy was host-timed (~2% low ceiling): re-time" if host_timed and pct else ""),
                "not measured" if pct is None
                else f"{pct:.1f}%: {'not met' if pct < 85 else 'not shown' if host_timed else 'met'}"))
    ratio = None if amph is None or cublas is None else amph / cublas
    out.append(("target: 64-node step <= 1.35x plain", f"Amphista {fmt(amph)} vs plain {fmt(cublas)}",
                "not measured" if ratio is None else f"{ratio:.2f}x: {'met' if ratio <= 1.35 else 'not met'}"))

    if kernels:
        out.append(cuda_backend_row(kernels["rows"]))
        out.append(window_row(kernels["rows"]))
        ta = [r for r in kernels["rows"] if r["kernel"] == "tree_attention"
              and (r["backend"].startswith("triton") or r["backend"] == "cuda")]
        for case in sorted({r["case"] for r in ta if r["shape"] == SHAPE},
                           key=lambda c: (int(c.split()[0][2:]), int(c.split()[1][2:]))):
            if int(case.split()[0][2:]) < 1024:
                continue
            got = {r["backend"]: r["%bw"] for r in ta if r["shape"] == SHAPE and r["case"] == case}
            top = max(got.values())
            copy = next((r["%bw"] for r in kernels["rows"] if r["kernel"] == "tree_attention" and r["shape"] == SHAPE
                         and r["case"] == case and r["backend"] == "copy:same-bytes"), None)
            # rows timed with a warm L2 (before 2026-12-07, or --warm-l2) overstate what fits in it: no verdict
            warm = any(r.get("l2", "warm") == "warm" for r in ta if r["shape"] == SHAPE and r["case"] == case)
            out.append((f"target: tree attention >= 70% of copy bandwidth ({SHAPE} {case})",
                        ", ".join(f"{k} {v}%" for k, v in sorted(got.items()))
                        + ("" if copy is None else f"; a copy moving the same bytes {copy}%")
                        + ("; timed with a warm L2: re-time cold" if warm else ""),
                        f"{top}%: {'not met' if top < 70 else 'not shown' if warm else 'met'}"))
        out.append(fixed_cost_row(kernels["rows"], kernels.get("meta", {}).get("copy_bandwidth_GBs")))
    return out


def fixed_cost_row(krows: list[dict], ceiling_gbs: float | None) -> tuple[str, str, str]:
    """Triton's plain-decoding (N = 1) tree attention time on the 7B shape as a line over the prefix length:
    the intercept is what a call costs whatever it reads (launch, the chain of dependent loads, the merge), the
    slope the bandwidth it streams the cache at. The verdict gives the fixed cost that 70% at P = 1024 allows at
    that slope."""
    pts = sorted((int(r["case"].split()[0][2:]), r["us"]) for r in krows
                 if r["kernel"] == "tree_attention" and r["shape"] == SHAPE and r["backend"] == "triton"
                 and r["case"].endswith(" N=1"))
    if len(pts) < 2:
        return "tree attention fixed cost (triton, N = 1)", "fewer than two prefixes measured", "not measured"
    (p0, t0), (p1, t1) = pts[0], pts[-1]
    slope = (t1 - t0) / (p1 - p0)                                   # us per prefix token
    intercept = t0 - slope * p0
    bytes_per_token = next(r["GB/s"] * r["us"] * 1e3 for r in krows if r["kernel"] == "tree_attention"
                           and r["shape"] == SHAPE and r["backend"] == "triton" and r["case"] == f"P={p1} N=1") / p1
    stream = bytes_per_token / (slope * 1e3) if slope > 0 else float("inf")
    verdict = f"fixed cost {intercept:.2f} us, streaming at {stream:.0f} GB/s"
    if ceiling_gbs:
        allowed = bytes_per_token * 1024 / (0.7 * ceiling_gbs * 1e3) - slope * 1024
        verdict += f"; 70% at P = 1024 allows {allowed:.2f} us of fixed cost at this slope"
    return ("tree attention fixed cost (triton, N = 1)",
            f"t(P) = {intercept:.2f} us + P x {slope * 1e3:.2f} ns from P = {p0} and {p1}", verdict)


def cuda_backend_row(krows: list[dict]) -> tuple[str, str, str]:
    """The `cuda` backend's two attention kernels against `triton`'s on the 7B shape: cuda time / triton time
    per case (the rest of its kernels were within a few % of Triton's on 2026-12-04b)."""
    us = {(r["kernel"], r["case"], r["backend"]): r["us"] for r in krows if r["shape"] == SHAPE}
    ratios = {f"{kernel} {case}": us[(kernel, case, "cuda")] / us[(kernel, case, "triton")]
              for kernel, case, backend in us if backend == "cuda" and kernel in ("tree_attention", "head_attention")
              and (kernel, case, "triton") in us}
    if not ratios:
        return "default backend triton (cuda opt-in)", "no cuda attention rows", "not measured"
    worst = max(ratios.values())
    return ("default backend triton (cuda opt-in)",
            "cuda / triton time: " + ", ".join(f"{k} {v:.2f}x" for k, v in sorted(ratios.items())),
            "keep triton" if worst > 1 - NOISE else "cuda attention wins every case: time the whole step "
            "(the tune's latency_cuda vs latency_triton) before switching")


def window_row(krows: list[dict]) -> tuple[str, str, str]:
    """Triton tree attention with window-bounded loads (launcher `window`) against the default, 7B shape."""
    us = {(r["case"], r["backend"]): r["us"] for r in krows if r["shape"] == SHAPE and r["kernel"] == "tree_attention"}
    ratios = {case: us[(case, "triton:window")] / us[(case, "triton")]
              for case, backend in us if backend == "triton:window" and (case, "triton") in us}
    if not ratios:
        return "triton tree attention window=False", "no triton:window rows", "not measured"
    verdicts = {faster(us[(c, "triton:window")], us[(c, "triton")]) for c in ratios}
    return ("triton tree attention window=False",
            "window / default time: " + ", ".join(f"{c} {v:.2f}x" for c, v in sorted(ratios.items())),
            "make window the default" if verdicts == {"faster"} else "keep it off" if "slower" in verdicts
            else "keep it off (no clear win)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a gpu_suite.sh output folder (latency.json, kernels.json)")
    args = ap.parse_args(argv)
    lat, kern = args.results / "latency.json", args.results / "kernels.json"
    if not lat.is_file() and not kern.is_file():
        print(f"gpu_decide: neither {lat} nor kernels.json there (a gpu_suite.sh --out folder has them)",
              file=sys.stderr)
        return 2
    if not lat.is_file():       # the latency stage skipped or killed early: the kernels still decide their rows
        print(f"gpu_decide: {lat} not found: the latency rows read 'not measured'", file=sys.stderr)
    rows = decisions(json.loads(lat.read_text()) if lat.is_file() else {"rows": [], "targets": {}},
                     json.loads(kern.read_text()) if kern.is_file() else None)
    print("| decision | evidence | verdict |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
