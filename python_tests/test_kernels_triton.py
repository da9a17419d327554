"""Every Triton kernel against the torch reference, the backend switch, and the kernel benchmarks' smoke run.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before triton is
imported), which is slow: shapes are small and each kernel gets a few cases that cover its edges (N = 1,
N = 64, odd lengths, GQA 1/4/8, head dims 64/128, fp32/bf16, split-K on and off).

Inputs are fresh per case (the generator is seeded from the test name and the case), outputs are poisoned
before the kernel runs (fresh buffers NaN / sentinel-filled, cache slots the kernel must not read hold NaN or
large values), and results are compared by relative error ||out - ref|| / ||ref|| under a per-dtype
tolerance, or exactly for integer / copy kernels. bf16 tolerance note: the interpreter (Triton 3.x) rounds
fp32 -> bf16 by truncation, the GPU to nearest, so bf16 results may differ from torch by one ulp.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is imported anywhere

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from amphista_engine.errors import AmphistaError, ConfigError
from amphista_engine.kernels import backend, get_backend, ops, reference, set_backend, split_merge, use_backend
from amphista_engine.model import rope_table
from amphista_engine.config import ModelConfig
from amphista_engine.tree import build_tree, dynamic_tree

from kernel_checks import (DEV, TOL, accept_inputs, check_kv_compact, check_verify_step, gen, randn, rel_err,
                           rope_inputs, same_result)
from kernel_checks import tree_bits as _tree_bits

triton = pytest.importorskip("triton")
from amphista_engine.kernels import triton_ops  # noqa: E402  (imports triton)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_backend():
    set_backend(None)
    backend.clear_cache()


@pytest.fixture
def position_invariant_dot(monkeypatch):
    """The interpreter runs tl.dot as numpy's matmul, i.e. BLAS. OpenBLAS's AVX2 (Haswell) sgemm kernels sum a
    row's products in an order that depends on the row's place in the tile (tail rows take other kernels), which
    a GPU's MMA does not; on AVX-512 machines the two happened to agree. The row-invariance tests compare a tree
    node at row i with a plain step at row 0, so in the interpreter they emulate tl.dot with einsum's loops, whose
    order over k is the same for every output element. The kernels' own layout and split choices stay under test:
    a different split count or summation order between the two calls still shows."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield           # on a GPU, tl.dot is the MMA itself: nothing to emulate (a bare return fails the fixture)
        return
    import numpy as np
    from triton.runtime import interpreter

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:     # fp8: not used here
            raise NotImplementedError("position_invariant_dot: fp8 operands")
        acc = d.data.dtype
        out = np.einsum("...mk,...kn->...mn", a.data.astype(acc), b.data.astype(acc), optimize=False)
        return interpreter.TensorHandle(out + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    yield
    set_backend(None)
    backend.clear_cache()


# ---- tree attention ------------------------------------------------------------------------------------
# B, H, H_kv, N, D, dtype, splits (None = heuristic), mask kind
ATTN_CASES = [
    (1, 4, 4, 1, 64, torch.float32, None, "causal"),        # plain decoding, MHA
    (2, 8, 2, 5, 128, torch.bfloat16, 3, "dynamic"),        # GQA 4, odd N, per-row trees, 3 splits
    (1, 8, 1, 64, 64, torch.float32, 2, "static"),          # GQA 8, N = 64 (bit 63 set: negative int64)
    (2, 4, 4, 17, 128, torch.bfloat16, 1, "dynamic"),       # odd N, D = 128, single pass
    (2, 4, 1, 7, 64, torch.bfloat16, None, "causal"),       # prefill-like causal block, GQA 4
    (1, 8, 2, 64, 128, torch.float16, None, "static"),      # fp16, the 64-node tree, GQA 4, D = 128
    (2, 16, 2, 1, 128, torch.bfloat16, 4, "causal"),        # Llama-3-style decoding: GQA 8, 4 splits
]


@pytest.mark.parametrize("window", [False, True], ids=["prefix-loads", "window-loads"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}N{c[3]}D{c[4]}"
                                                             f"-{str(c[5])[6:]}-s{c[6]}-{c[7]}")
def test_tree_attention(case, window, poisoned):
    B, H, Hkv, N, D, dtype, splits, kind = case
    g = gen("tree_attention", case)
    S = 192
    prefix = torch.randint(0, 110, (B,), generator=g)
    prefix[0] = 101                                         # odd, crosses tile and split boundaries
    if B > 1:
        prefix[1] = 0                                       # nothing cached yet: whole splits are empty
    prefix = prefix.to(DEV)
    kv_len = int(prefix.max()) + N + 9                      # a bucketed bound past the longest row
    k = randn(g, B, Hkv, S, D, dtype=dtype)
    v = randn(g, B, Hkv, S, D, dtype=dtype)
    for b in range(B):                                      # slots past the row's tokens: never attended
        end = int(prefix[b]) + N
        k[b, :, end:kv_len], v[b, :, end:kv_len] = 50.0, 50.0
    k[:, :, kv_len:], v[:, :, kv_len:] = float("nan"), float("nan")   # past kv_len: never read
    q = randn(g, B, N, H, D, dtype=dtype).transpose(1, 2)   # the model's layout: a transposed view
    bits = _tree_bits(kind, B, N, g)
    ref = reference.tree_attention(q, k, v, prefix, bits, kv_len)
    for b in range(B):                  # window=True reads up to kv_len: stale NaN slots there must not leak
        end = int(prefix[b]) + N        # into 0 * NaN
        k[b, :, end:kv_len], v[b, :, end:kv_len] = float("nan"), float("nan")
    from amphista_engine.kernels.triton_kernels.tree_attention import tree_attention as kernel
    out = kernel(q, k, v, prefix, bits, kv_len, num_splits=splits, window=window)
    assert out.shape == (B, H, N, D) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


# B, H, H_kv, N, D, dtype, splits, mask kind: split cases only (one split has nothing to merge)
MERGE_CASES = [ATTN_CASES[1], ATTN_CASES[2], ATTN_CASES[6], (3, 4, 2, 1, 64, torch.float32, 5, "causal")]


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}N{c[3]}D{c[4]}"
                                                              f"-{str(c[5])[6:]}-s{c[6]}-{c[7]}")
def test_tree_attention_merge_in_kernel(case, poisoned, monkeypatch):
    """merge="kernel": the last split of each program group merges in the same launch (no merge kernel runs),
    the result matches the reference and the two-launch merge, and every arrival counter is re-armed to 0,
    so the next launch (or a CUDA-graph replay) starts clean, also with more groups than before."""
    from amphista_engine.kernels.triton_kernels import tree_attention as ta
    B, H, Hkv, N, D, dtype, splits, kind = case
    g = gen("tree_attention_merge", case)
    S = 176
    prefix = torch.tensor([97, 0, 33][:B]).to(DEV)           # row 1: every split empty (lse -inf everywhere)
    kv_len = int(prefix.max()) + N + 7
    k, v = randn(g, B, Hkv, S, D, dtype=dtype), randn(g, B, Hkv, S, D, dtype=dtype)
    q = randn(g, B, N, H, D, dtype=dtype).transpose(1, 2)
    bits = _tree_bits(kind, B, N, g)
    ref = reference.tree_attention(q, k, v, prefix, bits, kv_len)
    # 16-key tiles, so the requested splits really happen (64-key tiles would leave 2 at these lengths)
    two_launch = ta.tree_attention(q, k, v, prefix, bits, kv_len, num_splits=splits, block_n=16, merge="launch")

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the merge kernel was launched")
    monkeypatch.setattr(ta, "_tree_attn_merge", NoLaunch())
    outs = [ta.tree_attention(q, k, v, prefix, bits, kv_len, num_splits=splits, block_n=16, merge="kernel")
            for _ in range(2)]
    assert torch.isfinite(outs[0]).all()
    assert rel_err(outs[0], ref) < TOL[dtype]
    assert rel_err(outs[0], two_launch) < 1e-6               # the same sum, in the same order
    assert torch.equal(outs[0], outs[1])                     # the second launch found its counters re-armed
    counters = split_merge.arrival_counters(DEV, 1)
    assert counters.dtype == torch.int32 and int(counters.count_nonzero()) == 0


@pytest.mark.parametrize("splits,merge,window", [(1, None, False), (3, "launch", False), (3, "kernel", False),
                                                 (1, None, True), (3, "kernel", True)])
