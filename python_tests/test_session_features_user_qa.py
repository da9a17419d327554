"""User QA of this session's features (min_p, --reasoning-parser, assistant prefill, vLLM's request extras, drafts
under the bias row), for what that QA found broken: a prefill's held-back text given back as the model's, bad words
refused without their field's name (or not at all), and max_tokens 0 echo requests taking bad masks silently."""
from __future__ import annotations

import random

import pytest

from amphista_engine.errors import InputError
from amphista_engine.reasoning import ReasoningSplitter

from test_serve import call, error_of

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def served(tiny_amphista_engine):
    from conftest import serving
    with serving(tiny_amphista_engine, model_id="tiny", log=lambda line: None, max_batch=2) as httpd:
        yield tiny_amphista_engine, httpd.url


def _pieces(text: str, rnd: random.Random) -> list[str]:
    cuts = sorted(rnd.sample(range(1, len(text)), min(3, len(text) - 1))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("parser, prefill, answer, want", [
    ("qwen3", "<thi", "s is it", (None, "s is it")),            # not a <think> after all: content, the model's only
    ("qwen3", "<think>a <", "b</think>c", ("b", "c")),           # a "<" that might have begun </think>
    ("qwen3", "<think>a</th", "x", ("x", None)),
    ("deepseek_r1", "so </th", "ey said", ("ey said", None)),
])
def test_a_prefill_ending_in_part_of_a_tag_is_not_given_back(parser, prefill, answer, want):
    """continue_final_message: the reply is only what the model adds, so the start of a tag the prefill ended in
    (held back to see whether the model completes it) is the client's own text when it does not."""
    whole = ReasoningSplitter(parser)
    whole.prime(prefill)
    whole.end(answer)
    assert (whole.reasoning or None, whole.content or None) == want
    rnd = random.Random(0)
    for _ in range(5):          # streamed in pieces: the same
        s = ReasoningSplitter(parser)
        s.prime(prefill)
        got = [s.feed(p) for p in _pieces(answer, rnd)] + [s.end()]
        assert ("".join(r for r, _ in got) or None, "".join(c for _, c in got) or None) == want


def test_a_bad_word_that_is_not_unicode_is_named_as_bad_words(served):
    engine, url = served
    with pytest.raises(InputError, match="bad_words"):
        engine.generate("The quick brown fox", 2, chat=False, bad_words=["ok", "\udc80"])
    error_of(call(url, "/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 2, "bad_words": ["\udc80"]}),
             400, "bad_words", param="bad_words")


def test_a_bad_word_the_tokenizer_drops_is_refused(tiny_amphista_engine, monkeypatch):
    """A word a tokenizer normalises to no token bans nothing: said, not an IndexError or a silent no-op."""
    tok = tiny_amphista_engine.tokenizer
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, *a, **k: [] if text == "\u0301" else real(text, *a, **k))
    with pytest.raises(InputError, match="bad_words.*no token"):
        tiny_amphista_engine.generate("The quick brown fox", 2, chat=False, bad_words=["\u0301"])


@pytest.mark.parametrize("field, value, words", [
    ("allowed_token_ids", "abc", "list of token ids"),
    ("allowed_token_ids", [10**9], "vocabulary"),
    ("bad_words", [3], "list of strings"),
])
def test_an_echo_of_max_tokens_0_checks_the_masks_as_a_decoding_request_does(served, field, value, words):
    _, url = served
    body = {"prompt": "The quick brown fox", "max_tokens": 0, "echo": True, field: value}
    error_of(call(url, "/v1/completions", body), 400, words, param=field)
    assert call(url, "/v1/completions", {**body, field: None})[0] == 200
