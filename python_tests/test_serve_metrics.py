"""`amphista serve`'s GET /metrics (amphista_engine/serving/metrics.py): the Prometheus text format, parsed here by a
small parser of the exposition format, its counters checked against what the test sent and the server answered."""
from __future__ import annotations

import http.client
import re
import threading
import time
import urllib.request
from collections import Counter

import pytest

from test_serve import call, sse

pytestmark = pytest.mark.usefixtures("one_thread_module")

MODEL_ID = 'tiny "q"\\x\ny'         # every character a label value escapes
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "The fox"}]
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"\s*(,|$)')


def parse(text: str) -> tuple[dict, dict]:
    """(types {family: type}, samples {(name, frozenset of label pairs): value}) of an exposition-format text.
    Strict: every sample belongs to a family TYPEd before it, label values are properly escaped."""
    types, helps, samples = {}, {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert name not in helps and help_, line
            helps[name] = help_
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped") and name not in types, line
            types[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels_text, value = m.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert family in types and family in helps, f"{name} has no TYPE/HELP before it"
            labels, pos = [], 0
            while labels_text and pos < len(labels_text):
                lm = LABEL.match(labels_text, pos)
                assert lm, f"bad labels in {line!r}"
                raw = lm.group(2)
                labels.append((lm.group(1), re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1),
                                                   raw)))
                pos = lm.end()
            key = (name, frozenset(labels))
            assert key not in samples, f"duplicate sample {line!r}"
            samples[key] = float(value)
    return types, samples


def scrape(url: str) -> tuple[dict, dict]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse(r.read().decode("utf-8"))


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metered(tiny_amphista_engine):
    """(engine, URL, app): a speculative (amphista) server batching up to 4 requests, in a background thread."""
    from conftest import serving
    with serving(tiny_amphista_engine, model_id=MODEL_ID, speculative="amphista", log=lambda line: None,
                 max_batch=4, defaults=dict(max_new_tokens=12)) as httpd:
        yield tiny_amphista_engine, httpd.url, httpd.app