def test_tree_attention_row_without_keys_is_zero(splits, merge, window, poisoned):
    """A query row whose mask admits no key (prefix 0, its own bit cleared) gets zeros, as the reference (SDPA)
    and the cuda kernel give, not 0 / 0 = NaN, on the single pass and both split merges; the other rows keep
    their attention."""
    from amphista_engine.kernels.triton_kernels import tree_attention as ta
    g = gen("tree_attention_no_keys", (splits, merge, window))
    B, H, Hkv, N, D, dtype = 2, 4, 2, 4, 64, torch.float32
    prefix = torch.tensor([0, 37]).to(DEV)
    kv_len = 37 + N + 3
    k, v = randn(g, B, Hkv, 64, D, dtype=dtype), randn(g, B, Hkv, 64, D, dtype=dtype)
    q = randn(g, B, N, H, D, dtype=dtype).transpose(1, 2)
    mask = torch.ones(N, N, dtype=torch.bool).tril()[None].repeat(B, 1, 1)
    mask[:, 0] = False                                       # node 0: no key in row 0, only the prefix in row 1
    bits = reference.mask_bits(mask).to(DEV)
    ref = reference.tree_attention(q, k, v, prefix, bits, kv_len)
    assert (ref[0, :, 0] == 0).all() and ref[1, :, 0].abs().sum() > 0
    out = ta.tree_attention(q, k, v, prefix, bits, kv_len, num_splits=splits, block_n=16, merge=merge,
                            window=window)
    assert torch.isfinite(out).all()
    assert (out[0, :, 0] == 0).all()
    assert rel_err(out, ref) < TOL[dtype]


def test_tree_merge_mode_switch(monkeypatch):
    from amphista_engine.kernels.triton_kernels import tree_attention as ta
    monkeypatch.delenv(split_merge.MERGE_ENV, raising=False)
    assert split_merge.default_merge() == "auto"
    monkeypatch.setenv(split_merge.MERGE_ENV, "kernel")
    assert split_merge.default_merge() == "kernel"
    with split_merge.merge_mode("launch"):
        assert split_merge.default_merge() == "launch"
    assert split_merge.default_merge() == "kernel"
    monkeypatch.setenv(split_merge.MERGE_ENV, "both")
    with pytest.raises(ConfigError, match="AMPHISTA_TREE_MERGE='both'"):
        split_merge.default_merge()
    with pytest.raises(ConfigError, match="merge mode 'fast'"):
        with split_merge.merge_mode("fast"):
            pass
    q = torch.zeros(1, 2, 1, 64, device=DEV)
    kc = torch.zeros(1, 2, 8, 64, device=DEV)
    with pytest.raises(ConfigError, match="merge='twice'"):
        ta.tree_attention(q, kc, kc, torch.zeros(1, dtype=torch.long, device=DEV), torch.ones(1, 1, dtype=torch.long,
                          device=DEV), 8, merge="twice")


@pytest.mark.parametrize("n_nodes, splits, merges_in_kernel",
                         [(1, 3, True), (16, 3, True), (17, 3, False), (64, 3, False), (1, 26, False)])
def test_auto_merge_picks_the_kernel_for_small_row_blocks(n_nodes, splits, merges_in_kernel, monkeypatch):
    """merge="auto" (the default) merges in the kernel while a program holds at most 16 query rows (plain steps
    and small trees: faster on the H200) over at most 16 splits, and launches the merge kernel for larger trees or
    more splits (slower there: the H100's 32-split SmolLM2 row); the result is the reference's either way."""
    from amphista_engine.kernels.triton_kernels import tree_attention as ta
    g = gen("tree_attention_auto_merge", n_nodes, splits)
    B, H, Hkv, D = 1, 2, 2, 32
    prefix_n = 150 if splits <= 3 else 400      # 400 keys: 26 splits of 16 (the block_n below)
    prefix = torch.tensor([prefix_n]).to(DEV)
    kv_len = prefix_n + n_nodes
    k, v = randn(g, B, Hkv, kv_len, D), randn(g, B, Hkv, kv_len, D)
    q = randn(g, B, n_nodes, H, D).transpose(1, 2)
    bits = _tree_bits("causal", B, n_nodes, g)
    launched = []
    merge_kernel = ta._tree_attn_merge

    class Recording:
        def __getitem__(self, grid):
            launched.append(grid)
            return merge_kernel[grid]
    monkeypatch.setattr(ta, "_tree_attn_merge", Recording())
    out = ta.tree_attention(q, k, v, prefix, bits, kv_len, num_splits=splits, block_n=16)
    assert rel_err(out, reference.tree_attention(q, k, v, prefix, bits, kv_len)) < TOL[torch.float32]
    assert bool(launched) != merges_in_kernel
    assert split_merge.resolve("auto", 16, splits=split_merge.AUTO_KERNEL_MERGE_SPLITS) == "kernel"
    assert split_merge.resolve("auto", 16, splits=split_merge.AUTO_KERNEL_MERGE_SPLITS + 1) == "launch"
    assert split_merge.resolve("kernel", 64, splits=99) == "kernel"        # a mode named is a mode kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA graphs and real concurrency")
def test_tree_attention_merge_in_kernel_on_gpu_under_graphs():
    """On a GPU the splits really race for the counters: many groups, many splits, repeated launches and CUDA
    graph replays with new inputs must all match the reference (a missed release/acquire or a counter left
    armed shows up as wrong or NaN rows)."""
    from amphista_engine.kernels.triton_kernels import tree_attention as ta
    g = gen("merge_gpu")
    B, H, Hkv, N, D, S = 4, 32, 8, 16, 128, 2048
    prefix = torch.tensor([2000, 1, 1500, 777], device=DEV)
    kv_len = S
    k, v = randn(g, B, Hkv, S, D, dtype=torch.bfloat16), randn(g, B, Hkv, S, D, dtype=torch.bfloat16)
    q = randn(g, B, N, H, D, dtype=torch.bfloat16).transpose(1, 2)
    bits = _tree_bits("dynamic", B, N, g)
    for splits in (2, 16, 31):
        ref = reference.tree_attention(q.float(), k.float(), v.float(), prefix, bits, kv_len)
        for _ in range(20):
            out = ta.tree_attention(q, k, v, prefix, bits, kv_len, num_splits=splits, merge="kernel")
            assert rel_err(out, ref) < TOL[torch.bfloat16]
    q_static = q.clone()
    ta.tree_attention(q_static, k, v, prefix, bits, kv_len, num_splits=16, merge="kernel")     # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = ta.tree_attention(q_static, k, v, prefix, bits, kv_len, num_splits=16, merge="kernel")
    for i in range(5):
        q_static.copy_(randn(g, B, N, H, D, dtype=torch.bfloat16).transpose(1, 2))
        graph.replay()
        ref = reference.tree_attention(q_static.float(), k.float(), v.float(), prefix, bits, kv_len)
        assert rel_err(out_static, ref) < TOL[torch.bfloat16], i
    torch.cuda.synchronize()
    assert int(split_merge.arrival_counters(DEV, 1).count_nonzero()) == 0


