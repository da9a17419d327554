"""QA of the asyncio face (amphista_engine/async_api.py): event loops closed under a call, repeated cancels, loops of
two threads sharing one engine. Waits are on events or thread joins, each with a timeout, so a hang fails."""
from __future__ import annotations

import asyncio
import gc
import sys
import threading

import pytest

from amphista_engine import Engine
from amphista_engine.async_api import _turns
from conftest import needs_smollm2

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

P = "Name three prime numbers."
HAIKU = "Write a haiku about the sea."
LONG = dict(max_new_tokens=200, ignore_eos=True)
WAIT = 30


@pytest.fixture(scope="module")
def eng():
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=256)


@pytest.fixture
def gate(eng):
    """At the model's `at`-th forward the decoding thread sets `entered` and waits for `released`; `calls` counts
    every forward, `most` the most that ran at once."""
    state = dict(at=None, calls=0, now=0, most=0)
    entered, released, lock = threading.Event(), threading.Event(), threading.Lock()

    def hook(module, args):
        with lock:
            state["calls"] += 1
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            hold = state["calls"] == state["at"]
        if hold:
            entered.set()
            released.wait(WAIT)
        with lock:
            state["now"] -= 1
    handle = eng.model.register_forward_pre_hook(hook)
    try:
        yield state, entered, released
    finally:
        released.set()
        handle.remove()


def workers():
    return [t for t in threading.enumerate() if t.name == "amphista-async"]


def join_workers():
    for t in workers():
        t.join(WAIT)
        assert not t.is_alive()


@pytest.fixture
def unraisable():
    seen, hook = [], sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        yield seen
    finally:
        sys.unraisablehook = hook


def test_a_loop_closed_under_agenerate_stops_its_worker(eng, gate, unraisable):
    """run_until_complete, then close, with an agenerate task still running: its worker decoded all 200 tokens
    (it posts nothing before its end, so no failed post told it), and the destroyed coroutine awaited in its
    finally ("coroutine ignored GeneratorExit")."""
    state, entered, released = gate
    state["at"] = 3
    loop = asyncio.new_event_loop()

    async def start():
        task = asyncio.ensure_future(eng.agenerate(P, **LONG))
        assert await asyncio.to_thread(entered.wait, WAIT)
        return task
    task = loop.run_until_complete(start())
    loop.close()
    released.set()
    join_workers()
    assert state["calls"] == 3          # stopped before the step after the one under way
    assert eng._decoding is None and not _turns(eng)._busy
    del task
    gc.collect()
    assert not [u for u in unraisable if "GeneratorExit" in str(u.exc_value)]
    assert asyncio.run(asyncio.wait_for(eng.agenerate(P, 4), WAIT)) == eng.generate(P, 4)


def test_a_turn_handed_to_a_loop_that_never_runs_again_is_passed_on(eng, gate, unraisable):
    """A call waiting for its turn on a loop stopped (run_until_complete returned) and then closed: the turn queued
    to it was never taken, and every later async call on the engine waited for good."""
    state, entered, released = gate
    state["at"] = 1
    loop = asyncio.new_event_loop()

    async def start():
        first = asyncio.ensure_future(eng.agenerate(P, 4))
        second = asyncio.ensure_future(eng.agenerate(HAIKU, 4))
        assert await asyncio.to_thread(entered.wait, WAIT)
        return first, second
    tasks = loop.run_until_complete(start())
    released.set()
    join_workers()          # the first run ended: its turn went to the second call's loop, which is not running
    loop.close()
    del tasks
    gc.collect()            # the closed loop's tasks are destroyed (asyncio.Queue says "Event loop is closed")
    assert not _turns(eng)._busy
    assert asyncio.run(asyncio.wait_for(eng.agenerate(P, 4), 10)) == eng.generate(P, 4)


@pytest.mark.parametrize("call", ["agenerate", "astream"])
def test_a_second_cancel_still_waits_for_the_worker(eng, gate, call):
    """A task cancelled twice (a timeout around a task being cancelled, TaskGroup siblings) came back while its
    worker still held the engine: a sync call right after it was refused ("decoding in another thread")."""
    state, entered, released = gate
    state["at"] = 3

    async def consume():
        if call == "agenerate":
            await eng.agenerate(P, **LONG)
        else:
            async for _ in eng.astream(P, **LONG):
                pass

    async def main():
        task = asyncio.create_task(consume())
        assert await asyncio.to_thread(entered.wait, WAIT)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        for _ in range(20):             # loop iterations only: the worker is held in its step
            await asyncio.sleep(0)
        assert not task.done()
        released.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert eng._decoding is None and state["calls"] == 3       # stopped after the held step
        return eng.generate(P, 4)
    assert asyncio.run(asyncio.wait_for(main(), WAIT)) == eng.generate(P, 4)


def test_loops_of_two_threads_take_turns(eng, gate):
    """Already so: async calls from loops in three threads at once wait their turn (never two forwards at once,
    never refused) and each equals its sync result; no worker thread is left behind."""
    state, _, _ = gate
    want = [eng.generate(P, 8), eng.generate(HAIKU, 6)]
    before = threading.active_count()
    out, errors = {}, []

    def thread(i):
        async def main():
            return await asyncio.gather(*[eng.agenerate(P, 8) if j % 2 == 0 else eng.agenerate(HAIKU, 6)
                                          for j in range(4)])
        try:
            out[i] = asyncio.run(asyncio.wait_for(main(), WAIT))
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=thread, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT)
    assert not errors and [out[i] for i in range(3)] == [want * 2] * 3
    assert state["most"] == 1
    join_workers()
    assert threading.active_count() == before
