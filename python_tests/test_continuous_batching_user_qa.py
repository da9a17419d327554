"""Continuous batching under a demanding user (QA): prompts joining a run between steps (Engine.stream_batch's admit)
and the server's requests joining runs (amphista_engine/serving/batching.py). Each test failed before its fix:
a speculative run of max_tokens=1 rows took joiners whose tree steps ran past the cache (an IndexError, a 500 for
the joiner); a cache made before reserve_batch had no spare row for joiners; a joiner's decode time lost every
pause of the run before it joined (0 tok/s); admit returning a string or a number; a message list joining a
chat=False run of strings was refused where it shares the batch; the running gauge counted a joiner twice; a joiner
refused while the server closed waited for ever; a bug encoding one joiner lost the others taken with it; /metrics'
amphista_run_rows left out the rows that joined. And a load of clients, which checks every answer as alone."""
from __future__ import annotations

import http.client
import json
import queue
import random
import re
import sys
import threading
import time
import urllib.request

import pytest

from amphista_engine.errors import AmphistaError, CacheFullError, InputError
from test_continuous_batching import Feeder as _Feeder, collect
from test_serve import call
from test_serve_batching import CHAT, PROMPTS, Runs, run_queued, wait_for

pytestmark = pytest.mark.usefixtures("one_thread_module")

COMPLETIONS = "/v1/completions"
LONG = list(range(5, 105))        # 100 token ids: + 20 new fits the tiny engine's 128 slots, + the tree's 19 not


def Feeder(items, wait=0):
    """test_continuous_batching's, one prompt a call."""
    return _Feeder(items, per_call=1, wait=wait)


@pytest.fixture(scope="module")
def engine(tiny_amphista_engine):
    tiny_amphista_engine.reserve_batch(3)
    return tiny_amphista_engine


# ---- the engine ---------------------------------------------------------------------------------------------------
def test_a_speculative_run_of_one_token_rows_takes_no_joiner_past_the_tree_room(engine):
    """max_new_tokens=1 rows take no tree room (no step runs), so the joiners' room was checked without the tree's:
    a prompt that fits plain decoding but not the tree joined, and the steps it brought raised IndexError on RoPE
    positions past the cache, killing the run (in the server, a 500 for every request of it)."""
    with pytest.raises(CacheFullError, match="tree room"):
        engine.generate(LONG, 20, chat=False, speculative="amphista")       # alone: refused by name
    feed = Feeder([(LONG, 20)])
    rows = list(engine.stream_batch(["The quick"], 1, chat=False, speculative="amphista", admit=feed))
    assert all(isinstance(d, str) for _, d in rows) and feed.queue and len(engine.last_results) == 1
    # a run whose rows take the tree's room checks its joiners with it: refused by name, the run goes on
    feed = Feeder([(LONG, 20), ("def f(x):", 4)])
    errors = [d for _, d in engine.stream_batch(["The quick"], 8, chat=False, speculative="amphista", admit=feed)
              if isinstance(d, AmphistaError)]
    assert len(errors) == 1 and isinstance(errors[0], CacheFullError) and "tree room" in str(errors[0])
    assert engine.last_results[2].token_ids == engine.generate("def f(x):", 4, chat=False).token_ids


@pytest.mark.parametrize("bad", ["ab", 5, {"x": 3}])
def test_admit_returning_no_list_is_named(engine, bad):
    """A string was iterated into one "pairs" error per character (more of them than free rows: "returned 2
    prompts"), a number raised TypeError: 'int' object is not iterable."""
    feed = iter([bad])
    with pytest.raises(InputError, match=r"admit\(\d\) must return a list of \(prompt, max_new_tokens\) pairs, got "
                       + type(bad).__name__):
        list(engine.stream_batch(["The quick"], 4, chat=False, admit=lambda free: next(feed, [])))


