"""QA of the asyncio face's leftovers (amphista_engine/async_api.py): a sync call right after a dropped or open
astream, engine.last_result after a late cancel, and stop_point (a cancel reaching long work before the first
step). A tiny random model; a forward pre-hook holds the worker at a chosen step, so "still decoding" is certain.
Every wait has a timeout (WAIT), so a hang fails."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from amphista_engine.errors import InputError
from conftest import engine_with_random_heads

pytestmark = pytest.mark.usefixtures("one_thread_module")

P = "hello world"
LONG = dict(max_new_tokens=60, ignore_eos=True)
WAIT = 30


@pytest.fixture(scope="module")
def eng(tiny_hf_dir):
    return engine_with_random_heads(tiny_hf_dir, 3, max_seq_len=128)


@pytest.fixture
def gate(eng):
    """At the `at`-th forward of an async worker the worker sets `entered` and waits for `released`; `calls` counts
    the workers' forwards (a sync call's in the test's thread are neither counted nor held)."""
    state = dict(at=None, calls=0)
    entered, released, lock = threading.Event(), threading.Event(), threading.Lock()

    def hook(module, args):
        if threading.current_thread().name != "amphista-async":
            return
        with lock:
            state["calls"] += 1
            hold = state["calls"] == state["at"]
        if hold:
            entered.set()
            released.wait(WAIT)
    handle = eng.model.register_forward_pre_hook(hook)
    try:
        yield state, entered, released
    finally:
        released.set()
        handle.remove()


def join_workers():
    for t in [t for t in threading.enumerate() if t.name == "amphista-async"]:
        t.join(WAIT)
        assert not t.is_alive(), "an async worker is still decoding"


def same(a, b):
    return (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)


def test_a_sync_call_right_after_a_dropped_astream_runs(eng, gate):
    """`async for` broken out of with nothing holding the stream, then a sync generate() in the loop's thread: the
    stream's close was only scheduled on the (now blocked) loop, so its worker decoded on and the sync call was
    refused "decoding in another thread", a thread the caller never made. Now the dropped stream stops its run and
    the sync call waits for the worker's step to end."""
    want = eng.generate(P, max_new_tokens=5)
    state, entered, released = gate

    async def main():
        async for _ in eng.astream(P, **LONG):
            state["calls"], state["at"] = 0, 1      # the worker's next forward, which it reaches decoding ahead
            assert entered.wait(WAIT)
            break
        # the worker is held inside a step: the sync call has to wait for that step's end
        threading.Timer(0.2, released.set).start()
        return eng.generate(P, max_new_tokens=5)
    got = asyncio.run(main())
    join_workers()
    assert same(got, want)
    assert eng.last_result is not None and same(eng.last_result, want)


@pytest.mark.parametrize("kind", ["open stream", "pending task"])
def test_a_sync_call_during_a_live_async_run_is_told_what_to_close(eng, gate, kind):
    """An astream broken out of but still held (it decodes on, as documented), or an agenerate task not yet
    awaited: a sync call in the loop's thread is refused, as before, but its error names the async call and how to
    end it, not "decoding in another thread / use one engine per thread"."""
    state, entered, released = gate

    async def main():
        if kind == "open stream":
            agen = eng.astream(P, **LONG)
            async for _ in agen:
                state["calls"], state["at"] = 0, 1
                break
        else:
            state["calls"], state["at"] = 0, 3
            task = asyncio.create_task(eng.agenerate(P, **LONG))
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, WAIT)
        with pytest.raises(InputError) as e:
            eng.generate(P, max_new_tokens=3)
        released.set()
        if kind == "open stream":
            await agen.aclose()
        else:
            await asyncio.wait_for(task, WAIT)
        return str(e.value), eng.generate(P, max_new_tokens=3)     # the engine free again
    message, after = asyncio.run(main())
    join_workers()
    assert "async call" in message and "aclose()" in message and "await" in message, message
    assert after.finish_reason == "length"


