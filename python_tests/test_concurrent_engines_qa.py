"""Several engines in one process, each driven by its own thread (or asyncio task) at once: a seeded differential
check that each answers exactly as alone (README "Python API": one engine per thread, a second thread's run on a
decoding engine refused by name, engines usable in a forked child). Tiny random checkpoints on the torch and cpu
backends, fp32 / bf16 / 4-bit, plain and Amphista / Medusa speculation, trees, batches, streams, logprobs,
penalties and response_format. Every wait has a timeout, so a hang fails instead of blocking."""
import asyncio
import random
import threading
import warnings

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.errors import AmphistaError
from amphista_engine.heads import random_heads
from amphista_engine.kernels import cpu_ops
from conftest import write_tiny_hf
from thread_helpers import run_forked, run_forked_holding, start_thread

ext = cpu_ops.load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"CPU extension not built: {cpu_ops.extension_error()}")

WAIT = 120                  # seconds: far above any case here
PROMPTS = ["The quick brown", "Hello, world", "def f(x):", "Once upon a time there was", "1 2 3 4"]
FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}


def _engine(path, backend, dtype="fp32", heads=None, quant="none"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = Engine.from_pretrained(str(path), device="cpu", dtype=dtype, max_seq_len=256, quant=quant,
                                   max_batch_size=3, backend=backend)
        if heads:
            e.load_heads(random_heads(heads, e.model, num_heads=3, seed=1))
    e.method = heads
    return e


@pytest.fixture(scope="module")
def engines(tiny_hf_dir, tmp_path_factory):
    """The same model twice (cpu backend with Amphista heads, torch backend with Medusa heads), another model in bf16
    and 4-bit (the process' backend: the extension's pool)."""
    other = write_tiny_hf(tmp_path_factory.mktemp("tiny_llama_c"), seed=3)
    return [_engine(tiny_hf_dir, "cpu", heads="amphista"), _engine(tiny_hf_dir, "torch", heads="medusa"),
            _engine(other, "cpu", dtype="bf16"), _engine(other, None, quant="q4", heads="amphista")]


def _request(rng, method):
    kw = dict(max_new_tokens=rng.randint(3, 10), chat=rng.random() < 0.3)
    if method and rng.random() < 0.6:
        kw["speculative"] = method
        if rng.random() < 0.4:
            kw["tree"] = rng.choice(["chain-3", "tree-16", "dynamic-8"])
    if rng.random() < 0.3:
        kw.update(logprobs=True, top_logprobs=rng.choice([0, 2]))
    if rng.random() < 0.3:
        kw["repetition_penalty"] = 1.2
    if rng.random() < 0.2:
        kw.update(presence_penalty=0.5, frequency_penalty=0.4)
    if rng.random() < 0.15:
        kw["response_format"] = FORMAT
    kind = rng.choice(["generate", "stream", "batch"])
    return kind, rng.sample(PROMPTS, 2) if kind == "batch" else rng.choice(PROMPTS), kw


def _key(r):
    return r.text, r.token_ids, r.finish_reason, r.token_logprobs, r.top_logprobs


def _answer(e, request):
    kind, prompt, kw = request
    try:
        if kind == "generate":
            return _key(e.generate(prompt, **kw))
        if kind == "batch":
            return [_key(r) for r in e.generate_batch(prompt, **kw)]
        return "".join(e.stream(prompt, **kw)), _key(e.last_result)
    except AmphistaError as err:
        return type(err).__name__, str(err)


def _joined(started):
    for t, _ in started:
        t.join(WAIT)
    assert not any(t.is_alive() for t, _ in started), "engines' threads deadlocked"
    for _, out in started:
        assert not isinstance(out[0], BaseException), out[0]
    return [out[0] for _, out in started]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_engines_in_threads_answer_as_alone(engines, threads, seed):
    rng = random.Random(seed)
    torch.set_num_threads(2)        # the 4-bit engine's steps then run on the extension's pool
    picked = rng.sample(range(len(engines)), rng.randint(2, len(engines)))
    requests = {k: [_request(rng, engines[k].method) for _ in range(3)] for k in picked}
    alone = {k: [_answer(engines[k], r) for r in requests[k]] for k in picked}

    def runs(k, n):
        torch.get_num_threads()     # its first op: a count set after it is this thread's own
        torch.set_num_threads(n)
        return [_answer(engines[k], r) for r in requests[k]]
    got = _joined([start_thread(lambda k=k: runs(k, rng.choice([1, 2]))) for k in picked])
    assert got == [alone[k] for k in picked]
    assert torch.get_num_threads() == 2 and ext.set_pool("omp") == "omp"


def test_async_calls_on_several_engines_at_once(engines, threads):
    rng = random.Random(5)
    requests = [[_request(rng, e.method) for _ in range(3)] for e in engines]
    alone = [[_answer(e, r) for r in rs] for e, rs in zip(engines, requests)]

    async def answer(e, request):
        kind, prompt, kw = request
        try:
            if kind == "generate":
                return _key(await e.agenerate(prompt, **kw))
            if kind == "batch":
                return [_key(r) for r in await e.agenerate_batch(prompt, **kw)]
            # last_result is the engine's, not the call's: the engine's next queued run may clear it first
            return "".join([c async for c in e.astream(prompt, **kw)]), "stream"
        except AmphistaError as err:
            return type(err).__name__, str(err)

    async def each(e, rs):
        return [await answer(e, r) for r in rs]

    async def main():       # engine 0 twice: its calls wait their turn
        return await asyncio.wait_for(asyncio.gather(*map(each, engines, requests), each(engines[0], requests[0])),
                                      WAIT)
    got = asyncio.run(main())
    alone.append(alone[0])
    for rs, want, have in zip([*requests, requests[0]], alone, got):
        assert [(w[0], "stream") if r[0] == "stream" and isinstance(w[1], tuple) else w
                for r, w in zip(rs, want)] == have


def test_one_engine_handed_between_threads_and_refused_while_busy(engines, threads):
    e = engines[0]
    rng = random.Random(7)
    requests = [_request(rng, e.method) for _ in range(4)]
    alone = [_answer(e, r) for r in requests]
    got = [_joined([start_thread(lambda r=r: _answer(e, r))])[0] for r in requests]      # one thread after another
    assert got == alone
    want = e.generate(PROMPTS[0], max_new_tokens=8, chat=False, speculative="amphista")
    s = e.stream(PROMPTS[0], max_new_tokens=8, chat=False, speculative="amphista")
    text = next(s)
    (refused,) = _joined([start_thread(lambda: _answer(e, ("batch", PROMPTS[:2], {"max_new_tokens": 3})))])
    assert refused[0] == "InputError" and "another thread" in refused[1]
    assert text + "".join(s) == want.text and e.last_result == want


def _child(engine, q, prompt):
    try:
        q.put(engine.generate(prompt, max_new_tokens=8, chat=False).token_ids)
    except AmphistaError as err:
        q.put(repr(err))


def test_forked_child_uses_an_engine_another_thread_was_decoding_on(engines, threads):
    """Regression: a child forked while another thread's stream was open refused every call ("decoding in another
    thread": a thread that does not exist there)."""
    e = engines[3]
    want = e.generate(PROMPTS[1], max_new_tokens=8, chat=False).token_ids
    parked, release = threading.Event(), threading.Event()

    def open_stream():
        s = e.stream(PROMPTS[0], max_new_tokens=8, chat=False)
        next(s)
        parked.set()
        release.wait(WAIT)
        return "".join(s)
    t, out = start_thread(open_stream)
    assert parked.wait(WAIT)
    try:
        got = run_forked(_child, e, PROMPTS[1], WAIT, "the child's call hung")
    finally:
        release.set()
        t.join(WAIT)
    assert got == want
    assert not isinstance(out[0], BaseException), out[0]


def test_forked_child_not_stuck_on_a_decoding_lock_held_at_the_fork(engines, threads):
    """Regression: another thread held the engine's decoding lock at the fork (it does between a run's steps for a
    moment); the child's first call waited for it forever."""
    e = engines[2]
    want = e.generate(PROMPTS[1], max_new_tokens=8, chat=False).token_ids
    got = run_forked_holding(e._decoding_lock, _child, e, PROMPTS[1], 30,
                             "the child's call hung on the parent thread's lock")
    assert got == want


def test_a_batch_refused_while_another_thread_decodes_leaves_the_cache_alone(tiny_hf_dir, threads):
    """Regression: a second thread's batch, larger than the cache's rows, grew the cache (_cache_for) before its run
    was refused as busy: both caches alive at once (the memory check_fits guards) and the decoding thread's chat
    prefix kept in the old one, so its next turn prefilled everything again."""
    e = _engine(tiny_hf_dir, "cpu")
    cache = e._cache_for(1)
    assert cache.batch < 4
    s = e.stream(PROMPTS[3], max_new_tokens=6, chat=False, reuse_prefix=True)
    text = next(s)
    (refused,) = _joined([start_thread(lambda: _answer(e, ("batch", PROMPTS[:4], {"max_new_tokens": 3})))])
    assert refused[0] == "InputError" and "another thread" in refused[1]
    assert e._cache is cache
    text += "".join(s)
    first = e.last_result
    again = e.generate(first.prompt_token_ids + first.token_ids, max_new_tokens=4, chat=False, reuse_prefix=True)
    assert again.stats.extra.get("prompt_tokens_reused", 0) > 0