def test_a_message_list_joins_a_chat_false_run_as_it_shares_the_batch(tiny_fp32_amphista4_engine):
    """stream_batch(chat=False) templates a message list among string prompts (a batch may mix completions and
    conversations); the same list joining that run was refused: "a message list needs chat formatting"."""
    eng = tiny_fp32_amphista4_engine
    msgs = [{"role": "user", "content": "hi"}]
    together = eng.generate_batch(["x", msgs], 3, chat=False)
    _, results, errors = collect(eng.stream_batch(["x"], 3, chat=False, admit=Feeder([(msgs, 3)]),
                                                  row_results=True))
    assert not errors and [r.token_ids for r in eng.last_results] == [r.token_ids for r in together]


def test_a_joined_rows_decode_time_leaves_out_only_the_pauses_after_it_joined(engine):
    """decode_ms less the caller's time between chunks: a joiner's was cut by every pause since the run began, so
    behind a slow reader (a server's clients) it read 0.0 ms and 0 tok/s."""
    results = {}
    feed = Feeder([("def f(x):", 10)], wait=12)
    for row, item in engine.stream_batch(["The quick brown fox"], 30, chat=False, admit=feed, row_results=True,
                                         ignore_eos=True):
        time.sleep(0.01)
        if not isinstance(item, str):
            results[row] = item
    joined = results[1].stats
    assert len(results[1].token_ids) == 10 and joined.decode_ms > 0 and joined.decode_tokens_per_s > 0
    assert engine.last_results[1].stats.decode_ms > 0


def test_a_run_takes_joiners_into_the_rows_reserved_after_its_cache_was_made(tiny_hf_dir):
    """The cache grows only as a run starts (to the reserved rows): one made by a generate() before
    reserve_batch (make_server's) stayed at 1 row, so a server's 1-request run had no spare row and nobody could
    join it until it ended (admit was first called with free=0, i.e. not at all, while the row decoded)."""
    from amphista_engine import Engine
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)
    alone = [eng.generate(p, 8, chat=False).token_ids for p in ("The quick", "def f(x):", "x = 1")]
    eng.reserve_batch(3)
    frees = []

    def admit(free):
        frees.append(free)
        return [("def f(x):", 8), ("x = 1", 8)] if len(frees) == 1 else []
    list(eng.stream_batch(["The quick"], 8, chat=False, admit=admit))
    assert frees[0] == 2 and [r.token_ids for r in eng.last_results] == alone


# ---- the scheduler, with a stand-in for the engine's run ------------------------------------------------------------
def _job(prompt="p", n=1):
    from amphista_engine.serving.batching import Job
    return Job(prompt, {"max_new_tokens": 3, "temperature": 0.0}, {}, False, n)


def _events(job, until: str, timeout: float = 10.0) -> list:
    got = []
    while not got or got[-1][0] not in (until, "error"):
        got.append(job.events.get(timeout=timeout))
    return got


def _scheduler(steps, encode=lambda job: [1, 2, 3]):
    """A Scheduler whose run is steps(scheduler, jobs, admit), a generator as stream_batch's."""
    from amphista_engine.serving.batching import Scheduler
    sched = Scheduler(lambda jobs, admit: steps(sched, jobs, admit), 4, encode)
    return sched


def test_the_running_gauge_counts_a_joiner_once():
    """run.jobs is the scheduler's `_current` list itself: the admitter appended a joiner to both, so
    amphista_requests_running counted it twice (5 requests in a run of --max-batch 4 under load)."""
    a, b, seen = _job("a"), _job("b"), {}

    def steps(sched, jobs, admit):
        sched.submit(b)                 # arrives once the run started: it joins, not shares the start

        def gen():
            seen["entries"] = admit(3)
            seen["running"] = sched.running()
            yield 0, "x"
            yield 1, "y"
            return ["ra", "rb"]
        return gen()
    sched = _scheduler(steps)
    sched.submit(a)
    assert _events(b, "end")[-1] == ("end", (0, "rb")) and _events(a, "end")[-1] == ("end", (0, "ra"))
    assert len(seen["entries"]) == 1 and seen["running"] == 2
    sched.close()


