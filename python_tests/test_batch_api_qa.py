"""Batched and continuous-batching use of the Python API on the embedded SmolLM2 (its 4-bit `cpu` stack, where a
batch's rows equal the prompts decoded alone bit for bit, README): generate_batch / stream_batch / stream with
several prompts, per-row limits, stops, seeds, admit (prompts joining between steps), the shipped Amphista heads,
and the errors a malformed batch gets."""
from __future__ import annotations

import warnings

import pytest

from amphista_engine import AmphistaError, Engine, InputError
from amphista_engine.errors import CacheFullError
from conftest import collect, needs_smollm2, smollm2_with_shipped_heads

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

LONG = "The history of the Roman empire is long and complex, full of wars and emperors. " * 6   # > 64 tokens
PROMPTS = ["Name three prime numbers.", "Hi", [{"role": "user", "content": "Count from one to five."}], LONG,
           [1, 504, 2654]]
LIMITS = [16, 24, 12, 6, 1]


@pytest.fixture(scope="module")
def eng():
    return smollm2_with_shipped_heads(max_seq_len=512)


@pytest.fixture(scope="module")
def alone(eng):
    """Each prompt decoded on its own, greedy and plain (the reference every batch row must equal)."""
    return [eng.generate(p, max_new_tokens=n) for p, n in zip(PROMPTS, LIMITS)]


@pytest.mark.parametrize("spec", [None, "amphista"])
def test_greedy_rows_of_mixed_prompts_equal_each_prompt_alone(eng, alone, spec):
    assert len(eng.encode_prompt(LONG)) > 64           # a chunked prefill beside one-token rows
    texts, row_res, _ = collect(eng.stream_batch(PROMPTS, max_new_tokens=LIMITS, speculative=spec,
                                                 row_results=True))
    results = eng.last_results
    assert len(results) == len(PROMPTS) and eng.last_result is results[0]
    for i, (r, a) in enumerate(zip(results, alone)):
        assert r == a, i                                   # text, ids, prompt ids, finish reason
        assert texts.get(i, "") == r.text and row_res[i] == r
        assert r.stats.new_tokens == len(r.token_ids) and r.stats.prompt_tokens == len(a.prompt_token_ids)
        assert r.finish_reason in ("eos", "length")
        assert (r.finish_reason == "length") == (len(r.token_ids) == LIMITS[i])
        assert len(r.token_ids) <= LIMITS[i]
    assert results[-1].stats.decode_steps == 0             # its one token came from the prefill
    if spec:
        assert results[0].stats.extra["tree"] and any(r.stats.tau > 1 for r in results)


STOP = [", ", "Paris"]


@pytest.fixture(scope="module")
def alone_stopped(eng):
    """PROMPTS[:3] decoded on their own, plain, to STOP: the reference of both batches below, made once."""
    return [eng.generate(p, max_new_tokens=20, stop=STOP) for p in PROMPTS[:3]]


@pytest.mark.parametrize("spec", [None, "amphista"])
def test_stop_strings_end_each_row_as_alone(eng, alone_stopped, spec):
    stop = STOP
    prompts = PROMPTS[:3]
    batch = eng.generate_batch(prompts, max_new_tokens=20, stop=stop, speculative=spec)
    for r, a in zip(batch, alone_stopped, strict=True):
        assert r == a
        assert not any(s in r.text for s in stop)
        assert r.finish_reason in ("stop", "eos", "length")
    assert any(r.finish_reason == "stop" for r in batch)


@pytest.mark.parametrize("spec", [None, "amphista"])
def test_seeded_sampled_batches_repeat_and_a_batch_of_one_is_generate(eng, spec):
    kw = dict(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=1234, speculative=spec)
    first = eng.generate_batch(PROMPTS[:3], **kw)
    assert eng.generate_batch(PROMPTS[:3], **kw) == first
    one = eng.generate(PROMPTS[0], **kw)
    assert eng.generate_batch([PROMPTS[0]], **kw)[0] == one
    assert "".join(eng.stream(PROMPTS[0], **kw)) == one.text and eng.last_result == one


def _feeder(queue):
    calls = []

    def admit(free):
        calls.append(free)
        out = queue[:free]
        del queue[:free]
        return out
    return admit, calls


@pytest.mark.parametrize("spec", [None, "amphista"])
def test_joined_prompts_answer_as_alone_and_refused_ones_are_named(eng, alone, spec):
    queue = [(PROMPTS[2], LIMITS[2]), ("", 4), ("word " * 600, 4), (PROMPTS[3], LIMITS[3])]
    admit, calls = _feeder(queue)
    texts, row_res, errors = collect(eng.stream_batch(PROMPTS[:2], max_new_tokens=LIMITS[:2], speculative=spec,
                                                      admit=admit, row_results=True))
    results = eng.last_results
    assert calls and not queue and len(results) == 6
    assert isinstance(errors[3], InputError) and "empty" in str(errors[3])
    assert isinstance(errors[4], CacheFullError) and "longer than the cache" in str(errors[4])
    assert results[3] is None and results[4] is None
    for row, ref in ((0, alone[0]), (1, alone[1]), (2, alone[2]), (5, alone[3])):
        assert results[row] == ref, row
        assert texts.get(row, "") == ref.text and row_res[row] == ref


