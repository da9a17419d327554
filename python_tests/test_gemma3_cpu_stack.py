"""Gemma 3's 4-bit layers in the cpu backend's C++ layer stack (csrc/cpu/decoder.h: the post-attention and post-MLP
norms, (1 + w) norms as fp32 scales, GELU-tanh, the sliding layers' own RoPE rows and window in tree_attention.h):
the same answers as the Python layer loop over the same 4-bit linears, and greedy speculative output equal to plain
past windows shorter than the trees are deep."""
from __future__ import annotations

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.heads import random_heads
from amphista_engine.kernels import cpu_ops

pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("one_thread_module"),
              pytest.mark.skipif(cpu_ops.load_extension() is None, reason="needs the CPU extension")]

from test_gemma3 import IDS, WINDOWED, write_gemma3     # noqa: E402


@pytest.fixture(scope="module", params=[8, 3])
def gemma(request, tmp_path_factory):
    """A tiny Gemma 3 with a window of 8, or of 3 (shorter than a dynamic-8 tree is deep: ancestors leave it too)."""
    path = write_gemma3(tmp_path_factory.mktemp("gemma3") / "w", **{**WINDOWED, "sliding_window": request.param})
    eng = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=256, quant="q4")
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    return eng


def _answer(eng, prompt, stack: bool, monkeypatch, **kw):
    import amphista_engine.model as model_mod
    calls = []
    real = cpu_ops.decoder_layers

    def counted(*a, **k):
        out = real(*a, **k) if stack else NotImplemented
        calls.append(out is not NotImplemented)
        return out
    monkeypatch.setattr(model_mod.cpu_ops, "decoder_layers", counted)
    eng.model.__dict__.pop("_cpu_decoder_tables", None)
    try:
        return eng.generate(prompt, chat=False, max_new_tokens=40, min_tokens=40, logprobs=True, **kw), calls
    finally:
        monkeypatch.undo()


def test_the_stack_runs_gemma_as_its_layer_loop(gemma, monkeypatch):
    for prompt in (IDS[:5], IDS[:30]):          # the answers run past the window either way
        stacked, calls = _answer(gemma, prompt, True, monkeypatch, speculative="none")
        assert calls and all(calls), "the stack declined a Gemma forward"
        looped, calls = _answer(gemma, prompt, False, monkeypatch, speculative="none")
        assert stacked.token_ids == looped.token_ids
        # The stack and the loop sum in other orders (fp32 ulps), so now and then an activation lands on the other
        # side of its int8 rounding (groups of 32) and that step's K/V differ a little: seen as ~1e-3 in the
        # logprobs of a few steps, not in most (a wrong stack moves them all).
        diff = (torch.tensor(stacked.token_logprobs) - torch.tensor(looped.token_logprobs)).abs()
        assert float(diff.max()) < 1e-2 and float((diff > 1e-4).float().mean()) < 0.25, diff.tolist()


@pytest.mark.parametrize("tree", ["dynamic-8", "tree-16"])
def test_speculative_equals_plain_through_the_stack(gemma, tree, monkeypatch):
    for prompt in (IDS[:5], IDS[:30]):
        plain, _ = _answer(gemma, prompt, True, monkeypatch, speculative="none")
        spec, calls = _answer(gemma, prompt, True, monkeypatch, speculative="amphista", tree=tree)
        assert all(calls) and spec.token_ids == plain.token_ids


def test_bf16_keeps_the_layer_loop(tmp_path):
    """Gemma's norms round once, the stack's twice in bf16: bf16 Gemma stays in the loop (fp32 only)."""
    path = write_gemma3(tmp_path / "w", **WINDOWED)
    eng = Engine.from_pretrained(str(path), device="cpu", dtype="bf16", max_seq_len=64, quant="q4")
    assert not cpu_ops.stack_runs(eng.model.layers, eng.model.norm, eng.config, torch.bfloat16, eng.model)
    fp32 = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64, quant="q4")
    assert cpu_ops.stack_runs(fp32.model.layers, fp32.model.norm, fp32.config, torch.float32, fp32.model)
