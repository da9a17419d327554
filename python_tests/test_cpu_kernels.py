"""The `cpu` backend (csrc/cpu, amphista_engine._cpu) against the torch reference, and its place in the switch.

Inputs are fresh per case (seeded from the case), compared by relative error for the RMSNorm (its sum of squares
runs in another order than torch's) and bit for bit for RoPE + the cache write and for compaction (the same ops
in the same order). The property the CPU's exact speculative decoding rests on is tested directly: a row's
result is the same bits alone, inside a batch of rows, and with the rows split across threads.
"""
from __future__ import annotations

import os
import random
import shutil

import pytest
import torch

from amphista_engine.config import ModelConfig
from amphista_engine.kernels import backend, cpu_ops, ops, reference, use_backend
from amphista_engine.model import rope_table

from kernel_checks import TOL, accept_inputs, gen, rand_tree, rel_err, same_result


def _compiler_here() -> bool:
    return os.name == "posix" and any(shutil.which(c) for c in ("c++", "g++", "clang++"))


ext = cpu_ops.load_extension()
needs_ext = pytest.mark.skipif(ext is None, reason=f"CPU extension not built: {cpu_ops.extension_error()}")


def test_cpu_extension_is_built_where_a_compiler_exists():
    """`pip install -e .` builds _cpu wherever a C++ compiler exists; a silent skip would only show as a
    slowdown, so a machine with a compiler and without the module fails here."""
    if not _compiler_here() or os.environ.get("AMPHISTA_NO_CPU_EXT") == "1":
        pytest.skip("no C++ compiler here (or AMPHISTA_NO_CPU_EXT=1): the torch reference serves the CPU")
    assert ext is not None, cpu_ops.extension_error()


@needs_ext
def test_cpu_is_the_default_backend_on_the_cpu(monkeypatch):
    monkeypatch.delenv("AMPHISTA_BACKEND", raising=False)
    backend.clear_cache()
    try:
        assert backend.get_backend("cpu") == "cpu"
        assert backend.resolve("add_rmsnorm", "cpu") == "cpu"
        assert backend.resolve("qkv_rope_write", "cpu") == "cpu"
        assert backend.resolve("tree_attention", "cpu") == "cpu"
        assert backend.resolve("silu_mul", "cpu") == "torch"             # not in the cpu backend: the reference
        with use_backend("torch"):
            assert backend.resolve("add_rmsnorm", "cpu") == "torch"
        monkeypatch.setattr(backend, "cpu_available", lambda: False)    # not built: the reference
        backend.clear_cache()
        assert backend.get_backend("cpu") == "torch"
    finally:
        backend.clear_cache()


# ---- RMSNorm -------------------------------------------------------------------------------------------
NORM_CASES = [((1, 576), torch.float32), ((3, 5, 96), torch.float32), ((7, 577), torch.bfloat16),
              ((2, 3, 64), torch.bfloat16), ((1, 1, 15), torch.float32)]


@needs_ext
@pytest.mark.parametrize("shape,dtype", NORM_CASES, ids=lambda c: str(c))
def test_rmsnorm_and_add_match_the_reference(shape, dtype):
    g = gen("cpu_rmsnorm", shape, dtype)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    res = torch.randn(*shape, generator=g).to(dtype)
    w = (torch.randn(shape[-1], generator=g) + 1).to(dtype)
    y = cpu_ops.rmsnorm(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape and not y.isnan().any()
    assert rel_err(y, reference.rmsnorm(x, w, 1e-5)) < TOL[dtype]
    s, y = cpu_ops.add_rmsnorm(x, res, w, 1e-5)
    rs, ry = reference.add_rmsnorm(x, res, w, 1e-5)
    assert torch.equal(s, rs)                               # the add rounds once to the dtype, as torch's
    assert rel_err(y, ry) < TOL[dtype]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_the_same_bits_alone_in_a_batch_and_across_threads(dtype):
    g = gen("cpu_row_invariance", dtype)
    d = 576
    x, res = torch.randn(16, d, generator=g).to(dtype), torch.randn(16, d, generator=g).to(dtype)
    w = (torch.randn(d, generator=g) + 1).to(dtype)
    s, y = cpu_ops.add_rmsnorm(x, res, w, 1e-5)
    for i in (0, 5, 15):
        si, yi = cpu_ops.add_rmsnorm(x[i:i + 1], res[i:i + 1], w, 1e-5)
        assert torch.equal(si[0], s[i]) and torch.equal(yi[0], y[i])
    # big enough to be split across threads (csrc/cpu/common.h: parallel_rows): the same bits as one thread
    big = torch.randn(4096, d, generator=g).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ops.rmsnorm(big, w, 1e-5)
        torch.set_num_threads(3)
        assert torch.equal(cpu_ops.rmsnorm(big, w, 1e-5), one)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[7], cpu_ops.rmsnorm(big[7:8], w, 1e-5)[0])


