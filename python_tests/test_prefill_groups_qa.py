"""QA of grouped prefill (generation._prefill / _add_rows / prefill_groups): every option with per-row state answers
as if the batch were prefilled at once (and each row as alone), on fp32, bf16 and 4-bit engines, speculative or not,
joiners (admit) included; structured output never groups; a seeded sampled batch does not depend on the free memory
(the grouping falls back to one forward where memory is short)."""
from __future__ import annotations

import re
import warnings

import pytest

from amphista_engine import generation, kv_cache
from amphista_engine.generation import PlainDecoder

from conftest import engine_with_random_heads, needs_smollm2

pytestmark = pytest.mark.usefixtures("one_thread_module")

LONG = [(7 * i + 3) % 200 + 5 for i in range(180)]
SHORT = [[11, 12, 13], [40, 41], [90, 91, 92, 93, 94], [150, 7, 8, 9]]
PROMPTS = [SHORT[0], LONG, SHORT[1], SHORT[2], LONG[:150], SHORT[3]]
EOS = 2          # tiny_hf_dir's


def _one_group(lengths, covers_all=False):
    return [list(range(len(lengths)))]


def _rows(results):
    return [(r.token_ids, r.text, r.finish_reason, r.token_logprobs, r.top_logprobs, r.eos_logprob,
             r.stats.prompt_tokens, r.stats.new_tokens, r.stats.decode_steps) for r in results]


def _batch(engine, monkeypatch, prompts, grouped: bool, **kw):
    """(the batch's results, how many decoder.add_rows calls its prefill made)."""
    calls = []
    real = PlainDecoder.add_rows
    with monkeypatch.context() as m:
        m.setattr(PlainDecoder, "add_rows", lambda self, *a: (calls.append(a[0]), real(self, *a))[1])
        if not grouped:
            m.setattr(generation, "prefill_groups", _one_group)
        return engine.generate_batch(prompts, **kw), len(calls)


def _same(a, b):
    """Results equal, logprobs to fp32 rounding (a batch's rows may sum in another order)."""
    for x, y in zip(_rows(a), _rows(b)):
        assert x[:3] == y[:3] and x[6:] == y[6:]
        if x[3] is not None:
            assert x[3] == pytest.approx(y[3], abs=1e-5)
        if x[4] is not None:
            assert [[t for t, _ in top] for top in x[4]] == [[t for t, _ in top] for top in y[4]]
        if x[5] is not None:
            assert x[5][0] == y[5][0] and x[5][1] == pytest.approx(y[5][1], abs=1e-5)


@pytest.fixture(scope="module")
def fp32(tiny_hf_dir):
    return engine_with_random_heads(tiny_hf_dir, 4, dtype="fp32", max_seq_len=512)


@pytest.fixture(scope="module")
def q4(tiny_hf_dir):
    """4-bit linears: prompts past cpu_ops.STACK_ROWS tokens prefill in chunks; max_seq_len 300 for prompts near it."""
    from amphista_engine import Engine
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="bf16", max_seq_len=300, quant="q4")
    assert eng.quant == "q4"
    return eng


