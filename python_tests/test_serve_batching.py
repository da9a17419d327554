"""`amphista serve` batching: requests waiting when a run starts are decoded together in one engine.stream_batch where
their options are identical (amphista_engine/serving/batching.py). Each request's answer is checked against the same
request decoded alone; which runs held which requests is read from a spy on engine.stream_batch, whose runs wait at a
gate until the test has queued its requests (so what is batched never depends on timing)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from amphista_engine.errors import CacheFullError, InputError, NonFiniteError
from conftest import relay
from test_serve import _send, call, sse

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHAT = "/v1/chat/completions"
SYSTEM = {"role": "system", "content": "You are terse."}
PROMPTS = [[SYSTEM, {"role": "user", "content": text}] for text in (
    "The quick brown fox", "def f(x):", "Hello, world! Speculative decoding drafts several tokens", "0123")]


@pytest.fixture(scope="module")
def batching(tiny_amphista_engine):
    """(engine, base URL, app, log lines): a server batching up to 4 requests, in a background thread."""
    from conftest import serving
    lines: list[str] = []
    # continuous=False: requests that arrive mid-run wait for the next (its grouping is what these tests check;
    # joining a run that decodes is test_serve_continuous.py's)
    with serving(tiny_amphista_engine, model_id="tiny", log=lines.append, max_batch=4, continuous=False) as httpd:
        yield tiny_amphista_engine, httpd.url, httpd.app, lines


class Runs:
    """Wraps engine.stream_batch: `sizes` records the prompts of each call (refused ones too); a run waits at `gate`
    before its first step (not in the call itself: the server holds its template lock there); `pace` s per item."""

    def __init__(self, engine, monkeypatch, fail=None, pace=0.0):
        self.real, self.sizes, self.pulled, self.gate, self.pace = engine.stream_batch, [], [], threading.Event(), pace
        self.fail = fail        # fail(prompts) -> an exception to raise at the call, or None
        monkeypatch.setattr(engine, "stream_batch", self)

    def __call__(self, prompts, *args, **kwargs):
        self.sizes.append(len(prompts))
        if self.fail is not None and (error := self.fail(prompts)) is not None:
            raise error
        return relay(self.real(prompts, *args, **kwargs), before=lambda: self.gate.wait(30), each=self._paced)

    def _paced(self, item):
        self.pulled.append(item)
        time.sleep(self.pace)
        return item

    def overflow_after_prefill(self, when, message: str):
        """From now on a run whose prompts `when(prompts)` holds raises NonFiniteError(message) after its first item
        (a row that overflows after the prefill); other runs go on as they would."""
        real = self.real

        def overflowing(prompts, *args, **kwargs):
            steps = real(prompts, *args, **kwargs)

            def gen():
                try:
                    yield next(steps)
                    if when(prompts):
                        raise NonFiniteError(message)
                    return (yield from steps)
                finally:
                    steps.close()
            return gen()
        self.real = overflowing


def wait_for(what, timeout=30.0):
    deadline = time.time() + timeout
    while not what():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def text_of(reply, stream: bool) -> str:
    if stream:
        return "".join(e["choices"][0]["delta"].get("content", "") for e in reply[:-1] if "choices" in e and
                       e["choices"])
    return reply[1]["choices"][0]["message"]["content"]


def ask(url, body, stream: bool):
    return sse(url, CHAT, body) if stream else call(url, CHAT, body)


def _behind_a_blocker(app, runs, url, requests):
    """A first request holds the engine (its run waits at the gate) while `requests` (functions, each making one
    request) queue, in order, behind it; then the gate opens. ({index: what each returned}, the blocker's index in
    runs.sizes)."""
    runs.gate.clear()
    first = len(runs.sizes)
    blocker = threading.Thread(target=call, args=(url, CHAT, {"messages": PROMPTS[0], "max_tokens": 2}))
    blocker.start()
    wait_for(lambda: len(runs.sizes) > first and app.lock.locked())
    got, threads = {}, []
    for i, request in enumerate(requests):
        threads.append(threading.Thread(target=lambda i=i, request=request: got.__setitem__(i, request())))
        threads[-1].start()
        wait_for(lambda n=i + 1: app.scheduler.waiting() == n)       # queued in this order
    runs.gate.set()
    for t in [blocker, *threads]:
        t.join(60)
    return got, first


def run_queued(app, runs, url, bodies, streams=None):
    """A first request holds the engine (its run waits at the gate) while `bodies` queue, in order, behind it;
    then the gate opens. The replies of `bodies` (parsed; SSE event lists for streams)."""
    streams = streams or [False] * len(bodies)
    got, first = _behind_a_blocker(app, runs, url, [lambda body=body, stream=stream: ask(url, body, stream)
                                                    for body, stream in zip(bodies, streams)])
    del runs.sizes[first]           # the blocker's run
    return [got[i] for i in range(len(bodies))]


def queued_completions(app, runs, url, prompts, max_tokens):
    """run_queued for completions of `prompts` (the replies by index), the blocker's run left in runs.sizes."""
    def completion(p):
        return lambda: call(url, "/v1/completions", {"prompt": p, "max_tokens": max_tokens})
    return _behind_a_blocker(app, runs, url, [completion(p) for p in prompts])[0]


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_concurrent_requests_are_decoded_together_each_as_alone(batching, monkeypatch, speculative):
    engine, url, app, lines = batching
    method = {} if speculative is None else {"speculative": speculative}
    refs = [engine.generate(p, 24, **method) for p in PROMPTS]
    if speculative:
        assert [r.text for r in refs] == [engine.generate(p, 24).text for p in PROMPTS]     # greedy: plain's text
    runs = Runs(engine, monkeypatch)
    bodies = [{"messages": p, "max_tokens": 24, **method} for p in PROMPTS]
    streams = [False, True, False, True]
    logged = len(lines)
    replies = run_queued(app, runs, url, bodies, streams)
    assert runs.sizes == [4]          # one run for the four, which arrived while another decoded
    for ref, reply, stream in zip(refs, replies, streams):
        assert text_of(reply, stream) == ref.text
        if not stream:
            assert reply[1]["usage"]["completion_tokens"] == len(ref.token_ids) + (ref.finish_reason == "eos")
            assert reply[1]["amphista"]["speculative"] == speculative
        else:
            assert reply[-1] == "[DONE]" and reply[-2]["choices"][0]["finish_reason"] is not None
    # the blocker's line among them may come last: its handler logs after its reply, racing the batch's handlers
    assert sum("batch of 4" in ln for ln in lines[logged:]) == 4, lines[logged:]
    assert app.batch_sizes[4] >= 1


