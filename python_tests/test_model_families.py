"""Model families beyond Llama: Qwen2 / Qwen2.5 (q/k/v biases), Qwen3 (per-head q/k RMSNorm), SmolLM3 (NoPE layers)
and YaRN RoPE scaling, loaded from Hugging Face folders and from GGUF files as llama.cpp writes them, checked against
transformers' own models; and speculative decoding on them equal to plain decoding."""
import json

import numpy as np
import pytest
import torch

from amphista_engine import Engine
from amphista_engine.errors import ConfigError
from amphista_engine.heads import random_heads
from amphista_engine.kernels import use_backend
from amphista_engine.loading import load_model
from conftest import (TINY_HF, TINY_HF_COMMON, add_gguf_bpe_vocab, add_gguf_keys, edited_copy, finish_unpermuted_gguf,
                      hf_gguf_keys, save_sharp, write_tokenizer)
from model_helpers import rel_err as _rel

transformers = pytest.importorskip("transformers")

# Qwen3's head_dim is not dim / heads (Qwen3-0.6B: 1024 wide, 16 heads of 128): so here too
KINDS = {"qwen2": {}, "qwen3": {"head_dim": 32}, "qwen3-attention-bias": {"attention_bias": True},
         "llama-attention-bias": {"attention_bias": True}}


def _hf_classes(kind):
    family = kind.split("-")[0]
    name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}[family]
    return getattr(transformers, name + "Config"), getattr(transformers, name + "ForCausalLM")


def write_model(path, kind, seed=0):
    Config, Model = _hf_classes(kind)
    torch.manual_seed(seed)
    model = Model(Config(**TINY_HF_COMMON, **KINDS[kind]))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):      # around 1, as trained norms are: q/k norms then matter
                p.add_(1.0)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, TINY_HF["vocab_size"])
    return model.eval()


@pytest.fixture(scope="module", params=list(KINDS))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, write_model(path, request.param)


def test_logits_and_greedy_answers_match_transformers(tiny):
    kind, path, hf = tiny
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=256)
    cfg = engine.config
    assert (cfg.qkv_bias, cfg.o_bias, cfg.qk_norm) == {
        "qwen2": (True, False, False), "qwen3": (False, False, True), "qwen3-attention-bias": (True, True, True),
        "llama-attention-bias": (True, True, False)}[kind]
    ids = torch.randint(0, TINY_HF["vocab_size"], (1, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(engine.model(ids, torch.arange(29)[None]), hf(ids).logits) < 1e-5
    for prompt in ("The quick brown fox", "def f(x):"):
        res = engine.generate(prompt, max_new_tokens=24, chat=False)
        prompt_ids = engine.encode_prompt(prompt, chat=False)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt_ids):].tolist()
        assert res.token_ids == ref[:len(res.token_ids)] and len(res.token_ids) == 24 or res.finish_reason == "eos"


SPEC_PROMPTS = ("The quick brown fox", "Hello, world! def f(x):")


@pytest.mark.parametrize("dtype,quant,prompt", [("fp32", "none", 0), ("bf16", "none", 1), ("fp32", "q4", 1)])
def test_speculative_greedy_equals_plain(tiny, dtype, quant, prompt):
    kind, path, _ = tiny
    if quant == "q4" and kind not in ("qwen2", "qwen3"):
        pytest.skip("4-bit: one Qwen of each kind is enough")
    engine = Engine.from_pretrained(str(path), device="cpu", dtype=dtype, max_seq_len=256, quant=quant)
    engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
    prompt = SPEC_PROMPTS[prompt]        # one a case: each model decodes both over its fp32 and bf16 runs
    plain = engine.generate(prompt, max_new_tokens=40, chat=False, speculative="none")
    for tree in ("dynamic-8", "chain-3"):
        spec = engine.generate(prompt, max_new_tokens=40, chat=False, speculative="amphista", tree=tree)
        assert spec.token_ids == plain.token_ids, (kind, dtype, quant, tree)