@needs_ext
def test_norms_decline_what_they_cannot_take():
    x, w = torch.randn(3, 8), torch.ones(8)
    assert cpu_ops.rmsnorm(x.half(), w.half(), 1e-5) is NotImplemented          # fp16: the reference
    assert cpu_ops.rmsnorm(x.T.contiguous().T, w, 1e-5) is NotImplemented        # not contiguous
    assert cpu_ops.rmsnorm(x, w.double(), 1e-5) is NotImplemented
    x3 = torch.randn(2, 3, 8)
    assert cpu_ops.add_rmsnorm(x3, x, w, 1e-5) is NotImplemented                 # residual broadcast
    with use_backend("cpu"):                                # declined: the reference runs instead
        s, y = ops.add_rmsnorm(x3, x, w, 1e-5)
    rs, ry = reference.add_rmsnorm(x3, x, w, 1e-5)
    assert torch.equal(s, rs) and torch.equal(y, ry)


# ---- RoPE + cache write --------------------------------------------------------------------------------
# B, T, H, H_kv, D, dtype, rope rows shared by the batch, start per row, B_max
QKV_CASES = [
    (1, 1, 9, 3, 64, torch.float32, False, [17], 1),        # SmolLM2's plain decoding step
    (2, 5, 8, 2, 128, torch.bfloat16, False, [3, 11], 3),   # GQA 4, D = 128, rows at different lengths
    (2, 1, 8, 1, 64, torch.bfloat16, True, [0, 20], 2),     # GQA 8, one rope row for the batch
    (1, 64, 4, 4, 32, torch.float32, True, [0], 1),         # a 64-node tree
    (2, 5, 4, 1, 64, torch.float32, False, [5, 22], 2),     # row 1 runs past S = 24: slots 24..26 dropped
]


@needs_ext
@pytest.mark.parametrize("case", QKV_CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}kv{c[3]}D{c[4]}"
                                                           f"-{str(c[5])[6:]}{'-shared' * c[6]}")
def test_qkv_rope_write_equals_the_reference_bit_for_bit(case):
    B, T, H, Hkv, D, dtype, shared, start, B_max = case
    g = gen("cpu_qkv_rope_write", case)
    L, S, layer = 2, 24, 1
    cfg = ModelConfig(vocab_size=8, dim=H * D, n_layers=1, n_heads=H, n_kv_heads=Hkv, intermediate_size=8,
                      rope_theta=500000.0)
    table = rope_table(cfg, 300)
    rows = table[torch.randint(0, 300, (1 if shared else B, T), generator=g)]      # explicit positions
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D + 3, generator=g).to(dtype)[..., 3:]  # a view: strided rows
    start = torch.tensor(start)
    # the reference has T spare slots past S to write into; the kernel's cache has S (it drops the rest)
    rk = torch.full((L, B_max, Hkv, S + T, D), float("nan"), dtype=dtype)
    rv = rk.clone()
    kb, vb = rk[..., :S, :].clone(), rv[..., :S, :].clone()
    ref_q = reference.qkv_rope_write(qkv, rows, rk, rv, layer, start, H, Hkv)
    q = cpu_ops.qkv_rope_write(qkv, rows, kb, vb, layer, start, H, Hkv)
    assert q.shape == (B, T, H, D) and q.dtype == dtype and q.is_contiguous()
    assert torch.equal(q, ref_q)
    rk, rv = rk[..., :S, :], rv[..., :S, :]
    assert torch.equal(kb.isnan(), rk.isnan()) and torch.equal(vb.isnan(), rv.isnan())   # nothing else written
    assert torch.equal(kb.nan_to_num(), rk.nan_to_num()) and torch.equal(vb.nan_to_num(), rv.nan_to_num())
    assert int((~kb[layer, :B].isnan()).any(-1).sum()) == sum(min(T, S - s) for s in start.tolist()) * Hkv


