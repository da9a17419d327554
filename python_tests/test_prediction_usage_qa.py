"""OpenAI's usage for a request with a predicted output (`prediction`): `completion_tokens_details` with
accepted_prediction_tokens (the prediction's tokens each choice's tokens have in order: their longest common
subsequence) and rejected_prediction_tokens (the rest), summed over choices and prompts, on the embedded SmolLM2.
Before: a request's usage never said how much of its prediction was used (prompt/completion/total only). Requests
without a prediction (or with an empty one) keep the usage they had, no completion_tokens_details key. The expected
counts come from the answers' own token ids (a spy on engine.stream_batch) and this file's own LCS."""
from __future__ import annotations

import warnings

import pytest

from conftest import needs_smollm2, relay, serving
from test_serve import call, sse

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "Copy this sentence twice: the cat sat on the mat and the dog sat on the log."}]
PROMPTS = ["Repeat exactly: apples, bananas, cherries, dates, figs", "Count: one, two, three, four,"]
JUNK = " Zebras quietly juggle purple umbrellas."
PLAIN_USAGE = {"prompt_tokens", "completion_tokens", "total_tokens"}


def lcs(a: list, b: list) -> int:
    """The longest common subsequence's length, by the textbook table."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


@pytest.fixture(scope="module")
def served():
    """(engine, base URL): SmolLM2 without heads (a prediction decodes by lookup alone), max_seq_len 512."""
    from amphista_engine import Engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=512)
    with serving(engine, model_id="smol", log=lambda line: None) as httpd:
        yield engine, httpd.url


class Answers:
    """Wraps engine.stream_batch: `ids`, each ended row's token_ids (its GenerationResult's), in the order they end."""

    def __init__(self, engine, monkeypatch):
        self.real, self.ids = engine.stream_batch, []
        monkeypatch.setattr(engine, "stream_batch", self)

    def __call__(self, *args, **kwargs):
        return relay(self.real(*args, **kwargs), each=self._seen)

    def _seen(self, item):
        from amphista_engine.engine import GenerationResult
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], GenerationResult):
            self.ids.append(list(item[1].token_ids))
        return item

    def take(self) -> list[list[int]]:
        ids, self.ids = self.ids, []
        return ids


def _details(pred: list[int], answers: list[list[int]]) -> dict:
    accepted = sum(lcs(pred, ids) for ids in answers)
    return {"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": len(pred) * len(answers) - accepted}


def _post(url, path, body):
    status, reply = call(url, path, body)
    assert status == 200, reply
    return reply


def _predicted(text) -> dict:
    return {"type": "content", "content": text}


def test_a_prediction_that_is_the_answer_is_all_accepted(served, monkeypatch):
    engine, url = served
    spy = Answers(engine, monkeypatch)
    body = {"messages": ASK, "max_tokens": 24, "temperature": 0}
    plain = _post(url, CHAT, body)
    [ids] = spy.take()
    text = plain["choices"][0]["message"]["content"]
    # (c) no prediction: the usage as before, no details
    assert set(plain["usage"]) == PLAIN_USAGE, plain["usage"]
    pred = engine.tokenizer.encode(text, add_bos=False)
    assert pred == ids          # the greedy answer's text encodes back to its own tokens

    reply = _post(url, CHAT, {**body, "prediction": _predicted(text)})
    assert reply["choices"][0]["message"]["content"] == text and spy.take() == [ids]
    assert reply["usage"] == {**plain["usage"], "completion_tokens_details": {
        "accepted_prediction_tokens": len(ids), "rejected_prediction_tokens": 0}}

    # the answer and junk after it: the junk's tokens are rejected, the answer's still accepted
    junk = engine.tokenizer.encode(text + JUNK, add_bos=False)
    reply = _post(url, CHAT, {**body, "prediction": _predicted([{"type": "text", "text": text},
                                                                {"type": "text", "text": JUNK}])})
    assert spy.take() == [ids]
    details = reply["usage"]["completion_tokens_details"]
    assert details == _details(junk, [ids])
    assert details == {"accepted_prediction_tokens": len(ids), "rejected_prediction_tokens": len(junk) - len(ids)}
    assert details["rejected_prediction_tokens"] > 0

    # an empty prediction drafts nothing and counts nothing: no details, as without one
    reply = _post(url, CHAT, {**body, "prediction": _predicted("")})
    assert reply["usage"] == plain["usage"] and set(reply["usage"]) == PLAIN_USAGE


def test_a_streamed_usage_is_the_whole_replys(served, monkeypatch):
    engine, url = served
    spy = Answers(engine, monkeypatch)
    body = {"messages": ASK, "max_tokens": 16, "temperature": 0,
            "prediction": _predicted("The cat sat on the mat and a bird sat on the log.")}
    whole = _post(url, CHAT, body)
    [ids] = spy.take()
    pred = engine.tokenizer.encode(body["prediction"]["content"], add_bos=False)
    assert whole["usage"]["completion_tokens_details"] == _details(pred, [ids])
    events = sse(url, CHAT, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]
    assert all(e["usage"] is None for e in events[:-2])
    # without include_usage: no usage chunk at all
    assert all("usage" not in e for e in sse(url, CHAT, body)[:-1])


def test_n_choices_sum_their_counts(served, monkeypatch):
    engine, url = served
    spy = Answers(engine, monkeypatch)
    text = "The cat sat on the mat and the dog sat on the log. The cat sat on the mat"
    reply = _post(url, CHAT, {"messages": ASK, "max_tokens": 16, "n": 2, "temperature": 1.0, "seed": 7,
                              "prediction": _predicted(text)})
    answers = spy.take()
    assert len(answers) == 2 and len(reply["choices"]) == 2
    pred = engine.tokenizer.encode(text, add_bos=False)
    details = reply["usage"]["completion_tokens_details"]
    assert details == _details(pred, answers)
    assert details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"] == 2 * len(pred)


def test_completions_count_each_prompts_choices(served, monkeypatch):
    engine, url = served
    spy = Answers(engine, monkeypatch)
    text = "apples, bananas, cherries, dates, figs, one, two, three"
    reply = _post(url, "/v1/completions", {"prompt": PROMPTS, "max_tokens": 12, "temperature": 0,
                                           "prediction": _predicted(text)})
    answers = spy.take()
    assert len(answers) == 2 and len(reply["choices"]) == 2
    pred = engine.tokenizer.encode(text, add_bos=False)
    assert reply["usage"]["completion_tokens_details"] == _details(pred, answers)
    plain = _post(url, "/v1/completions", {"prompt": PROMPTS, "max_tokens": 12, "temperature": 0})
    assert set(plain["usage"]) == PLAIN_USAGE
    assert {k: reply["usage"][k] for k in PLAIN_USAGE} == plain["usage"]


def test_a_prediction_longer_than_the_cache_counts_every_token(served, monkeypatch):
    """The engine drafts from a prediction's first max_seq_len tokens (no answer is longer), but every token sent
    counts, as OpenAI's: before, the tokens past max_seq_len were neither accepted nor rejected."""
    engine, url = served
    spy = Answers(engine, monkeypatch)
    body = {"messages": ASK, "max_tokens": 8, "temperature": 0}
    text = _post(url, CHAT, body)["choices"][0]["message"]["content"]
    [ids] = spy.take()
    long = text + " the dog sat on the log" * 120
    pred = engine.tokenizer.encode(long, add_bos=False)
    assert len(pred) > engine.max_seq_len
    reply = _post(url, CHAT, {**body, "prediction": _predicted(long)})
    assert spy.take() == [ids]
    details = reply["usage"]["completion_tokens_details"]
    assert details == _details(pred, [ids]) and details["accepted_prediction_tokens"] >= len(ids) - 1
    assert details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"] == len(pred)
