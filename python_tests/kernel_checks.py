"""What every kernel test shares: fresh seeded inputs per case, relative error, per-dtype tolerances."""
from __future__ import annotations

import random
import zlib

import pytest
import torch

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def fresh_backend():
    """No process-wide backend and no cached choice before or after a test (imported: autouse in that module)."""
    from amphista_engine.kernels import backend
    backend.set_backend(None)
    backend.clear_cache()
    yield
    backend.set_backend(None)
    backend.clear_cache()


def gen(*key) -> torch.Generator:
    """A generator seeded from the case, so every shape gets its own fresh inputs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEV)


def tree_bits(kind: str, B: int, N: int, g):
    """Ancestor masks of N nodes: a static tree (shared, [1, N]), per-row dynamic trees ([B, N]) or causal."""
    from amphista_engine.kernels import reference
    from amphista_engine.tree import build_tree, dynamic_tree
    if kind == "causal":
        return reference.mask_bits(torch.ones(N, N, dtype=torch.bool).tril()[None]).to(DEV)
    if kind == "static":
        tree = build_tree("mc_sim_7b_63") if N == 64 else build_tree([(0,) * d for d in range(1, N)])
        return tree.ancestor_bits[None].to(DEV)
    dt = dynamic_tree(torch.zeros(B, dtype=torch.long), torch.randn(B, 4, 12, generator=g), N, topk=4)
    return dt.ancestor_bits.to(DEV)


def rope_inputs(B: int, T: int, H: int, D: int, dtype, shared: bool):
    """(x, rows) of a RoPE case: x the K part of a fused QKV output [B, T, H, D] (strided), rows the table's rows at
    explicit, unordered positions (one set for the batch where `shared`)."""
    from amphista_engine.config import ModelConfig
    from amphista_engine.model import rope_table
    g = gen("rope", B, T, H, D, dtype)
    cfg = ModelConfig(vocab_size=8, dim=H * D, n_layers=1, n_heads=H, n_kv_heads=H, intermediate_size=8,
                      rope_theta=500000.0)
    table = rope_table(cfg, 300).to(DEV)
    positions = torch.randint(0, 300, (1 if shared else B, T), generator=g).to(DEV)
    qkv = randn(g, B, T, 3 * H * D, dtype=dtype)
    return qkv[..., H * D:2 * H * D].view(B, T, H, D), table[positions]


def check_kv_compact(kv_compact, kb, vb):
    """A backend's kv_compact(kb, vb, src, dst_start) moves exactly the slots the reference moves, with overlapping
    sources and destinations, a source out of range, and padding entries. kb, vb: [L, B_max >= 2, H, S = 48, D]."""
    from amphista_engine.kernels import reference
    # Row 0: accepted nodes 0, 2, 5 at prefix 10 -> slots 10, 12, 15 move to 10, 11, 12 (12 is a source too), then
    # padding entries (slot 10 again). Row 1: a source out of range is clamped to S - 1 = 47, which is also a
    # destination (overlap).
    src = torch.tensor([[10, 12, 15, 10, 10], [44, 47, 60, -3, 45]], device=DEV)
    dst_start = torch.tensor([10, 45], device=DEV)
    rk, rv = kb.clone(), vb.clone()
    reference.kv_compact(rk, rv, src[:, :3], dst_start)     # no duplicate clamped destinations here
    kv_compact(kb, vb, src[:, :3], dst_start)
    assert torch.equal(kb, rk) and torch.equal(vb, rv)
    rk, rv = kb.clone(), vb.clone()                         # with padding entries (row 0 only, B < B_max)
    reference.kv_compact(rk, rv, src[:1], dst_start[:1])
    kv_compact(kb, vb, src[:1], dst_start[:1])
    assert torch.equal(kb, rk) and torch.equal(vb, rv)


def cuda_extension():
    """The built CUDA extension, on a machine with a GPU: skips under AMPHISTA_NO_CUDA=1, fails where it is missing."""
    import os

    import pytest

    from amphista_engine._ext import extension_error, load_extension
    ext = load_extension()
    if ext is None:
        if os.environ.get("AMPHISTA_NO_CUDA") == "1":
            pytest.skip("AMPHISTA_NO_CUDA=1")
        pytest.fail(f"CUDA device present but extension missing: {extension_error()}")
    return ext


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
