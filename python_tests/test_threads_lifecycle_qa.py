"""Several engines and threads in one process, and engine lifecycles, as an application embedding the library meets
them (README "Python API": one engine per thread, a second thread's run refused by name, `del engine` gives its
memory back; "Kernels": the cpu backend's own pool, kernels/cpu_threads.py).

Tiny random checkpoints (conftest.write_tiny_hf) with random heads; every answer is compared with the same call
made alone, never with hard-coded tokens. Every wait has a timeout, so a hang fails instead of blocking.
"""
import gc
import os
import threading
import warnings
import weakref

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.errors import InputError
from amphista_engine.generation import PlainDecoder
from amphista_engine.heads import random_heads
from amphista_engine.kernels import cpu_ops
from conftest import write_tiny_hf
from thread_helpers import run_forked
from thread_helpers import start_thread as _in_thread

ext = cpu_ops.load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"CPU extension not built: {cpu_ops.extension_error()}")

PROMPTS = ["The quick brown", "Hello, world", "def f(x):"]
WAIT = 60                   # seconds: far above any run here, far below a test's budget


def _engine(path, quant, heads=None, max_seq_len=256, max_batch_size=3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=max_seq_len, quant=quant,
                                   max_batch_size=max_batch_size)
        if heads:
            e.load_heads(random_heads(heads, e.model, num_heads=3, seed=1))
    e.method = heads
    return e


@pytest.fixture(scope="module")
def other_hf_dir(tmp_path_factory):
    return write_tiny_hf(tmp_path_factory.mktemp("tiny_llama_b"), seed=3)


@pytest.fixture(scope="module")
def engines(tiny_hf_dir, other_hf_dir):
    """4-bit with Amphista heads, 4-bit plain (same model), fp32 with Medusa heads and fp32 plain (another model)."""
    return [_engine(tiny_hf_dir, "q4", "amphista"), _engine(tiny_hf_dir, "q4"),
            _engine(other_hf_dir, "none", "medusa"), _engine(other_hf_dir, "none")]


def _calls(e):
    """Greedy generate / speculative / batch / stream answers of one engine."""
    out = []
    for method in [None] + ([e.method] if e.method else []):
        out += [e.generate(p, max_new_tokens=12, chat=False, speculative=method).token_ids for p in PROMPTS]
        out.append([r.token_ids for r in e.generate_batch(PROMPTS, max_new_tokens=10, chat=False,
                                                          speculative=method)])
        out.append("".join(e.stream(PROMPTS[0], max_new_tokens=8, chat=False, speculative=method)))
    return out


@pytest.mark.parametrize("pair", [(0, 1), (0, 2), (1, 3), (2, 3)], ids=["q4-q4", "q4-fp32", "plain-plain", "fp32"])
def test_two_engines_in_two_threads_answer_as_alone(engines, threads, pair, once):
    torch.set_num_threads(2)
    # each engine is in two pairs: its answers alone made once (on 2 threads), so the second pair's threads also
    # meet answers from before the first pair's threads ran
    alone = {k: once(k, lambda: _calls(engines[k])) for k in pair}

    def runs(k, n):
        torch.get_num_threads()             # its first op: a count set after it is this thread's own
        torch.set_num_threads(n)
        return [_calls(engines[k]) for _ in range(3)], torch.get_num_threads()
    started = [_in_thread(lambda k=k, n=n: runs(k, n)) for k, n in zip(pair, (2, 3))]
    for t, _ in started:
        t.join(WAIT)
    assert not any(t.is_alive() for t, _ in started), "two engines' threads deadlocked"
    for (t, out), k, n in zip(started, pair, (2, 3)):
        assert not isinstance(out[0], BaseException), out[0]
        assert out[0] == ([alone[k]] * 3, n)
    assert torch.get_num_threads() == 2 and ext.set_pool("omp") == "omp"


def test_second_thread_refused_then_abandoned_stream_frees_the_engine(engines, threads):
    e = engines[0]
    torch.set_num_threads(2)
    ref = e.generate(PROMPTS[0], max_new_tokens=12, chat=False).token_ids
    s = e.stream(PROMPTS[0], max_new_tokens=12, chat=False, speculative="amphista")
    first = next(s)
    t, out = _in_thread(lambda: e.generate(PROMPTS[1], max_new_tokens=4, chat=False))
    t.join(WAIT)
    assert isinstance(out[0], InputError) and "another thread" in str(out[0])
    assert first + "".join(s) == e.last_result.text and e.last_result.token_ids == ref

    def abandon():                          # a thread leaves a stream half read; the thread ends
        s = e.stream(PROMPTS[0], max_new_tokens=12, chat=False)
        return next(s)
    t, out = _in_thread(abandon)
    t.join(WAIT)
    assert isinstance(out[0], str)
    t, out = _in_thread(lambda: e.generate(PROMPTS[0], max_new_tokens=12, chat=False).token_ids)
    t.join(WAIT)
    assert out == [ref]


