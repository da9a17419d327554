"""How much does sampling lower the heads' tau? (the numbers behind speculation_check.SAMPLED_ACCEPTANCE)

`tree-search` records a greedy decoding tau per tree on the heads' held-out split, and `--speculative auto`
weighs it against the step cost. A sampled answer accepts fewer drafts (lossless rejection sampling keeps a
draft with the target's probability of it, not with certainty), so this script decodes the same held-out
training prompts greedy and sampled on each tree and reports, per setting, the share of greedy's extra tokens
per step that sampling keeps: (tau_sampled - 1) / (tau_greedy - 1).

    python benchmarks/sampled_tau.py [--prompts 12] [--max-new-tokens 96] [--trees dynamic-4,dynamic-8,dynamic-16]

Prompts: the trainer's held-out split of ../shared/data/train_prompts.jsonl (training.plan.split_heldout's hash,
eval_frac 0.05), never the evaluation questions. Tau does not depend on the machine's speed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import hardware, md_table, write_results  # noqa: E402

from amphista_engine import Engine  # noqa: E402
from amphista_engine.training.plan import split_heldout  # noqa: E402

# (name, temperature, top_p, min_p)
SETTINGS = [("greedy", 0.0, 1.0, 0.0), ("T 0.3", 0.3, 1.0, 0.0), ("T 0.7", 0.7, 1.0, 0.0), ("T 1.0", 1.0, 1.0, 0.0),
            ("T 0.7, top_p 0.9", 0.7, 0.9, 0.0), ("T 1.0, top_p 0.9", 1.0, 0.9, 0.0),
            ("T 0.7, min_p 0.1", 0.7, 1.0, 0.1), ("T 1.0, min_p 0.1", 1.0, 1.0, 0.1),
            ("T 1.0, min_p 0.05", 1.0, 1.0, 0.05)]


def heldout_prompts(path: Path, n: int) -> list[str]:
    class Seq:
        def __init__(self, rec):
            self.id, self.prompt = rec["id"], rec["prompt"]
    seqs = [Seq(json.loads(line)) for line in path.read_text().split("\n") if line.strip()]
    _, held = split_heldout(seqs, 0.05)
    held.sort(key=lambda s: s.id)
    step = max(1, len(held) // n)            # spread over the sources, not the first n ids of one
    return [s.prompt for s in held[::step][:n]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--trees", default="dynamic-4,dynamic-8,dynamic-16")
    ap.add_argument("--seeds", type=int, default=2, help="sampled runs per prompt and setting")
    ap.add_argument("--settings", default=None,
                    help="the settings to run, by name, ';'-separated (default: all; greedy always runs first)")
    ap.add_argument("--data", default=str(Path(__file__).parents[2] / "shared" / "data" / "train_prompts.jsonl"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampled_tau"))
    args = ap.parse_args()
    prompts = heldout_prompts(Path(args.data), args.prompts)
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=1024)
    engine.load_heads("default")
    chosen = SETTINGS
    if args.settings:
        names = {n.strip() for n in args.settings.split(";")} | {"greedy"}
        unknown = names - {s[0] for s in SETTINGS}
        if unknown:
            ap.error(f"unknown --settings {sorted(unknown)}; known: {[s[0] for s in SETTINGS]}")
        chosen = [s for s in SETTINGS if s[0] in names]
    rows = []
    for tree in args.trees.split(","):
        greedy_tau = None
        for name, t, top_p, min_p in chosen:
            tokens = steps = 0
            for i, p in enumerate(prompts):
                for seed in range(1 if t == 0 else args.seeds):
                    r = engine.generate(p, args.max_new_tokens, temperature=t, top_p=top_p, min_p=min_p, seed=1000 * i + seed,
                                        speculative="amphista", tree=tree)
                    tokens += r.stats.step_tokens
                    steps += r.stats.decode_steps
            tau = tokens / steps
            greedy_tau = tau if t == 0 else greedy_tau
            kept = (tau - 1) / (greedy_tau - 1)
            rows.append({"tree": tree, "setting": name, "temperature": t, "top_p": top_p, "min_p": min_p, "tau": round(tau, 4),
                         "kept": round(kept, 4), "tokens": tokens, "steps": steps})
            print(tree, name, f"tau {tau:.3f} kept {kept:.3f}", flush=True)
    meta = {"hardware": hardware("cpu"), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
            "seeds": args.seeds, "what": "tau of the shipped Amphista heads, greedy and sampled (rejection "
            "acceptance), on held-out training prompts; kept = (tau - 1) / (greedy tau - 1)"}
    write_results("sampled_tau", rows, meta, md_table(rows, ["tree", "setting", "tau", "kept", "steps"]),
                  Path(args.out))


if __name__ == "__main__":
    main()
