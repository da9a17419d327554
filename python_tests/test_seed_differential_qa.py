"""A seeded differential sweep of sampling reproducibility (`seed`) on the real 4-bit SmolLM2 with the shipped heads.
Each case draws a prompt (chat or raw), sampling options (temperature 0.3-1.5, top_k / top_p / min_p, penalties,
logit_bias, min_tokens, logprobs, stop strings cut from the answer) and a seed (edge values of [0, 2**64), random
64-bit ones, numpy integers), then checks what README promises of a seed: the same tokens, text and logprobs from
Engine.generate run again (after an unseeded run and a seeded batch in between), stream, generate_batch of that one
prompt, agenerate and astream; on a CPU one prompt's rejection sampling (Amphista, dynamic-4 / dynamic-8 / chain-3)
gives plain sampling's tokens; a shorter max_new_tokens gives a prefix; n=2 and a two-prompt batch repeat; and a
seeded run leaves torch's, Python's and numpy's global generators alone. Over `amphista serve`: a seeded chat or text
completion is Engine.generate's answer, streamed or not, and stays so when sent beside unseeded requests of the same
options (it never shares their run)."""
from __future__ import annotations

import asyncio
import json
import random
import threading

import numpy as np
import pytest
import torch

from conftest import needs_smollm2, smollm2_with_shipped_heads

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

TEXTS = ["The quick brown fox", "def fib(n):", "Write a haiku about the sea.", "List three colors.",
         "Once upon a time, in a land far away, there lived a", "What is the capital of France?",
         "The history of the city goes back many centuries. " * 8 + "Summarize:"]
