"""GGUF pre-tokenizers llama.cpp names gpt-4o (Phi-4-mini), deepseek-llm, deepseek-v3 and qwen35, and the
rstrip/lstrip flags of a sentencepiece folder's added tokens.

References: each model's tokenizer.json pre_tokenizer (its Split regexes written as the file writes them, run by
`tokenizers` itself) with test_tokenizer_qa's llama.cpp-style BPE merging the pieces; llama.cpp's own regexes from
llama-vocab.cpp through the `regex` module; transformers' Python (slow) sentencepiece tokenizer for the folders.
"""
from __future__ import annotations

import json
import random
import unicodedata

import pytest

from amphista_engine.errors import ModelLoadError
from amphista_engine.gguf_file import GGUFFile
from amphista_engine.tokenizer import load_tokenizer
from conftest import needs_smollm2, write_vocab_gguf
from test_tokenizer import SPM_CORPUS
from test_tokenizer_families_qa import FAMILY_TEXTS, relabelled
from test_tokenizer_qa import HAND, LlamaCppBPE, _byte_alphabet, fuzz_texts

NAMES = ("gpt-4o", "deepseek-llm", "deepseek-v3", "qwen35")


def _split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}

# tiktoken's o200k_base pat_str, which Phi-4-mini's tokenizer.json (and Xenova/gpt-4o's, the file llama.cpp names
# gpt-4o by) holds as one Split.
O200K = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# DeepSeek-V3's pre_tokenizer as its tokenizer.json writes it (JSON text, the long regex cut in two Python literals;
# its \r\n are the characters themselves).
DEEPSEEK_V3 = json.loads(
    r"""{"type": "Sequence", "pretokenizers": [
  {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
  {"type": "Split", "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"}, "behavior": "Isolated",
   "invert": false},
  {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|"""
    r"""[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"},
   "behavior": "Isolated", "invert": false},
  {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}""")
# Qwen3.5's Split (llama.cpp quotes it as the "original regex from tokenizer.json").
QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek LLM's letter class, by codepoint (its file writes the characters; U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126 and
# U+212A are letters that Unicode normalization maps to others, so they are given by number here).
DEEPSEEK_LLM_LETTERS = [
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
    (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377), (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386),
    (0x388, 0x38A), (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556),
    (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B),
    (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D),
    (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4),
    (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB),
    (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113),
    (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D),
    (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2184),
    (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B),
    (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17),
    (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB),
    (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943)]
# DeepSeek LLM's (and DeepSeek V2's) pre_tokenizer: five Splits, then every digit apart, then ByteLevel.
DEEPSEEK_LLM = {"type": "Sequence", "pretokenizers": [
    _split("[\r\n]"),
    _split(r"\s?[" + "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in DEEPSEEK_LLM_LETTERS) + "]+"),
    _split("\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"),
    _split(r"\s+$"),
    _split("[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"),
    {"type": "Digits", "individual_digits": True},
    _BYTE_LEVEL]}
MODEL_PRE_TOKENIZERS = {
    "gpt-4o": {"type": "Sequence", "pretokenizers": [_split(O200K), _BYTE_LEVEL]},
    "deepseek-llm": DEEPSEEK_LLM,
    "deepseek-v3": DEEPSEEK_V3,
    "qwen35": {"type": "Sequence", "pretokenizers": [_split(QWEN35), _BYTE_LEVEL]},
}

