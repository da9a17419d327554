"""Does decoding accept what the trainer's held-out statistics promise? (train/inference consistency check)

`tree-search` predicts tau from teacher-forced ranks on the trainer's held-out split; MT-Bench tau comes from
real decoding. When they disagree, either the questions differ from the training prompts (distribution
shift) or decoding feeds the heads something training never showed them (a bug). This script separates the
two on the *same* token sequences: held-out records distilled in fp32 greedy, so plain fp32 greedy decoding
reproduces their answers token for token, and speculative greedy decoding must too.

For each sequence it reports
  uniform   1 + mean accepted nodes over every answer position (what tree-search prints),
  walk      the decoding walk replayed on those ranks: start at the first answer position, accept the
            longest tree path the ranks allow, jump past the accepted tokens, repeat (the positions real
            decoding visits),
  online    tau of real speculative decoding (Engine.generate) on the record's prompt.
walk == online (up to the last K positions, which have no ranks) means decoding and training agree; a
walk above online is a train/inference mismatch; uniform vs walk is only the estimator's sampling.

    python benchmarks/tau_consistency.py --data runs/big/distill-0.jsonl --heads <dir> --tree mc_sim_7b_63

--data also takes the committed gzipped shards (benchmarks/results/training_smollm2/distill/*.jsonl.gz); --tree
a shipped tree or one fitted to the heads (mix-4, tuned-63, ...), not dynamic-N.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.errors import ConfigError  # noqa: E402
from amphista_engine.tree import get_tree_choices  # noqa: E402
from amphista_engine.training.data import load_shard  # noqa: E402
from amphista_engine.training.plan import split_heldout  # noqa: E402
from amphista_engine.training.tree_search import accepted_depth, heldout_ranks, walk  # noqa: E402


def read_records(paths) -> dict[str, dict]:
    """Every record of the shards by id; a shard may be gzipped (as the committed ones are,
    benchmarks/results/training_smollm2/distill/*.jsonl.gz)."""
    records = {}
    for path in map(str, paths):
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    records[str(r["id"])] = r
    return records


def tree_paths(tree: str, fitted: dict) -> set[tuple[int, ...]]:
    """The rank paths of a static tree: a shipped one, or one fitted to the heads (`fitted`: their mix-N, tuned-N).
    dynamic-N has none (it is built anew every step): ConfigError, as for an unknown name."""
    if tree.startswith("dynamic-"):
        raise ConfigError(f"--tree {tree} is built anew every step; the walk needs a static tree "
                          f"(a shipped one, or the heads' own: {', '.join(sorted(fitted)) or 'none'})")
    try:
        return {tuple(p) for p in get_tree_choices(fitted.get(tree, tree))}
    except ConfigError as e:
        raise ConfigError(f"{e}; or the heads' own: {', '.join(sorted(fitted)) or 'none'}") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="fp32-distilled shard(s) (their answers reproduce)")
    ap.add_argument("--heads", required=True)
    ap.add_argument("--kind", default="amphista", choices=["amphista", "medusa"])
    ap.add_argument("--tree", default="mc_sim_7b_63")
    ap.add_argument("--num-seqs", type=int, default=10)
    ap.add_argument("--cache-hidden", default=None)
    ap.add_argument("--out", default=None, help="JSON with per-sequence numbers")
    args = ap.parse_args(argv)

    eng = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=2048, quant="none")
    eng.load_heads(args.heads)
    target, heads = eng.model, eng.heads
    try:
        paths = tree_paths(args.tree, heads.config.extra.get("trees") or {})
    except ConfigError as e:
        sys.exit(f"tau_consistency: {e}")
    shard = load_shard(args.data, target.config.vocab_size, 1024)
    records = read_records(args.data)
    _, held = split_heldout(shard.sequences, 0.05)
    held = [s for s in held if len(s.ids) - s.prompt_len >= 64][:args.num_seqs]
    K = heads.num_heads
    rows_out, tot = [], {"uniform": [0, 0], "walk": [0, 0], "online": [0, 0]}
    for s in held:
        rec = records[s.id]
        ranks = heldout_ranks(heads, target, [s], args.cache_hidden).tolist()
        acc = [accepted_depth(r, paths) for r in ranks]
        w_steps, w_tokens = walk(ranks, paths)
        answer = s.ids[s.prompt_len:]
        res = eng.generate(rec["prompt"], max_new_tokens=len(answer), speculative=args.kind, tree=args.tree)
        same_prompt = res.prompt_token_ids == s.ids[:s.prompt_len]
        same = res.token_ids[:len(answer)] == answer
        row = {"id": s.id, "answer_tokens": len(answer), "prompt_matches": same_prompt, "answer_matches": same,
               "uniform_tau": round(1 + sum(acc) / len(acc), 4), "walk_tau": round(w_tokens / w_steps, 4),
               "online_tau": round(res.stats.tau, 4), "online_hist": res.stats.accept_hist}
        rows_out.append(row)
        for k, (a, b) in {"uniform": (len(acc) + sum(acc), len(acc)), "walk": (w_tokens, w_steps),
                          "online": (res.stats.step_tokens, res.stats.decode_steps)}.items():
            tot[k][0] += a
            tot[k][1] += b
        print(json.dumps(row), flush=True)
    summary = {k: round(a / b, 4) for k, (a, b) in tot.items()}
    print(f"{len(rows_out)} held-out sequences, tree {args.tree}, K={K}: " +
          ", ".join(f"{k} tau {v:.3f}" for k, v in summary.items()) +
          f"; answers reproduced {sum(r['answer_matches'] for r in rows_out)}/{len(rows_out)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"heads": args.heads, "tree": args.tree, "summary": summary,
                                              "per_sequence": rows_out}, indent=1) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
