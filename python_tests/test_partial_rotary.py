"""Partial rotary embeddings (Phi-4-mini: partial_rotary_factor 0.75, tied embeddings, LongRoPE): RoPE on the first
R = head_dim * factor dims of each head in rotate-half pairs (i, i + R/2), the rest passed through. The loaders move
each head's q/k rows so that every RoPE path rotates whole heads (model.rotary_rows); logits, greedy output and the
4-bit CPU path are checked against transformers' Phi3ForCausalLM on the same random weights."""
from __future__ import annotations

import json
import math

import pytest
import torch

from amphista_engine.engine import Engine
from amphista_engine.errors import ConfigError
from amphista_engine.heads import random_heads
from amphista_engine.loading import load_model

from conftest import prefill_then_decode, write_tokenizer
from model_helpers import hf_forward_logits, rel_err

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread_module")

V, HEAD, ROT = 300, 16, 12          # heads of 16 dims, 12 of them rotated (0.75)
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=None, partial_rotary_factor=0.75)
G = torch.Generator().manual_seed(3)
# LongRoPE as Phi-4-mini's config.json writes it: top-level partial_rotary_factor, one factor per rotated pair
LONGROPE = {"type": "longrope", "short_factor": (1 + torch.rand(ROT // 2, generator=G)).tolist(),
            "long_factor": (2 + 6 * torch.rand(ROT // 2, generator=G)).tolist()}
IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 280, 64] * 12


def write_phi3(path, hub_longrope: bool = False, **over):
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**BASE, **over}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for layer in model.model.layers:        # sharper attention: RoPE's angles move the logits more
            layer.self_attn.qkv_proj.weight[:HEAD * 8] *= 4
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, V)
    if hub_longrope:            # the Hub's layout (no rope_parameters), which transformers reads the same way
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("rope_parameters", None)
        cfg.update(rope_scaling=LONGROPE, rope_theta=10000.0, original_max_position_embeddings=64)
        (path / "config.json").write_text(json.dumps(cfg))
    return path


def hf_model(path):
    return transformers.Phi3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(path, ids):
    return hf_forward_logits(hf_model(path), ids)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return write_phi3(tmp_path_factory.mktemp("partial") / "hf")


@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    return write_phi3(tmp_path_factory.mktemp("partial_long") / "hf", hub_longrope=True)


def test_prefill_and_decode_logits_equal_transformers(plain):
    m = load_model(plain, max_seq_len=128).model
    assert (m.config.rotary_dim, m.config.head_dim) == (ROT, HEAD)
    ids = IDS[:40]
    ref = hf_logits(plain, ids)
    with torch.no_grad():
        full = m(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
    assert rel_err(full, ref) < 1e-5
    cached, _ = prefill_then_decode(m, ids, 24)          # 16 decode steps over the KV cache
    assert rel_err(cached, ref) < 1e-5
    # the rotation matters: the same rows rotated over whole heads are far off
    whole = load_model(plain, max_seq_len=128).model
    whole.config.rotary_dim = 0                         # whole heads
    whole.setup_rope(128)
    with torch.no_grad():
        assert rel_err(whole(torch.tensor([ids]), torch.arange(len(ids))[None])[0], ref) > 1e-2


def test_longrope_with_partial_rotary_equals_transformers(longrope):
    # within the trained 64 positions the short factors, past them the long ones, each times the attention factor
    # on the rotated dims only
    cfg = load_model(longrope, max_seq_len=64).config
    assert cfg.rotary_dim == ROT and cfg.rope_scaling["rope_type"] == "longrope"
    for ids, max_len in ((IDS[:50], 64), (IDS[:130], 256)):
        m = load_model(longrope, max_seq_len=max_len).model
        with torch.no_grad():
            ours = m(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
        assert rel_err(ours, hf_logits(longrope, ids)) < 1e-5


@pytest.mark.parametrize("which", ["plain", "longrope"])
def test_engine_greedy_equals_transformers_and_speculative(which, request):
    d = request.getfixturevalue(which)
    # LongRoPE: a cache within the trained 64 positions, whose short factors transformers takes for a short sequence
    eng = Engine.from_pretrained(str(d), device="cpu", dtype="fp32", max_seq_len=64 if which == "longrope" else 96)
    r = eng.generate("The quick brown fox", chat=False, max_new_tokens=12)
    out = hf_model(d).generate(torch.tensor([r.prompt_token_ids]), do_sample=False, max_new_tokens=len(r.token_ids),
                               eos_token_id=None, pad_token_id=0)
    assert len(r.token_ids) == 12 and r.token_ids == out[0, len(r.prompt_token_ids):].tolist()
    # the heads copy the target's rope dict, LongRoPE lists of ROT / 2 included
    eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
    assert eng.generate("The quick brown fox", chat=False, max_new_tokens=12).token_ids == r.token_ids


def test_4bit_cpu_path_speculative_equals_plain(plain):
    eng = Engine.from_pretrained(str(plain), device="cpu", dtype="fp32", max_seq_len=96, quant="q4")
    assert eng.quant == "q4"
    r = eng.generate("The quick brown fox", chat=False, max_new_tokens=12)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
    assert eng.generate("The quick brown fox", chat=False, max_new_tokens=12).token_ids == r.token_ids


def write_gguf(hf_dir, out, qtype="F32", rot=ROT, longrope=False):
    """The checkpoint as llama.cpp's converter writes Phi-4-mini: a `phi3` file, q|k|v and gate|up fused with rows
    as Hugging Face stores them (NeoX RoPE), rope.dimension_count the rotated dims, LongRoPE's lists as tensors."""
    from test_phi3 import write_phi3_gguf
    long = dict(LONGROPE, original=64, attn_factor=math.sqrt(1 + math.log(8) / math.log(64))) if longrope else None
    return write_phi3_gguf(hf_dir, out, qtype, longrope=long, rot=rot)


def test_gguf_with_rope_dimension_count_below_the_head_equals_transformers(plain, longrope, tmp_path):
    for d, long in ((plain, False), (longrope, True)):
        f = write_gguf(d, tmp_path / f"{long}.gguf", longrope=long)
        m = load_model(f, max_seq_len=256).model
        assert m.config.rotary_dim == ROT
        ids = IDS[:130] if long else IDS[:40]
        with torch.no_grad():
            ours = m(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
        assert rel_err(ours, hf_logits(d, ids)) < 1e-5


def test_gguf_4bit_codes_move_with_their_rows(plain, tmp_path):
    f = write_gguf(plain, tmp_path / "q4.gguf", qtype="Q4_0")
    ids = IDS[:40]
    floats = load_model(f, max_seq_len=96).model           # the codes' values, rows moved as floats
    codes = load_model(f, max_seq_len=96, quant="q4").model  # the codes themselves, rows moved as codes
    with torch.no_grad():
        a = floats(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
        b = codes(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
    assert rel_err(b, a) < 3e-2          # int8 activations' rounding only
    eng = Engine.from_pretrained(str(f), device="cpu", dtype="fp32", max_seq_len=96)
    assert eng.quant == "q4"
    r = eng.generate("The quick brown fox", chat=False, max_new_tokens=12)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
    assert eng.generate("The quick brown fox", chat=False, max_new_tokens=12).token_ids == r.token_ids


def test_what_is_refused_is_named(plain, tmp_path):
    cfg = json.loads((plain / "config.json").read_text())
    d = tmp_path / "bad"
    d.mkdir()
    for edit, what in (({"partial_rotary_factor": 0.5625, "rope_parameters": None}, "rotates 9 of each head's 16"),
                       ({"partial_rotary_factor": 1.5, "rope_parameters": None}, r"must be a number in \(0, 1\]"),
                       ({"rope_scaling": dict(LONGROPE, short_factor=[1.0] * 8), "rope_parameters": None,
                         "original_max_position_embeddings": 64}, "short_factor has 8 entries; RoPE rotates 12")):
        (d / "config.json").write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(ConfigError, match=what):
            load_model(d)
    # transformers' Llama rotates whole heads whatever the key says: such a checkpoint's RoPE is unclear
    llama = dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama", partial_rotary_factor=0.5)
    (d / "config.json").write_text(json.dumps(llama))
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.5 is not supported .* rotates whole heads"):
        load_model(d)
    with pytest.raises(ConfigError, match="rope.dimension_count is 7, but heads are 16 wide"):
        load_model(write_gguf(plain, tmp_path / "odd.gguf", rot=7))
    # the reason for the Llama refusal: transformers' LlamaForCausalLM gives the same logits with the key and without
    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama)).eval()
    b = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(llama, partial_rotary_factor=1.0))).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a(torch.tensor([IDS[:20]])).logits, b(torch.tensor([IDS[:20]])).logits)
