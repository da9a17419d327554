"""Loading checkpoints and tokenizers the way users hand them over: every bad input is a named AmphistaError.

Each test builds a tiny random Llama (safetensors written directly, no transformers) or a GGUF written from it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from amphista_engine import ConfigError, InputError, ModelLoadError
from amphista_engine.config import ModelConfig
from amphista_engine.gguf_file import read_gguf
from amphista_engine.loading import load_model
from amphista_engine.tokenizer import load_tokenizer

from conftest import TINY_HF, edited_copy, write_tiny_gguf, write_tokenizer

C = TINY_HF
HEAD_DIM = C["hidden_size"] // C["num_attention_heads"]


def hf_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    V, D, In = C["vocab_size"], C["hidden_size"], C["intermediate_size"]
    q, kv = C["num_attention_heads"] * HEAD_DIM, C["num_key_value_heads"] * HEAD_DIM
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    t = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": 1 + r(D), "lm_head.weight": r(V, D)}
    for i in range(C["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": r(q, D), p + "self_attn.k_proj.weight": r(kv, D),
                  p + "self_attn.v_proj.weight": r(kv, D), p + "self_attn.o_proj.weight": r(D, q),
                  p + "mlp.gate_proj.weight": r(In, D), p + "mlp.up_proj.weight": r(In, D),
                  p + "mlp.down_proj.weight": r(D, In), p + "input_layernorm.weight": 1 + r(D),
                  p + "post_attention_layernorm.weight": 1 + r(D)})
    return t


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qa_base")
    (path / "config.json").write_text(json.dumps(C))
    save_file(hf_tensors(), str(path / "model.safetensors"))
    write_tokenizer(path, C["vocab_size"])
    return path


def variant(base, tmp_path, cfg=None, tensors=None) -> Path:
    """A copy of `base` with config keys updated and/or its tensors edited in place by `tensors(dict)`."""
    return edited_copy(base, tmp_path / "m", cfg, tensors)


# ---- config.json options the model does not implement -------------------------------------------------

@pytest.mark.parametrize("update,match", [
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method 'gptq'"),
])
def test_unimplemented_config_options_are_refused(base, tmp_path, update, match):
    d = variant(base, tmp_path, cfg=update)
    with pytest.raises(ConfigError, match=match) as e:
        load_model(d)
    assert str(d / "config.json") in str(e.value)


def test_attention_bias_without_bias_tensors_names_them(base, tmp_path):
    """attention_bias=true is run (Llama and Qwen3 layers with biases, test_model_families.py); a checkpoint that
    says so but has no biases is named by what it lacks."""
    with pytest.raises(ConfigError, match=r"lacks 8 tensor\(s\) its config.json needs.*q_proj.bias"):
        load_model(variant(base, tmp_path, cfg={"attention_bias": True}))


@pytest.mark.parametrize("rope_scaling,match", [
    ({"type": "linear"}, "'linear' needs a positive number 'factor', got None"),
    ({"rope_type": "llama3"}, "'llama3' needs a positive number 'factor'"),
    ({"rope_type": "dynamic", "factor": 0}, "'dynamic' needs a positive number 'factor', got 0"),
    ({"type": "linear", "factor": "2"}, "got '2'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
     "high_freq_factor .4.0. must exceed low_freq_factor"),
])
def test_bad_rope_scaling_is_named(base, tmp_path, rope_scaling, match):
    d = variant(base, tmp_path, cfg={"rope_scaling": rope_scaling})
    with pytest.raises(ConfigError, match=match):
        load_model(d)


@pytest.mark.parametrize("update,match", [
    ({"vocab_size": None}, "vocab_size must be a positive integer, got None"),
    ({"hidden_size": 64.0}, "dim must be a positive integer, got 64.0"),
    ({"num_attention_heads": "4"}, "n_heads must be a positive integer, got '4'"),
    ({"rms_norm_eps": -1}, "norm_eps must be a positive number"),
])
def test_bad_config_field_types_are_named(base, tmp_path, update, match):
    d = variant(base, tmp_path, cfg=update)
    with pytest.raises(ConfigError, match=match):
        load_model(d)


def test_config_that_is_not_an_object(base, tmp_path):
    d = variant(base, tmp_path)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object, got a list"):
        load_model(d)


# ---- tensors the config has no place for, or cannot be read ------------------------------------------

def test_bias_tensors_are_refused(base, tmp_path):
    d = variant(base, tmp_path, tensors=lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.ones(64)}))
    with pytest.raises(ConfigError, match=r"no place for .*layers\.0\.self_attn\.q_proj\.bias"):
        load_model(d)


def test_config_with_fewer_layers_than_the_weights_is_refused(base, tmp_path):
    d = variant(base, tmp_path, cfg={"num_hidden_layers": 1})
    with pytest.raises(ConfigError, match=r"config says 1 layers.*layers\.1\."):
        load_model(d)


def test_buffers_and_foreign_tensors_are_skipped(base, tmp_path):
    """Old checkpoints carry RoPE inv_freq buffers, Medusa ones their heads: neither is the model's."""
    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(HEAD_DIM // 2)
        t["medusa_head.0.0.linear.bias"] = torch.ones(8)
    load_model(variant(base, tmp_path, tensors=edit), max_seq_len=32)


def test_integer_weights_are_refused(base, tmp_path):
    d = variant(base, tmp_path, tensors=lambda t: t.update(
        {"model.layers.0.mlp.up_proj.weight": torch.zeros(C["intermediate_size"], C["hidden_size"], dtype=torch.int8)}))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is stored as int8"):
        load_model(d)


def test_bf16_safetensors_load_as_their_values(base, tmp_path):
    d = variant(base, tmp_path, tensors=lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    got = load_model(d, max_seq_len=32).model.state_dict()["layers.0.attention.wqkv.weight"]
    ref = load_model(base, max_seq_len=32).model.state_dict()["layers.0.attention.wqkv.weight"]
    assert torch.equal(got, ref.bfloat16().float())


@pytest.mark.parametrize("cut", ["empty", "half", "garbage"])
def test_corrupt_safetensors_names_the_file(base, tmp_path, cut):
    d = variant(base, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "half": data[:len(data) // 2], "garbage": b"\x00" * 64}[cut])
    with pytest.raises(ModelLoadError, match="model.safetensors: cannot read as safetensors"):
        load_model(d)


@pytest.mark.parametrize("index,match", [("{", "is not valid JSON"), ("{}", "has no weight_map")])
def test_bad_shard_index_names_the_file(base, tmp_path, index, match):
    d = variant(base, tmp_path)
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ModelLoadError, match="model.safetensors.index.json " + match):
        load_model(d)


def test_corrupt_pytorch_bin_names_the_file(base, tmp_path):
    d = variant(base, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"junk" * 10)
    with pytest.raises(ModelLoadError, match="pytorch_model.bin: cannot read as a PyTorch checkpoint"):
        load_model(d)


def test_weights_file_given_instead_of_its_directory(base):
    with pytest.raises(ModelLoadError, match=f"pass its directory, {base}"):
        load_model(base / "model.safetensors")


def test_tokenizer_with_ids_past_the_embedding(base, tmp_path):
    """Tokens added to the tokenizer but not to the checkpoint: a text using them is an InputError, not an
    IndexError from torch's embedding."""
    from tokenizers import Tokenizer
    d = variant(base, tmp_path)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens([f"<extra{i}>" for i in range(12)])
    tok.save(str(d / "tokenizer.json"))
    loaded = load_model(d, max_seq_len=32)
    assert loaded.tokenizer.encode("plain text")
    with pytest.raises(InputError, match=r"token 311 \('<extra11>'\).*300 rows"):
        loaded.tokenizer.encode("hi <extra11>")


# ---- GGUF ----------------------------------------------------------------------------------------------

def write_gguf(base: Path, out: Path, **kw) -> Path:
    """A llama GGUF (F32) of `base`'s weights and tokenizer, BOS as base's tokenizer_config.json says."""
    return write_tiny_gguf(base, out, add_bos=True, **kw)


def test_gguf_matches_the_hf_folder_greedy(base, tmp_path):
    from amphista_engine import Engine
    path = write_gguf(base, tmp_path / "m.gguf")
    outs = []
    for model in (base, path):
        e = Engine.from_pretrained(str(model), device="cpu", dtype="fp32", max_seq_len=64, quant="none")
        outs.append(e.generate("The quick brown fox", max_new_tokens=8, chat=False).token_ids)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("meta,edit,match", [
    ({}, lambda t: t.update({"blk.2.attn_q.weight": t["blk.0.attn_q.weight"]}), r"no place for .*blk\.2\.attn_q"),
    # a q bias makes the file one with q/k/v biases (as Qwen2's), whose k and v biases are then missing
    ({}, lambda t: t.update({"blk.0.attn_q.bias": np.ones(64, np.float32)}), r"lacks blk\.0\.attn_k\.bias"),
    ({}, lambda t: t.update({"blk.1.attn_k_norm.weight": np.ones(16, np.float32)}),
     r"no place for \(the config says 2 layers, no biases\).*blk\.1\.attn_k_norm"),
    ({"llama.expert_count": 8}, None, "expert_count is 8: mixture-of-experts"),
    ({"llama.rope.dimension_count": 8}, None, "dimension_count is 8, but heads are 16 wide"),
    ({}, lambda t: t.update({"blk.0.attn_q.weight": np.ones((60, 64), np.float32)}),
     r"blk\.0\.attn_q\.weight has shape \(60, 64\), .* imply \(64, 64\)"),
    ({}, lambda t: t.update({"rope_freqs.weight": np.ones(5, np.float32)}), r"rope_freqs\.weight has shape \(5,\)"),
    ({"llama.rope.scaling.type": "linear"}, None, "'linear' needs a positive number 'factor'"),
])
def test_gguf_checkpoint_mismatches_are_named(base, tmp_path, meta, edit, match):
    path = write_gguf(base, tmp_path / "bad.gguf", meta=meta, edit=edit)
    with pytest.raises(ConfigError, match=match) as e:
        load_model(path)
    assert "bad.gguf" in str(e.value)


def test_gguf_alignment_zero_is_a_corrupt_header(base, tmp_path):
    path = write_gguf(base, tmp_path / "a.gguf", meta={"general.alignment": 0})
    with pytest.raises(ModelLoadError, match="general.alignment is 0"):
        read_gguf(path)


def test_gguf_corrupt_header_names_the_file_once(base, tmp_path):
    data = write_gguf(base, tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:200])
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "cut.gguf")
    assert str(e.value).count("cut.gguf") == 1, str(e.value)


def test_gguf_without_its_suffix_and_a_directory_holding_one(base, tmp_path):
    path = write_gguf(base, tmp_path / "m.gguf")
    (tmp_path / "renamed").mkdir()
    shutil.copy(path, tmp_path / "renamed" / "ggml-model-f32.bin")
    assert load_model(tmp_path / "renamed" / "ggml-model-f32.bin", max_seq_len=32).config.vocab_size == 300
    (tmp_path / "dir").mkdir()
    shutil.copy(path, tmp_path / "dir" / "model.gguf")
    assert load_model(tmp_path / "dir", max_seq_len=32).source == str(tmp_path / "dir" / "model.gguf")
    shutil.copy(path, tmp_path / "dir" / "other.gguf")
    with pytest.raises(ModelLoadError, match="no config.json and 2 .gguf files"):
        load_model(tmp_path / "dir")


def test_gguf_without_vocab_size_takes_the_embedding_rows(base, tmp_path):
    """Older conversions have no llama.vocab_size; the embedding may pad past the token list."""
    def pad(t):
        for name in ("token_embd.weight", "output.weight"):
            t[name] = np.concatenate([t[name], np.zeros((4, C["hidden_size"]), np.float32)])
    path = write_gguf(base, tmp_path / "pad.gguf", skip=("vocab_size",), edit=pad)
    loaded = load_model(path, max_seq_len=32)
    assert loaded.config.vocab_size == 304 and loaded.tokenizer.vocab_size == 300


def test_gguf_tokenizer_errors_are_named(base, tmp_path):
    # token types that do not match the tokens, and merges of tokens the vocabulary lacks
    bad_types = write_gguf(base, tmp_path / "types.gguf", tokens_edit=lambda tokens, types: (tokens, types[:-1]))
    with pytest.raises(ModelLoadError, match="token_type has 299 entries for 300 tokens"):
        load_tokenizer(bad_types)
    short = write_gguf(base, tmp_path / "short.gguf", skip=("vocab_size",),
                       tokens_edit=lambda tokens, types: (tokens[:200], types[:200]))
    with pytest.raises(ModelLoadError, match="short.gguf: cannot build the GGUF's embedded 'gpt2' tokenizer"):
        load_tokenizer(short)


def test_model_config_validates_direct_construction():
    with pytest.raises(ConfigError, match="rope_scaling type 'linear' needs"):
        ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=8,
                    rope_scaling={"type": "linear"})
    with pytest.raises(ConfigError, match="n_layers must be a positive integer, got True"):
        ModelConfig(vocab_size=10, dim=8, n_layers=True, n_heads=2, n_kv_heads=2, intermediate_size=8)


