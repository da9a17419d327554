"""Tokenizer QA: our tokenizers against independent references on seeded fuzz text and on random ids.

References: a pure-Python rewrite of llama.cpp's byte-level BPE (the `smollm` pre-tokenizer's regexes through the
`regex` module, merges by rank, special tokens cut out first) for SmolLM2's GGUF; SmolLM2's original tokenizer.json
layout (every digit apart, then ByteLevel) rebuilt with `tokenizers` from the GGUF's vocabulary; and the
`sentencepiece` library itself for sentencepiece models, read from tokenizer.model or from a GGUF.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import needs_smollm2, write_vocab_gguf
from amphista_engine.gguf_file import read_gguf_metadata
from amphista_engine.loading import resolve_model_path
from amphista_engine.tokenizer import load_tokenizer

# Text that stresses pre-tokenization: code and whitespace runs, digits, scripts, marks, joiners, controls, specials.
HAND = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\tif x:\n\t\treturn 1   \n    else:  \n        pass\t\n",
    "\n\n\n\n\n", "a\n\n\nb\n \n  \n", "123456789012345678901234567890", "3.14159 1,000,000 -42 1e10 0x1F ٣٤٥ ½ ² ⅷ 𝟙𝟚",
    "😀🎉👍🏽👨‍👩‍👧🇫🇷", "中文分词测试，日本語のテキスト、한국어 문장", "مرحبا بالعالم", "नमस्ते दुनिया", "e\u0301 a\u0308\u0323 Z̤͔ͧ̑̓",
    "a\u200db\u200cc\u200bd\ufeffe", "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\x1c\x1e\x1f", "<|im_start|>user\nhi<|im_end|>",
    "x<|im_start|>y", "<|im_start|><|im_end|>", "<|im_start", "<|endoftext|>", "<repo_name>x<file_sep>", " leading",
    "   three", "trailing   ", " ", "  ", "\t", "\r\n", "\u00a0nbsp\u00a0", "\u3000ideo\u3000", "\u2028ls\u2029ps",
    "\x0b\x0cvtff", "\x85nel", "a" * 300, "supercalifragilisticexpialidocious" * 5, "I'm you're they'll IT'S DON'T",
    "'s's'S", "http://example.com/a?b=c&d=e#f", "x  y   z    w", "!!!???...,,,", "¿¡«»„“”‘’", "ℌ𝔢𝔩𝔩𝔬", "ﬁﬂ ﬀ",
    "İstanbul ıi ß ẞ", "🏳️‍🌈", "a\u0300" * 20, "\u0600\u061c\u200e\u200f", "\u180e\u2060\u2061",
]
_POOLS = ["abcxyz ABC", " ", "  \t\n\r\x0b\x0c\u00a0\u2028\u3000\x85", "0123456789٣٤½²", "'s'tll", "éüñçßøåæœ",
          "中文日本語한국어", "مرحبانमस्तेदुनिया", "\u0301\u0308\u0323\u093f\u094d", "\u200d\u200c\u200b\ufeff",
          "😀🎉👍🏽🇫🇷", "\x00\x01\x07\x1b\x7f\x1c\x1f", ".,;:!?()[]{}<>|/\\\"#$%&*+-=@^_`~"]
_SPECIAL_BITS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>"]


def fuzz_texts(n: int, seed: int, specials: bool = True) -> list[str]:
    """Seeded random strings of the pools above, plus now and then any codepoint Unicode 3.2 already assigned:
    for later ones the references' Unicode tables (the regex module's, Rust's, Oniguruma's) disagree by version
    on what is a letter or a digit (349 of 1.1M codepoints, all unassigned in Python 3.11's own table)."""
    import unicodedata

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.03 and specials:
                parts.append(rng.choice(_SPECIAL_BITS))
            elif r < 0.1:
                c = chr(rng.randint(0x20, 0x2FFFF))
                parts.append(c if unicodedata.ucd_3_2_0.category(c) not in ("Cn", "Cs") else "x")
            else:
                parts.append(rng.choice(rng.choice(_POOLS)))
        out.append("".join(parts))
    return out


def stream_error(tok, ids, rng, skip) -> str | None:
    """Push `ids` in random chunks; what came out must always be a prefix of decode(all ids), and all of it
    at flush (text once streamed cannot be taken back)."""
    full = tok.decode(ids, skip)
    decoder, out, i = tok.stream_decoder(skip), "", 0
    while i < len(ids):
        k = rng.choice([1, 1, 1, 2, 3, 5])
        out += decoder.push(ids[i:i + k] if k > 1 or rng.random() < 0.5 else ids[i])
        if not full.startswith(out):
            return f"after {i + k} ids the stream showed {out[-12:]!r}, decode has {full[:len(out)][-12:]!r}"
        i += k
    out += decoder.flush()
    return None if out == full else f"stream gave {out!r}, decode {full!r}"


# -- SmolLM2's GGUF (byte-level BPE, pre-tokenizer "smollm") ------------------------------------------------------

SMOLLM_SPLITS = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]


