"""ops.tree_attention's sliding window (`window`, `positions`): every backend the CPU runs (the torch reference, the
cpu backend's C++ kernel, and Triton in its interpreter) against a dense-mask SDPA oracle
built here from the rule itself (a query at position p sees key positions in (p - window, p] among what its tree
mask lets it see; prefix slot s holds position s, new slot prefix_len + j holds positions[b, j]); the model's
sliding layers past their window on the triton backend (KernelWindow, no WindowMask built) decoding as the torch
backend's WindowMask path, plain and speculative.

Before the kernel windowed keys itself, every decode and tree step of a sliding layer past its window built a dense
[B, T, kv_len] mask and ran SDPA per layer on every backend, GPU kernels included."""
from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is imported anywhere

import pytest
import torch.nn.functional as F

from amphista_engine.errors import AmphistaError, ConfigError, InputError
from amphista_engine.kernels import cpu_available, ops, reference, use_backend

from kernel_checks import DEV, TOL, fresh_backend, gen, randn, rel_err  # noqa: F401  (autouse)
from kernel_checks import tree_bits as _tree_bits
from test_cuda_static_review_qa import stub_bindings  # noqa: F401  (the fixture: bindings.cpp on stub kernels)
from test_kernels_triton import position_invariant_dot  # noqa: F401  (the fixture: an order-invariant tl.dot)

triton = pytest.importorskip("triton")
from amphista_engine.kernels import triton_ops  # noqa: E402  (imports triton)

BLOCK_N = 64        # the Triton kernel's key tile: it loads nothing below the tile of its lowest window start




def oracle(q, k, v, prefix, anc, pos, window, kv_len):
    """fp32 SDPA over slots [0, kv_len) with the mask built key by key from the rule."""
    B, H, N, D = q.shape
    vis = torch.zeros(B, N, kv_len, dtype=torch.bool)
    for b in range(B):
        P = int(prefix[b])
        for i in range(N):
            p = int(pos[b if pos.shape[0] > 1 else 0, i])
            for s in range(kv_len):
                if s < P:
                    vis[b, i, s] = p - window < s <= p
                elif s - P < N and anc[b if anc.shape[0] > 1 else 0, i, s - P]:
                    kp = int(pos[b if pos.shape[0] > 1 else 0, s - P])
                    vis[b, i, s] = p - window < kp <= p
    return F.scaled_dot_product_attention(q.float(), k[:B, :, :kv_len].float(), v[:B, :, :kv_len].float(),
                                          attn_mask=vis[:, None].to(q.device), enable_gqa=True)


# B, H, H_kv, N, D, dtype, mask kind, splits (Triton; None = heuristic)
CASES = [
    (1, 4, 4, 1, 64, torch.float32, "causal", None),        # plain decoding, MHA (GQA 1)
    (2, 8, 2, 16, 128, torch.bfloat16, "dynamic", 3),       # a 16-node tree per row, GQA 4, 3 splits
    (2, 4, 1, 5, 64, torch.bfloat16, "causal", None),       # odd N, GQA 4
    (1, 4, 4, 16, 128, torch.float32, "static", 2),         # a 16-deep chain: the window cuts tree keys too
    (2, 4, 2, 16, 64, torch.float32, "wide", None),         # a deep branch behind 8 siblings: slot != position
]
# the window against row 0's prefix of 151 (odd): smaller, equal, larger, and shorter than the tree
WINDOWS = {"lt": 37, "eq": 151, "gt": 400, "tiny": 3}


def _inputs(case, wname):
    B, H, Hkv, N, D, dtype, kind, _ = case
    g = gen("tree_attention_window", case, wname)
    S = 240
    prefix = torch.randint(0, 140, (B,), generator=g)
    prefix[0] = 151
    if B > 1:
        prefix[1] = 66                                      # another length: its own window start
    kv_len = int(prefix.max()) + N + 7                      # a bucketed bound past the longest row
    k = randn(g, B, Hkv, S, D, dtype=dtype)
    v = randn(g, B, Hkv, S, D, dtype=dtype)
    k[:, :, kv_len:], v[:, :, kv_len:] = float("nan"), float("nan")     # past kv_len: never read
    for b in range(B):
        end = int(prefix[b]) + N
        k[b, :, end:kv_len], v[b, :, end:kv_len] = 50.0, 50.0         # past the row's end: never attended
    q = randn(g, B, N, H, D, dtype=dtype).transpose(1, 2)              # the model's layout: a transposed view
    bits = _wide_tree(N) if kind == "wide" else _tree_bits(kind, B, N, g)
    anc = reference.bits_to_mask(bits.reshape(-1, N).cpu(), N)
    pos = (prefix[:, None] + anc.sum(-1) - 1).to(DEV)                  # position = prefix + depth
    return q, k, v, prefix.to(DEV), bits, anc, pos, kv_len


