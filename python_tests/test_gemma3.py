"""Gemma 3 text models (Gemma3ForCausalLM, the text part of Gemma3ForConditionalGeneration, llama.cpp `gemma3`
GGUF files): (1 + w) norms before and after attention and the MLP, a GELU MLP, embeddings times sqrt(dim), sliding
layers that really attend over a window with their own RoPE base. Logits and greedy answers equal transformers' on
the same random weights, also past a tiny window; speculative answers equal plain ones; Gemma 2 is refused."""
from __future__ import annotations

import json

import pytest
import torch

from amphista_engine.engine import Engine
from amphista_engine.errors import ConfigError
from amphista_engine.loading import load_model

from conftest import add_gguf_bpe_vocab, prefill_then_decode, write_tokenizer
from model_helpers import hf_greedy, loaded_logits, plain_and_speculative, pretrained_logits, rel_err, tree_step_logits

transformers = pytest.importorskip("transformers")

V = 300
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, query_pre_attn_scalar=16, sliding_window=512,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
# a tiny window, a query_pre_attn_scalar that is not head_dim, linear RoPE scaling on the full layer (Gemma-3-4B's
# kind), another local RoPE base and a logit softcap: every Gemma 3 option at once
WINDOWED = dict(sliding_window=8, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})
IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 280, 64] * 12


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):      # Gemma norms scale by 1 + w: w around 0, not 1
                p.normal_(0, 0.3)
    return model


def write_gemma3(path, **over):
    model = _randomize(transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{**BASE, **over})))
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, V)
    return path


def hf_logits(path, ids, cls=None):
    return pretrained_logits(cls or transformers.Gemma3ForCausalLM, path, ids)


def ours_logits(path, ids, max_seq_len=256):
    return loaded_logits(path, ids, max_seq_len)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    return write_gemma3(tmp_path_factory.mktemp("gemma3") / "w", **WINDOWED)


def test_gemma3_matches_transformers_within_the_window(tmp_path):
    d = write_gemma3(tmp_path / "g")
    cfg = load_model(d, max_seq_len=64).config
    assert cfg.gemma and cfg.sliding_layers == (0, 2) and cfg.tie_word_embeddings and cfg.real_window == 512
    assert rel_err(ours_logits(d, IDS[:40]), hf_logits(d, IDS[:40])) < 1e-5


def test_sliding_window_past_it_matches_transformers(windowed, tmp_path):
    ids = IDS[:60]                                          # 7x the window of 8
    ref = hf_logits(windowed, ids)
    right = rel_err(ours_logits(windowed, ids), ref)
    assert right < 1e-5
    # the window, the local RoPE base and the softcap each matter: without them the logits are far off
    for key, value in (("sliding_window", 512), ("rope_parameters", None), ("final_logit_softcapping", None)):
        d = tmp_path / key
        d.mkdir()
        for f in windowed.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        assert rel_err(ours_logits(d, ids), ref) > max(1e-3, 100 * right), key


@pytest.mark.parametrize("exact", [False, True])
def test_cached_prefill_and_decode_past_the_window(windowed, exact, monkeypatch):
    """The KV-cache paths: a 70-token prompt (CAUSAL_PREFILL for the full layer, the window mask for the sliding
    ones), then token by token far past the window, each position's logits as transformers' full forward. exact:
    fp32 decode steps on the CPU's ordered path (AMPHISTA_EXACT_GREEDY=1: cpu_exact's layout, windowed for the
    sliding layers), what bf16 decode steps always take."""
    monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", "1" if exact else "0")
    m = load_model(windowed, max_seq_len=128).model
    ids = IDS[:90]
    ref = hf_logits(windowed, ids)
    got, _ = prefill_then_decode(m, ids, 70)
    assert rel_err(got, ref) < 1e-5


def test_long_message_after_a_kept_prefix(windowed):
    """A chat turn's long message after a kept prefix (AttentionSpec.kept_prefix, past 64 new tokens:
    CAUSAL_AFTER_PREFIX for the full layer, the window mask for the sliding ones)."""
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import CAUSAL_AFTER_PREFIX, AttentionSpec, causal_mask, prefill_mask_args
    m = load_model(windowed, max_seq_len=128).model
    ids, r = IDS[:100], 30
    cache = KVCache.for_model(m.config, 1, 128, torch.float32, "cpu")
    with torch.no_grad():
        spec = AttentionSpec(torch.zeros(1, dtype=torch.long), causal_mask(r, "cpu"), r, empty_prefix=True)
        first = m(torch.tensor([ids[:r]]), torch.arange(r)[None], cache, spec)[0]
        spec = AttentionSpec(torch.tensor([r]), causal_mask(len(ids) - r, "cpu"), len(ids), kept_prefix=r)
        assert prefill_mask_args(spec, torch.float32) == CAUSAL_AFTER_PREFIX
        rest = m(torch.tensor([ids[r:]]), torch.arange(r, len(ids))[None], cache, spec)[0]
    assert rel_err(torch.cat([first, rest]), hf_logits(windowed, ids)) < 1e-5