def test_the_cache_is_sized_for_the_batch_once(tiny_hf_dir, monkeypatch):
    import amphista_engine.kv_cache as kv_cache
    from amphista_engine import Engine
    from amphista_engine.serving import OpenAIApp
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=64)     # max_batch_size 1
    engine.generate("The quick brown fox", 2)
    assert engine._cache.batch == 1
    # memory for the rows is checked when the app is made, and named
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 1 << 20)
    with pytest.raises(CacheFullError, match=r"batches of up to 4 requests \(max_batch.*--max-batch.*smaller"):
        OpenAIApp(engine, max_batch=4)
    monkeypatch.undo()
    OpenAIApp(engine, max_batch=4)
    engine.generate_batch(["The quick brown fox", "def f(x):"], 2)      # the first batch allocates every row ...
    cache = engine._cache
    assert cache.batch == 4
    engine.generate_batch(["a", "b", "c"], 2)
    engine.generate_batch(["a", "b", "c", "d"], 2)
    assert engine._cache is cache                                         # ... and no later one regrows it


def test_incompatible_requests_run_apart_and_are_all_answered(batching, monkeypatch):
    engine, url, app, _ = batching
    greedy = [{"messages": p, "max_tokens": 12} for p in PROMPTS[:2]]
    seeded = [{"messages": p, "max_tokens": 12, "temperature": 0.8, "seed": 5} for p in PROMPTS[:2]]
    sampled = [{"messages": p, "max_tokens": 12, "temperature": 1.3} for p in PROMPTS[2:]]
    # other chat template variables (the tiny model's fallback template reads none: the same text)
    templated = {"messages": PROMPTS[0], "max_tokens": 12, "chat_template_kwargs": {"enable_thinking": False}}
    refs = [engine.generate(p, 12).text for p in PROMPTS[:2]]
    seeded_refs = [engine.generate(p, 12, temperature=0.8, seed=5).text for p in PROMPTS[:2]]
    runs = Runs(engine, monkeypatch)
    order = [greedy[0], seeded[0], sampled[0], greedy[1], seeded[1], sampled[1], templated]
    replies = run_queued(app, runs, url, order)
    # the oldest request's run takes the later ones that share its options; seeded sampling always runs alone
    assert runs.sizes == [2, 1, 2, 1, 1]
    assert [text_of(r, False) for r in (replies[0], replies[3], replies[6])] == refs + refs[:1]
    assert [text_of(r, False) for r in (replies[1], replies[4])] == seeded_refs     # reproducible: as alone
    for reply in (replies[2], replies[5]):
        assert reply[0] == 200 and 1 <= reply[1]["usage"]["completion_tokens"] <= 12