def _byte_alphabet() -> dict[int, str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


class LlamaCppBPE:
    """llama.cpp's byte-level BPE, written out: cut control and user-defined tokens out of the text, split the rest
    with each pre-tokenizer regex in turn (matches and the text between them kept apart), spell each piece in
    GPT-2's byte alphabet, merge the lowest-ranked adjacent pair until none is left; a symbol missing from the
    vocabulary is dropped (SmolLM2 has no token for a few bytes, 0x1D among them)."""

    def __init__(self, meta, splits):
        import regex

        self.tokens, self.types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
        self.spell = _byte_alphabet()
        self.unspell = {c: b for b, c in self.spell.items()}
        self.splits = [regex.compile(r) for r in splits]
        added = sorted((t for t, ty in zip(self.tokens, self.types) if ty in (3, 4) and t), key=len, reverse=True)
        self.added = regex.compile("(" + "|".join(map(regex.escape, added)) + ")")
        self.memo: dict[str, list[int]] = {}

    def _pieces(self, text):
        pieces = [text]
        for rx in self.splits:
            out = []
            for p in pieces:
                pos = 0
                for m in rx.finditer(p):
                    out += [p[pos:m.start()]] * (m.start() > pos) + [m.group()] * (m.end() > m.start())
                    pos = m.end()
                out += [p[pos:]] * (pos < len(p))
            pieces = out
        return pieces

    def _bpe(self, word):
        if word not in self.memo:
            syms = list(word)
            while len(syms) > 1:
                ranked = [(self.ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(syms, syms[1:]))]
                rank, i = min(ranked)
                if rank == 1 << 30:
                    break
                syms[i:i + 2] = [syms[i] + syms[i + 1]]
            self.memo[word] = [self.vocab[s] for s in syms if s in self.vocab]
        return self.memo[word]

    def encode(self, text):
        ids = []
        for k, part in enumerate(self.added.split(text)):
            if k % 2:
                ids.append(self.vocab[part])
            else:
                for piece in self._pieces(part):
                    ids += self._bpe("".join(self.spell[b] for b in piece.encode()))
        return ids

    def decode(self, ids, skip_special=False):
        out = bytearray()
        for i in ids:
            if self.types[i] in (3, 4):
                out += b"" if skip_special and self.types[i] == 3 else self.tokens[i].encode()
            else:
                out += bytes(self.unspell[c] for c in self.tokens[i])
        return out.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="module")
def smol(smol_gguf):
    return load_tokenizer(smol_gguf)


@pytest.fixture(scope="module")
def smol_meta(smol_gguf):
    return read_gguf_metadata(smol_gguf)


@needs_smollm2
def test_smollm2_matches_a_llama_cpp_reference_on_fuzz(smol, smol_meta):
    pytest.importorskip("regex", reason="the reference's Unicode classes come from the regex module")
    ref = LlamaCppBPE(smol_meta, SMOLLM_SPLITS)
    spell = _byte_alphabet()
    no_token = {b for b in range(256) if spell[b] not in ref.vocab}
    assert {0x1D, 0xFF} <= no_token
    for text in HAND + fuzz_texts(300, seed=0):
        ids = smol.encode(text)
        assert ids == ref.encode(text), text
        for skip in (False, True):
            assert smol.decode(ids, skip) == ref.decode(ids, skip), text
        # Text comes back whole, except characters with a byte the vocabulary has no token for.
        if not no_token & set(text.encode()):
            assert smol.decode(ids) == text