@pytest.mark.parametrize("dtype,Hkv,D", [(torch.bfloat16, 2, 64), (torch.float16, 1, 128), (torch.float32, 2, 64)])
def test_ordered_tree_attention_is_row_invariant(dtype, Hkv, D, poisoned, position_invariant_dot):
    """The row-invariant path (kernels/gpu_exact.py): each tree node's output equals, bit for bit, a plain
    one-token step for the same token over a cache holding its ancestors in position order, with another
    kv_len (other split count) and nothing else in the step. Prefixes cross CHUNK (two prefix splits) and
    differ per row; the result also matches the reference. In the interpreter the fp32 case is the sharp one
    (there the default kernel's rows differ from its plain steps in the last bits; bf16 outputs round that
    away), on a GPU all three are."""
    from amphista_engine.kernels import gpu_exact
    g = gen("ordered", dtype, Hkv, D)
    B, H = 2, 4
    dt = dynamic_tree(torch.zeros(B, dtype=torch.long), torch.randn(B, 4, 12, generator=g), 12, topk=3)
    mask = dt.mask.to(DEV)                                              # per-row trees, depth <= 4
    N = mask.shape[-1]
    prefix = torch.tensor([gpu_exact.CHUNK + 37, 90], device=DEV)
    S = gpu_exact.CHUNK + 200
    kv_len = -(-(int(prefix.max()) + N) // 128) * 128
    k, v = randn(g, B, Hkv, S, D, dtype=dtype), randn(g, B, Hkv, S, D, dtype=dtype)
    q = randn(g, B, N, H, D, dtype=dtype).transpose(1, 2)
    order = gpu_exact.layout(prefix, mask)
    out = triton_ops.tree_attention(q, k, v, prefix, order.bits, kv_len, order=order)
    assert rel_err(out, reference.tree_attention(q, k, v, prefix, mask, kv_len)) < TOL[dtype]
    one = torch.ones(1, 1, 1, dtype=torch.bool, device=DEV)
    for b in range(B):
        for i in (0, N // 2, N - 1):
            anc = mask[b, i].nonzero().flatten()                       # ancestors and itself, by depth
            P = int(prefix[b])
            kp, vp = k[b:b + 1].clone(), v[b:b + 1].clone()
            kp[:, :, P:P + len(anc)], vp[:, :, P:P + len(anc)] = k[b:b + 1, :, P + anc], v[b:b + 1, :, P + anc]
            pp = torch.tensor([P + len(anc) - 1], device=DEV)
            o1 = gpu_exact.layout(pp, one)
            plain = triton_ops.tree_attention(q[b:b + 1, :, i:i + 1], kp, vp, pp, o1.bits, int(pp) + 1, order=o1)
            assert torch.equal(plain[0, :, 0], out[b, :, i]), (b, i)


# bf16 tree-16 is left out (~13 s in the interpreter): fp32 tree-16 checks one 16-row block sharply, bf16 tree-32
# checks bf16 in one block and across two
@pytest.mark.parametrize("dtype, tree_name", [(torch.float32, "tree-16"), (torch.bfloat16, "tree-32")])
def test_invariant_decode_tree_rows_equal_plain_steps(dtype, tree_name, monkeypatch, position_invariant_dot):
    """The model's row-invariant decode path (kernels/gpu_exact.py, forced on for this CPU run): a tree
    verification forward's logits for a node are bit for bit those of plain one-token steps along the node's
    path, with the tree's other nodes, its size and kv_len all different (tree-32: two 16-row blocks in every
    product, none of them through cuBLAS). This is what keeps bf16 greedy speculative decoding equal to plain
    greedy decoding; fp32 makes the check sharp in the interpreter."""
    from conftest import random_tiny_model
    from amphista_engine.kernels import gpu_exact
    from amphista_engine.kernels.routed_linear import route_linears
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import AttentionSpec, causal_mask

    monkeypatch.setattr(gpu_exact, "applies", lambda kv: kv.dtype == dtype)
    # one layer: each product and the attention are as in any layer (2 layers cost twice as long in the interpreter)
    model = random_tiny_model(seed=5, vocab=96, dim=64, layers=1, heads=4, kv_heads=2, inter=96).to(DEV, dtype)
    route_linears(model)
    g = gen("invariant_model", dtype, tree_name)
    tree = build_tree(tree_name)
    mask, N = tree.mask.to(DEV), tree.num_nodes
    depth = mask.sum(-1) - 1
    P = 37
    prompt = torch.randint(0, 96, (1, P), generator=g).to(DEV)
    toks = torch.randint(0, 96, (1, N), generator=g).to(DEV)
    bucket = lambda n: -(-n // 32) * 32

    def copied(c):
        out = KVCache.for_model(model.config, 1, 128, dtype, DEV)
        out.k.copy_(c.k), out.v.copy_(c.v), out.length.copy_(c.length)
        return out

    with use_backend("triton"), torch.inference_mode():
        # the prompt's prefill, once: the tree forward and every path's plain steps start from a copy of its cache
        prefilled = KVCache.for_model(model.config, 1, 128, dtype, DEV)
        spec = AttentionSpec(torch.zeros(1, dtype=torch.long, device=DEV), causal_mask(P, DEV), kv_len=bucket(P))
        model(prompt, torch.arange(P, device=DEV)[None], prefilled, spec)
        spec = AttentionSpec(torch.tensor([P], device=DEV), mask[None], kv_len=bucket(P + N), decode=True)
        cache = copied(prefilled)
        with monkeypatch.context() as m:     # every product of the tree forward on the kernel's row blocks
            m.setattr(reference, "linear", lambda *a, **k: pytest.fail("a routed product went to the reference"))
            tree_logits = model(toks, (P + depth)[None], cache, spec)[0]
        checked, stepped = 0, {}             # plain steps by the path they decode: a shared start (the root) runs once
        for i in (N - 1, N // 2):
            path = mask[i].nonzero().flatten().tolist()                 # root .. node i, by depth
            cache = prefilled
            for j, node in enumerate(path):
                if tuple(path[:j + 1]) not in stepped:
                    cache = copied(cache)
                    spec = AttentionSpec(torch.tensor([P + j], device=DEV), causal_mask(1, DEV),
                                         kv_len=bucket(P + j + 1), decode=True)
                    logits = model(toks[:, node:node + 1], torch.tensor([[P + j]], device=DEV), cache, spec)[0, 0]
                    stepped[tuple(path[:j + 1])] = logits, cache
                plain, cache = stepped[tuple(path[:j + 1])]
                assert torch.equal(plain, tree_logits[node]), (i, j, node)
                checked += 1
        assert checked >= 4


def test_exact_greedy_switch(monkeypatch):
    """gpu_exact.enabled_for sets the model up as the Engine does with AMPHISTA_EXACT_GREEDY=1 (flag on,
    linears routed) and restores both; the path applies to half-precision CUDA caches only; a tree deeper
    than the windows allow is refused up front."""
    from conftest import random_tiny_model
    from amphista_engine.errors import ConfigError
    from amphista_engine.heads import random_heads
    from amphista_engine.kernels import gpu_exact
    from amphista_engine.kernels.routed_linear import RoutedLinear
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.sampling import SamplingParams
    from amphista_engine.speculative import SpeculativeDecoder, TreeSpec

    monkeypatch.delenv(gpu_exact.ENV_VAR, raising=False)
    model = random_tiny_model(seed=1)
    with gpu_exact.enabled_for(model):
        assert gpu_exact.enabled() and type(model.output) is RoutedLinear
        assert not gpu_exact.applies(torch.zeros(2, dtype=torch.bfloat16))        # CPU: kernels/cpu_exact.py
    assert not gpu_exact.enabled() and type(model.output) is torch.nn.Linear
    cache = KVCache.for_model(model.config, 1, 64, torch.float32, "cpu")
    monkeypatch.setattr(gpu_exact, "applies", lambda kv: True)
    with gpu_exact.enabled_for(model), pytest.raises(ConfigError, match=gpu_exact.ENV_VAR):
        chain = [(0,) * d for d in range(1, 9)]                             # 8 deep
        SpeculativeDecoder(model, cache, random_heads("medusa", model, num_heads=8), TreeSpec(chain, 8, "cpu"),
                           SamplingParams())


def test_tree_attention_dispatch_and_mask_forms(poisoned):
    """ops.tree_attention: dense bool masks and bits agree; tree_mask_args picks the form per backend;
    inputs the kernel cannot take (a 65-node tree) fall back to the reference without an error."""
    g = gen("mask_forms")
    B, H, Hkv, N, D = 2, 4, 2, 9, 64
    k, v = randn(g, B, Hkv, 64, D), randn(g, B, Hkv, 64, D)
    q = randn(g, B, H, N, D)
    prefix = torch.tensor([13, 40], device=DEV)
    dt = dynamic_tree(torch.zeros(B, dtype=torch.long), torch.randn(B, 3, 8, generator=g), N, topk=4)
    mask = dt.mask.to(DEV)
    ref = reference.tree_attention(q, k, v, prefix, mask, 56)
    with use_backend("triton"):
        new_mask, dense = ops.tree_mask_args(prefix, mask, 56)
        assert new_mask.dtype == torch.int64 and dense is None
        assert torch.equal(new_mask, dt.ancestor_bits.to(DEV))
        assert rel_err(ops.tree_attention(q, k, v, prefix, mask, 56), ref) < TOL[torch.float32]
        assert rel_err(ops.tree_attention(q, k, v, prefix, new_mask, 56), ref) < TOL[torch.float32]
        big = torch.ones(65, 65, dtype=torch.bool, device=DEV).tril()[None]
        q65 = randn(g, 1, H, 65, D)
        kc, vc = randn(g, 1, Hkv, 80, D), randn(g, 1, Hkv, 80, D)
        p0 = torch.zeros(1, dtype=torch.long, device=DEV)
        assert triton_ops.tree_attention(q65, kc, vc, p0, big, 65) is NotImplemented
        torch.testing.assert_close(ops.tree_attention(q65, kc, vc, p0, big, 65),
                                   reference.tree_attention(q65, kc, vc, p0, big, 65))
    with use_backend("torch"):
        new_mask, dense = ops.tree_mask_args(prefix, mask, 56)
        assert new_mask is mask and dense.shape == (B, N, 56)
        torch.testing.assert_close(ops.tree_attention(q, k, v, prefix, new_mask, 56, dense_mask=dense), ref)
        _, additive = ops.tree_mask_args(prefix, mask, 56, torch.float32)     # built once, in the queries' dtype
        assert additive.dtype == torch.float32 and torch.equal(additive == 0, dense)
        assert bool((additive[~dense] == float("-inf")).all())
        torch.testing.assert_close(ops.tree_attention(q, k, v, prefix, new_mask, 56, dense_mask=additive), ref)


# ---- AEB head attention --------------------------------------------------------------------------------
@pytest.mark.parametrize("N,K,d,heads,dtype,pos", [(3, 4, 128, 2, torch.float32, True),
                                                   (2, 5, 256, 2, torch.bfloat16, False)])
def test_head_attention(N, K, d, heads, dtype, pos, poisoned):
    g = gen("head_attention", N, K, d, dtype)
    z = randn(g, N, K, d, dtype=dtype)
    pe = randn(g, K, d, dtype=dtype) if pos else None
    w = randn(g, d, dtype=dtype, scale=0.5) + 1
    wqkv = randn(g, 3 * d, d, dtype=dtype, scale=d ** -0.5)
    rx, ra = reference.head_attention(z, pe, w, 1e-5, wqkv, heads)
    x, a = triton_ops.head_attention(z, pe, w, 1e-5, wqkv, heads)
    assert rel_err(x, rx) < TOL[dtype] and rel_err(a, ra) < TOL[dtype]


# ---- staged adaptation input ---------------------------------------------------------------------------
@pytest.mark.parametrize("B,M,d,h_dtype,w_dtype", [(2, 3, 80, torch.float32, torch.float32),
                                                   (1, 5, 64, torch.float32, torch.bfloat16)])
def test_fused_sal_input(B, M, d, h_dtype, w_dtype, poisoned):
    g = gen("fused_sal_input", B, M, d, w_dtype)
    hidden = randn(g, B, M, d, dtype=h_dtype)
    tokens = torch.randint(0, 97, (B, M), generator=g).to(DEV)
    emb = randn(g, 97, d, dtype=w_dtype)
    w = randn(g, d, 2 * d, dtype=w_dtype, scale=(2 * d) ** -0.5)
    ref = reference.fused_sal_input(hidden, tokens, emb, w)
    out = triton_ops.fused_sal_input(hidden, tokens, emb, w)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOL[w_dtype]


def test_fused_sal_input_falls_back_when_a_pipeline_does_not_fit(monkeypatch):
    """The launcher tries its configurations fastest first; one that a GPU cannot hold (Triton's
    OutOfResources, as fp32 operands with 256-wide K tiles and 4 stages raised on an H200) is skipped, the
    result is still right, and the choice is remembered so the next call goes straight to what fits."""
    from triton.runtime.errors import OutOfResources
    from amphista_engine.kernels.triton_kernels import common, fused_input as fi
    real, tried = fi._fused_input_kernel, []

    class Tight:          # stands in for a GPU with too little shared memory for 4 stages
        def __getitem__(self, grid):
            def run(*args, **kw):
                tried.append((kw["BLOCK_K"], kw["num_stages"]))
                if kw["num_stages"] >= 4:
                    raise OutOfResources(294912, 232448, "shared memory")
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(fi, "_fused_input_kernel", Tight())
    monkeypatch.setattr(common, "_fitting", {})
    g = gen("fused_fallback")
    hidden, w = randn(g, 1, 3, 64), randn(g, 64, 128, scale=128 ** -0.5)
    tokens, emb = torch.randint(0, 50, (1, 3), generator=g).to(DEV), randn(g, 50, 64)
    ref = reference.fused_sal_input(hidden, tokens, emb, w)
    assert rel_err(fi.fused_sal_input(hidden, tokens, emb, w), ref) < TOL[torch.float32]
    assert [st for _, st in tried] == [4, 3]            # 256-wide tiles clamp to 64 at d = 64
    tried.clear()
    assert rel_err(fi.fused_sal_input(hidden, tokens, emb, w), ref) < TOL[torch.float32]
    assert [st for _, st in tried] == [3]               # remembered

    def never_fits(a):
        raise OutOfResources(1, 0, "shared memory")
    with pytest.raises(OutOfResources):                 # nothing fits: the error is not swallowed
        common.launch_first_fitting(never_fits, [dict(a=1), dict(a=2)], "nothing fits")


# ---- RMSNorm and RoPE ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype", [((3, 5, 96), torch.float32), ((7, 576), torch.bfloat16)])
def test_rmsnorm_and_add(shape, dtype, poisoned):
    g = gen("rmsnorm", shape, dtype)
    x = randn(g, *shape, dtype=dtype, scale=3)
    w = randn(g, shape[-1], dtype=dtype) + 1
    assert rel_err(triton_ops.rmsnorm(x, w, 1e-5), reference.rmsnorm(x, w, 1e-5)) < TOL[dtype]
    for res in (randn(g, *shape, dtype=dtype), randn(g, *shape[-2:], dtype=dtype)):   # full, per-position
        s, y = triton_ops.add_rmsnorm(x, res, w, 1e-5)
        rs, ry = reference.add_rmsnorm(x, res, w, 1e-5)
        assert rel_err(s, rs) < TOL[dtype] and rel_err(y, ry) < TOL[dtype]


@pytest.mark.parametrize("B,T,H,D,dtype,shared", [(2, 3, 5, 64, torch.float32, False),
                                                  (1, 7, 4, 128, torch.bfloat16, True)])
def test_rope(B, T, H, D, dtype, shared, poisoned):
    x, rows = rope_inputs(B, T, H, D, dtype, shared)
    ref = reference.rope(x, rows)
    out = triton_ops.rope(x, rows)
    assert rel_err(out, ref) < TOL[dtype]


# ---- linear layers (few rows) ----------------------------------------------------------------------------
# leading dims (rows), K, N, dtype
LINEAR_CASES = [((1,), 64, 40, torch.float32),              # one token, N below one column tile
                ((1, 3), 200, 300, torch.bfloat16),         # K not a multiple of the K tile, several N tiles
                ((16,), 96, 70, torch.bfloat16),            # the most rows the kernel takes
                ((2, 5), 320, 130, torch.float32)]          # K over one K tile


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{c[0]}K{c[1]}N{c[2]}-{str(c[3])[6:]}")
def test_linear(case, poisoned):
    lead, K, N, dtype = case
    g = gen("linear", case)
    x = randn(g, *lead, K, dtype=dtype)
    w = randn(g, N, K, dtype=dtype, scale=K ** -0.5)
    out = triton_ops.linear(x, w)
    assert out.shape == (*lead, N) and out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, reference.linear(x, w)) < TOL[dtype]


@pytest.mark.parametrize("M, dtype", [(20, torch.bfloat16), (64, torch.bfloat16), (70, torch.float32)])
def test_linear_row_blocks_share_weight_tiles_with_the_same_bits(M, dtype, position_invariant_dot):
    """More than 16 rows (the exact path's trees): a program multiplies each weight tile it loads with two or
    four 16-row blocks (ROW_BLOCKS), so a 64-node tree reads W once. Every row keeps the bits it gets alone
    (a plain step's row 0) and with one block a program; rows past the last full block are computed too."""
    from amphista_engine.kernels.triton_kernels import linear as lin
    g = gen("linear_row_blocks", M, dtype)
    K, N = 200, 130                                  # K over one K tile and not a multiple of it, N several tiles
    x = randn(g, M, K, dtype=dtype)
    w = randn(g, N, K, dtype=dtype, scale=K ** -0.5)
    assert lin.row_blocks_for(M, prologue=False) == (2 if M <= 32 else 4)
    out = lin.linear(x, w)
    assert rel_err(out, reference.linear(x, w)) < TOL[dtype]
    assert torch.equal(out, lin.linear(x, w, row_blocks=1))
    for i in (0, 17, M - 1):
        assert torch.equal(out[i], lin.linear(x[i:i + 1], w)[0]), i
    with pytest.raises(ValueError, match="row_blocks"):
        lin.linear(x, w, row_blocks=3)
    with pytest.raises(ValueError, match="prologue"):
        lin.linear(x, w, norm_weight=torch.ones(K, dtype=dtype, device=DEV), row_blocks=2)


# leading dims (rows), K, N, dtype, prologue (None / "norm" / "silu"), residual add
FUSED_LINEAR_CASES = [((1,), 64, 40, torch.float32, "norm", False),       # wqkv / w13 / lm_head: norm first
                      ((1, 3), 200, 300, torch.bfloat16, "silu", True),   # w2: activation in, residual out
                      ((16,), 96, 70, torch.bfloat16, None, True),        # wo: residual out, the most rows
                      ((2, 5), 320, 130, torch.bfloat16, "norm", True),   # K over one K tile, both ends
                      ((1, 1), 200, 300, torch.bfloat16, "silu", True),   # one row: the prologue on it alone
                      ((1,), 520, 300, torch.bfloat16, "norm", False)]    # one row, its RMS from one load of K


@pytest.mark.parametrize("case", FUSED_LINEAR_CASES,
                         ids=lambda c: f"{c[0]}K{c[1]}N{c[2]}-{str(c[3])[6:]}-{c[4]}-{'res' if c[5] else 'nores'}")
def test_fused_linear(case, poisoned):
    lead, K, N, dtype, pro, res = case
    g = gen("fused_linear", case)
    x = randn(g, *lead, 2 * K if pro == "silu" else K, dtype=dtype, scale=3.0)    # rows far from unit RMS
    w = randn(g, N, K, dtype=dtype, scale=K ** -0.5)
    nw = (1 + 0.5 * randn(g, K)).to(dtype) if pro == "norm" else None
    r = randn(g, *lead, N, dtype=dtype, scale=4.0) if res else None        # as large as the product
    out = triton_ops.fused_linear(x, w, nw, 1e-5, pro == "silu", r)
    ref = reference.fused_linear(x, w, nw, 1e-5, pro == "silu", r)
    assert out.shape == (*lead, N) and out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]
    if res:                                  # the residual really is added (not a no-op on a small term)
        assert rel_err(out, ref - r) > 0.2
    if x.numel() == x.shape[-1] and pro:
        # one row: its prologue runs on that row alone (ONE_ROW). SwiGLU's gives the 16-row tile's bits; a
        # norm's takes the row's RMS from one load (another fp32 summation order than the 16-row loop's)
        from amphista_engine.kernels.triton_kernels import linear as lin
        tile = lin.linear(x, w, norm_weight=nw, eps=1e-5, silu=pro == "silu", residual=r, one_row=False)
        assert torch.equal(out, tile) if pro == "silu" else rel_err(tile, ref) < TOL[dtype]


def test_fused_linear_declines():
    g = gen("fused_linear_declines")
    w, x = randn(g, 24, 32), randn(g, 2, 32)
    assert triton_ops.fused_linear(randn(g, 17, 32), w) is NotImplemented                   # too many rows
    assert triton_ops.fused_linear(x, w, silu=True) is NotImplemented                       # silu wants 2K
    assert triton_ops.fused_linear(x, w, randn(g, 31)) is NotImplemented                    # norm weight size
    assert triton_ops.fused_linear(x, w, residual=randn(g, 2, 23)) is NotImplemented        # residual shape
    assert triton_ops.fused_linear(x, w, residual=randn(g, 2, 24, dtype=torch.bfloat16)) is NotImplemented
    with pytest.raises(ValueError, match="one"):
        ops.fused_linear(randn(g, 2, 64), w, randn(g, 32), silu=True)


def test_linear_declines_and_routed_model_matches(monkeypatch):
    """What the few-row kernel declines falls back to torch; a tiny model with its linears routed through
    the kernel backends (kernels/routed_linear.py) takes the fused layers (Block.forward_fused) for its
    few-row forwards: on the torch backend they give the unfused model's logits bit for bit, on triton the
    kernel serves every product, norms and activation inside it, within tolerance; with fuse_decode_layers off
    it serves the bare products. Routing back restores plain nn.Linear layers."""
    from conftest import random_tiny_model
    from amphista_engine.kernels import routed_linear
    from amphista_engine.kernels.routed_linear import RoutedLinear, route_linears
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import AttentionSpec, causal_mask

    # every few-row product on the kernel: on CUDA the default ("auto") would time both GEMMs at a shape's first
    # product, and those calls would join the ones counted below
    monkeypatch.setenv(routed_linear.ENV_VAR, "on")
    g = gen("linear_declines")
    w = randn(g, 24, 32)
    assert triton_ops.linear(randn(g, 17, 32), w) is NotImplemented               # more rows than one tile
    assert triton_ops.linear(randn(g, 2, 32, dtype=torch.bfloat16), w) is NotImplemented   # dtypes differ
    assert triton_ops.linear(randn(g, 2, 32), randn(g, 32, 24).T) is NotImplemented       # strided weight

    model = random_tiny_model(seed=3, vocab=64, dim=64, heads=4, kv_heads=2, inter=96).to(DEV)
    tokens = torch.randint(0, 64, (1, 6), generator=gen("linear_tokens")).to(DEV)

    def run(name):
        cache = KVCache.for_model(model.config, 1, 32, torch.float32, DEV)
        with use_backend(name), torch.inference_mode():
            spec = AttentionSpec(torch.zeros(1, dtype=torch.long, device=DEV), causal_mask(5, DEV), kv_len=16)
            out = [model(tokens[:, :5], torch.arange(5, device=DEV)[None], cache, spec)]
            spec = AttentionSpec(torch.tensor([5], device=DEV), causal_mask(1, DEV), kv_len=16)
            out.append(model(tokens[:, 5:], torch.tensor([[5]], device=DEV), cache, spec))
        return out

    ref = run("torch")
    keys = list(model.state_dict())
    L = model.config.n_layers
    assert route_linears(model) == 4 * L + 1 and isinstance(model.output, RoutedLinear)
    assert not model.fuse_decode_layers          # the default: fused GEMVs lost to unfused ones on an H200
    model.fuse_decode_layers = True
    fused_ref = run("torch")
    assert all(torch.equal(a, b) for a, b in zip(fused_ref, ref))
    calls = []
    real = triton_ops._lin.linear
    monkeypatch.setattr(triton_ops._lin, "linear",
                        lambda x, w, **kw: calls.append(sorted(k for k, v in kw.items() if isinstance(v, torch.Tensor) or v is True))
                        or real(x, w, **kw))
    got = run("triton")
    # prefill (5 rows) and the decode step: per layer wqkv (norm), wo (residual), w13 (norm), w2 (silu +
    # residual), then the LM head (final norm)
    per_forward = [["norm_weight"], ["residual"], ["norm_weight"], ["residual", "silu"]] * L + [["norm_weight"]]
    assert calls == per_forward * 2
    for a, b in zip(got, ref):
        assert rel_err(a, b) < TOL[torch.float32]
    # fuse_decode_layers=False: the same routed products with nothing fused around them, the same logits
    calls.clear()
    model.fuse_decode_layers = False
    unfused = run("triton")
    assert calls == [[]] * (4 * L + 1) * 2
    for a, b in zip(unfused, ref):
        assert rel_err(a, b) < TOL[torch.float32]
    # AMPHISTA_TRITON_LINEAR=0 (or its set_mode): routed layers go straight to cuBLAS, not to the backends
    calls.clear()
    with routed_linear.set_mode("off"):
        off = run("triton")
    assert calls == [] and all(rel_err(a, b) < TOL[torch.float32] for a, b in zip(off, ref))
    # a product that autograd must see (training) is torch's too: the kernels have no backward
    x = randn(g, 1, 64).requires_grad_()
    with use_backend("triton"):
        model.output(x).sum().backward()
    assert calls == [] and x.grad is not None and x.grad.abs().sum() > 0
    assert route_linears(model, on=False) == 4 * L + 1 and type(model.output) is torch.nn.Linear
    assert list(model.state_dict()) == keys


def test_routed_linear_modes(monkeypatch):
    """AMPHISTA_TRITON_LINEAR: unset = auto, so the Engine routes its linears on CUDA (each shape then on the
    faster GEMM); 1 / 0 force the kernel / cuBLAS; anything else is refused by name; set_mode overrides it."""
    from amphista_engine.errors import ConfigError
    from amphista_engine.kernels import linear_choice, routed_linear
    from amphista_engine.kernels.linear_setup import LinearSetup
    monkeypatch.delenv(routed_linear.ENV_VAR, raising=False)
    assert routed_linear.mode() == "auto" and LinearSetup.for_device("cuda", torch.bfloat16).routed
    assert not LinearSetup.for_device("cpu", torch.float32).routed
    assert "faster of the Triton GEMM and cuBLAS" in LinearSetup(routed=True).describe()     # what bench reports
    with routed_linear.set_mode("on"):
        assert "the Triton GEMM for products of up to 16 rows" in LinearSetup(routed=True).describe()
    x, w = torch.zeros(1, 8), torch.zeros(4, 8)
    assert linear_choice.kernel_for(x, w)                  # off CUDA there is nothing to choose
    for raw, want in (("1", "on"), ("AUTO", "auto"), ("0", "off")):
        monkeypatch.setenv(routed_linear.ENV_VAR, raw)
        assert routed_linear.mode() == want
        assert linear_choice.kernel_for(x, w) == (want != "off")
    assert not LinearSetup.for_device("cuda", torch.bfloat16).routed
    with routed_linear.set_mode("on"):
        assert routed_linear.mode() == "on" and linear_choice.kernel_for(x, w)
    assert routed_linear.mode() == "off"
    monkeypatch.setenv(routed_linear.ENV_VAR, "maybe")      # "yes" is a switch word (on)
    with pytest.raises(ConfigError, match=routed_linear.ENV_VAR):
        LinearSetup.for_device("cuda", torch.bfloat16)
    with pytest.raises(ConfigError, match="mode"):
        with routed_linear.set_mode("fast"):
            pass


def test_linear_choice_is_measured_once_and_saved(monkeypatch, tmp_path):
    """The auto choice (kernels/linear_choice.py): the kernel only when it beats cuBLAS by MARGIN, each key
    timed once, saved (timing_cache.py) so the next process picks the same GEMM (the same bits); a timing that
    fails keeps cuBLAS unsaved; inside a CUDA graph capture an unknown key takes the kernel untimed and unsaved."""
    import json
    from amphista_engine import timing_cache
    from amphista_engine.kernels import linear_choice
    monkeypatch.setenv(timing_cache.CACHE_ENV, str(tmp_path))
    path = tmp_path / linear_choice.FILE
    linear_choice.clear()
    never = lambda: pytest.fail("timed again")           # noqa: E731
    assert linear_choice.choose("fast", lambda: (0.90, 1.0)) is True
    assert linear_choice.choose("tie", lambda: (linear_choice.MARGIN * 1.01, 1.0)) is False
    assert linear_choice.choose("fast", never) is True
    # kernel calls chained by PDL: a tie goes to the kernel, cuBLAS must win by MARGIN
    assert linear_choice.choose("tie|pdl", lambda: (1.0, linear_choice.MARGIN * 1.01), prefer_kernel=True) is True
    assert linear_choice.choose("slow|pdl", lambda: (1.0, linear_choice.MARGIN * 0.99), prefer_kernel=True) is False
    assert linear_choice.choose("tie|pdl", never, prefer_kernel=True) is True
    # ... yet both GEMMs are captured for timing without PDL (a product chained to itself is no decode step)
    monkeypatch.setenv(backend.PDL_ENV, "1")
    seen = []

    def capture(fn):
        seen.append(backend.pdl_wanted())
        raise RuntimeError("stop before CUDA")
    monkeypatch.setattr(linear_choice, "_graph", capture)
    with pytest.raises(RuntimeError, match="stop before CUDA"):
        linear_choice.measure(torch.zeros(1, 8), torch.zeros(4, 8))
    assert seen == [False] and backend.pdl_wanted()
    linear_choice.clear()                                  # a new process: the file decides
    assert linear_choice.choose("tie", never) is False
    assert json.loads(path.read_text()) == {"fast": True, "tie": False, "tie|pdl": True, "slow|pdl": False}
    with pytest.warns(UserWarning, match="using cuBLAS"):
        assert linear_choice.choose("broken", lambda: 1 / 0) is False
    assert linear_choice.choose("broken", never) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert linear_choice.choose("captured", never) is True
    monkeypatch.undo()
    assert set(json.loads(path.read_text())) == {"fast", "tie", "tie|pdl", "slow|pdl"}
    monkeypatch.setenv(timing_cache.CACHE_ENV, "off")     # memory only
    linear_choice.clear()
    assert linear_choice.choose("fast", lambda: (2.0, 1.0)) is False
    assert set(json.loads(path.read_text())) == {"fast", "tie", "tie|pdl", "slow|pdl"}
    path.write_text("not json")                            # unreadable: measured again, then rewritten
    monkeypatch.setenv(timing_cache.CACHE_ENV, str(tmp_path))
    linear_choice.clear()
    assert linear_choice.choose("fast", lambda: (0.5, 1.0)) is True
    assert json.loads(path.read_text()) == {"fast": True}
    linear_choice.clear()


# ---- activation ----------------------------------------------------------------------------------------
# rows, I, dtype, strided (gate | up a slice of a wider row, as a view)
SILU_CASES = [((1,), 64, torch.float32, False),           # one row (decoding)
              ((3, 5), 37, torch.bfloat16, False),        # odd rows, odd I, leading dims
              ((7,), 1500, torch.float32, True),          # I over one block (1024), row stride != 2I
              ((2, 1), 1100, torch.bfloat16, False)]


@pytest.mark.parametrize("case", SILU_CASES, ids=lambda c: f"{c[0]}I{c[1]}-{str(c[2])[6:]}{'-view' * c[3]}")
def test_silu_mul(case, poisoned):
    lead, I, dtype, strided = case
    g = gen("silu_mul", case)
    x = randn(g, *lead, 2 * I + 6 * strided, dtype=dtype, scale=3)[..., :2 * I]
    ref = reference.silu_mul(x)
    out = triton_ops.silu_mul(x)
    assert out.shape == (*lead, I) and out.dtype == dtype
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


def test_silu_mul_declines_what_it_cannot_take():
    x = randn(gen("silu_mul_declines"), 4, 8)
    assert triton_ops.silu_mul(x[:, :7]) is NotImplemented              # odd width: no gate | up halves
    assert triton_ops.silu_mul(x.T) is NotImplemented                   # last dim strided (ops refuses odd widths)
    with use_backend("triton"):
        torch.testing.assert_close(ops.silu_mul(x.T), reference.silu_mul(x.T), rtol=0, atol=0)


# ---- KV cache ------------------------------------------------------------------------------------------
# B, T, H, H_kv, D, dtype, rope rows shared by the batch, start per row
QKV_CASES = [
    (1, 1, 4, 4, 64, torch.float32, False, [17]),           # plain decoding, MHA
    (2, 5, 8, 2, 128, torch.bfloat16, False, [3, 11]),      # GQA 4, D = 128, rows at different lengths
    (2, 1, 8, 1, 64, torch.bfloat16, True, [0, 20]),        # GQA 8, one rope row for the batch
    (1, 5, 16, 2, 128, torch.float32, True, [9]),           # GQA 8, D = 128
    (2, 5, 4, 1, 64, torch.float32, False, [5, 22]),        # row 1 runs past S = 24: slots 24..26 dropped
]


@pytest.mark.parametrize("case", QKV_CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}kv{c[3]}D{c[4]}"
                                                           f"-{str(c[5])[6:]}{'-shared' * c[6]}-s{c[7]}")
def test_qkv_rope_write(case, poisoned):
    B, T, H, Hkv, D, dtype, shared, start = case
    g = gen("qkv_rope_write", case)
    L, Bmax, S, layer = 2, 3, 24, 1
    cfg = ModelConfig(vocab_size=8, dim=H * D, n_layers=1, n_heads=H, n_kv_heads=Hkv, intermediate_size=8,
                      rope_theta=500000.0)
    table = rope_table(cfg, 300).to(DEV)
    rows = table[torch.randint(0, 300, (1 if shared else B, T), generator=g).to(DEV)]   # explicit positions
    qkv = randn(g, B, T, (H + 2 * Hkv) * D, dtype=dtype)
    start = torch.tensor(start, device=DEV)
    # The reference writes into T spare slots past S, which it has and the kernel's cache does not: its
    # first S slots are then what the kernel must leave (untouched slots stay NaN in both).
    rk = torch.full((L, Bmax, Hkv, S + T, D), float("nan"), dtype=dtype, device=DEV)
    rv = rk.clone()
    kb, vb = rk[..., :S, :].clone(), rv[..., :S, :].clone()
    ref_q = reference.qkv_rope_write(qkv, rows, rk, rv, layer, start, H, Hkv)
    q = triton_ops.qkv_rope_write(qkv, rows, kb, vb, layer, start, H, Hkv)
    rk, rv = rk[..., :S, :], rv[..., :S, :]
    assert q.shape == (B, T, H, D) and q.dtype == dtype and q.is_contiguous()
    assert rel_err(q, ref_q) < TOL[dtype]
    assert torch.equal(kb.isnan(), rk.isnan()) and torch.equal(vb.isnan(), rv.isnan())
    assert rel_err(kb.nan_to_num(), rk.nan_to_num()) < TOL[dtype]
    assert torch.equal(vb.nan_to_num(), rv.nan_to_num())                # v is copied, bit for bit
    if start[-1] + T > S:                                   # the case does drop: only S - start slots written
        assert int((~kb[layer, B - 1, 0].isnan()).any(-1).sum()) == S - int(start[-1])


def test_qkv_rope_write_declines_what_it_cannot_take():
    g = gen("qkv_declines")
    B, T, H, Hkv, D = 2, 3, 4, 2, 64
    qkv = randn(g, B, T, (H + 2 * Hkv) * D)
    rows = randn(g, B, T, D)
    kb, vb = torch.zeros(1, 2, Hkv, 16, D, device=DEV), torch.zeros(1, 2, Hkv, 16, D, device=DEV)
    start = torch.tensor([1, 4], device=DEV)
    assert triton_ops.qkv_rope_write(qkv.bfloat16(), rows, kb, vb, 0, start, H, Hkv) is NotImplemented   # dtypes
    assert triton_ops.qkv_rope_write(qkv, rows, kb, vb, 0, start, H + 1, Hkv) is NotImplemented         # widths
    assert triton_ops.qkv_rope_write(qkv, rows, kb[:, :1], vb[:, :1], 0, start, H, Hkv) is NotImplemented  # B_max
    assert triton_ops.qkv_rope_write(qkv, rows.bfloat16(), kb, vb, 0, start, H, Hkv) is NotImplemented
    with use_backend("triton"):                             # declined: the reference runs instead
        q = ops.qkv_rope_write(qkv, rows.bfloat16(), kb, vb, 0, start, H, Hkv)
    ek, ev = torch.zeros_like(kb), torch.zeros_like(vb)
    assert torch.equal(q, reference.qkv_rope_write(qkv, rows.bfloat16(), ek, ev, 0, start, H, Hkv))
    assert torch.equal(kb, ek) and torch.equal(vb, ev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write(dtype):
    g = gen("kv_write", dtype)
    L, Bmax, H, S, D, B, T = 3, 3, 2, 40, 64, 2, 5
    kb, vb = randn(g, L, Bmax, H, S, D, dtype=dtype), randn(g, L, Bmax, H, S, D, dtype=dtype)
    k = randn(g, B, T, H, D, dtype=dtype).transpose(1, 2)   # [B, H, T, D] view, as the model passes it
    v = randn(g, B, T, H, D, dtype=dtype).transpose(1, 2)
    start = torch.tensor([3, 31], device=DEV)
    rk, rv = kb.clone(), vb.clone()
    reference.kv_write(rk, rv, 1, start, k, v)
    triton_ops.kv_write(kb, vb, 1, start, k, v)
    assert torch.equal(kb, rk) and torch.equal(vb, rv)      # written slots right, every other slot untouched


def test_kv_compact():
    g = gen("kv_compact")
    L, Bmax, H, S, D = 3, 3, 2, 48, 128
    kb, vb = randn(g, L, Bmax, H, S, D, dtype=torch.bfloat16), randn(g, L, Bmax, H, S, D, dtype=torch.bfloat16)
    check_kv_compact(triton_ops.kv_compact, kb, vb)


# ---- acceptance ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,B,V,dtype", [("static", 2, 300, torch.float32), ("dynamic", 3, 77, torch.bfloat16),
                                            ("chain", 2, 2000, torch.float32)])
