"""Gemma 3 as a user brings it: a Gemma-3-1b-it-shaped folder (the Hub's config.json keys, a byte-fallback "▁" BPE
tokenizer.json with Gemma's special ids, Gemma's own chat template, generation_config eos [1, 106]) and its
llama.cpp GGUF (sentencepiece vocabulary, Q8_0 matrices, no sliding_window_pattern key); and the Gemma-family
configs that must be refused by name: a classifier or a bare text model (they loaded as language models through the
tied embeddings), a bitsandbytes Gemma-3-4B whose quantization_config sits at the top level (it loaded), PaliGemma."""
from __future__ import annotations

import json

import pytest
import torch

from amphista_engine.config import ModelConfig
from amphista_engine.engine import Engine
from amphista_engine.errors import ConfigError, InputError

transformers = pytest.importorskip("transformers")

CORPUS = ("The quick brown fox jumps over the lazy dog. Hello world! How are you today? I am fine, thank you. "
          "What is the capital of France? Paris is the capital of France. Write a poem about the sea. ") * 20
# Gemma 3's chat template (tokenizer_config.json): the system message folded into the first user turn, strict
# alternation, 'assistant' rendered as 'model'
TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n")
SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 105: "<start_of_turn>", 106: "<end_of_turn>"}


def _tokenizer_files(path) -> int:
    """tokenizer.json as Gemma's: BPE with byte_fallback over '▁'-normalized text, <unusedN> up to 104, the turn
    markers at 105/106, the <0xXX> byte pieces, then the merged pieces; returns the vocabulary's size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    t = Tokenizer(models.BPE(byte_fallback=True))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    t.train_from_iterator([CORPUS.replace(" ", "▁")], trainers.BpeTrainer(vocab_size=220, show_progress=False))
    j = json.loads(t.to_str())
    learned = j["model"]["vocab"]
    vocab = {SPECIALS.get(i, f"<unused{i}>"): i for i in range(107)}
    vocab.update({f"<0x{b:02X}>": 107 + b for b in range(256)})
    for tok in sorted(learned, key=learned.get):
        vocab.setdefault(tok, len(vocab))
    j["model"].update(vocab=vocab, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    j["pre_tokenizer"] = None
    j["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]}
    j["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, c in SPECIALS.items()]
    (path / "tokenizer.json").write_text(json.dumps(j, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "chat_template": TEMPLATE, "tokenizer_class": "GemmaTokenizer"}))
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": True, "eos_token_id": [1, 106],
        "pad_token_id": 0, "top_k": 64, "top_p": 0.95}))
    return len(vocab)


def _hub_config(V: int) -> dict:
    """Gemma-3-1b-it's config.json, keys as on the Hub (sliding_window_pattern, no layer_types, rope_scaling null,
    rope_local_base_freq), tiny sizes and a window of 8."""
    return {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
            "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 16,
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 64, "initializer_range": 0.02,
            "intermediate_size": 128, "max_position_embeddings": 32768, "model_type": "gemma3_text",
            "num_attention_heads": 4, "num_hidden_layers": 7, "num_key_value_heads": 1, "pad_token_id": 0,
            "query_pre_attn_scalar": 16, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
            "rope_theta": 1000000, "sliding_window": 8, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
            "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": V}


@pytest.fixture(scope="module")
def gemma_1b_it(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3_1b_it")
    V = _tokenizer_files(path)
    cfg = _hub_config(V)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**cfg))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if name.endswith("norm.weight") else 0.1)
    model.save_pretrained(path, safe_serialization=True)
    (path / "config.json").write_text(json.dumps(cfg))        # the Hub's keys, not transformers 5's rewrite
    _tokenizer_files(path)                                    # save_pretrained rewrote generation_config.json
    return path


def test_gemma_3_1b_it_folder_chats_as_transformers_does(gemma_1b_it):
    """A guard of the whole user path (it passed before this file's fixes): defaults, the chat prompt's ids as
    transformers' apply_chat_template gives them, greedy answers past the window as transformers', a reply that
    ends at <end_of_turn>, and the template's own error for roles that do not alternate."""
    eng = Engine.from_pretrained(str(gemma_1b_it), device="cpu")
    assert (eng.max_seq_len, eng.dtype, eng.quant) == (2048, torch.float32, "none")
    assert {1, 106} <= set(eng.eos_ids)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world! How are you?"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(gemma_1b_it)
    want = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = eng.encode_prompt(msgs)
    assert ids == (want if isinstance(want, list) else want["input_ids"])
    hf = transformers.Gemma3ForCausalLM.from_pretrained(gemma_1b_it, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
    assert len(ids) + 12 > 3 * 8         # past the window of 8
    assert eng.generate(msgs, max_new_tokens=12, ignore_eos=True).token_ids == ref
    r = eng.generate(msgs, max_new_tokens=20, min_tokens=2, logit_bias={106: 100.0})
    assert r.finish_reason == "eos" and len(r.token_ids) == 2 and "<end_of_turn>" not in r.text
    with pytest.raises(InputError, match="roles must alternate"):
        eng.generate([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], max_new_tokens=2)


def _hub_4b_config(**over) -> dict:
    """Gemma-3-4b-it's config.json: a Gemma3ForConditionalGeneration whose text_config leaves most keys to
    Gemma3TextConfig's defaults and scales the full layers' RoPE linearly by 8."""
    return {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
            "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
            "mm_tokens_per_image": 256, "model_type": "gemma3",
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                            "sliding_window": 1024},
            "torch_dtype": "bfloat16", "vision_config": {"model_type": "siglip_vision_model"}, **over}


def test_quantization_config_at_a_gemma3_configs_top_level_is_refused_by_name():
    """unsloth's bitsandbytes Gemma-3-4B keeps quantization_config at the top level, beside text_config: it was
    not looked at (the checkpoint then failed later on a uint8 tensor, or a GPTQ/AWQ one on missing weights)."""
    assert ModelConfig.from_hf(_hub_4b_config()).rope_scaling == {"factor": 8.0, "rope_type": "linear"}
    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    with pytest.raises(ConfigError, match="quantization_config, quant_method 'bitsandbytes'.*GGUF"):
        ModelConfig.from_hf(_hub_4b_config(quantization_config=quant))


@pytest.mark.parametrize("arch", ["Gemma3ForSequenceClassification", "Gemma3TextModel"])
def test_gemma3_models_without_an_lm_head_are_refused(gemma_1b_it, arch):
    """A classifier (score head) or a bare text model loaded as a language model through the tied embeddings:
    generate() answered with tokens from a model that never predicted any."""
    cfg = json.loads((gemma_1b_it / "config.json").read_text())
    with pytest.raises(ConfigError, match=f"'{arch}'.*Gemma3ForCausalLM"):
        ModelConfig.from_hf({**cfg, "architectures": [arch]})
    # a config without architectures is still read by its model_type
    assert ModelConfig.from_hf({k: v for k, v in cfg.items() if k != "architectures"}).gemma


def test_paligemma_is_refused_by_name():
    for text_type in ("gemma", "gemma2"):
        cfg = {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
               "text_config": {"model_type": text_type}}
        with pytest.raises(ConfigError, match="PaliGemma .* not supported.*Gemma 1 or Gemma 2"):
            ModelConfig.from_hf(cfg)


def _write_gguf(hf_dir, out, qtype: str, turn_marker_type: int):
    """The 1b-it folder as a llama.cpp `gemma3` GGUF with its sentencepiece vocabulary (tokenizer.ggml.model
    'llama', no space prefix, the chat template), no attention.sliding_window_pattern key (llama.cpp's period of 6)
    and <start_of_turn>/<end_of_turn> typed turn_marker_type (Google's QAT GGUFs: 1, NORMAL)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from conftest import _add_gguf_tensor, _close_gguf
    from test_gemma3 import gguf_names
    w = load_file(str(hf_dir / "model.safetensors"))
    vocab = json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    types = [6 if t.startswith("<0x") else 2 if t == "<unk>" else turn_marker_type if i in (105, 106)
             else 3 if i in SPECIALS else 5 if t.startswith("<unused") else 1 for i, t in enumerate(tokens)]
    wr = gguf.GGUFWriter(str(out), "gemma3")
    wr.add_block_count(7)
    wr.add_context_length(32768)
    wr.add_embedding_length(64)
    wr.add_feed_forward_length(128)
    wr.add_head_count(4)
    wr.add_head_count_kv(1)
    wr.add_key_length(16)
    wr.add_value_length(16)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_rope_freq_base(1000000.0)
    wr.add_sliding_window(8)
    wr.add_tokenizer_model("llama")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_scores([-float(i) for i in range(len(tokens))])
    wr.add_bos_token_id(2)
    wr.add_eos_token_id(1)
    wr.add_unk_token_id(3)
    wr.add_pad_token_id(0)
    wr.add_add_bos_token(True)
    wr.add_add_space_prefix(False)
    wr.add_chat_template(TEMPLATE)
    for hf_name, g in gguf_names(7).items():
        x = w[hf_name].astype(np.float32)
        _add_gguf_tensor(wr, g, x + 1 if g.endswith("norm.weight") else x, qtype)   # llama.cpp stores 1 + w
    _close_gguf(wr)
    return out


def test_gemma3_gguf_whose_turn_markers_are_typed_normal_still_chats(gemma_1b_it, tmp_path):
    """Google's QAT Gemma 3 GGUFs type <start_of_turn>/<end_of_turn> NORMAL (1), not CONTROL (3): the chat prompt's
    markers were cut into pieces, and <end_of_turn> never ended a reply (not special, so not collected as an
    end-of-turn id): the answer ran to max_new_tokens with '<end_of_turn>' in its text."""
    f = _write_gguf(gemma_1b_it, tmp_path / "g.gguf", "Q8_0", turn_marker_type=1)
    eng = Engine.from_pretrained(str(f), device="cpu", max_seq_len=128)
    assert eng.config.sliding_layers == (0, 1, 2, 3, 4, 6)       # llama.cpp's period of 6 without the key
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world! How are you?"}]
    want = transformers.AutoTokenizer.from_pretrained(gemma_1b_it).apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True)
    assert eng.encode_prompt(msgs) == (want if isinstance(want, list) else want["input_ids"])
    assert 106 in eng.eos_ids
    r = eng.generate(msgs, max_new_tokens=20, min_tokens=2, logit_bias={106: 100.0})
    assert r.finish_reason == "eos" and len(r.token_ids) == 2 and "<end_of_turn>" not in r.text