@pytest.mark.parametrize("exact", [False, True])
def test_tree_verification_past_the_window(windowed, exact, monkeypatch):
    """A speculative step's tree after a 30-token prefix (window 8): each node's logits are transformers' for the
    prefix plus the node's path (siblings in other slots, positions by depth)."""
    monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", "1" if exact else "0")
    m = load_model(windowed, max_seq_len=128).model
    prefix = IDS[:30]
    out, paths = tree_step_logits(m, prefix)
    for i, path in enumerate(paths):
        ref = hf_logits(windowed, prefix + path)[-1]
        assert rel_err(out[i], ref) < 1e-5, (i, path)


def test_engine_greedy_equals_transformers_generate(windowed):
    eng = Engine.from_pretrained(str(windowed), device="cpu", dtype="fp32", max_seq_len=256)
    assert eng.max_seq_len == 256           # the window is implemented, not a cap on the cache
    prompt = IDS[:20]
    hf = transformers.Gemma3ForCausalLM.from_pretrained(windowed, dtype=torch.float32).eval()
    want = hf_greedy(hf, prompt, 40)
    got = eng.generate(prompt, chat=False, max_new_tokens=40, min_tokens=40, speculative="none").token_ids
    assert got == want


def test_long_prompt_in_prefill_chunks_equals_transformers(windowed, monkeypatch):
    """A prompt longer than a prefill chunk (Transformer.prefill_chunk: Gemma past its window prefills in chunks so
    the sliding layers' masks stay [chunk, kv_len]), chunks of 65 here; softcapped logits from _prefill_chunks."""
    import amphista_engine.model as model_mod
    monkeypatch.setattr(model_mod, "WINDOW_PREFILL_CHUNK", 16)
    eng = Engine.from_pretrained(str(windowed), device="cpu", dtype="fp32", max_seq_len=256)
    from amphista_engine.kv_cache import KVCache
    assert eng.model.prefill_chunk(KVCache.for_model(eng.config, 1, 256, torch.float32, "cpu")) == 65
    assert eng.model.prefill_chunk(KVCache.for_model(eng.config, 1, 8, torch.float32, "cpu")) is None
    prompt = IDS[:100]
    hf = transformers.Gemma3ForCausalLM.from_pretrained(windowed, dtype=torch.float32).eval()
    want = hf_greedy(hf, prompt, 12)
    got = eng.generate(prompt, chat=False, max_new_tokens=12, min_tokens=12, speculative="none").token_ids
    assert got == want


@pytest.mark.parametrize("dtype,quant", [("fp32", "none"), ("bf16", "none"), ("fp32", "q4")])
def test_speculative_equals_plain_past_the_window(windowed, dtype, quant):
    """Random Amphista heads on a window of 8: greedy speculative answers are the plain ones, in fp32, in bf16 (the
    CPU's ordered decode steps, windowed for the sliding layers) and with 4-bit linears (the C++ layer stack
    declines Gemma: the Python layer loop over the 4-bit linears)."""
    from amphista_engine.heads import random_heads
    eng = Engine.from_pretrained(str(windowed), device="cpu", dtype=dtype, max_seq_len=256, quant=quant)
    assert eng.quant == quant
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    for prompt in (IDS[:5], IDS[:30]):
        plain, spec = plain_and_speculative(eng, prompt, 40)
        assert len(plain) == 40 and spec == plain


