"""A seeded differential sweep across the kernel backends that run on a CPU: `torch` (the reference), `cpu` (the C++
extension) and `triton` (its interpreter, TRITON_INTERPRET=1, set before triton is imported).

End to end: fp32 tiny Llamas of unusual attention shapes (4 q heads / 1 kv head, 6 / 2 at head dim 24) answer random
greedy requests (plain, Amphista and Medusa on chain, static, single-node and dynamic trees, batches of 1-3 rows of
different prompt lengths, penalties, logit_bias, bad_words, min_tokens, logprobs);
every backend must give the reference's token ids, finish reasons and log-probabilities (to 1e-3). Where ids differ,
the test accepts it only at a near-tie of the model's own top two log-probabilities (fp rounding, not a bug).
The backend reaches the run through each of its doors: Engine.from_pretrained(backend=), engine.backend and the
AMPHISTA_BACKEND variable.

Kernel level: every op a backend serves on fresh random inputs at the edges (N = 1 / 63 / 64, prefix 0 or 1, the tree
ending on the cache's last slot, batch rows of different lengths, GQA 1..4 at head dims 16..40, strided inputs, bf16)
against the reference, with NaN in every cache slot no live token may read and in the buffers written in place.
Counted per op and backend, so a silent fallback to the reference shows as a failure, not as a pass.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is imported anywhere

import random
import warnings

import pytest

from amphista_engine.config import ModelConfig
from amphista_engine.kernels import backend, cpu_ops, ops, reference, use_backend
from amphista_engine.model import rope_table

from conftest import write_tiny_hf
from kernel_checks import rand_tree, rel_err

pytestmark = pytest.mark.usefixtures("one_thread_module")

HAVE_CPU = cpu_ops.load_extension() is not None
HAVE_TRITON = backend.triton_available() and backend.triton_interpreting() and not torch.cuda.is_available()
BACKENDS = ["cpu"] * HAVE_CPU + ["triton"] * HAVE_TRITON
needs_others = pytest.mark.skipif(not BACKENDS, reason="neither the cpu extension nor Triton's interpreter runs here")
if HAVE_TRITON:
    from amphista_engine.kernels import triton_ops
else:
    triton_ops = None

SHAPES = {"mqa4_1_d16": dict(num_key_value_heads=1),
          "gqa6_2_d24": dict(hidden_size=144, num_attention_heads=6, num_key_value_heads=2)}
WORDS = "the quick brown fox jumps over lazy dog hello world speculative decoding tree x = 1 + 2".split()
TREES = ["chain-1", "chain-3", "dynamic-4", "dynamic-9", "tree-16", [(0,)], [(0,), (1,), (0, 0)]]
TOL = {torch.float32: 3e-5, torch.bfloat16: 3e-2}
NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    paths, made = {}, {}

    def engine(name, kind):
        # built on first use: the seeded requests reach only some of the (shape, heads) pairs
        if (name, kind) not in made:
            if name not in paths:
                paths[name] = write_tiny_hf(tmp_path_factory.mktemp(name), seed=3, **SHAPES[name])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                e = Engine.from_pretrained(str(paths[name]), device="cpu", dtype="fp32", max_seq_len=96)
                if kind:
                    e.load_heads(random_heads(kind, e.model, num_heads=3, seed=1))
            made[name, kind] = e
        return made[name, kind]
    return engine


def _request(seed: int):
    rng = random.Random(seed)
    shape, spec = rng.choice(list(SHAPES)), rng.choice([None, "amphista", "medusa"])
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 7, 12])))
               for _ in range(rng.choice([1, 1, 2, 3]))]
    kw = dict(max_new_tokens=rng.choice([1, 3, 5]), chat=False, speculative=spec,
              tree=rng.choice(TREES) if spec else None, logprobs=True, top_logprobs=2, ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.25:
        kw["repetition_penalty"] = rng.choice([1.2, 0.9])
    if rng.random() < 0.25:
        kw.update(presence_penalty=0.5, frequency_penalty=0.3)
    if rng.random() < 0.25:
        kw["logit_bias"] = {rng.randrange(300): rng.choice([-100, 5.0])}
    if rng.random() < 0.2:
        kw["bad_words"] = [rng.choice(WORDS)]
    if rng.random() < 0.2:
        kw["min_tokens"] = 3
    return shape, spec, prompts, kw


def _answers(engine, prompts, kw):
    rs = engine.generate_batch(prompts, **kw)
    return [(r.token_ids, r.finish_reason, r.token_logprobs, r.top_logprobs) for r in rs]


def _agree(want, got, where):
    """The same ids, finish reason and log-probabilities; ids may part only where the reference's top two are a
    near-tie (then the rest of the row is not compared)."""
    assert len(want) == len(got), where
    for row, ((ids, fin, lps, tops), (ids2, fin2, lps2, _)) in enumerate(zip(want, got)):
        n = next((i for i, (a, b) in enumerate(zip(ids, ids2)) if a != b), None)
        if n is not None:
            gap = tops[n][0][1] - tops[n][1][1]
            assert gap < NEAR_TIE, (where, row, n, ids, ids2, gap)
            continue
        assert ids == ids2 and fin == fin2, (where, row, ids, ids2, fin, fin2)
        assert max((abs(a - b) for a, b in zip(lps, lps2)), default=0.0) < 1e-3, (where, row)


@needs_others
@pytest.mark.parametrize("seed", range(5))
def test_greedy_answers_agree_across_backends(engines, seed):
    shape, spec, prompts, kw = _request(seed)
    engine = engines(shape, spec)
    try:
        engine.backend = "torch"
        want = _answers(engine, prompts, kw)
        for be in BACKENDS:
            engine.backend = be
            _agree(want, _answers(engine, prompts, kw), (seed, be, shape, spec, kw))
    finally:
        engine.backend = None


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton's interpreter")
def test_each_door_to_the_backend_runs_its_kernels(engines, tiny_hf_dir, monkeypatch):
    """from_pretrained(backend=), engine.backend and AMPHISTA_BACKEND each run the Triton kernels (not a silent
    fallback to torch), and each gives the reference's answer."""
    from amphista_engine import Engine
    served = []
    real = triton_ops.tree_attention

    def spy(*a, **k):
        out = real(*a, **k)
        served.append(out is not NotImplemented)
        return out
    monkeypatch.setattr(triton_ops, "tree_attention", spy)
    kw = dict(max_new_tokens=3, chat=False, ignore_eos=True)
    ref = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64, backend="torch")
    want = ref.generate("hello there", **kw).token_ids
    assert not served
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64, backend="triton")
    assert eng.generate("hello there", **kw).token_ids == want and served and all(served)
    served.clear()
    ref.backend = "triton"
    assert ref.generate("hello there", **kw).token_ids == want and served and all(served)
    ref.backend = None
    served.clear()
    monkeypatch.setenv("AMPHISTA_BACKEND", "triton")
    backend.clear_cache()
    try:
        assert ref.generate("hello there", **kw).token_ids == want and served and all(served)
    finally:
        monkeypatch.delenv("AMPHISTA_BACKEND")
        backend.clear_cache()


