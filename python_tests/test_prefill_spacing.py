"""Assistant prefill (continue_final_message) with sentencepiece-style vocabularies (Llama 2, Vicuna, Mistral v0.1):
a continuation's first token `▁world` after the prefill "Hello" reads " world", as vLLM gives it (its detokenizer
reads the new tokens after the prompt's last ones: decode(context + new)[len(decode(context)):]). Decoded from the
new tokens alone it read "world", and "Hello" + text ran the words together. Ordinary answers (a new assistant
turn) stay transformers' decode(new tokens), as the README says. GPT-2-style byte-level vocabularies (SmolLM2's
`Ġworld`) keep their space either way."""
from __future__ import annotations

import json

import pytest

from amphista_engine.tokenizer import load_tokenizer
from conftest import SMOLLM2_GGUF, engine_with_random_heads, needs_smollm2_gguf, write_tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread_module")

CORPUS = ["Hello world! The quick brown fox jumps over the lazy dog. hello there, world of words, [INST] [/INST]"]
# Llama 2's shape: the assistant's content after " ", its end of turn right after it (cut by continue_final_message)
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
            "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def after(tok, context, new, skip=True):
    """vLLM's reading of `new` after `context`."""
    return tok.decode(context + new, skip)[len(tok.decode(context, skip)):]


def streamed(tok, ids, context=(), skip=False):
    decoder = tok.stream_decoder(skip_special_tokens=skip, context=context)
    deltas = [decoder.push(i) for i in ids]
    assert decoder.token_ids == list(ids)          # the context is never the row's
    return deltas, "".join(deltas) + decoder.flush()


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A tiny Llama-style sentencepiece BPE tokenizer.model (byte fallback, dummy prefix), as test_tokenizer's."""
    sentencepiece = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 50), model_prefix=str(folder / "tokenizer"), vocab_size=320,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2)
    return folder


