"""This checkout against another commit, side by side on the CPU: 4-bit SmolLM2 decoding MT-Bench first turns,
plainly and on the shipped Amphista heads' trees, in alternating processes.

For kernel changes whose gain is smaller than a VM's drift between two runs: the other commit goes into a git
worktree (under --worktrees, built once with its own CPU extension), and each chunk of questions is decoded by
one process per checkout, the order flipping from chunk to chunk, so that both see the same drifts. Tokens/s
are summed over all questions; every speculative answer is checked against its own checkout's plain answer,
and every answer against the base's (a change meant to keep every bit should give n/n there).

    python benchmarks/checkout_ab.py --base 9780d3b [--trees mix-4,mix-8] [--questions 16] [--chunk 4] [--quant none]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(root: str, modes: list[str], questions: list[str], max_new: int, quant: str = "auto"):
    """Runs inside the checkout `root`: one JSON line per (mode, question)."""
    sys.path.insert(0, root)
    import amphista_engine
    if not (amphista_engine.__file__ or "").startswith(root):     # None: a folder without the package
        sys.exit(f"imported {amphista_engine.__file__}, not the checkout at {root}")
    from amphista_engine import Engine
    from amphista_engine.shipped_heads import shipped_heads
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=1024, quant=quant)
    engine.load_heads(str(shipped_heads("smollm2-135m", "amphista")))
    engine.generate(questions[0], max_new_tokens=8)                     # warm-up
    for i, q in enumerate(questions):
        for m in modes[i % len(modes):] + modes[:i % len(modes)]:
            r = engine.generate(q, max_new_tokens=max_new, speculative=None if m == "plain" else "amphista",
                                tree=None if m == "plain" else m)
            print(json.dumps({"mode": m, "q": i, "tokens": r.stats.step_tokens, "ms": r.stats.decode_ms,
                              "steps": r.stats.decode_steps, "ids": r.token_ids}), flush=True)


def worktree(rev: str, base_dir: Path) -> Path:
    sha = subprocess.check_output(["git", "rev-parse", "--short", rev], cwd=ROOT, text=True).strip()
    path = base_dir / f"amphista-ab-{sha}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(path), sha], cwd=ROOT, check=True)
    if not list((path / "amphista_engine").glob("_cpu*.so")):
        b = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=path, capture_output=True,
                           text=True, env={**os.environ, "AMPHISTA_NO_CUDA": "1"})
        if b.returncode:
            sys.exit(f"building the CPU extension in {path} failed:\n{b.stderr[-3000:]}")
    return path


def main():
    from benchmarks.common import ab_parser, hardware, md_table, write_results
    ap = ab_parser(__doc__, trees="mix-4,mix-8")
    ap.add_argument("--base", required=True, help="the commit to compare against (any git revision)")
    ap.add_argument("--chunk", type=int, default=4, help="questions per worker process")
    ap.add_argument("--worktrees", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    ap.add_argument("--quant", default="auto", choices=["auto", "none"],
                    help="none: the dequantized fp32 weights (oneDNN-packed), not the 4-bit codes")
    args = ap.parse_args()
    base = worktree(args.base, args.worktrees)
    qs = [json.loads(line)["turns"][0] for line in open(ROOT.parent / "shared" / "data" / "mt_bench.jsonl")]
    qs = qs[:args.questions]
    modes = ["plain"] + [t for t in args.trees.split(",") if t]
    sides = {"base": str(base), "this": str(ROOT)}
    res = {s: [] for s in sides}
    for c, c0 in enumerate(range(0, len(qs), args.chunk)):
        chunk = qs[c0:c0 + args.chunk]
        for side in (list(sides) if c % 2 == 0 else list(sides)[::-1]):
            out = subprocess.run([sys.executable, __file__, "--worker", sides[side], ",".join(modes),
                                  str(args.max_new_tokens), json.dumps(chunk), args.quant], capture_output=True,
                                 text=True)
            if out.returncode:
                sys.exit(f"{side} worker failed:\n{out.stderr[-3000:]}")
            res[side] += [{**json.loads(line), "q": json.loads(line)["q"] + c0} for line in out.stdout.splitlines()]
        print(f"{min(c0 + args.chunk, len(qs))}/{len(qs)} questions", file=sys.stderr)
    rows = []
    for m in modes:
        tps = {}
        for side in sides:
            r = [x for x in res[side] if x["mode"] == m]
            tps[side] = sum(x["tokens"] for x in r) / sum(x["ms"] for x in r) * 1e3
            plain = {x["q"]: x["ids"] for x in res[side] if x["mode"] == "plain"}
            same = sum(x["ids"] == plain[x["q"]] for x in r)
            tau = sum(x["tokens"] for x in r) / sum(x["steps"] for x in r)
            base_ids = {x["q"]: x["ids"] for x in res["base"] if x["mode"] == m}
            rows.append({"decoding": m, "checkout": side, "tau": tau, "tok/s": tps[side],
                         "equals plain": f"{same}/{len(r)}",
                         "equals base": f"{sum(x['ids'] == base_ids[x['q']] for x in r)}/{len(r)}",
                         "this / base": tps[side] / tps["base"]})
    import torch
    meta = {"hardware": hardware("cpu"), "isa": torch.backends.cpu.get_cpu_capability(),
            "base": f"{args.base} ({base.name.removeprefix('amphista-ab-')})",
            "questions": len(qs), "chunk": args.chunk,
            "max_new_tokens": args.max_new_tokens,
            "model": "smollm2-135m, " + ("4-bit (quant auto), fp32 between" if args.quant == "auto" else
                                         "fp32 weights (quant none)"),
            "what": "tok/s summed over MT-Bench first turns, the two checkouts in alternating processes"}
    write_results("checkout_ab", rows, meta,
                  md_table(rows, ["decoding", "checkout", "tau", "tok/s", "equals plain", "equals base",
                                        "this / base"]), args.out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3].split(","), json.loads(sys.argv[5]), int(sys.argv[4]), *sys.argv[6:7])
    else:
        sys.path.insert(0, str(ROOT))
        main()
