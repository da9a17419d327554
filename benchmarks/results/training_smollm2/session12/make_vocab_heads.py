"""Session 12: a copy of trained Amphista heads that drafts over N > 8192 tokens, weights unchanged.

python make_vocab_heads.py SRC DST N [rerank]  (from the repo root, PYTHONPATH=.): keeps SRC's draft vocabulary
(the 8,192 tokens it was trained with) first and appends the most frequent answer tokens of the training split of
all committed shards that are not in it, up to N. With `rerank`: the N most frequent tokens of that split instead
(what a fresh `train --draft-vocab N` on all the shards would pick). The drafting LM head is the target's, row-sliced, so the heads'
features do not depend on the set (eighth session, TRAINING.md)."""
import glob, json, os, sys
import torch
from safetensors.torch import load_file, save_file
from amphista_engine.training.data import load_shard
from amphista_engine.training.trainer import split_heldout, answer_token_counts

src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sd = load_file(f"{src}/model.safetensors")
cfg = json.load(open(f"{src}/config.json"))
V = cfg.get("vocab_size", 49152)
old = sd["draft_vocab"]
rerank = sys.argv[4:] == ["rerank"]
assert rerank or n > old.numel(), "N must exceed the current draft vocabulary"
shards = sorted(glob.glob("benchmarks/results/training_smollm2/distill/*.jsonl.gz"))
train, _ = split_heldout(load_shard(shards, V, 1024).sequences, 0.05)
counts = answer_token_counts(train, V)
ranked = torch.sort(-counts, stable=True).indices          # frequent_tokens' order: by count, ties by id
seen = torch.zeros(V, dtype=torch.bool)
seen[old] = True
extra = ranked[~seen[ranked]][: n - old.numel()]
vocab = ranked[:n] if rerank else torch.cat([old, extra])
print(f"{old.numel()} -> {n} tokens: training-answer coverage {counts[old].sum() / counts.sum():.4f} -> "
      f"{counts[vocab].sum() / counts.sum():.4f}")
cfg["draft_vocab_size"] = n
sd["draft_vocab"] = vocab.clone()
os.makedirs(dst, exist_ok=True)
json.dump(cfg, open(f"{dst}/config.json", "w"), indent=2)
save_file(sd, f"{dst}/model.safetensors", metadata={"format": "pt"})
