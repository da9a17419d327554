"""The asyncio face of the Python API (amphista_engine/async_api.py; README "Python API"): agenerate / astream /
agenerate_batch / astream_batch on the embedded SmolLM2, each compared with the same sync call. Each test runs its
own event loop (asyncio.run); every wait has a timeout, so a hang fails instead of blocking."""
from __future__ import annotations

import asyncio
import threading

import pytest

from amphista_engine import Engine, InputError
from amphista_engine.kernels.backend import scoped_backend, use_backend
from conftest import needs_smollm2

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

P = "Name three prime numbers."
HAIKU = "Write a haiku about the sea."
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=5)
LONG = dict(max_new_tokens=200, ignore_eos=True)     # a run that is still decoding when a test stops it
WAIT = 30


@pytest.fixture(scope="module")
def eng():
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=256)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, WAIT))


@pytest.fixture
def gate(eng):
    """A forward pre-hook on the model: at its `at`-th forward the decoding thread records itself, sets `entered`
    and waits (up to WAIT) for `released`, which only the event loop sets."""
    state = dict(at=None, calls=0, thread=None, released_in_time=None, backend=None)
    entered, released = threading.Event(), threading.Event()

    def hook(module, args):
        state["calls"] += 1
        if state["calls"] == state["at"]:
            state["thread"], state["backend"] = threading.get_ident(), scoped_backend()
            entered.set()
            state["released_in_time"] = released.wait(WAIT)
    handle = eng.model.register_forward_pre_hook(hook)
    try:
        yield state, entered, released
    finally:
        released.set()
        handle.remove()


@pytest.mark.parametrize("kw", [{}, SAMPLED], ids=["greedy", "seeded"])
def test_agenerate_equals_generate(eng, kw):
    want = eng.generate(P, 16, **kw)
    got = run(eng.agenerate(P, 16, **kw))
    assert got == want and got.token_ids
    assert eng.last_result == want


@pytest.mark.parametrize("kw", [{}, SAMPLED], ids=["greedy", "seeded"])
def test_astream_chunks_equal_stream(eng, kw):
    want = list(eng.stream(HAIKU, max_new_tokens=16, **kw))

    async def chunks():
        return [c async for c in eng.astream(HAIKU, max_new_tokens=16, **kw)]
    got = run(chunks())
    assert got == want and len(got) > 1
    assert "".join(got) == eng.last_result.text == eng.generate(HAIKU, 16, **kw).text


def test_concurrent_calls_take_turns(eng):
    """Sync calls from two threads refuse each other; async calls on one engine wait their turn, in order, and
    each equals its sync result."""
    want = [eng.generate(P, 16), eng.generate(HAIKU, 12, **SAMPLED), eng.generate_batch([P, HAIKU], 8)]

    async def both():
        return await asyncio.gather(eng.agenerate(P, 16), eng.agenerate(HAIKU, 12, **SAMPLED),
                                    eng.agenerate_batch([P, HAIKU], 8))
    assert run(both()) == want


def test_a_waiting_call_cancelled_passes_its_turn_on(eng):
    want = [eng.generate(P, 8), eng.generate(HAIKU, 8)]

    async def three():
        first = asyncio.create_task(eng.agenerate(P, 8))
        second = asyncio.create_task(eng.agenerate(P, **LONG))
        third = asyncio.create_task(eng.agenerate(HAIKU, 8))
        await asyncio.sleep(0)          # all three have asked for the turn: the first has it
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        return [await first, await third]
    assert run(three()) == want


def test_the_loop_runs_while_a_step_decodes(eng, gate):
    """The decode runs in a worker thread: the loop's own tasks run in the middle of a step (the hook holds the
    step until a loop task releases it), and a sync call from the loop's thread meanwhile is refused by name, as
    one from another thread always is."""
    state, entered, released = gate
    want = list(eng.stream(HAIKU, max_new_tokens=16))
    state["calls"], state["at"] = 0, 4      # the prefill, then decode steps: the stream is under way
    refused, ticks = [], [0]

    async def ticker():
        while not entered.is_set():
            ticks[0] += 1
            await asyncio.sleep(0.001)
        with pytest.raises(InputError, match="another thread") as e:
            eng.generate(P, 4)
        refused.append(str(e.value))
        released.set()

    async def main():
        tick = asyncio.create_task(ticker())
        got = [c async for c in eng.astream(HAIKU, max_new_tokens=16)]
        await tick
        return got
    loop_thread = threading.get_ident()
    assert run(main()) == want
    assert state["released_in_time"] and state["thread"] != loop_thread
    assert refused and ticks[0] > 0