def test_a_joiner_refused_while_the_server_closes_is_answered():
    """A joiner the engine refuses goes back to the queue to run alone; once close() had emptied the queue no run
    takes it again, and its client waited for ever (the handler polls until the client leaves)."""
    a, b = _job("a"), _job("b")

    def steps(sched, jobs, admit):
        sched.submit(b)

        def gen():
            admit(3)
            sched.close()               # server_close() during the run
            yield 1, InputError("refused as it joined")
            yield 0, "x"
            return ["ra", None]
        return gen()
    sched = _scheduler(steps)
    sched.submit(a)
    assert _events(a, "end")[-1] == ("end", (0, "ra"))
    try:
        kind, err = b.events.get(timeout=5)
    except queue.Empty:
        pytest.fail("the refused joiner was never answered")
    assert kind == "error" and err.status == 503 and "shutting down" in err.message


def test_a_bug_encoding_one_joiner_leaves_the_others_joining(capsys):
    """The admitter took the waiting requests off the queue, then encoded them: an exception other than an
    AmphistaError escaped, the run died with a 500 for its own requests, and those taken were never answered."""
    a, bad, good = _job("a"), _job("bad"), _job("good")

    def encode(job):
        if job.prompt == "bad":
            raise RuntimeError("template bug")
        return [1, 2]

    def steps(sched, jobs, admit):
        sched.submit(bad)
        sched.submit(good)

        def gen():
            entries = admit(3)
            assert entries == [([1, 2], 3)]
            yield 0, "x"
            yield 1, "g"
            return ["ra", "rg"]
        return gen()
    sched = _scheduler(steps, encode)
    sched.submit(a)
    assert _events(good, "end")[-1] == ("end", (0, "rg")) and _events(a, "end")[-1] == ("end", (0, "ra"))
    kind, err = bad.events.get(timeout=5)
    assert kind == "error" and err.status == 500 and "template bug" in err.message
    assert "template bug" in capsys.readouterr().err        # its traceback on stderr, as any bug's
    sched.close()


# ---- the server -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny_amphista_engine):
    """(engine, url, app, log lines, handler errors): a server batching up to 4 rows, continuous batching on."""
    from conftest import serving
    lines: list[str] = []
    errors: list = []
    with serving(tiny_amphista_engine, model_id="tiny", log=lines.append, max_batch=4) as httpd:
        httpd.handle_error = lambda request, address: errors.append(sys.exc_info()[1])
        yield tiny_amphista_engine, httpd.url, httpd.app, lines, errors


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(\w+)(\{[^}]*\})? (\S+)$", text, re.M):
        out[name + labels] = out.get(name + labels, 0.0) + float(value)
    return out


def test_a_joiner_of_a_one_token_speculative_run_gets_its_own_answer_not_a_500(served, monkeypatch):
    engine, url, app, _, _ = served
    runs = Runs(engine, monkeypatch)
    runs.gate.clear()
    got = {}
    blocker = threading.Thread(target=lambda: got.__setitem__("b", call(url, COMPLETIONS, {
        "prompt": "The quick", "max_tokens": 1, "speculative": "amphista"})))
    blocker.start()
    wait_for(lambda: len(runs.sizes) == 1 and app.lock.locked())
    joiner = threading.Thread(target=lambda: got.__setitem__("j", call(url, COMPLETIONS, {
        "prompt": LONG, "max_tokens": 20, "speculative": "amphista"})))
    joiner.start()
    wait_for(lambda: app.scheduler.waiting() == 1)
    runs.gate.set()
    blocker.join(60)
    joiner.join(60)
    assert got["b"][0] == 200, got["b"]
    status, reply = got["j"]
    # alone it is refused by name (the tree's room): so it is here, not an internal error
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
    assert "tree room" in reply["error"]["message"]


