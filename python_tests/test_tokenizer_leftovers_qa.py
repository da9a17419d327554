"""GGUF pre-tokenizer names llama.cpp reads as GPT-4o's split (llama4, kanana2, talkie), Qwen3.5's NFC normalizer, the
`default` name, and the single_word flag of a sentencepiece folder's added tokens.

References: transformers' GGUF tokenizer converter (its own table of names and regexes), transformers' Qwen3_5Tokenizer
(the class Qwen3.5's tokenizer.json loads as), the o200k pre_tokenizer of test_tokenizer_pretokenizers_qa run by
`tokenizers`, and transformers' Python (slow) sentencepiece tokenizer for the folders.
"""
from __future__ import annotations

import json
import random
import unicodedata

import pytest
from tokenizers import AddedToken

from amphista_engine.tokenizer import load_tokenizer
from conftest import needs_smollm2, write_vocab_gguf
from test_tokenizer import SPM_CORPUS
from test_tokenizer_families_qa import relabelled
from test_tokenizer_pretokenizers_qa import MODEL_PRE_TOKENIZERS, TEXTS, ModelPreTokenizerBPE, _slow_tokenizer
from test_tokenizer_qa import HAND, _byte_alphabet, fuzz_texts

GPT4O_NAMES = ("llama4", "kanana2", "talkie")

# Decomposed and precomposed letters side by side: NFC joins the first kind (and reorders stacked marks), which changes
# the byte-level pieces, so the ids show whether the text was normalized.
NFC_TEXTS = ["e\u0301cole \u00e9cole", "Cafe\u0301 na\u0131\u0308ve a\u0308\u0323b a\u0323\u0308b",
             "\u1100\u1161\u11a8", "A\u030a\u212b\u00c5 o\u0302\u0301 \u2126 \ufb01", "x\u0301\u0301 \u0301lead",
             "n\u0303o\u0303 Se\u0301an's", "\u0915\u094d\u0937 \u0928\u093c 12e\u0301 \u3099\u304b\u3099"]


@pytest.fixture(scope="module")
def smol_meta():
    """SmolLM2's vocabulary with "12", "34" and "123" added, so that a split of digits shows in the ids."""
    from amphista_engine.gguf_file import read_gguf_metadata
    from test_tokenizer import SMOLLM2_GGUF

    meta = read_gguf_metadata(SMOLLM2_GGUF)
    return {**meta, "tokenizer.ggml.tokens": meta["tokenizer.ggml.tokens"] + ["34", "12", "123"],
            "tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"] + [1, 1, 1],
            "tokenizer.ggml.merges": meta["tokenizer.ggml.merges"] + ["3 4", "1 2", "12 3"]}


def _transformers_gguf(meta, pre):
    """transformers' own reading of a byte-level GGUF vocabulary whose tokenizer.ggml.pre is `pre`."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping",
                                  reason="transformers' GGUF converter is the reference")
    tok, _ = mapping.convert_gguf_tokenizer("llama", {
        "tokenizer_type": "gpt2", "tokens": meta["tokenizer.ggml.tokens"],
        "token_type": meta["tokenizer.ggml.token_type"], "merges": meta["tokenizer.ggml.merges"],
        "pre_tokenizer_type": pre})
    return tok


def _texts(seed, n=60):
    return TEXTS + HAND + NFC_TEXTS + fuzz_texts(n, seed=seed)


@needs_smollm2
@pytest.mark.parametrize("pre", GPT4O_NAMES)
def test_gpt4o_names_load_and_split_as_o200k(smol_meta, pre):
    """llama.cpp reads llama4 (Llama 4 Scout / Maverick), kanana2 and talkie as its GPT4O type; they were refused
    ("GGUF pre-tokenizer 'llama4' ... is not supported"). They now split as o200k: case-aware words with their
    contractions, digits in groups of three."""
    ours = relabelled(smol_meta, pre)
    converter = _transformers_gguf(smol_meta, pre)
    o200k = ModelPreTokenizerBPE(smol_meta, MODEL_PRE_TOKENIZERS["gpt-4o"])
    for text in _texts(seed=71):
        ids = ours.encode(text, add_bos=False)
        assert ids == converter.encode(text, add_special_tokens=False).ids == o200k.encode(text), repr(text)
    digits = [ours.id_to_piece(i) for i in ours.encode("x 1234567", add_bos=False)]
    assert digits[-5:] == ["123", "4", "5", "6", "7"]


@pytest.mark.parametrize("pre", GPT4O_NAMES)
def test_gpt4o_names_merge_whole_words_and_add_bos_only_when_asked(tmp_path, pre):
    """As llama.cpp's GPT4O type: no whole-word lookup before merging, no BOS unless the GGUF asks for it."""
    spell = _byte_alphabet()
    tokens = ["<s>", "</s>"] + [spell[b] for b in range(256)] + ["bc", "abc"]
    types = [3, 3] + [1] * 258
    a, bc = tokens.index("a"), tokens.index("bc")
    tok = load_tokenizer(write_vocab_gguf(tmp_path / "v.gguf", tokens, types, pre=pre, merges=["b c"], bos=0, eos=1))
    assert tok.encode("abc", add_bos=False) == [a, bc]
    assert tok.add_bos is False and tok.encode("abc")[:1] == [a]
    asked = load_tokenizer(write_vocab_gguf(tmp_path / "b.gguf", tokens, types, pre=pre, merges=["b c"], bos=0,
                                            eos=1, add_bos=True))
    assert asked.encode("abc") == [0, a, bc]