def test_the_callers_backend_block_reaches_the_worker(eng, gate):
    """A use_backend block around the await picks the backend as it does around a sync call: the worker runs in
    the caller's context (a new thread starts with none)."""
    state, entered, released = gate
    state["at"] = 1
    released.set()

    async def main():
        with use_backend("torch"):
            return await eng.agenerate(P, 2)
    run(main())
    assert state["backend"] == "torch"


@pytest.mark.parametrize("how", ["cancel", "break", "aclose"])
def test_a_stopped_stream_ends_its_run_and_the_next_call_is_fresh(eng, how):
    async def main():
        first = asyncio.Event()
        chunks = []

        async def consume():
            stream = eng.astream(P, **LONG)
            async for c in stream:
                chunks.append(c)
                first.set()
                if how == "break":
                    break
                if how == "aclose":
                    await stream.aclose()
                    return
            if how == "break":
                del stream          # unreferenced: the loop's finaliser closes it
            if how != "cancel":
                for _ in range(100):
                    await asyncio.sleep(0.01)
                    if eng._decoding is None:
                        return

        task = asyncio.create_task(consume())
        await first.wait()
        if how == "cancel":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await task
        assert eng._decoding is None        # the worker left the engine before the call came back
        assert eng.last_result is None and eng.last_results == []      # a closed run leaves none (sync rules)
        assert 0 < len(chunks) < LONG["max_new_tokens"]
        return await eng.agenerate(P, 16)
    assert run(main()) == eng.generate(P, 16)


def test_a_cancelled_agenerate_stops_its_run(eng, gate):
    state, entered, released = gate
    state["at"] = 3

    async def main():
        task = asyncio.create_task(eng.agenerate(P, **LONG))
        while not entered.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0)
        released.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert eng.last_result is None and eng._decoding is None
        assert state["calls"] == 3      # stopped before the step after the one under way, not after 200
        return await eng.agenerate(HAIKU, 12, **SAMPLED)
    assert run(main()) == eng.generate(HAIKU, 12, **SAMPLED)


@pytest.mark.parametrize("call, args, kw", [
    ("generate", (P,), dict(temperature=-1)),
    ("generate", (P,), dict(temprature=0.5)),
    ("generate", ("",), {}),
    ("generate_batch", (P,), {}),
    ("generate_batch", ([P],), dict(n=0)),
    ("stream", (P,), dict(row_results=True)),
    ("stream_batch", ([P, HAIKU], [4]), {}),
])
def test_argument_errors_come_out_as_the_sync_call_raises_them(eng, call, args, kw):
    with pytest.raises(InputError) as sync_error:
        out = getattr(eng, call)(*args, **kw)
        if call.startswith("stream"):
            next(out)

    async def main():
        if call.startswith("stream"):
            async for _ in getattr(eng, "a" + call)(*args, **kw):
                pass
        else:
            await getattr(eng, "a" + call)(*args, **kw)
    with pytest.raises(InputError) as async_error:
        run(main())
    assert type(async_error.value) is type(sync_error.value) and str(async_error.value) == str(sync_error.value)
    assert run(eng.agenerate(P, 4)) == eng.generate(P, 4)     # and the engine is free for the next call


def test_astream_batch_yields_what_stream_batch_yields(eng):
    prompts, limits = [P, HAIKU, "Hi"], [12, 6, 9]
    want = list(eng.stream_batch(prompts, limits, row_results=True))

    async def main():
        return [item async for item in eng.astream_batch(prompts, limits, row_results=True)]
    got = run(main())
    ended = {row: r for row, r in want if not isinstance(r, str)}
    assert got == want and sorted(ended) == [0, 1, 2]
    assert eng.last_results == [ended[row] for row in range(3)]
