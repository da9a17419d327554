"""Desk-check QA of the CUDA backend's kernels rewritten on 2026-12-04 (csrc/tree_attention.cuh: cp.async chunks,
split ranges from the host's kv_len, in-launch merge; csrc/head_attention.cuh: a warp per (request, head, slot))
and of their wrappers (kernels/cuda_ops.py).

The GPU tests (they skip without a device) cover the edges test_cuda_kernels.py leaves out: a window kv_len that
is not a multiple of the 64-key chunk and ends at the cache's last slot, a window shorter than one chunk, more
splits than chunks, a window far past the rows' ends, two row tiles with a partial last one merged in the kernel,
a fully masked row, head dims that are not multiples of 32, and whole decodes on the cuda backend through CUDA
graphs. Slots nothing may read hold NaN, outputs start as NaN (`poisoned`), and the reference runs in fp32 on
the CPU. The CPU tests run the numpy transcription of the tree kernel (test_cuda_kernels._emulate_tree_attention)
at the same edges, and check that the wrappers decline a softmax scale the bindings would refuse.
"""
from __future__ import annotations

import random
import zlib

import pytest
import torch

from amphista_engine._ext import load_extension
from amphista_engine.kernels import backend, cuda_ops, reference, split_merge, use_backend

from kernel_checks import DEV, TOL, gen, rand_tree, randn, rel_err
from test_cuda_kernels import _emulate_tree_attention

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


def _masks(kind: str, B: int, N: int, seed: int) -> torch.Tensor:
    """Bool [B, N, N] node masks: causal, a random tree per row, or causal with node 0 seeing nothing."""
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    if kind == "tree":
        rng = random.Random(seed)
        return torch.stack([rand_tree(N, 6, rng) for _ in range(B)])
    m = causal[None].repeat(B, 1, 1)
    if kind == "masked":
        m[:, 0] = False
    return m


# ---- GPU: tree attention at the window, split and tile edges ------------------------------------------------
# B, H, H_kv, N, D, dtype, prefixes, kv_len (= S: the window ends at the cache's last slot), splits, mask kind
EDGE_CASES = [
    (2, 8, 2, 5, 128, torch.bfloat16, [37, 995], 1000, None, "tree"),   # kv_len % 64 = 40, heuristic splits
    (2, 8, 2, 5, 128, torch.bfloat16, [37, 995], 1000, 3, "tree"),      # the last split ends in a partial chunk
    (1, 4, 4, 3, 64, torch.float16, [10], 13, 1, "causal"),             # the whole window below one chunk
    (1, 2, 1, 64, 128, torch.bfloat16, [128], 192, 2, "tree"),          # 64 nodes fill the last chunk exactly
    (2, 4, 2, 4, 64, torch.bfloat16, [10, 0], 1024, 8, "tree"),         # most splits see only masked keys
    (2, 8, 8, 1, 128, torch.float16, [129, 0], 130, 7, "causal"),       # more splits than chunks
    (2, 6, 2, 30, 64, torch.float16, [200, 77], 256, 3, "tree"),        # GQA 3: 90 rows, two tiles, last partial
    (1, 8, 1, 64, 128, torch.bfloat16, [300], 364, 4, "tree"),          # GQA 8 x 64 nodes: 8 row tiles
    (3, 32, 4, 1, 64, torch.float16, [1500, 3, 700], 1501, None, "causal"),  # decoding, kv_len = max + 1
    (2, 4, 2, 4, 64, torch.bfloat16, [0, 50], 54, 2, "masked"),         # node 0 of row 0 sees no key at all
]


def _edge_inputs(case):
    B, H, Hkv, N, D, dtype, prefixes, kv_len, _, kind = case
    g = gen("cudareview-tree", case)
    S = kv_len
    prefix = torch.tensor(prefixes, device=DEV)
    # The cache is a view of a bigger buffer: one spare batch row and 64 slots past S, all NaN, so a read past
    # the window or into another row poisons the output instead of passing by luck.
    k_full = torch.full((B + 1, Hkv, S + 64, D), float("nan"), dtype=dtype, device=DEV)
    v_full = k_full.clone()
    k_full[:B, :, :S] = randn(g, B, Hkv, S, D, dtype=dtype)
    v_full[:B, :, :S] = randn(g, B, Hkv, S, D, dtype=dtype)
    k, v = k_full[:, :, :S], v_full[:, :, :S]
    for b in range(B):
        end = prefixes[b] + N
        k[b, :, end:], v[b, :, end:] = 60.0, 60.0          # past the row's tokens: never attended
    q = randn(g, B, N, H, D, dtype=dtype).transpose(1, 2)
    bits = reference.mask_bits(_masks(kind, B, N, zlib.crc32(repr(case).encode()))).to(DEV)
    return q, k, v, prefix, bits, kv_len


