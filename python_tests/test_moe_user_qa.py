"""Mixture-of-experts targets as a CPU user runs them: 4-bit experts (quant='q4', and 'auto' on a GGUF file whose
expert stacks are Q4_0). Each expert's w13 and w2 run as the dense linears' 4-bit codes (cpu_quant.quantize_experts),
the float stacks are freed, the router stays float; grouping a forward's (token, expert) pairs by expert gives each
token the bits it gets alone (so tree steps equal plain steps); batches and speculative decoding agree."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from amphista_engine.config import ModelConfig
from amphista_engine.errors import ConfigError
from amphista_engine.evaluation.shapes import random_model
from amphista_engine.kernels import cpu_quant
from amphista_engine.kernels.linear_setup import LinearSetup

TINY = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=64,
                   norm_eps=1e-6, max_position_embeddings=512, qk_norm=True, n_experts=8, experts_per_token=2,
                   moe_intermediate_size=32, moe_layers=(0, 1), norm_topk_prob=True, name="tiny-moe", eos_token_id=[])


def _tiny(cfg=TINY):
    m = random_model(cfg, max_seq_len=128)
    with torch.no_grad():
        for b in m.layers:
            if b.moe:
                b.feed_forward.gate.weight.mul_(50.0)       # spread the router, so the top-k choice matters
                b.feed_forward.w13.mul_(10.0)
                b.feed_forward.w2.mul_(10.0)
    return m


def _nbytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_q4_packs_experts_and_frees_the_float_stacks():
    m = _tiny()
    before, experts = _nbytes(m), sum(b.feed_forward.w13.numel() + b.feed_forward.w2.numel() for b in m.layers) * 4
    router = m.layers[0].feed_forward.gate.weight.clone()
    LinearSetup.for_device("cpu", torch.float32, "q4").apply(m)
    for b in m.layers:
        ff = b.feed_forward
        assert ff.experts_q4 is not None and len(ff.experts_q4) == TINY.n_experts
        assert all(cpu_quant.on_codes(a) and cpu_quant.on_codes(c) for a, c in ff.experts_q4)
        assert ff.w13.numel() == 0 and ff.w2.numel() == 0 and ff.w13.dtype == torch.float32
        assert ff.experts_q4[0][0].weight.device.type == "meta"        # no float copy hides in the expert layers
    assert torch.equal(m.layers[0].feed_forward.gate.weight, router)    # the router stays float, untouched
    assert before - _nbytes(m) == experts


def test_grouped_experts_give_each_token_its_lone_bits_and_track_the_float_layer():
    """A prefill-sized forward (grouped by expert, up to 150 rows an expert) equals each token run alone (a one-row
    product per (token, expert) pair), bit for bit; and the 4-bit layer is the float one within int8 rounding once
    the experts sit on the 4-bit grid."""
    import copy
    m = _tiny()
    with torch.no_grad():
        for w in (m.layers[0].feed_forward.w13, m.layers[0].feed_forward.w2):
            for e in range(w.shape[0]):
                codes, scale, zero, _ = cpu_quant._requantize(w[e])
                N, K = w[e].shape
                w[e].copy_(((codes.float() - 8).reshape(N, K // 32, 32) * scale[..., None]
                            + zero[..., None]).reshape(N, K))
    f = copy.deepcopy(m.layers[0].feed_forward)
    LinearSetup.for_device("cpu", torch.float32, "q4").apply(m)
    ff = m.layers[0].feed_forward
    torch.manual_seed(0)
    x = torch.randn(1, 150, TINY.dim)
    with torch.no_grad():
        whole = ff(x)
        alone = torch.cat([ff(x[:, i:i + 1]) for i in range(x.shape[1])], dim=1)
        ref = f(x)
    assert torch.equal(whole, alone)
    assert torch.equal(ff.route(x[0])[1], f.route(x[0])[1])
    err = ((whole - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.05, err


def test_expert_shapes_the_4bit_kernels_cannot_take():
    """q4: refused by a ConfigError naming the experts (it had kept them float silently); auto: floats."""
    cfg = dataclasses.replace(TINY, moe_intermediate_size=40)
    with pytest.raises(ConfigError, match="expert"):
        LinearSetup.for_device("cpu", torch.float32, "q4").apply(_tiny(cfg))
    m = cpu_quant.quantize_linears(_tiny(cfg), only_stored_4bit=True)
    assert m is None


def test_gguf_q4_0_experts_stay_4bit_under_auto_and_decode_alike(tmp_path):
    """A Q4_0 GGUF (expert stacks Q4_0 as llama.cpp writes them) under the default quant: the experts run as the
    file's codes (no requantization error), float stacks freed; batches, speculative and plain answers agree."""
    pytest.importorskip("transformers")
    from amphista_engine.engine import Engine
    from amphista_engine.heads import random_heads
    from test_moe import IDS, write_hf, write_moe_gguf
    if not (cpu_quant.available() and cpu_quant.measured_here()):
        pytest.skip("'auto' stays float on this CPU")
    d = write_hf(tmp_path / "hf", "qwen3_moe", norm_topk_prob=True, mlp_only_layers=[])
    g = write_moe_gguf(d, tmp_path / "m.gguf", "qwen3_moe", qtype="Q4_0")
    eng = Engine.from_pretrained(str(g), device="cpu", dtype="fp32", max_seq_len=256)
    assert eng.quant == "q4"
    for b in eng.model.layers:
        assert b.feed_forward.experts_q4 is not None and b.feed_forward.w13.numel() == 0
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    prompts = [IDS[:5], IDS[3:40], IDS[7:12]]
    plain = [eng.generate(p, chat=False, max_new_tokens=16, min_tokens=16, speculative="none").token_ids
             for p in prompts]
    for spec in ("none", "amphista"):
        got = eng.generate_batch(prompts, chat=False, max_new_tokens=16, min_tokens=16, speculative=spec)
        assert [r.token_ids for r in got] == plain, spec
