"""The engine's asyncio face (as vLLM's AsyncLLM gives one): `await engine.agenerate(...)`, `async for chunk in
engine.astream(...)`, `await engine.agenerate_batch(...)`, `async for item in engine.astream_batch(...)`, for an
application that embeds the engine in an event loop (FastAPI, aiohttp) without `amphista serve`.

Each call runs the whole sync call (its checks, its prefill, every step) in one worker thread of its own, since an
engine's run belongs to the thread that started it (Engine._one_run), and hands its items to the loop with
call_soon_threadsafe: the loop never waits on a step. Async calls on one engine take turns, first come first served
(_Turns), where sync calls from two threads refuse each other; a sync call from another thread during an async run
is still refused. A turn ends when the worker's run ends, not when the caller has read every item: a stream left
open (a broken-out `async for` whose generator is still referenced) decodes on to its end into its queue instead of
holding the engine. Cancelling the awaiting task (a second cancel too), closing the async generator, dropping it
unclosed (a `break` out of `async for x in engine.astream(...)`: _Stream) or closing the loop stops the run before its
next step (the sync stream closed in its own thread: a closed run leaves last_result None; one that finished before
the stop reached it keeps its whole result there, though its caller was cancelled); the call waits for the worker.
A sync call (of any thread) finding an async run stopped that way waits for its worker to end its step
(wait_for_stopped_run); one finding an async run still going is refused, its error naming the async call and how to
close it (busy_reason). speculative="auto"'s first timing (speculation_check.py; seconds on a CPU, once per machine
and setup) stops at its next timed step too (stop_point), keeping no verdict.
"""
from __future__ import annotations

import asyncio
import collections
import collections.abc
import contextvars
import inspect
import os
import threading
import weakref
from typing import AsyncIterator

import torch

_ITEM, _END, _ERROR = "item", "end", "error"


class _Stopped(BaseException):
    """Ends a worker's sync call at a step boundary once its caller is gone. A BaseException: no `except Exception`
    of the sync code on the way out may take it for an error of the run."""


# In a worker's context (_Run._work): its run's stopped(), for stop_point
_STOPPED: contextvars.ContextVar = contextvars.ContextVar("amphista_async_stopped", default=None)


def stop_point():
    """Raises _Stopped in an async call's worker once its caller is gone (cancelled, closed, dropped), elsewhere (a
    sync call, a server's thread) nothing: a step boundary for long work outside stream_batch's steps, which _until
    cannot reach: speculative="auto"'s timing (speculation_check._time_steps) calls it before each timed step."""
    stopped = _STOPPED.get()
    if stopped is not None and stopped():
        raise _Stopped


def _until(steps, stopped):
    """stream_batch's steps, closed (in this thread) before the first step asked for once `stopped()`."""
    try:
        while True:
            if stopped():
                raise _Stopped
            try:
                item = next(steps)
            except StopIteration as end:
                return end.value        # generate() and generate_batch() read their results from it (_drain)
            yield item
    finally:
        steps.close()


class _StoppableEngine:
    """The engine as a worker's sync call sees it: every attribute the engine's own, but stream_batch's steps stop
    on request (_until). The sync methods run on it unchanged (Engine.generate(view, ...)), so the async ones take
    the same arguments, raise the same errors and give the same results; generate() and generate_batch() run
    stream_batch to its end in one call, with no other place to stop them between steps."""

    def __init__(self, engine, stopped):
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_stopped", stopped)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):
        setattr(self._engine, name, value)

    def stream_batch(self, *args, **kwargs):
        # the call's own checks raise here, as the sync call raises them, before any step
        return _until(self._engine.stream_batch(*args, **kwargs), self._stopped)


class _Turns:
    """One engine's async calls, one at a time, first come first served. Not an asyncio.Lock: that binds to the
    first event loop that waits on it, and an engine outlives loops (each asyncio.run makes its own) and may serve
    loops of several threads. A turn ends in the worker's thread (release), and is handed to the next waiter's
    loop."""

    def __init__(self):
        self._lock = threading.Lock()
        self._busy = False
        self._waiting: collections.deque = collections.deque()    # (loop, future) of each waiting call
        self.run: "_Run | None" = None      # the call holding the turn, once its worker started (sync calls ask)

    async def acquire(self):
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._busy:
                self._busy = True
                return
            waiter = (loop, loop.create_future())
            self._waiting.append(waiter)
        try:
            await waiter[1]
        except BaseException:
            # Cancelled, or GeneratorExit: the coroutine destroyed with a loop closed under it, where the turn may
            # have been handed to it already (a grant queued on a loop that never ran it again): passed on, not lost
            with self._lock:
                handed = waiter not in self._waiting
                if not handed:
                    self._waiting.remove(waiter)
            if handed:      # the turn came as the call was cancelled: the next waiter's now
                self.release()
            raise

    def release(self):
        with self._lock:
            self.run = None
            while self._waiting:
                loop, future = self._waiting.popleft()
                try:
                    loop.call_soon_threadsafe(_grant, future)
                    return
                except RuntimeError:        # its loop is closed: nobody waits there any more
                    continue
            self._busy = False