# ---- kernels ---------------------------------------------------------------------------------------------
def _r(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def _served_by(be: str, op: str, fn):
    """fn() run under backend `be`; asserts the backend's own kernel ran (it did not decline the input)."""
    mod = cpu_ops if be == "cpu" else triton_ops
    real, ran = getattr(mod, op), []

    def spy(*a, **k):
        out = real(*a, **k)
        ran.append(out is not NotImplemented)
        return out
    setattr(mod, op, spy)
    try:
        with use_backend(be):
            out = fn()
    finally:
        setattr(mod, op, real)
    assert ran and all(ran), f"{be} declined {op}"
    return out


def _close(out, ref, dtype, where):
    assert out.shape == ref.shape and out.dtype == ref.dtype, where
    assert torch.isfinite(out).all(), where
    assert rel_err(out, ref) < TOL[dtype], where


@needs_others
@pytest.mark.parametrize("seed", range(8))
def test_kernels_agree_with_the_reference_at_the_edges(seed):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.bfloat16])
    B, Hkv, G, D = rng.choice([1, 2, 3]), rng.choice([1, 2, 3]), rng.choice([1, 2, 4]), rng.choice([16, 24, 40])
    N = [1, 63, 64, 7, 2, 64, 1, 63][seed]
    prefix = [rng.choice([0, 1, 17, 40]) for _ in range(B)]
    S = max(prefix) + N + rng.choice([0, 3])            # 0: the longest row's tree ends on the cache's last slot
    kv_len = rng.choice([max(prefix) + N, S])
    L, B_max, layer = 2, B + 1, rng.randrange(2)
    k_buf, v_buf = _r(g, L, B_max, Hkv, S, D, dtype=dtype), _r(g, L, B_max, Hkv, S, D, dtype=dtype)
    q = _r(g, B, N, Hkv * G, D, dtype=dtype).transpose(1, 2)
    mask = torch.stack([rand_tree(N, rng.choice([1, 3, 63]), rng) for _ in range(rng.choice([1, B]))])
    pl, where = torch.tensor(prefix), dict(seed=seed, B=B, Hkv=Hkv, G=G, D=D, N=N, prefix=prefix, S=S)
    exact = reference.tree_attention(q.double(), k_buf[layer].double(), v_buf[layer].double(), pl, mask, kv_len)
    kc, vc = k_buf[layer].clone(), v_buf[layer].clone()
    for b, p in enumerate(prefix):
        kc[b, :, p + N:], vc[b, :, p + N:] = float("nan"), float("nan")
    kc[B:], vc[B:] = float("nan"), float("nan")
    for be in BACKENDS:
        m = mask if be == "triton" else reference.mask_bits(mask)
        out = _served_by(be, "tree_attention", lambda: ops.tree_attention(q, kc, vc, pl, m, kv_len))
        _close(out, exact.to(dtype), dtype, (be, where))

    # qkv_rope_write and kv_write into a NaN cache, rows ending on its last slot: the same slots, the same values
    T = min(S, rng.choice([1, 3, 5]))
    Bw, H = rng.choice([1, B]), Hkv * G
    start = torch.tensor([rng.choice([0, S - T, max(0, S - T - 1)]) for _ in range(Bw)])
    cfg = ModelConfig(vocab_size=8, dim=H * D, n_layers=1, n_heads=H, n_kv_heads=Hkv, intermediate_size=8)
    rows = rope_table(cfg, 100)[torch.randint(0, 100, (rng.choice([1, Bw]), T), generator=g)]
    qkv = _r(g, Bw, T, (H + 2 * Hkv) * D, dtype=dtype)
    nan = torch.full((L, B_max, Hkv, S, D), float("nan"), dtype=dtype)
    rk, rv = nan.clone(), nan.clone()
    rq = reference.qkv_rope_write(qkv, rows, rk, rv, layer, start, H, Hkv)
    k, v = _r(g, Bw, Hkv, T, D, dtype=dtype), _r(g, Bw, T, Hkv, D, dtype=dtype).transpose(1, 2)
    wk, wv = nan.clone(), nan.clone()
    reference.kv_write(wk, wv, layer, start, k, v)
    for be in BACKENDS:
        kk, vv = nan.clone(), nan.clone()
        oq = _served_by(be, "qkv_rope_write", lambda: ops.qkv_rope_write(qkv, rows, kk, vv, layer, start, H, Hkv))
        _close(oq, rq, dtype, (be, where, T, start))
        assert torch.equal(kk.isnan(), rk.isnan()) and torch.equal(vv.nan_to_num(), rv.nan_to_num()), (be, where)
        assert rel_err(kk.nan_to_num(), rk.nan_to_num()) < TOL[dtype], (be, where)
        if be == "triton":                          # the cpu backend writes through qkv_rope_write only
            kk, vv = nan.clone(), nan.clone()
            _served_by(be, "kv_write", lambda: ops.kv_write(kk, vv, layer, start, k, v))
            assert torch.equal(kk.nan_to_num(7), wk.nan_to_num(7)) and torch.equal(vv.nan_to_num(7), wv.nan_to_num(7))

    # compaction of a whole row's window, onto the cache's last slots
    M = rng.choice([1, 5, min(S, 64)])
    src = torch.randint(0, S, (Bw, M), generator=g)
    dst = torch.tensor([rng.choice([0, S - M, rng.randrange(S)]) for _ in range(Bw)])
    rk, rv = k_buf.clone(), v_buf.clone()
    reference.kv_compact(rk, rv, src, dst)
    for be in BACKENDS:
        kk, vv = k_buf.clone(), v_buf.clone()
        _served_by(be, "kv_compact", lambda: ops.kv_compact(kk, vv, src, dst))
        assert torch.equal(kk, rk) and torch.equal(vv, rv), (be, where, M)

    # row ops on strided views and broadcast residuals
    d = rng.choice([24, 96, 130])
    x = _r(g, 2, 5, 2 * d, dtype=dtype)[..., ::2]
    w, res = _r(g, d, dtype=dtype), _r(g, 2, 5, d, dtype=dtype)
    for be in BACKENDS:
        _close(_served_by(be, "add_rmsnorm", lambda: ops.add_rmsnorm(x.contiguous(), res, w, 1e-5))[1],
               reference.add_rmsnorm(x, res, w, 1e-5)[1], dtype, (be, d))
    if HAVE_TRITON:
        _close(_served_by("triton", "rmsnorm", lambda: ops.rmsnorm(x, w, 1e-5)), reference.rmsnorm(x, w, 1e-5), dtype,
               d)
        _close(_served_by("triton", "add_rmsnorm", lambda: ops.add_rmsnorm(x, res[0], w, 1e-5))[1],
               reference.add_rmsnorm(x, res[0], w, 1e-5)[1], dtype, d)
        xr = qkv[..., H * D:(H + Hkv) * D].view(Bw, T, Hkv, D)       # the K part of a fused QKV: strided
        _close(_served_by("triton", "rope", lambda: ops.rope(xr, rows)), reference.rope(xr, rows), dtype, D)

    # greedy acceptance on logits with exact ties at the top (bf16's coarse values make them common)
    V, Na = rng.choice([5, 300]), rng.choice([1, 4, 64])
    logits = (_r(g, Bw, Na, V) * 2).round().to(dtype)
    depth = 1 if Na == 1 else rng.choice([2, 4])
    retrieve = torch.full((rng.choice([1, 3]), depth), -1, dtype=torch.long)
    retrieve[:, 0] = 0
    for p in range(retrieve.shape[0]):
        for j in range(1, rng.randint(1, depth)):
            retrieve[p, j] = rng.randrange(1, Na)
    tokens = torch.randint(0, V, (Bw, Na), generator=g)
    tokens[:, 1:] = logits[:, :-1].float().argmax(-1)
    ref = reference.greedy_accept(tokens, logits, retrieve)
    for be in BACKENDS:
        out = _served_by(be, "greedy_accept", lambda: ops.greedy_accept(tokens, logits, retrieve))
        for f in ("accept_len", "accepted_nodes", "next_token", "emitted"):
            assert torch.equal(getattr(out, f), getattr(ref, f)), (be, f, where)