@needs_ext
def test_qkv_rope_write_declines_what_it_cannot_take():
    g = gen("cpu_qkv_declines")
    B, T, H, Hkv, D = 2, 3, 4, 2, 64
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g)
    rows = torch.randn(B, T, D, generator=g)
    kb, vb = torch.zeros(1, 2, Hkv, 16, D), torch.zeros(1, 2, Hkv, 16, D)
    start = torch.tensor([1, 4])
    assert cpu_ops.qkv_rope_write(qkv.bfloat16(), rows, kb, vb, 0, start, H, Hkv) is NotImplemented   # dtypes
    assert cpu_ops.qkv_rope_write(qkv, rows, kb, vb, 0, start, H + 1, Hkv) is NotImplemented         # widths
    assert cpu_ops.qkv_rope_write(qkv, rows, kb[:, :1], vb[:, :1], 0, start, H, Hkv) is NotImplemented  # B_max
    assert cpu_ops.qkv_rope_write(qkv, rows, kb, vb, 1, start, H, Hkv) is NotImplemented             # layer
    assert cpu_ops.qkv_rope_write(qkv, rows.bfloat16(), kb, vb, 0, start, H, Hkv) is NotImplemented
    assert cpu_ops.qkv_rope_write(qkv, rows, kb, vb, 0, start.int(), H, Hkv) is NotImplemented
    with use_backend("cpu"):                                # declined: the reference runs instead
        q = ops.qkv_rope_write(qkv, rows.bfloat16(), kb, vb, 0, start, H, Hkv)
    ek, ev = torch.zeros_like(kb), torch.zeros_like(vb)
    assert torch.equal(q, reference.qkv_rope_write(qkv, rows.bfloat16(), ek, ev, 0, start, H, Hkv))
    assert torch.equal(kb, ek) and torch.equal(vb, ev)


# ---- compaction ----------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_compact_equals_the_reference(dtype):
    g = gen("cpu_kv_compact", dtype)
    L, B_max, H, S, D = 3, 3, 2, 40, 16
    kb = torch.randn(L, B_max, H, S, D, generator=g).to(dtype)
    vb = torch.randn(L, B_max, H, S, D, generator=g).to(dtype)
    # row 0: a path right after its destination (overlapping moves); row 1: sources out of range and a
    # destination running past S (clamped, as the reference clamps)
    src = torch.tensor([[11, 12, 14, 19], [-3, 7, 45, 39]])
    dst = torch.tensor([10, 38])
    rk, rv = kb.clone(), vb.clone()
    reference.kv_compact(rk, rv, src, dst)
    cpu_ops.kv_compact(kb, vb, src, dst)
    assert torch.equal(kb, rk) and torch.equal(vb, rv)      # moved slots right, every other slot untouched


# ---- attention -----------------------------------------------------------------------------------------
# B, H, H_kv, N, D, dtype, mask kind, prefix lengths
ATTN_CASES = [
    (1, 9, 3, 1, 64, torch.float32, "tree", [300]),         # SmolLM2's plain decoding step
    (2, 8, 2, 5, 128, torch.bfloat16, "tree", [3, 40]),     # GQA 4, D = 128, odd N, rows at different lengths
    (1, 4, 4, 64, 32, torch.float32, "tree", [17]),         # 64 nodes (bit 63: a negative int64), D = 32
    (2, 8, 1, 7, 64, torch.bfloat16, "causal", [0, 9]),     # a prefill-like causal block, GQA 8, empty prefix
    (1, 6, 3, 16, 48, torch.float32, "bool", [100]),        # a bool mask (turned into bits), D = 48
]


@needs_ext
@pytest.mark.parametrize("case", ATTN_CASES,
                         ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}N{c[3]}D{c[4]}-{str(c[5])[6:]}-{c[6]}")