def _grant(future: asyncio.Future):
    if not future.done():
        future.set_result(None)


_turns_lock = threading.Lock()
_TURNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _turns(engine) -> _Turns:
    with _turns_lock:
        turns = _TURNS.get(engine)
        if turns is None:
            turns = _TURNS[engine] = _Turns()
        return turns


def _turns_end_in_child():
    """A forked child has no worker thread and none of the other threads' loops: a turn taken at the fork was never
    released there (the child's first async call waited for good), nor a lock another thread held. The engine's own
    hook (engine._runs_of_other_threads_end_in_child) frees the engine itself."""
    global _turns_lock, _TURNS
    _turns_lock = threading.Lock()
    _TURNS = weakref.WeakKeyDictionary()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_turns_end_in_child)


class _Run:
    """One async call: its sync call in a worker thread, whose items, outcome and end reach the loop."""

    def __init__(self, engine, method: str, args, kwargs, streams: bool, stop: threading.Event | None = None):
        self.loop = asyncio.get_running_loop()
        self.turns = _turns(engine)
        self.items: asyncio.Queue = asyncio.Queue()
        self.done = self.loop.create_future()
        self.stop = stop or threading.Event()     # a stream's own (_Stream): set as its object is dropped
        self.worker: threading.Thread | None = None
        view = _StoppableEngine(engine, self.stopped)
        if method != "stream_batch":
            # Engine's own code on the view: its calls to stream_batch get the stoppable steps
            from .engine import Engine
            self._call = (getattr(Engine, method).__get__(view), args, kwargs, streams)
        else:
            self._call = (view.stream_batch, args, kwargs, streams)
        # The caller's context (a use_backend block around the call) and torch thread count, as a sync call made
        # here would run with: a new thread starts with neither
        self._context = contextvars.copy_context()
        self._threads = torch.get_num_threads()

    def stopped(self) -> bool:
        # A closed loop stops the run too: an agenerate posts nothing until its end (no failed _post to notice it),
        # so a loop closed under its task (run_until_complete, then close) left the worker decoding to its end
        return self.stop.is_set() or self.loop.is_closed()

    async def start(self) -> "_Run":
        await self.turns.acquire()
        try:
            self.worker = threading.Thread(target=self._context.run, args=(self._work,), name="amphista-async")
            self.turns.run = self
            self.worker.start()
        except BaseException:
            self.turns.release()
            raise
        return self

    def _post(self, kind, value=None):
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (kind, value))
        except RuntimeError:        # the loop is closed: nobody reads this run any more, so it stops
            self.stop.set()

    def _work(self):
        call, args, kwargs, streams = self._call
        out = None
        _STOPPED.set(self.stopped)      # this thread's own copy of the caller's context
        try:
            if torch.get_num_threads() != self._threads:
                torch.set_num_threads(self._threads)
            out = call(*args, **kwargs)
            if streams:
                for item in out:
                    self._post(_ITEM, item)
                out = None
            self._post(_END, out)
        except _Stopped:
            self._post(_END)        # a reader still waiting (none, as a rule) ends rather than hanging
        except BaseException as e:      # AmphistaError and the rest reach the caller unchanged
            self._post(_ERROR, e)
        finally:
            if streams and hasattr(out, "close"):
                out.close()         # one left unfinished by an error between items: closed in its run's thread
            self.turns.release()
            try:
                self.loop.call_soon_threadsafe(_grant, self.done)
            except RuntimeError:
                pass

    async def next(self):
        kind, value = await self.items.get()
        if kind == _ERROR:
            raise value
        return kind, value

    async def finish(self):
        """Stops the run before its next step (where it still decodes) and waits until its worker has left the
        engine: the next call, sync ones of this thread too, finds it free."""
        self.stop.set()
        if self.loop.is_closed():
            # the call destroyed unfinished with its loop closed under it: it may not await any more ("coroutine
            # ignored GeneratorExit"); its worker stops on its own (stopped())
            return
        cancelled = None
        while not self.done.done():
            try:
                await asyncio.shield(self.done)
            except asyncio.CancelledError as e:
                # A second cancel (a timeout around a cancelled task, TaskGroup's siblings) returned here while the
                # worker still decoded: the caller's next sync call was refused. It stops at its next step boundary.
                cancelled = e
        if cancelled is not None:
            raise cancelled