def test_max_tokens_differing_within_a_batch(batching, monkeypatch):
    engine, url, app, _ = batching
    limits = [6, 20, 6, 20]
    refs = [engine.generate(p, n) for p, n in zip(PROMPTS, limits)]
    runs = Runs(engine, monkeypatch)
    replies = run_queued(app, runs, url, [{"messages": p, "max_tokens": n} for p, n in zip(PROMPTS, limits)],
                         [True, False, False, True])
    assert runs.sizes == [4]              # one run: each row ends at its own max_tokens (per-prompt max_new_tokens)
    for ref, reply, stream in zip(refs, replies, [True, False, False, True]):
        assert text_of(reply, stream) == ref.text
        finish = {"eos": "stop", "stop": "stop", "length": "length"}[ref.finish_reason]
        if stream:
            assert reply[-2]["choices"][0]["finish_reason"] == finish
        else:
            assert reply[1]["choices"][0]["finish_reason"] == finish
            assert reply[1]["usage"]["completion_tokens"] == len(ref.token_ids) + (ref.finish_reason == "eos")


def test_a_client_leaving_mid_stream_leaves_the_others_batch_going(batching, monkeypatch):
    engine, url, app, lines = batching
    refs = [engine.generate(p, 40).text for p in PROMPTS[1:]]
    runs = Runs(engine, monkeypatch, pace=0.01)
    runs.gate.clear()
    blocker = threading.Thread(target=call, args=(url, CHAT, {"messages": PROMPTS[0], "max_tokens": 2}))
    blocker.start()
    wait_for(lambda: len(runs.sizes) == 1 and app.lock.locked())
    leaver = _send(url, {"messages": PROMPTS[0], "max_tokens": 40, "stream": True})
    wait_for(lambda: app.scheduler.waiting() == 1)
    got = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, sse(url, CHAT, {
        "messages": PROMPTS[1 + i], "max_tokens": 40}))) for i in range(3)]
    for i, t in enumerate(threads):
        t.start()
        wait_for(lambda n=i + 2: app.scheduler.waiting() == n)
    runs.gate.set()
    data = b""
    while data.count(b"\n\n") < 3:       # the role chunk and two deltas: its row is decoding
        chunk = leaver.recv(4096)
        assert chunk, data
        data += chunk
    leaver.close()
    for t in [blocker, *threads]:
        t.join(60)
    assert runs.sizes == [1, 4]
    assert [text_of(got[i], True) for i in range(3)] == refs
    assert any('" 499 ' in ln and "batch of 4" in ln for ln in lines), lines[-6:]