def gguf_names(n_layers: int) -> dict:
    """Hugging Face Gemma 3 tensor names -> llama.cpp's gemma3 GGUF names."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(n_layers):
        names.update({f"model.layers.{i}.{h}.weight": f"blk.{i}.{g}.weight" for h, g in (
            ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"), ("self_attn.q_norm", "attn_q_norm"),
            ("self_attn.k_norm", "attn_k_norm"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "post_attention_norm"), ("pre_feedforward_layernorm", "ffn_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"))})
    return names


def write_gemma3_gguf(hf_dir, out, cfg):
    """The tiny Gemma 3 as llama.cpp's converter writes a `gemma3` GGUF, as assumed here (convert_hf_to_gguf.py's
    Gemma3Model): tensor names attn_norm / post_attention_norm / ffn_norm (pre-feedforward) / post_ffw_norm,
    attn_q_norm / attn_k_norm, no output.weight (tied), Q/K rows as stored (NeoX RoPE: no permutation), and 1
    added to every norm weight (its graph multiplies by the weight, Gemma by 1 + w). The sliding layers as the
    period attention.sliding_window_pattern, their RoPE base as rope.freq_base_swa."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from conftest import _add_gguf_tensor, _close_gguf, add_gguf_keys
    w = load_file(str(hf_dir / "model.safetensors"))
    wr = gguf.GGUFWriter(str(out), "gemma3")
    add_gguf_keys(wr, block_count=cfg["num_hidden_layers"], context_length=512, embedding_length=64,
                  feed_forward_length=128, head_count=4, head_count_kv=2, key_length=16, value_length=16,
                  rope_dimension_count=16, layer_norm_rms_eps=1e-6, rope_freq_base=cfg["rope_theta"])
    wr.add_float32("gemma3.rope.freq_base_swa", cfg["rope_local_theta"])
    wr.add_sliding_window(cfg["sliding_window"])
    wr.add_sliding_window_pattern(cfg["pattern"])
    add_gguf_bpe_vocab(wr, hf_dir, V, "default")
    for hf_name, g in gguf_names(cfg["num_hidden_layers"]).items():
        x = w[hf_name].astype(np.float32)
        _add_gguf_tensor(wr, g, x + 1 if g.endswith("norm.weight") else x, "F32")
    _close_gguf(wr)
    return out


def test_gemma3_gguf_matches_transformers(tmp_path):
    # llama.cpp's default period of 6 (5 sliding layers, then a full one) over 7 layers
    over = dict(num_hidden_layers=7, layer_types=None, sliding_window=8, sliding_window_pattern=6,
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})
    d = write_gemma3(tmp_path / "hf", **over)
    f = write_gemma3_gguf(d, tmp_path / "g.gguf", dict(num_hidden_layers=7, rope_theta=100000.0,
                                                       rope_local_theta=1000.0, sliding_window=8, pattern=6))
    cfg = load_model(f, max_seq_len=64).config
    assert cfg.gemma and cfg.sliding_layers == (0, 1, 2, 3, 4, 6) and cfg.sliding_window == 8
    ids = IDS[:40]
    assert rel_err(ours_logits(f, ids), hf_logits(d, ids)) < 1e-5


def test_conditional_generation_text_part(tmp_path):
    text = {**BASE, **WINDOWED}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    model = _randomize(transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=V - 1,
        boi_token_index=V - 3, eoi_token_index=V - 2)))
    d = tmp_path / "cg"
    model.save_pretrained(d, safe_serialization=True)
    write_tokenizer(d, V)
    m = load_model(d, max_seq_len=128)
    assert m.config.gemma and m.config.real_window == 8
    ids = IDS[:50]
    ref = hf_logits(d, ids, transformers.Gemma3ForConditionalGeneration)
    assert rel_err(ours_logits(d, ids), ref) < 1e-5


def test_gemma2_and_gemma1_are_refused_by_name(tmp_path):
    d = write_gemma3(tmp_path / "g2")
    cfg = json.loads((d / "config.json").read_text())
    for edit, what in (({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
                         "attn_logit_softcapping": 50.0}, "Gemma 2.*attn_logit_softcapping"),
                       ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "Gemma 3 text models"),
                       ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
                       ({"hidden_activation": "silu"}, "hidden_activation 'silu'")):
        (d / "config.json").write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(ConfigError, match=what):
            load_model(d)


def test_gemma2_gguf_is_refused(tmp_path):
    f = tmp_path / "g2.gguf"
    _gemma2_gguf(f)
    with pytest.raises(ConfigError, match="gemma2.*attn_logit_softcapping"):
        load_model(f)


def _gemma2_gguf(f):
    import gguf
    import numpy as np
    from conftest import _close_gguf
    wr = gguf.GGUFWriter(str(f), "gemma2")
    wr.add_block_count(1)
    wr.add_embedding_length(8)
    wr.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    _close_gguf(wr)