# The regexes of llama.cpp's llama-vocab.cpp for these types (GPT4O: its lookahead rewrite of o200k, which reads
# only a-z as lower case and A-Z as upper case; DEEPSEEK_LLM: \p{N}+ where the tokenizer.json splits each digit).
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA_CPP = {
    "gpt-4o": [rf"[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))*((?=[\p{{L}}])([^A-Z]))+{_CONTRACTIONS}?"
               rf"|[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))+((?=[\p{{L}}])([^A-Z]))*{_CONTRACTIONS}?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "deepseek-llm": [p["pattern"]["Regex"] for p in DEEPSEEK_LLM["pretokenizers"][:5]] + [r"\p{N}+"],
    "deepseek-v3": [p["pattern"]["Regex"] for p in DEEPSEEK_V3["pretokenizers"][:3]],
    "qwen35": [_CONTRACTIONS + QWEN35[len("(?i:'s|'t|'re|'ve|'m|'ll|'d)"):]],
}

TEXTS = FAMILY_TEXTS + [
    "x 2024 and 1234567, it's I'M 3.14159 1,000,000", "I'm you're they'll IT'S DON'T We'Ve a'lL 's's'S",
    "e\u0301cole a\u0308\u0323b नमस्ते क्षत्रिय", "xمy naïveमराठी abcΩdef \u2126 \u212ak \u1f7d\u1fbe\u1fd3\u1fdb Ὗώ",
    "ひらがな カタカナ 漢字かな交じり文 中文１２３ 한국어", "！＂＃ＡＢＣａｂｃ　。“quoted” ‘single’ —— ……",
    "a\n\n  b\t\tc   \r\n", "def f(x):\n    return x  \n\n\n", "trailing   ", "a/b\n/c //\n\n", "😀🎉👍🏽 👨‍👩‍👧 🇫🇷",
]


def _normalized(pre, text):
    """Qwen3.5's tokenizer.json puts text in NFC before its Split (llama.cpp leaves that out; ours keeps it)."""
    return unicodedata.normalize("NFC", text) if pre == "qwen35" else text


class ModelPreTokenizerBPE(LlamaCppBPE):
    """llama.cpp-style BPE (merges by rank, control and user-defined tokens cut out first) over the pieces of a
    model's own tokenizer.json pre_tokenizer, run by `tokenizers`."""

    def __init__(self, meta, pre_tokenizer):
        from tokenizers import Tokenizer as HFTokenizer

        super().__init__(meta, [])
        self.pre = HFTokenizer.from_str(json.dumps({
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "vocab": {}, "merges": []}})).pre_tokenizer

    def encode(self, text):
        ids = []
        for k, part in enumerate(self.added.split(text)):
            if k % 2:
                ids.append(self.vocab[part])
            elif part:
                for piece, _ in self.pre.pre_tokenize_str(part):
                    ids += self._bpe(piece)
        return ids


@pytest.fixture(scope="module")
def digits_meta():
    """SmolLM2's vocabulary (every digit its own token, as SmolLM splits them) with "12", "34" and "123" added: the
    split of "1234567" then shows in the ids (123 4 5 6 7 for digit groups of three, 1 2 3 4 5 6 7 for single
    digits; a run of digits taken whole would give 12 34 5 6 7)."""
    from test_tokenizer import SMOLLM2_GGUF
    from amphista_engine.gguf_file import read_gguf_metadata

    meta = read_gguf_metadata(SMOLLM2_GGUF)
    return {**meta, "tokenizer.ggml.tokens": meta["tokenizer.ggml.tokens"] + ["34", "12", "123"],
            "tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"] + [1, 1, 1],
            "tokenizer.ggml.merges": meta["tokenizer.ggml.merges"] + ["3 4", "1 2", "12 3"]}


@needs_smollm2
@pytest.mark.parametrize("pre", NAMES)
def test_gguf_splits_as_the_models_tokenizer_json(digits_meta, pre):
    """Phi-4-mini (gpt-4o), DeepSeek LLM, DeepSeek V3 and Qwen3.5 GGUFs were refused for their pre-tokenizer (Phi-4
    models are in the README's list). Each now splits text as its model's tokenizer.json: o200k's case-aware words with
    contractions and digit groups of three; DeepSeek's letter, punctuation, CJK and digit passes; Qwen3.5's words with
    their combining marks."""
    if pre == "deepseek-llm":
        # The reference's letter class holds cased letters only (one read through Unicode normalization would start
        # a range at K and take in Arabic, Devanagari, Thai ...).
        assert all(unicodedata.category(chr(c)) in ("Lu", "Ll", "Lt") for a, b in DEEPSEEK_LLM_LETTERS
                   for c in range(a, b + 1))
    ours, ref = relabelled(digits_meta, pre), ModelPreTokenizerBPE(digits_meta, MODEL_PRE_TOKENIZERS[pre])
    for text in TEXTS + HAND + fuzz_texts(80, seed=53):
        ids = ours.encode(text, add_bos=False)
        assert ids == ref.encode(_normalized(pre, text)), text
        assert ours.decode(ids) == ref.decode(ids), text
    digits = [ours.id_to_piece(i) for i in ours.encode("1234567", add_bos=False)]
    assert digits == (["123", "4", "5", "6", "7"] if pre in ("gpt-4o", "deepseek-v3") else list("1234567"))


