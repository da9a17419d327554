"""Session 8: the shipped Amphista heads (step 4500) with another draft vocabulary, weights unchanged.

python make_vocab_heads.py N [N ...]  (from the repo root, PYTHONPATH=.): N > 0 = the N most frequent
training-answer tokens (the trainer's frequent_tokens on its training split; the first 8192 are the shipped set),
N = 0 = the full vocabulary (no draft_vocab). Writes runs/s8/heads-amphista-v{N} (v0 = full vocabulary)."""
import json, os, sys
import torch
from safetensors.torch import load_file, save_file
from amphista_engine.training.data import load_shard
from amphista_engine.training.trainer import split_heldout, frequent_tokens
SHARDS = ("runs/big/distill-0.jsonl runs/next/distill-bf16-1200.jsonl runs/big/distill-3000.jsonl "
          "runs/next/distill-bf16-3896.jsonl").split()
src = 'amphista_engine/data/heads/smollm2-135m-amphista'
sd0 = load_file(f'{src}/model.safetensors')
train, _ = split_heldout(load_shard(SHARDS, 49152, 1024).sequences, 0.05)
for n in map(int, sys.argv[1:]):
    dst = f'runs/s8/heads-amphista-v{n}'
    os.makedirs(dst, exist_ok=True)
    c = json.load(open(f'{src}/config.json'))
    c['draft_vocab_size'] = n
    sd = {k: v for k, v in sd0.items() if k != 'draft_vocab'}
    if n:
        vocab, cov = frequent_tokens(train, n, 49152)
        assert torch.equal(vocab[:8192].sort().values, sd0['draft_vocab'].sort().values), "first 8192 differ"
        sd['draft_vocab'] = vocab.clone()
        print(n, f"covers {100 * cov:.2f}% of the training answers' tokens")
    json.dump(c, open(f'{dst}/config.json', 'w'), indent=2)
    save_file(sd, f'{dst}/model.safetensors', metadata={'format': 'pt'})