def test_greedy_accept(kind, B, V, dtype, poisoned):
    tokens, logits, retrieve = accept_inputs(kind, B, V, gen("greedy", kind, B, V))
    logits = logits.to(dtype)
    res = triton_ops.greedy_accept(tokens, logits, retrieve)
    ref = reference.greedy_accept(tokens, logits, retrieve)
    same_result(res, ref)


@pytest.mark.parametrize("kind,B,V,temp", [("static", 2, 300, 0.7), ("dynamic", 2, 1500, 1.3)])
def test_typical_accept(kind, B, V, temp, poisoned):
    tokens, logits, retrieve = accept_inputs(kind, B, V, gen("typical", kind, B, V), hit=0.8)
    logits = logits * 2                                     # peaked rows: some nodes clear the threshold
    res = triton_ops.typical_accept(tokens, logits, retrieve, temp, generator=torch.Generator(DEV).manual_seed(5))
    ref = reference.typical_accept(tokens, logits, retrieve, temp, generator=torch.Generator(DEV).manual_seed(5))
    same_result(res, ref)
    assert int(ref.accept_len.max()) > 0                    # the case exercises acceptance, not only bonus
    same_result(triton_ops.typical_accept(tokens, logits, retrieve, 0.0), reference.greedy_accept(tokens, logits, retrieve))