@needs_smollm2
@pytest.mark.parametrize("pre", NAMES)
def test_gguf_splits_as_llama_cpp_where_its_regexes_mean_the_same(pre):
    """llama.cpp's regexes (regex module) give the same ids: on all text for DeepSeek V3 and Qwen3.5, on ASCII text
    for gpt-4o (its rewrite takes any non-ASCII letter for both cases), and for DeepSeek LLM while no token of the
    vocabulary joins digits (SmolLM2's own)."""
    pytest.importorskip("regex", reason="llama.cpp's Unicode classes come from the regex module here")
    from test_tokenizer import SMOLLM2_GGUF
    from amphista_engine.gguf_file import read_gguf_metadata

    meta = read_gguf_metadata(SMOLLM2_GGUF)
    ours, ref = relabelled(meta, pre), LlamaCppBPE(meta, LLAMA_CPP[pre])
    texts = TEXTS + HAND + fuzz_texts(60, seed=59)
    for text in [t for t in texts if t.isascii()] if pre == "gpt-4o" else texts:
        assert ours.encode(text, add_bos=False) == ref.encode(_normalized(pre, text)), text


def test_gpt4o_keeps_a_word_after_a_non_ascii_capital_whole(tmp_path):
    """o200k reads 'ÉCOLE' as one upper-case word and 'éCole' as 'é' + 'Cole'; llama.cpp's lookahead rewrite cuts
    'ÉCOLE' after 'É' and keeps 'éCole' whole. A vocabulary that merges across those cuts shows which split ran."""
    pytest.importorskip("regex", reason="llama.cpp's Unicode classes come from the regex module here")
    spell = _byte_alphabet()
    tokens = ["<s>", "</s>"] + [spell[b] for b in range(256)] + ["ĠÃ", "ĠÃī", "ĠÃīC", "Ã©", "Ã©C", "Co", "Col"]
    merges = ["Ġ Ã", "ĠÃ ī", "ĠÃī C", "Ã ©", "Ã© C", "C o", "Co l"]
    types = [3, 3] + [1] * (len(tokens) - 2)
    ours = load_tokenizer(write_vocab_gguf(tmp_path / "gpt4o.gguf", tokens, types, pre="gpt-4o", merges=merges))
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    model = ModelPreTokenizerBPE(meta, MODEL_PRE_TOKENIZERS["gpt-4o"])
    llama_cpp = LlamaCppBPE(meta, LLAMA_CPP["gpt-4o"])
    for text, first in ((" ÉCOLE", "ĠÃīC"), ("éCole", "Ã©")):
        ids = ours.encode(text, add_bos=False)
        assert ids == model.encode(text) != llama_cpp.encode(text), text
        assert ours.id_to_piece(ids[0]) == first, text