@needs_smollm2
def test_smollm2_matches_its_original_tokenizer_json_on_fuzz(smol, smol_meta):
    """The tokenizer SmolLM2 was trained with: its tokenizer.json splits every digit apart, then runs ByteLevel
    (with ByteLevel's own regex, not the one llama.cpp writes out). transformers' GGUF loader leaves the digit
    split out, so it is not the reference here."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    tokens, types = smol_meta["tokenizer.ggml.tokens"], smol_meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in smol_meta["tokenizer.ggml.merges"]]
    original = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    original.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    original.decoder = decoders.ByteLevel()
    original.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                                 if ty == 3])
    for text in HAND + fuzz_texts(300, seed=1):
        ids = original.encode(text, add_special_tokens=False).ids
        assert smol.encode(text) == ids, text
        assert smol.decode(ids) == original.decode(ids, skip_special_tokens=False)
        assert smol.decode(ids, True) == original.decode(ids, skip_special_tokens=True)
    # Long numbers: one token per digit, whatever precedes them.
    assert [smol.id_to_piece(i) for i in smol.encode("pi 3141592\n42")] == ["pi", "Ġ", *"3141592", "Ċ", "4", "2"]


@needs_smollm2
def test_smollm2_bos_eos_follow_the_gguf(smol, smol_meta):
    assert smol_meta["tokenizer.ggml.add_bos_token"] is False and not smol.add_bos
    assert smol.encode("hi") == smol.encode("hi", add_bos=False)
    assert smol.bos_id == smol_meta["tokenizer.ggml.bos_token_id"] == smol.token_to_id("<|im_start|>")
    # <|im_end|> (declared) and <|endoftext|>: llama.cpp's end-of-generation set for this vocabulary.
    assert smol.eos_ids == [smol_meta["tokenizer.ggml.eos_token_id"], smol.token_to_id("<|endoftext|>")] == [2, 0]


@needs_smollm2
def test_smollm2_stream_equals_decode_on_random_splits(smol):
    rng = random.Random(2)
    for n in range(300):
        if n % 2:
            ids = smol.encode("".join(fuzz_texts(1, seed=n)))
        else:       # bytes of split characters, specials, and ids past the vocabulary (padded embedding rows)
            ids = [rng.choice([rng.randrange(300), rng.randrange(smol.vocab_size), 49152 + rng.randrange(64)])
                   for _ in range(rng.randint(1, 25))]
        for skip in (False, True):
            assert stream_error(smol, ids, rng, skip) is None, ids


# -- sentencepiece: tokenizer.model, its GGUF, and a Llama-2-style tokenizer.json ---------------------------------

@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A Llama-2-like sentencepiece BPE (byte fallback, digits split, identity normalization), in a folder with
    its tokenizer.model, as a GGUF, and as a tokenizer.json with Llama 2's ByteFallback decoder."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

    folder = tmp_path_factory.mktemp("spm_qa")
    corpus = [t for t in HAND if "<|" not in t] + fuzz_texts(40, seed=9, specials=False)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 5), model_prefix=str(folder / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, user_defined_symbols=["<|im_end|>"], minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if pieces[i] == "<|im_end|>" else 1 for i in range(n)]
    gguf_path = write_vocab_gguf(folder / "spm.gguf", pieces, types, model="llama", bos=1, eos=2,
                                 space_prefix=True, scores=[sp.get_score(i) for i in range(n)])
    json_dir = folder / "hf"
    json_dir.mkdir()
    tok = HFTokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True,
                                 fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.save(str(json_dir / "tokenizer.json"))
    (json_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return sp, folder, gguf_path, json_dir


def _random_piece_ids(sp, rng, n):
    """Byte pieces (often) and text pieces: sequences a model can sample, invalid UTF-8 included."""
    size = sp.get_piece_size()
    byte = [i for i in range(size) if sp.is_byte(i)]
    text = [i for i in range(size) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    return [[rng.choice(byte) if rng.random() < 0.6 else rng.choice(text) for _ in range(rng.randint(1, 12))]
            for _ in range(n)]


def test_sentencepiece_decode_matches_the_library_on_random_ids(spm_model):
    """Byte pieces that are not valid UTF-8 give one U+FFFD per byte, as sentencepiece does. The GGUF path used
    tokenizers' ByteFallback, which turned a whole run of byte pieces into U+FFFDs, valid characters included
    ('é' + <0xFF> gave 3 of them); tokenizer.model gave one per invalid run and dropped a leading byte space."""
    sp, folder, gguf_path, _ = spm_model
    byte = {b: sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    space = sp.piece_to_id("▁")
    assert space != sp.unk_id() and sp.decode([byte[0x20], space]) == "  "
    for tok in (load_tokenizer(folder), load_tokenizer(gguf_path)):
        for ids in _random_piece_ids(sp, random.Random(3), 500):
            assert tok.decode(ids) == sp.decode(ids), [sp.id_to_piece(i) for i in ids]
        assert tok.decode([byte[0xC3], byte[0xA9], byte[0xFF]]) == "é\ufffd"
        assert tok.decode([byte[0xE2], byte[0x82], byte[0x5D]]) == "\ufffd\ufffd]"
        assert tok.decode([byte[0x20], space]) == "  "      # only a `▁` piece's space is dropped
        for text in HAND[:12] + fuzz_texts(100, seed=4, specials=False):
            ids = tok.encode(text, add_bos=False)
            assert ids == sp.encode(text) and tok.decode(ids) == sp.decode(ids), text


def test_sentencepiece_streams_equal_decode_on_random_ids(spm_model):
    """For each source the streamed text is decode's text; before, the GGUF and ByteFallback tokenizer.json
    streams showed a character that a later byte piece then turned into U+FFFD in decode."""
    sp, folder, gguf_path, json_dir = spm_model
    rng = random.Random(5)
    cases = _random_piece_ids(sp, rng, 300)
    cases += [[rng.choice([0, 1, 2, 10_000]) if rng.random() < 0.2 else i for i in ids] for ids in cases[:100]]
    for tok in (load_tokenizer(folder), load_tokenizer(gguf_path), load_tokenizer(json_dir)):
        for ids in cases:
            for skip in (False, True):
                assert stream_error(tok, ids, rng, skip) is None, (tok.source, [sp.id_to_piece(i) for i in ids])


def test_byte_fallback_runs_wait_until_they_end(spm_model):
    """tokenizers' ByteFallback decodes a run of byte pieces as a whole: 'é' shows once a text piece ends the run
    (a later <0xFF> would have turned it into U+FFFD); the sentencepiece decoders show it at once."""
    sp, folder, gguf_path, json_dir = spm_model
    e_acute, word = [sp.piece_to_id("<0xC3>"), sp.piece_to_id("<0xA9>")], sp.piece_to_id("▁")
    held = load_tokenizer(json_dir)
    decoder = held.stream_decoder()
    assert decoder.push(e_acute) == "" and decoder.push(word) == "é "
    decoder = held.stream_decoder()
    assert decoder.push(e_acute) + decoder.push(sp.piece_to_id("<0xFF>")) + decoder.flush() == "\ufffd" * 3
    for tok in (load_tokenizer(folder), load_tokenizer(gguf_path)):
        assert tok.stream_decoder().push(e_acute) == "é"


# -- GGUF byte-level vocabularies with added tokens -----------------------------------------------------------------

def test_gguf_byte_level_added_tokens_decode_as_their_text(tmp_path):
    """llama.cpp's converter stores control and user-defined tokens as plain text and prints them so. tokenizers'
    ByteLevel decoder read a token spelled only in its byte alphabet as bytes: 'naïve' decoded as 'na\ufffdve'."""
    spell = _byte_alphabet()
    tokens = [spell[b] for b in range(256)] + ["ab", "naïve", "<|é|>", "<|endoftext|>", "<my token é>"]
    types = [1] * 257 + [4, 3, 3, 4]
    path = write_vocab_gguf(tmp_path / "added.gguf", tokens, types, model="gpt2", pre="gpt2", merges=["a b"], eos=259)
    tok = load_tokenizer(path)
    ids = tok.encode("ab naïve<|é|>é<my token é><|endoftext|>")
    assert ids == [256, 32, 257, 258, 0xC3, 0xA9, 260, 259]
    assert tok.decode(ids) == "ab naïve<|é|>é<my token é><|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "ab naïveé<my token é>"
    assert tok.decode([0xC3, 257, 0xA9]) == "\ufffdnaïve\ufffd"       # bytes split by a token stay invalid
    rng = random.Random(6)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(256), rng.randrange(256, 261)]) for _ in range(rng.randint(1, 10))]
        for skip in (False, True):
            assert stream_error(tok, ids, rng, skip) is None, ids
