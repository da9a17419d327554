"""Phi-3 checkpoints (Phi3ForCausalLM: Phi-3, Phi-3.5, Phi-4): a Llama layer whose checkpoint stores q/k/v and
gate/up fused, with LongRoPE on the long-context models. Logits equal transformers' on the same random weights."""
from __future__ import annotations

import json

import pytest
import torch

from amphista_engine.engine import Engine
from amphista_engine.errors import ConfigError
from amphista_engine.loading import load_model

from conftest import add_gguf_bpe_vocab, write_tokenizer
from model_helpers import loaded_logits as ours_logits
from model_helpers import pretrained_logits, rel_err

transformers = pytest.importorskip("transformers")

V = 300
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=None)


def write_phi3(path, **over):
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**BASE, **over}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, V)
    return path


def hf_logits(path, ids):
    return pretrained_logits(transformers.Phi3ForCausalLM, path, ids)


IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 280, 64] * 12


def test_phi3_matches_transformers(tmp_path):
    d = write_phi3(tmp_path / "phi3")
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.qkv_proj.weight" in f.keys()      # the fused layout is what loads
    assert rel_err(ours_logits(d, IDS[:40], 256), hf_logits(d, IDS[:40])) < 1e-5


def test_longrope_short_and_long_factors_match_transformers(tmp_path):
    g = torch.Generator().manual_seed(1)
    half = 64 // 4 // 2
    rs = {"rope_type": "longrope", "short_factor": (1 + torch.rand(half, generator=g)).tolist(),
          "long_factor": (2 + 6 * torch.rand(half, generator=g)).tolist()}
    d = write_phi3(tmp_path / "long", rope_parameters=dict(rs, rope_theta=10000.0),
                   original_max_position_embeddings=64, max_position_embeddings=512)
    cfg = load_model(d, max_seq_len=64).model.config
    assert cfg.rope_scaling["rope_type"] == "longrope" and cfg.rope_scaling["factor"] == 8.0
    # within the trained 64 positions: the short factors (a cache of at most 64); past them, the long ones
    short, long_ = IDS[:50], IDS[:130]
    right = rel_err(ours_logits(d, short, 64), hf_logits(d, short))
    assert right < 1e-5
    assert rel_err(ours_logits(d, long_, 256), hf_logits(d, long_)) < 1e-5
    # and the factors matter: the long ones where transformers took the short ones are far off
    assert rel_err(ours_logits(d, short, 256), hf_logits(d, short)) > max(1e-4, 100 * right)


def test_old_su_configs_and_a_sliding_window(tmp_path):
    d = write_phi3(tmp_path / "su", sliding_window=48)
    cfg = json.loads((d / "config.json").read_text())
    half = 8
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"type": "su", "short_factor": [1.0] * half, "long_factor": [4.0] * half}
    cfg["original_max_position_embeddings"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(d, max_seq_len=48).model
    assert m.config.rope_scaling["rope_type"] == "longrope" and m.config.sliding_window == 48
    assert m.config.sliding_layers == (0, 1)
    # the window is implemented (python_tests/test_sliding_window_families_qa.py): a cache past it loads, and the
    # default is not capped at it (it was: Phi-3-mini-4k's 2047)
    assert Engine.from_pretrained(str(d), device="cpu", max_seq_len=128).max_seq_len == 128
    eng = Engine.from_pretrained(str(d), device="cpu")
    assert eng.max_seq_len == 2048
    assert eng.generate("The quick brown fox", chat=False, max_new_tokens=5).finish_reason in ("length", "eos")


# the tiny model was trained on 512 positions: the default 2048-slot cache is past them, and the CLI says so
@pytest.mark.filterwarnings("ignore:max_seq_len=2048 is past the 512 positions")
def test_cli_runs_a_windowed_model_with_its_default_cache(tmp_path, capsys):
    from amphista_engine.cli import main
    d = write_phi3(tmp_path / "w", sliding_window=96)
    rc = main(["generate", "The quick brown fox", "--no-chat", "--model", str(d), "--device", "cpu",
               "--max-new-tokens", "4", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert len(json.loads(cap.out)["token_ids"]) <= 4


def test_bad_phi3_configs_are_named(tmp_path):
    d = write_phi3(tmp_path / "bad")
    cfg = json.loads((d / "config.json").read_text())
    # (the saved rope_parameters dict holds a partial_rotary_factor of its own, which wins over the top level's)
    for edit, what in (({"partial_rotary_factor": 1.5, "rope_parameters": None}, "partial_rotary_factor"),
                       ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3},
                         "rope_parameters": None}, "short_factor has 3 entries"),
                       ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8}, "rope_parameters": None},
                        "needs long_factor")):
        (d / "config.json").write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(ConfigError, match=what):
            load_model(d)


