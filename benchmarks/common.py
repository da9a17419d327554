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


class StepTimes:
    """Milliseconds a timed function (the heads' step) spends per A/B config. The wrapper around it takes
    perf_counter() before the call and hands it to add() after; set .config, and .skip_next = True, before each
    answer: the first call of an answer is the prefill's pass over the prompt, not a decoding step's, and is not
    counted. .spent[config] = (ms, calls)."""

    def __init__(self):
        self.config, self.skip_next, self.spent = None, False, {}

    def add(self, start: float):
        import time
        if self.skip_next:
            self.skip_next = False
            return
        ms, n = self.spent.get(self.config, (0.0, 0))
        self.spent[self.config] = (ms + (time.perf_counter() - start) * 1e3, n + 1)

    def ms_per_call(self, config) -> float:
        ms, n = self.spent.get(config, (0.0, 0))
        return ms / n if n else 0.0


def smollm2_with_shipped_heads():
    """(engine, heads): SmolLM2-135M on the CPU (fp32, 4-bit linears where quant auto picks them, 1,024 positions)
    with its shipped Amphista heads, as the heads' A/B scripts time them."""
    from amphista_engine import Engine
    from amphista_engine.shipped_heads import shipped_heads
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=1024)
    return engine, engine.load_heads(str(shipped_heads("smollm2-135m", "amphista")))


def answer_on(engine, question, tree: str, max_new_tokens: int):
    """engine's answer to question: plain decoding where tree is "plain", else Amphista over `tree`."""
    spec = tree != "plain"
    return engine.generate(question, max_new_tokens=max_new_tokens,
                           speculative="amphista" if spec else None, tree=tree if spec else None)


def before_after_runs(engine, args, run):
    """The first args.questions MT-Bench first turns answered plainly (config ("after", "plain")) and over every tree
    of args.trees both ways, (side, tree) for side "before" and "after", after one warm-up answer; rotating_runs'
    run(config, question). Returns (questions, configs, toks, secs, steps, outs)."""
    qs = first_turns(args.questions)
    trees = [t for t in args.trees.split(",") if t]
    configs = [("after", "plain")] + [(s, t) for t in trees for s in ("before", "after")]
    engine.generate(qs[0], max_new_tokens=8)                               # warm-up
    return (qs, configs, *rotating_runs(qs, configs, run))


def equal_answers(outs: dict, config: tuple, base: tuple, n: int) -> str:
    """"k/n": of rotating_runs' n questions, how many `config` answered exactly as `base` did."""
    return f"{sum(outs[config + (i,)] == outs[base + (i,)] for i in range(n))}/{n}"


def timed_rounds(rounds: int, cfgs: list, generate, plain_of, progress: bool = False):
    """Every config of cfgs, in order, in each of `rounds` rounds: generate(config, round) -> a GenerationResult.
    Returns ms per decoded token and tau per config (a list, one per round) and, per config, how many rounds its
    answer differed from that round's answer of plain_of(config) (None: the config is plain itself; its plain
    config comes before it in cfgs)."""
    ms = {c: [] for c in cfgs}
    tau = {c: [] for c in cfgs}
    plain, mismatches = {}, {c: 0 for c in cfgs}
    for r in range(rounds):
        for c in cfgs:
            out = generate(c, r)
            ms[c].append(1000 / out.stats.decode_tokens_per_s)
            tau[c].append(out.stats.tau)
            base = plain_of(c)
            if base is None:
                plain[c] = out.token_ids
            elif out.token_ids != plain[base]:
                mismatches[c] += 1
        if progress:
            print(f"round {r + 1}/{rounds} done", flush=True)
    return ms, tau, mismatches


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
