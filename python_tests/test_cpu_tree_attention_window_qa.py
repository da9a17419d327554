"""The cpu backend's tree attention takes a sliding window (ops.tree_attention(..., window=W, positions=...)): the
C++ kernel (csrc/cpu/tree_attention.h, whose `window` the 4-bit layer stack already used) places a new token at
prefix_len + its depth from the ancestor bits, which are the engine's positions; it declines other positions to the
reference. Past their window, the float-weight models' sliding layers on the cpu backend then run the kernel
(model.KernelWindow) instead of building a dense [B, T, kv_len] WindowMask and running SDPA in every sliding layer.

Before, cpu_ops.tree_attention declined every window and kernel_window returned None on the cpu backend."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.kernels import cpu_available, cpu_ops, ops, reference, use_backend

from kernel_checks import fresh_backend, gen, randn, rel_err, tree_bits  # noqa: F401  (autouse)

pytestmark = pytest.mark.skipif(not cpu_available(), reason="the CPU extension is not built")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# the window against row 0's prefix of 151: below it, equal, above it, and shorter than a 16-node tree's depth
WINDOWS = {"lt": 37, "eq": 151, "gt": 400, "tiny": 3}
# B, H, H_kv, N, D, tree kind: plain decoding (GQA 1), a 16-node tree (GQA 4), a 16-deep chain
CASES = [(2, 4, 4, 1, 64, "causal"), (2, 8, 2, 16, 128, "dynamic"), (1, 4, 1, 16, 256, "causal"),
         (2, 4, 1, 16, 64, "static")]




def _inputs(case, dtype, wname):
    B, H, Hkv, N, D, kind = case
    g = gen("cpu_tree_attention_window", case, str(dtype), wname)
    S = 240
    prefix = torch.tensor([151, 66, 90, 120, 30][:B])
    kv_len = 151 + N + 7
    k, v = randn(g, B, Hkv, S, D, dtype=dtype), randn(g, B, Hkv, S, D, dtype=dtype)
    q = randn(g, B, N, H, D, dtype=dtype).transpose(1, 2)              # the model's layout: a transposed view
    bits = tree_bits(kind, B, N, g)
    anc = reference.bits_to_mask(bits.reshape(-1, N), N)
    pos = prefix[:, None] + anc.sum(-1) - 1                                 # the engine's rule: prefix + depth
    return q, k, v, prefix, bits, pos, kv_len


def _reference(q, k, v, prefix, bits, kv_len, W, pos):
    with use_backend("torch"):
        return ops.tree_attention(q.float(), k.float(), v.float(), prefix, bits, kv_len, window=W, positions=pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("wname", list(WINDOWS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}N{c[3]}D{c[4]}-{c[5]}")
def test_cpu_window_matches_the_torch_reference(case, wname, dtype):
    q, k, v, prefix, bits, pos, kv_len = _inputs(case, dtype, wname)
    W = WINDOWS[wname]
    ref = _reference(q, k, v, prefix, bits, kv_len, W, pos)
    got = cpu_ops.tree_attention(q, k, v, prefix, bits, kv_len, window=W, positions=pos)
    assert got is not NotImplemented                    # the kernel ran, not the reference behind it
    assert got.dtype == dtype and rel_err(got, ref) < TOL[dtype]
    with use_backend("cpu"):
        assert rel_err(ops.tree_attention(q, k, v, prefix, bits, kv_len, window=W, positions=pos), ref) < TOL[dtype]
    # the window matters here: without it the result is another one
    if W < 151:
        assert rel_err(cpu_ops.tree_attention(q, k, v, prefix, bits, kv_len), ref) > 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_keys_below_the_window_are_never_read(dtype):
    """NaN in every prefix slot below the lowest window start: nothing of it reaches the output (a mask applied after
    the scores would give 0 * NaN), and the result is the one over clean keys."""
    case = CASES[1]
    q, k, v, prefix, bits, pos, kv_len = _inputs(case, dtype, "lt")
    W = WINDOWS["lt"]
    ref = _reference(q, k, v, prefix, bits, kv_len, W, pos)
    kp, vp = k.clone(), v.clone()
    for b in range(q.shape[0]):
        lowest = max(int(prefix[b]) - W + 1, 0)           # the root's window start: the lowest of its tree
        kp[b, :, :lowest], vp[b, :, :lowest] = float("nan"), float("nan")
    with use_backend("cpu"):
        got = ops.tree_attention(q, kp, vp, prefix, bits, kv_len, window=W, positions=pos)
    assert torch.isfinite(got).all() and rel_err(got, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_tree_node_equals_its_plain_step_bit_for_bit_past_the_window(dtype):
    """The kernel's promise (each token's keys summed in position order), kept with the window: a chain's node at
    depth d gives the bits a plain step gives at prefix P + d with its ancestors in the cache."""
    g = gen("cpu_window_plain_vs_tree", str(dtype))
    H, Hkv, N, D, S, P, W = 8, 2, 6, 64, 160, 100, 40
    k, v = randn(g, 1, Hkv, S, D, dtype=dtype), randn(g, 1, Hkv, S, D, dtype=dtype)
    q = randn(g, 1, N, H, D, dtype=dtype).transpose(1, 2)
    anc = torch.ones(N, N, dtype=torch.bool).tril()
    bits = reference.mask_bits(anc[None])
    pos = P + torch.arange(N)[None]
    tree = cpu_ops.tree_attention(q, k, v, torch.tensor([P]), bits, P + N, window=W, positions=pos)
    assert tree is not NotImplemented
    one = torch.ones(1, 1, dtype=torch.long)
    for d in range(N):
        plain = cpu_ops.tree_attention(q[:, :, d:d + 1], k, v, torch.tensor([P + d]), one, P + d + 1, window=W,
                                       positions=torch.tensor([[P + d]]))
        assert torch.equal(plain[:, :, 0], tree[:, :, d]), d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_vector_unit_variant_windows_alike(dtype):
    """The key tiles (16 keys under AVX-512, 8 under AVX2) start at the window's first slot, here 115, no multiple
    of either: every variant this CPU runs gives the same bits, and the reference's result."""
    ext = cpu_ops.load_extension()
    variants = ["avx512", "avx2", "baseline"]
    best = ext.isa()
    q, k, v, prefix, bits, pos, kv_len = _inputs(CASES[1], dtype, "lt")
    W = WINDOWS["lt"]
    ref = _reference(q, k, v, prefix, bits, kv_len, W, pos)
    outs = []
    try:
        for name in variants[variants.index(best):]:
            ext.use_isa(name)
            outs.append(cpu_ops.tree_attention(q, k, v, prefix, bits, kv_len, window=W, positions=pos))
            assert outs[-1] is not NotImplemented and rel_err(outs[-1], ref) < TOL[dtype], name
    finally:
        ext.use_isa(best)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.parametrize("B", [2, 5])            # 5 x 16 rows: the check's tensor form (past 64 it leaves lists)
