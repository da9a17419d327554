"""Phi-3 family checkpoints as their hub config.json files look (old `rope_scaling` key, top-level trained length),
checked against transformers' Phi3ForCausalLM; GGUF refusals that name the real problem."""
from __future__ import annotations

import json

import pytest
import torch

from amphista_engine.engine import Engine
from amphista_engine.errors import ConfigError
from amphista_engine.loading import load_model

from conftest import write_tokenizer
from model_helpers import loaded_logits, pretrained_logits
from model_helpers import rel_err as logits_rel_err

transformers = pytest.importorskip("transformers")

V = 300
HUB = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=V, hidden_size=64, intermediate_size=128,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, hidden_act="silu",
           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2, attention_bias=False,
           torch_dtype="bfloat16", rope_theta=10000.0, sliding_window=None)
G = torch.Generator().manual_seed(1)
SHORT, LONG = (1 + torch.rand(8, generator=G)).tolist(), (2 + 6 * torch.rand(8, generator=G)).tolist()
IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 280, 64] * 10


def write_hub(path, cfg):
    """A tiny random Phi-3 whose config.json is `cfg` verbatim (as on the hub), weights written by transformers."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.AutoConfig.from_pretrained(path))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    (path / "config.json").write_text(json.dumps(cfg))       # save_pretrained rewrote it in transformers 5's form
    write_tokenizer(path, V)
    return path


def rel_err(path, ids, max_seq_len):
    """Relative error of our logits over ids against transformers' Phi3ForCausalLM on the checkpoint at path."""
    want = pretrained_logits(transformers.Phi3ForCausalLM, path, ids)
    return logits_rel_err(loaded_logits(path, ids, max_seq_len), want)


def test_longrope_without_a_top_level_trained_length_takes_phi3configs_default(tmp_path):
    # Phi3Config always holds original_max_position_embeddings (4096 unless given) and it overrides the rope dict's
    cfg = dict(HUB, max_position_embeddings=2048, rope_scaling={
        "type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 64})
    d = write_hub(tmp_path / "m", cfg)
    assert load_model(d, max_seq_len=128).config.rope_scaling["original_max_position_embeddings"] == 4096
    assert rel_err(d, IDS[:100], 128) < 1e-5


def test_a_phi3_yarn_type_is_longrope_as_in_transformers(tmp_path):
    cfg = dict(HUB, max_position_embeddings=2048, original_max_position_embeddings=64,
               rope_scaling={"type": "yarn", "short_factor": SHORT, "long_factor": LONG})
    d = write_hub(tmp_path / "m", cfg)
    assert load_model(d, max_seq_len=64).config.rope_scaling["rope_type"] == "longrope"
    assert rel_err(d, IDS[:50], 64) < 1e-5
    assert rel_err(d, IDS[:100], 128) < 1e-5


def test_phi4_shape_engine_greedy_equals_transformers_and_speculative(tmp_path):
    from amphista_engine.heads import random_heads
    cfg = dict(HUB, num_key_value_heads=2, max_position_embeddings=160, original_max_position_embeddings=160,
               rope_theta=250000.0, vocab_size=V)
    d = write_hub(tmp_path / "phi4", cfg)
    eng = Engine.from_pretrained(str(d), device="cpu", max_seq_len=96, dtype="float32")
    r = eng.generate("The quick brown fox", chat=False, max_new_tokens=20)
    hf = transformers.Phi3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([r.prompt_token_ids]), do_sample=False, max_new_tokens=len(r.token_ids),
                      eos_token_id=None, pad_token_id=0)
    assert r.token_ids == out[0, len(r.prompt_token_ids):].tolist()
    eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
    assert eng.generate("The quick brown fox", chat=False, max_new_tokens=20).token_ids == r.token_ids


def test_phi4_mini_gets_past_its_config_and_phi3_small_is_refused_by_name(tmp_path):
    from amphista_engine.errors import ModelLoadError
    d = tmp_path / "m"
    d.mkdir()
    # Phi-4-mini's shape: partial rotary (test_partial_rotary.py checks it against transformers), LongRoPE lists of
    # R/2 entries; this folder has a config only, so what stops it is the missing weights
    mini = dict(HUB, partial_rotary_factor=0.75, max_position_embeddings=2048, original_max_position_embeddings=64,
                rope_scaling={"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6})
    (d / "config.json").write_text(json.dumps(mini))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(d)
    (d / "config.json").write_text(json.dumps(dict(HUB, architectures=["Phi3SmallForCausalLM"],
                                                   model_type="phi3small")))
    with pytest.raises(ConfigError, match="Phi3SmallForCausalLM"):
        load_model(d)


def test_phi4_mini_gguf_takes_its_rotary_width_and_factor_lists(tmp_path, monkeypatch):
    # llama.cpp writes Phi-4-mini's rope.dimension_count 96 of 128 and its LongRoPE lists 48 long: both are read
    # (the lists' length against the rotated width, not the head's)
    import gguf
    from test_phi3 import write_phi3, write_phi3_gguf
    real = gguf.GGUFWriter.add_rope_dimension_count
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_dimension_count", lambda self, n: real(self, 12))
    f = write_phi3_gguf(write_phi3(tmp_path / "hf"), tmp_path / "p.gguf", longrope=dict(
        short_factor=[1.0] * 6, long_factor=[2.0] * 6, original=64, attn_factor=1.2))
    assert load_model(f).config.rotary_dim == 12
