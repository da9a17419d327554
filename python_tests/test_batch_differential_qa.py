"""A seeded differential sweep: a greedy answer must not depend on what decodes beside it. Each case draws 2-5
prompts (chat and raw, of different lengths), per-row max_new_tokens and one set of options (stop strings cut from
the answers alone, stop_token_ids, min_tokens, logit_bias, bad_words, allowed_token_ids, penalties, logprobs,
response_format, plain or Amphista), and checks every row of Engine.generate_batch, of Engine.stream_batch with
rows joining mid-run (admit), and of requests overlapping on `amphista serve` (continuous batching) against the same
prompt decoded alone: the same token ids, text, finish_reason, stop_reason and logprobs, bit for bit (the 4-bit CPU
path's products are row-invariant: a row's logits never depend on the batch)."""
from __future__ import annotations

import json
import random
import threading

import pytest

from conftest import needs_smollm2, smollm2_with_shipped_heads

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

TEXTS = ["The quick brown fox", "def fib(n):", "Write a haiku about the sea.", "List three colors.",
         "Once upon a time, in a land far away, there lived a", "1, 2, 3, 4,", "What is the capital of France?",
         "Q: What is 2+2?\nA:", "Give me a JSON object describing a cat.",
         "The history of the city goes back many centuries. " * 12 + "Summarize:"]
