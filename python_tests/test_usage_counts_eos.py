"""`usage.completion_tokens` counts the token an answer ended on where the engine leaves it out of token_ids (an EOS,
or a stop_token_ids id), as OpenAI and vLLM count it (vLLM's len(output.token_ids)); never a token that was not
decoded (max_tokens and a stop string end on a token the answer keeps). n choices sum, a stream's include_usage
chunk says the same, and /metrics' amphista_generation_tokens_total sums the same counts. The engine's own stats
(new_tokens) still leave the EOS out. Answers are forced to end on EOS with logit_bias and min_tokens: the tiny
random model rarely writes one by itself."""
from __future__ import annotations

import re
import urllib.request

import pytest

from test_serve import call, sse

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def served(tiny_amphista_engine):
    from conftest import serving
    with serving(tiny_amphista_engine, model_id="tiny", log=lambda line: None, max_batch=4,
                 continuous=False) as httpd:
        yield tiny_amphista_engine, httpd.url


def ok(status_reply) -> dict:
    status, reply = status_reply
    assert status == 200, reply
    return reply


def generated_total(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    (value,) = re.findall(r"^amphista_generation_tokens_total (\S+)$", text, re.M)
    return float(value)


def eos_ended(engine, **more) -> dict:
    """Request options that end the answer on EOS after 3 tokens (EOS all but forced, held off by min_tokens)."""
    return {"logit_bias": {str(engine.eos_ids[0]): 100}, "min_tokens": 3, **more}


def no_eos(engine) -> dict:
    return {"logit_bias": {str(engine.eos_ids[0]): -100}}


def engine_options(body: dict) -> dict:
    """The engine.generate options of a request body's fields used here."""
    out = {"max_new_tokens": body["max_tokens"]}
    if "logit_bias" in body:
        out["logit_bias"] = {int(k): v for k, v in body["logit_bias"].items()}
    for name in ("min_tokens", "stop", "stop_token_ids", "speculative", "logprobs"):
        if name in body:
            out[name] = body[name]
    return out


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_an_answer_ended_by_eos_counts_it(served, speculative):
    engine, url = served
    body = {"messages": MESSAGES, "max_tokens": 12, **eos_ended(engine), "speculative": speculative}
    ref = engine.generate(MESSAGES, **engine_options(body))
    assert ref.finish_reason == "eos" and len(ref.token_ids) == 3
    before = generated_total(url)
    reply = ok(call(url, CHAT, body))
    assert reply["choices"][0]["message"]["content"] == ref.text
    assert ref.stop_reason is None and reply["choices"][0]["stop_reason"] is None     # vLLM's: None for EOS
    assert reply["usage"] == {"prompt_tokens": len(ref.prompt_token_ids), "completion_tokens": 4,
                              "total_tokens": len(ref.prompt_token_ids) + 4}
    # the engine's own stats are unchanged: the EOS is no token of the answer's there
    assert reply["amphista"]["new_tokens"] == 3 and reply["amphista"]["engine_finish_reason"] == "eos"
    assert generated_total(url) - before == 4


def test_an_answer_cut_by_max_tokens_counts_only_its_tokens(served):
    engine, url = served
    body = {"messages": MESSAGES, "max_tokens": 5, **no_eos(engine)}
    ref = engine.generate(MESSAGES, **engine_options(body))
    assert ref.finish_reason == "length" and len(ref.token_ids) == 5
    before = generated_total(url)
    reply = ok(call(url, CHAT, body))
    assert reply["usage"]["completion_tokens"] == 5 and reply["choices"][0]["finish_reason"] == "length"
    assert generated_total(url) - before == 5
    # EOS forced but max_tokens reached first: no EOS was decoded, none is counted
    reply = ok(call(url, CHAT, {"messages": MESSAGES, "max_tokens": 3, **eos_ended(engine)}))
    assert reply["amphista"]["engine_finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 3


def _stop_string(engine) -> tuple[str, object]:
    """A stop string the greedy (EOS-banned) answer meets after a few tokens, and the answer it leaves."""
    full = engine.generate(MESSAGES, 20, logit_bias={engine.eos_ids[0]: -100})
    for start in range(3, len(full.text) - 2):
        stop = full.text[start:start + 2]
        if "\ufffd" in stop or not stop.strip():
            continue
        ref = engine.generate(MESSAGES, 20, logit_bias={engine.eos_ids[0]: -100}, stop=[stop])
        if ref.finish_reason == "stop" and ref.token_ids:
            return stop, ref
    pytest.fail(f"no usable stop string in {full.text!r}")


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_a_stop_string_counts_only_the_tokens_kept(served, speculative):
    engine, url = served
    stop, ref = _stop_string(engine)
    body = {"messages": MESSAGES, "max_tokens": 20, **no_eos(engine), "stop": [stop], "speculative": speculative}
    before = generated_total(url)
    reply = ok(call(url, CHAT, body))
    assert reply["choices"][0]["message"]["content"] == ref.text and reply["choices"][0]["finish_reason"] == "stop"
    assert ref.stop_reason == stop and reply["choices"][0]["stop_reason"] == stop     # vLLM's: the string
    assert reply["usage"]["completion_tokens"] == len(ref.token_ids)
    assert generated_total(url) - before == len(ref.token_ids)
    events = sse(url, CHAT, {**body, "stream": True})
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["stop_reason"] == stop
    assert all("stop_reason" not in e["choices"][0] for e in events[:-2])   # with the finish only
    # with stop_token_ids too (a token the answer never reaches): still a stop string's end, nothing added
    full = engine.generate(MESSAGES, 20, logit_bias={engine.eos_ids[0]: -100}).token_ids
    later = full[min(len(ref.token_ids) + 2, len(full) - 1)]
    if later not in ref.token_ids:
        reply = ok(call(url, CHAT, {**body, "stop_token_ids": [later]}))
        assert reply["choices"][0]["message"]["content"] == ref.text
        assert reply["usage"]["completion_tokens"] == len(ref.token_ids)


@pytest.mark.parametrize("logprobs", [False, True])
def test_a_stop_token_id_is_counted_once(served, logprobs):
    """A stop_token_ids id ends the answer as EOS does (left out of token_ids and text, finish "stop"): counted as
    OpenAI's and vLLM's usage count it, also where stop strings are set and it is the token, not a string, that ended
    the answer."""
    engine, url = served
    full = engine.generate(MESSAGES, 12, logit_bias={engine.eos_ids[0]: -100})
    token = full.token_ids[3]
    kept = full.token_ids.index(token)
    for extra in ({}, {"stop": ["<never-stop>"]}):
        body = {"messages": MESSAGES, "max_tokens": 12, **no_eos(engine), "stop_token_ids": [token], **extra}
        if logprobs:
            body["logprobs"] = True
        ref = engine.generate(MESSAGES, **engine_options(body))
        assert ref.finish_reason == "stop" and len(ref.token_ids) == kept and ref.stop_reason == token
        assert ref.to_dict()["stop_reason"] == token
        before = generated_total(url)
        reply = ok(call(url, CHAT, body))
        assert reply["choices"][0]["stop_reason"] == token        # vLLM's: the token id
        assert reply["usage"]["completion_tokens"] == kept + 1, (extra, reply["usage"])
        assert reply["amphista"]["new_tokens"] == kept
        assert generated_total(url) - before == kept + 1
        if logprobs:    # chat's content lists the answer's tokens only, not the one it ended on
            assert len(reply["choices"][0]["logprobs"]["content"]) == kept


@pytest.mark.parametrize("chat", [True, False])
def test_n_choices_sum_and_the_streamed_usage_agrees(served, chat):
    engine, url = served
    path, body = (CHAT, {"messages": MESSAGES}) if chat else (COMPLETIONS, {"prompt": "def f(x):"})
    body.update(max_tokens=12, **eos_ended(engine))
    one = ok(call(url, path, body))
    assert one["usage"]["completion_tokens"] == 4 and one["choices"][0]["finish_reason"] == "stop"
    before = generated_total(url)
    three = ok(call(url, path, {**body, "n": 3}))
    assert three["usage"]["completion_tokens"] == 3 * 4
    assert three["usage"]["total_tokens"] == three["usage"]["prompt_tokens"] + 12
    assert generated_total(url) - before == 12
    for n, want in ((1, one["usage"]), (3, three["usage"])):
        events = sse(url, path, {**body, "n": n, "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]" and events[-2]["choices"] == []
        assert events[-2]["usage"] == want
    if not chat:
        # completions' legacy logprobs list the EOS last (as OpenAI's and vLLM's): one entry per token counted
        reply = ok(call(url, path, {**body, "logprobs": 1}))
        assert len(reply["choices"][0]["logprobs"]["tokens"]) == reply["usage"]["completion_tokens"] == 4


def test_counting_rule_on_results():
    """metrics.completion_tokens on the engine's results: each finish reason, a stop string (kept in token_ids) and a
    stop token id (left out) told apart by the result's stop_reason."""
    from amphista_engine.engine import GenerationResult
    from amphista_engine.generation import GenerationStats
    from amphista_engine.serving.metrics import completion_tokens

    def result(reason, n, stop_reason=None):
        return GenerationResult("", list(range(n)), [1, 2], reason, GenerationStats(), stop_reason=stop_reason)
    assert completion_tokens(result("eos", 3)) == 4
    assert completion_tokens(result("eos", 0)) == 1             # EOS as the first token
    assert completion_tokens(result("length", 5)) == 5
    assert completion_tokens(result("stop", 5, "\n\n")) == 5   # a stop string: its tokens kept
    assert completion_tokens(result("stop", 3, 7)) == 4         # a stop token id, left out
    assert completion_tokens(result("stop", 0, 7)) == 1         # a stop token id as the first token


def test_time_per_output_token_counts_the_ending_eos():
    """The EOS an answer ended on took its decode step: /metrics' time_per_output_token divides by the tokens usage
    counts (vLLM's alike), so a one-token answer ended by EOS is a sample of one step."""
    from types import SimpleNamespace

    from amphista_engine.engine import GenerationResult
    from amphista_engine.generation import GenerationStats
    from amphista_engine.serving.metrics import request_latency
    job = SimpleNamespace(arrived=0.0, scheduled=0.1, options={"max_new_tokens": 8}, first_token=0.2,
                          row_ends={0: 0.5, 1: 0.5})
    eos = GenerationResult("a", [7], [1, 2], "eos", GenerationStats())
    cut = GenerationResult("a", [7], [1, 2], "length", GenerationStats())
    assert request_latency([job], [[eos]], 1.0)["time_per_output_token"] == [pytest.approx(0.3)]
    assert request_latency([job], [[cut]], 1.0)["time_per_output_token"] == []
    three = GenerationResult("abc", [7, 8, 9], [1, 2], "eos", GenerationStats())
    assert request_latency([job], [[three, three]], 1.0)["time_per_output_token"] == [pytest.approx(0.1)] * 2