OPTIONS = {
    "repetition_penalty": dict(repetition_penalty=1.5, ignore_eos=True),
    "presence_frequency": dict(presence_penalty=1.0, frequency_penalty=0.7, ignore_eos=True),
    # a few favoured tokens each row cycles through: its counts decide which comes next
    "penalties_on_favoured": dict(logit_bias={5: 2.5, 6: 2.5, 7: 2.5, 8: 2.5}, presence_penalty=1.5,
                                  frequency_penalty=1.0, ignore_eos=True),
    "logit_bias": dict(logit_bias={5: 5.0, 17: -100, 40: 3.0}, ignore_eos=True),
    "min_tokens_stop_ids": dict(min_tokens=4, stop_token_ids=[5, 17, 40, 100, 200]),
    "stop_ids_early": dict(stop_token_ids=list(range(0, 300, 3)), logprobs=True),
    "stop_strings": dict(stop=["e", "a"], ignore_eos=True),
    "row_limits": dict(max_new_tokens=[1, 3, 1, 12, 5, 2], ignore_eos=True, logprobs=True, top_logprobs=2),
    "eos_first": dict(logit_bias={EOS: 100.0}, logprobs=True, top_logprobs=1),
    "logprobs_tops": dict(logprobs=True, top_logprobs=3, ignore_eos=True),
    "greedy_with_seed": dict(seed=7, ignore_eos=True),
    "amphista_bias_min_tokens": dict(speculative="amphista", logit_bias={5: 4.0}, min_tokens=3, stop_token_ids=[5, 7]),
    "amphista_row_limits": dict(speculative="amphista", tree="dynamic-4", max_new_tokens=[1, 1, 4, 1, 9, 2],
                                ignore_eos=True, logprobs=True),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_per_row_options_answer_as_prefilled_at_once(fp32, monkeypatch, name):
    kw = {"max_new_tokens": 12, **OPTIONS[name]}
    grouped, calls = _batch(fp32, monkeypatch, PROMPTS, True, **kw)
    at_once, none = _batch(fp32, monkeypatch, PROMPTS, False, **kw)
    assert calls and not none          # the measurement: the long rows joined apart, and not with grouping off
    _same(grouped, at_once)
    assert [r.token_ids for r in fp32.last_results] == [r.token_ids for r in at_once]


@pytest.mark.parametrize("kw", [dict(temperature=0.8, seed=3), dict(temperature=0.7, top_k=20, seed=4),
                                dict(temperature=0.7, seed=5, speculative="amphista", acceptance="rejection"),
                                dict(temperature=0.7, seed=6, speculative="amphista", acceptance="typical")],
                         ids=["plain", "top_k", "rejection", "typical"])
def test_seeded_sampling_does_not_depend_on_free_memory(fp32, monkeypatch, kw):
    """Each group drew its first tokens apart, so a seeded sampled row's answer depended on the grouping, which falls
    back to one forward where memory is short: the same seeded call answered otherwise on a busier machine."""
    kw = dict(max_new_tokens=8, ignore_eos=True, **kw)
    fp32._cache_for(len(PROMPTS))          # the batch's cache, allocated before memory "runs out"
    roomy = [r.token_ids for r in fp32.generate_batch(PROMPTS, **kw)]
    assert roomy == [r.token_ids for r in fp32.generate_batch(PROMPTS, **kw)]
    with monkeypatch.context() as m:
        m.setattr(kv_cache, "available_memory", lambda device: 64 << 10)
        tight = [r.token_ids for r in fp32.generate_batch(PROMPTS, **kw)]
    assert tight == roomy


@pytest.mark.parametrize("kind", ["amphista", "medusa"])
def test_speculative_trees_on_chunked_4bit_prefill_answer_as_alone(q4, monkeypatch, kind):
    from amphista_engine.heads import random_heads
    from amphista_engine.kernels import cpu_ops
    q4.load_heads(random_heads(kind, q4.model, num_heads=4, seed=1))
    assert q4.model.prefill_chunk(q4._cache_for(1)) == cpu_ops.STACK_ROWS < len(LONG[:150])
    prompts = [SHORT[0], LONG[:150], SHORT[1], LONG[:100]]
    for spec, tree in ((None, None), (kind, "chain-3"), (kind, "dynamic-4"), (kind, "tree-16")):
        kw = dict(max_new_tokens=10, ignore_eos=True, speculative=spec, tree=tree, logprobs=True)
        batch, calls = _batch(q4, monkeypatch, prompts, True, **kw)
        assert calls
        _same(batch, [q4.generate(p, **kw) for p in prompts])


def test_prompts_at_the_cache_length(q4, monkeypatch):
    """Rows that fill the cache (max_seq_len 300) and windows of exactly 128 / 256 slots beside 1-token prompts."""
    from amphista_engine.heads import random_heads
    q4.load_heads(random_heads("amphista", q4.model, num_heads=4, seed=1))
    near = [(5 * i + 1) % 290 + 3 for i in range(299)]
    for spec in (None, "amphista"):
        kw = dict(max_new_tokens=1, speculative=spec, logprobs=True, top_logprobs=2)
        batch, calls = _batch(q4, monkeypatch, [[5], near, [6, 7], near[:256]], True, **kw)
        assert calls
        _same(batch, [q4.generate(p, **kw) for p in [[5], near, [6, 7], near[:256]]])
    prompts, limits = [[5], near[:256], [6, 7], near[:128]], [5, 20, 3, 9]
    kw = dict(speculative="amphista", tree="dynamic-4", ignore_eos=True)
    batch, calls = _batch(q4, monkeypatch, prompts, True, max_new_tokens=limits, **kw)
    assert calls
    _same(batch, [q4.generate(p, max_new_tokens=n, **kw) for p, n in zip(prompts, limits)])


def test_text_and_chat_prompts(fp32, monkeypatch):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    prompts = ["a", [{"role": "user", "content": text}], "b c", text, [{"role": "user", "content": "Hi"}]]
    kw = dict(max_new_tokens=8, stop=["e"], chat=False, speculative="amphista")
    grouped, calls = _batch(fp32, monkeypatch, prompts, True, **kw)
    at_once, _ = _batch(fp32, monkeypatch, prompts, False, **kw)
    assert calls
    _same(grouped, at_once)


@pytest.mark.parametrize("spec", [None, "amphista"])
def test_response_format_never_groups(fp32, monkeypatch, spec):
    code = {"type": "regex", "regex": r"[a-e]{2,4}-[0-9]{2}\."}
    kw = dict(max_new_tokens=12, response_format=code, speculative=spec)
    batch, calls = _batch(fp32, monkeypatch, PROMPTS, True, **kw)
    assert not calls
    assert all(re.fullmatch(code["regex"], r.text) and r.finish_reason == "eos" for r in batch)
    assert [r.token_ids for r in batch] == [fp32.generate(p, **kw).token_ids for p in PROMPTS]


@pytest.mark.parametrize("kw", [dict(ignore_eos=True, repetition_penalty=1.3, logprobs=True, top_logprobs=2),
                                dict(speculative="amphista", tree="dynamic-4", stop_token_ids=[5, 17, 100, 150])],
                         ids=["plain", "amphista"])
def test_server_like_admit_loop(fp32, monkeypatch, kw):
    """An unequal batch, then joiners of mixed lengths (some of one token, some ending at their first) into rows
    that end at different steps: every row answers as alone."""
    fp32.reserve_batch(6)
    first, limits = [SHORT[0], LONG, SHORT[1], LONG[:140]], [2, 9, 5, 1]
    queue = [([11, 12], 3), (LONG[3:], 7), ([40], 1), (LONG[:100], 5), ([90, 91, 92], 9), ([8, 9], 2),
             (LONG[:20], 6), ([150], 1), (LONG[:170], 3)]
    waiting = list(queue)

    def admit(free):
        got = waiting[:min(free, 4)]
        del waiting[:len(got)]
        return got
    calls = []
    real = PlainDecoder.add_rows
    monkeypatch.setattr(PlainDecoder, "add_rows", lambda self, *a: (calls.append(a[0]), real(self, *a))[1])
    fp32.generate_batch(first, max_new_tokens=limits, admit=admit, **kw)
    assert not waiting and len(calls) > 3
    results = fp32.last_results
    monkeypatch.undo()
    alone = [fp32.generate(p, max_new_tokens=n, **kw) for p, n in list(zip(first, limits)) + queue]
    _same(results, alone)


@needs_smollm2
def test_smollm2_chat_batch_answers_as_alone(monkeypatch):
    from amphista_engine import Engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = Engine.from_pretrained("smollm2-135m", device="cpu", heads="default")
    text = "Summarize this. " + "Speculative decoding drafts tokens and the target verifies them in one pass. " * 12
    prompts = ["What is 2+2?", [{"role": "user", "content": text}], [{"role": "user", "content": "Name a color."}]]
    for spec in (None, "amphista"):
        kw = dict(speculative=spec, logprobs=True)
        batch, calls = _batch(eng, monkeypatch, prompts, True, max_new_tokens=[8, 16, 4], **kw)
        assert calls
        _same(batch, [eng.generate(p, max_new_tokens=n, **kw) for p, n in zip(prompts, [8, 16, 4])])
