"""Tokenizer backends against independent references: transformers (GGUF and tokenizer.json) and
the sentencepiece library itself, on text that stresses whitespace, digits, unicode and specials."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from amphista_engine.errors import InputError, ModelLoadError
from amphista_engine.gguf_file import read_gguf_metadata
from amphista_engine.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

from conftest import SMOLLM2_GGUF, write_vocab_gguf
from conftest import needs_smollm2_gguf as needs_smollm2


TEXTS = [
    "Hello world",
    "Hello, world! How are you doing today?",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   spaces\n\n\nnewlines\ttabs\t\tend\r\n",
    "12345 and 3.14159 and 1,000,000 and 2024-01-31",
    "naïve café déjà vu — “quotes” ‘single’ …",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "def f(x):\n    return {'a': [1, 2]}  # code\n\tif x >= 0 and y != 1: pass",
    "I'm sure you're right, they'll see it's WE'VE DONE",
    "Ünïcödé ÀÉÎÕÜ straße ﬁ Ω≈ç√∫",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b",
    "",
    " ",
    "\n",
]

SPM_CORPUS = """The quick brown fox jumps over the lazy dog. Hello world! 12345 67890 3.14
Vicuna is a chat assistant. USER: hi ASSISTANT: hello there, how are you today?
A chat between a curious user and an artificial intelligence assistant.
Unicode: héllo wörld naïve café — quotes and emoji 😀 🎉 中文 日本語
def f(x):
    return x * 2  # code
\tTabbed line with   several   spaces
""".splitlines()


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is the optional reference implementation")


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer(SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def smol_reference(tmp_path_factory):
    """transformers' own GGUF tokenizer conversion, loaded from a local folder (no hub access)."""
    transformers = _transformers()
    folder = tmp_path_factory.mktemp("smol_gguf")
    (folder / SMOLLM2_GGUF.name).symlink_to(SMOLLM2_GGUF)
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF.name, local_files_only=True)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    """A tiny Llama-style sentencepiece BPE model: byte fallback, no normalization, one user-defined piece."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 10), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, user_defined_symbols=["<|im_end|>"], minloglevel=2)
    return folder


@pytest.fixture(scope="module")
def spm(spm_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def spm_gguf(spm, tmp_path_factory) -> Path:
    """The tiny sentencepiece vocabulary as llama.cpp stores it (tokenizer.ggml.model = "llama")."""
    n = spm.get_piece_size()
    tokens = [spm.id_to_piece(i) for i in range(n)]
    types = [2 if spm.is_unknown(i) else 3 if spm.is_control(i) else 6 if spm.is_byte(i)
             else 4 if tokens[i] == "<|im_end|>" else 1 for i in range(n)]
    return write_vocab_gguf(tmp_path_factory.mktemp("spm_gguf") / "tiny.gguf", tokens, types, model="llama",
                            scores=[spm.get_score(i) for i in range(n)], bos=spm.bos_id(), eos=spm.eos_id(),
                            unk=spm.unk_id(), add_bos=True)


# -- GGUF byte-level BPE (SmolLM2) -----------------------------------------------------------------

@needs_smollm2
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_gguf_matches_transformers(smol, smol_reference, text):
    ids = smol.encode(text, add_bos=False)
    assert ids == smol_reference.encode(text, add_special_tokens=False)
    assert smol.encode(text) == smol_reference.encode(text)  # add_bos_token is False for SmolLM2
    assert smol.decode(ids) == smol_reference.decode(ids)
    assert smol.decode(ids, skip_special_tokens=True) == smol_reference.decode(ids, skip_special_tokens=True)


@needs_smollm2
def test_smollm2_gguf_splits_digits_like_original(smol, smol_reference):
    """transformers' GGUF conversion ignores tokenizer.ggml.pre = "smollm" and splits with the plain
    GPT-2 regex, which differs where whitespace or a non-ASCII number (`٣`, `½`) meets a digit. The
    SmolLM2 repo's tokenizer.json (and llama.cpp) isolate every Unicode number first: rebuild that
    pre-tokenizer on transformers' vocabulary and compare there."""
    from tokenizers import Tokenizer as HFTokenizer, pre_tokenizers

    original = HFTokenizer.from_str(smol_reference.backend_tokenizer.to_str())  # a copy: the fixture is shared
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TEXTS + ["uln) ٣s", "x\n 1234 56 7.89", " ½ ² x99", "\t 42\n\n 7"]:
        assert smol.encode(text) == original.encode(text, add_special_tokens=False).ids, text
    assert [smol.id_to_piece(i) for i in smol.encode("\n 12")] == ["ĊĠ", "1", "2"]