def _wait(cond, what: str):
    for _ in range(1000):
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_metrics_count_what_was_sent_and_answered(metered):
    engine, url, app = metered
    types, before = scrape(url)           # a fresh server: nothing counted yet
    assert value(before, "amphista_runs_total") == 0 and value(before, "amphista_run_rows_count") == 0
    assert value(before, "amphista_model_info", model=MODEL_ID, method="amphista") == 1
    assert types["amphista_run_rows"] == "histogram" and types["amphista_requests_waiting"] == "gauge"
    assert types["amphista_generation_tokens_total"] == "counter"

    # A batched pair, deterministically: the scheduler holds a first request at its lock while the pair queues
    replies: dict[str, tuple] = {}

    def send(name, path, body):
        replies[name] = call(url, path, body)

    app.lock.acquire()
    try:
        first = threading.Thread(target=send, args=("first", CHAT, {"messages": USER, "max_tokens": 6}))
        first.start()
        _wait(lambda: app.scheduler.running() == 1, "the first request to be taken")
        pair = [threading.Thread(target=send, args=(f"pair{i}", COMPLETIONS, {"prompt": p, "max_tokens": n}))
                for i, (p, n) in enumerate((("def f(x):", 5), ("Hello, world", 9)))]
        for t in pair:
            t.start()
        _wait(lambda: app.scheduler.waiting() == 2, "the pair to queue")
        _, now = scrape(url)            # the gauges, read at scrape time
        assert value(now, "amphista_requests_waiting") == 2 and value(now, "amphista_requests_running") == 1
    finally:
        app.lock.release()
    for t in [first, *pair]:
        t.join(60)
    events = sse(url, CHAT, {"messages": USER, "max_tokens": 7, "stream_options": {"include_usage": True}})
    replies["single"] = call(url, COMPLETIONS, {"prompt": "0123", "max_tokens": 4})
    bad = call(url, CHAT, {"max_tokens": 3})                           # no messages: a 400
    assert bad[0] == 400
    assert call(url, "/v1/models")[0] == 200 and call(url, "/health")[0] == 200
    assert call(url, "/nope")[0] == 404
    assert call(url, "/metrics", {"x": 1})[0] == 405                    # POST /metrics
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    conn.request("HEAD", "/metrics")
    head = conn.getresponse()
    assert head.status == 200 and head.read() == b"" and int(head.headers["Content-Length"]) > 0
    assert head.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    conn.close()
    _, m = scrape(url)

    for status, reply in replies.values():
        assert status == 200, reply
    answers = [r for _, r in replies.values()]
    final = [e for e in events if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]]
    stream_stats = final[0]["amphista"]
    stream_usage = [e for e in events if isinstance(e, dict) and e.get("usage")][0]["usage"]
    stats = [r["amphista"] for r in answers] + [stream_stats]
    usages = [r["usage"] for r in answers] + [stream_usage]

    # requests: by endpoint (each answered one), errors by endpoint and status
    assert value(m, "amphista_requests_total", endpoint=CHAT) == 3
    assert value(m, "amphista_requests_total", endpoint=COMPLETIONS) == 3
    assert value(m, "amphista_requests_total", endpoint="/v1/models") == 1
    assert value(m, "amphista_requests_total", endpoint="/health") == 1
    assert value(m, "amphista_requests_total", endpoint="other") == 1
    assert value(m, "amphista_requests_total", endpoint="/metrics") == 4     # 2 scrapes, the POST, the HEAD
    errors = {tuple(sorted(labels)): v for (name, labels), v in m.items() if name == "amphista_request_errors_total"}
    assert errors == {(("endpoint", CHAT), ("status", "400")): 1, (("endpoint", "other"), ("status", "404")): 1,
                      (("endpoint", "/metrics"), ("status", "405")): 1}
    finished = Counter(s["engine_finish_reason"] for s in stats)
    assert sum(finished.values()) == 5
    for reason, n in finished.items():
        assert value(m, "amphista_request_success_total", finish_reason=reason) == n
    assert sum(v for (name, _), v in m.items() if name == "amphista_request_success_total") == 5

    # tokens, as the replies' usage counts them
    assert value(m, "amphista_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert value(m, "amphista_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)

    # runs: the first alone, the pair together, the stream and the single completion alone
    assert dict(app.batch_sizes) == {1: 3, 2: 1}
    runs = value(m, "amphista_runs_total")
    assert runs == 4 == value(m, "amphista_run_rows_count") == sum(app.batch_sizes.values())
    assert value(m, "amphista_run_rows_sum") == 5
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in m.items()
                     if name == "amphista_run_rows_bucket")
    assert [b for b, _ in buckets] == [1.0, 2.0, 4.0, float("inf")]
    assert [v for _, v in buckets] == [3, 4, 4, 4]
    assert all(a <= b for (_, a), (_, b) in zip(buckets, buckets[1:]))      # cumulative
    assert buckets[-1][1] == runs

    # decoding: steps and the tokens they emitted (tau = their ratio), and the runs' times
    accepted = sum(sum(n * c for n, c in enumerate(s["accept_hist"])) for s in stats)
    assert value(m, "amphista_decode_steps_total") == sum(s["decode_steps"] for s in stats) > 0
    assert value(m, "amphista_decode_accepted_tokens_total") == accepted
    pair_stats = [replies["pair0"][1]["amphista"], replies["pair1"][1]["amphista"]]
    alone = [replies["first"][1]["amphista"], replies["single"][1]["amphista"], stream_stats]
    # a batch's rows share its times: the run counts them once (its longest row's)
    for key, name in (("prefill_ms", "amphista_prefill_seconds_total"), ("decode_ms", "amphista_decode_seconds_total")):
        expected = (sum(s[key] for s in alone) + max(s[key] for s in pair_stats)) / 1e3
        # a reply's stats are taken as its row ends, the run's as the run ends: a busy machine puts a few ms
        # between them. Half the shorter row's time still tells the run's time counted once from it counted twice.
        tol = max(2e-3, min(25e-3, min(s[key] for s in pair_stats) / 2e3))
        assert value(m, name) == pytest.approx(expected, abs=tol), key
    assert value(m, "amphista_requests_waiting") == 0 and value(m, "amphista_requests_running") == 0


def test_metrics_label_values_are_escaped(metered):
    from amphista_engine.serving.metrics import escape_label
    _, url, _ = metered
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    assert 'model="tiny \\"q\\"\\\\x\\ny"' in text
    assert escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