def test_typical_accept_tells_apart_near_certain_paths():
    """Two equally long accepted paths whose log-likelihoods differ by ~1e-6 at logits near 80: the kernel forms
    probabilities as softmax does (exp(x / T - max) / sum), where x / T - logsumexp would round both log-probs
    to 0 (fp32 spacing at 80: 7.6e-6), tie them and take the first path instead of the reference's second."""
    V = 4
    tokens = torch.tensor([[0, 1, 2, 3, 3]], device=DEV)          # root; children A = 1, B = 2; then C = 3 each
    retrieve = torch.tensor([[0, 1, 3], [0, 2, 4]], device=DEV)
    logits = torch.full((1, 5, V), 80.0 - 14.0, device=DEV)
    logits[0, 0, 1] = logits[0, 0, 2] = 80.0                       # p(A) = p(B): the log-likelihood decides
    logits[0, 1, 3] = 80.0                                         # p(C | A) = 1 - 3 e^-14
    logits[0, 2, :] = 80.0 - 15.0
    logits[0, 2, 3] = 80.0                                         # p(C | B) = 1 - 3 e^-15: path 1 is likelier
    for args in ((tokens, logits, retrieve, 1.0), (tokens, logits * 0.5, retrieve, 0.5)):
        ref = reference.typical_accept(*args, generator=torch.Generator(DEV).manual_seed(0))
        res = triton_ops.typical_accept(*args, generator=torch.Generator(DEV).manual_seed(0))
        assert int(ref.accept_len) == 2 and int(ref.best_path) == 1
        same_result(res, ref)


