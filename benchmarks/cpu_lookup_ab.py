"""Prompt lookup decoding on the CPU, side by side in one process: plain decoding, the shipped Amphista heads, prompt
lookup alone (`lookup`) and the heads' tree with a lookup chain (`amphista+lookup`), the lookups also with their
n-gram floor at 2 (a 1-token match drafts nothing), on three prompt sets, question by question in rotating order:

- `mt-bench`: MT-Bench first turns (free answers: little to copy);
- `edit`: code-editing requests over functions of this repository (the answer copies most of the prompt);
- `predicted`: the `edit` requests with the plain answer given as OpenAI's `prediction` (its best case: the answer
  was known; lookup configs only).

Every answer is checked against plain decoding's (greedy: token for token).

    python benchmarks/cpu_lookup_ab.py [--questions 12] [--max-new-tokens 160] [--sets mt-bench,edit,predicted]
                                       [--weights bf16|q4]

--weights bf16 (the default): bf16 with float weights (quant none), where speculation pays on an AMX Xeon (Amphista
1.65x); q4: the 4-bit default, whose plain steps are cheap enough that trees rarely pay on a CPU.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from amphista_engine import Engine  # noqa: E402
from benchmarks.common import ab_parser, first_turns, hardware, md_table, rotating_runs, write_results  # noqa: E402

ASKS = ["Add a one-line docstring to this function and give back the whole function, unchanged otherwise:",
        "Add type hints to this function's parameters and give back the whole function:",
        "Rewrite this function with the same code but with a comment above each statement:"]
CONFIGS = [("plain", None, 1), ("amphista", "amphista", 1), ("lookup", "lookup", 1), ("lookup", "lookup", 2),
           ("amphista+lookup", "amphista+lookup", 1), ("amphista+lookup", "amphista+lookup", 2)]


def edit_requests(n: int) -> list[str]:
    """n requests over the shortest whole functions (8-30 lines) of amphista_engine/*.py, in file order."""
    root = Path(__file__).resolve().parents[1] / "amphista_engine"
    funcs = []
    for path in sorted(root.glob("*.py")):
        src = path.read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef) and 8 <= node.end_lineno - node.lineno + 1 <= 30:
                funcs.append(ast.get_source_segment(src, node))
    step = max(len(funcs) // n, 1)
    return [f"{ASKS[i % len(ASKS)]}\n\n```python\n{f}\n```" for i, f in enumerate(funcs[::step][:n])]


def main():
    ap = ab_parser(__doc__)
    ap.add_argument("--sets", default="mt-bench,edit,predicted")
    ap.add_argument("--weights", default="bf16", choices=["bf16", "q4"])
    args = ap.parse_args()
    weights = dict(dtype="bf16", quant="none") if args.weights == "bf16" else dict(quant="q4")
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=2048, **weights)
    engine.load_heads("default")
    sets = args.sets.split(",")
    edits = edit_requests(args.questions)
    prompts = {"mt-bench": first_turns(args.questions), "edit": edits, "predicted": edits}
    plain_text, trees = {}, {}

    def run(config, question):
        name, spec, floor = config[1:]
        opts = {}
        if config[0] == "predicted" and spec is not None:
            opts["prediction"] = plain_text[question]
        if engine._lookup_drafter is not None:
            engine._lookup_drafter.min_ngram = floor
        r = engine.generate(question, max_new_tokens=args.max_new_tokens, speculative=spec, **opts)
        trees[name] = r.stats.extra.get("tree", "-")

        return r

    engine.generate(prompts[sets[0]][0], max_new_tokens=8, speculative="lookup")       # warm-up (and the drafter)
    rows = []
    for s in sets:
        configs = [(s,) + c for c in CONFIGS]
        if s == "predicted":     # the plain answers first (they are the predictions), then only lookups
            for q in prompts[s]:
                plain_text[q] = engine.generate(q, max_new_tokens=args.max_new_tokens).text
            configs = [(s,) + c for c in CONFIGS if c[0] == "plain" or "lookup" in c[0]]
        toks, secs, steps, outs = rotating_runs(prompts[s], configs, run)
        base = configs[0]
        for c in configs:
            same = sum(outs[c + (i,)] == outs[base + (i,)] for i in range(len(prompts[s])))
            rows.append({"prompts": s, "decoding": c[1] + (f", n-gram >= {c[3]}" if "lookup" in c[1] else ""),
                         "tau": toks[c] / steps[c], "tok/s": toks[c] / secs[c],
                         "speedup": (toks[c] / secs[c]) / (toks[base] / secs[base]),
                         "equals plain": f"{same}/{len(prompts[s])}"})
    table = md_table(rows, ["prompts", "decoding", "tau", "tok/s", "speedup", "equals plain"])
    write_results(f"cpu_lookup_ab_{args.weights}", rows, {"hardware": hardware("cpu"), "questions": args.questions,
                                          "max_new_tokens": args.max_new_tokens,
                                          "model": f"SmolLM2-135M-Instruct, {weights}",
                                          "threads": torch.get_num_threads(),
                                          "trees (the CPU defaults)": trees}, table, args.out)


if __name__ == "__main__":
    main()