def _cpu_ref(q, k, v, prefix, bits, kv_len):
    B = q.shape[0]
    return reference.tree_attention(q.float().cpu(), k[:B].float().cpu(), v[:B].float().cpu(), prefix.cpu(),
                                    bits.cpu(), kv_len)


@needs_gpu
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}N{c[3]}D{c[4]}-"
                                                             f"{str(c[5])[6:]}-len{c[7]}-s{c[8]}-{c[9]}")
def test_tree_attention_edges(case, poisoned):
    if load_extension() is None:
        pytest.skip("extension not built")
    q, k, v, prefix, bits, kv_len = _edge_inputs(case)
    B, H, N, D = q.shape
    splits = case[8]
    ref = _cpu_ref(q, k, v, prefix, bits, kv_len)
    for b in range(B):                                     # the kernel may read K up to kv_len: stale NaN there
        k[b, :, int(prefix[b]) + N:], v[b, :, int(prefix[b]) + N:] = float("nan"), float("nan")
    outs = {}
    for merge in ("launch", "kernel"):
        out = cuda_ops.tree_attention(q, k, v, prefix, bits, kv_len, splits=splits, merge=merge)
        assert out is not NotImplemented
        torch.cuda.synchronize()
        assert out.shape == (B, H, N, D) and torch.isfinite(out).all(), merge
        assert rel_err(out.cpu(), ref) < TOL[q.dtype], (merge, rel_err(out.cpu(), ref))
        outs[merge] = out
    assert torch.equal(outs["launch"], outs["kernel"])     # the same sums in the same order
    assert int(split_merge.arrival_counters(q.device, 1).count_nonzero()) == 0    # every counter re-armed
    if case[9] == "masked":                                # no key: zeros, as the reference (SDPA) gives
        assert (outs["kernel"][0, :, 0] == 0).all()


# ---- GPU: head attention at head dims off the 32-lane grid --------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("N,K,d,heads,dtype,pos,scale", [(5, 6, 160, 4, torch.float16, True, None),     # hd 40
                                                         (3, 3, 400, 2, torch.bfloat16, False, None),   # hd 200
                                                         (2, 64, 512, 2, torch.float16, True, None),    # hd 256
                                                         (1, 1, 32, 1, torch.float32, False, 0.3),      # one slot
                                                         (33, 4, 2048, 16, torch.bfloat16, True, None)])  # 2112 warps
def test_head_attention_edges(N, K, d, heads, dtype, pos, scale, poisoned):
    if load_extension() is None:
        pytest.skip("extension not built")
    g = gen("cudareview-head", N, K, d, heads, dtype)
    z = randn(g, N, K, d, dtype=dtype)
    pe = randn(g, K, d, dtype=dtype) if pos else None
    w = randn(g, d, dtype=dtype, scale=0.5) + 1
    wqkv = randn(g, 3 * d, d, dtype=dtype, scale=d ** -0.5)
    rx, ra = reference.head_attention(z, pe, w, 1e-5, wqkv, heads, scale)
    got = cuda_ops.head_attention(z, pe, w, 1e-5, wqkv, heads, scale)
    assert got is not NotImplemented
    torch.cuda.synchronize()
    x, a = got
    assert torch.isfinite(a).all()
    assert rel_err(x, rx) < TOL[dtype] and rel_err(a, ra) < TOL[dtype], (rel_err(x, rx), rel_err(a, ra))


# ---- GPU: whole decodes on the cuda backend, eager vs CUDA graphs --------------------------------------------
@needs_gpu
def test_cuda_backend_decodes_the_same_through_graphs(monkeypatch):
    """Plain and Amphista (64-node tree: tree attention with N = 64, AEB head attention) decoding with
    AMPHISTA_BACKEND=cuda: graph replays emit the eager tokens, nothing fails to capture (a host sync in a
    wrapper would), and the cuda kernels really ran (not a fallback)."""
    from amphista_engine.cuda_graphs import DecodeGraphs
    from amphista_engine.generation import PlainDecoder
    from amphista_engine.heads import random_heads
    from amphista_engine.sampling import SamplingParams
    from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
    from test_cuda_graphs import _setup, decode

    if load_extension() is None:
        pytest.skip("extension not built")
    ran = {"tree_attention": 0, "head_attention": 0}
    for op in ran:
        real = getattr(cuda_ops, op)

        def counted(*a, _real=real, _op=op, **k):
            out = _real(*a, **k)
            ran[_op] += out is not NotImplemented
            return out
        monkeypatch.setattr(cuda_ops, op, counted)
    model, cache, prompts = _setup("cuda")
    heads = random_heads("amphista", model, num_heads=4, seed=2)
    spec = TreeSpec("mc_sim_7b_63", 4, torch.device("cuda"))
    with use_backend("cuda"):
        assert backend.resolve("tree_attention", DEV) == "cuda"
        for make in (lambda: PlainDecoder(model, cache, SamplingParams()),
                     lambda: SpeculativeDecoder(model, cache, heads, spec, SamplingParams())):
            eager, _ = decode(make(), prompts, 40)      # row 2 (90 prompt tokens) crosses the 128-slot bucket
            graphs = DecodeGraphs()
            got, _ = decode(make(), prompts, 40, graphs=graphs)
            assert got == eager
            assert graphs.stats.failed_captures == 0 and graphs.stats.replays > 0, graphs.stats.to_dict()
    assert ran["tree_attention"] > 0 and ran["head_attention"] > 0, ran


