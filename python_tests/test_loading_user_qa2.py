"""Loading QA, second round: what users' folders hold in the wild. A tied config beside a head of its own, a
tokenizer.model fine-tune whose chat tokens live in tokenizer_config.json / added_tokens.json, a chat_template.jinja
that replaces the config's template, partial shard downloads, alias typos and Hub ids."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from conftest import CORPUS, edited_copy
from model_helpers import loaded_logits, pretrained_logits, rel_err

from amphista_engine.errors import ModelLoadError
from amphista_engine.loading import load_model
from amphista_engine.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

IDS = [5, 17, 40, 99, 3, 250, 7, 77, 120, 9]


def ours_logits(path, ids=IDS):
    return loaded_logits(path, ids, 64)


def hf_logits(path, ids=IDS):
    return pretrained_logits(transformers.AutoModelForCausalLM, str(path), ids)


def test_tied_config_with_a_head_of_other_values_runs_that_head(tiny_hf_dir, tmp_path):
    # tiny_hf_dir's lm_head is random, not its embedding: the config now claims they are tied
    d = edited_copy(tiny_hf_dir, tmp_path / "tied", cfg={"tie_word_embeddings": True})
    with pytest.warns(UserWarning, match="tie_word_embeddings: true.*own lm_head.weight"):
        loaded = load_model(d, max_seq_len=64)
    assert not loaded.config.tie_word_embeddings
    with torch.no_grad():
        ours = loaded.model(torch.tensor([IDS]), torch.arange(len(IDS))[None])[0]
    assert rel_err(ours, hf_logits(d)) < 1e-5

    def same(t):    # the tied head saved twice (equal values): tied, silently
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    twice = edited_copy(tiny_hf_dir, tmp_path / "twice", cfg={"tie_word_embeddings": True}, tensors=same)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_model(twice, max_seq_len=64)
    assert loaded.config.tie_word_embeddings
    assert loaded.model.output.weight.data_ptr() == loaded.model.tok_embeddings.weight.data_ptr()


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A tokenizer.model alone (400 pieces): a Llama 2 / Mistral style base vocabulary."""
    sentencepiece = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm_base")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.split("\n") * 10), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return folder / "tokenizer.model"


def _chat_finetune(spm_model, folder, legacy: bool):
    folder.mkdir()
    shutil.copy(spm_model, folder / "tokenizer.model")
    cfg = {"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True, "chat_template": TEMPLATE}
    if legacy:      # added_tokens.json, the specials named in special_tokens_map.json
        (folder / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 400, "<|im_end|>": 401}))
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}))
    else:
        cfg["added_tokens_decoder"] = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False}
                                       for i, t in ((400, "<|im_start|>"), (401, "<|im_end|>"))}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("legacy", [False, True], ids=["added_tokens_decoder", "added_tokens.json"])
def test_sentencepiece_folder_reads_its_added_chat_tokens(spm_model, tmp_path, legacy):
    tok = load_tokenizer(_chat_finetune(spm_model, tmp_path / "ft", legacy))
    assert tok.vocab_size == 402
    assert tok.token_to_id("<|im_start|>") == 400 and tok.token_to_id("<|im_end|>") == 401
    assert tok.eos_ids == [401]         # the configured eos_token, not sentencepiece's </s>
    base = load_tokenizer(spm_model)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_bos=False)
    assert ids == [400, *base.encode("user\nhi", add_bos=False), 401]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.decode(ids).startswith("<|im_start|>") and tok.decode(ids).endswith("<|im_end|>")
    assert {400, 401} <= tok.special_ids


def test_sentencepiece_added_tokens_that_are_not_special_are_kept_in_text(spm_model, tmp_path):
    folder = _chat_finetune(spm_model, tmp_path / "ft", legacy=True)
    (folder / "special_tokens_map.json").unlink()
    tok = load_tokenizer(folder)
    ids = tok.encode("x<|im_start|>", add_bos=False)   # <|im_end|> is the eos_token: special by that
    assert ids[-1] == 400 and 400 not in tok.special_ids and 401 in tok.special_ids
    assert tok.decode(ids, skip_special_tokens=True).endswith("<|im_start|>")


def test_bad_added_tokens_json_names_the_file(spm_model, tmp_path):
    folder = _chat_finetune(spm_model, tmp_path / "ft", legacy=True)
    (folder / "added_tokens.json").write_text(json.dumps({"<|im_end|>": "401"}))
    with pytest.raises(ModelLoadError, match="added_tokens.json"):
        load_tokenizer(folder)


