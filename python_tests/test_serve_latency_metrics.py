"""`amphista serve`'s latency histograms in GET /metrics (vLLM's time to first token, queue time, e2e latency, time
per output token: amphista_engine/serving/metrics.py). Requests go one at a time, so that a histogram's sum and count
between two scrapes are that request's own; only orderings the server's clock cannot break are checked (queue <=
TTFT <= e2e <= the client's own wall time around the call, all on one time.perf_counter: the server runs in this
process), never a duration."""
from __future__ import annotations

import threading
import time

import pytest

from test_serve import call, sse
from test_serve_metrics import _wait, scrape, value

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "The fox"}]
NAMES = ("request_queue_time", "time_to_first_token", "e2e_request_latency", "time_per_output_token")
EPS = 1e-6      # the sums' float rounding (differences of cumulative sums), nothing of timing


@pytest.fixture(scope="module")
def timed(tiny_amphista_engine):
    """(URL, app): a plain server of max_batch 2 (a request of n=2 fills a run: one behind it waits for its end)."""
    from conftest import serving
    with serving(tiny_amphista_engine, model_id="tiny", log=lambda line: None, max_batch=2,
                 defaults=dict(max_new_tokens=8)) as httpd:
        yield httpd.url, httpd.app


def latencies(url: str) -> dict:
    """{name: (count, sum, {le: cumulative count})} of the four histograms, each checked for its form: TYPE
    histogram, the module's fixed bounds then +Inf, cumulative (monotone) buckets, +Inf equal to _count."""
    from amphista_engine.serving.metrics import LATENCY_BUCKETS
    types, m = scrape(url)
    out = {}
    for name in NAMES:
        family = f"amphista_{name}_seconds"
        assert types[family] == "histogram", family
        buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in m.items() if n == family + "_bucket")
        assert [b for b, _ in buckets] == [*LATENCY_BUCKETS[name], float("inf")], family
        counts = [v for _, v in buckets]
        assert all(a <= b for a, b in zip(counts, counts[1:])), (family, counts)
        count = value(m, family + "_count")
        assert counts[-1] == count and value(m, family + "_sum") >= 0
        out[name] = (count, value(m, family + "_sum"), dict(buckets))
    return out


def measured(url: str, send) -> tuple:
    """(send()'s reply, {name: (observations, their sum)} between the scrapes around it, the client's wall time)."""
    before = latencies(url)
    t0 = time.perf_counter()
    reply = send()
    wall = time.perf_counter() - t0
    after = latencies(url)
    delta = {}
    for name in NAMES:
        (c0, s0, b0), (c1, s1, b1) = before[name], after[name]
        delta[name] = (c1 - c0, s1 - s0)
        if c1 - c0 == 1:       # one observation: in each bucket whose bound it is under, in none below
            for le in b1:
                if abs(le - (s1 - s0)) > EPS:
                    assert b1[le] - b0[le] == (s1 - s0 <= le), (name, le, s1 - s0)
    return reply, delta, wall


def check_one_request(delta: dict, wall: float, tokens: list[int], decoded: bool = True):
    """One request's observations: one of queue, TTFT (where it decoded) and e2e, one time per output token per
    choice of >= 2 tokens (`tokens`: each choice's), in the order the request lived them."""
    assert delta["request_queue_time"][0] == 1 and delta["e2e_request_latency"][0] == 1
    queue, e2e = delta["request_queue_time"][1], delta["e2e_request_latency"][1]
    assert 0 < queue <= e2e + EPS and e2e <= wall + EPS
    long = [n for n in tokens if n >= 2]
    if not decoded:
        assert delta["time_to_first_token"] == (0, 0) and delta["time_per_output_token"] == (0, 0)
        return
    assert delta["time_to_first_token"][0] == 1
    ttft = delta["time_to_first_token"][1]
    assert queue <= ttft + EPS and ttft <= e2e + EPS
    count, total = delta["time_per_output_token"]
    assert count == len(long)
    # each choice's (end - first token) / (tokens - 1), its end before the reply's: at most e2e - TTFT each
    if long and len(set(long)) == 1:
        assert 0 < total * (long[0] - 1) <= len(long) * (e2e - ttft) + EPS