def _wide_tree(N):
    """Root 0, children 1..8, then a chain from node 8 on: node j >= 9 sits at depth j - 7, so a key's slot is up
    to 7 past its position and only explicit positions window it right."""
    anc = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        parent = -1 if i == 0 else (0 if i <= 8 else i - 1)
        anc[i, i] = True
        if parent >= 0:
            anc[i] |= anc[parent]
    return reference.mask_bits(anc[None]).to(DEV)


def _ids(c):
    return f"B{c[0]}H{c[1]}kv{c[2]}N{c[3]}D{c[4]}-{str(c[5])[6:]}-{c[6]}-s{c[7]}"


@pytest.mark.parametrize("wname", list(WINDOWS))
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_window_matches_the_oracle(case, wname, poisoned):
    q, k, v, prefix, bits, anc, pos, kv_len = _inputs(case, wname)
    W = WINDOWS[wname]
    B, dtype, splits = q.shape[0], q.dtype, case[7]
    ref = oracle(q, k, v, prefix, anc, pos, W, kv_len)
    # Below the tile of a program's lowest window start nothing may be loaded: NaN there would reach 0 * NaN.
    for b in range(B):
        first = max(0, min(int(pos[b].min()) - W + 1, int(prefix[b]))) // BLOCK_N * BLOCK_N
        k[b, :, :first], v[b, :, :first] = float("nan"), float("nan")
    from amphista_engine.kernels.triton_kernels.tree_attention import tree_attention as kernel
    out = kernel(q, k, v, prefix, bits, kv_len, num_splits=splits, sliding=W, positions=pos)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    # through ops and the backend table, as the model calls it (no fallback to the reference: it declines nothing)
    via = triton_ops.tree_attention(q, k, v, prefix, bits, kv_len, window=W, positions=pos)
    assert via is not NotImplemented and rel_err(via, ref) < TOL[dtype]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a GPU (its sources compile in "
                                                           "test_cuda_build.py)")
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("wname", list(WINDOWS))
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cuda_window_matches_the_oracle(case, wname, splits, poisoned):
    from amphista_engine.kernels import cuda_ops
    from kernel_checks import cuda_extension
    cuda_extension()
    case = (*case[:5], torch.bfloat16 if case[5] == torch.float32 else case[5], *case[6:])   # half types only
    q, k, v, prefix, bits, anc, pos, kv_len = _inputs(case, wname)
    W = WINDOWS[wname]
    ref = oracle(q, k, v, prefix, anc, pos, W, kv_len)
    for b in range(q.shape[0]):        # the kernel's 64-key chunks below the block's lowest window start: unread
        first = max(0, min(int(pos[b].min()) - W + 1, int(prefix[b]))) // 64 * 64
        k[b, :, :first], v[b, :, :first] = float("nan"), float("nan")
    for merge in ("kernel", "launch"):
        out = cuda_ops.tree_attention(q, k, v, prefix, bits, kv_len, splits=splits, merge=merge, window=W,
                                      positions=pos)
        assert out is not NotImplemented and torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL[q.dtype]


