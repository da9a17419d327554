"""PNG plots of an eval summary (tau and speedup per category) and a bench result (step cost vs tree size).

matplotlib runs on the Agg backend: these are written on headless machines and never shown.
"""
from __future__ import annotations

import contextlib
import re
import sys
import warnings
from pathlib import Path

from ..errors import InputError

COLORS = {"ar": "#7f7f7f", "medusa": "#1f77b4", "amphista": "#d62728", "lookup": "#2ca02c",
          "amphista+lookup": "#ff7f0e", "medusa+lookup": "#9467bd"}


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _pyplot():
    try:
        import matplotlib
    except ImportError:         # an optional dependency (the `plot` extra), not installed by `pip install .`
        raise InputError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


_GLYPH = re.compile(r"Glyph (\d+) \(.*\) missing from font\(s\) (.+?)\.?$")


@contextlib.contextmanager
def _missing_glyphs_once(log):
    """matplotlib warns per missing glyph at every draw (tight_layout, savefig) of every figure: category names in
    CJK gave the same warnings many times. Scoped to the plotting: one line naming the characters instead; any
    other warning is shown once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    chars, font, seen = [], None, set()
    for w in caught:
        m = _GLYPH.match(str(w.message))
        if m:
            font = m[2]
            if chr(int(m[1])) not in chars:
                chars.append(chr(int(m[1])))
        elif (w.category, str(w.message)) not in seen:
            seen.add((w.category, str(w.message)))
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if chars:
        log(f"warning: the plots' font ({font}) lacks {len(chars)} character(s) of their labels "
            f"({''.join(chars[:20])}{' ...' if len(chars) > 20 else ''}): they show as empty boxes; a font that has "
            f"them (e.g. Noto Sans CJK, as matplotlib's font.family) draws them")


def check_plotting() -> None:
    """--plot's check before the run, which the plots would otherwise follow by hours."""
    _pyplot()


def _grouped_bars(ax, summary: dict, methods: list[str], key: str):
    cats = list(summary["categories"]) + ["overall"]
    groups = [summary["categories"][c] for c in summary["categories"]] + [summary["overall"]]
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cats))]
        vals = [(g.get(m) or {}).get(key) for g in groups]
        bars = ax.bar(xs, [v or 0.0 for v in vals], width, label=m, color=COLORS.get(m))
        # null: nothing measured (no decoding step, no plain run): "-", not a 0.00 bar label no decoder reaches
        ax.bar_label(bars, labels=["-" if v is None else f"{v:.2f}" for v in vals], fontsize=7, padding=1)
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")   # plain decoding: tau 1, speedup 1
    ax.legend()


def _trees_label(meta: dict) -> str:
    """The tree each method actually ran (meta.tree_used): --tree unset resolves per device and heads."""
    used = meta.get("tree_used") or {}
    names = sorted(set(used.values()))
    if len(names) == 1:
        return f"tree {names[0]}"
    if names:
        return "trees " + ", ".join(f"{m} {t}" for m, t in used.items())
    return f"tree {meta.get('tree') or 'default'}"


def plot_eval(summary: dict, out_dir, log=_log) -> list[Path]:
    """tau_per_category.png and speedup_per_category.png; returns their paths. Both compare speculative methods,
    so a plain-only run (--methods ar) gets neither: empty axes would read as a broken run."""
    spec = [m for m in summary["methods"] if m != "ar"]
    if not spec:
        log("note: no plots: tau and speedup per category need a speculative method (medusa, amphista, lookup, ...)")
        return []
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = summary.get("meta", {})
    subtitle = (f"{Path(str(meta.get('model', ''))).name} | {meta.get('hardware', '')} | "
                f"{_trees_label(meta)} | max {meta.get('max_new_tokens', '?')} new tokens")
    paths = []
    with _missing_glyphs_once(log):
        for key, methods, ylabel, name in (
                ("tau", spec, "tau (tokens per target forward)", "tau_per_category.png"),
                ("speedup", spec, "speedup over plain decoding (x)", "speedup_per_category.png")):
            fig, ax = plt.subplots(figsize=(9, 4.5))
            _grouped_bars(ax, summary, methods, key)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel.split(' (')[0]} per category\n{subtitle}", fontsize=10)
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=120)
            plt.close(fig)
            paths.append(out_dir / name)
    return paths


def plot_bench(result: dict, out_dir) -> list[Path]:
    """step_cost.png: left, step time vs tree nodes with the plain step as a line; right, the same as a ratio
    to the plain step, which is the break-even tau (a measured tau above a point means that tree pays off)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = result["plain_step_ms"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    vocabs = sorted({r.get("draft_vocab") for r in result["rows"] if r["method"] != "plain"}, reverse=True)
    for method, dv in ((m, v) for m in ("medusa", "amphista") for v in vocabs):
        rows = [r for r in result["rows"] if r["method"] == method and r.get("draft_vocab") == dv]
        for dynamic, marker in ((False, "o"), (True, "s")):
            sel = sorted((r for r in rows if r["tree"].startswith("dynamic-") == dynamic), key=lambda r: r["nodes"])
            if not sel:
                continue
            label = f"{method} {'dynamic' if dynamic else 'static'} trees" + (f", V'={dv}" if len(vocabs) > 1 else "")
            style = dict(marker=marker, color=COLORS[method], ls="--" if dynamic else "-", label=label,
                         alpha=1.0 if dv == vocabs[0] else 0.55)
            a1.plot([r["nodes"] for r in sel], [r["step_ms"] for r in sel], **style)
            a2.plot([r["nodes"] for r in sel], [r["break_even_tau"] for r in sel], **style)
    a1.axhline(plain, color=COLORS["ar"], lw=1.2, label=f"plain step {plain:.2f} ms")
    a2.axhline(1.0, color=COLORS["ar"], lw=1.2, label="plain decoding (tau 1)")
    for method, tau in (result.get("tau") or {}).items():
        a2.axhline(tau, color=COLORS.get(method, "black"), lw=1, ls=":", label=f"measured tau {method} {tau:.2f}")
    nodes = sorted({r["nodes"] for r in result["rows"] if r["method"] != "plain"})
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(nodes, [str(n) for n in nodes])
        ax.minorticks_off()
        ax.set_xlabel("tree nodes (tokens verified per step)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    a1.set_ylabel("step time (ms, median)")
    a2.set_ylabel("break-even tau = spec step / plain step")
    meta = result.get("meta", {})
    fig.suptitle(f"step cost vs tree size: {meta.get('model', '')} | {meta.get('dtype', '')} | "
                 f"{meta.get('hardware', '')} | prompt {meta.get('prompt_tokens', '')} tok", fontsize=10)
    fig.tight_layout()
    path = out_dir / "step_cost.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