EDGE_SEEDS = [0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
SPECS = [{}, dict(speculative="amphista", tree="dynamic-4"), dict(speculative="amphista", tree="dynamic-8"),
         dict(speculative="amphista", tree="chain-3")]


@pytest.fixture(scope="module")
def eng():
    return smollm2_with_shipped_heads(max_seq_len=1024)


def draw_seed(rng: random.Random):
    seed = rng.choice(EDGE_SEEDS) if rng.random() < 0.5 else rng.getrandbits(64)
    if rng.random() < 0.3:
        return np.uint64(seed) if seed >= 2**63 or rng.random() < 0.5 else np.int64(seed)
    return seed


def draw_options(rng: random.Random) -> dict:
    opts = dict(temperature=round(rng.uniform(0.3, 1.5), 3), seed=draw_seed(rng))
    if rng.random() < 0.4:
        opts["top_k"] = rng.randint(1, 60)
    if rng.random() < 0.5:
        opts["top_p"] = round(rng.uniform(0.5, 0.99), 3)
    if rng.random() < 0.3:
        opts["min_p"] = round(rng.uniform(0.01, 0.2), 3)
    for name, values in (("repetition_penalty", [1.1, 1.3]), ("presence_penalty", [0.5, -0.5]),
                         ("frequency_penalty", [0.3, 1.0])):
        if rng.random() < 0.2:
            opts[name] = rng.choice(values)
    if rng.random() < 0.2:
        opts["logit_bias"] = {rng.randint(0, 49151): rng.choice([-100, -5, 3, 8]) for _ in range(3)}
    if rng.random() < 0.4:
        opts["logprobs"] = True
        if rng.random() < 0.5:
            opts["top_logprobs"] = rng.randint(1, 5)
    if rng.random() < 0.15:
        opts["min_tokens"] = rng.randint(1, 3)
    return opts


def as_seen(r) -> tuple:
    return (r.token_ids, r.text, r.finish_reason, r.stop_reason, r.token_logprobs, r.top_logprobs)


def reseed(k: int):
    torch.manual_seed(k)
    random.seed(k)
    np.random.seed(k)


def global_draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def check_engine_case(eng, case: int) -> int:
    """One case's comparisons against its first answer; returns how many were made."""
    rng = random.Random(case)
    text = rng.choice(TEXTS)
    prompt = [{"role": "user", "content": text}] if rng.random() < 0.5 else text
    spec = rng.choice(SPECS)
    kw = dict(max_new_tokens=rng.randint(6, 12), **draw_options(rng), **spec)
    if isinstance(prompt, str) and rng.random() < 0.5:
        kw["chat"] = False
    want = eng.generate(prompt, **kw)
    if rng.random() < 0.5 and len(want.text) > 3:
        at = rng.randint(1, len(want.text) - 2)
        kw["stop"] = [want.text[at:at + rng.randint(1, 3)]]
        want = eng.generate(prompt, **kw)
    seen, where = as_seen(want), (case, kw)
    # runs in between: unseeded (it draws from torch's generator) and seeded batches must not move this one
    eng.generate("Hello", max_new_tokens=3, temperature=1.0)
    eng.generate_batch(["a", "bb"], max_new_tokens=3, temperature=0.7, seed=5, **spec)
    assert as_seen(eng.generate(prompt, **kw)) == seen, (where, "generate again")
    assert as_seen(eng.generate(prompt, **{**kw, "seed": int(kw["seed"])})) == seen, (where, "int seed")
    streamed = "".join(eng.stream(prompt, **kw))
    assert (streamed, as_seen(eng.last_result)) == (want.text, seen), (where, "stream")
    assert as_seen(eng.generate_batch([prompt], **kw)[0]) == seen, (where, "generate_batch of one")
    assert as_seen(asyncio.run(eng.agenerate(prompt, **kw))) == seen, (where, "agenerate")

    async def astream():
        return "".join([chunk async for chunk in eng.astream(prompt, **kw)])
    assert (asyncio.run(astream()), as_seen(eng.last_result)) == (want.text, seen), (where, "astream")
    # the CPU's rejection sampling draws plain sampling's numbers for one prompt: the same tokens
    other = rng.choice([s for s in SPECS if s != spec])
    switched = {k: v for k, v in kw.items() if k not in ("speculative", "tree")} | other
    assert eng.generate(prompt, **switched).token_ids == want.token_ids, (where, "method", other)
    made = 7
    if "stop" not in kw:
        shorter = eng.generate(prompt, **{**kw, "max_new_tokens": kw["max_new_tokens"] - 3})
        assert want.token_ids[:len(shorter.token_ids)] == shorter.token_ids, (where, "a shorter max_new_tokens")
        made += 1
    # several rows: other draws than alone (README), but the same ones each time
    first = [as_seen(r) for r in eng.generate_batch([prompt], n=2, **kw)]
    assert [as_seen(r) for r in eng.generate_batch([prompt], n=2, **kw)] == first, (where, "n=2 again")
    # the global generators: a seeded run neither reads nor moves them
    reseed(case)
    before = global_draws()
    reseed(case)
    eng.generate(prompt, **kw)
    assert global_draws() == before, (where, "global RNG")
    return made + 2


def test_seeded_engine_sweep(eng):
    """4 cases, ~40 comparisons (the exploration behind it: 100 cases, ~1150 comparisons, none differed). The four
    hold chat and raw prompts, plain and chain-3 / dynamic-4 trees, numpy and edge seeds, logprobs, min_tokens."""
    made = sum(check_engine_case(eng, case) for case in range(4))
    assert made >= 36


def test_edge_seeds_repeat_take_numpy_ints_and_count_every_bit(eng):
    kw = dict(max_new_tokens=8, temperature=1.0, chat=False)
    answers = {}
    for seed in EDGE_SEEDS:
        answers[seed] = eng.generate("Once upon a time", seed=seed, **kw).token_ids
        assert eng.generate("Once upon a time", seed=np.uint64(seed), **kw).token_ids == answers[seed], seed
    assert answers[2**32 + 1] != answers[1] and answers[2**63] != answers[0]
    assert len({tuple(a) for a in answers.values()}) >= len(EDGE_SEEDS) - 1


def test_unseeded_runs_follow_torch_manual_seed_and_leave_seeded_ones(eng):
    """seed=None draws from torch's global generator (README): torch.manual_seed fixes it, plain and speculative."""
    for spec in SPECS[:2]:
        kw = dict(max_new_tokens=10, temperature=1.0, chat=False, **spec)
        got = []
        for call in (lambda: eng.generate("def fib(n):", **kw),
                     lambda: eng.generate_batch(["def fib(n):"], **kw)[0]):
            torch.manual_seed(11)
            got.append(call().token_ids)
        assert got[0] == got[1], spec


# ---- amphista serve --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(eng):
    from conftest import serving
    eng.reserve_batch(4)
    with serving(eng, model_id="smollm2", log=lambda line: None, max_batch=4) as httpd:
        yield httpd.url


def reply_text(reply, chat: bool, stream: bool) -> str:
    if stream:
        assert reply[-1] == "[DONE]"
        return "".join((c["delta"].get("content") or "") if chat else c["text"]
                       for e in reply[:-1] for c in e.get("choices", []))
    assert reply[0] == 200, reply
    choice = reply[1]["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


def ask(url, body, chat: bool, stream: bool) -> str:
    from test_serve import call, sse
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return reply_text(sse(url, path, body) if stream else call(url, path, body), chat, stream)


@pytest.mark.parametrize("case", range(2))
def test_seeded_server_requests_answer_as_engine_generate(eng, served, case):
    rng = random.Random(1000 + case)
    opts = dict(temperature=round(rng.uniform(0.3, 1.5), 3), seed=rng.choice([2**64 - 1, rng.getrandbits(64)]),
                max_tokens=rng.randint(6, 14), top_p=round(rng.uniform(0.6, 0.99), 3))
    if rng.random() < 0.5:
        opts["speculative"] = "amphista"
    chat, text = case == 0, rng.choice(TEXTS)
    body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    body.update(opts)
    engine_kw = {k: v for k, v in opts.items() if k != "max_tokens"} | {"max_new_tokens": opts["max_tokens"]}
    want = eng.generate(body["messages"] if chat else text, **engine_kw, **({} if chat else {"chat": False})).text
    assert ask(served, body, chat, False) == want
    assert ask(served, body, chat, True) == want
    # beside unseeded requests of the same options (which are batched together), the seeded ones still run alone
    got, threads = {}, []
    for i, (b, stream) in enumerate([(body, False), ({**body, "seed": None}, False), (body, True),
                                     ({k: v for k, v in body.items() if k != "seed"}, True)]):
        threads.append(threading.Thread(target=lambda i=i, b=b, s=stream: got.__setitem__(i, ask(served, b, chat, s))))
        threads[-1].start()
    for t in threads:
        t.join(120)
    assert (got.get(0), got.get(2)) == (want, want), json.dumps(got)