def test_stream_with_admit_yields_only_its_own_prompts_text(eng, alone):
    """stream() is one prompt's text: the rows admit() brought in were mixed into it, with a refused one's error
    object among the chunks."""
    admit, _ = _feeder([(PROMPTS[0], LIMITS[0]), ("", 3)])
    chunks = list(eng.stream(PROMPTS[1], max_new_tokens=LIMITS[1], admit=admit))
    assert all(isinstance(c, str) for c in chunks)
    assert "".join(chunks) == alone[1].text == eng.last_result.text
    assert eng.last_results[1] == alone[0] and eng.last_results[2] is None      # the joiners: in last_results


def test_a_run_started_inside_admit_stops_the_stream_before_its_tokens(eng):
    """A generation started from admit() replaces the cache mid-step: the step's tokens, decoded on its K/V, came
    out as the stream's text before the stream noticed it was overtaken."""
    eng.reserve_batch(4)       # free rows from the first step on, so admit() is called after every step
    seen, when = [], []

    def admit(free):
        if len(seen) >= 4 and not when:
            when.append(len(seen))
            eng.generate("Who are you?", max_new_tokens=2)
        return []
    with pytest.raises(InputError, match="overtaken"):
        for item in eng.stream_batch(PROMPTS[:2], max_new_tokens=16, admit=admit):
            seen.append(item)
    assert when and len(seen) == when[0]
    assert eng.generate(PROMPTS[0], max_new_tokens=4).token_ids == \
        eng.generate_batch([PROMPTS[0]], max_new_tokens=4)[0].token_ids            # the engine goes on


def test_a_batch_larger_than_the_cache_grows_it(alone):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=256, max_batch_size=1)
    prompts = PROMPTS[:2] * 3
    out = e.generate_batch(prompts, max_new_tokens=[LIMITS[0], LIMITS[1]] * 3)
    assert out == [alone[0], alone[1]] * 3
    assert e._cache.batch >= 6


@pytest.mark.parametrize("call, message", [
    (lambda e: e.generate_batch([], max_new_tokens=4), "no prompts"),
    (lambda e: e.generate_batch(["Hi", ""], max_new_tokens=4), "prompt 1: prompt is empty"),
    (lambda e: e.generate_batch(["Hi", None], max_new_tokens=4), "prompt 1"),
    (lambda e: e.generate_batch("Hi", max_new_tokens=4), "list of prompts"),
    (lambda e: e.generate_batch(["Hi", "Yo"], max_new_tokens=[4]), "1 values for 2 prompts"),
    (lambda e: e.generate_batch(["Hi", "Yo"], max_new_tokens=[4, 0]), r"max_new_tokens\[1\]"),
    (lambda e: e.generate_batch(["Hi", "Yo"], max_new_tokens=4, seed=[1, 2]), "seed takes one value"),
    (lambda e: e.generate_batch(["Hi", "Yo"], max_new_tokens=4, reuse_prefix=True), "reuse_prefix applies to one"),
    (lambda e: e.generate_batch(["Hi"], max_new_tokens=4, admit=lambda f: [], reuse_prefix=True), "do not mix"),
    (lambda e: e.generate_batch(["Hi", "word " * 600], max_new_tokens=4), "prompt 1 is"),
    # one conversation given as the batch (was: "prompt must be ... got dict")
    (lambda e: e.generate_batch([{"role": "user", "content": "Hi"}], max_new_tokens=4), "one conversation"),
    (lambda e: e.generate_batch([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                max_new_tokens=4), "one conversation"),
    (lambda e: e.generate_batch([1, 504, 2654], max_new_tokens=4), "one prompt's token ids"),
    # several prompts given to generate (was: "message 0 is a list, expected a dict")
    (lambda e: e.generate([PROMPTS[2], PROMPTS[2]], max_new_tokens=4), "generate_batch"),
    (lambda e: e.generate([[1, 2], [3, 4]], max_new_tokens=4), "generate_batch"),
    (lambda e: list(e.stream([PROMPTS[2]], max_new_tokens=4)), "generate_batch"),
])
def test_a_malformed_batch_is_named(eng, call, message):
    with pytest.raises(AmphistaError, match=message) as err:
        call(eng)
    assert isinstance(err.value, InputError)
    assert eng.last_result is None and eng.last_results == []


def test_reuse_prefix_with_a_batch_of_one_and_the_results_after_a_closed_stream(eng, alone):
    eng.generate_batch([PROMPTS[0]], max_new_tokens=4, reuse_prefix=True)
    again = eng.generate_batch([PROMPTS[0]], max_new_tokens=LIMITS[0], reuse_prefix=True)[0]
    assert again.stats.extra.get("prompt_tokens_reused", 0) > 0
    assert again.token_ids == alone[0].token_ids
    stream = eng.stream_batch(PROMPTS[:2], max_new_tokens=8)
    next(stream)
    stream.close()
    assert eng.last_result is None and eng.last_results == []
    assert eng.generate_batch(PROMPTS[:2], max_new_tokens=LIMITS[:2]) == alone[:2]
