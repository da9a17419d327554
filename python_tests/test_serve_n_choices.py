"""`amphista serve` with OpenAI's `n`: several choices per request, decoded as n rows of one engine run
(amphista_engine/serving/: the Job's rows). Greedy choices are the n=1 answer n times; a seeded sampled request's n
rows run by themselves, so the same request gives the same choices each time; replies, streams and usage read as
OpenAI's (index 0..n-1, prompt-major for several prompts; usage counts each prompt once)."""
from __future__ import annotations

import re
import threading
import urllib.request

import pytest

from test_serve import call, error_of, sse
from test_serve_batching import Runs, run_queued, wait_for

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The quick brown fox"}]
PROMPT = "def f(x):\n    return"


@pytest.fixture(scope="module")
def served(tiny_amphista_engine):
    """(engine, base URL, app): a server batching up to 4 rows, plain by default, in a background thread."""
    from conftest import serving
    with serving(tiny_amphista_engine, model_id="tiny", log=lambda line: None, max_batch=4,
                 continuous=False) as httpd:     # grouping at a run's start (joins: test_serve_continuous.py)
        yield tiny_amphista_engine, httpd.url, httpd.app


def ok(status_reply) -> dict:
    status, reply = status_reply
    assert status == 200, reply
    return reply


def texts(reply, chat: bool) -> list[str]:
    assert [c["index"] for c in reply["choices"]] == list(range(len(reply["choices"])))
    return [c["message"]["content"] if chat else c["text"] for c in reply["choices"]]


def scrape(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.mark.parametrize("chat", [True, False])
def test_greedy_n_is_n_copies_of_the_single_answer_and_usage_sums(served, chat):
    engine, url, app = served
    path, body = (CHAT, {"messages": MESSAGES}) if chat else (COMPLETIONS, {"prompt": PROMPT})
    body["max_tokens"] = 12
    one = ok(call(url, path, body))
    gen_before = scrape(url, "amphista_generation_tokens_total")
    done_before = scrape(url, "amphista_request_success_total")
    three = ok(call(url, path, {**body, "n": 3}))
    assert texts(three, chat) == texts(one, chat) * 3
    assert [c["finish_reason"] for c in three["choices"]] == [one["choices"][0]["finish_reason"]] * 3
    u1, u3 = one["usage"], three["usage"]
    assert u3["prompt_tokens"] == u1["prompt_tokens"]                  # the prompt counted once
    assert u3["completion_tokens"] == 3 * u1["completion_tokens"] > 0  # every choice's tokens
    assert u3["total_tokens"] == u3["prompt_tokens"] + u3["completion_tokens"]
    # /metrics counts the tokens and the finish of every choice
    assert scrape(url, "amphista_generation_tokens_total") - gen_before == u3["completion_tokens"]
    assert scrape(url, "amphista_request_success_total") - done_before == 3


def test_seeded_sampled_n_gives_the_same_choices_each_time_in_a_run_of_its_own(served):
    engine, url, app = served
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 5.0, "seed": 11, "n": 4}
    before = app.batch_sizes[4]
    first = texts(ok(call(url, CHAT, body)), True)
    again = texts(ok(call(url, CHAT, body)), True)
    assert first == again
    assert len(set(first)) > 1, first          # n samples, not one sample n times
    assert app.batch_sizes[4] == before + 2    # its four rows: one run each time
    assert texts(ok(call(url, CHAT, {**body, "seed": 12})), True) != first