def test_greedy_accept_takes_nan_for_the_max_as_torch():
    """torch.argmax (and the cpu and cuda kernels) rank NaN above every number; so does the Triton kernel."""
    logits = torch.ones(1, 4, 8, device=DEV)
    logits[..., 2] = 1.5
    logits[..., 5] = float("nan")
    tokens = torch.tensor([[0, 5, 5, 5]], device=DEV)
    retrieve = torch.tensor([[0, 1, 2, 3]], device=DEV)
    ref = reference.greedy_accept(tokens, logits, retrieve)
    assert int(ref.accept_len) == 3 and int(ref.next_token) == 5
    same_result(triton_ops.greedy_accept(tokens, logits, retrieve), ref)


# ---- the backend switch --------------------------------------------------------------------------------
def test_backend_switch(monkeypatch):
    monkeypatch.delenv("AMPHISTA_BACKEND", raising=False)
    backend.clear_cache()
    with use_backend("torch"):
        with use_backend(None):                                     # None: no override, the outer choice stays
            assert get_backend("cpu") == "torch"
    cpu_default = "cpu" if backend.cpu_available() else "torch"     # the C++ CPU kernels where built
    assert get_backend("cpu") == cpu_default
    assert backend.resolve("silu_mul", "cpu") == "torch"            # not a cpu-backend op: the reference
    # CUDA default: the fastest available there (triton, as measured on an H200; then cuda, then torch)
    for ext, tri, expect in ((True, True, "triton"), (False, True, "triton"), (True, False, "cuda"),
                             (False, False, "torch")):
        monkeypatch.setattr(backend, "cuda_available", lambda: ext)
        monkeypatch.setattr(backend, "triton_available", lambda: tri)
        backend.clear_cache()
        assert backend.default_backend("cuda") == expect
        assert backend.default_backend("cpu") == cpu_default
    monkeypatch.undo()

    monkeypatch.setenv("AMPHISTA_BACKEND", "Triton")        # the environment variable, any case
    backend.clear_cache()                                   # (it is read once per process otherwise)
    assert get_backend("cpu") == "triton"
    with use_backend("torch"):                              # a scope beats the environment
        assert get_backend("cpu") == "torch"
        with use_backend("cuda"):
            assert get_backend("cpu") == "cuda"
        assert get_backend("cpu") == "torch"
    set_backend("torch")                                    # process-wide beats the environment too
    assert get_backend("cpu") == "torch"
    set_backend(None)
    assert get_backend("cpu") == "triton"

    for bad in ("tritonn", "", 3):
        with pytest.raises(ConfigError, match="unknown kernel backend"):
            set_backend(bad)
        with pytest.raises(ConfigError):
            with use_backend(bad):
                pass
    monkeypatch.setenv("AMPHISTA_BACKEND", "fast")
    backend.clear_cache()
    with pytest.raises(ConfigError, match="AMPHISTA_BACKEND") as e:
        ops.rmsnorm(torch.ones(2, 4), torch.ones(4), 1e-6)  # the first hot op reports it, by name
    assert isinstance(e.value, AmphistaError) and "torch, triton, cuda, cpu" in str(e.value)