def write_phi3_gguf(hf_dir, out, qtype="F32", longrope=None, window=None, rot=16):
    """The tiny Phi-3 as llama.cpp's converter writes a `phi3` GGUF: attn_qkv and ffn_up (gate | up) fused, rows
    as stored (NeoX RoPE: no permutation), LongRoPE's factors as tensors; rot: rope.dimension_count (below the
    head's 16 for partial rotary), a tied checkpoint without output.weight."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from conftest import _add_gguf_tensor, _close_gguf
    w = load_file(str(hf_dir / "model.safetensors"))
    wr = gguf.GGUFWriter(str(out), "phi3")
    wr.add_block_count(2)
    wr.add_context_length(BASE["max_position_embeddings"])
    wr.add_embedding_length(64)
    wr.add_feed_forward_length(128)
    wr.add_head_count(4)
    wr.add_head_count_kv(2)
    wr.add_rope_dimension_count(rot)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_freq_base(10000.0)
    if window:
        wr.add_sliding_window(window)
    add_gguf_bpe_vocab(wr, hf_dir, V, "default")
    if longrope:
        wr.add_uint32("phi3.rope.scaling.original_context_length", longrope["original"])
        wr.add_float32("phi3.rope.scaling.attn_factor", longrope["attn_factor"])
        wr.add_tensor("rope_factors_long.weight", np.array(longrope["long_factor"], dtype=np.float32))
        wr.add_tensor("rope_factors_short.weight", np.array(longrope["short_factor"], dtype=np.float32))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(2):
        names.update({f"model.layers.{i}.{h}.weight": f"blk.{i}.{g}.weight" for h, g in (
            ("self_attn.qkv_proj", "attn_qkv"), ("self_attn.o_proj", "attn_output"), ("mlp.gate_up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"))})
    for hf_name, g in names.items():
        if hf_name in w:        # lm_head.weight: absent where the embedding is tied
            _add_gguf_tensor(wr, g, w[hf_name].astype(np.float32), qtype if g != "token_embd.weight" else "F32")
    _close_gguf(wr)
    return out


def test_phi3_gguf_matches_transformers(tmp_path):
    import math
    g = torch.Generator().manual_seed(2)
    rs = {"rope_type": "longrope", "short_factor": (1 + torch.rand(8, generator=g)).tolist(),
          "long_factor": (2 + 6 * torch.rand(8, generator=g)).tolist()}
    d = write_phi3(tmp_path / "hf", rope_parameters=dict(rs, rope_theta=10000.0),
                   original_max_position_embeddings=64, max_position_embeddings=512)
    f = write_phi3_gguf(d, tmp_path / "phi3.gguf", longrope=dict(
        rs, original=64, attn_factor=math.sqrt(1 + math.log(8) / math.log(64))))
    for ids, max_len in ((IDS[:50], 64), (IDS[:130], 256)):      # the short factors, then the long ones
        assert rel_err(ours_logits(f, ids, max_len), hf_logits(d, ids)) < 1e-5
    # Q4_0 layers through the engine (quant auto: the 4-bit CPU path), a sliding window shorter than the cache
    q = write_phi3_gguf(write_phi3(tmp_path / "plain"), tmp_path / "q4.gguf", qtype="Q4_0", window=96)
    eng = Engine.from_pretrained(str(q), device="cpu", max_seq_len=128)
    assert eng.quant == "q4" and eng.config.real_window == 96 and eng.config.sliding_layers == (0, 1)
    assert eng.generate("The quick brown fox", chat=False, max_new_tokens=6).finish_reason in ("length", "eos")
