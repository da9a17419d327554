"""Tokenizer families a user meets loading models other than SmolLM2, against llama.cpp's rules and references.

References: llama.cpp's llama-vocab.cpp (which pre-tokenizer names share a regex, which look whole pre-tokens up
before merging, which add BOS by default, Phi-3's rstrip tokens), the `regex` module running the tokenizer.json
regexes through test_tokenizer_qa's llama.cpp-style BPE, and the `sentencepiece` library for Phi-3's pieces.
"""
from __future__ import annotations

import re

import pytest

from amphista_engine.chat import render_chat
from amphista_engine.errors import ModelLoadError
from amphista_engine.gguf_file import GGUFFile, read_gguf_metadata
from amphista_engine.tokenizer import load_tokenizer
from conftest import needs_smollm2, write_vocab_gguf
from test_tokenizer import SPM_CORPUS
from test_tokenizer_qa import HAND, LlamaCppBPE, _byte_alphabet, fuzz_texts


@pytest.fixture(scope="module")
def smol_meta():
    from test_tokenizer import SMOLLM2_GGUF
    return read_gguf_metadata(SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def small_meta(smol_meta):
    """SmolLM2's first 6000 tokens and the merges among them (quick to load), and "12", "123", "34" after them, so
    that the split of "1234567" shows in its ids: 12 34 5 6 7 as GPT-2 (one pre-token), 123 4 5 6 7 as Llama 3
    (groups of three), each digit apart as Qwen2 or SmolLM."""
    tokens = smol_meta["tokenizer.ggml.tokens"][:6000]
    known = set(tokens)
    merges = [m for m in smol_meta["tokenizer.ggml.merges"]
              if (lambda a, b: a in known and b in known and a + b in known)(*m.split(" ", 1))]
    return {**smol_meta, "tokenizer.ggml.tokens": tokens + ["34", "12", "123"],
            "tokenizer.ggml.token_type": smol_meta["tokenizer.ggml.token_type"][:6000] + [1, 1, 1],
            "tokenizer.ggml.merges": merges + ["3 4", "1 2", "12 3"]}


def relabelled(meta, pre, **extra):
    """SmolLM2's vocabulary as a GGUF whose tokenizer.ggml.pre says `pre` (read in memory, no file written)."""
    return load_tokenizer(GGUFFile("relabelled.gguf", {**meta, "tokenizer.ggml.pre": pre, **extra}, []))


# -- byte-level BPE: the pre-tokenizer names llama.cpp knows ---------------------------------------------------------

# llama.cpp's LLAMA3 pre-tokenizer type: its regex, whole pre-tokens looked up before merging, BOS by default.
LLAMA3_TYPE = ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")


def test_the_llama3_type_looks_words_up_whole_and_adds_bos_for_every_name(tmp_path):
    """llama.cpp gives falcon3 and pixtral (and tekken) Llama 3's ignore_merges and add_bos; Falcon 3 and Pixtral GGUFs
    merged a word their vocabulary holds whole into pieces, and Pixtral's prompts went without BOS."""
    spell = _byte_alphabet()
    tokens = ["<s>", "</s>"] + [spell[b] for b in range(256)] + ["bc", "abc"]
    types = [3, 3] + [1] * 258
    abc, a, bc = tokens.index("abc"), tokens.index("a"), tokens.index("bc")
    for pre in (*LLAMA3_TYPE, "tekken", "dbrx", "smaug-bpe", "gpt-2", "qwen2"):
        tok = load_tokenizer(write_vocab_gguf(tmp_path / f"{pre}.gguf", tokens, types, pre=pre, merges=["b c"],
                                              bos=0, eos=1))
        whole = pre in LLAMA3_TYPE or pre == "tekken"
        assert tok.encode("abc", add_bos=False) == ([abc] if whole else [a, bc]), pre
        assert tok.add_bos is whole and tok.encode("abc")[:1] == ([0] if whole else [a]), pre


# Names llama.cpp's converter writes for models of the architectures this engine runs (Llama, Qwen2), by the
# pre-tokenizer type llama.cpp gives them, with a name of that type this file already read right.
SAME_TYPE = {"phi-2": "gpt-2", "gigachat": "gpt-2", "a.x-4.0": "gpt-2", "mellum": "gpt-2", "exaone4": "gpt-2",
             "trillion": "gpt-2", "minerva-7b": "smollm", "midm-2.0": "llama-bpe", "lfm2": "llama-bpe",
             "falcon-h1": "llama-bpe", "megrez": "stablelm2"}
SPLIT_TEXTS = ["x 2024 and 1234567, it's I'M", "a\n\n  b\t\tc   \r\n", "(hello) [world]!? ..."]


@needs_smollm2
def test_pre_tokenizer_names_llama_cpp_writes_are_read_as_their_type(small_meta):
    """Minerva's GGUFs say "minerva-7b" ("minerva" is no name llama.cpp writes), Megrez (a Llama) "megrez", Mellum
    (a Llama), A.X 4.0 (a Qwen2) and Trillion their own names: all were refused as unknown pre-tokenizers."""
    twins = {twin: relabelled(small_meta, twin) for twin in set(SAME_TYPE.values())}
    assert len({tuple(t.encode(SPLIT_TEXTS[0])) for t in twins.values()}) == 3      # gpt-2, llama-bpe, the others
    for name, twin in SAME_TYPE.items():
        ours, ref = relabelled(small_meta, name), twins[twin]
        assert ours.add_bos == ref.add_bos, name
        assert [ours.encode(t) for t in SPLIT_TEXTS] == [ref.encode(t) for t in SPLIT_TEXTS], name
    with pytest.raises(ModelLoadError, match="'deepseek-v9'.*not supported"):
        relabelled(small_meta, "deepseek-v9")


class NoMergesOnWholeWords(LlamaCppBPE):
    """test_tokenizer_qa's llama.cpp BPE with ignore_merges: a pre-token the vocabulary holds is that token."""

    def _bpe(self, word):
        return [self.vocab[word]] if word in self.vocab else super()._bpe(word)


# The regex of Mistral Nemo's tokenizer.json (Tekken), and DeepSeek Coder's Split sequence as llama.cpp writes it.
TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
          r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
DEEPSEEK_CODER = ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"]
FAMILY_TEXTS = ["HelloWorld ÉCOLE éCole McDonald's XMLHttpRequest ǅungla", "a/b\n/c //\n\n", "x\r\n\r\n\ty = 31415;",
                "中文分词测试 日本語のテキスト 한국어 문장", "print('hi');  // 12345\n\n\n    return {'a': [1, 2]}"]


@needs_smollm2
@pytest.mark.parametrize("pre, splits, reference", [("tekken", [TEKKEN], NoMergesOnWholeWords),
                                                    ("deepseek-coder", DEEPSEEK_CODER, LlamaCppBPE)])
def test_tekken_and_deepseek_coder_gguf_split_as_their_tokenizer(smol_meta, pre, splits, reference):
    """Mistral Nemo / Mistral Small 3 (Tekken) and DeepSeek Coder GGUFs are Llama-architecture models, refused for their
    pre-tokenizer. Tekken splits words at case changes (its regex as its tokenizer.json writes it: llama.cpp's
    ASCII-only rewrite would cut 'ÉCOLE' after 'É'), keeps each digit apart and looks whole words up; DeepSeek Coder
    splits newlines, letter runs, punctuation runs and CJK runs apart and each digit."""
    pytest.importorskip("regex", reason="the reference's Unicode classes come from the regex module")
    ours, ref = relabelled(smol_meta, pre), reference(smol_meta, splits)
    for text in FAMILY_TEXTS + HAND + fuzz_texts(120, seed=31):
        ids = ours.encode(text, add_bos=False)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids), text
    if pre == "tekken":
        # llama.cpp's rewrite of this regex (lookaheads for its regex engine) splits ASCII text the same way
        import regex
        rewrite = regex.compile(r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?"
                                r"((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        for text in [t for t in FAMILY_TEXTS + HAND if t.isascii()]:
            assert [m.group() for m in rewrite.finditer(text)] == ref._pieces(text), text
        pieces = [ours.id_to_piece(i) for i in ours.encode(" ÉCOLE camelCase", add_bos=False)]
        assert "".join(pieces[:pieces.index("Ġcamel")]) == "ĠÃīCOLE" and pieces[-1] == "Case"


# -- Phi-3's sentencepiece GGUF: chat markers take the whitespace after them -----------------------------------------

PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|system|>", "<|end|>", "<|user|>"]
PHI3_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """A Phi-3-like sentencepiece vocabulary (byte fallback, its chat tokens added after the pieces) as llama.cpp's
    converter writes it: the added tokens CONTROL, arch phi3, named as newer conversions name Phi-3."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("phi3")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 10), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)] + PHI3_ADDED
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    meta = {"general.architecture": "phi3", "general.name": "Phi 3 Mini 4k Instruct", "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types + [3] * len(PHI3_ADDED),
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)] + [0.0] * len(PHI3_ADDED),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": n, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": PHI3_TEMPLATE}
    return sp, tokens, meta


def phi3_reference(sp, tokens, text):
    """Phi-3's tokenizer.json (and llama.cpp for Phi-3): its added tokens but <unk>, <s> and <|endoftext|> are rstrip,
    so the whitespace after them goes with them; each stretch between them is sentencepiece-encoded alone."""
    marks = PHI3_ADDED + ["<s>", "</s>"]
    ids, strip = [], False
    for k, part in enumerate(re.split("(" + "|".join(map(re.escape, marks)) + ")", text)):
        if k % 2:
            ids.append(tokens.index(part))
            strip = part not in ("<s>", "<|endoftext|>")
        elif part := part.lstrip() if strip else part:
            ids += sp.encode(part)
    return ids


PHI3_TEXTS = ["<|user|>\nHello world<|end|>\n<|assistant|>\n", "<|system|>\n  You are nice.<|end|>\n<|user|>\n\thi",
              "a<|endoftext|>\nb</s>\n\nc<s> d", "<|end|> \t\n<|end|>x<|placeholder1|>\u3000y"]


def test_phi3_gguf_chat_tokens_take_the_newline_after_them(phi3, tmp_path):
    """Phi-3's template writes '<|user|>\\n...<|end|>\\n<|assistant|>\\n'; its tokenizer (rstrip tokens) encodes no
    token for those newlines, and llama.cpp does the same for its GGUFs. Here each one became '▁' + '<0x0A>', a prompt
    the model never saw in training, on every turn."""
    import gguf

    sp, tokens, meta = phi3
    path = tmp_path / "phi3.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_name(meta["general.name"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(PHI3_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for tok in (load_tokenizer(path), load_tokenizer(gguf.GGUFReader(str(path)))):
        for text in PHI3_TEXTS:
            assert tok.encode(text, add_bos=False) == phi3_reference(sp, tokens, text), (tok.source, text)
        prompt = render_chat(tok, [{"role": "user", "content": "Hello world"}])
        assert [tok.id_to_piece(i) for i in tok.encode(prompt)] == [
            "<|user|>", *sp.encode("Hello world", out_type=str), "<|end|>", "<|assistant|>"]
        assert tok.token_to_id("<|end|>") in tok.eos_ids


def test_phi3_rstrip_follows_llama_cpp_s_rule_and_nothing_else(phi3):
    """llama.cpp's rule: the model's name says Phi-3 ('phi3', 'phi-3'), here the phi3 architecture too; any other
    sentencepiece GGUF (Llama 2, Mistral, Gemma) keeps the newline after a control token as its own tokens."""
    sp, tokens, meta = phi3
    text = "<|user|>\nhi<|end|>\n"
    stripped = phi3_reference(sp, tokens, text)
    llama = {**meta, "general.architecture": "llama", "general.name": "Llama 2 7b Chat"}
    for name, want in (("Phi3", stripped), ("microsoft/phi-3-medium", stripped), ("Llama 2 7b Chat", None)):
        tok = load_tokenizer(GGUFFile("m.gguf", {**llama, "general.name": name}, []))
        got = tok.encode(text, add_bos=False)
        assert got == (want or [tokens.index("<|user|>"), *sp.encode("\nhi"), tokens.index("<|end|>"),
                                *sp.encode("\n")]), name
