"""QA of batched generation as a serving user (2026-12-06): `generate_batch` / `stream_batch`, max_batch_size.

What held up (rows equal their prompts run alone, plain and speculative, static and dynamic trees, 1 to 441 prompt
tokens, rows ending by EOS / length / stop in one batch, duplicates, batches past max_batch_size, streams closed
early) is covered by test_engine.py, test_speculative_audit_qa.py and test_speculative_edges_user_qa.py; this file
holds what did not."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from amphista_engine import Engine
from amphista_engine.errors import InputError
from amphista_engine.kv_cache import KVCache
from conftest import needs_smollm2

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT = "The quick brown fox"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]


def _doc(obj) -> str:
    return " ".join(obj.__doc__.split())


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    return Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128, max_batch_size=2)


@pytest.fixture(scope="module")
def smol():
    return Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=256, max_batch_size=2,
                                  heads="default")


# max_new_tokens takes a list of one per prompt since 2026-12-05 (test_per_row_max_tokens.py): not refused here
@pytest.mark.parametrize("name, value", [("seed", [1, 2]), ("temperature", (0.5, 0.7)),
                                         ("top_k", np.array([1, 2])), ("top_p", torch.tensor([0.5, 0.9])),
                                         ("repetition_penalty", [1.1, 1.2]), ("chat", [True, False]),
                                         ("speculative", [None, None]), ("acceptance", ["auto", "auto"]),
                                         ("reuse_prefix", [False, False])])
def test_a_per_prompt_list_of_a_setting_is_refused_as_per_prompt(tiny, name, value):
    """Every option of a batch applies to all its rows, which nothing said; a list of per-row values was refused
    as "max_new_tokens must be a positive integer, got [4, 8]" (or, for chat, blamed on "prompt 0"), as if a
    list could never be meant. Now the refusal says the setting is one for the batch and what to do instead."""
    with pytest.raises(InputError, match=rf"^{name} takes one value, which applies to every prompt of the batch; "
                                         r".*per-prompt settings are not supported \(make one generate_batch call"):
        tiny.generate_batch([PROMPT, "Hello"], **{"max_new_tokens": 2, "chat": False, name: value})
    assert "per-prompt values is refused" in _doc(Engine.stream_batch)
    # numpy / torch scalars are one value, and a stop list is stop strings for every row, as documented
    kw = dict(chat=False, max_new_tokens=np.int64(3), seed=np.uint64(5), temperature=np.float64(0.0))
    assert len(tiny.generate_batch([PROMPT, "Hello"], **kw)) == 2


def test_a_per_prompt_list_of_max_new_tokens_is_taken(tiny):
    """max_new_tokens=[4, 8] was refused with the settings above ("takes one value"); it now gives each prompt its
    own limit (test_per_row_max_tokens.py), and a list of the wrong length is named as such."""
    got = tiny.generate_batch([PROMPT, "Hello"], max_new_tokens=[4, 8], chat=False)
    assert [len(r.token_ids) for r in got] == [4, 8] and {r.finish_reason for r in got} == {"length"}
    with pytest.raises(InputError, match=r"^max_new_tokens has 3 values for 2 prompts"):
        tiny.generate_batch([PROMPT, "Hello"], max_new_tokens=[4, 8, 2], chat=False)


def test_a_bad_chat_value_is_the_calls_fault_not_prompt_0s(tiny):
    """chat="no" in a batch was reported as "prompt 0: chat must be True, False or None": chat was checked while
    encoding each prompt, so the first prompt took the blame for the call's setting."""
    with pytest.raises(InputError, match=r"^chat must be True, False or None .* got str 'no'"):
        tiny.generate_batch([PROMPT, "Hello"], max_new_tokens=2, chat="no")


@needs_smollm2
@pytest.mark.parametrize("spec", [{}, dict(speculative="amphista", tree="mix-4")])
def test_raw_text_and_a_conversation_mix_in_one_batch(smol, spec):
    """The README: "chat=False turns [the template] off; a message list always does [get it]". A batch of a raw
    completion and a conversation (a server's mixed traffic) could not be run: chat=False refused the message list
    ("prompt 1: a message list needs chat formatting"), and without it the raw text was chat-formatted. chat=False
    now applies to the string prompts; each row is its prompt's own answer."""
    raw = "Once upon a time"
    batch = smol.generate_batch([raw, CHAT, raw], max_new_tokens=12, chat=False, **spec)
    alone = [smol.generate(raw, 12, chat=False, **spec), smol.generate(CHAT, 12, **spec)]
    assert batch[0].prompt_token_ids == smol.encode_prompt(raw, chat=False)
    assert batch[1].prompt_token_ids == smol.encode_prompt(CHAT)
    for got, want in zip(batch, [alone[0], alone[1], alone[0]]):
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
    # only message lists with chat=False is still a contradiction, refused
    with pytest.raises(InputError, match="a message list needs chat formatting"):
        smol.generate(CHAT, 4, chat=False)