def test_triton_backend_equals_torch(tiny):
    kind, path, _ = tiny
    if kind != "qwen3-attention-bias":
        pytest.skip("one model with every variation is enough under the interpreter")
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=128)
    engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
    out = {}
    for name in ("torch", "triton"):     # 6 tokens: 5 tree verifications (~1 s each interpreted), one 64-key tile
        with use_backend(name):
            out[name] = engine.generate("The quick brown fox", max_new_tokens=6, chat=False,
                                        speculative="amphista", tree="dynamic-4").token_ids
    assert out["triton"] == out["torch"]


# ---- GGUF, as llama.cpp's converter writes Qwen files ----------------------------------------------------

def write_qwen_gguf(hf_dir, out, arch, qtype="F32"):
    """llama.cpp's convert_hf_to_gguf.py for Qwen2/Qwen3: `qwen2.*` / `qwen3.*` keys, Q/K rows as Hugging Face
    stores them (no RoPE permutation: its Qwen graphs use NeoX RoPE), biases and q/k norms as F32 tensors."""
    import gguf
    from safetensors.numpy import load_file
    w = load_file(str(hf_dir / "model.safetensors"))
    c = json.loads((hf_dir / "config.json").read_text())
    wr = gguf.GGUFWriter(str(out), arch)
    add_gguf_keys(wr, **hf_gguf_keys(c))
    wr.add_key_length(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    wr.add_layer_norm_rms_eps(c["rms_norm_eps"])
    wr.add_rope_freq_base(c["rope_theta"] if "rope_theta" in c else c["rope_parameters"]["rope_theta"])
    add_gguf_bpe_vocab(wr, hf_dir, c["vocab_size"], "qwen2")
    finish_unpermuted_gguf(wr, w, c["num_hidden_layers"], qtype)
    return out


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_files_match_their_hf_folders(tiny, tmp_path, qtype):
    kind, path, hf = tiny
    if kind.startswith("llama"):
        pytest.skip("llama GGUFs with biases: permuted rows, see test_llama_gguf_biases_are_unpermuted")
    arch = kind.split("-")[0]
    gguf_path = write_qwen_gguf(path, tmp_path / f"{arch}.gguf", arch, qtype)
    loaded = load_model(str(gguf_path), dtype=torch.float32, device="cpu", max_seq_len=64)
    ref = load_model(str(path), dtype=torch.float32, device="cpu", max_seq_len=64)
    assert (loaded.config.qkv_bias, loaded.config.o_bias, loaded.config.qk_norm) == \
        (ref.config.qkv_bias, ref.config.o_bias, ref.config.qk_norm)
    ids = torch.randint(0, TINY_HF["vocab_size"], (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = _rel(loaded.model(ids, torch.arange(17)[None]), hf(ids).logits)
    assert err < (1e-5 if qtype == "F32" else 3e-2), err
    text = "The quick brown fox, def f(x):"      # Qwen's pre-tokenizer here (the test vocabulary is not Qwen's)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text


def test_llama_gguf_biases_are_unpermuted(tmp_path):
    """llama.cpp permutes a `llama` file's q/k bias rows with their weights' (LlamaModel.modify_tensors)."""
    from conftest import _permute_rope_rows, write_tiny_gguf
    folder = tmp_path / "hf"
    hf = write_model(folder, "llama-attention-bias")
    w = {n: p.detach().numpy() for n, p in hf.state_dict().items()}

    def add_biases(t):
        for i in range(TINY_HF["num_hidden_layers"]):
            p = f"model.layers.{i}.self_attn."
            for hf_name, g, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2), ("v_proj", "attn_v", 0),
                                      ("o_proj", "attn_output", 0)):
                b = w[p + hf_name + ".bias"].astype(np.float32)
                if heads:
                    b = _permute_rope_rows(b, heads)
                t[f"blk.{i}.{g}.bias"] = b

    gguf_path = write_tiny_gguf(folder, tmp_path / "m.gguf", edit=add_biases)
    loaded = load_model(str(gguf_path), dtype=torch.float32, device="cpu", max_seq_len=64)
    assert loaded.config.qkv_bias and loaded.config.o_bias
    ids = torch.randint(0, TINY_HF["vocab_size"], (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(loaded.model(ids, torch.arange(17)[None]), hf(ids).logits) < 1e-5


# ---- what is refused, by name ----------------------------------------------------------------------------

def test_a_qwen2_folder_without_its_biases_is_named(tmp_path):
    folder = tmp_path / "hf"
    write_model(folder, "qwen2")
    bad = edited_copy(folder, tmp_path / "bad", tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ConfigError, match=r"lacks 1 tensor\(s\).*model.layers.1.self_attn.k_proj.bias"):
        load_model(str(bad))


def test_a_bias_of_the_wrong_size_is_named(tmp_path):
    folder = tmp_path / "hf"
    write_model(folder, "qwen2")

    def cut(t):
        t["model.layers.0.self_attn.q_proj.bias"] = t["model.layers.0.self_attn.q_proj.bias"][:-2].clone()
    bad = edited_copy(folder, tmp_path / "bad", tensors=cut)
    with pytest.raises(ConfigError, match=r"q_proj.bias has shape \(62,\), but config.json implies \(64,\) "
                                          r"\(num_attention_heads \* head_dim\)"):
        load_model(str(bad))


def test_q_k_norms_in_a_folder_whose_config_says_qwen2_are_refused(tmp_path):
    folder = tmp_path / "hf"
    write_model(folder, "qwen3")
    bad = edited_copy(folder, tmp_path / "bad", cfg={"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    with pytest.raises(ConfigError, match="lacks"):         # a Qwen2 config needs q/k/v biases the file lacks
        load_model(str(bad))
    also = edited_copy(folder, tmp_path / "also", cfg={"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ConfigError, match=r"no place for \(the config says 2 layers, no biases\).*q_norm"):
        load_model(str(also))


@pytest.mark.parametrize("update,match", [
    ({"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]}, "unsupported architecture"),
    ({"mlp_bias": True}, "mlp_bias=true"),
])
def test_other_qwen_variants_are_refused(tmp_path, update, match):
    folder = tmp_path / "hf"
    write_model(folder, "qwen3")
    with pytest.raises(ConfigError, match=match):
        load_model(str(edited_copy(folder, tmp_path / "bad", cfg=update)))


def test_a_gguf_of_another_architecture_names_the_supported_ones(tmp_path):
    folder = tmp_path / "hf"
    write_model(folder, "qwen2")
    path = write_qwen_gguf(folder, tmp_path / "m.gguf", "qwen2")
    data = path.read_bytes().replace(b"qwen2", b"gemma", 1)     # general.architecture comes first
    (tmp_path / "g.gguf").write_bytes(data)
    with pytest.raises(ConfigError,
                       match=r"architecture .gemma. is not supported \(supported: llama, qwen2, qwen3, smollm3, phi3, gemma3\)"):
        load_model(str(tmp_path / "g.gguf"))


# ---- YaRN RoPE scaling (Qwen2.5's and Qwen3's long-context setting) ---------------------------------------

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def yarn_qwen(tmp_path_factory):
    """A Qwen2 trained on 64 positions, extended x4 by YaRN (as Qwen2.5's card adds to config.json for 128k)."""
    path = tmp_path_factory.mktemp("yarn")
    Config, Model = _hf_classes("qwen2")
    torch.manual_seed(3)
    model = Model(Config(**{**TINY_HF_COMMON, "max_position_embeddings": 256}, rope_scaling=dict(YARN)))
    save_sharp(model, path)                 # sharp attention (larger q, k), so positions matter
    return path, model.eval()


def test_yarn_matches_transformers_past_the_trained_length(yarn_qwen, tmp_path):
    path, hf = yarn_qwen
    ids = torch.randint(0, TINY_HF["vocab_size"], (1, 200), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits
    # as transformers 5 saves it (rope_parameters), and as older configs and Qwen's cards write it (rope_scaling)
    old_style = edited_copy(path, tmp_path / "old", cfg={"rope_parameters": None, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}})
    for folder in (path, old_style):
        loaded = load_model(str(folder), dtype=torch.float32, device="cpu", max_seq_len=256)
        assert loaded.config.rope_scaling["factor"] == 4.0
        with torch.no_grad():
            assert _rel(loaded.model(ids, torch.arange(200)[None]), ref) < 1e-5
    # unscaled, the same weights give other logits: the test sees the scaling
    plain = edited_copy(path, tmp_path / "plain", cfg={"rope_parameters": None, "rope_scaling": None,
                                                        "rope_theta": 10000.0})
    with torch.no_grad():
        assert _rel(load_model(str(plain), dtype=torch.float32, device="cpu", max_seq_len=256).model(
            ids, torch.arange(200)[None]), ref) > 1e-2


def test_yarn_gguf_matches_transformers(yarn_qwen, tmp_path):
    import gguf
    path, hf = yarn_qwen
    out = write_qwen_gguf(path, tmp_path / "y.gguf", "qwen2")
    # llama.cpp's converter: qwen2.rope.scaling.{type, factor, original_context_length}
    data = gguf.GGUFReader(str(out))
    wr = gguf.GGUFWriter(str(tmp_path / "yarn.gguf"), "qwen2")
    for field in data.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        wr.add_key_value(field.name, field.contents(), field.types[0],
                         field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    wr.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    wr.add_rope_scaling_factor(4.0)
    wr.add_rope_scaling_orig_ctx_len(64)
    for t in data.tensors:
        wr.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    loaded = load_model(str(tmp_path / "yarn.gguf"), dtype=torch.float32, device="cpu", max_seq_len=256)
    ids = torch.randint(0, TINY_HF["vocab_size"], (1, 200), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _rel(loaded.model(ids, torch.arange(200)[None]), hf(ids).logits) < 1e-5


@pytest.mark.parametrize("rope_scaling,match", [
    ({"rope_type": "yarn"}, "'yarn' needs a positive number 'factor'"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": -1}, "beta_fast must be a positive number, got -1"),
    ({"rope_type": "longrope", "factor": 4.0}, "type 'longrope' needs short_factor"),     # Phi-3's: its lists
])
def test_bad_yarn_settings_are_named(yarn_qwen, tmp_path, rope_scaling, match):
    path, _ = yarn_qwen
    bad = edited_copy(path, tmp_path / "bad", cfg={"rope_parameters": None, "rope_theta": 10000.0,
                                                    "rope_scaling": rope_scaling})
    with pytest.raises(ConfigError, match=match):
        load_model(str(bad))


def test_partial_rotary_embeddings_are_refused(tmp_path):
    folder = tmp_path / "hf"
    write_model(folder, "qwen2")
    with pytest.raises(ConfigError, match=r"partial_rotary_factor=0.5 is not supported"):
        load_model(str(edited_copy(folder, tmp_path / "bad", cfg={"partial_rotary_factor": 0.5})))


def test_4bit_qwen_layers_run_in_the_cpu_layer_stack(tiny, monkeypatch):
    """csrc/cpu/decoder.h runs the q/k/v bias and the q/k norms itself (a 0.5B Qwen2.5-shaped random model's 4-bit
    plain step: 15.5 ms there against 20-35 ms in the Python layer loop, dynamic-4 33 against 62 ms; 2-core Xeon);
    its logits agree with the layer loop's. An output-projection bias keeps the loop."""
    from amphista_engine.kernels import cpu_ops
    from amphista_engine.model import AttentionSpec, causal_mask
    from amphista_engine.kv_cache import KVCache
    kind, path, _ = tiny
    if cpu_ops.load_extension() is None:
        pytest.skip("the cpu extension is not built")
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=128, quant="q4")
    model, cfg = engine.model, engine.config
    runs = cpu_ops.stack_runs(model.layers, model.norm, cfg, torch.float32, model)
    assert runs == (not cfg.o_bias), kind
    if not runs:
        return
    ids = torch.randint(0, TINY_HF["vocab_size"], (1, 23), generator=torch.Generator().manual_seed(5))

    def logits():
        cache = KVCache.for_model(cfg, 1, 128, torch.float32, "cpu")
        spec = AttentionSpec(torch.zeros(1, dtype=torch.long), causal_mask(23, "cpu"), kv_len=32)
        with torch.inference_mode():
            return model(ids, torch.arange(23)[None], cache, spec)

    calls = []
    real = cpu_ops.decoder_layers
    monkeypatch.setattr(cpu_ops, "decoder_layers", lambda *a: calls.append(1) or real(*a))
    stack = logits()
    assert calls, "the layer stack did not run"
    monkeypatch.setattr(cpu_ops, "decoder_layers", lambda *a: NotImplemented)
    assert _rel(stack, logits()) < 1e-5


@pytest.mark.parametrize("family,over", [
    ("qwen2", {"sliding_window": 64}),                              # use_sliding_window absent: Qwen's default off
    ("qwen2", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 21}),   # past the last layer
    ("qwen2", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1}),
    ("qwen3", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 0}),
    ("qwen3", {"sliding_window": None, "use_sliding_window": True}),
])
def test_a_sliding_window_is_read_as_transformers_reads_it(family, over):
    """A window is capped (the engine attends over all positions) only where transformers' own layers slide: a
    config without use_sliding_window, or whose max_window_layers is past the last layer, was capped before."""
    from amphista_engine.config import ModelConfig
    Config, _ = _hf_classes(family)
    base = {k: v for k, v in TINY_HF.items() if k not in ("model_type", "architectures")}
    hf = Config(**{**base, **over})
    slides = "sliding_attention" in (hf.layer_types or [])
    raw = {**base, **over, "model_type": family, "architectures": [Config.__name__.replace("Config", "ForCausalLM")]}
    assert ModelConfig.from_hf(raw).sliding_window == (hf.sliding_window if slides else None)
    saved = json.loads(hf.to_json_string())                # as transformers writes it (layer_types listed)
    assert ModelConfig.from_hf(saved).sliding_window == (hf.sliding_window if slides else None)


# ---- SmolLM3: NoPE layers (every 4th attends without RoPE) ------------------------------------------------

@pytest.fixture(scope="module")
def smollm3(tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm3")
    torch.manual_seed(6)
    config = transformers.SmolLM3Config(**{**TINY_HF_COMMON, "num_hidden_layers": 4, "pad_token_id": 0})
    model = transformers.SmolLM3ForCausalLM(config)
    save_sharp(model, path)                 # sharp attention, so a missing or extra RoPE shows
    return path, model.eval()


def test_smollm3_matches_transformers_and_speculates_as_plain(smollm3, tmp_path):
    path, hf = smollm3
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=256)
    assert engine.config.nope_layers == (3,)
    ids = torch.randint(0, TINY_HF["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf(ids).logits
        assert _rel(engine.model(ids, torch.arange(40)[None]), ref) < 1e-5
    # the same weights with RoPE on every layer give other logits: the test sees the NoPE layer
    roped = load_model(str(edited_copy(path, tmp_path / "roped", cfg={"no_rope_layers": [1, 1, 1, 1]})),
                       dtype=torch.float32, device="cpu", max_seq_len=64)
    with torch.no_grad():
        assert _rel(roped.model(ids, torch.arange(40)[None]), ref) > 1e-2
    engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
    for quant in ("none", "q4"):
        if quant == "q4":
            engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=256, quant="q4")
            engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
        plain = engine.generate("The quick brown fox", max_new_tokens=40, chat=False)
        spec = engine.generate("The quick brown fox", max_new_tokens=40, chat=False, speculative="amphista",
                               tree="dynamic-8")
        assert spec.token_ids == plain.token_ids, quant


def test_smollm3_gguf_as_llama_cpp_writes_it(smollm3, tmp_path):
    """llama.cpp's `smollm3` files: Q/K rows permuted as `llama`'s (its SmolLM3 converter is the Llama one), no key
    for the NoPE layers (llama-model.cpp fixes n_no_rope_layer_step = 4)."""
    from conftest import write_tiny_gguf
    path, hf = smollm3
    gguf_path = write_tiny_gguf(path, tmp_path / "s.gguf", arch="smollm3")
    loaded = load_model(str(gguf_path), dtype=torch.float32, device="cpu", max_seq_len=64)
    assert loaded.config.nope_layers == (3,)
    ids = torch.randint(0, TINY_HF["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert _rel(loaded.model(ids, torch.arange(40)[None]), hf(ids).logits) < 1e-5


@pytest.mark.parametrize("update,match", [
    ({"no_rope_layers": [1, 0]}, r"no_rope_layers must list 0 or 1 for each of the 4 layers"),
    ({"no_rope_layers": None, "no_rope_layer_interval": 0}, "no_rope_layer_interval must be a positive integer"),
])
def test_bad_smollm3_rope_layers_are_named(smollm3, tmp_path, update, match):
    path, _ = smollm3
    with pytest.raises(ConfigError, match=match):
        load_model(str(edited_copy(path, tmp_path / "bad", cfg=update)))