def test_a_late_cancel_leaves_the_finished_result_or_none(eng, gate):
    """Cancelling an agenerate at each forward of its run (its last step too), and after its worker has ended:
    last_result is the whole run's result (the run finished before the stop reached it) or None (stopped before its
    end), never a partial one."""
    want = eng.generate(P, max_new_tokens=6, speculative=None)
    state, entered, released = gate
    state["calls"] = 0
    asyncio.run(eng.agenerate(P, max_new_tokens=6))
    forwards = state["calls"]
    seen = set()

    async def cancelled_at(at):
        entered.clear()
        released.clear()
        state["calls"], state["at"] = 0, at
        task = asyncio.create_task(eng.agenerate(P, max_new_tokens=6))
        loop = asyncio.get_running_loop()
        if at is None:      # after the run: its worker gone, its result not yet read by the task
            await asyncio.sleep(0)
            worker = next(t for t in threading.enumerate() if t.name == "amphista-async")
            worker.join(WAIT)
        else:
            assert await loop.run_in_executor(None, entered.wait, WAIT)
        task.cancel()
        released.set()
        try:
            got = await asyncio.wait_for(task, WAIT)
        except asyncio.CancelledError:
            got = None
        return got, eng.last_result

    for at in list(range(1, forwards + 1)) + [None]:
        got, last = asyncio.run(cancelled_at(at))
        join_workers()
        assert got is None or same(got, want)
        assert last is None or same(last, want), (at, last.text, want.text)
        seen.add(last is None)
    assert True in seen     # some cancel did stop a run before its end


def test_a_check_that_calls_stop_point_ends_with_its_cancelled_call(eng, monkeypatch):
    """speculative="auto"'s first timing runs in the worker's stream_batch before any step, where _until cannot stop
    it: a cancelled call waited for the whole timing. stop_point() is the step boundary such work calls (a stand-in
    check here, one "timed step" per call): the cancel ends it there, its verdict is not kept, the engine is free."""
    from amphista_engine import speculation_check
    from amphista_engine.async_api import stop_point
    entered, steps, most = threading.Event(), [0], 2000

    def timing(engine, tree=None, **kw):
        for _ in range(most):
            stop_point()
            steps[0] += 1
            entered.set()
            time.sleep(0.005)
        return speculation_check.SpeculationCheck(False, "chain-3", "stand-in")
    monkeypatch.setattr(speculation_check, "check_speculation", timing)
    eng._checks.clear()
    stop_point()        # outside a worker: nothing to stop

    async def main():
        task = asyncio.create_task(eng.agenerate(P, max_new_tokens=4, speculative="auto"))
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
    asyncio.run(main())
    join_workers()
    assert 0 < steps[0] < most, steps
    assert not eng._checks          # a verdict never reached is not served to the next call
    assert eng.generate(P, max_new_tokens=3).finish_reason == "length"


def test_a_cancel_during_the_real_auto_timing_stops_at_its_next_step(eng, gate):
    """The real speculative="auto" timing (speculation_check._time_steps) calls stop_point before each timed step:
    a call cancelled while it times ends after the step under way, not after the whole timing, and keeps no
    verdict."""
    state, entered, released = gate
    eng._checks.clear()
    extra = eng.heads.config.extra
    # recorded taus make "auto" time its trees (heads without them speculate untimed)
    eng.heads.config.extra = {"tree_search_mix": {"decoding_tau": {"chain-1": 1.5, "chain-2": 1.8, "chain-3": 2.0}}}
    state["at"] = 6                     # a forward of the timing (the check runs before the call's own prefill)

    async def main():
        task = asyncio.create_task(eng.agenerate(P, max_new_tokens=4, speculative="auto"))
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, WAIT)
        task.cancel()
        for _ in range(10):             # the task takes its cancel (and stops the run) at the loop's next turns
            await asyncio.sleep(0)
        held = state["calls"]
        released.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        return held
    try:
        held = asyncio.run(main())
        join_workers()
    finally:
        eng.heads.config.extra = extra
    assert state["calls"] - held <= 2, (held, state["calls"])     # the step it was in; the timing has dozens
    assert not eng._checks
    assert eng.generate(P, max_new_tokens=3).finish_reason == "length"


def test_anext_of_a_fresh_astream_gets_its_first_chunk(eng):
    """Regression: `await anext(engine.astream(...))` keeps no reference to the stream object, which stopped its
    run as it was freed, before the first step: the await hung for good."""
    want = eng.generate(P, max_new_tokens=5)

    async def main():
        return await asyncio.wait_for(anext(eng.astream(P, max_new_tokens=5)), WAIT)
    first = asyncio.run(main())
    join_workers()
    assert first and want.text.startswith(first)
    assert eng.generate(P, max_new_tokens=5).text == want.text       # the engine is free again
