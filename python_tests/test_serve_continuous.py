"""`amphista serve`'s continuous batching: a request that arrives while a run decodes joins it between steps where it
could have shared it (amphista_engine/serving/batching.py, Engine.stream_batch's admit), and answers exactly as alone.
Requests queue while a first run waits at the gate of test_serve_batching's spy, so what joins never depends on
timing: `runs.sizes` lists the engine runs started after the blocker's (a request that joined starts none)."""
from __future__ import annotations

import pytest

from test_serve import call, error_of
from test_serve_batching import CHAT, PROMPTS, Runs, run_queued, text_of

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def served(tiny_amphista_engine):
    from conftest import serving
    lines: list[str] = []
    with serving(tiny_amphista_engine, model_id="tiny", log=lines.append, max_batch=4) as httpd:
        yield tiny_amphista_engine, httpd.url, httpd.app, lines


def test_requests_arriving_mid_run_join_it_and_answer_as_alone(served, monkeypatch):
    engine, url, app, lines = served
    limits = [10, 3, 14, 6, 9]
    prompts = PROMPTS + [[PROMPTS[0][0], {"role": "user", "content": "Speculative decoding"}]]
    refs = [engine.generate(p, n).text for p, n in zip(prompts, limits)]
    runs = Runs(engine, monkeypatch)
    replies = run_queued(app, runs, url, [{"messages": p, "max_tokens": n} for p, n in zip(prompts, limits)],
                         [False, True, False, True, False])
    # the blocker's run had 3 free rows: three joined at its first step, the other two as rows ended
    assert runs.sizes == []
    assert [text_of(r, s) for r, s in zip(replies, [False, True, False, True, False])] == refs
    assert any("batch of" in ln for ln in lines)


def test_speculative_requests_join_too(served, monkeypatch):
    engine, url, app, _ = served
    bodies = [{"messages": p, "max_tokens": 8, "speculative": "amphista"} for p in PROMPTS]
    refs = [engine.generate(p, 8, speculative="amphista").text for p in PROMPTS]
    runs = Runs(engine, monkeypatch)
    runs.gate.clear()
    # the blocker itself speculative, so that the others may share its run
    import threading
    first = len(runs.sizes)
    blocker = threading.Thread(target=call, args=(url, CHAT, {"messages": PROMPTS[0], "max_tokens": 2,
                                                               "speculative": "amphista"}))
    blocker.start()
    from test_serve_batching import wait_for
    wait_for(lambda: len(runs.sizes) > first and app.lock.locked())
    got, threads = {}, []
    for i, body in enumerate(bodies):
        threads.append(threading.Thread(target=lambda i=i, body=body: got.__setitem__(i, call(url, CHAT, body))))
        threads[-1].start()
        wait_for(lambda n=i + 1: app.scheduler.waiting() == n)
    runs.gate.set()
    for t in [blocker, *threads]:
        t.join(60)
    assert runs.sizes[first + 1:] == []
    assert [got[i][1]["choices"][0]["message"]["content"] for i in range(len(bodies))] == refs
    assert all(got[i][1]["amphista"]["speculative"] == "amphista" for i in range(len(bodies)))


def test_an_incompatible_request_waits_and_lets_at_most_max_batch_joiners_pass_it(served, monkeypatch):
    engine, url, app, _ = served
    sampled = {"messages": PROMPTS[1], "max_tokens": 5, "temperature": 0.9, "seed": 3}
    ref_sampled = engine.generate(PROMPTS[1], 5, temperature=0.9, seed=3).text
    greedy = [[PROMPTS[0][0], {"role": "user", "content": f"Count to {i}"}] for i in range(6)]
    refs = [engine.generate(p, 3).text for p in greedy]
    runs = Runs(engine, monkeypatch)
    replies = run_queued(app, runs, url, [sampled] + [{"messages": p, "max_tokens": 3} for p in greedy])
    # the seeded request runs by itself once the blocker's run ends; 4 greedy ones (max_batch) join that run past
    # it, then the run takes no more: the last two share the run after the seeded one's
    assert runs.sizes == [1, 2]
    assert text_of(replies[0], False) == ref_sampled
    assert [text_of(r, False) for r in replies[1:]] == refs


def test_a_joiner_the_engine_refuses_gets_its_own_error(served, monkeypatch):
    engine, url, app, _ = served
    ref = engine.generate(PROMPTS[2], 6).text
    runs = Runs(engine, monkeypatch)
    long = [{"role": "user", "content": "fox " * 60}]
    replies = run_queued(app, runs, url, [{"messages": long, "max_tokens": 60},
                                          {"messages": PROMPTS[2], "max_tokens": 6}])
    # refused as it joined (no room in the cache for it with 60 tokens): back in the queue, alone in a run of its
    # own it gets the 400 any such request gets; the other joined and answered
    err = error_of(replies[0], 400, "longer than the cache")
    assert err["code"] == "context_length_exceeded"
    assert runs.sizes == [1] and text_of(replies[1], False) == ref