def test_tree_attention_matches_the_reference(case):
    B, H, Hkv, N, D, dtype, kind, prefix = case
    g = gen("cpu_tree_attention", case)
    rng = random.Random(str(case))
    S = max(prefix) + N + 5
    K, V = torch.randn(B, Hkv, S, D, generator=g).to(dtype), torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    q = torch.randn(B, N, H, D, generator=g).to(dtype).transpose(1, 2)       # a transposed view, as the model's
    if kind == "causal":
        mask = torch.ones(N, N, dtype=torch.bool).tril()[None]
    else:
        mask = torch.stack([rand_tree(N, 6, rng) for _ in range(B)])
    pl = torch.tensor(prefix)
    new_mask = mask if kind == "bool" else reference.mask_bits(mask)
    out = cpu_ops.tree_attention(q, K, V, pl, new_mask, S)
    ref = reference.tree_attention(q.float(), K.float(), V.float(), pl, mask, S)
    assert out.shape == (B, H, N, D) and out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


@needs_ext
@pytest.mark.parametrize("dtype,D", [(torch.float32, 64), (torch.bfloat16, 128), (torch.float32, 48)])
def test_tree_attention_row_without_keys_is_zero(dtype, D):
    """A query row whose mask admits no key (prefix 0, its own bit cleared) gets zeros, as the reference (SDPA)
    gives, not 0 * (1 / 0) = NaN; the row beside it with a prefix keeps its attention."""
    g = gen("cpu_tree_attention_no_keys", dtype, D)
    B, H, Hkv, N = 2, 4, 2, 4
    K, V = torch.randn(B, Hkv, 48, D, generator=g).to(dtype), torch.randn(B, Hkv, 48, D, generator=g).to(dtype)
    q = torch.randn(B, N, H, D, generator=g).to(dtype).transpose(1, 2)
    mask = torch.ones(N, N, dtype=torch.bool).tril()[None].repeat(B, 1, 1)
    mask[:, 0] = False                                      # node 0: no key in row 0, only the prefix in row 1
    pl = torch.tensor([0, 37])
    out = cpu_ops.tree_attention(q, K, V, pl, reference.mask_bits(mask), 37 + N)
    ref = reference.tree_attention(q.float(), K.float(), V.float(), pl, mask, 37 + N)
    assert (ref[0, :, 0] == 0).all() and ref[1, :, 0].abs().sum() > 0
    assert torch.isfinite(out).all() and (out[0, :, 0] == 0).all()
    assert rel_err(out, ref) < TOL[dtype]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_tree_attention_rows_equal_plain_rows_bit_for_bit(seed, dtype):
    """Each node's output equals plain decoding of that node with its ancestors moved to contiguous slots after
    the prefix (another key count and slot layout, one query row): the keys are summed in position order."""
    rng = random.Random(seed)
    g = gen("cpu_tree_rows", seed, dtype)
    H, Hkv, D, S = 9, 3, 64, 1100
    N = [5, 16, 33, 64][seed]
    c = rng.choice([1, 40, 530, 1000 - N])
    m = rand_tree(N, rng.randint(1, 7), rng)
    K, V = torch.randn(1, Hkv, S, D, generator=g).to(dtype), torch.randn(1, Hkv, S, D, generator=g).to(dtype)
    q = torch.randn(1, H, N, D, generator=g).to(dtype)
    pl = torch.tensor([c])
    out = cpu_ops.tree_attention(q, K, V, pl, reference.mask_bits(m[None]), c + N)
    threads = torch.get_num_threads()
    try:   # 3 KV heads on 2 or 4 threads: query rows in contiguous runs across threads (tree_attention.h); on 3: heads
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            assert torch.equal(cpu_ops.tree_attention(q, K, V, pl, reference.mask_bits(m[None]), c + N), out), t
    finally:
        torch.set_num_threads(threads)
    for i in rng.sample(range(N), min(N, 8)):
        anc = m[i].nonzero().flatten()
        K1, V1 = K.clone(), V.clone()
        K1[:, :, c:c + len(anc)], V1[:, :, c:c + len(anc)] = K[:, :, c + anc], V[:, :, c + anc]
        p = c + len(anc) - 1
        alone = cpu_ops.tree_attention(q[:, :, i:i + 1], K1, V1, torch.tensor([p]), torch.ones(1, 1, dtype=torch.long),
                                       p + 1)
        assert torch.equal(alone[0, :, 0], out[0, :, i]), f"node {i} (depth {len(anc) - 1}, prefix {c})"
    # and the same rows in a batch of two, the other row elsewhere: unchanged
    K2, V2 = torch.cat([K, K.flip(2)]), torch.cat([V, V.flip(2)])
    both = cpu_ops.tree_attention(torch.cat([q, q]), K2, V2, torch.tensor([c, 7]), reference.mask_bits(m[None]), c + N)
    assert torch.equal(both[0], out[0])