def test_metrics_count_the_rows_that_joined_a_run(served, monkeypatch):
    """amphista_run_rows observed each run at its start: a run that began with one request and took three more as
    it decoded counted as a run of 1 row, so the histogram showed no batching where four rows shared each step."""
    engine, url, app, _, _ = served
    before = metrics(url)
    runs = Runs(engine, monkeypatch)
    replies = run_queued(app, runs, url, [{"messages": p, "max_tokens": 6} for p in PROMPTS[1:]])
    assert runs.sizes == [] and all(r[0] == 200 for r in replies)     # the three joined the blocker's run
    after = metrics(url)
    assert after["amphista_runs_total"] - before["amphista_runs_total"] == 1
    assert after["amphista_run_rows_sum"] - before["amphista_run_rows_sum"] == 4
    assert after['amphista_run_rows_bucket{le="4.0"}'] - before['amphista_run_rows_bucket{le="4.0"}'] == 1
    assert after['amphista_run_rows_bucket{le="2.0"}'] == before['amphista_run_rows_bucket{le="2.0"}']


N_CLIENTS = 50
WORDS = ["The quick brown fox", "def f(x):", "Hello world, this is", "Once upon a time", "A B C D", "x = 1"]


def _load_body(rng: random.Random) -> dict:
    """Mostly requests that can share a run (greedy completions, the server's default options), with the options
    that do not split runs (max_tokens, n) and now and then one that does: speculative, stop, logit_bias, sampling,
    cache_prompt, a chat, a long prompt that a speculative run refuses as a joiner (it runs alone). (A request of
    another kind at the head of the queue stops others joining past it, so a backlog of mixed kinds joins little.)"""
    b = {"prompt": rng.choice(WORDS), "max_tokens": rng.choice([1, 2, 5, 9, 16, 30])}
    if rng.random() < 0.3:
        b["n"] = rng.randint(2, 3)
    r = rng.random()
    if r < 0.08:
        b["speculative"] = "amphista"
        if rng.random() < 0.5:
            b["prompt"] = LONG[:rng.randint(80, 100)]
    elif r < 0.12:
        b["stop"] = ["e"]
    elif r < 0.16:
        b["logit_bias"] = {str(rng.randrange(300)): rng.choice([-100, 4])}
    elif r < 0.20:
        b.update(temperature=0.8, seed=rng.randrange(100))
    elif r < 0.24:
        b["temperature"] = 0.9
    elif r < 0.26:
        b["cache_prompt"] = True
    elif r < 0.30:
        b["messages"] = rng.choice(PROMPTS)
        del b["prompt"]
    return b


def _client(url: str, body: dict, stream: bool, leave: bool):
    """("json", status, reply) | ("sse", 200, events) | ("left",): a stream that leaves after its first text."""
    path = CHAT if "messages" in body else COMPLETIONS
    if not stream:
        return ("json",) + call(url, path, body)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", path, json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        reply = json.loads(resp.read())
        conn.close()
        return "json", resp.status, reply
    events = []
    while line := resp.fp.readline():
        if line.startswith(b"data: "):
            events.append(line[6:].strip().decode())
            if leave and events[-1] != "[DONE]":
                resp.close()
                conn.close()
                return ("left",)
    conn.close()
    return "sse", 200, [e if e == "[DONE]" else json.loads(e) for e in events]