async def result(engine, method: str, args, kwargs):
    """await engine.<method>(*args, **kwargs), a sync call that returns ("generate", "generate_batch")."""
    run = await _Run(engine, method, args, kwargs, streams=False).start()
    try:
        return (await run.next())[1]
    finally:
        await run.finish()


def items(engine, method: str, args, kwargs) -> AsyncIterator:
    """The items of engine.<method>(*args, **kwargs), a sync stream ("stream", "stream_batch"). Lazy as the sync
    stream is: the turn is taken and the call's arguments checked at the first step of `async for`."""
    stop = threading.Event()
    return _Stream(_items(engine, method, args, kwargs, stop), stop)


class _Stream(collections.abc.AsyncGenerator):
    """An astream / astream_batch object: its async generator's, but dropped unclosed (`break` out of `async for x in
    engine.astream(...)`, nothing else holding it) it stops its run at once. The generator's own close is only
    scheduled on the loop then (asyncio's finalizer hook), which a sync call made right after the loop keeps
    blocked: the run decoded on to its end and the sync call was refused. One still referenced is left open."""

    def __init__(self, agen, stop: threading.Event):
        self._agen, self._stop = agen, stop

    def __aiter__(self):
        return self

    async def __anext__(self):
        # a coroutine, not the generator's own awaitable: it holds this stream until the step it awaits is in, so
        # `await anext(engine.astream(...))`, which keeps no other reference, gets its item (the stream, freed
        # at once, stopped the run before its first step and the await hung)
        return await self._agen.__anext__()

    async def asend(self, value):
        return await self._agen.asend(value)

    def athrow(self, *exc):
        return self._agen.athrow(*exc)

    def aclose(self):
        return self._agen.aclose()

    def __getattr__(self, name):        # ag_running, ag_frame...: the generator's
        if name in ("_agen", "_stop"):
            raise AttributeError(name)
        return getattr(self._agen, name)

    def __del__(self):
        self._stop.set()


async def _items(engine, method: str, args, kwargs, stop: threading.Event) -> AsyncIterator:
    run = await _Run(engine, method, args, kwargs, streams=True, stop=stop).start()
    try:
        while True:
            kind, value = await run.next()
            if kind == _END:
                return
            yield value
    finally:
        await run.finish()


# How long a sync call waits for a stopped async run to leave the engine: one step, or a prefill, normally; past
# it (a worker held in the caller's own admit(), or in speculative="auto"'s timing) the call is refused as before.
STOPPING_WAIT_S = 60.0


def wait_for_stopped_run(engine, me: int):
    """Before a sync run of thread `me` (Engine._one_run): an async run of this engine that its caller has stopped
    (a dropped or closed stream, a cancelled call, a closed loop) ends at its next step boundary; the sync call waits
    for that rather than being refused ("decoding in another thread") while the worker finishes its step."""
    with _turns_lock:
        turns = _TURNS.get(engine)
    run = None if turns is None else turns.run
    if run is not None and run.worker is not None and run.worker.ident not in (None, me) and run.stopped():
        run.worker.join(STOPPING_WAIT_S)


def busy_reason(engine, owner: int) -> str | None:
    """Engine._one_run's refusal where the run in the way is an async call's (owner: its thread), else None."""
    with _turns_lock:
        turns = _TURNS.get(engine)
    run = None if turns is None else turns.run
    if run is None or run.worker is None or run.worker.ident != owner:
        return None
    return ("this engine is decoding in another thread, an async call's worker (agenerate, astream, ...), and runs "
            "cannot overlap: await that call before a sync one, or close a stream you broke out of and still hold "
            "(`await agen.aclose()`, or `async with contextlib.aclosing(engine.astream(...)) as agen`): a stream "
            "left open decodes on to its end; or use the async methods throughout")


def mirror_signatures(cls):
    """help() and editors show each sync method's options on its async twin, which forwards them as given."""
    for name, returns in (("generate", "GenerationResult"), ("stream", "AsyncIterator[str]"),
                          ("generate_batch", "list[GenerationResult]"), ("stream_batch", "AsyncIterator[tuple]")):
        getattr(cls, "a" + name).__signature__ = inspect.signature(getattr(cls, name)).replace(
            return_annotation=returns)