def test_a_batch_whose_clients_all_left_is_closed(batching, monkeypatch):
    engine, url, app, _ = batching
    deltas = sum(1 for _ in engine.stream_batch(PROMPTS[:2], 60))
    runs = Runs(engine, monkeypatch, pace=0.03)
    runs.gate.clear()
    blocker = threading.Thread(target=call, args=(url, CHAT, {"messages": PROMPTS[0], "max_tokens": 2}))
    blocker.start()
    wait_for(lambda: len(runs.sizes) == 1 and app.lock.locked())
    socks = []
    for i, p in enumerate(PROMPTS[:2]):
        socks.append(_send(url, {"messages": p, "max_tokens": 60, "stream": bool(i)}))
        wait_for(lambda n=i + 1: app.scheduler.waiting() == n)
    runs.gate.set()
    blocker.join(60)
    wait_for(lambda: len(runs.sizes) == 2 and len(runs.pulled) > 4)
    for s in socks:
        s.close()
    wait_for(lambda: not app.lock.locked() and engine._decoding is None)
    assert runs.sizes == [1, 2]
    assert len(runs.pulled) < deltas // 2 + 2, (len(runs.pulled), deltas)       # it stopped decoding for nobody
    # and the engine is free for the next request
    monkeypatch.undo()
    assert text_of(call(url, CHAT, {"messages": PROMPTS[2], "max_tokens": 8}), False) == \
        engine.generate(PROMPTS[2], 8).text


def test_a_batch_the_engine_refuses_runs_its_requests_alone(batching, monkeypatch):
    engine, url, app, _ = batching
    prompts = ["def f(x):\n    return", "   ", "The quick brown"]
    refs = [engine.generate(prompts[0], 8, chat=False).text, None, engine.generate(prompts[2], 8, chat=False).text]
    runs = Runs(engine, monkeypatch)
    replies = queued_completions(app, runs, url, prompts, 8)
    # one empty prompt refused the batch: alone, it gets its own 400 (no "prompt 1:"), the others their answers,
    # still batched together
    assert runs.sizes == [1, 3, 1, 2]
    assert replies[1][0] == 400 and replies[1][1]["error"]["message"] == "prompt is empty"
    assert [replies[i][1]["choices"][0]["text"] for i in (0, 2)] == [refs[0], refs[2]]
    # a refusal for the batch's rows alone (the memory for them, a prompt plus the shared max_tokens): the same
    refs = [engine.generate(p, 10).text for p in PROMPTS[:3]]
    runs = Runs(engine, monkeypatch, fail=lambda prompts: CacheFullError("needs 9.9 GiB for the KV cache")
                if len(prompts) > 1 else None)
    replies = run_queued(app, runs, url, [{"messages": p, "max_tokens": 10} for p in PROMPTS[:3]],
                         [False, True, False])
    assert runs.sizes == [3, 1, 1, 1]
    assert [text_of(r, s) for r, s in zip(replies, [False, True, False])] == refs


def test_an_error_mid_batch_reruns_the_unsent_requests_alone(batching, monkeypatch):
    engine, url, app, _ = batching
    refs = [engine.generate(p, 10).text for p in PROMPTS[:3]]
    runs = Runs(engine, monkeypatch)
    # a batch's row overflows after the prefill
    runs.overflow_after_prefill(lambda prompts: len(prompts) > 1, "the model's logits are not finite at row 1")
    replies = run_queued(app, runs, url, [{"messages": p, "max_tokens": 10} for p in PROMPTS[:3]],
                         [False, False, True])
    assert runs.sizes == [3, 1, 1]        # the non-streamed two again, alone; the stream had begun
    assert [text_of(r, False) for r in replies[:2]] == refs[:2]
    assert replies[2][-1] == "[DONE]"
    assert replies[2][-2]["error"]["type"] == "server_error" and "not finite" in replies[2][-2]["error"]["message"]