@needs_ext
def test_tree_attention_declines_what_it_cannot_take():
    q, K = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 16, 64)
    pl, bits = torch.tensor([5]), reference.mask_bits(torch.ones(3, 3, dtype=torch.bool).tril()[None])
    assert cpu_ops.tree_attention(q.half(), K.half(), K.half(), pl, bits, 8) is NotImplemented       # fp16
    assert cpu_ops.tree_attention(q, K, K.bfloat16(), pl, bits, 8) is NotImplemented                # mixed
    assert cpu_ops.tree_attention(q, K.transpose(2, 3), K, pl, bits, 8) is NotImplemented           # layout
    assert cpu_ops.tree_attention(q, K, K, pl.int(), bits, 8) is NotImplemented
    big = torch.ones(1, 65, 65, dtype=torch.bool).tril()                # > 64 nodes: no bits, the reference
    assert cpu_ops.tree_attention(torch.randn(1, 4, 65, 64), torch.randn(1, 2, 80, 64), torch.randn(1, 2, 80, 64),
                                  pl, big, 80) is NotImplemented
    # what the binding refuses but the reference computes: declined, so a chosen backend never raises for it
    assert cpu_ops.tree_attention(q, K, K, pl, bits, 8, scale=-0.1) is NotImplemented
    assert cpu_ops.tree_attention(q, K, K, pl, bits, 8, scale=float("nan")) is NotImplemented
    wide_q, wide_k = torch.randn(1, 4, 3, 520), torch.randn(1, 2, 16, 520)
    assert cpu_ops.tree_attention(wide_q, wide_k, wide_k, pl, bits, 8) is NotImplemented
    with use_backend("cpu"):
        got = ops.tree_attention(wide_q, wide_k, wide_k, pl, bits, 8)
    assert rel_err(got, reference.tree_attention(wide_q, wide_k, wide_k, pl, bits, 8)) == 0


def test_tree_attention_arguments_are_checked_on_the_host():
    """A window past the cache, or a prefix_len of the wrong kind, is refused by name on every backend before a
    kernel runs (the triton kernel would read past the buffer, the cpu one clamp the prefix: both silently)."""
    from amphista_engine.errors import AmphistaError
    q, K = torch.randn(2, 4, 3, 64), torch.randn(3, 2, 32, 64)          # the cache may hold more rows than B
    pl, bits = torch.tensor([5, 9]), reference.mask_bits(torch.ones(3, 3, dtype=torch.bool).tril()[None])
    for be in ("torch", "cpu"):
        with use_backend(be):
            assert ops.tree_attention(q, K, K, pl, bits, 16).shape == (2, 4, 3, 64)
            for bad, what in (((q, K, K, pl, bits, 33), "kv_len"), ((q, K, K, pl, bits, 2), "kv_len"),
                              ((q, K, K, pl.float(), bits, 16), "prefix_len"),
                              ((q, K, K, pl[:1], bits, 16), "prefix_len"),
                              ((q, K, K[:, :, :16], pl, bits, 16), "shape"),
                              ((torch.randn(2, 3, 3, 64), K, K, pl, bits, 16), "multiple of H_kv")):
                with pytest.raises(AmphistaError, match=what):
                    ops.tree_attention(*bad)