class _Holder:
    """An application object in a reference cycle: what it holds is freed only by the garbage collector."""


def test_gc_closing_an_abandoned_stream_inside_a_call_does_not_deadlock(engines, threads):
    """The collector runs at whichever allocation crosses its threshold, also one inside the engine's own locked
    block, and closing the stream there takes that lock again: with a plain Lock the thread hung for good."""
    e = engines[1]
    ref = e.generate(PROMPTS[1], max_new_tokens=6, chat=False).token_ids

    def abandon():
        h = _Holder()
        h.me, h.stream = h, e.stream(PROMPTS[0], max_new_tokens=12, chat=False)
        next(h.stream)
    abandon()
    lock = e._decoding_lock

    class CollectInside:                    # an allocation in the block triggering the collector, made certain
        def __enter__(self):
            lock.__enter__()
            gc.collect()

        def __exit__(self, *exc):
            return lock.__exit__(*exc)
    e._decoding_lock = CollectInside()
    try:
        t, out = _in_thread(lambda: e.generate(PROMPTS[1], max_new_tokens=6, chat=False).token_ids)
        t.join(WAIT)
        assert not t.is_alive(), "the collector closing a stream inside the engine's lock deadlocked"
    finally:
        e._decoding_lock = lock
    assert out == [ref]


def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_engines_made_used_and_dropped_in_a_loop(tiny_hf_dir, threads, monkeypatch):
    torch.set_num_threads(2)
    real, calls = PlainDecoder.step_device, []

    def flaky(self, kv_len):
        calls.append(1)
        if len(calls) % 5 == 3:
            raise RuntimeError("boom")      # an error in the middle of a run
        return real(self, kv_len)
    refs, rss, tasks, py_threads = [], [], [], []
    for i in range(10):                     # flat from the third round: five rounds after rss[4] show a leak
        e = _engine(tiny_hf_dir, "q4" if i % 2 else "none", max_seq_len=128, max_batch_size=2)
        heads = random_heads("amphista", e.model, num_heads=3, seed=1)
        for _ in range(2):
            e.load_heads(heads)
            e.generate(PROMPTS[0], max_new_tokens=6, chat=False, speculative="amphista")
            e.load_heads(None)
        e.load_heads(heads)
        e.generate_batch(PROMPTS[:2], max_new_tokens=6, chat=False, speculative="amphista")
        s = e.stream(PROMPTS[1], max_new_tokens=8, chat=False)
        next(s)
        if i % 2:
            s.close()                       # closed early; else dropped half read
        monkeypatch.setattr(PlainDecoder, "step_device", flaky)
        with pytest.raises(RuntimeError, match="boom"):
            e.generate(PROMPTS[2], max_new_tokens=12, chat=False)
        monkeypatch.setattr(PlainDecoder, "step_device", real)
        refs.append(weakref.ref(e))
        del e, heads, s
        gc.collect()
        rss.append(_rss_mb())
        tasks.append(len(os.listdir("/proc/self/task")))
        py_threads.append(threading.active_count())
    assert all(r() is None for r in refs), "an engine outlived its last reference"
    assert py_threads[-1] == py_threads[1] and tasks[-1] <= tasks[1], (py_threads, tasks)
    # the first rounds warm caches and allocators up (flat from the third on); after that memory plateaus
    assert rss[-1] - rss[4] < 40, rss


def _child(engine, q, prompts):
    try:
        q.put(([r.token_ids for r in engine.generate_batch(prompts, max_new_tokens=8, chat=False)],
               len(engine.prompt_logprobs(prompts[0])), torch.get_num_threads()))
    except BaseException as ex:             # noqa: BLE001 -- the parent reports it
        q.put(ex)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_float_engine_in_a_forked_child(tiny_hf_dir, threads):
    """libgomp's parallel regions hang in a child forked after the parent ran some on two threads: a float engine
    there (its steps, a batch's new KV cache, prompt scores) must run anyway, and leave the child's count alone."""
    torch.set_num_threads(2)
    e = _engine(tiny_hf_dir, "none", max_seq_len=512, max_batch_size=1)
    e.generate(PROMPTS[0], max_new_tokens=4, chat=False)
    torch.randn(1 << 20).exp_()             # libgomp's team of two now exists in this process
    prompts = PROMPTS + ["Speculative decoding"]     # 4 rows: a cache the child allocates itself
    got = run_forked(_child, e, prompts, WAIT, "a float engine hung in a forked child")
    assert not isinstance(got, BaseException), got
    ref = [r.token_ids for r in e.generate_batch(prompts, max_new_tokens=8, chat=False)]
    assert got == (ref, len(e.prompt_logprobs(prompts[0])), 2)
