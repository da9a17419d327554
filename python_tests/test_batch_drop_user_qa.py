"""A demanding user of speculative batches on the CPU: rows that end are dropped (their cache, drafts and the heads'
SAL rows move down), and speculative="auto" weighs a batch at its own size (speculation_check.timed_batch)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from amphista_engine import Engine, InputError, generation
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.speculative import SpeculativeDecoder
from conftest import needs_smollm2

pytest.importorskip("transformers")      # tiny_hf_dir

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPTS = ["Hello", "The quick brown fox jumps over", "def f(x):", "0123", "Speculative decoding drafts", "world",
           "x * 2", "lazy dog.", "[ ]"]


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    """fp32 tiny engine whose extra EOS tokens end the rows of PROMPTS at different steps."""
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    plain = eng.generate_batch(PROMPTS, max_new_tokens=30, chat=False)
    # Each row's token at a different position becomes an EOS: rows end early, at many different steps.
    eos = {r.token_ids[2 + (3 * b) % 17] for b, r in enumerate(plain) if b % 3 != 2}
    eng.config.eos_token_id = sorted(set(eng.config.eos_token_id or []) | eos)
    eng.test_heads = {k: random_heads(k, eng.model, num_heads=4, seed=1) for k in ("amphista", "medusa")}
    return eng


def _rows(results):
    return [(r.token_ids, r.text, r.finish_reason) for r in results]


def _stats(results):
    return [(r.stats.new_tokens, r.stats.decode_steps, r.stats.accept_hist) for r in results]


class _Kept:
    """Records SpeculativeDecoder.keep_rows calls (the rows a batch went on with)."""

    def __init__(self, monkeypatch):
        self.calls, real = [], SpeculativeDecoder.keep_rows

        def spy(dec, keep):
            self.calls.append(list(keep))
            return real(dec, keep)
        monkeypatch.setattr(SpeculativeDecoder, "keep_rows", spy)


def _without_drops(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(SpeculativeDecoder, "can_drop_rows", lambda self: False)
        return fn()


def _drafts_by_row(engine, prompts, monkeypatch, drop: bool, **kw) -> list[dict]:
    """Per heads step, {prompt row: its draft logits [K, V]} of the rows the batch still decodes."""
    events, heads = [], engine.heads
    real_step, real_keep = heads.step, SpeculativeDecoder.keep_rows
    with monkeypatch.context() as m:
        def step(*a):
            out = real_step(*a)
            events.append(("step", out.clone()))     # the decoder updates its drafts in place
            return out
        m.setattr(heads, "step", step)
        m.setattr(SpeculativeDecoder, "keep_rows", lambda dec, keep: events.append(("keep", list(keep)))
                  or real_keep(dec, keep))
        if not drop:
            m.setattr(SpeculativeDecoder, "can_drop_rows", lambda self: False)
        # one prefill for the batch: the steps recorded are then all the batch's (a prompt group prefilled apart,
        # generation.prefill_groups, drafts through a heads step of its own rows)
        m.setattr(generation, "prefill_groups", lambda lengths, covers_all=False: [list(range(len(lengths)))])
        engine.generate_batch(prompts, speculative="amphista", **kw)
    live, out = list(range(len(prompts))), []
    for what, x in events:
        if what == "keep":
            live = [live[i] for i in x]
        else:
            out.append({b: x[i] for i, b in enumerate(live)})
    return out


def test_amphista_rows_moved_down_draft_from_their_own_sal_entries(engine, monkeypatch):
    """After a drop, each live row's drafts equal those the same row gets in a batch that keeps every row: its SAL
    cache entries moved with it (a row that drafted from another row's entries still decodes the right tokens
    greedily, so only the drafts show it)."""
    engine.load_heads(engine.test_heads["amphista"])
    for B, tree in ((9, "dynamic-16"), (6, None), (4, "chain-4")):
        kw = dict(max_new_tokens=30, chat=False, tree=tree)
        dropped = _drafts_by_row(engine, PROMPTS[:B], monkeypatch, True, **kw)
        whole = _drafts_by_row(engine, PROMPTS[:B], monkeypatch, False, **kw)
        assert len(dropped) == len(whole) and len(dropped[-1]) < B
        for t, (a, b) in enumerate(zip(dropped, whole)):
            for row, d in a.items():
                assert torch.allclose(d, b[row], rtol=1e-4, atol=1e-4), (B, tree, t, row)


@pytest.mark.parametrize("kind", ["amphista", "medusa"])
def test_greedy_rows_that_drop_equal_plain_rows_and_a_batch_that_keeps_them(engine, kind, monkeypatch, once):
    """Batches of 2..9 rows ending by EOS, stop strings and max_new_tokens at different steps: every speculative
    row equals the batch's plain row token for token, and its steps and accept histogram equal those of the same
    batch run without dropping (dynamic-16 drafts from the SAL cache: a row whose SAL entries stayed behind drafts
    other tokens and accepts a different number of them)."""
    engine.load_heads(engine.test_heads[kind])
    kept = _Kept(monkeypatch)
    for B in (2, 4, 6, 9):          # the smallest batch, the whole one, two between (every row ends differently)
        prompts = PROMPTS[:B]
        for tree, stop in ((None, None), ("dynamic-16", ["e "]), ("chain-3", None)):
            kw = dict(max_new_tokens=12 + 2 * B, chat=False, stop=stop)
            # plain batches use no heads and no tree: every kind and tree compares with one
            plain = once((B, tuple(stop or ())), lambda: engine.generate_batch(prompts, **kw))
            spec = engine.generate_batch(prompts, speculative=kind, tree=tree, **kw)
            assert _rows(spec) == _rows(plain), (B, tree)
            whole = _without_drops(monkeypatch, lambda: engine.generate_batch(prompts, speculative=kind, tree=tree,
                                                                               **kw))
            assert _rows(whole) == _rows(spec) and _stats(whole) == _stats(spec), (B, tree)
            for r in spec:
                s = r.stats
                assert sum(s.accept_hist) == s.decode_steps
                assert s.step_tokens == sum(n * c for n, c in enumerate(s.accept_hist))
                # the first token comes from the prefill, an ending EOS is counted by a step but not kept
                assert s.new_tokens == 1 + s.step_tokens - (r.finish_reason == "eos") or s.decode_steps == 0
                assert s.extra["tree"] == (tree or engine._tree_spec(None).name)
    assert any(k != list(range(len(k))) for k in kept.calls), kept.calls      # a live row moved down
    # rows whose first token (the prefill's) ends them: dropped before any step, with no step's counts yet
    eos = engine.config.eos_token_id
    firsts = [(b, r.token_ids[0]) for b, r in enumerate(engine.generate_batch(PROMPTS, max_new_tokens=1,
                                                                              chat=False)) if r.token_ids][::3]
    monkeypatch.setattr(engine.config, "eos_token_id", sorted(set(eos) | {t for _, t in firsts}))
    for n in (2, 3, 20):
        plain = engine.generate_batch(PROMPTS, max_new_tokens=n, chat=False)
        spec = engine.generate_batch(PROMPTS, max_new_tokens=n, chat=False, speculative=kind, tree="dynamic-8")
        whole = _without_drops(monkeypatch, lambda: engine.generate_batch(PROMPTS, max_new_tokens=n, chat=False,
                                                                           speculative=kind, tree="dynamic-8"))
        assert _rows(spec) == _rows(plain) and _stats(spec) == _stats(whole), n
        assert all(spec[b].finish_reason == "eos" and spec[b].stats.decode_steps == 0 and spec[b].token_ids == []
                   for b, _ in firsts) and len(firsts) >= 2


def test_streams_closed_mid_batch_leave_no_stale_rows_for_the_next_batch(engine, tiny_hf_dir, monkeypatch):
    """A stream closed after some rows were dropped, then batches of other sizes (the SAL cache allocated for a
    larger batch serving a smaller one), a chat turn with reuse_prefix and sampled batches: each result equals a
    fresh engine's for the same call."""
    engine.load_heads(engine.test_heads["amphista"])
    fresh = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    fresh.config.eos_token_id = engine.config.eos_token_id
    kw = dict(max_new_tokens=24, chat=False, speculative="amphista", tree="dynamic-16")
    kept, after = _Kept(monkeypatch), 0
    stream = engine.stream_batch(PROMPTS, **kw)
    for _ in stream:
        after += bool(kept.calls)
        if after == 5:               # a few deltas after the batch dropped rows
            break
    stream.close()
    assert after == 5 and engine.last_results == []
    calls = [(PROMPTS[4:], {}), (PROMPTS[:3], {}), (PROMPTS, dict(temperature=0.9, seed=7, acceptance="rejection")),
             (PROMPTS[1:6], dict(temperature=0.8, seed=3, acceptance="typical")), (PROMPTS[::-1], {})]
    for prompts, extra in calls:
        fresh.load_heads(engine.test_heads["amphista"])      # a copy of its own, reset: as a new engine's
        got = engine.generate_batch(prompts, **kw, **extra)
        want = fresh.generate_batch(prompts, **kw, **extra)
        assert _rows(got) == _rows(want) and _stats(got) == _stats(want), (len(prompts), extra)
        assert all(0 <= t < engine.config.vocab_size for r in got for t in r.token_ids)
    turn = engine.generate("Hello world", max_new_tokens=8, chat=False, speculative="amphista", reuse_prefix=True)
    engine.generate_batch(PROMPTS, **kw)                 # rewrites the cache: nothing of the turn is reused
    again = engine.generate("Hello world" + turn.text + " ok", max_new_tokens=8, chat=False,
                            speculative="amphista", reuse_prefix=True)
    alone = fresh.generate("Hello world" + turn.text + " ok", max_new_tokens=8, chat=False, speculative="amphista")
    assert "prompt_tokens_reused" not in again.stats.extra and again.token_ids == alone.token_ids
    # streamed deltas of a batch whose rows drop join to each row's text
    texts = [""] * 9
    for row, delta in engine.stream_batch(PROMPTS, stop=["o"], **kw):
        texts[row] += delta
    assert texts == [r.text for r in engine.last_results]


