"""Held-out top-10 draft log-probs + true-token ranks of a set of heads (for dynamic-tree calibration)."""
import sys, torch
sys.path.insert(0, "/work/main")
from amphista_engine.loading import load_model
from amphista_engine.heads import load_heads, lm_head_fingerprint
from amphista_engine.training.data import load_shard
from amphista_engine.training.trainer import split_heldout, HiddenSource, epoch_batches, head_features, loss_rows, pad_batch
torch.set_num_threads(1)
heads_dir, out = sys.argv[1], sys.argv[2]
SHARDS = ["runs/big/distill-0.jsonl", "runs/next/distill-bf16-1200.jsonl", "runs/big/distill-3000.jsonl", "runs/next/distill-bf16-3896.jsonl"]
target = load_model("smollm2-135m", dtype=torch.float32, device=torch.device("cpu"), max_seq_len=1024).model.eval().requires_grad_(False)
heads = load_heads(heads_dir, target, dtype=torch.float32)
shard = load_shard(SHARDS, target.config.vocab_size, min(1024, target.rope_len))
_, held = split_heldout(shard.sequences, 0.05)
K = heads.num_heads
hs = HiddenSource(target, "runs/big/hidden", lm_head_fingerprint(target))
V, R, S = [], [], []
with torch.no_grad():
    for bi in epoch_batches(held, 4096, 0, 0):
        batch = [held[i] for i in bi]
        x, lengths, plen = pad_batch(batch, torch.device("cpu"))
        hidden = hs.get(batch, x)
        nxt = torch.zeros_like(x); nxt[:, :-1] = x[:, 1:]
        valid = loss_rows(lengths, plen, x.shape[1], K)
        rows = valid.all(-1).nonzero()
        if rows.shape[0] == 0: continue
        logits = heads.logits(head_features(heads, hidden, nxt, rows)).float()
        vals, top = torch.log_softmax(logits, -1).topk(10, dim=-1)
        tgt = heads.slots_of(x[rows[:, :1], rows[:, 1:2] + torch.arange(K) + 2])
        hit = top == tgt[..., None]
        rank = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(tgt, 10))
        V.append(vals); R.append(rank); S.append(torch.tensor(bi)[rows[:, 0]])
torch.save({"values": torch.cat(V), "ranks": torch.cat(R), "seq": torch.cat(S)}, out)
print("positions", torch.cat(R).shape)