def test_a_sliding_window_slides_every_mistral_layer(base, tmp_path):
    """Mistral v0.1 attends over its last `sliding_window` positions in every layer, which the model implements
    (python_tests/test_sliding_window_families_qa.py): a longer cache loads (it was refused by name while the model
    attended over all positions)."""
    from amphista_engine import Engine
    d = variant(base, tmp_path, cfg={"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                                     "sliding_window": 64})
    engine = Engine.from_pretrained(str(d), device="cpu", max_seq_len=128)
    assert engine.config.sliding_window == engine.config.real_window == 64 and engine.max_seq_len == 128
    assert engine.config.sliding_layers == tuple(range(engine.config.n_layers))
    # v0.2 and later write null (no window); use_sliding_window=false switches a given one off
    for cfg in ({"sliding_window": None}, {"sliding_window": 64, "use_sliding_window": False}):
        e = variant(base, tmp_path / str(len(cfg)), cfg=cfg)
        assert Engine.from_pretrained(str(e), device="cpu", max_seq_len=128).config.sliding_window is None


# ---- model paths, missing or misshapen tensors by the checkpoint's own names (QA round 2) ----------------------

def test_empty_or_non_path_model_is_refused_by_name(base, tmp_path, monkeypatch):
    """An unset `--model "$MODEL"` gave Path(""), the working directory, which loaded the .gguf lying there;
    None raised a bare TypeError from pathlib."""
    from amphista_engine import Engine
    shutil.copy(write_gguf(base, tmp_path / "m.gguf"), tmp_path / "stray.gguf")
    (tmp_path / "m.gguf").unlink()
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        with pytest.raises(ModelLoadError, match="model path is empty: pass a checkpoint directory"):
            load_model(empty)
    with pytest.raises(ModelLoadError, match="got NoneType None"):
        Engine.from_pretrained(None, device="cpu", max_seq_len=32)
    with pytest.raises(ModelLoadError, match="got int 3"):
        load_model(3)


def test_missing_tensors_are_named_as_the_checkpoint_names_them(base, tmp_path):
    """Was: 'checkpoint lacks 1 tensor(s) the config needs, e.g. ['output.weight']' (the engine's own names,
    which no checkpoint holds), without the folder."""
    d = variant(base, tmp_path, tensors=lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ConfigError, match=r"lacks 1 tensor\(s\) .*\['lm_head\.weight'\]; config\.json's "
                                          r"tie_word_embeddings is false") as e:
        load_model(d)
    assert str(d) in str(e.value)
    d = variant(base, tmp_path / "2", tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ConfigError, match=r"\['model\.layers\.1\.self_attn\.k_proj\.weight'\]"):
        load_model(d)


@pytest.mark.parametrize("update,match", [
    ({"vocab_size": 310}, r"model\.embed_tokens\.weight has shape \(300, 64\), but config\.json implies \(310, 64\) "
                          r"\(vocab_size, hidden_size\)"),
    ({"num_key_value_heads": 4}, r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(32, 64\), but config\.json "
                                 r"implies \(64, 64\) \(num_key_value_heads \* head_dim, hidden_size\)"),
    ({"intermediate_size": 96}, r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(128, 64\), .* \(96, 64\)"),
])
def test_shape_mismatches_name_the_checkpoint_tensor_and_config_fields(base, tmp_path, update, match):
    """Was: 'tensor layers.0.feed_forward.w13.weight: checkpoint shape (256, 64) ...': the fused gate+up weight,
    a name and a shape the checkpoint does not have."""
    d = variant(base, tmp_path, cfg=update)
    with pytest.raises(ConfigError, match=match) as e:
        load_model(d)
    assert str(e.value).startswith(str(d))


@pytest.mark.parametrize("kw,match", [
    ({"edit": lambda t: t.pop("token_embd.weight")}, "GGUF file lacks tensor token_embd.weight"),
    ({"edit": lambda t: t.pop("output_norm.weight")}, "GGUF file lacks tensor output_norm.weight"),
    ({"edit": lambda t: t.update({"blk.1.ffn_up.weight": t["blk.1.ffn_up.weight"][:96]})},
     r"tensor blk\.1\.ffn_up\.weight has shape \(96, 64\), but the llama\.\* metadata .* implies \(128, 64\)"),
    ({"edit": lambda t: t.update({"blk.0.attn_v.weight": t["blk.0.attn_v.weight"][:16]})},
     r"blk\.0\.attn_v\.weight has shape \(16, 64\)"),
    ({"edit": lambda t: t.pop("blk.1.attn_v.weight")}, r"GGUF file lacks blk\.1\.attn_v\.weight"),
    ({"edit": lambda t: t.pop("blk.0.attn_q.weight")}, r"no blk\.0\.attn_q\.weight"),
    ({"bad_type": "I8"}, "GGUF tensor blk.0.ffn_up.weight has type I8"),
])
def test_gguf_tensor_errors_name_the_file(base, tmp_path, kw, match):
    """These named neither the file nor (for shapes) the GGUF tensor: 'checkpoint lacks ... ['tok_embeddings.weight']',
    'tensor layers.0.feed_forward.w13.weight: checkpoint shape (224, 64) ...'."""
    path = write_gguf(base, tmp_path / "bad file.gguf", **kw)
    with pytest.raises(ConfigError, match=match) as e:
        load_model(path)
    assert str(e.value).startswith(f"{path}: "), str(e.value)


def test_a_single_file_checkpoint_wins_over_stray_shards(base, tmp_path):
    """As transformers: model.safetensors is the checkpoint, whatever else lies beside it (here the first shard of
    an interrupted download of the sharded revision, which was read too and failed as corrupt)."""
    d = variant(base, tmp_path)
    (d / "model-00001-of-00002.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    got = load_model(d, max_seq_len=32).model.state_dict()
    ref = load_model(base, max_seq_len=32).model.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_config_beside_a_lone_gguf_points_at_the_gguf(base, tmp_path):
    d = variant(base, tmp_path)
    (d / "model.safetensors").unlink()
    write_gguf(base, d / "model-f32.gguf")
    with pytest.raises(ModelLoadError, match=r"no weights in .*; for the GGUF file beside config\.json pass it: "
                                             r".*model-f32\.gguf"):
        load_model(d)
    assert load_model(d / "model-f32.gguf", max_seq_len=32).config.vocab_size == C["vocab_size"]


def test_the_tokenizer_is_checked_before_the_weights_are_read(base, tmp_path, monkeypatch):
    """A missing or broken tokenizer used to be reported only after every weight was read (and, for GGUF,
    dequantized): minutes for a 7B model."""
    import amphista_engine.loading as loading

    def no_weights(*a, **k):
        raise AssertionError("weights read before the tokenizer was checked")
    d = variant(base, tmp_path)
    (d / "tokenizer.json").unlink()
    gguf = write_gguf(base, tmp_path / "t.gguf", tokens_edit=lambda tokens, types: (tokens, types[:-1]))
    monkeypatch.setattr(loading, "hf_weights", no_weights)
    monkeypatch.setattr(loading, "gguf_weights", no_weights)
    with pytest.raises(ModelLoadError, match="no tokenizer.json or tokenizer.model"):
        load_model(d)
    with pytest.raises(ModelLoadError, match="token_type has 299 entries"):
        load_model(gguf)