@pytest.mark.parametrize("chat", [True, False])
def test_a_stream_of_n_choices_reassembles_to_the_reply(served, chat):
    engine, url, app = served
    path, body = (CHAT, {"messages": MESSAGES}) if chat else (COMPLETIONS, {"prompt": PROMPT, "echo": True})
    body.update(max_tokens=14, n=2, temperature=5.0, seed=3, logprobs=True if chat else 1)
    whole = ok(call(url, path, body))
    events = sse(url, path, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    got, finishes, logprobs = {0: "", 1: ""}, {}, {}
    for e in chunks:
        assert e["usage"] is None and len(e["choices"]) == 1
        c = e["choices"][0]
        i = c["index"]
        assert i not in finishes, "a chunk after its choice's finish chunk"
        got[i] += c["delta"].get("content", "") if chat else c["text"]
        if c["finish_reason"] is not None:
            finishes[i], logprobs[i] = c["finish_reason"], c["logprobs"]
    if chat:       # each choice opens with its role
        assert [e["choices"][0]["index"] for e in chunks[:2]] == [0, 1]
        assert all(e["choices"][0]["delta"] == {"role": "assistant", "content": ""} for e in chunks[:2])
    assert [got[0], got[1]] == texts(whole, chat)
    if not chat:
        assert all(t.startswith(PROMPT) for t in texts(whole, chat))       # each choice echoes its prompt
    assert finishes == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    assert logprobs == {c["index"]: c["logprobs"] for c in whole["choices"]}
    assert texts(whole, chat)[0] != texts(whole, chat)[1]


def test_several_prompts_times_n_are_prompt_major(served):
    engine, url, app = served
    prompts = [PROMPT, "The quick brown"]
    singles = [ok(call(url, COMPLETIONS, {"prompt": p, "max_tokens": 8})) for p in prompts]
    reply = ok(call(url, COMPLETIONS, {"prompt": prompts, "max_tokens": 8, "n": 2, "echo": True, "logprobs": 0}))
    want = [prompts[i] + singles[i]["choices"][0]["text"] for i in (0, 0, 1, 1)]
    assert texts(reply, False) == want              # index = prompt * n + choice
    lps = [c["logprobs"] for c in reply["choices"]]
    assert lps[0] == lps[1] != lps[2] == lps[3]     # each choice's own prompt's echo, then its answer
    assert reply["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert reply["usage"]["completion_tokens"] == 2 * sum(s["usage"]["completion_tokens"] for s in singles)


def test_bad_n_is_a_400_naming_n(served):
    engine, url, app = served
    good = {"messages": MESSAGES, "max_tokens": 2}
    for bad in (0, -1, 1.5, True, "2", [2]):
        error_of(call(url, CHAT, {**good, "n": bad}), 400, "n must be an integer >= 1", param="n")
        error_of(call(url, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 2, "n": bad}), 400, "n must be", param="n")
    error_of(call(url, CHAT, {**good, "n": 5}), 400, "n=5", "at most 4", "--max-batch", param="n")
    assert ok(call(url, CHAT, {**good, "n": 4}))["choices"][3]["index"] == 3


def test_a_refused_prompt_gets_the_error_it_gets_with_n_1(served):
    engine, url, app = served
    for body in ({"prompt": "   ", "max_tokens": 4}, {"prompt": "word " * 200, "max_tokens": 4},
                 {"prompt": PROMPT, "max_tokens": 120}):
        alone = call(url, COMPLETIONS, body)
        assert alone[0] == 400
        assert call(url, COMPLETIONS, {**body, "n": 3}) == alone        # not "prompt 0: ..."


def test_n_rows_share_runs_with_compatible_requests_up_to_max_batch(served, monkeypatch):
    """Greedy requests batch by rows: a request's n rows always go into one run, with others that fit."""
    engine, url, app = served
    bodies = [{"messages": MESSAGES, "max_tokens": 6, "n": 2}, {"prompt": "The quick brown", "max_tokens": 6, "n": 3},
              {"prompt": PROMPT, "max_tokens": 6}, {"prompt": "Hello", "max_tokens": 6, "n": 2}]
    refs = [texts(ok(call(url, CHAT if "messages" in b else COMPLETIONS, {**b, "n": 1})), "messages" in b)[0]
            for b in bodies]
    runs = Runs(engine, monkeypatch)
    runs.gate.clear()
    blocker = threading.Thread(target=call, args=(url, CHAT, {"messages": MESSAGES, "max_tokens": 2}))
    blocker.start()
    wait_for(lambda: len(runs.sizes) == 1 and app.lock.locked())
    got, threads = {}, []
    for i, b in enumerate(bodies):
        threads.append(threading.Thread(target=lambda i=i, b=b: got.__setitem__(
            i, call(url, CHAT if "messages" in b else COMPLETIONS, b))))
        threads[-1].start()
        wait_for(lambda n=i + 1: app.scheduler.waiting() == n)
    runs.gate.set()
    for t in [blocker, *threads]:
        t.join(60)
    # chat and completions differ in `chat` (a batch-wide option): apart; the completions' 3 + 1 rows fill a run
    # of 4, the next one's 2 rows wait for the next run (never split)
    assert runs.sizes == [1, 2, 4, 2]
    for i, b in enumerate(bodies):
        assert texts(ok(got[i]), "messages" in b) == [refs[i]] * b.get("n", 1)


def test_speculative_n_2(served):
    engine, url, app = served
    ref = engine.generate(MESSAGES, 16, speculative="amphista")
    reply = ok(call(url, CHAT, {"messages": MESSAGES, "max_tokens": 16, "speculative": "amphista", "n": 2}))
    assert texts(reply, True) == [ref.text] * 2
    assert reply["amphista"]["speculative"] == "amphista"
    assert reply["usage"]["completion_tokens"] == 2 * (len(ref.token_ids) + (ref.finish_reason == "eos"))
    events = sse(url, CHAT, {"messages": MESSAGES, "max_tokens": 16, "speculative": "amphista", "n": 2})
    for i in (0, 1):
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]
                       if e["choices"][0]["index"] == i) == ref.text