@needs_smollm2
def test_smollm2_gguf_round_trip_and_specials(smol):
    for text in TEXTS:
        assert smol.decode(smol.encode(text)) == text
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.pad_id, smol.add_bos) == (1, 2, False)
    assert smol.eos_ids[0] == 2 and 0 in smol.eos_ids  # <|im_end|> declared, <|endoftext|> added
    assert smol.id_to_piece(2) == "<|im_end|>" and smol.token_to_id("<|im_start|>") == 1
    assert smol.token_to_id("no such token") is None
    assert smol.chat_template.startswith("{% for message in messages %}")
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>"):
        assert len(smol.encode(special)) == 1 and smol.token_to_id(special) in smol.special_ids
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    assert smol.decode(ids, skip_special_tokens=True) == "user\nhi"
    # Explicit BOS, never doubled; out-of-vocabulary ids (padded embeddings) decode to nothing.
    assert smol.encode("hi", add_bos=True)[0] == 1 and smol.encode("<|im_start|>hi", add_bos=True).count(1) == 1
    assert smol.decode([*smol.encode("hi"), 49152, 50000]) == "hi"
    # SmolLM2 was trained with every digit split apart (llama.cpp's "smollm" pre-tokenizer).
    assert [smol.id_to_piece(i) for i in smol.encode("x 2024")] == ["x", "Ġ", "2", "0", "2", "4"]


@needs_smollm2
def test_gguf_reader_source(smol):
    import gguf

    from_reader = load_tokenizer(gguf.GGUFReader(str(SMOLLM2_GGUF)))
    assert from_reader.eos_ids == smol.eos_ids and from_reader.chat_template == smol.chat_template
    assert all(from_reader.encode(t) == smol.encode(t) for t in TEXTS)


@needs_smollm2
def test_gguf_llama_bpe_pre_tokenizer(smol, tmp_path):
    """The same vocabulary relabelled `llama-bpe` must split like Llama 3 (digits in groups of three)."""
    transformers = _transformers()
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    meta = read_gguf_metadata(str(SMOLLM2_GGUF))
    path = write_vocab_gguf(tmp_path / "llama_bpe.gguf", meta["tokenizer.ggml.tokens"],
                            meta["tokenizer.ggml.token_type"], pre="llama-bpe", merges=meta["tokenizer.ggml.merges"],
                            bos=1, eos=2)
    ours = load_tokenizer(path)
    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    reference, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    assert transformers is not None
    for text in TEXTS:
        assert ours.encode(text, add_bos=False) == reference.encode(text, add_special_tokens=False).ids, text
    assert ours.add_bos  # llama.cpp adds BOS for Llama-3 vocabularies unless the file says otherwise


# -- tokenizer.json ----------------------------------------------------------------------------------

@needs_smollm2
def test_tokenizer_json_dir_matches_transformers(smol_reference, tmp_path):
    smol_reference.save_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    assert ours.source.endswith("tokenizer.json")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == smol_reference.encode(text)
        assert ours.encode(text, add_bos=False) == smol_reference.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == smol_reference.decode(ids) == text
    assert (ours.bos_id, ours.pad_id, ours.add_bos, ours.unk_id) == (1, 2, False, 0)
    assert ours.eos_ids[0] == 2 and 0 in ours.eos_ids
    assert ours.chat_template == smol_reference.chat_template  # read from chat_template.jinja