def test_backend_env_var_in_a_fresh_process():
    code = ("import torch; from amphista_engine.kernels import get_backend, backend; "
            "print(get_backend('cpu'), backend.resolve('rope', 'cpu'))")
    cpu_default = "cpu torch" if backend.cpu_available() else "torch torch"     # rope: not a cpu-backend op
    for env, expect in (({}, cpu_default), ({"AMPHISTA_BACKEND": "triton", "TRITON_INTERPRET": "1"}, "triton triton"),
                        ({"AMPHISTA_BACKEND": "triton"}, "triton torch")):   # no interpreter: reference on CPU
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env=_subprocess_env(**env), timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        if torch.cuda.is_available() and not env:
            continue                                        # default on a GPU machine depends on what is built
        assert r.stdout.split()[-2:] == expect.split(), (env, r.stdout)


def test_backend_chain_and_fallback(monkeypatch):
    monkeypatch.delenv("AMPHISTA_BACKEND", raising=False)
    with use_backend("triton"):
        assert backend.resolve("tree_attention", DEV) == "triton"
        assert backend.resolve("no_such_op", DEV) == "torch"
        if DEV.type == "cpu":                               # compiled Triton cannot run on host memory
            monkeypatch.setattr(backend, "triton_interpreting", lambda: False)
            backend.clear_cache()
            assert backend.resolve("tree_attention", "cpu") == "torch"
            x, w = torch.randn(3, 8), torch.ones(8)
            torch.testing.assert_close(ops.rmsnorm(x, w, 1e-6), reference.rmsnorm(x, w, 1e-6))
            monkeypatch.undo()
            backend.clear_cache()
    with use_backend("triton"):                             # autograd: the reference, gradients flow
        x = torch.randn(2, 3, 16, device=DEV)
        w = torch.ones(16, device=DEV, requires_grad=True)
        ops.rmsnorm(x, w, 1e-6).sum().backward()
        assert w.grad is not None and torch.isfinite(w.grad).all()
    with use_backend("cuda"):                               # ops the cuda backend lacks run on triton
        expect = "triton" if DEV.type == "cpu" or not backend.cuda_available() else "cuda"
        assert backend.resolve("rmsnorm", DEV) == expect
        assert backend.resolve("tree_attention", DEV) == expect
        assert backend.resolve("typical_accept", DEV) == "triton"        # not in the cuda backend


def test_a_backend_that_cannot_run_here_is_named_at_load(monkeypatch, tiny_hf_dir):
    """The chain falls back op by op without a word; the engine says so once, naming the backend and why."""
    from amphista_engine import Engine
    monkeypatch.delenv("AMPHISTA_BACKEND", raising=False)
    backend.clear_cache()
    assert backend.unmet_choice("cpu") is None                          # nothing picked by name
    with use_backend("torch"):
        assert backend.unmet_choice("cpu") is None
    with use_backend("cuda"):
        msg = backend.unmet_choice("cpu")
        # the chain's next backend: triton through its interpreter (CI), else torch (a GPU machine, no interpreter)
        served = "triton" if backend.triton_interpreting() else "torch"
        assert "'cuda'" in msg and "CUDA tensors only" in msg and f"run on '{served}'" in msg, msg
    monkeypatch.setattr(backend, "triton_interpreting", lambda: False)
    backend.clear_cache()
    with use_backend("triton"):
        assert "TRITON_INTERPRET=1" in backend.unmet_choice("cpu") and "run on 'torch'" in backend.unmet_choice("cpu")
        with pytest.warns(UserWarning, match="kernel backend 'triton' does not run on cpu"):
            Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=64)
    if backend.cpu_available():
        with use_backend("cpu"):
            assert backend.unmet_choice("cpu") is None
    monkeypatch.undo()
    backend.clear_cache()


