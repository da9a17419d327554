"""`amphista serve` with OpenAI's logit_bias, presence_penalty and frequency_penalty, and vLLM's ignore_eos: each reply
equals the engine's own answer with the same options (speculative too, for logit_bias), and values out of OpenAI's
ranges are a 400 naming the field."""
from __future__ import annotations

import pytest

from test_serve import call, error_of

pytestmark = pytest.mark.usefixtures("one_thread_module")

COMPLETIONS = "/v1/completions"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def served(tiny_amphista_engine):
    from conftest import serving
    with serving(tiny_amphista_engine, model_id="tiny", log=lambda line: None, max_batch=4) as httpd:
        yield tiny_amphista_engine, httpd.url


def completion(url, **body):
    status, reply = call(url, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 10, **body})
    assert status == 200, reply
    return reply["choices"][0]


def test_logit_bias_plain_and_speculative(served):
    engine, url = served
    base = engine.generate(PROMPT, chat=False, max_new_tokens=10, speculative=None)
    bias = {t: -100 for t in base.token_ids[:3]}
    want = engine.generate(PROMPT, chat=False, max_new_tokens=10, speculative=None, logit_bias=bias)
    assert want.text != base.text
    for speculative in ("none", "amphista"):
        got = completion(url, logit_bias={str(k): v for k, v in bias.items()}, speculative=speculative)
        assert got["text"] == want.text, speculative
    # a request without a bias, after ones with it, is unbiased
    assert completion(url)["text"] == base.text


def test_penalties_and_ignore_eos(served):
    engine, url = served
    for name, value in (("presence_penalty", 1.5), ("frequency_penalty", -0.5)):
        want = engine.generate(PROMPT, chat=False, max_new_tokens=10, speculative=None, **{name: value})
        assert completion(url, **{name: value})["text"] == want.text
    eos = engine.eos_ids[0]
    got = completion(url, logit_bias={str(eos): 100}, ignore_eos=True)
    assert got["finish_reason"] == "length"
    got = completion(url, logit_bias={str(eos): 100})
    assert got["finish_reason"] == "stop" and got["text"] == ""
    # a penalty with an explicitly speculative request (refused while penalties needed plain decoding)
    want = engine.generate(PROMPT, chat=False, max_new_tokens=6, speculative=None, frequency_penalty=1)
    status, body = call(url, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 6, "frequency_penalty": 1,
                                           "speculative": "amphista"})
    assert status == 200 and body["choices"][0]["text"] == want.text, body
    assert body["amphista"]["speculative"] == "amphista"


def test_bad_values_are_named(served):
    engine, url = served
    body = {"prompt": PROMPT, "max_tokens": 2}
    for name, value, what in (("presence_penalty", 3, "presence_penalty must be a number in [-2, 2]"),
                              ("frequency_penalty", "1", "frequency_penalty must be a number"),
                              ("frequency_penalty", True, "frequency_penalty must be a number"),
                              ("logit_bias", [1, 2], "logit_bias must be an object"),
                              ("logit_bias", {"x": 1}, "logit_bias keys must be token ids"),
                              ("logit_bias", {"5": 101}, "logit_bias[5] must be a number in [-100, 100]"),
                              ("logit_bias", {"5": "1"}, "logit_bias[5]"),
                              ("logit_bias", {"99999": 1}, "token id 99999 is not in the model's vocabulary"),
                              ("ignore_eos", "yes", "ignore_eos must be true or false")):
        error_of(call(url, COMPLETIONS, {**body, name: value}), 400, what, param=name)
    # the values clients send by default are served
    status, reply = call(url, COMPLETIONS, {**body, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
                                            "ignore_eos": False})
    assert status == 200, reply


def test_min_tokens_and_stop_token_ids(served):
    engine, url = served
    eos = engine.eos_ids[0]
    got = completion(url, logit_bias={str(eos): 100}, min_tokens=4)
    want = engine.generate(PROMPT, chat=False, max_new_tokens=10, speculative=None, logit_bias={eos: 100},
                           min_tokens=4)
    assert got["finish_reason"] == "stop" and got["text"] == want.text and len(want.token_ids) == 4
    base = engine.generate(PROMPT, chat=False, max_new_tokens=10, speculative=None)
    got = completion(url, stop_token_ids=[base.token_ids[2]])
    want = engine.generate(PROMPT, chat=False, max_new_tokens=10, speculative=None,
                           stop_token_ids=[base.token_ids[2]])
    assert got["finish_reason"] == "stop" and got["text"] == want.text
    error_of(call(url, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 3, "min_tokens": 5}), 400,
             "min_tokens (5) is more than max_tokens (3)", param="min_tokens")
    error_of(call(url, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 3, "stop_token_ids": ["x"]}), 400,
             "stop_token_ids", param="stop_token_ids")