def _tokenizer_dir(tiny_hf_dir, folder, config_update, files):
    folder.mkdir()
    shutil.copy(tiny_hf_dir / "tokenizer.json", folder)
    cfg = json.loads((tiny_hf_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, **config_update}))
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_chat_template_jinja_wins_over_the_configs_template(tiny_hf_dir, tmp_path):
    fixed, old = "{{ 'fixed' }}", "{{ 'old' }}"
    folder = _tokenizer_dir(tiny_hf_dir, tmp_path / "t", {"chat_template": old}, {"chat_template.jinja": fixed})
    assert load_tokenizer(folder).chat_template == fixed
    assert transformers.AutoTokenizer.from_pretrained(str(folder)).chat_template == fixed


def test_chat_template_as_a_dict_of_named_templates(tiny_hf_dir, tmp_path):
    folder = _tokenizer_dir(tiny_hf_dir, tmp_path / "t",
                            {"chat_template": {"tool_use": "{{ 'tools' }}", "default": "{{ 'plain' }}"}}, {})
    assert load_tokenizer(folder).chat_template == "{{ 'plain' }}"


def test_shards_without_their_index_name_the_missing_ones(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d = edited_copy(tiny_hf_dir, tmp_path / "partial")
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::3]}, str(d / "model-00001-of-00003.safetensors"))
    save_file({k: tensors[k] for k in names[2::3]}, str(d / "model-00003-of-00003.safetensors"))
    with pytest.raises(ModelLoadError, match=r"1 of the checkpoint's 3 weight shards.*model-00002-of-00003"):
        load_model(d)
    save_file({k: tensors[k] for k in names[1::3]}, str(d / "model-00002-of-00003.safetensors"))
    assert rel_err(ours_logits(d), ours_logits(tiny_hf_dir)) == 0


@pytest.mark.parametrize("typo", ["smollm2-135", "SmolLM2-135M", "smollm2_135m"])
def test_an_alias_typo_suggests_the_alias(typo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="did you mean the alias 'smollm2-135m'"):
        load_model(typo)


def test_a_hub_id_says_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="Hub id.*local files only.*download"):
        load_model("HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path / "nothing" / "here"))
    assert "Hub" not in str(e.value) and "did you mean" not in str(e.value)


NAMED = [{"name": "default", "template": "{{ 'plain:' + messages[0]['content'] }}"},
         {"name": "tool_use", "template": "{{ 'tools:' + (tools | length | string) + ':' + messages[0]['content'] }}"}]


@pytest.mark.parametrize("layout", ["config list", "additional_chat_templates"])
def test_a_prompt_with_tools_takes_the_models_tool_use_template(tiny_hf_dir, tmp_path, layout):
    """Hermes 2 Pro and Cohere ship a "tool_use" template beside the default one, and transformers renders a prompt
    with tools through it; only the default was kept, so tools went through a template that drops them."""
    from amphista_engine.chat import render_chat
    from amphista_engine.tools import template_supports_tools
    if layout == "config list":
        folder = _tokenizer_dir(tiny_hf_dir, tmp_path / "t", {"chat_template": NAMED}, {})
    else:
        # as transformers >= 4.54 saves them: the default in chat_template.jinja, the others in that folder
        folder = _tokenizer_dir(tiny_hf_dir, tmp_path / "t", {}, {"chat_template.jinja": NAMED[0]["template"]})
        (folder / "additional_chat_templates").mkdir()
        (folder / "additional_chat_templates" / "tool_use.jinja").write_text(NAMED[1]["template"])
    tok = load_tokenizer(folder)
    msgs = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert render_chat(tok, msgs) == "plain:hi"
    assert render_chat(tok, msgs, variables={"tools": tools}) == "tools:1:hi"
    assert template_supports_tools(tok)          # the tool_use template reads them, the default does not
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf.apply_chat_template(msgs, tokenize=False) == "plain:hi"
    assert hf.apply_chat_template(msgs, tools=tools, tokenize=False) == "tools:1:hi"


def test_a_gguf_keeps_its_named_tool_use_template(tmp_path):
    """llama.cpp's converter writes named templates as tokenizer.chat_template.NAME (and their names in
    tokenizer.chat_templates): a GGUF of Hermes 2 Pro offers tools through its tool_use template too."""
    from amphista_engine.chat import render_chat
    from conftest import write_vocab_gguf
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)]
    path = write_vocab_gguf(tmp_path / "t.gguf", tokens, [2, 3, 3] + [1] * 26, model="llama",
                            scores=[0.0] * len(tokens), bos=1, eos=2, unk=0, template=NAMED)
    tok = load_tokenizer(path)
    msgs = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert render_chat(tok, msgs) == "plain:hi" and render_chat(tok, msgs, variables={"tools": tools}) == "tools:1:hi"