def test_each_successful_request_is_observed_once(timed):
    url, _ = timed
    # plain chat, as JSON
    (status, reply), delta, wall = measured(url, lambda: call(url, CHAT, {"messages": USER, "max_tokens": 5,
                                                                         "ignore_eos": True}))
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == 5
    check_one_request(delta, wall, [5])

    # streamed: its chunks as it decodes, observed once at its end
    events, delta, wall = measured(url, lambda: sse(url, CHAT, {"messages": USER, "max_tokens": 4,
                                                                "ignore_eos": True}))
    assert events[-1] == "[DONE]"
    final = [e for e in events if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]]
    check_one_request(delta, wall, [e["amphista"]["new_tokens"] for e in final])
    events, delta, wall = measured(url, lambda: sse(url, COMPLETIONS, {"prompt": "def f(x):", "max_tokens": 3,
                                                                       "ignore_eos": True}))
    assert events[-1] == "[DONE]"
    check_one_request(delta, wall, [3])

    # n=2, and a completion of two prompts (two runs): one request, one TTFT (its first token), a TPOT per choice
    (status, reply), delta, wall = measured(url, lambda: call(url, COMPLETIONS, {"prompt": "Hello", "max_tokens": 4,
                                                                                 "n": 2, "ignore_eos": True}))
    assert status == 200, reply
    check_one_request(delta, wall, [s["new_tokens"] for s in reply["amphista"]["choices"]])
    assert delta["time_per_output_token"][0] == 2
    (status, reply), delta, wall = measured(url, lambda: call(url, COMPLETIONS, {
        "prompt": ["Hello", "0123"], "max_tokens": 3, "n": 2, "ignore_eos": True}))
    assert status == 200, reply
    assert [s["new_tokens"] for s in reply["amphista"]["choices"]] == [3] * 4
    check_one_request(delta, wall, [3] * 4)

    # a choice of one token has no time per output token
    (status, reply), delta, wall = measured(url, lambda: call(url, COMPLETIONS, {"prompt": "Hi", "max_tokens": 1}))
    assert status == 200 and reply["usage"]["completion_tokens"] == 1, reply
    check_one_request(delta, wall, [1])
    assert delta["time_per_output_token"] == (0, 0)

    # echo with max_tokens 0: nothing decoded, so no first token; it waited and was answered all the same
    (status, reply), delta, wall = measured(url, lambda: call(url, COMPLETIONS, {
        "prompt": "Hello", "max_tokens": 0, "echo": True, "logprobs": 1}))
    assert status == 200, reply
    check_one_request(delta, wall, [0], decoded=False)


def test_errors_are_not_observed(timed):
    url, _ = timed
    for path, body in ((CHAT, {"max_tokens": 3}),                                  # no messages
                       (COMPLETIONS, {"prompt": "x", "max_tokens": -1}),
                       (CHAT, {"messages": USER, "max_tokens": 3, "n": 9})):       # n past max_batch
        (status, reply), delta, _ = measured(url, lambda: call(url, path, body))
        assert status == 400, reply
        assert all(delta[name] == (0, 0) for name in NAMES), delta


@pytest.mark.parametrize("joins", [False, True], ids=["waits-for-the-run", "joins-the-run"])
def test_a_request_behind_another_has_waited_for_it(timed, joins):
    """The scheduler holds a first request at its lock while a second queues: neither can start before the lock
    goes. waits: the first (n=2) fills its run and the second cannot share it (a stop string of its own), so it waits
    for that run's end; joins: it shares the first's options and joins its run at its first step (continuous
    batching), its queue time ending there."""
    url, app = timed
    replies: dict = {}

    def send(name, body):
        replies[name] = call(url, CHAT, body)

    before = latencies(url)
    runs = dict(app.batch_sizes)
    app.lock.acquire()
    try:
        first = threading.Thread(target=send, args=("first", {"messages": USER, "max_tokens": 6, "n": 1 if joins
                                                               else 2, "ignore_eos": True}))
        first.start()
        _wait(lambda: app.scheduler.running() == 1, "the first request to be taken")
        t_first = time.perf_counter()           # it arrived before this
        other = {} if joins else {"stop": ["@@"]}
        second = threading.Thread(target=send, args=("second", {"messages": USER, "max_tokens": 3,
                                                                 "ignore_eos": True, **other}))
        second.start()
        _wait(lambda: app.scheduler.waiting() == 1, "the second request to queue")
        t_second = time.perf_counter()          # it arrived before this
        time.sleep(0.05)        # not asserted on: the bound below only grows with it
        released = time.perf_counter()          # neither starts before this
    finally:
        app.lock.release()
    for t in (first, second):
        t.join(60)
    after = latencies(url)
    assert replies["first"][0] == 200 and replies["second"][0] == 200, replies
    # joins: one run of one row (the joiner starts none); waits: the full run, then the second's own
    assert {k: v - runs.get(k, 0) for k, v in app.batch_sizes.items() if v != runs.get(k, 0)} == \
        ({1: 1} if joins else {2: 1, 1: 1})
    d = {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in NAMES}
    assert d["request_queue_time"][0] == d["time_to_first_token"][0] == d["e2e_request_latency"][0] == 2
    assert d["time_per_output_token"][0] == (2 if joins else 3)
    queue, ttft, e2e = d["request_queue_time"][1], d["time_to_first_token"][1], d["e2e_request_latency"][1]
    assert queue >= (released - t_first) + (released - t_second) > 0
    assert queue <= ttft + EPS and ttft <= e2e + EPS
