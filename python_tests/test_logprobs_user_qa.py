"""A demanding user's checks of token logprobs and row_results (stream_batch(logprobs=True, row_results=True), the
server's chat "logprobs": true): the cases that were wrong.

- The server's choices[].logprobs.content gave each token decode([id]) alone: a token holding part of a character
  (byte-level BPE's accents and emoji, byte-fallback pieces <0xC3>) came out as U+FFFD with bytes EF BF BD, so the
  tokens' bytes joined were not the answer's (the purpose of OpenAI's `bytes`); and a sentencepiece-style token
  (Metaspace decoder, as Llama 2 / Mistral tokenizer.json) lost its leading space, so the tokens ran words together.
- engine.stream(prompt, row_results=True) put the row's GenerationResult among the text chunks.
"""
import json
from types import SimpleNamespace

import pytest

from amphista_engine.errors import InputError
from amphista_engine.serving.server import OpenAIApp
from amphista_engine.tokenizer import load_tokenizer


def _content(tok, ids):
    """OpenAIApp.logprobs of an answer of these ids (the method reads only engine.tokenizer)."""
    result = SimpleNamespace(token_ids=ids, token_logprobs=[-0.5] * len(ids))
    return OpenAIApp.logprobs(SimpleNamespace(engine=SimpleNamespace(tokenizer=tok)), result)["content"]


def test_byte_level_tokens_bytes_join_to_the_answer(tiny_hf_dir):
    tok = load_tokenizer(tiny_hf_dir)          # byte-level BPE: é, ☃ and 👍 are split over several tokens
    text = "héllo wörld ☃ café 👍"
    ids = tok.encode(text, add_bos=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)       # the case: tokens holding part of a character
    content = _content(tok, ids)
    assert len(content) == len(ids) and all(c["logprob"] == -0.5 for c in content)
    assert bytes(b for c in content for b in c["bytes"]).decode("utf-8") == text
    # whole characters keep their text and its bytes
    assert [c["token"] for c in content][:1] == ["h"] and content[0]["bytes"] == [ord("h")]
    assert all(bytes(c["bytes"]).decode("utf-8") == c["token"] for c in content if "\ufffd" not in c["token"])


@pytest.fixture(scope="module")
def metaspace_dir(tmp_path_factory):
    """A tokenizer.json as Llama 2's: Metaspace pieces (▁word), byte fallback (<0xC3>), a decoder that strips the
    text's leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, special_tokens=[
        "<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))])
    tok.train_from_iterator(["hello world the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path = tmp_path_factory.mktemp("metaspace")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def test_sentencepiece_style_tokens_keep_their_spaces_and_bytes(metaspace_dir):
    tok = load_tokenizer(metaspace_dir)
    ids = tok.encode("hello world the fox é", add_bos=False)
    text = tok.decode(ids)
    assert text == "hello world the fox é"
    content = _content(tok, ids)
    whole = [c["token"] for c in content if "\ufffd" not in c["token"]]
    assert "".join(whole) == "hello world the fox "          # was "helloworldthefox": each space dropped
    assert bytes(b for c in content for b in c["bytes"]).decode("utf-8") == text    # é from <0xC3> <0xA9>


def test_stream_refuses_row_results_instead_of_yielding_a_result_as_text(tiny_hf_dir):
    from amphista_engine import Engine
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64)
    with pytest.raises(InputError, match="row_results=True applies to stream_batch"):
        engine.stream("Hello", 3, chat=False, row_results=True)
    chunks = list(engine.stream("Hello", 3, chat=False, row_results=False, logprobs=True))
    assert all(isinstance(c, str) for c in chunks) and "".join(chunks) == engine.last_result.text
    assert len(engine.last_result.token_logprobs) == len(engine.last_result.token_ids) == 3