def test_positions_other_than_prefix_plus_depth_are_declined(B):
    """The kernel reads positions off the ancestor bits: given others it would window the wrong keys, so it declines
    them and ops.tree_attention's reference windows by the explicit positions."""
    q, k, v, prefix, bits, pos, kv_len = _inputs((B,) + CASES[1][1:], torch.float32, "lt")
    W = WINDOWS["lt"]
    got = cpu_ops.tree_attention(q, k, v, prefix, bits, kv_len, window=W, positions=pos)
    assert got is not NotImplemented and rel_err(got, _reference(q, k, v, prefix, bits, kv_len, W, pos)) < 1e-5
    moved = pos.clone()
    moved[-1, -1] += 1                                      # one node of the last row
    for other in (pos + 5, pos[:1], moved):                 # shifted; row 0's positions for every row
        assert cpu_ops.tree_attention(q, k, v, prefix, bits, kv_len, window=W, positions=other) is NotImplemented
        with use_backend("cpu"):
            got = ops.tree_attention(q, k, v, prefix, bits, kv_len, window=W, positions=other)
        assert rel_err(got, _reference(q, k, v, prefix, bits, kv_len, W, other)) < TOL[torch.float32]


# ---- the models: a tiny Gemma 3 (sliding layers 0 and 2) and a tiny Mistral (every layer), window 8 ----------------
def _model_dir(family, tmp_path_factory):
    if family == "gemma3":
        from test_gemma3 import WINDOWED, write_gemma3
        return write_gemma3(tmp_path_factory.mktemp("gemma3") / "w", **WINDOWED)
    from test_sliding_window_families_qa import write_family
    return write_family(tmp_path_factory.mktemp(family) / "m", family)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_models_past_the_window_use_the_kernel_and_decode_as_torch(family, tmp_path_factory, monkeypatch):
    """Greedy answers past the window (a 20-token prompt, 40 tokens, window 8) on the cpu backend equal the torch
    backend's (WindowMask on SDPA), plain and speculative; on the cpu backend every decode and tree step past the
    window hands its sliding layers a KernelWindow, not a WindowMask."""
    import amphista_engine.model as model_mod
    from amphista_engine.engine import Engine
    from amphista_engine.heads import random_heads
    from model_helpers import plain_and_speculative

    monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", "0")       # fp32 steps unordered: the kernel's path, not cpu_exact
    d = _model_dir(family, tmp_path_factory)
    seen = []
    real = model_mod.kernel_window

    def spy(mask, cache, spec, positions, window, ordered):
        got = real(mask, cache, spec, positions, window, ordered)
        if cache is not None and window is not None and spec.kv_len > window and not isinstance(mask, str):
            seen.append((got, isinstance(mask, tuple) and mask[1] is None))     # (its result, ancestor bits?)
        return got

    monkeypatch.setattr(model_mod, "kernel_window", spy)
    answers = {}
    for name in ("torch", "cpu"):
        eng = Engine.from_pretrained(str(d), device="cpu", dtype="fp32", max_seq_len=256, backend=name, quant="none")
        eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
        seen.clear()
        answers[name] = plain_and_speculative(eng, [1, 17, 250, 3, 99, 42, 42, 7, 123, 5] * 2, 40)
        assert seen, "no step past the window"
        if name == "torch":                                         # a dense mask: the WindowMask on SDPA
            assert all(got is None for got, _ in seen)
        else:
            assert all(bits and isinstance(got, model_mod.KernelWindow) for got, bits in seen), seen
            assert any(got.bits.shape[-1] > 1 for got, _ in seen)  # tree steps too
    assert len(answers["cpu"][0]) == 40
    assert answers["cpu"] == answers["torch"]
    assert answers["cpu"][1] == answers["cpu"][0]
