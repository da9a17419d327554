"""Result writing for the benchmark scripts; the clocks live in amphista_engine.evaluation.env."""
from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import torch

from amphista_engine.evaluation.env import commit, hardware, median_ms, sync  # noqa: F401  (re-exported)

RESULTS = Path(__file__).parent / "results"


MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"


def first_turns(n: int | None = None) -> list[str]:
    """The first n MT-Bench first turns (all 80 for None): the evaluation prompts the CPU A/B scripts time."""
    return [json.loads(line)["turns"][0] for line in open(MT_BENCH)][:n]


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


def rotating_runs(questions: list, configs: list[tuple], run, label=lambda c: "/".join(str(x) for x in c)):
    """Every config on every question, rotating which config goes first from one question to the next, so that a
    noisy VM's drifts fall on all configs alike. run(config, question) -> a GenerationResult. Returns per-config
    sums (step tokens, decode seconds, decode steps) and outs[config + (i,)], question i's token ids."""
    import sys
    toks, secs, steps, outs = {}, {}, {}, {}
    for i, q in enumerate(questions):
        for c in configs[i % len(configs):] + configs[:i % len(configs)]:
            r = run(c, q)
            outs[c + (i,)] = r.token_ids
            toks[c] = toks.get(c, 0) + r.stats.step_tokens
            secs[c] = secs.get(c, 0) + r.stats.decode_ms / 1e3
            steps[c] = steps.get(c, 0) + r.stats.decode_steps
        print(f"{i + 1}/{len(questions)}", {label(c): round(secs[c] / toks[c] * 1e3, 1) for c in configs},
              file=sys.stderr)
    return toks, secs, steps, outs


def ab_parser(doc: str, trees: str = "mix-4"):
    """The argument parser every CPU A/B script starts from: --trees, --questions, --max-new-tokens, --out."""
    import argparse
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--trees", default=trees)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    return ap


def engines_here(spec: str) -> list[str]:
    """The comma list of engines (fp32, bf16, q4) that run on this CPU: bf16 only where oneDNN has bf16 kernels,
    with a note on stderr where it is dropped (an AVX2-only CPU)."""
    import sys
    from amphista_engine.kernels import cpu_packed
    asked = spec.split(",")
    names = [n for n in asked if n != "bf16" or cpu_packed.available(torch.bfloat16)]
    if len(names) < len(asked):
        print("note: no bf16 engine: oneDNN has no bf16 kernels on this CPU", file=sys.stderr)
    return names