def test_sampled_batches_are_reproducible_and_valid(engine):
    """Sampling with a seed, typical and rejection acceptance, rows dropping: the same seed gives the same rows."""
    for kind in ("amphista", "medusa"):
        engine.load_heads(engine.test_heads[kind])
        for acceptance in ("typical", "rejection"):
            kw = dict(max_new_tokens=25, chat=False, speculative=kind, temperature=0.9, seed=11,
                      acceptance=acceptance)
            a, b = engine.generate_batch(PROMPTS[:7], **kw), engine.generate_batch(PROMPTS[:7], **kw)
            assert _rows(a) == _rows(b) and _stats(a) == _stats(b)
            assert all(0 <= t < engine.config.vocab_size for r in a for t in r.token_ids)
            assert all(r.stats.extra["acceptance"] == acceptance for r in a)


def test_bf16_batch_rows_drop_and_equal_plain_rows(tiny_hf_dir, monkeypatch):
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="bf16", max_seq_len=256)
    eng.config.eos_token_id = sorted(set(eng.config.eos_token_id or []) | {
        r.token_ids[3] for r in eng.generate_batch(PROMPTS[:5], max_new_tokens=8, chat=False)[::2]
        if len(r.token_ids) > 3})
    kept = _Kept(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # unpacked bf16 rows may warn (near-ties)
        for kind in ("amphista", "medusa"):
            eng.load_heads(random_heads(kind, eng.model, num_heads=4, seed=1))
            plain = eng.generate_batch(PROMPTS[:5], max_new_tokens=20, chat=False)
            spec = eng.generate_batch(PROMPTS[:5], max_new_tokens=20, chat=False, speculative=kind,
                                      tree="dynamic-8")
            assert _rows(spec) == _rows(plain)
    assert kept.calls


def test_no_drop_while_cuda_graphs_hold_the_batch(engine, monkeypatch):
    """A decoder routed through captured graphs keeps every row (the graph holds the batch's shape and state
    buffers): its rows still end where they should and equal the plain rows."""
    engine.load_heads(engine.test_heads["amphista"])
    kept = _Kept(monkeypatch)
    real = engine.graphs.attach

    def attach(dec):
        dec._decode_graphs = object()        # as DecodeGraphs.attach marks a decoder (its steps stay eager here)
        return real(dec)
    monkeypatch.setattr(engine.graphs, "attach", attach)
    kw = dict(max_new_tokens=20, chat=False)
    spec = engine.generate_batch(PROMPTS, speculative="amphista", **kw)
    monkeypatch.undo()
    assert not kept.calls and _rows(spec) == _rows(engine.generate_batch(PROMPTS, **kw))
    assert len({r.stats.decode_steps for r in spec}) > 2


# ---- speculative="auto" weighs a batch at its own size ----------------------------------------------------------

def _record(engine, taus: dict):
    engine.heads.config.extra = {"tree_search": {"decoding_tau": taus}}
    engine._checks.clear()


def test_the_timing_of_a_batch_takes_one_cache_for_all_its_trees(engine, monkeypatch, tmp_path):
    """The timed plain and tree steps each had a cache of their own: with a CPU cache's ~1k scratch slots, a plain
    step and three trees at 8 rows took 2.3 GB on SmolLM2-135M (twice its own batch-8 cache, unchecked; ~26 GB for
    Llama-2-7B). One buffer serves them all now. Batches past 8 are timed at 8 (and the reason says so), batch 1
    keeps its step_costs.json keys, and a batch's times are read back from the file, not measured again."""
    import amphista_engine.speculation_check as sc
    engine.load_heads(engine.test_heads["amphista"])
    _record(engine, {"chain-2": 1.6, "dynamic-8": 2.0, "tree-16": 2.2})
    monkeypatch.setenv("AMPHISTA_CACHE_DIR", str(tmp_path))
    made, real = [], KVCache.for_model.__func__

    def counted(cls, cfg, batch, *a, **k):
        made.append(batch)
        return real(cls, cfg, batch, *a, **k)
    monkeypatch.setattr(KVCache, "for_model", classmethod(counted))
    timed, real_time = [], sc._time_steps
    monkeypatch.setattr(sc, "_time_steps", lambda *a, **k: timed.append(a[6]) or real_time(*a, **k))
    fast = dict(repeats=2, warmup=1)
    one = sc.check_speculation(engine, **fast)
    three = sc.check_speculation(engine, batch=3, **fast)
    many = sc.check_speculation(engine, batch=100, **fast)
    assert made == [1, 3, 8] and timed == [1, 3, 8], (made, timed)
    assert len(three.compared) == 3 and all(v["step_ratio"] > 0 for v in three.compared.values())
    assert "plain steps here (" in one.reason and "for a batch of 3 rows (" in three.reason
    assert "for a batch of 8 rows (larger batches are weighed at this size)" in many.reason
    costs = json.loads((tmp_path / sc.COSTS_FILE).read_text())
    prompt = sc._timing_plan(engine.max_seq_len, sc.candidate_trees(engine), 128, 2, 1)[2]
    spec = engine._tree_spec("chain-2")
    assert sc.cost_key(engine, spec, prompt) in costs and sc.cost_key(engine, spec, prompt, 3) in costs
    assert sc.cost_key(engine, spec, prompt) == sc.cost_key(engine, spec, prompt, 1)   # batch 1: the old key
    assert len(costs) == 9
    again = sc.check_speculation(engine, batch=3, **fast)
    assert timed == [1, 3, 8] and again.measured_on and again.step_ms == three.step_ms
    _record(engine, {})


def test_speculation_check_refuses_a_batch_that_is_no_number_of_rows(engine, monkeypatch):
    """batch=0 or -2 was weighed as one row, 2.5 as two, "3" as three, True as one, and None failed with int()'s
    TypeError."""
    import amphista_engine.speculation_check as sc
    engine.load_heads(engine.test_heads["amphista"])
    _record(engine, {"tree-16": 2.2})
    monkeypatch.setattr(sc, "_time_steps", lambda engine, specs, *a: (10.0, {s.name: 15.0 for s in specs}))
    for bad in (0, -2, 2.5, None, "3", True):
        with pytest.raises(InputError, match=r"batch must be the number of rows .*got"):
            engine.speculation_check(batch=bad)
        with pytest.raises(InputError, match="batch must be"):
            sc.check_speculation(engine, batch=bad)
    assert engine.speculation_check(batch=np.int64(2)).pays and sc.timed_batch(np.int64(20)) == 8
    assert engine.resolve_speculation("auto", None, batch=5)[0] == "amphista"
    _record(engine, {})


@needs_smollm2
def test_smollm2_4bit_rows_drop_and_equal_plain_and_alone(monkeypatch):
    """The shipped heads on 4-bit SmolLM2 (the stack where a batch row equals the prompt decoded alone): rows
    ending by EOS, a stop string and max_new_tokens drop, and each equals its plain row and its run alone."""
    eng = Engine.from_pretrained("smollm2-135m", device="cpu", quant="q4", heads="default", max_seq_len=256)
    prompts = ["What is 2+2?", "Write a haiku about the sea.", "Name three colors.", "Hi"]
    kept = _Kept(monkeypatch)
    kw = dict(max_new_tokens=16, stop=[","])
    plain = eng.generate_batch(prompts, **kw)
    spec = eng.generate_batch(prompts, speculative="amphista", **kw)
    assert _rows(spec) == _rows(plain) and len({r.finish_reason for r in spec}) >= 2 and kept.calls
    whole = _without_drops(monkeypatch, lambda: eng.generate_batch(prompts, speculative="amphista", **kw))
    assert _stats(whole) == _stats(spec)
    for p, r in zip(prompts, spec):
        alone = eng.generate(p, speculative="amphista", **kw)
        assert alone.token_ids == r.token_ids and alone.stats.accept_hist == r.stats.accept_hist