# ---- end to end ----------------------------------------------------------------------------------------
def test_op_chain_verify_step_matches_torch():
    """One layer's verification step built from the ops gives identical accept results and caches on the
    triton and torch backends."""
    check_verify_step("triton", "tree-16", H=4, S=96, prefix=[21, 50], dtype=torch.float32, tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_model_logits_same_on_both_backends(dtype, monkeypatch):
    """A tiny random Transformer's prefill, decode and tree-verification logits agree on the triton and
    torch backends, and the per-layer fusions (qkv_rope_write, silu_mul, add_rmsnorm) ran on triton."""
    from conftest import random_tiny_model
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import AttentionSpec, causal_mask

    model = random_tiny_model(seed=11, vocab=64, dim=64, heads=4, kv_heads=1, inter=96, dtype=dtype).to(DEV)
    with torch.no_grad():
        for name, p in model.named_parameters():            # norms that are not the identity
            if name.endswith("norm.weight"):
                p.copy_(randn(gen("model_norms", name), *p.shape, scale=0.2) + 1)
    tree = build_tree("tree-16")
    tokens = torch.randint(0, 64, (2, 5 + 2 + tree.num_nodes), generator=gen("model_tokens")).to(DEV)
    calls = []
    for op in ("qkv_rope_write", "silu_mul", "add_rmsnorm"):
        real = getattr(triton_ops, op)
        monkeypatch.setattr(triton_ops, op, lambda *a, _op=op, _real=real: calls.append(_op) or _real(*a))

    def run(name):
        cache = KVCache.for_model(model.config, 2, 64, dtype, DEV)
        length = torch.tensor([5, 3], device=DEV)           # row 1's prompt is shorter
        out = []
        with use_backend(name), torch.inference_mode():
            spec = AttentionSpec(torch.zeros(2, dtype=torch.long, device=DEV), causal_mask(5, DEV), kv_len=40)
            out.append(model(tokens[:, :5], torch.arange(5, device=DEV).expand(2, 5), cache, spec))
            for i in range(2):
                spec = AttentionSpec(length, causal_mask(1, DEV), kv_len=40)
                out.append(model(tokens[:, 5 + i:6 + i], length[:, None], cache, spec))
                length = length + 1
            spec = AttentionSpec(length, tree.mask[None].to(DEV), kv_len=40)
            out.append(model(tokens[:, 7:], length[:, None] + tree.depth.to(DEV), cache, spec))
        return out

    ref = run("torch")
    assert not calls
    got = run("triton")
    L = model.config.n_layers
    assert calls.count("qkv_rope_write") == calls.count("silu_mul") == 4 * L and calls.count("add_rmsnorm") == 8 * L
    for a, b in zip(got, ref):
        assert rel_err(a, b) < TOL[dtype]


def test_speculative_greedy_same_on_both_backends():
    """Speculative greedy decoding with Amphista heads emits the same tokens on the triton and torch
    backends (the engine routes its hot ops through kernels.ops)."""
    from amphista_engine.heads import random_heads
    from conftest import random_tiny_model
    from test_speculative import spec_ids

    model = random_tiny_model(seed=5, vocab=64, dim=64, heads=4, kv_heads=2, inter=64)   # head_dim 16
    heads = random_heads("amphista", model, num_heads=3, seed=2)
    # 6 tokens: a prefill and 5 tree-16 verifications (each ~1 s in the interpreter), all in one 64-key tile
    with use_backend("torch"):
        ref, _, _ = spec_ids(model, heads, "tree-16", [5, 9, 2, 33, 17], 6, eos=[])
    with use_backend("triton"):
        got, _, _ = spec_ids(model, heads, "tree-16", [5, 9, 2, 33, 17], 6, eos=[])
    assert got == ref


# ---- offline GPU compilation and benchmarks ------------------------------------------------------------
def _subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AMPHISTA_BACKEND")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpus(arch):
    """The interpreter checks semantics only; Triton's real compiler (to cubin, no GPU needed) checks types,
    layouts and shared memory of every bf16 kernel variant the launchers produce, for H100/H200 (sm_90) and
    A100 (sm_80, where programmatic dependent launch does not exist and is never asked for)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == divmod(arch, 10):
        # 43 s of the GPU suite's test stage on an H100: there the GPU tests compile and run these kernels for real
        pytest.skip(f"this machine's GPU is sm_{arch}: its GPU tests compile the kernels for real")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        pytest.skip("triton without its NVIDIA backend")
    r = subprocess.run([sys.executable, "-m", "amphista_engine.kernels.compile_check", "--arch", str(arch), "--quick"],
                       capture_output=True, text=True, cwd=ROOT, env=_subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 failed" in r.stdout
    # the decode chain's kernels also with programmatic dependent launch (AMPHISTA_PDL=1) where it exists
    pdl = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("ok") and line.endswith(" pdl")}
    if arch >= 90:
        assert {"_linear_kernel", "_rmsnorm_kernel", "_silu_mul_kernel", "_qkv_rope_write_kernel", "_tree_attn_fwd",
                "_tree_attn_merge"} <= pdl, r.stdout
    else:
        assert not pdl, r.stdout


def test_pdl_only_where_it_can_run(monkeypatch):
    """AMPHISTA_PDL=1 asks for programmatic dependent launch; tensors off CUDA (and the interpreter) never get
    it, so no launch keyword reaches a Triton that could not take it."""
    from amphista_engine.errors import ConfigError
    from amphista_engine.kernels.backend import PDL_ENV, pdl_wanted
    from amphista_engine.kernels.linear_setup import LinearSetup
    from amphista_engine.kernels.triton_kernels import common
    monkeypatch.delenv(PDL_ENV, raising=False)
    assert pdl_wanted()                                   # the default: on wherever it can run
    for raw, on in (("1", True), ("auto", True), (" ON ", True), ("0", False), ("off", False)):
        monkeypatch.setenv(PDL_ENV, raw)
        assert pdl_wanted() is on
    monkeypatch.setenv(PDL_ENV, "1")
    with backend.without_pdl():                           # the routed choice times its GEMMs so
        assert not pdl_wanted()
    assert pdl_wanted()
    monkeypatch.setenv(PDL_ENV, "yes please")
    with pytest.raises(ConfigError, match="AMPHISTA_PDL='yes please'.*use auto or 1"):
        LinearSetup.for_device("cuda", torch.bfloat16)    # refused at load, before any launch
    LinearSetup.for_device("cpu", torch.float32)          # the CPU never launches with PDL: not asked there
    monkeypatch.setenv(PDL_ENV, "1")
    assert not common.pdl(torch.device("cpu")) and common.pdl_launch(False) == {}
    assert common.pdl_launch(True) == {"launch_pdl": True}
    x = randn(gen("pdl"), 3, 64)
    assert rel_err(triton_ops.rmsnorm(x, torch.ones(64, device=DEV), 1e-5),
                   reference.rmsnorm(x, torch.ones(64, device=DEV), 1e-5)) < TOL[torch.float32]


def test_benchmarks_run_quick(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmarks/kernels/run_all.py", "--quick", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=_subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    kernels = {row["kernel"] for row in data["rows"]}
    assert {"tree_attention", "head_attention", "fused_sal_input", "rmsnorm", "rope", "silu_mul", "linear",
            "qkv_rope_write", "kv_write", "kv_compact", "greedy_accept", "typical_accept"} <= kernels
    assert all(math.isfinite(row["ms"]) and row["ms"] > 0 for row in data["rows"])


def test_tune_sweeps_run_quick(tmp_path):
    """benchmarks/kernels/tune.py (the GPU launch-parameter sweeps) on tiny shapes in the interpreter: every
    variant it times was first checked against the reference, and the heuristic's choice is among them."""
    r = subprocess.run([sys.executable, "benchmarks/kernels/tune.py", "--quick", "--reps", "1", "--budget", "6",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       env=_subprocess_env(TRITON_INTERPRET="0" if torch.cuda.is_available() else "1"), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    timed = [x for x in rows if x["status"] == "ok"]
    assert timed and all(x["rel_err"] < 2e-2 and x["us"] > 0 for x in timed)
    assert not [x for x in rows if x["status"] not in ("ok", "skipped (budget)")]
    assert {"triton tree_attention", "triton fused_sal_input"} <= {x["op"] for x in timed}
    assert any(x["default"] for x in timed)
    assert "## Best vs default per case" in (tmp_path / "tune.md").read_text()