def test_cache_prompt_with_n_decodes_without_reuse(served):
    engine, url, app = served
    body = {"messages": MESSAGES, "max_tokens": 8, "cache_prompt": True}
    ref = engine.generate(MESSAGES, 8).text
    assert texts(ok(call(url, CHAT, {**body, "n": 2})), True) == [ref] * 2
    assert texts(ok(call(url, CHAT, body)), True) == [ref]
    assert texts(ok(call(url, CHAT, {**body, "n": 3})), True) == [ref] * 3


def test_an_error_mid_run_runs_the_n_rows_again_together(served, monkeypatch):
    engine, url, app = served
    other = [MESSAGES[0], {"role": "user", "content": "def f(x):"}]
    refs = [engine.generate(MESSAGES, 8).text, engine.generate(other, 8).text]
    runs = Runs(engine, monkeypatch)
    # a run of several requests overflows after its prefill
    runs.overflow_after_prefill(lambda prompts: len(prompts) == 3, "the model's logits are not finite at row 2")
    replies = run_queued(app, runs, url, [{"messages": MESSAGES, "max_tokens": 8, "n": 2},
                                          {"messages": other, "max_tokens": 8}])
    assert runs.sizes == [3, 2, 1]        # each request again alone, its rows together
    assert texts(ok(replies[0]), True) == [refs[0]] * 2 and texts(ok(replies[1]), True) == [refs[1]]


def test_echo_of_the_prompt_only_with_n(served):
    engine, url, app = served
    body = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}
    one = ok(call(url, COMPLETIONS, body))
    two = ok(call(url, COMPLETIONS, {**body, "n": 2}))
    assert [c["text"] for c in two["choices"]] == [PROMPT] * 2
    assert [c["logprobs"] for c in two["choices"]] == [one["choices"][0]["logprobs"]] * 2
    assert two["usage"] == one["usage"]           # the prompt once, nothing generated


def test_each_choice_has_its_own_stats(served):
    """The "amphista" key held only the last choice's stats; now also every choice's, in the choices' order."""
    engine, url, app = served
    reply = ok(call(url, COMPLETIONS, {"prompt": [PROMPT, "Hello"], "max_tokens": 6, "n": 2}))
    per = reply["amphista"]["choices"]
    assert len(per) == 4 and per[-1] == {k: v for k, v in reply["amphista"].items() if k != "choices"}
    assert per[0]["prompt_tokens"] == per[1]["prompt_tokens"] != per[2]["prompt_tokens"] == per[3]["prompt_tokens"]
    # the engine's new_tokens leave out the EOS a choice ended on; usage counts it
    assert sum(s["new_tokens"] + (s["engine_finish_reason"] == "eos") for s in per) == \
        reply["usage"]["completion_tokens"]
    assert "choices" not in ok(call(url, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 2}))["amphista"]
