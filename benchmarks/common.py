"""Result writing for the benchmark scripts; the clocks live in amphista_engine.evaluation.env."""
from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import torch

from amphista_engine.evaluation.env import commit, hardware, median_ms, sync  # noqa: F401  (re-exported)

RESULTS = Path(__file__).parent / "results"


def write_results(name: str, rows: list[dict], meta: dict, table: str, out_dir: Path | None = None):
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"date": str(date.today()), "commit": commit(), "torch": torch.__version__, **meta}
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    (out_dir / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n{table}\n")
    print(table)


def md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)