# ---- CPU: the tree kernel's data flow at the same edges (numpy transcription) -------------------------------
@pytest.mark.parametrize("case", [(2, 2, 1, 5, 64, [37, 195], 200, 2, "tree"),     # kv_len = S, % 64 = 8
                                  (1, 2, 2, 3, 64, [10], 13, 1, "causal"),         # below one chunk
                                  (2, 2, 2, 1, 64, [129, 0], 130, 7, "causal"),    # more splits than chunks
                                  (1, 3, 1, 30, 64, [20], 128, 2, "tree"),         # two row tiles, last partial
                                  (2, 2, 1, 4, 64, [0, 50], 54, 2, "masked")],     # a row that sees no key
                         ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}N{c[3]}-len{c[6]}-s{c[7]}-{c[8]}")
def test_tree_attention_data_flow_at_edges_emulated(case):
    B, H, Hkv, N, D, prefixes, kv_len, splits, kind = case
    g = gen("cudareview-emulated", case)
    prefix = torch.tensor(prefixes)
    # exactly kv_len slots: a copy past the window would index past the array and raise
    k = torch.randn(B, Hkv, kv_len, D, generator=g).bfloat16().float()
    v = torch.randn(B, Hkv, kv_len, D, generator=g).bfloat16().float()
    q = torch.randn(B, N, H, D, generator=g).bfloat16().float().transpose(1, 2)
    bits = reference.mask_bits(_masks(kind, B, N, zlib.crc32(repr(case).encode())))
    ref = reference.tree_attention(q, k, v, prefix, bits, kv_len)
    for b in range(B):
        k[b, :, prefixes[b] + N:], v[b, :, prefixes[b] + N:] = float("nan"), float("nan")
    out = _emulate_tree_attention(q.numpy(), k.numpy(), v.numpy(), prefix.numpy(), bits, kv_len, splits, D ** -0.5)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 5e-3
    if kind == "masked":
        assert (out[0, :, 0] == 0).all() and (ref[0, :, 0] == 0).all()


# ---- CPU: what the wrappers decline before the bindings would raise -----------------------------------------
class _FakeLaunch:
    """cuda_ops._Launch without a device: the real extension, whose argument checks run before any CUDA call."""

    def __init__(self, dev):
        pass

    def __enter__(self):
        return load_extension(), 0

    def __exit__(self, *exc):
        return False


def wrappers_on_cpu(monkeypatch):
    """cuda_ops' wrappers called on CPU tensors as if on a GPU, down to the real bindings' argument checks."""
    if load_extension() is None:
        pytest.skip("extension not built")
    monkeypatch.setattr(cuda_ops, "_ready", lambda dev: True)
    monkeypatch.setattr(cuda_ops, "_on", lambda dev, *ts: True)
    monkeypatch.setattr(cuda_ops, "_Launch", _FakeLaunch)
    monkeypatch.setattr(cuda_ops, "num_splits", lambda *a: 1)


@pytest.mark.parametrize("scale", [-0.5, float("nan"), float("inf"), 2e6])
def test_wrappers_decline_a_scale_the_bindings_refuse(scale, monkeypatch):
    """The bindings take a softmax scale in [0, 1e6] and raise ValueError otherwise; the other backends take any
    scale, so cuda_ops must decline (NotImplemented: the dispatcher falls through) instead of raising. Before
    the fix head_attention passed every scale on and tree_attention only checked finite and >= 0."""
    wrappers_on_cpu(monkeypatch)
    monkeypatch.setattr(cuda_ops, "rmsnorm", reference.rmsnorm)
    monkeypatch.setattr(cuda_ops, "add_rmsnorm", reference.add_rmsnorm)
    z = torch.randn(2, 4, 64)
    assert cuda_ops.head_attention(z, None, torch.ones(64), 1e-5, torch.randn(192, 64), 2, scale) \
        is NotImplemented
    q = torch.randn(1, 4, 3, 64, dtype=torch.bfloat16)
    kc = torch.randn(1, 2, 16, 64, dtype=torch.bfloat16)
    bits = reference.mask_bits(torch.ones(3, 3, dtype=torch.bool).tril()[None])
    prefix = torch.zeros(1, dtype=torch.long)
    assert cuda_ops.tree_attention(q, kc, kc, prefix, bits, 16, scale) is NotImplemented