@needs_smollm2
def test_qwen35_normalizes_to_nfc_as_its_tokenizer(smol_meta):
    """Qwen3.5's tokenizer (transformers' Qwen3_5Tokenizer, as its tokenizer.json) puts text in NFC before splitting;
    a qwen35 GGUF did not, so a decomposed "e" + U+0301 (macOS file names, some PDF text) gave other ids than the
    model was trained on."""
    qwen35 = pytest.importorskip("transformers.models.qwen3_5.tokenization_qwen3_5",
                                 reason="transformers' Qwen3.5 tokenizer is the reference")
    vocab = {t: i for i, t in enumerate(smol_meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in smol_meta["tokenizer.ggml.merges"]]
    ref = qwen35.Qwen3_5Tokenizer(vocab=vocab, merges=merges)._tokenizer
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in
                            zip(smol_meta["tokenizer.ggml.tokens"], smol_meta["tokenizer.ggml.token_type"]) if ty == 3])
    ours = relabelled(smol_meta, "qwen35")
    texts = _texts(seed=73, n=40) + [unicodedata.normalize("NFD", t) for t in fuzz_texts(60, seed=79)]
    for text in texts:
        assert ours.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False).ids, repr(text)
    assert ours.encode("e\u0301cole", add_bos=False) == ours.encode("\u00e9cole", add_bos=False)
    # Unnormalized text gives other ids for these: the comparison above tells the two apart.
    ref.normalizer = None
    assert any(ours.encode(t, add_bos=False) != ref.encode(t, add_special_tokens=False).ids for t in NFC_TEXTS)


@needs_smollm2
def test_default_splits_as_transformers_reads_the_file(smol_meta):
    """`default` (and a file with no tokenizer.ggml.pre) keeps GPT-2's split, as transformers' GGUF converter does. This
    is not llama.cpp's DEFAULT type, whose fallback regexes also cut punctuation runs, digit runs and groups of three
    digits apart: the vocabularies without a pre-tokenizer name were learned with GPT-2's split."""
    ours, ref = relabelled(smol_meta, "default"), _transformers_gguf(smol_meta, "default")
    for text in _texts(seed=83, n=40):
        assert ours.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False).ids, repr(text)


# -- a tokenizer.model folder: added tokens declared single_word ----------------------------------------------------

WORD_TOKENS = {0: ("<unk>", {}), 1: ("<s>", {}), 2: ("</s>", {}),
               400: ("<think>", {"single_word": True, "special": False}),
               401: ("<|tool|>", {"single_word": True}),
               402: ("<|sw_r|>", {"single_word": True, "rstrip": True}),
               403: ("<|sw_l|>", {"single_word": True, "lstrip": True, "special": False}),
               404: ("<|end|>", {"rstrip": True}), 405: ("<|plain|>", {})}


@pytest.fixture(scope="module")
def word_folder(tmp_path_factory):
    import sentencepiece

    folder = tmp_path_factory.mktemp("single_word")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 10), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2)
    decoder = {str(i): {"content": t, "special": flags.get("special", True), "rstrip": flags.get("rstrip", False),
                        "lstrip": flags.get("lstrip", False), "normalized": False,
                        "single_word": flags.get("single_word", False)}
               for i, (t, flags) in WORD_TOKENS.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False, "legacy": True,
        "added_tokens_decoder": decoder}))
    return folder


def test_sentencepiece_folder_single_word_tokens_count_only_between_spaces(word_folder):
    """An added token declared single_word is matched by transformers only between spaces (or at the ends of the
    text); inside a word it is text. Ours cut it out everywhere: "re<think>ing" came out as `re`, <think>, `ing`."""
    ours, ref = load_tokenizer(word_folder), _slow_tokenizer(word_folder)
    hand = ["a <think> b", "re<think>ing", "<think>", "<think>x", "x<think>", " <think>\n", "(<think>)",
            "<think><|tool|>", "<|tool|> <think> <|tool|>", "<|sw_r|>\n\nhi", "<|sw_r|>   hi", "hi<|sw_r|>",
            "a  <|sw_l|>b", "a\n<|sw_l|> b", "<s><think> </s>", "<|end|>\n<think> x", "<|plain|><think> ",
            "<think>\u3000x", "x\xa0<think>", "word <|sw_l|>", "<|sw_r|>\n", "<|sw_r|><|sw_l|>", "no tokens here"]
    rng = random.Random(89)
    words = [w for line in SPM_CORPUS for w in line.split()]
    bits = [t for t, _ in WORD_TOKENS.values()] + [" ", "  ", "\n", "\t", "\xa0", "x", "."] + words
    fuzz = ["".join(rng.choice(bits) for _ in range(rng.randint(1, 12))) for _ in range(400)]
    for text in hand + fuzz:
        assert ours.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False), repr(text)
    think = ours.encode("re<think>ing", add_bos=False)
    assert 400 not in think and 400 in ours.encode("re <think> ing", add_bos=False)