def test_a_load_of_clients_joining_runs_answers_each_as_alone(served, monkeypatch, capsys):
    """50 clients at random times (fixed seed): streamed and not, n 1-3, mixed max_tokens, plain and speculative,
    stop strings, logit_bias, sampling, cache_prompt, chats, prompts a speculative run refuses as joiners, clients
    leaving mid-stream. Every request is answered (nothing hangs), each greedy answer is the one it gets alone, with
    its usage, choice indexes and finish reasons; no traceback; /metrics adds up (every row decoded counted once)."""
    engine, url, app, _, handler_errors = served
    rng = random.Random(7)
    clients = []
    for _ in range(N_CLIENTS):
        stream = rng.random() < 0.4
        clients.append((rng.uniform(0, 2.0), _load_body(rng), stream, stream and rng.random() < 0.25))
    runs = Runs(engine, monkeypatch, pace=0.003)     # steps a little slower: requests arrive while runs decode
    runs.gate.set()
    before, sizes = metrics(url), app.batch_sizes.copy()     # batch_sizes: the rows each run started with
    capsys.readouterr()
    out: dict = {}

    def one(i, delay, body, stream, leave):
        time.sleep(delay)
        try:
            out[i] = _client(url, body, stream, leave)
        except Exception as e:  # noqa: BLE001 -- reported below, with the request
            out[i] = ("exc", repr(e))
    threads = [threading.Thread(target=one, args=(i, *c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    wait_for(lambda: not app.lock.locked() and app.scheduler.running() == 0 and app.scheduler.waiting() == 0)
    after = metrics(url)
    assert "Traceback" not in capsys.readouterr().err and handler_errors == []

    answered = started = left = 0
    for i, (_, body, stream, leave) in enumerate(clients):
        got, n = out[i], body.get("n", 1)
        assert got[0] != "exc", (body, got)
        if got[0] == "left":
            started += n
            left += n
            continue
        _, status, reply = got
        chat = "messages" in body
        prompt = body["messages"] if chat else body["prompt"]
        kw = dict(chat=None if chat else False, max_new_tokens=body["max_tokens"], stop=body.get("stop"),
                  speculative=body.get("speculative"),
                  logit_bias={int(k): v for k, v in body.get("logit_bias", {}).items()} or None)
        if status != 200:       # only what alone is refused too: a long prompt with the tree's room
            with pytest.raises(CacheFullError):
                engine.generate(prompt, **kw)
            assert reply["error"]["code"] == "context_length_exceeded", reply
            continue
        started += n
        answered += n
        if got[0] == "json":
            choices = {c["index"]: (c["message"]["content"] if chat else c["text"], c["finish_reason"])
                       for c in reply["choices"]}
            usage = reply["usage"]
        else:
            assert reply[-1] == "[DONE]"
            texts, finishes, usage = {}, {}, None
            for e in reply[:-1]:
                usage = e.get("usage") or usage
                for c in e["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content", "") if chat else
                                                                      c["text"])
                    if c["finish_reason"]:
                        assert c["index"] not in finishes
                        finishes[c["index"]] = c["finish_reason"]
            choices = {k: (texts[k], finishes[k]) for k in finishes}
        assert sorted(choices) == list(range(n)), (body, reply)
        prompt_tokens = len(engine.encode_prompt(prompt, kw["chat"]))
        assert usage["prompt_tokens"] == prompt_tokens
        assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
        if body.get("temperature", 0) == 0:
            alone = engine.generate(prompt, **kw)
            finish = "length" if alone.finish_reason == "length" else "stop"
            assert all(choices[c] == (alone.text, finish) for c in range(n)), (body, stream, choices, alone.text)
            # each choice's tokens and the EOS it ended on (usage counts it; a stop string's end keeps its tokens)
            assert usage["completion_tokens"] == n * (len(alone.token_ids) + (alone.finish_reason == "eos"))

    def delta(name):      # summed over its labels
        return sum(v for k, v in after.items() if k.partition("{")[0] == name) - sum(
            v for k, v in before.items() if k.partition("{")[0] == name)
    # a client that left after its first event may have been sent every event by then (a short answer, decoded
    # while the client's thread waited for the CPU: a loaded CI machine): answered in full, and counted so
    assert answered <= delta("amphista_request_success_total") <= answered + left
    assert delta("amphista_run_rows_sum") == started        # every row decoded, in its run (joined ones too)
    assert delta("amphista_runs_total") == delta("amphista_run_rows_count") == sum(app.batch_sizes.values()) - sum(
        sizes.values())
    assert sum(k * v for k, v in (app.batch_sizes - sizes).items()) < started     # rows joined runs that decoded