def test_growing_the_cache_past_max_batch_size_frees_the_old_one_first(tiny_hf_dir):
    """A batch past max_batch_size grows the KV cache (checked against free memory first). After a reuse_prefix
    run, the kept prefix still held the old cache: the larger one was allocated beside it (the peak check_fits is
    there to keep under memory). The check comes before the old buffers go (a refused batch keeps them), counting
    them as free (test_cache_room_user_qa.py)."""
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128, max_batch_size=1)
    eng.generate(PROMPT, 4, chat=False, reuse_prefix=True)
    old = weakref.ref(eng._cache)
    seen = []
    real_fits, real_alloc = KVCache.check_fits, KVCache.for_model

    def fits(*a, **k):
        gc.collect()
        seen.append(("check", old() is None))
        return real_fits(*a, **k)

    def alloc(*a, **k):
        seen.append(("alloc", old() is None))
        return real_alloc(*a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KVCache, "check_fits", staticmethod(fits))
        mp.setattr(KVCache, "for_model", staticmethod(alloc))
        prompts = [PROMPT, "Hello", "def f(x):"]
        batch = eng.generate_batch(prompts, 6, chat=False)
    assert seen == [("check", False), ("alloc", True)] and eng._cache.batch == 3
    assert [r.token_ids for r in batch] == [eng.generate(p, 6, chat=False).token_ids for p in prompts]
    # the documented behaviour: max_batch_size is the rows checked and allocated up front, not a cap
    assert "a larger batch is still taken" in _doc(Engine.from_pretrained)
    # reuse_prefix works on the grown cache (nothing stale is reused: an answer equal to a fresh run's)
    first = eng.generate(PROMPT, 4, chat=False, reuse_prefix=True)
    again = eng.generate(PROMPT, 4, chat=False, reuse_prefix=True)
    assert again.token_ids == first.token_ids and again.stats.extra.get("prompt_tokens_reused", 0) > 0


@needs_smollm2
@pytest.mark.parametrize("spec", [{}, dict(speculative="amphista", tree="dynamic-8")])
def test_streamed_rows_and_their_stats_describe_each_row(smol, spec):
    """Rows ending by EOS, by a stop string and by max_new_tokens in one streamed batch of 31- to 79-token prompts:
    each row's deltas join to its text and stop at its end, its counts (new_tokens, decode_steps, accept_hist,
    tau) are its alone run's, and its times the batch's, as the stats' docstring now says (it said a batch's
    stats were "the batch's steps", which decode_steps is not). Closed early, the stream leaves the engine as new."""
    prompts = ["Hi", "List three colors.", "Write a long story about a dragon. " * 6]
    kw = dict(max_new_tokens=24, stop=["Blue", "unicorn"], **spec)
    alone = [smol.generate(p, **kw) for p in prompts]
    deltas, done = [[] for _ in prompts], set()
    for row, delta in smol.stream_batch(prompts, **kw):
        assert row not in done and delta, "a delta after the row's end, or an empty one"
        deltas[row].append(delta)
        if "".join(deltas[row]) == alone[row].text:
            done.add(row)
    results = smol.last_results
    assert sorted(r.finish_reason for r in results) == ["eos", "length", "stop"]
    for got, want, d in zip(results, alone, deltas):
        assert "".join(d) == got.text
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        s, w = got.stats, want.stats
        assert (s.new_tokens, s.decode_steps, s.accept_hist, s.tau) == (w.new_tokens, w.decode_steps,
                                                                        w.accept_hist, w.tau)
        assert (s.prefill_ms, s.decode_ms) == (results[0].stats.prefill_ms, results[0].stats.decode_ms)
    assert "counts its own tokens and steps" in _doc(type(results[0].stats))
    assert "row is the prompt's index" in _doc(Engine.stream_batch)
    # closed early: no results, and the next batch is a fresh engine's
    stream = smol.stream_batch(prompts, **kw)
    next(stream)
    stream.close()
    assert smol.last_results == []
    assert [r.token_ids for r in smol.generate_batch(prompts, **kw)] == [r.token_ids for r in results]