def _ordered_inputs(dtype, Hkv, D, tag):
    from amphista_engine.kernels import gpu_exact
    from amphista_engine.tree import dynamic_tree
    g = gen("ordered_window", dtype, Hkv, D, tag)
    B, H = 2, 4
    dt = dynamic_tree(torch.zeros(B, dtype=torch.long), torch.randn(B, 4, 12, generator=g), 12, topk=3)
    mask = dt.mask.to(DEV)                                              # per-row trees, depth <= 4
    N = mask.shape[-1]
    prefix = torch.tensor([gpu_exact.CHUNK + 37, 90], device=DEV)     # two prefix splits in row 0
    S = gpu_exact.CHUNK + 200
    kv_len = -(-(int(prefix.max()) + N) // 128) * 128
    k, v = randn(g, B, Hkv, S, D, dtype=dtype), randn(g, B, Hkv, S, D, dtype=dtype)
    q = randn(g, B, N, H, D, dtype=dtype).transpose(1, 2)
    pos = prefix[:, None] + mask.sum(-1) - 1
    return q, k, v, prefix, mask, pos, kv_len


# windows: into the first prefix split, at the split's edge, inside the per-token key window, past everything
ORDERED_WINDOWS = [100, 256, 3, 1000]


@pytest.mark.parametrize("W", ORDERED_WINDOWS)
@pytest.mark.parametrize("dtype,Hkv,D", [(torch.bfloat16, 2, 64), (torch.float32, 1, 128)])
def test_ordered_path_window_matches_the_oracle(dtype, Hkv, D, W, poisoned):
    """The GPU's row-invariant decode steps (kernels/gpu_exact.py, AMPHISTA_EXACT_GREEDY=1) window in the ordered
    kernel too: before, their sliding layers took the WindowMask's SDPA, which is not row-invariant."""
    from amphista_engine.kernels import gpu_exact
    q, k, v, prefix, mask, pos, kv_len = _ordered_inputs(dtype, Hkv, D, W)
    ref = oracle(q, k, v, prefix, mask.cpu(), pos.cpu(), W, kv_len)
    order = gpu_exact.layout(prefix, mask)
    with use_backend("torch"):                                          # the reference ignores order, windows alike
        out = ops.tree_attention(q, k, v, prefix, order.bits, kv_len, order=order, window=W, positions=pos)
    assert rel_err(out, ref) < TOL[dtype]
    for b in range(q.shape[0]):         # whole tiles below a row block's lowest window start: never loaded
        first = max(0, int(pos[b].min()) - W + 1) // BLOCK_N * BLOCK_N
        k[b, :, :first], v[b, :, :first] = float("nan"), float("nan")
    out = triton_ops.tree_attention(q, k, v, prefix, order.bits, kv_len, order=order, window=W, positions=pos)
    assert out is not NotImplemented and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("W", [100, 3])
def test_ordered_path_window_is_row_invariant(W, poisoned, position_invariant_dot):  # noqa: F811
    """Each tree node's windowed output equals, bit for bit, a plain one-token step for the same token over a cache
    holding its ancestors in position order (another kv_len, nothing else in the step): what keeps speculative
    greedy equal to plain greedy on a sliding model past its window."""
    from amphista_engine.kernels import gpu_exact
    q, k, v, prefix, mask, pos, kv_len = _ordered_inputs(torch.float32, 2, 64, ("inv", W))
    order = gpu_exact.layout(prefix, mask)
    out = triton_ops.tree_attention(q, k, v, prefix, order.bits, kv_len, order=order, window=W, positions=pos)
    one = torch.ones(1, 1, 1, dtype=torch.bool, device=DEV)
    N = mask.shape[-1]
    for b in range(q.shape[0]):
        for i in (0, N // 2, N - 1):
            anc = mask[b, i].nonzero().flatten()
            P = int(prefix[b])
            kp, vp = k[b:b + 1].clone(), v[b:b + 1].clone()
            kp[:, :, P:P + len(anc)], vp[:, :, P:P + len(anc)] = k[b:b + 1, :, P + anc], v[b:b + 1, :, P + anc]
            pp = torch.tensor([P + len(anc) - 1], device=DEV)
            o1 = gpu_exact.layout(pp, one)
            plain = triton_ops.tree_attention(q[b:b + 1, :, i:i + 1], kp, vp, pp, o1.bits, int(pp) + 1, order=o1,
                                              window=W, positions=pp[None])
            assert torch.equal(plain[0, :, 0], out[b, :, i]), (b, i)


BACKENDS = ["torch", "cpu"] if cpu_available() else ["torch"]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("wname", list(WINDOWS))
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_backends_window_matches_the_oracle(case, wname, name, poisoned):
    q, k, v, prefix, bits, anc, pos, kv_len = _inputs(case, wname)
    W = WINDOWS[wname]
    ref = oracle(q, k, v, prefix, anc, pos, W, kv_len)
    with use_backend(name):
        for mask in (bits, anc.to(DEV)):                                # ancestor bits and the bool mask
            out = ops.tree_attention(q, k, v, prefix, mask, kv_len, window=W, positions=pos)
            assert out.shape == q.shape and torch.isfinite(out).all()
            assert rel_err(out, ref) < TOL[q.dtype]
        # the per-forward dense mask (tree_mask_args, additive in q's dtype) is windowed too
        new_mask, dense = ops.tree_mask_args(prefix, anc.to(DEV), kv_len, q.dtype) if name == "torch" else (None, None)
        if dense is not None:
            out = ops.tree_attention(q, k, v, prefix, new_mask, kv_len, dense_mask=dense, window=W, positions=pos)
            assert rel_err(out, ref) < TOL[q.dtype]


def test_window_arguments_are_checked():
    q, k, v, prefix, bits, anc, pos, kv_len = _inputs(CASES[2], "lt")
    for bad, exc, word in [(dict(window=0, positions=pos), InputError, "window"),
                           (dict(window=2.5, positions=pos), InputError, "window"),
                           (dict(window=True, positions=pos), InputError, "window"),
                           (dict(window=8), ConfigError, "positions"),
                           (dict(window=8, positions=pos.int()), ConfigError, "positions"),
                           (dict(window=8, positions=pos[:, :2]), ConfigError, "positions")]:
        with pytest.raises(exc, match=word) as err:
            ops.tree_attention(q, k, v, prefix, bits, kv_len, **bad)
        assert isinstance(err.value, AmphistaError)


# ---- the model's sliding layers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_sliding_window_families_qa import write_family
    return write_family(tmp_path_factory.mktemp("mistral") / "m", "mistral")


def test_triton_sliding_layers_decode_as_the_torch_backend(mistral_dir, monkeypatch):
    """A Mistral-like model (window 8, every layer sliding, head dim 16) decoding 3 tokens past its window, plain and
    speculative (random Amphista heads, a dynamic-8 tree): on the triton backend the sliding layers window inside
    the kernel and no WindowMask is built; the tokens are the torch backend's (WindowMask + SDPA). (The 10-token
    prompt is past the window already, so every decode and tree step is a windowed one: 3 tokens, not more, since
    interpreted Triton takes ~1 s a token and ~5 s a tree step.)"""
    from amphista_engine import model as model_mod
    from amphista_engine.engine import Engine
    from amphista_engine.heads import random_heads
    from model_helpers import plain_and_speculative
    from test_sliding_window_families_qa import IDS, W

    built, windowed = [], []
    real_mask, real_attn = model_mod.window_mask, ops.tree_attention
    monkeypatch.setattr(model_mod, "window_mask", lambda *a, **k: built.append(1) or real_mask(*a, **k))

    def spy(*a, **k):
        if k.get("window") is not None:
            windowed.append(k["window"])
        return real_attn(*a, **k)

    monkeypatch.setattr(ops, "tree_attention", spy)
    answers = {}
    for name in ("torch", "triton"):
        eng = Engine.from_pretrained(str(mistral_dir), device="cpu", dtype="fp32", max_seq_len=64, backend=name)
        eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
        built.clear(), windowed.clear()
        answers[name] = plain_and_speculative(eng, IDS[:10], 3)
        if name == "torch":
            assert built and not windowed           # the reference path: one dense window mask a forward
        else:
            assert windowed and set(windowed) == {W} and not built
    plain, spec = answers["triton"]
    assert len(plain) == 3 and spec == plain
    assert answers["triton"] == answers["torch"]


# ---- the CUDA binding's window arguments (host compiler, stub kernels: no GPU needed) ------------------
def test_cuda_binding_checks_the_window_arguments(stub_bindings):  # noqa: F811  (the imported fixture)
    """csrc/bindings.cpp's tree_attention takes positions_ptr, pos_sb and window (0: none, the defaults, so the
    calls that predate them are unchanged); a bad one is a ValueError naming it and launches nothing."""
    from test_cuda_build import BINDING_CASES
    mod, launches = stub_bindings
    good = dict(BINDING_CASES["tree_attention"][0])
    before = launches()
    mod.tree_attention(**good)                                             # no window: positions may be 0
    mod.tree_attention(**good, positions_ptr=16384, pos_sb=0, window=8)
    mod.tree_attention(**good, positions_ptr=16384, pos_sb=good["N"], window=1)
    assert launches() == before + 3
    for bad, arg in [(dict(window=-1, positions_ptr=16384), "window"),
                     (dict(window=2**41, positions_ptr=16384), "window"),
                     (dict(window=8), "positions_ptr"), (dict(window=8, positions_ptr=16388), "positions_ptr"),
                     (dict(window=8, positions_ptr=16384, pos_sb=2), "pos_sb"),
                     (dict(window=8, positions_ptr=16384, pos_sb=-1), "pos_sb")]:
        with pytest.raises(ValueError, match=f"argument '{arg}'"):
            mod.tree_attention(**good, **bad)
    assert launches() == before + 3


def test_triton_gemma3_sliding_layers_match_transformers(tmp_path, monkeypatch):
    """Gemma 3 (sliding layers 0 and 2 of 3, window 8, their own RoPE base): a 12-token prompt, then token by token
    to 18 (6 steps, all past the window; interpreted Triton is slow), on the triton backend, with the window in the
    kernel on every step past it: each position's logits are transformers' full forward's."""
    pytest.importorskip("transformers")
    from amphista_engine.loading import load_model
    from conftest import prefill_then_decode
    from test_gemma3 import IDS, WINDOWED, hf_logits, write_gemma3

    d = write_gemma3(tmp_path / "g", **WINDOWED)
    windowed, real_attn = [], ops.tree_attention

    def spy(*a, **k):
        windowed.append(k.get("window"))
        return real_attn(*a, **k)

    monkeypatch.setattr(ops, "tree_attention", spy)
    ids = IDS[:18]
    with use_backend("triton"):
        m = load_model(d, max_seq_len=64).model
        got, _ = prefill_then_decode(m, ids, 12, max_len=64)
    assert windowed.count(8) == 2 * (1 + 6) and windowed.count(None) == 1 + 6       # 2 sliding layers, 1 full
    assert rel_err(got, hf_logits(d, ids)) < 1e-5


def test_exact_greedy_sliding_tree_rows_equal_plain_steps(monkeypatch, position_invariant_dot):  # noqa: F811
    """The GPU's row-invariant decode path (gpu_exact, forced on for this CPU run) on a model whose layers all slide
    (window 8) past the window: a tree verification's logits for a node are bit for bit those of plain one-token
    steps along its path. Before, the sliding layers took the WindowMask's SDPA there, whose rounding depends on the
    step's shape, so bf16 greedy speculative decoding could part from plain greedy past a Mistral's window."""
    from amphista_engine import model as model_mod
    from amphista_engine.config import ModelConfig
    from amphista_engine.kernels import gpu_exact
    from amphista_engine.kernels.routed_linear import route_linears
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import AttentionSpec, Transformer, causal_mask
    from amphista_engine.tree import build_tree

    monkeypatch.setattr(gpu_exact, "applies", lambda kv: kv.dtype == torch.float32)
    monkeypatch.setenv(gpu_exact.ENV_VAR, "1")
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                      max_position_embeddings=256, eos_token_id=[95], sliding_window=8, sliding_layers=(0, 1))
    model = Transformer(cfg, 256)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "embeddings" in name or "output" in name else 0.08))
    model = model.to(DEV).eval().requires_grad_(False)
    route_linears(model)
    monkeypatch.setattr(model_mod, "window_mask", lambda *a, **k: pytest.fail("a WindowMask was built"))
    tree = build_tree("tree-16")
    mask, N = tree.mask.to(DEV), tree.num_nodes
    depth = mask.sum(-1) - 1
    P = 37
    prompt = torch.randint(0, 96, (1, P), generator=g).to(DEV)
    toks = torch.randint(0, 96, (1, N), generator=g).to(DEV)
    bucket = lambda n: -(-n // 32) * 32

    def prefilled():
        cache = KVCache.for_model(model.config, 1, 128, torch.float32, DEV)
        spec = AttentionSpec(torch.zeros(1, dtype=torch.long, device=DEV), causal_mask(P, DEV), kv_len=bucket(P))
        model(prompt, torch.arange(P, device=DEV)[None], cache, spec)
        return cache

    with use_backend("triton"), torch.inference_mode():
        spec = AttentionSpec(torch.tensor([P], device=DEV), mask[None], kv_len=bucket(P + N), decode=True)
        prefill = prefilled()           # once (interpreted Triton is slow): each run below starts from a copy
        cache = copy.deepcopy(prefill)
        tree_logits = model(toks, (P + depth)[None], cache, spec)[0]
        checked = 0
        for i in (N - 1, N // 2):
            path = mask[i].nonzero().flatten()
            cache = copy.deepcopy(prefill)
            for j, node in enumerate(path.tolist()):
                spec = AttentionSpec(torch.tensor([P + j], device=DEV), causal_mask(1, DEV),
                                     kv_len=bucket(P + j + 1), decode=True)
                plain = model(toks[:, node:node + 1], torch.tensor([[P + j]], device=DEV), cache, spec)[0, 0]
                assert torch.equal(plain, tree_logits[node]), (i, j, node)
                checked += 1
        assert checked >= 4
