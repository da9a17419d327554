"""What every kernel test shares: fresh seeded inputs per case, relative error, per-dtype tolerances."""
from __future__ import annotations

import random
import zlib

import torch

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def gen(*key) -> torch.Generator:
    """A generator seeded from the case, so every shape gets its own fresh inputs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEV)


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def same_result(a, b):
    """Two AcceptResults agree exactly, field by field."""
    for f in ("accept_len", "best_path", "accepted_nodes", "next_token", "emitted"):
        assert torch.equal(getattr(a, f), getattr(b, f)), (f, getattr(a, f), getattr(b, f))


def check_verify_step(backend_name: str, tree_name: str, H: int, S: int, prefix: list[int], dtype, tol: float):
    """One layer's verification step built from the ops (RoPE, KV write, tree attention, greedy accept, KV
    compaction) on `backend_name` against the torch backend: close logits, and where the argmaxes agree
    (near-ties aside) identical accept results and caches: V bit for bit (written and compacted by copies
    only), K within `tol` (it passes through RoPE, where a GPU compiler may fuse multiply-adds: seen with
    Triton on an H200, 2026-11-27)."""
    from amphista_engine.config import ModelConfig
    from amphista_engine.kernels import ops, use_backend
    from amphista_engine.model import rope_table
    from amphista_engine.tree import build_tree

    g = gen("verify_step")
    B, Hkv, D, L, V = len(prefix), 2, 64, 2, 50
    tree = build_tree(tree_name)
    N = tree.num_nodes
    cfg = ModelConfig(vocab_size=V, dim=H * D, n_layers=L, n_heads=H, n_kv_heads=Hkv, intermediate_size=8)
    table = rope_table(cfg, S).to(DEV)
    qkv = randn(g, B, N, (H + 2 * Hkv) * D, dtype=dtype)
    w_out = randn(g, V, H * D, scale=0.3, dtype=dtype)
    tokens = torch.randint(0, V, (B, N), generator=g).to(DEV)
    kb0, vb0 = randn(g, L, B, Hkv, S, D, dtype=dtype), randn(g, L, B, Hkv, S, D, dtype=dtype)
    start = torch.tensor(prefix, device=DEV)

    def step(name):
        kb, vb = kb0.clone(), vb0.clone()
        with use_backend(name):
            rows = table[start[:, None] + tree.depth.to(DEV)]
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
            q = ops.rope(q.view(B, N, H, D), rows).transpose(1, 2)
            k = ops.rope(k.view(B, N, Hkv, D), rows).transpose(1, 2)
            ops.kv_write(kb, vb, 0, start, k, v.view(B, N, Hkv, D).transpose(1, 2))
            mask, dense = ops.tree_mask_args(start, tree.mask[None].to(DEV), S)
            att = ops.tree_attention(q, kb[0], vb[0], start, mask, S, dense_mask=dense)
            logits = att.transpose(1, 2).reshape(B, N, H * D) @ w_out.T
            res = ops.greedy_accept(tokens, logits, tree.retrieve.to(DEV))
            ops.kv_compact(kb, vb, start[:, None] + res.accepted_nodes.clamp(min=0), start)
        return res, kb, vb, logits

    r1, k1, v1, l1 = step("torch")
    r2, k2, v2, l2 = step(backend_name)
    assert rel_err(l2, l1) < tol
    if torch.equal(l1.argmax(-1), l2.argmax(-1)):
        same_result(r1, r2)
        assert torch.equal(v1, v2)
        assert rel_err(k2, k1) < tol


def rand_tree(N: int, max_depth: int, rng: random.Random) -> torch.Tensor:
    """Ancestor-or-self mask of a random tree whose nodes are numbered parents first."""
    parent, depth = [-1], [0]
    for i in range(1, N):
        p = rng.choice([j for j in range(i) if depth[j] < max_depth])
        parent.append(p)
        depth.append(depth[p] + 1)
    m = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        j = i
        while j >= 0:
            m[i, j], j = True, parent[j]
    return m


def accept_inputs(kind: str, B: int, V: int, g, dtype=torch.float32, hit=0.6):
    """(tokens, logits, retrieve) of a static, chain or dynamic tree whose children mostly match their parent's
    argmax (probability `hit`), so acceptance walks real paths."""
    from amphista_engine.tree import build_tree, dynamic_tree
    if kind == "static":
        tree = build_tree("mc_sim_7b_63")
        N, retrieve = tree.num_nodes, tree.retrieve
        parent = tree.parent.expand(B, -1)
    elif kind == "chain":
        tree = build_tree("chain-5")
        N, retrieve, parent = tree.num_nodes, tree.retrieve, tree.parent.expand(B, -1)
    else:
        tree = dynamic_tree(torch.zeros(B, dtype=torch.long), torch.randn(B, 4, V, generator=g), 21, topk=5)
        N, retrieve, parent = tree.num_nodes, tree.retrieve, tree.parent
    logits = torch.randn(B, N, V, generator=g) * 3
    tokens = torch.randint(0, V, (B, N), generator=g)
    pred = logits.argmax(-1)
    for i in range(1, N):                                   # make many children what their parent predicts
        take = torch.rand(B, generator=g) < hit
        tokens[:, i] = torch.where(take, pred.gather(1, parent[:, i:i + 1]).squeeze(1), tokens[:, i])
    return tokens.to(DEV), logits.to(dtype=dtype, device=DEV), retrieve.to(DEV)