# ---- vector-unit variants ------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_vector_unit_variant_gives_the_same_bits(dtype):
    """The AVX-512, AVX2 and baseline variants run the same operations in the same order, only wider: every op
    returns the same bits under each variant this CPU can run (so a machine's results do not depend on which
    one it picked, and the variants a CI machine does not pick by itself still run here)."""
    g = gen("cpu_isa", dtype)
    variants = ["avx512", "avx2", "baseline"]
    best = ext.isa()
    runnable = variants[variants.index(best):]
    x, res = torch.randn(7, 577, generator=g).to(dtype), torch.randn(7, 577, generator=g).to(dtype)
    w = torch.randn(577, generator=g).to(dtype)
    qkv = torch.randn(2, 3, (8 + 2 * 2) * 64, generator=g).to(dtype)
    rope = torch.randn(2, 3, 64, generator=g)
    m = rand_tree(9, 4, random.Random(0))
    q = torch.randn(1, 8, 9, 64, generator=g).to(dtype)
    K, V = torch.randn(1, 2, 300, 64, generator=g).to(dtype), torch.randn(1, 2, 300, 64, generator=g).to(dtype)
    q128 = torch.randn(1, 4, 9, 128, generator=g).to(dtype)
    K128, V128 = (torch.randn(1, 1, 60, 128, generator=g).to(dtype) for _ in range(2))

    def run_all():
        kb = torch.zeros(1, 2, 2, 16, 64, dtype=dtype)
        vb = torch.zeros_like(kb)
        qo = cpu_ops.qkv_rope_write(qkv, rope, kb, vb, 0, torch.tensor([1, 5]), 8, 2)
        att = cpu_ops.tree_attention(q, K, V, torch.tensor([250]), reference.mask_bits(m[None]), 259)
        att128 = cpu_ops.tree_attention(q128, K128, V128, torch.tensor([37]), reference.mask_bits(m[None]), 46)
        return (cpu_ops.rmsnorm(x, w, 1e-5), *cpu_ops.add_rmsnorm(x, res, w, 1e-5), qo, kb, vb, att, att128)

    try:
        outs = {}
        for v in runnable:
            ext.use_isa(v)
            assert ext.isa() == v
            outs[v] = run_all()
        for v in runnable[1:]:
            for a, b in zip(outs[runnable[0]], outs[v]):
                assert torch.equal(a, b), (runnable[0], v)
    finally:
        ext.use_isa(best)
    with pytest.raises(ValueError, match="argument 'name'"):
        ext.use_isa("avx1024")


# ---- the binding's own checks --------------------------------------------------------------------------
@needs_ext
def test_bindings_name_a_bad_argument():
    x, w, out = torch.randn(2, 8), torch.ones(8), torch.empty(2, 8)
    with pytest.raises(ValueError, match="argument 'x'"):
        ext.rmsnorm(0, 0, w.data_ptr(), 0, out.data_ptr(), 2, 8, 1e-5, 0, 1)
    with pytest.raises(ValueError, match="argument 'dtype'"):
        ext.rmsnorm(x.data_ptr(), 0, w.data_ptr(), 0, out.data_ptr(), 2, 8, 1e-5, 1, 1)
    with pytest.raises(ValueError, match="argument 'rows'"):
        ext.rmsnorm(x.data_ptr(), 0, w.data_ptr(), 0, out.data_ptr(), -2, 8, 1e-5, 0, 1)
    with pytest.raises(ValueError, match="argument 'threads'"):
        ext.rmsnorm(x.data_ptr(), 0, w.data_ptr(), 0, out.data_ptr(), 2, 8, 1e-5, 0, 0)
    with pytest.raises(ValueError, match="argument 'elem_size'"):
        ext.kv_compact(x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(), 1, 1, 1, 1, 1, 1, 1, 8, 1)


# ---- end to end ----------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_logits_close_to_the_torch_backend(dtype):
    """A tiny model's prefill and a tree-verification forward on both backends: the same logits up to the
    RMSNorm's summation order."""
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import AttentionSpec, Transformer, causal_mask

    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96)
    torch.manual_seed(0)
    model = Transformer(cfg, max_seq_len=64).to(dtype).eval()
    tokens = torch.randint(0, 64, (1, 12))
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)[None]
    out = {}
    for name in ("torch", "cpu"):
        cache = KVCache.for_model(cfg, 1, 64, dtype, "cpu")
        with torch.no_grad(), use_backend(name):
            spec = AttentionSpec(torch.zeros(1, dtype=torch.long), causal_mask(8, "cpu"), 8)
            pre = model(tokens[:, :8], torch.arange(8)[None], cache, spec)
            spec = AttentionSpec(torch.full((1,), 8), mask, 12, decode=True)
            tree = model(tokens[:, 8:], torch.tensor([[8, 9, 9, 10]]), cache, spec)
        out[name] = (pre, tree)
    for a, b in zip(out["torch"], out["cpu"]):
        assert rel_err(b, a) < 5 * TOL[dtype]