def test_max_batch_1_decodes_one_request_at_a_time(tiny_amphista_engine, monkeypatch):
    from amphista_engine.serving import make_server
    from amphista_engine.serving.batching import batch_key
    engine, lines = tiny_amphista_engine, []
    httpd = make_server(engine, "127.0.0.1", 0, log=lines.append, max_batch=1)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        refs = [engine.generate(p, 10).text for p in PROMPTS[1:]]
        runs = Runs(engine, monkeypatch)
        replies = run_queued(httpd.app, runs, httpd.url, [{"messages": p, "max_tokens": 10} for p in PROMPTS[1:]],
                             [False, True, False])
        # continuous batching: each joins a run as the row before it ended (or starts one), never two at once
        assert all(n == 1 for n in runs.sizes)
        assert [text_of(r, s) for r, s in zip(replies, [False, True, False])] == refs
        assert not any("batch of" in ln for ln in lines)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
    # what makes requests compatible: the options once the defaults are in, chat template variables included
    base = dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, stop=None, speculative=None,
                tree=None, chat=None, max_new_tokens=16)
    assert batch_key({**base, "temperature": 0}, {}) == batch_key({**base, "cut_to_room": True}, {})
    assert batch_key(base, {}) != batch_key(base, {"enable_thinking": False})
    assert batch_key(base, {}) != batch_key({**base, "speculative": "amphista"}, {})
    assert batch_key({**base, "seed": 3}, {}) is not None      # greedy: its seed draws nothing, it is batched
    assert batch_key({**base, "temperature": 0.7, "seed": 3}, {}) is None
    assert batch_key({**base, "temperature": float("nan")}, {}) is None
    # max_tokens is per row, not part of the key; only max_tokens 0 (echo, nothing decoded) runs apart
    assert batch_key(base, {}) == batch_key({**base, "max_new_tokens": 40}, {})
    assert batch_key(base, {}) != batch_key({**base, "max_new_tokens": 0}, {})
    assert "max_new_tokens" not in json.loads(batch_key(base, {}))[0]


def test_bad_max_batch_is_named(tiny_amphista_engine):
    from amphista_engine.errors import InputError
    from amphista_engine.serving import OpenAIApp
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(InputError, match="max_batch must be an integer >= 1"):
            OpenAIApp(tiny_amphista_engine, max_batch=bad)


def test_the_max_batch_flag(capsys):
    from amphista_engine.cli import build_parser
    from amphista_engine.errors import InputError
    from amphista_engine.serving.commands import cmd_serve
    assert build_parser().parse_args(["serve"]).max_batch == 8
    args = build_parser().parse_args(["serve", "--port", "0", "--max-batch", "0", "--model", "/nowhere"])
    with pytest.raises(InputError, match="--max-batch must be at least 1"):      # before any load
        cmd_serve(args)
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "serve" in a.choices)
    text = " ".join(sub.choices["serve"].format_help().split())
    assert "--max-batch N" in text and "decoded together" in text and "seed that samples runs alone" in text