def test_tokenizer_json_config_files(tmp_path):
    """bos/eos/add_bos/template from tokenizer_config.json, extra EOS from generation_config.json."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SPM_CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|eot_id|>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] + '<|eot_id|>' }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True,
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert (ours.bos_id, ours.pad_id, ours.unk_id, ours.eos_ids) == (1, 4, 0, [2, 3])
    assert ours.chat_template == template and ours.add_bos
    assert ours.encode("Hello</s>")[0] == 1 and ours.encode("Hello</s>")[-1] == 2
    assert ours.decode(ours.encode("Hello world"), skip_special_tokens=True) == "Hello world"


# -- sentencepiece -----------------------------------------------------------------------------------

SPM_TEXTS = [t for t in TEXTS if "<|" not in t] + ["USER: hi ASSISTANT: hello there", "x<|im_end|>y"]


def test_sentencepiece_matches_library(spm_dir, spm):
    ours = load_tokenizer(spm_dir)
    assert ours.source.endswith("tokenizer.model")
    assert (ours.bos_id, ours.eos_ids, ours.unk_id, ours.add_bos, ours.vocab_size) == (1, [2], 0, True, 400)
    for text in SPM_TEXTS:
        ids = spm.encode(text)
        assert ours.encode(text, add_bos=False) == ids, text
        assert ours.encode(text) == [1, *ids]
        assert ours.decode(ids) == spm.decode(ids), text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text
    assert 3 in ours.encode("x<|im_end|>y")  # the user-defined piece stays whole


def test_sentencepiece_special_tokens(spm_dir, spm):
    ours = load_tokenizer(spm_dir / "tokenizer.model")
    ids = ours.encode("<s>Hello</s>", add_bos=False)
    # Control pieces in text become their id; the text after each gets sentencepiece's dummy prefix (llama.cpp).
    assert ids == [1, *spm.encode("Hello"), 2]
    assert ours.encode("<s>Hello").count(1) == 1
    assert ours.decode(ids) == "<s> Hello</s>" and ours.decode(ids, skip_special_tokens=True) == "Hello"
    assert ours.decode([1, *spm.encode("Hello world")], skip_special_tokens=True) == "Hello world"


def test_sentencepiece_config_overrides(spm_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "chat_template": "{{ 1 }}"}))
    ours = load_tokenizer(tmp_path)
    assert not ours.add_bos and ours.encode("hi")[0] != 1 and ours.chat_template == "{{ 1 }}"


def test_gguf_sentencepiece_matches_library(spm_gguf, spm):
    """tokenizer.ggml.model == "llama": the vocabulary rebuilt from pieces and scores must encode like
    sentencepiece, byte fallback and whitespace runs included."""
    ours = load_tokenizer(spm_gguf)
    assert (ours.bos_id, ours.eos_ids, ours.add_bos, ours.vocab_size) == (1, [2], True, 400)
    for text in SPM_TEXTS:
        ids = spm.encode(text)
        assert ours.encode(text, add_bos=False) == ids, text
        assert ours.decode(ids) == spm.decode(ids), text
    assert ours.encode("<s>Hello</s>", add_bos=False) == [1, *spm.encode("Hello"), 2]
    assert ours.decode([1, *spm.encode("Hello")]) == "<s> Hello"


def test_gguf_sentencepiece_matches_transformers(spm_gguf, spm):
    """transformers' GGUF conversion differs only in where it puts the prefix space (Metaspace
    "first": never before text that already starts with one); compare on the rest."""
    _transformers()
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(spm_gguf))
    reference, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    ours = load_tokenizer(spm_gguf)
    for text in SPM_TEXTS:
        if text[:1].isspace():
            continue
        ids = ours.encode(text, add_bos=False)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == reference.decode(ids), text


# -- streaming ---------------------------------------------------------------------------------------

STREAM_TEXTS = ["emoji 😀🎉👍🏽 family 👨‍👩‍👧", "中文分词测试，日本語のテキスト", "naïve café — “quotes”",
                "  spaced   out\n\ttext ", "Hello world, how are you?"]


def _check_stream(tok: Tokenizer, ids, skip=False):
    decoder = tok.stream_decoder(skip_special_tokens=skip)
    deltas = [decoder.push(i) for i in ids]
    tail = decoder.flush()
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + tail == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)
    return deltas


def test_stream_decoder_sentencepiece(spm_dir, spm_gguf):
    for tok in (load_tokenizer(spm_dir), load_tokenizer(spm_gguf)):
        for text in STREAM_TEXTS:
            assert "".join(_check_stream(tok, tok.encode(text, add_bos=False))) == text
            assert "".join(_check_stream(tok, tok.encode(text), skip=True)) == text
            assert "".join(_check_stream(tok, tok.encode(text))) == "<s> " + text
        # An emoji is four byte-fallback pieces: nothing shows until the last one arrives.
        ids = tok.encode("😀", add_bos=False)
        deltas = _check_stream(tok, ids)
        assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "😀"
        # Leading-space pieces keep their space mid-stream.
        assert "".join(_check_stream(tok, tok.encode("Hello world", add_bos=False))) == "Hello world"


@needs_smollm2
def test_stream_decoder_smollm2(smol):
    for text in STREAM_TEXTS + ["<|im_start|>assistant\nHi 😀<|im_end|>"]:
        ids = smol.encode(text)
        assert "".join(_check_stream(smol, ids)) == text
        _check_stream(smol, ids, skip=True)
    ids = smol.encode("😀")
    assert len(ids) > 1 and _check_stream(smol, ids)[0] == ""
    # A stream cut inside a character: flush hands back the replacement character, as decode does.
    decoder = StreamDecoder(smol)
    assert decoder.push(ids[:-1]) == "" and decoder.flush() == smol.decode(ids[:-1])
    # Several ids at once (a speculative step accepting a run of tokens).
    decoder = smol.stream_decoder()
    ids = smol.encode("Hello there, 世界!")
    assert decoder.push(ids[:3]) + decoder.push(ids[3:]) + decoder.flush() == "Hello there, 世界!"


# -- errors ------------------------------------------------------------------------------------------

def test_load_errors(tmp_path, spm_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_tokenizer(missing)
    with pytest.raises(ModelLoadError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "notes.txt")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="broken.json"):
        load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "broken.model").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="sentencepiece"):
        load_tokenizer(tmp_path / "broken.model")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x05" + b"\x00" * 7)
    with pytest.raises(ModelLoadError, match="corrupt GGUF"):
        load_tokenizer(tmp_path / "cut.gguf")
    with pytest.raises(ModelLoadError):
        load_tokenizer(42)
    with pytest.raises(InputError):
        load_tokenizer(spm_dir).encode(b"bytes")


def test_gguf_unsupported_tokenizers(tmp_path):
    tokens, types = ["<unk>", "a", "b", "ab"], [2, 1, 1, 1]
    with pytest.raises(ModelLoadError, match="'bert'"):
        load_tokenizer(write_vocab_gguf(tmp_path / "bert.gguf", tokens, types, model="bert"))
    with pytest.raises(ModelLoadError, match="'mystery-pre'"):
        load_tokenizer(write_vocab_gguf(tmp_path / "pre.gguf", tokens, types, pre="mystery-pre", merges=["a b"]))
    with pytest.raises(ModelLoadError, match="no merges"):
        load_tokenizer(write_vocab_gguf(tmp_path / "nomerges.gguf", tokens, types, pre="gpt2"))

    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "weights_only.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="no embedded tokenizer"):
        load_tokenizer(tmp_path / "weights_only.gguf")
    # A directory holding exactly one .gguf loads it; with two, the error says to pick one.
    single = tmp_path / "single"
    single.mkdir()
    write_vocab_gguf(single / "m.gguf", tokens, types, pre="gpt2", merges=["a b"])
    assert load_tokenizer(single).encode("ab") == [3]
    write_vocab_gguf(single / "n.gguf", tokens, types, pre="gpt2", merges=["a b"])
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        load_tokenizer(single)