# ---- acceptance ----------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("kind,B,V,dtype", [("static", 2, 300, torch.float32), ("dynamic", 3, 77, torch.bfloat16),
                                            ("chain", 2, 2000, torch.float32), ("static", 1, 4099, torch.bfloat16)])
def test_greedy_accept_equals_the_reference(kind, B, V, dtype, poisoned):
    tokens, logits, retrieve = accept_inputs(kind, B, V, gen("cpu_greedy", kind, B, V))
    logits = logits.to(dtype)
    res = cpu_ops.greedy_accept(tokens, logits, retrieve)
    assert res is not NotImplemented
    same_result(res, reference.greedy_accept(tokens, logits, retrieve))


@needs_ext
def test_greedy_accept_breaks_ties_and_nans_as_torch_does():
    """The first maximum on ties, a NaN over any number, every entry -inf: index 0 (torch's max(dim) on the CPU,
    which plain decoding uses); and declines what the reference should reject."""
    x = torch.randn(3, 4, 1000, generator=gen("cpu_ties"))
    x[0, 1, 500] = float("nan")
    x[1, 2] = float("-inf")
    x[2, 0, 7] = x[2, 0, 900] = 1e9
    tokens = torch.zeros(3, 4, dtype=torch.long)
    tokens[2, 1] = 7
    paths = torch.tensor([[0, 1, 2, 3], [0, 2, -1, -1]])
    res = cpu_ops.greedy_accept(tokens, x, paths)
    same_result(res, reference.greedy_accept(tokens, x, paths))
    assert int(res.accept_len[2]) >= 1
    assert cpu_ops.greedy_accept(tokens, x, torch.tensor([[0, 1, 9, -1]])) is NotImplemented      # node 9 of 4
    assert cpu_ops.greedy_accept(tokens, x.half(), paths) is NotImplemented


@needs_ext
@pytest.mark.parametrize("B,K,k,N,ties", [(1, 4, 10, 4, False), (2, 4, 10, 8, True), (3, 5, 10, 64, True),
                                          (2, 3, 4, 40, True), (1, 4, 12, 80, False), (2, 1, 6, 5, True)])
def test_dynamic_tree_equals_the_reference(B, K, k, N, ties):
    """Every buffer the same integers as the torch ops build, ties included (scores rounded to a few values, so
    sums collide and the stable sorts decide), with -inf ranks and past 64 nodes (no bits)."""
    g = gen("cpu_dynamic_tree", B, K, k, N)
    values = torch.randn(B, K, k, generator=g)
    if ties:
        values = (values * 2).round() / 2
        values[0, -1, -2:] = float("-inf")
    values = values.sort(dim=-1, descending=True).values
    indices = torch.randint(0, 1000, (B, K, k), generator=g)
    root = torch.randint(0, 1000, (B,), generator=g)
    got = cpu_ops.dynamic_tree(root, values, indices, N)
    want = reference.dynamic_tree(root, values, indices, N)
    assert got is not NotImplemented
    for name, a, b in zip(("tokens", "depth", "parent", "rank", "bits", "mask", "retrieve"), got, want):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
    values[0, 0, 0] = float("nan")                 # the reference's sort orders NaN: declined
    assert cpu_ops.dynamic_tree(root, values, indices, N) is NotImplemented


@pytest.mark.parametrize("be", ["torch", "cpu"])
def test_dynamic_tree_op_refuses_more_nodes_than_the_heads_hold(be):
    """1 head x top-10 holds 11 nodes: asking ops.dynamic_tree for 12 is a ConfigError on every backend (the cpu
    kernel sized its buffers by num_nodes and wrote past them)."""
    from amphista_engine.errors import ConfigError
    values = torch.randn(1, 1, 10).sort(dim=-1, descending=True).values
    indices, root = torch.arange(10).view(1, 1, 10), torch.tensor([3])
    with use_backend(be):
        assert ops.dynamic_tree(root, values, indices, 11)[0].shape == (1, 11)
        for n in (12, 16, 1):
            with pytest.raises(ConfigError, match=f"dynamic tree of {n} nodes impossible with 1 heads x top-10"):
                ops.dynamic_tree(root, values, indices, n)
