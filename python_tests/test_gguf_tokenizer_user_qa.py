"""A user loads a model from a GGUF file and expects the prompt ids the model's own Hugging Face tokenizer gives.

References: the model folder's tokenizer.json run by `tokenizers`, and transformers' AutoTokenizer on that folder.
The GGUF files are written as llama.cpp's converter writes them (test_qwen_user_qa's look-alike Qwen3 folder and its
GGUF: pre 'qwen2', specials CONTROL, <think> USER_DEFINED, [PADn] rows UNUSED, no BOS).
"""
from __future__ import annotations

import json
import random
import unicodedata
import warnings

import pytest

from amphista_engine import Engine
from amphista_engine.errors import ModelLoadError
from amphista_engine.gguf_file import read_gguf_metadata
from amphista_engine.tokenizer import load_tokenizer
from conftest import write_tokenizer, write_vocab_gguf
from test_qwen_user_qa import write_qwen, write_qwen_gguf
from test_tokenizer_qa import HAND, fuzz_texts, stream_error

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread_module")

# Decomposed (NFD) text, as macOS file names and some PDF copies give it: Qwen's tokenizer.json composes it (NFC).
DECOMPOSED = ["cafe\u0301", "Cafe\u0301 de\u0301ja\u0300 vu, nai\u0308ve", "A\u030angstro\u0308m", "n\u0303 u\u0308ber",
              "\u1100\u1161\u11a8 (Hangul jamo)", "e\u0301<|im_end|>e\u0301", "<think>e\u0301</think>"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_tok")
    folder = root / "qwen3"
    write_qwen(folder, "qwen3", tied=True)
    from tokenizers import Tokenizer
    return folder, write_qwen_gguf(folder, root / "qwen3.gguf"), Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_qwen_gguf_chat_prompt_of_decomposed_text_is_transformers(qwen):
    """Qwen's tokenizer.json normalizes to NFC; the GGUF path (pre 'qwen2') did not, so 'cafe' + U+0301 reached the
    model as 'e' and a combining-accent byte pair it never saw after 'e' in training, where transformers (and the
    model's own folder) give the precomposed 'é'."""
    folder, gguf_path, _ = qwen
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    from_gguf = Engine.from_pretrained(str(gguf_path), device="cpu", max_seq_len=256)
    from_folder = Engine.from_pretrained(str(folder), device="cpu", max_seq_len=256)
    for text in DECOMPOSED:
        messages = [{"role": "user", "content": text}]
        want = list(auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False))
        assert from_gguf.encode_prompt(messages) == want == from_folder.encode_prompt(messages), text
        plain = from_gguf.encode_prompt(text, chat=False)
        assert plain == auto.encode(text, add_special_tokens=False), text
        assert plain == from_gguf.encode_prompt(unicodedata.normalize("NFC", text), chat=False)


def test_qwen_gguf_encodes_as_its_tokenizer_json_on_fuzz(qwen):
    """Seeded fuzz (scripts, marks, joiners, specials typed in the text, whitespace runs) as written and decomposed:
    every text gives the tokenizer.json's ids, and decoding them gives its text."""
    _, gguf_path, ref = qwen
    ours = load_tokenizer(gguf_path)
    assert not ours.add_bos
    texts = HAND + fuzz_texts(150, seed=21)
    texts += [unicodedata.normalize("NFD", t) for t in texts] + DECOMPOSED
    mismatched = [t for t in texts if ours.encode(t) != ref.encode(t, add_special_tokens=False).ids]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts differ, first {mismatched[0]!r}"
    for t in texts[:60]:
        ids = ours.encode(t)
        for skip in (False, True):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), t


def test_a_skipped_special_between_the_bytes_of_a_character_decodes_as_transformers(qwen):
    """With special tokens skipped (the engine's answer text) the bytes on both sides of a skipped <|im_end|> join,
    as Hugging Face's decode and llama.cpp's join them: '中' split around one decoded as two U+FFFDs, and a stream
    showed that text, which decode of the same ids then did not have."""
    folder, gguf_path, ref = qwen
    ours = load_tokenizer(gguf_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    byte_ids = ours.encode("中")
    assert len(byte_ids) == 3          # the tiny vocabulary spells '中' as its 3 UTF-8 bytes
    im_end, eot = ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>")
    ids = [byte_ids[0], im_end, *byte_ids[1:], eot]
    assert ours.decode(ids, skip_special_tokens=True) == "中" == auto.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    rng = random.Random(4)
    size = ref.get_vocab_size(with_added_tokens=True)
    specials = [ours.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>")]
    for _ in range(400):
        ids = [rng.choice(specials) if rng.random() < 0.25 else rng.randrange(size) for _ in range(rng.randint(1, 9))]
        for skip in (False, True):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), ids
            assert stream_error(ours, ids, rng, skip) is None, ids


def test_a_gguf_without_a_pre_tokenizer_says_how_it_splits(qwen, tmp_path):
    """Files converted before tokenizer.ggml.pre existed (early Llama 3 GGUFs) were split as GPT-2 without a word:
    the prompt ids silently differed from the model's tokenizer (Llama 3 groups digits by three, GPT-2 does not).
    Now a warning names the fallback and what to do; an unknown value is refused with the same advice."""
    _, gguf_path, _ = qwen
    meta = read_gguf_metadata(gguf_path)
    vocab = dict(tokens=meta["tokenizer.ggml.tokens"], types=meta["tokenizer.ggml.token_type"],
                 merges=meta["tokenizer.ggml.merges"])
    with pytest.warns(UserWarning, match=r"no tokenizer\.ggml\.pre.*GPT-2.*reconvert"):
        old = load_tokenizer(write_vocab_gguf(tmp_path / "old.gguf", **vocab))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a file that names its pre-tokenizer loads quietly
        named = load_tokenizer(write_vocab_gguf(tmp_path / "gpt2.gguf", pre="gpt-2", **vocab))
    assert old.encode("x 2024 it's") == named.encode("x 2024 it's")     # the stated fallback is what it does
    with pytest.raises(ModelLoadError, match=r"'llama-v9'.*not supported.*Hugging Face folder"):
        load_tokenizer(write_vocab_gguf(tmp_path / "new.gguf", pre="llama-v9", **vocab))


def test_a_tokenizer_json_alone_adds_the_bos_its_post_processor_adds(tmp_path):
    """A tokenizer.json whose post-processor puts BOS first (Llama 2/3's) with no tokenizer_config.json beside it:
    transformers adds that BOS, we added none, so the model saw its prompts without the token it was trained on."""
    from tokenizers import Tokenizer, processors

    write_tokenizer(tmp_path, 300)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    alone = tmp_path / "alone"
    alone.mkdir()
    tok.save(str(alone / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(alone))
    for source in (alone, alone / "tokenizer.json"):
        ours = load_tokenizer(source)
        assert (ours.bos_id, ours.add_bos) == (bos, True)
        for text in ("Hello world", "def f(x):\n    return x * 2"):
            assert ours.encode(text) == auto.encode(text) == tok.encode(text).ids, text
        assert ours.encode("<s>already there").count(bos) == 1            # never doubled
    # A config that names no BOS and a post-processor that adds none (Qwen's): still none.
    (alone / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "</s>"}))
    tok.post_processor = None
    tok.save(str(alone / "tokenizer.json"))
    assert load_tokenizer(alone).encode("Hello") == tok.encode("Hello").ids