def test_a_short_answer_is_sent_when_its_row_ends_not_when_the_batch_does(batching, monkeypatch):
    """The engine's row_results: a row's result comes as the row ends, so a short answer batched with a long one is
    sent then. Here the run is held right after the short row's result until its client has the reply: sent only at
    the batch's end (as before), it never comes, and the held run fails the test."""
    engine, url, app, lines = batching
    answers = [engine.generate(p, 40).text for p in PROMPTS[:2]]
    # a stop string early in the first answer and nowhere in the second: the first row ends after a few tokens
    stop = next(answers[0][i:i + 3] for i in range(1, len(answers[0]) - 3) if answers[0][i:i + 3] not in answers[1])
    refs = [engine.generate(p, 40, stop=[stop]) for p in PROMPTS[:2]]
    assert refs[0].finish_reason == "stop" and len(refs[0].token_ids) < len(refs[1].token_ids)
    runs = Runs(engine, monkeypatch)
    released, held = threading.Event(), []

    def hold_after_row_0(prompts, *args, **kwargs):
        def hold(item):
            if len(prompts) == 2 and item[0] == 0 and not isinstance(item[1], str):
                held.append(released.wait(30))
        return relay(runs(prompts, *args, **kwargs), after=hold)
    monkeypatch.setattr(engine, "stream_batch", hold_after_row_0)
    runs.gate.clear()
    blocker = threading.Thread(target=call, args=(url, CHAT, {"messages": PROMPTS[2], "max_tokens": 2}))
    blocker.start()
    wait_for(lambda: len(runs.sizes) == 1 and app.lock.locked())
    got = {}

    def one(i):
        got[i] = call(url, CHAT, {"messages": PROMPTS[i], "max_tokens": 40, "stop": [stop]})
        if i == 0:
            released.set()
    threads = [threading.Thread(target=one, args=(i,)) for i in (0, 1)]
    for n, t in enumerate(threads):
        t.start()
        wait_for(lambda n=n: app.scheduler.waiting() == n + 1)
    runs.gate.set()
    for t in [blocker, *threads]:
        t.join(60)
    assert runs.sizes == [1, 2] and held == [True]
    for i in (0, 1):
        assert got[i][1]["choices"][0]["message"]["content"] == refs[i].text
        # refs[0] ended on its stop string (a token it keeps): nothing more; an EOS ending is counted
        assert got[i][1]["usage"]["completion_tokens"] == len(refs[i].token_ids) + (refs[i].finish_reason == "eos")
    assert got[0][1]["choices"][0]["finish_reason"] == "stop"


def test_row_results_from_the_engine(tiny_amphista_engine):
    """stream_batch(row_results=True): each row's result right after its last delta, equal to the run's final one."""
    engine = tiny_amphista_engine
    prompts = ["The quick brown fox", "Hello", "def f(x):"]
    for speculative in (None, "amphista"):
        items = list(engine.stream_batch(prompts, 30, chat=False, stop=["o"], speculative=speculative,
                                         row_results=True))
        ends = {row: i for i, (row, x) in enumerate(items) if not isinstance(x, str)}
        assert sorted(ends) == [0, 1, 2]
        for row, i in ends.items():
            result = items[i][1]
            assert "".join(x for b, x in items[:i] if b == row) == result.text
            assert all(b != row for b, _ in items[i + 1:])            # nothing of the row after its result
            final = engine.last_results[row]
            assert (result.text, result.token_ids, result.finish_reason) == \
                (final.text, final.token_ids, final.finish_reason)
            assert result.stats.new_tokens == len(result.token_ids)
    with pytest.raises(InputError, match="row_results must be True or False"):
        engine.stream_batch(prompts, 4, row_results="yes")


def test_a_prompt_too_long_for_the_cache_leaves_the_rest_of_its_batch_batched(batching, monkeypatch):
    """The engine names the prompt that refused a batch (the error's prompt_index): that request runs alone, to get
    the error it would get anyway, and the others still share one run."""
    engine, url, app, _ = batching
    long_prompt = "word " * 200                      # past the tiny engine's 128-token cache
    with pytest.raises(CacheFullError) as refused:
        engine.generate_batch(["The quick brown", long_prompt], 4, chat=False)
    assert refused.value.prompt_index == 1 and str(refused.value).startswith("prompt 1")
    prompts = ["def f(x):\n    return", long_prompt, "The quick brown"]
    refs = [engine.generate(p, 6, chat=False).text for p in (prompts[0], prompts[2])]
    runs = Runs(engine, monkeypatch)
    replies = queued_completions(app, runs, url, prompts, 6)
    assert runs.sizes == [1, 3, 1, 2]                # the blocker's run, the refused batch, then its two runs
    assert replies[1][0] == 400 and replies[1][1]["error"]["code"] == "context_length_exceeded"
    assert not replies[1][1]["error"]["message"].startswith("prompt 1")
    assert [replies[i][1]["choices"][0]["text"] for i in (0, 2)] == refs
