"""Every hot op against its torch reference on fresh seeded random inputs, at the edges the fixed-shape kernel tests
skip: batch rows of different lengths (0, 1, just below and above the 16/32/64/128 blocks), kv windows that end at
the cache's last slot, GQA 1/2/4/8, head dims 64/96/128 and odd ones where the op takes them, random trees of 1..64
nodes, the first and last layer, fp32/bf16/fp16, and non-contiguous views. The reference itself is checked against
attention written out in float64, one softmax per (row, head, node).

Errors are relative (||out - ref|| / ||ref||), never allclose on near-zero outputs. Cache slots no live token may
see (past a row's prefix + tree, and cache rows past the batch) hold NaN when a kernel runs: a leak into a live row
shows as a non-finite output. Triton runs in its CPU interpreter (slow: shapes stay small); the `cpu` cases need the
extension. AMPHISTA_FUZZ_CASES=N runs N seeded cases per fuzz test instead of the default few (a broader sweep).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is imported anywhere

import random

import pytest

from amphista_engine.config import ModelConfig
from amphista_engine.errors import ConfigError
from amphista_engine.kernels import cpu_ops, cpu_quant, gpu_exact, ops, reference, use_backend
from amphista_engine.model import rope_table
from amphista_engine.tree import build_tree, dynamic_tree

from kernel_checks import TOL, rand_tree, rel_err, same_result

try:
    import triton  # noqa: F401
    from amphista_engine.kernels import triton_ops
    from amphista_engine.kernels.triton_kernels import tree_attention as triton_ta
except ImportError:                                  # the cpu and reference cases still run
    triton_ops = triton_ta = None
if torch.cuda.is_available():                        # the cases here are CPU tensors: Triton's interpreter only
    triton_ops = triton_ta = None                    # (test_kernels_triton.py runs the kernels on the GPU)

needs_triton = pytest.mark.skipif(triton_ops is None, reason="triton not installed, or a GPU (no interpreter)")
needs_cpu = pytest.mark.skipif(cpu_ops.load_extension() is None, reason="CPU extension not built")

CASES = int(os.environ.get("AMPHISTA_FUZZ_CASES", "0"))
EDGES = [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129]
# the interpreter rounds fp32 -> bf16 by truncation (the GPU to nearest), about doubling a bf16 result's error
TRITON_TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def seeds(default: int):
    return range(CASES or default)


def _r(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# ---- the reference against attention written out --------------------------------------------------------
def plain_attention(q, k, v, prefix, mask, kv_len):
    """Tree attention one softmax at a time, in float64: node i of row b sees slots [0, prefix[b]) and slot
    prefix[b] + j for each ancestor-or-self j (mask [B or 1, N, N]) below kv_len."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, N, D, dtype=torch.float64)
    for b in range(B):
        P, m = int(prefix[b]), mask[b if mask.shape[0] > 1 else 0]
        for i in range(N):
            slots = list(range(P)) + [P + j for j in range(N) if m[i, j] and P + j < kv_len]
            kk, vv = k[b, :, slots].double(), v[b, :, slots].double()          # [H_kv, keys, D]
            for h in range(H):
                s = kk[h // G] @ q[b, h, i].double() / D ** 0.5
                out[b, h, i] = torch.softmax(s, 0) @ vv[h // G]
    return out


def attention_case(seed: int, dtypes, head_dims):
    """A random verification step: rows of different lengths around block edges, a cache whose last slot some
    row's tree ends on, a random tree per row (or one shared), GQA 1..8."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B = rng.choice([1, 2, 3])
    Hkv, G = rng.choice([1, 2]), rng.choice([1, 2, 4, 8])
    D, dtype = rng.choice(head_dims), rng.choice(dtypes)
    N = rng.choice([1, 2, 5, 16, 17, 33, 64])
    prefix = [rng.choice(EDGES) for _ in range(B)]
    S = max(prefix) + N + rng.choice([0, 0, 7])            # 0: the longest row ends on the cache's last slot
    kv_len = rng.choice([max(prefix) + N, S])
    q = _r(g, B, N, Hkv * G, D, dtype=dtype).transpose(1, 2)          # the model's layout: a transposed view
    k, v = _r(g, B + 1, Hkv, S, D, dtype=dtype), _r(g, B + 1, Hkv, S, D, dtype=dtype)   # a spare cache row
    mask = torch.stack([rand_tree(N, rng.choice([1, 3, 7, 63]), rng) for _ in range(rng.choice([1, B]))])
    return q, k, v, torch.tensor(prefix), mask, kv_len


def poison_dead_slots(k, v, prefix, N):
    """NaN wherever no live token may look: past each row's prefix + tree, and the cache rows past the batch."""
    k, v = k.clone(), v.clone()
    for b, p in enumerate(prefix.tolist()):
        k[b, :, p + N:], v[b, :, p + N:] = float("nan"), float("nan")
    k[len(prefix):], v[len(prefix):] = float("nan"), float("nan")
    return k, v


@pytest.mark.parametrize("seed", seeds(3))
def test_reference_tree_attention_is_the_written_out_softmax(seed):
    q, k, v, prefix, mask, kv_len = attention_case(1000 + seed, [torch.float32], [16, 64])
    q, k, v = q[:, :4, :9], k[:, :2], v[:, :2]             # few heads and nodes: the loops are Python
    mask = mask[:, :9, :9]
    exact = plain_attention(q, k, v, prefix, mask, kv_len)
    assert rel_err(reference.tree_attention(q, k, v, prefix, mask, kv_len), exact) < 2e-6
    bits = reference.mask_bits(mask)                       # the bits form reads the same mask
    assert rel_err(reference.tree_attention(q, k, v, prefix, bits, kv_len), exact) < 2e-6


@needs_triton
@pytest.mark.parametrize("seed", seeds(3))
def test_triton_tree_attention_fuzz(seed):
    """The default launch, window-bounded loads, a forced split-K with the in-kernel merge and (trees up to 7 deep)
    the row-invariant ordered path, each with NaN in every dead slot. Observed worst errors against float64 over
    70 random cases: fp32 3e-7, fp16 3e-4, bf16 5e-3 (the reference's own: 4e-7, 3e-4, 2e-3)."""
    q, k, v, prefix, mask, kv_len = attention_case(seed, [torch.float32, torch.bfloat16, torch.float16],
                                                   [16, 48, 64, 96, 128])
    N = q.shape[2]
    exact = reference.tree_attention(q.double(), k.double(), v.double(), prefix, mask, kv_len)
    k, v = poison_dead_slots(k, v, prefix, N)
    bits = reference.mask_bits(mask)
    outs = {"default": triton_ops.tree_attention(q, k, v, prefix, mask, kv_len),
            "window": triton_ta.tree_attention(q, k, v, prefix, bits, kv_len, window=True),
            "split": triton_ta.tree_attention(q, k, v, prefix, bits, kv_len, num_splits=3, block_n=16, merge="kernel")}
    if int(mask.sum(-1).max()) <= gpu_exact.MAX_DEPTH + 1:      # the row-invariant path takes trees up to 7 deep
        order = gpu_exact.layout(prefix, mask.expand(len(prefix), -1, -1))
        outs["ordered"] = triton_ops.tree_attention(q, k, v, prefix, order.bits, kv_len, order=order)
    for name, out in outs.items():
        assert out.shape == q.shape and out.dtype == q.dtype, name
        assert torch.isfinite(out).all(), name             # a dead slot's NaN reached a live row
        assert rel_err(out, exact) < TRITON_TOL[q.dtype], name


@needs_cpu
@pytest.mark.parametrize("seed", seeds(8))
def test_cpu_tree_attention_fuzz(seed):
    """Observed worst errors against float64 over 60 random cases (head dims 1..512): fp32 3e-7, bf16 2e-3."""
    q, k, v, prefix, mask, kv_len = attention_case(100 + seed, [torch.float32, torch.bfloat16],
                                                   [1, 8, 33, 64, 96, 128, 256])
    exact = reference.tree_attention(q.double(), k.double(), v.double(), prefix, mask, kv_len)
    k, v = poison_dead_slots(k, v, prefix, q.shape[2])
    with use_backend("cpu"):
        out = ops.tree_attention(q, k, v, prefix, reference.mask_bits(mask), kv_len)
    assert torch.isfinite(out).all()
    assert rel_err(out, exact) < TOL[q.dtype]


@needs_cpu
def test_a_previous_requests_nan_slots_stay_out_of_the_next_requests_logits():
    """Cache slots past a request's tokens keep the K/V of whatever ran before (the cache is reset by length only).
    Where an earlier request left non-finite K/V there (an overflowing forward), the kernel backends never let
    them into a later request's logits: they read each row's prefix and tree only. The torch reference's masked
    SDPA does (0 x NaN) over its bucketed window: that backend needs a finite cache."""
    from conftest import random_tiny_model
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import AttentionSpec, causal_mask
    model = random_tiny_model(seed=4, dim=64)            # head dim 16: Triton's smallest
    prompt = torch.tensor([[3, 4, 5, 6, 8, 9]])

    def prefill(cache):
        cache.reset()
        spec = AttentionSpec(torch.zeros(1, dtype=torch.long), causal_mask(6, "cpu"), 128)
        return model(prompt, torch.arange(6)[None], cache, spec)

    for be in ["cpu"] + (["triton"] if triton_ops is not None else []):
        with use_backend(be), torch.inference_mode():
            clean = prefill(KVCache.for_model(model.config, 1, 256, torch.float32, "cpu"))
            dirty = KVCache.for_model(model.config, 1, 256, torch.float32, "cpu")
            dirty.k[:, :, :, 6:], dirty.v[:, :, :, 6:] = float("nan"), float("inf")   # what a bad request left
            assert torch.equal(prefill(dirty), clean), be


# ---- row ops ------------------------------------------------------------------------------------------------
def _views(g, rows: int, d: int, dtype):
    """x as a plain tensor, a column slice, a transposed view and a strided row selection (d contiguous)."""
    return {"plain": _r(g, 2, rows, d, dtype=dtype, scale=3),
            "slice": _r(g, 2, rows, d + 7, dtype=dtype, scale=3)[..., 3:d + 3],
            "transposed": _r(g, rows, 2, d, dtype=dtype, scale=3).transpose(0, 1),
            "every-other": _r(g, 2, 2 * rows, d, dtype=dtype, scale=3)[:, ::2]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_ops_on_views_match_the_reference(dtype):
    """RMSNorm (alone, with a full or per-position residual), SwiGLU's activation and RoPE on every backend that
    takes them, on views the model hands over. Observed: fp32 <= 3e-7, bf16 <= 4e-3, fp16 <= 5e-4."""
    g = torch.Generator().manual_seed(7)
    d = 96
    backends = ["torch", "cpu"] + (["triton"] if triton_ops is not None else [])
    w = _r(g, d, dtype=dtype) + 1
    cfg = ModelConfig(vocab_size=8, dim=d, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=8)   # D = d / 2
    table = rope_table(cfg, 300)
    for name, x in _views(g, 5, d, dtype).items():
        res = {"full": _r(g, *x.shape, dtype=dtype), "per-position": _r(g, d, 5, dtype=dtype).T}   # the latter strided
        rows = table[torch.randint(0, 300, (2, 5), generator=g)]
        xr = x.reshape(2, 5, 2, d // 2)                                   # [B, T, H, D]: copies only if it must
        for be in backends:
            with use_backend(be):
                assert rel_err(ops.rmsnorm(x, w, 1e-5), reference.rmsnorm(x, w, 1e-5)) < TOL[dtype], (be, name)
                for rn, r in res.items():
                    s, y = ops.add_rmsnorm(x, r, w, 1e-5)
                    rs, ry = reference.add_rmsnorm(x, r, w, 1e-5)
                    assert rel_err(s, rs) < TOL[dtype] and rel_err(y, ry) < TOL[dtype], (be, name, rn)
                assert rel_err(ops.silu_mul(x), reference.silu_mul(x)) < TOL[dtype], (be, name)
                assert rel_err(ops.rope(xr, rows), reference.rope(xr, rows)) < TOL[dtype], (be, name)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_head_attention_reads_strided_norm_weights_and_position_embeddings(dtype):
    """The AEB attention on Triton took norm_w and pos_emb rows with unit stride whatever their strides: a strided
    norm weight or a transposed position table gave rel. error ~1 (silently). Now views are made contiguous first.
    Odd slot counts and head dims too; errors against float64 (observed fp32 3e-7, bf16 2e-2 in the interpreter,
    whose bf16 rounding truncates; the reference's own: 6e-3)."""
    g = torch.Generator().manual_seed(11)
    for N, K, d, heads in [(3, 4, 64, 2), (2, 7, 40, 5), (1, 64, 32, 1)]:
        z = _r(g, N, K, d, dtype=dtype)
        pos_t = _r(g, d, K, dtype=dtype).T                            # [K, d], column stride K
        norm_w = (_r(g, 2 * d, dtype=dtype) + 1)[::2]                 # [d], stride 2
        wqkv = _r(g, 3 * d, d, dtype=dtype, scale=d ** -0.5)
        exact = reference.head_attention(z.double(), pos_t.double(), norm_w.double(), 1e-5, wqkv.double(), heads)
        with use_backend("triton"):
            x, attn = ops.head_attention(z, pos_t, norm_w, 1e-5, wqkv, heads)
        assert rel_err(x, exact[0]) < TRITON_TOL[dtype], (N, K, d)
        assert rel_err(attn, exact[1]) < TRITON_TOL[dtype], (N, K, d)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_products_fuzz(dtype):
    """Few-row linear layers (bare and fused with the norm / SwiGLU before and the residual after) and the SAL
    fusion input, on odd sizes and views. Observed: fp32 <= 3e-7, fp16 <= 4e-4, bf16 <= 4e-3."""
    g = torch.Generator().manual_seed(13)
    rng = random.Random(13)
    for lead, K, N in [((1,), 33, 17), ((3,), 64, 200), ((2, 8), 48, 48), ((1, 1), 100, 30)]:
        x = _r(g, *lead, 2 * K, dtype=dtype)[..., rng.choice([0, K]):][..., :K]          # a column slice
        w = _r(g, N, K, dtype=dtype, scale=K ** -0.5)
        nw, res = _r(g, K, dtype=dtype) + 1, _r(g, *lead, N, dtype=dtype)
        assert rel_err(triton_ops.linear(x, w), reference.linear(x, w)) < TOL[dtype]
        for args in [(nw, 1e-5, False, res), (None, 0.0, False, res), (None, 0.0, True, None)]:
            xx = _r(g, *lead, 2 * K, dtype=dtype) if args[2] else x
            out = triton_ops.fused_linear(xx, w, *args)
            assert rel_err(out, reference.fused_linear(xx, w, *args)) < TOL[dtype], (lead, K, N, args[1:3])
        hidden = _r(g, K, *lead).movedim(0, -1)                         # [*lead, K], K not contiguous
        tokens = torch.randint(0, 50, lead, generator=g)
        emb, wf = _r(g, 50, K, dtype=dtype), _r(g, K, 2 * K, dtype=dtype, scale=(2 * K) ** -0.5)
        got = triton_ops.fused_sal_input(hidden, tokens.int(), emb, wf)
        assert rel_err(got, reference.fused_sal_input(hidden, tokens, emb, wf)) < TOL[dtype], (lead, K)


# ---- the cache ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", seeds(4))
def test_cache_writes_at_the_cache_edge_fuzz(seed):
    """RoPE + cache write and the bare cache write into the first or last layer, rows starting anywhere up to the
    cache's last slot (slots past it are dropped), B < B_max, shared or per-row rope rows, qkv as a view.
    fp32 bit for bit; bf16 / fp16 within a last-bit rounding in Triton's interpreter, bit for bit on the cpu."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    B, Hkv, G, D = rng.choice([1, 2, 3]), rng.choice([1, 3]), rng.choice([1, 4]), rng.choice([16, 64, 96])
    T, L = rng.choice([1, 5, 17]), rng.choice([1, 3])
    H, layer, S, B_max = Hkv * G, rng.choice([0, L - 1]), T + rng.choice([0, 1, 15]), B + rng.choice([0, 1])
    start = torch.tensor([rng.choice([0, 1, S - T, S - T + 1, S - 1]) for _ in range(B)])
    cfg = ModelConfig(vocab_size=8, dim=H * D, n_layers=1, n_heads=H, n_kv_heads=Hkv, intermediate_size=8)
    rows = rope_table(cfg, 600)[torch.randint(0, 600, (rng.choice([1, B]), T), generator=g)]
    qkv = _r(g, B, T, (H + 2 * Hkv) * D + 3, dtype=dtype)[..., 3:]
    k_new, v_new = _r(g, B, T, Hkv, D, dtype=dtype).transpose(1, 2), _r(g, B, Hkv, T, D, dtype=dtype)
    # the reference gets T spare slots past S to write into (it would raise on them); NaN marks "never written"
    rk = torch.full((L, B_max, Hkv, S + T, D), float("nan"), dtype=dtype)
    rv, rk2, rv2 = rk.clone(), rk.clone(), rk.clone()
    ref_q = reference.qkv_rope_write(qkv, rows, rk, rv, layer, start, H, Hkv)
    reference.kv_write(rk2, rv2, layer, start, k_new, v_new)
    refs = [t[..., :S, :] for t in (rk, rv)]
    backends = [("cpu", cpu_ops)] * (cpu_ops.load_extension() is not None) + [("triton", triton_ops)] * (
        triton_ops is not None)
    for name, mod in backends:
        kb = torch.full((L, B_max, Hkv, S, D), float("nan"), dtype=dtype)
        vb = kb.clone()
        q = mod.qkv_rope_write(qkv, rows, kb, vb, layer, start, H, Hkv)
        if q is NotImplemented:                             # fp16: the cpu kernels leave it to the reference
            continue
        exact = dtype == torch.float32 or name == "cpu"
        for got, want in [(q, ref_q), (kb, refs[0]), (vb, refs[1])]:
            assert torch.equal(got.isnan(), want.isnan()), name                 # nothing else written
            assert torch.equal(got.nan_to_num(), want.nan_to_num()) if exact else \
                rel_err(got.nan_to_num(), want.nan_to_num()) < TOL[dtype], name
    if triton_ops is not None:
        kb = torch.full((L, B_max, Hkv, S, D), float("nan"), dtype=dtype)
        vb = kb.clone()
        triton_ops.kv_write(kb, vb, layer, start, k_new, v_new)
        assert torch.equal(kb.nan_to_num(), rk2[..., :S, :].nan_to_num()) and torch.equal(kb.isnan(),
                                                                                          rk2[..., :S, :].isnan())
        assert torch.equal(vb.nan_to_num(), rv2[..., :S, :].nan_to_num())


@pytest.mark.parametrize("seed", seeds(4))
def test_kv_compact_fuzz(seed):
    """Overlapping moves, sources out of range (clamped), destinations up to the cache's last slot, on a cache with
    more rows than the batch; every backend equals the reference bit for bit."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    L, B, H, D, dtype = rng.choice([1, 3]), rng.choice([1, 2, 3]), 2, rng.choice([16, 96]), rng.choice(
        [torch.float32, torch.bfloat16, torch.float16])
    M, S = rng.choice([1, 3, 8]), rng.choice([20, 70])
    kb, vb = _r(g, L, B + 1, H, S, D, dtype=dtype), _r(g, L, B + 1, H, S, D, dtype=dtype)
    dst = torch.tensor([rng.choice([0, S - M, rng.randrange(S - M + 1)]) for _ in range(B)])   # no clamped overlap
    src = torch.tensor([[rng.choice([-2, int(d) + m + rng.choice([0, 1, 4]), S + 3, S - 1]) for m in range(M)]
                        for d in dst])
    rk, rv = kb.clone(), vb.clone()
    reference.kv_compact(rk, rv, src, dst)
    for mod in [cpu_ops] * (cpu_ops.load_extension() is not None) + [triton_ops] * (triton_ops is not None):
        k2, v2 = kb.clone(), vb.clone()
        assert mod.kv_compact(k2, v2, src, dst) is None, mod.BACKEND                      # the kernel ran
        assert torch.equal(k2, rk) and torch.equal(v2, rv), mod.BACKEND
        k2, v2 = kb.clone(), vb.clone()
        with use_backend(mod.BACKEND):
            ops.kv_compact(k2, v2, src.T.contiguous().T, dst)                             # src as a view
        assert torch.equal(k2, rk) and torch.equal(v2, rv), mod.BACKEND


def test_kv_compact_keeps_negative_destinations_inside_the_row():
    """dst_start's values are the caller's promise, but a kernel must not write outside the row it moves: the cpu
    and CUDA kernels clamp destinations to [0, S). Triton clamped them to S - 1 only, so dst_start = -2 wrote
    the previous batch row's last slots; the reference wrapped them around (Python indexing) to the row's end."""
    L, B, H, S, D = 2, 2, 1, 8, 4
    kb = torch.arange(L * B * H * S * D, dtype=torch.float32).view(L, B, H, S, D)
    src, dst = torch.tensor([[1, 2, 3], [5, 6, 7]]), torch.tensor([0, -2])
    want = kb.clone()
    want[:, 0, :, :3] = kb[:, 0, :, 1:4]
    want[:, 1, :, 0] = kb[:, 1, :, 7]                      # slots -2, -1, 0 -> 0: the last move wins
    mods = [reference] + [cpu_ops] * (cpu_ops.load_extension() is not None) + [triton_ops] * (triton_ops is not None)
    for mod in mods:
        k, v = kb.clone(), kb.clone() + 1
        mod.kv_compact(k, v, src, dst)
        assert torch.equal(k, want) and torch.equal(v, want + 1), mod.BACKEND


# ---- acceptance and trees ------------------------------------------------------------------------------------
def _random_paths(rng, n: int, topk: int, max_depth: int):
    paths, kids = [()], {(): 0}
    while len(paths) < n:
        p = rng.choice([p for p in paths if len(p) < max_depth and kids[p] < topk])
        c = p + (kids[p],)
        kids[p] += 1
        kids[c] = 0
        paths.append(c)
    return [list(p) for p in paths[1:]]


@pytest.mark.parametrize("seed", seeds(2))
def test_acceptance_fuzz(seed):
    """Greedy (triton, cpu) and typical (triton) acceptance on random static trees of 1..65 nodes and dynamic trees,
    vocabularies around Triton's 1024-wide chunks, rounded logits (ties), a NaN logit and a -inf row (greedy):
    the reference's integers exactly (and the same bonus draw for a seeded typical step)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        B, V = rng.choice([1, 2, 3]), rng.choice([2, 97, 1024, 1025])
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        if rng.random() < 0.5:
            N = rng.choice([1, 2, 17, 64, 65])
            tree = build_tree(_random_paths(rng, N, 10, rng.choice([3, 8])), topk=10)
            retrieve, parent = tree.retrieve if rng.random() < 0.5 else tree.retrieve[None], tree.parent.expand(B, -1)
        else:
            k = min(V, 10)
            N = rng.choice([n for n in (5, 16, 64) if n <= sum(k ** d for d in range(1, 6)) + 1])
            tree = dynamic_tree(torch.zeros(B, dtype=torch.long), torch.randn(B, 5, V, generator=g), N, topk=k)
            retrieve, parent = tree.retrieve, tree.parent
        logits = torch.randn(B, N, V, generator=g) * 3
        if rng.random() < 0.5:
            logits = logits.round()
        tokens = torch.randint(0, V, (B, N), generator=g)
        pred = logits.to(dtype).float().max(-1).indices
        for i in range(1, N):                              # most children are what their parent predicts
            take = torch.rand(B, generator=g) < 0.7
            tokens[:, i] = torch.where(take, pred.gather(1, parent[:, i:i + 1]).squeeze(1), tokens[:, i])
        logits = logits.to(dtype)
        if triton_ops is not None:
            temp = rng.choice([0.5, 1.0, 2.0])
            want = reference.typical_accept(tokens, logits, retrieve, temp, generator=torch.Generator().manual_seed(1))
            same_result(triton_ops.typical_accept(tokens, logits, retrieve, temp,
                                                  generator=torch.Generator().manual_seed(1)), want)
        logits[0, rng.randrange(N), rng.randrange(V)] = float("nan")
        logits[-1, rng.randrange(N)] = float("-inf")
        want = reference.greedy_accept(tokens, logits, retrieve)
        for mod in [cpu_ops] * (cpu_ops.load_extension() is not None) + [triton_ops] * (triton_ops is not None):
            got = mod.greedy_accept(tokens, logits, retrieve)
            if got is not NotImplemented:                  # fp16: the cpu kernel leaves it to the reference
                same_result(got, want)


@needs_cpu
@pytest.mark.parametrize("seed", seeds(4))
def test_cpu_dynamic_tree_fuzz(seed):
    """Node counts up to 80 (no ancestor bits past 64), top-k 1..10, tied and -inf scores: the same integers."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(8):
        B, K, k = rng.choice([1, 2, 4]), rng.choice([1, 2, 4, 5]), rng.choice([1, 2, 3, 10])
        N = rng.randint(2, min(sum(k ** d for d in range(1, K + 1)) + 1, 80))
        values = torch.randn(B, K, k, generator=g).log_softmax(-1)
        if rng.random() < 0.4:
            values = values.round()
        values[0, 0, -1] = float("-inf") if rng.random() < 0.3 else values[0, 0, -1]
        values = values.sort(-1, descending=True).values
        indices, root = torch.randint(0, 1000, (B, K, k), generator=g), torch.randint(0, 1000, (B,), generator=g)
        got, want = cpu_ops.dynamic_tree(root, values, indices, N), reference.dynamic_tree(root, values, indices, N)
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b), (B, K, k, N)


# ---- quantized products ---------------------------------------------------------------------------------
def _quant_layer(g, bits: int, N: int, K: int, bias: bool):
    lin = torch.nn.Linear(K, N, bias=bias)
    lin.weight.data = torch.randn(N, K, generator=g) * 0.05
    if bias:
        lin.bias.data = torch.randn(N, generator=g) * 0.1
    lin.__class__ = cpu_quant.Int4Linear if bits == 4 else cpu_quant.Int8Linear
    lin._quantize()
    return lin


def _dequantized(lin):
    if lin._packed_native.bits == 4:
        codes, s, z = cpu_ops.unpack(lin._packed_native)
        N, K = codes.shape
        return (codes.view(N, K // 32, 32) * s[..., None] + z[..., None]).view(N, K)
    codes, scale = cpu_ops.unpack(lin._packed_native)
    return codes.float() * scale[:, None]


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_on_views_fuzz(dtype):
    """4-bit and 8-bit products on both backends, row counts around the kernel's blocks, inputs as views: within
    their activation rounding of the float product of the dequantized weights (observed: cpu 5e-3 (int8 inputs),
    torch 3e-3 (bf16 inputs)). A transposed bf16 input reached torch's int4 / int8 kernels as is: they raised
    "expect A to be contiguous"."""
    g = torch.Generator().manual_seed(17)
    for bits, N, K, M in [(4, 64, 96, 1), (4, 16, 320, 5), (8, 100, 64, 17), (8, 48, 32, 64)]:
        lin = _quant_layer(g, bits, N, K, bias=bits == 8).to(dtype)
        w = _dequantized(lin).double()
        for x in (_r(g, M, 2 * K, dtype=dtype)[:, ::2], _r(g, K, M, dtype=dtype).T, _r(g, 2, M, K, dtype=dtype)):
            dense = torch.nn.functional.linear(x.double(), w, None if lin.bias is None else lin.bias.double())
            for be in ("cpu", "torch"):
                with use_backend(be), torch.inference_mode():
                    y = ops.quant_linear(x, lin)
                assert y.shape == dense.shape and y.dtype == dtype
                assert rel_err(y, dense) < 1.5e-2, (be, bits, N, K, M, tuple(x.stride()))


def test_heads_keep_float_layers_torchs_int4_product_cannot_take():
    """Drafting heads next to a 4-bit target went 4-bit wherever the input was a multiple of 32; torch's int4
    kernel (the reference, and the only one without the extension) also needs outputs in multiples of 16, so a
    24-wide layer raised a raw RuntimeError on its first product there. Such layers stay float, as
    quantize_linears already refuses them for the target."""
    m = torch.nn.Sequential(torch.nn.Linear(32, 24, bias=False), torch.nn.Linear(32, 32, bias=False))
    cpu_quant.quantize_heads(m)
    assert not cpu_quant.on_codes(m[0]) and cpu_quant.on_codes(m[1])
    x = torch.randn(2, 32)
    with use_backend("torch"), torch.inference_mode():
        assert m[0](x).shape == (2, 24)
        if cpu_ops.load_extension() is not None:
            assert rel_err(m[1](x), x @ _dequantized(m[1]).T) < 1e-2


# ---- what the ops refuse by name ------------------------------------------------------------------------
def test_mismatched_dtypes_are_named_not_raw_torch_errors():
    """q in another dtype than the cache, or an AEB projection in another dtype than its normed input: every
    backend raised SDPA's / matmul's own RuntimeError. Legal mixes (the norm weight promoting the input to the
    projection's dtype) still run."""
    q, kc = torch.randn(1, 4, 3, 64, dtype=torch.bfloat16), torch.randn(1, 2, 16, 64)
    bits = reference.mask_bits(torch.ones(1, 3, 3, dtype=torch.bool).tril())
    z, w = torch.randn(2, 3, 8), torch.randn(24, 8, dtype=torch.bfloat16)
    for be in ["torch", "cpu"] + (["triton"] if triton_ops is not None else []):
        with use_backend(be):
            with pytest.raises(ConfigError, match="tree_attention: q, k_cache and v_cache must share a dtype"):
                ops.tree_attention(q, kc, kc, torch.tensor([5]), bits, 8)
            with pytest.raises(ConfigError, match="head_attention: .*wqkv \\(torch.bfloat16\\)"):
                ops.head_attention(z, None, torch.ones(8), 1e-5, w, 2)
            x, attn = ops.head_attention(z.bfloat16(), None, torch.ones(8), 1e-5, w.float(), 2)
            assert attn.dtype == torch.float32 and attn.shape == (2, 3, 8)


def test_empty_inputs_give_empty_outputs_on_every_backend():
    """No new tokens (N = 0) for tree attention and no positions for the AEB attention: Triton's mask reshape and
    the reference's QKV view (a -1 beside a 0) raised raw RuntimeErrors; now each returns its empty result."""
    q, kc = torch.randn(1, 4, 0, 64), torch.randn(1, 2, 8, 64)
    z, w = torch.randn(0, 3, 8), torch.randn(24, 8)
    for be in ["torch", "cpu"] + (["triton"] if triton_ops is not None else []):
        with use_backend(be):
            out = ops.tree_attention(q, kc, kc, torch.tensor([3]), torch.zeros(1, 0, 0, dtype=torch.bool), 4)
            assert out.shape == (1, 4, 0, 64), be
            x, attn = ops.head_attention(z, torch.randn(3, 8), torch.ones(8), 1e-5, w, 2)
            assert x.shape == attn.shape == (0, 3, 8), be
