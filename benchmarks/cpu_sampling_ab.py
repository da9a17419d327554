"""Sampled decoding on the CPU, this checkout against another commit: 4-bit SmolLM2, plain sampling and Amphista
tree rejection sampling on the shipped heads, in alternating processes (the order flips every round, so that both
checkouts see the same drifts of a shared VM).

For changes to the sampling path (sampling.py, acceptance.py), whose cost greedy benchmarks never see. Each round
decodes the same prompts with the same seeds in each checkout; tokens/s are decode tokens over decode time, summed
over rounds, and tau is the mean of the speculative runs' tokens per step.

    OMP_NUM_THREADS=2 python benchmarks/cpu_sampling_ab.py --base f5a4391 [--rounds 4] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a short story about a robot learning to paint.", "Explain how vaccines work to a ten-year-old.",
           "Give three tips for writing clean Python code.", "Describe a sunset over the ocean in a few sentences."]
SETTINGS = [("T0.7", {"temperature": 0.7}), ("T0.7 top_p0.9", {"temperature": 0.7, "top_p": 0.9})]


def worker(root: str, max_new: int, seed: int):
    """Runs inside the checkout `root`: one JSON line per (setting, method, prompt)."""
    sys.path.insert(0, root)
    import amphista_engine
    if not (amphista_engine.__file__ or "").startswith(root):     # None: a folder without the package
        sys.exit(f"imported {amphista_engine.__file__}, not the checkout at {root}")
    from amphista_engine import Engine
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=1024)
    engine.load_heads("default")
    engine.generate(PROMPTS[0], max_new_tokens=8)                      # warm-up
    for name, kw in SETTINGS:
        for method in (None, "amphista"):
            for i, q in enumerate(PROMPTS):
                r = engine.generate(q, max_new_tokens=max_new, seed=seed + i, speculative=method,
                                    tree=None if method is None else "dynamic-4",
                                    acceptance="auto" if method is None else "rejection", **kw)
                print(json.dumps({"setting": name, "method": method or "plain", "tokens": r.stats.step_tokens,
                                  "ms": r.stats.decode_ms, "steps": r.stats.decode_steps}), flush=True)


def checkout(base: str, worktrees: Path) -> Path:
    """The base commit in a git worktree, with this checkout's built CPU extension where csrc/cpu is the same."""
    sha = subprocess.run(["git", "rev-parse", "--short", base], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    where = worktrees / f"amphista-{sha}"
    if not where.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(where), sha], cwd=ROOT, check=True)
    if subprocess.run(["git", "diff", "--quiet", sha, "HEAD", "--", "csrc/cpu"], cwd=ROOT).returncode:
        sys.exit("csrc/cpu differs between the commits: build the base's extension in its worktree first")
    for so in (ROOT / "amphista_engine").glob("_cpu*.so"):
        shutil.copy2(so, where / "amphista_engine" / so.name)
    return where


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--worktrees", default="/tmp")
    ap.add_argument("--out", default=None, help="folder for results.json and table.md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.max_new_tokens, args.seed)
    arms = {"base": checkout(args.base, Path(args.worktrees)), "this": ROOT}
    totals = {}
    for rnd in range(args.rounds):
        for arm in (("base", "this") if rnd % 2 == 0 else ("this", "base")):
            proc = subprocess.run([sys.executable, __file__, "--base", args.base, "--worker", str(arms[arm]),
                                   "--seed", str(100 * rnd), "--max-new-tokens", str(args.max_new_tokens)],
                                  capture_output=True, text=True, env=os.environ)
            if proc.returncode:        # check=True raised CalledProcessError with the worker's stderr dropped
                sys.exit(f"cpu_sampling_ab: the {arm} worker ({arms[arm]}) failed:\n{proc.stderr[-3000:]}")
            out = proc.stdout
            for line in out.splitlines():
                r = json.loads(line)
                t = totals.setdefault((r["setting"], r["method"], arm), [0, 0.0, 0])
                t[0] += r["tokens"]
                t[1] += r["ms"]
                t[2] += r["steps"]
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for name, _ in SETTINGS:
        for method in ("plain", "amphista"):
            b, n = totals[(name, method, "base")], totals[(name, method, "this")]
            tps_b, tps_n = b[0] / b[1] * 1e3, n[0] / n[1] * 1e3
            rows.append({"setting": name, "method": method, "base_tok_s": round(tps_b, 1),
                         "this_tok_s": round(tps_n, 1), "ratio": round(tps_n / tps_b, 3),
                         "tau_base": round(b[0] / b[2], 2), "tau_this": round(n[0] / n[2], 2)})
    head = ("| setting | method | base tok/s | this tok/s | ratio | tau base | tau this |\n"
            "|---|---|---|---|---|---|---|\n")
    table = head + "".join(f"| {r['setting']} | {r['method']} | {r['base_tok_s']} | {r['this_tok_s']} | "
                           f"{r['ratio']}x | {r['tau_base']} | {r['tau_this']} |\n" for r in rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"base": args.base, "rounds": args.rounds, "rows": rows},
                                                     indent=1))
        (out / "table.md").write_text(table)


if __name__ == "__main__":
    main()