@pytest.fixture(scope="module")
def metaspace_dir(spm_dir, tmp_path_factory):
    """spm_dir's vocabulary as Llama 2's tokenizer.json: BPE over the pieces with byte fallback, Metaspace, and the
    decoder that drops the text's first space (Replace, ByteFallback, Fuse, Strip)."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    plain = [p for p, i in vocab.items() if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    merges = sorted(((a, b) for a in plain for b in plain if a + b in vocab),
                    key=lambda m: (vocab[m[0] + m[1]], vocab[m[0]], vocab[m[1]]))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    path = tmp_path_factory.mktemp("metaspace")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


# ---- the stream decoder ------------------------------------------------------------------------------------------
def test_a_continuation_is_read_after_its_context(spm_dir, metaspace_dir):
    for tok in (load_tokenizer(spm_dir), load_tokenizer(metaspace_dir)):
        context = tok.encode("[INST] Say hi [/INST] Hello")
        world = tok.token_to_id("\u2581world")
        for tail in ("", " the fox é😀", "! 😀 hello"):
            new = [world] + tok.encode(tail, add_bos=False)[int(tail.startswith(" ")):]
            deltas, text = streamed(tok, new, context)
            assert text == after(tok, context, new, False) and text.startswith(" world"), (tok, text)
            assert tok.decode(context) + text == tok.decode(context + new)    # the joined string reads as the tokens
            # without a context (an ordinary answer): transformers' decode of the new tokens, unchanged
            assert streamed(tok, new)[1] == tok.decode(new) == text[1:]
            # a character split over byte pieces shows once whole, never in half
            assert "\ufffd" not in "".join(deltas)
        # skipped specials in the context (a bare assistant header's) and in the answer
        eos = tok.eos_ids[0]
        new = [world, eos, world]
        assert streamed(tok, new, context + [eos], skip=True)[1] == after(tok, context + [eos], new) == " world world"
        # a context ending in a character's byte pieces, then a lone continuation byte: ByteFallback reads the two
        # runs as one invalid run, which would turn the prefill's é into U+FFFD too; the new ids read alone then
        context = tok.encode("[INST] Say hi [/INST] café", add_bos=False)
        new = [tok.token_to_id("<0xA9>"), world]
        deltas, text = streamed(tok, new, context)
        assert text == "".join(deltas) == "\ufffd world"        # the lone byte's one U+FFFD, no more


def test_a_long_context_is_cut_to_a_few_tokens(spm_dir):
    tok = load_tokenizer(spm_dir)
    context = tok.encode("The quick brown fox jumps over the lazy dog. " * 20 + "Hello")
    calls = []
    real = tok.decode
    tok.decode = lambda ids, skip=False: calls.append(len(list(ids))) or real(ids, skip)
    decoder = tok.stream_decoder(context=context)
    assert decoder.push(tok.token_to_id("\u2581world")) == " world"
    assert max(calls) <= 24 < len(context)


@needs_smollm2_gguf
def test_byte_level_tokens_read_the_same_with_or_without_context():
    tok = load_tokenizer(SMOLLM2_GGUF)
    context = tok.encode("<|im_start|>assistant\nHello")
    new = tok.encode(" world, café 😀!")
    assert tok.id_to_piece(new[0]) == "\u0120world"
    assert streamed(tok, new, context)[1] == streamed(tok, new)[1] == tok.decode(new) == " world, café 😀!"


# ---- the engine --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_engine(spm_dir, tmp_path_factory):
    """A tiny random Llama whose tokenizer is spm_dir's tokenizer.model, with a Llama-2-like template and random
    Amphista heads."""
    path = write_tiny_hf(tmp_path_factory.mktemp("spm_llama"), vocab_size=320)
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}))
    eng = engine_with_random_heads(path, 3, max_seq_len=128)
    assert type(eng.tokenizer._backend).__name__ == "_SentencePieceBackend"
    return eng


def chat(partial, user="Say hi"):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": partial}]


def test_a_prefilled_row_keeps_the_space_of_its_first_word(spm_engine):
    eng = spm_engine
    tok = eng.tokenizer
    words = [tok.token_to_id(p) for p in ("\u2581world", "\u2581the", "\u2581wor", "\u2581o")]
    got = eng.generate(chat("Hello"), 6, continue_final_message=True, allowed_token_ids=words)
    assert tok.decode(got.prompt_token_ids).endswith("[/INST] Hello")
    assert got.text == after(tok, got.prompt_token_ids, got.token_ids) and got.text.startswith(" ")   # was no space
    assert tok.decode(got.prompt_token_ids) + got.text == tok.decode(got.prompt_token_ids + got.token_ids)
    assert "".join(eng.stream(chat("Hello"), 6, continue_final_message=True, allowed_token_ids=words)) == got.text
    spec = eng.generate(chat("Hello"), 6, continue_final_message=True, allowed_token_ids=words,
                        speculative="amphista")
    assert (spec.text, spec.token_ids) == (got.text, got.token_ids)
    with_lps = eng.generate(chat("Hello"), 6, continue_final_message=True, allowed_token_ids=words, logprobs=True,
                            top_logprobs=2)
    assert with_lps.text == got.text and len(with_lps.token_logprobs) == len(with_lps.top_logprobs) == 6
    # a batch, and a prompt joining the run (admit): each row read after its own prompt
    other = chat("Well,", user="Why?")
    rows = {}
    queue = [(chat("Hi", user="Again"), 6)]

    def admit(free):
        out, queue[:] = queue[:free], queue[free:]
        return out
    eng.reserve_batch(3)
    for row, delta in eng.stream_batch([chat("Hello"), other], 6, continue_final_message=True,
                                       allowed_token_ids=words, admit=admit):
        rows[row] = rows.get(row, "") + delta
    want = [eng.generate(m, 6, continue_final_message=True, allowed_token_ids=words).text
            for m in (chat("Hello"), other, chat("Hi", user="Again"))]
    assert [rows.get(i) for i in range(3)] == want and all(w.startswith(" ") for w in want)
    # an ordinary answer (a new turn, the same ids given raw) stays decode(new tokens): no leading space
    raw = eng.generate(got.prompt_token_ids, 6, allowed_token_ids=words)
    assert raw.token_ids == got.token_ids and raw.text == tok.decode(raw.token_ids, skip_special_tokens=True)
    assert raw.text == got.text[1:]


def test_stops_and_split_characters_on_prefilled_rows(spm_engine):
    eng = spm_engine
    tok = eng.tokenizer
    world = tok.token_to_id("\u2581world")
    options = dict(continue_final_message=True, allowed_token_ids=[world])
    full = eng.generate(chat("Hello"), 4, **options)
    assert full.text == " world" * 4
    cut = eng.generate(chat("Hello"), 4, stop=["ld wo"], **options)
    assert cut.text == " wor" and cut.finish_reason == "stop"
    kept = eng.generate(chat("Hello"), 4, stop=["ld wo"], include_stop_str_in_output=True, **options)
    assert kept.text == " world wo"
    assert "".join(eng.stream(chat("Hello"), 4, stop=["ld wo"], include_stop_str_in_output=True, **options)) == \
        kept.text
    # byte-fallback pieces (é is <0xC3> <0xA9>) among the words: held until whole, read after the prompt
    pieces = [world, tok.token_to_id("<0xC3>"), tok.token_to_id("<0xA9>")]
    got = eng.generate(chat("Caf"), 10, continue_final_message=True, allowed_token_ids=pieces)
    assert got.text == after(tok, got.prompt_token_ids, got.token_ids)
    assert "".join(eng.stream(chat("Caf"), 10, continue_final_message=True, allowed_token_ids=pieces)) == got.text


def test_served_logprob_tokens_of_a_prefilled_row_join_to_its_content(spm_engine):
    """The server's chat logprobs read a continued row's tokens after the prompt's last ones, as its content is
    read: the first token's text kept its space there (" world"), and the tokens' texts joined give the content."""
    from conftest import serving
    from test_serve import call
    tok = spm_engine.tokenizer
    words = [tok.token_to_id(p) for p in ("\u2581world", "\u2581the", "\u2581wor", "\u2581o")]
    with serving(spm_engine, model_id="spm", defaults=dict(max_new_tokens=32)) as httpd:
        body = {"messages": chat("Hello"), "continue_final_message": True, "add_generation_prompt": False,
                "max_tokens": 6, "allowed_token_ids": words, "logprobs": True, "top_logprobs": 2}
        status, reply = call(httpd.url, "/v1/chat/completions", body)
    assert status == 200, reply
    choice = reply["choices"][0]
    content = choice["message"]["content"]
    tokens = [t["token"] for t in choice["logprobs"]["content"]]
    assert content.startswith(" ") and "".join(tokens) == content, (tokens, content)
    assert bytes(b for t in choice["logprobs"]["content"] for b in t["bytes"]).decode() == content
