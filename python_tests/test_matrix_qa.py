"""Regression tests from QA of the CPU configuration matrix (dtype x quant x kernel backend x decoding x batch)."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.kernels import cpu_exact, cpu_quant, set_backend
from conftest import needs_smollm2


@pytest.fixture
def torch_ops():
    """The torch backend, whose decode steps take cpu_exact's layout around flash."""
    set_backend("torch")
    yield
    set_backend(None)


def test_fp16_engine_orders_decode_steps_like_bf16(tiny_hf_dir, monkeypatch, torch_ops):
    """fp16 on the CPU rounds as coarsely as bf16, so its plain steps and tree verifications must sum each token's
    keys in position order too (they took SDPA, whose blocks follow the key count: SmolLM2's fp16 speculative
    answer left plain greedy's at its 5th token), and a tree too deep for that layout is refused by name."""
    from amphista_engine.engine import Engine
    from amphista_engine.errors import ConfigError
    from amphista_engine.heads import random_heads
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp16", max_seq_len=256)
    calls = []
    real = cpu_exact.attention
    monkeypatch.setattr(cpu_exact, "attention", lambda q, *a, **k: calls.append(q.shape[2]) or real(q, *a, **k))
    plain = engine.generate("hello world", max_new_tokens=4, chat=False)
    assert calls == [1] * (3 * engine.config.n_layers)       # 3 plain steps after the prefill's first token
    engine.load_heads(random_heads("medusa", engine.model, num_heads=cpu_exact.MAX_DEPTH + 1).to(torch.float16))
    calls.clear()
    with pytest.warns(UserWarning, match="fp16 linear layers are not packed"):     # said once per engine
        spec = engine.generate("hello world", max_new_tokens=4, chat=False, speculative="medusa", tree="tree-16")
    assert calls and set(calls) == {16} and spec.token_ids == plain.token_ids
    with pytest.raises(ConfigError, match="fp16 CPU verification"):
        engine.generate("hello world", max_new_tokens=4, chat=False, speculative="medusa",
                        tree=[[0] * d for d in range(1, cpu_exact.MAX_DEPTH + 2)])


@needs_smollm2
@pytest.mark.skipif(not cpu_quant.available(), reason="torch lacks the int4/int8 CPU kernels")
def test_smollm2_fp16_speculative_greedy_equals_plain_greedy():
    """fp16 with 4-bit weights on the CPU (torch's int4 kernel: the cpu backend takes fp32 and bf16): at the 5th
    token of this answer plain decoding's top two logits were 14.125 and 14.0625, and the unordered tree
    verification's a tie that went the other way, for every tree and both kinds of heads."""
    from amphista_engine.engine import Engine
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp16", quant="q4", max_seq_len=128,
                                    heads="default")
    prompt = "Write a short poem about the sea."
    plain = engine.generate(prompt, max_new_tokens=8)
    spec = engine.generate(prompt, max_new_tokens=8, speculative="amphista", tree="chain-3")
    assert spec.token_ids == plain.token_ids
    assert sum(spec.stats.accept_hist) == spec.stats.decode_steps and spec.stats.tau >= 1