def test_these_types_merge_whole_words_and_add_no_bos_by_default(tmp_path):
    """llama.cpp gives none of GPT4O, DEEPSEEK_LLM, DEEPSEEK3_LLM, QWEN35 ignore_merges or add_bos: a word the
    vocabulary holds whole is still merged pair by pair, and BOS comes only where the GGUF asks for it."""
    spell = _byte_alphabet()
    tokens = ["<s>", "</s>"] + [spell[b] for b in range(256)] + ["bc", "abc"]
    types = [3, 3] + [1] * 258
    a, bc = tokens.index("a"), tokens.index("bc")
    for pre in NAMES:
        tok = load_tokenizer(write_vocab_gguf(tmp_path / f"{pre}.gguf", tokens, types, pre=pre, merges=["b c"],
                                              bos=0, eos=1))
        assert tok.encode("abc", add_bos=False) == [a, bc], pre
        assert tok.add_bos is False and tok.encode("abc")[:1] == [a], pre
        asked = load_tokenizer(write_vocab_gguf(tmp_path / f"{pre}-bos.gguf", tokens, types, pre=pre,
                                                merges=["b c"], bos=0, eos=1, add_bos=True))
        assert asked.encode("abc") == [0, a, bc], pre


def test_unknown_names_are_still_refused_by_name():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.token_type": [1, 1, 1], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(ModelLoadError, match="'deepseek-v9'.*not supported.*qwen35"):
        load_tokenizer(GGUFFile("x.gguf", {**meta, "tokenizer.ggml.pre": "deepseek-v9"}, []))


# -- a tokenizer.model folder: rstrip / lstrip of the added tokens its tokenizer_config.json declares ----------------

STRIP_TOKENS = {0: ("<unk>", {}), 1: ("<s>", {}), 2: ("</s>", {"rstrip": True}), 400: ("<|user|>", {"rstrip": True}),
                401: ("<|end|>", {"rstrip": True, "lstrip": True}), 402: ("<|x|>", {"lstrip": True, "special": False}),
                403: ("<|plain|>", {})}
_SPACES = [" ", "  ", "\n", "\t", "\r\n", "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u3000", "\u200b", " \n\t "]


def _slow_tokenizer(folder):
    transformers = pytest.importorskip("transformers", reason="transformers' Python tokenizer is the reference")
    try:
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend as slow    # transformers 5
    except ImportError:
        slow = transformers.LlamaTokenizer                                                       # transformers 4
    return slow.from_pretrained(str(folder), legacy=True)


@pytest.fixture(scope="module")
def strip_folder(tmp_path_factory):
    """A Phi-3 style fine-tune's tokenizer.model folder: chat tokens past the 400 pieces, some rstrip, some lstrip."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("strip")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 10), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2)
    decoder = {str(i): {"content": t, "special": flags.get("special", True), "rstrip": flags.get("rstrip", False),
                        "lstrip": flags.get("lstrip", False), "normalized": False, "single_word": False}
               for i, (t, flags) in STRIP_TOKENS.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|end|>", "unk_token": "<unk>", "add_bos_token": False, "legacy": True,
        "added_tokens_decoder": decoder}))
    return folder


def test_sentencepiece_folder_added_tokens_take_whitespace_as_transformers(strip_folder):
    """transformers strips the whitespace after an rstrip added token and before an lstrip one (str.strip's
    whitespace, \\x1c..\\x1f and U+3000 included); ours kept it, so a Phi-3 style fine-tune's `<|user|>\\n` prompt
    got a `▁` and `<0x0A>` its model never saw there."""
    ours, ref = load_tokenizer(strip_folder), _slow_tokenizer(strip_folder)
    hand = ["<|user|>\nHello world<|end|>\n<|user|>\n", "a \t<|end|>  b", "x\x1c<|x|>y", "x <|x|>\x1c y",
            "</s> \n z", "<|user|>\x1c\x1fq", "a\u3000<|end|>\u3000b", "<|end|>   <|end|>", " <|plain|> \n",
            "<s> a </s>", "\n<|x|>\n<|end|>\n", "<|end|><|user|> ", "nothing to strip"]
    rng = random.Random(61)
    words = [w for line in SPM_CORPUS for w in line.split()]
    bits = [t for t, _ in STRIP_TOKENS.values()] + _SPACES + words
    fuzz = ["".join(rng.choice(bits) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    for text in hand + fuzz:
        assert ours.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False), repr(text)
    ids = ours.encode("<|user|>\nHi<|end|>\n", add_bos=False)
    assert ids[0] == 400 and ids[-1] == 401 and ids[1:-1] == ours.encode("Hi", add_bos=False)