WORDS = ["the", "a", " is", "fox", "def", "Paris", "cat"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def eng():
    return smollm2_with_shipped_heads(max_seq_len=1024)


def draw_options(rng: random.Random, rows: int, chat_api: bool = False) -> dict:
    """One case's shared options (the engine's names; logit_bias keys as the server takes them where chat_api)."""
    opts = {}
    if rng.random() < 0.5:
        opts["speculative"] = "amphista"
        if not chat_api:
            opts["tree"] = rng.choice(["dynamic-4", "dynamic-8"])
    if rng.random() < 0.5:
        opts["logprobs"] = True
        if rng.random() < 0.5:
            opts["top_logprobs"] = rng.randint(1, 5)
    if rng.random() < 0.25:
        opts["stop_token_ids"] = [rng.randint(0, 2000) for _ in range(3)]
    if rng.random() < 0.25:
        opts["min_tokens"] = rng.randint(0, 3)
    if rng.random() < 0.25:
        bias = {rng.randint(0, 49151): rng.choice([-100, -5, 3, 8]) for _ in range(3)}
        opts["logit_bias"] = {str(k): v for k, v in bias.items()} if chat_api else bias
    if rng.random() < 0.2:
        opts["bad_words"] = rng.sample(WORDS, 2)
    for name, values in (("presence_penalty", [0.5, 1.0]), ("frequency_penalty", [0.3, 1.0]),
                         ("repetition_penalty", [1.1, 1.3])):
        if rng.random() < 0.2:
            opts[name] = rng.choice(values)
    if rng.random() < 0.15:
        opts["allowed_token_ids"] = list(range(3000)) + [2]     # 2: <|im_end|>, so chat rows can still end
    if rng.random() < 0.12 and "min_tokens" not in opts:
        opts["response_format"] = {"type": "json_object"}
    if rng.random() < 0.3:
        opts["include_stop_str_in_output"] = True
    return opts


def cut_stops(rng: random.Random, texts: list[str]) -> list[str]:
    """Up to two stop strings, each a few characters from inside an answer alone, so that they hit."""
    cands = []
    for t in texts:
        if t and len(t) > 3:
            i = rng.randint(1, len(t) - 2)
            cands.append(t[i:i + rng.randint(1, 4)])
    return rng.sample(cands, min(2, len(cands)))


def as_seen(r) -> tuple:
    return (r.text, r.token_ids, r.finish_reason, r.stop_reason, r.token_logprobs, r.top_logprobs, r.eos_logprob)


def engine_case(seed: int):
    """(prompts, per-row limits, options, chat): raw strings first, so a stream_batch of the first rows takes
    chat=False where any row is raw (a message list gets the template all the same)."""
    rng = random.Random(seed)
    n = rng.randint(2, 5)
    prompts = sorted(([{"role": "user", "content": rng.choice(TEXTS)}] if rng.random() < 0.5
                      else rng.choice(TEXTS) for _ in range(n)), key=lambda p: not isinstance(p, str))
    limits = [rng.randint(1, MAX_TOKENS) for _ in range(n)]
    opts = draw_options(rng, n)
    if "min_tokens" in opts:
        opts["min_tokens"] = min(opts["min_tokens"], min(limits))
    return rng, prompts, limits, opts, False if any(isinstance(p, str) for p in prompts) else None


def alone_options(opts: dict, prompt, chat) -> dict:
    return {**opts, "chat": chat if isinstance(prompt, str) else None}


def check_engine_case(eng, seed: int):
    rng, prompts, limits, opts, chat = engine_case(seed)
    if rng.random() < 0.5:
        first = [eng.generate(p, max_new_tokens=n, **alone_options(opts, p, chat)) for p, n in zip(prompts, limits)]
        opts["stop"] = cut_stops(rng, [r.text for r in first])
    alone = [eng.generate(p, max_new_tokens=n, **alone_options(opts, p, chat)) for p, n in zip(prompts, limits)]
    batch = eng.generate_batch(prompts, max_new_tokens=limits, chat=chat, **opts)
    for i, (a, b) in enumerate(zip(alone, batch)):
        assert as_seen(b) == as_seen(a), (seed, "generate_batch", i)

    # the first k rows start the run; the rest join between steps (after `wait` calls), a few at a time
    k = rng.randint(1, len(prompts) - 1)
    queue, calls, wait = list(zip(prompts[k:], limits[k:])), [0], rng.randint(0, 2)

    def admit(free):
        calls[0] += 1
        if calls[0] <= wait or not queue or not free:
            return []
        take = rng.randint(1, min(free, len(queue)))
        out = queue[:take]
        del queue[:take]
        return out
    texts = {}
    for row, delta in eng.stream_batch(prompts[:k], max_new_tokens=limits[:k], chat=chat, admit=admit, **opts):
        assert isinstance(delta, str), (seed, row, delta)
        texts[row] = texts.get(row, "") + delta
    results = eng.last_results
    joined = len(results)        # rows still queued when the run's own rows all ended never joined
    assert joined >= k and joined == len(prompts) - len(queue)
    for i in range(joined):
        assert as_seen(results[i]) == as_seen(alone[i]), (seed, "stream_batch + admit", i)
        assert texts.get(i, "") == alone[i].text, (seed, i)


# seed 2 draws no option the others lack
@pytest.mark.parametrize("seed", [0, 1, 3, 4, 5, 6, 7])
def test_engine_batch_rows_answer_as_alone(eng, seed):
    check_engine_case(eng, seed)


# ---- amphista serve: overlapping requests, continuous batching ----------------------------------------------------
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def served(eng):
    from conftest import serving
    eng.reserve_batch(5)
    with serving(eng, model_id="smollm2", log=lambda line: None, max_batch=5) as httpd:
        yield httpd.url, httpd.app


def server_case(seed: int):
    rng = random.Random(seed)
    n = rng.randint(2, 4)
    opts = draw_options(rng, n, chat_api=True)
    bodies = [{"messages": [{"role": "user", "content": rng.choice(TEXTS)}],
               "max_tokens": rng.randint(max(1, opts.get("min_tokens", 0)), MAX_TOKENS), **opts} for _ in range(n)]
    streams = [rng.random() < 0.4 for _ in range(n)]
    return rng, bodies, streams


def answer(reply, stream: bool):
    """What a request's reply says of its choices (ids and times left out), comparable across runs."""
    if stream:
        assert reply[-1] == "[DONE]"
        return sorted(json.dumps(e["choices"][0], sort_keys=True) for e in reply[:-1] if e.get("choices"))
    status, body = reply
    assert status == 200, body
    return json.dumps(body["choices"], sort_keys=True), body["usage"]


def ask(url, body, stream: bool):
    from test_serve import call, sse
    return sse(url, CHAT, {**body, "stream": True}) if stream else call(url, CHAT, body)


def check_server_case(eng, url, app, monkeypatch, seed: int):
    from test_serve_batching import Runs, wait_for
    rng, bodies, streams = server_case(seed)
    if rng.random() < 0.5:
        stops = cut_stops(rng, [ask(url, b, False)[1]["choices"][0]["message"]["content"] for b in bodies])
        bodies = [{**b, "stop": stops} for b in bodies]
    alone = [answer(ask(url, b, s), s) for b, s in zip(bodies, streams)]
    engine_alone = [eng.generate(b["messages"], max_new_tokens=b["max_tokens"],
                                 **{k: v for k, v in b.items() if k not in ("messages", "max_tokens")} | (
                                     {"logit_bias": {int(t): v for t, v in b["logit_bias"].items()}}
                                     if "logit_bias" in b else {})) for b in bodies]
    for b, a, s, ref in zip(bodies, alone, streams, engine_alone):
        if not s:
            assert json.loads(a[0])[0]["message"]["content"] == ref.text

    runs = Runs(eng, monkeypatch)
    runs.gate.clear()
    first = len(runs.sizes)
    # the blocker shares the requests' options, so that they join its run between its steps
    blocker = threading.Thread(target=ask, args=(url, {**bodies[0], "max_tokens": rng.randint(3, 8)}, False))
    blocker.start()
    wait_for(lambda: len(runs.sizes) > first and app.lock.locked())
    got, threads = {}, []
    for i, (body, stream) in enumerate(zip(bodies, streams)):
        threads.append(threading.Thread(target=lambda i=i, body=body, stream=stream: got.__setitem__(
            i, ask(url, body, stream))))
        threads[-1].start()
        wait_for(lambda n=i + 1: app.scheduler.waiting() == n)
    runs.gate.set()
    for t in [blocker, *threads]:
        t.join(120)
    monkeypatch.undo()
    # one run, every request joined the blocker's; none joins a run under response_format (its grammar's state)
    assert runs.sizes[first:] == ([1, len(bodies)] if "response_format" in bodies[0] else [1]), runs.sizes[first:]
    for i, (a, stream) in enumerate(zip(alone, streams)):
        assert answer(got[i], stream) == a, (seed, i)


@pytest.mark.parametrize("seed", range(3))
def test_overlapping_server_requests_answer_as_alone(eng, served, monkeypatch, seed):
    check_server_case(eng, *served, monkeypatch, seed)


# ---- regressions: a row left no token to choose failed every row that decoded beside it ------------------------------
def no_token_options(eng) -> dict:
    """Only " the" and " a" allowed, and each banned after " the" (bad words of two tokens): a row fails once it
    has chosen " the" (prompt "This is"), a row that keeps choosing " a" never does (prompt "I saw")."""
    the, a = (eng.tokenizer.encode(w, add_bos=False) for w in (" the", " a"))
    return dict(allowed_token_ids=the + a, bad_words=["the the", "the a"])


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_a_row_left_no_token_fails_alone_in_a_run_with_admit(eng, speculative):
    from amphista_engine.errors import InputError
    opts = dict(chat=False, speculative=speculative, logprobs=True, **no_token_options(eng))
    alone = eng.generate("I saw", max_new_tokens=6, **opts)
    with pytest.raises(InputError, match="no token is left to choose at new token 2"):
        eng.generate("This is", max_new_tokens=6, **opts)
    queue = [("This is", 6)]

    def admit(free):
        out = queue[:free]
        del queue[:len(out)]
        return out
    # the erring row joins at the first step: it fails there, the first row decodes on as alone (before: the
    # InputError ended the whole run)
    items = list(eng.stream_batch(["I saw"], max_new_tokens=6, admit=admit, **opts))
    errors = [(row, x) for row, x in items if not isinstance(x, str)]
    assert len(errors) == 1 and errors[0][0] == 1 and isinstance(errors[0][1], InputError)
    assert "no token is left to choose at new token 2" in str(errors[0][1])
    assert eng.last_results[1] is None and as_seen(eng.last_results[0]) == as_seen(alone)
    assert "".join(x for row, x in items if row == 0) == alone.text


def test_a_stream_sharing_a_run_with_a_request_left_no_token_answers_as_alone(eng, served, monkeypatch):
    from test_serve import call, sse
    from test_serve_batching import Runs, wait_for
    url, app = served
    opts = {**no_token_options(eng), "max_tokens": 6}
    ok, failing = {"prompt": "I saw", **opts}, {"prompt": "This is", **opts}
    path = "/v1/completions"

    def text(events):
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events
        return "".join(e["choices"][0]["text"] for e in events[:-1] if e.get("choices"))
    want = text(sse(url, path, {**ok, "stream": True}))
    refused = call(url, path, failing)
    assert refused[0] == 400 and "no token is left" in refused[1]["error"]["message"]
    runs = Runs(eng, monkeypatch)
    runs.gate.clear()
    first = len(runs.sizes)
    blocker = threading.Thread(target=call, args=(url, path, {**ok, "max_tokens": 1}))
    blocker.start()
    wait_for(lambda: len(runs.sizes) > first and app.lock.locked())
    got = {}
    threads = [threading.Thread(target=lambda: got.__setitem__("ok", sse(url, path, {**ok, "stream": True}))),
               threading.Thread(target=lambda: got.__setitem__("failing", call(url, path, failing)))]
    for i, t in enumerate(threads):
        t.start()
        wait_for(lambda n=i + 1: app.scheduler.waiting() == n)
    runs.gate.set()
    for t in [blocker, *threads]:
        t.join(60)
    # before: the stream that joined ended with the other request's error ("... of prompt 2")
    assert text(got["ok"]) == want
    assert got["failing"] == refused        # sent back to run alone: the error it gets alone
    assert runs.sizes[first:] == [1, 1]     # the blocker's run (the two joined it), then the failing one alone
