"""Graph replay reads no stale state: one engine decoding through (a stand-in for) CUDA graphs gives, call after call,
what an engine with cuda_graphs off gives, across options that differ only in values a captured step bakes in or
reads from Python (sampling settings, acceptance rule, ending ids, min_tokens, logit_bias, top_logprobs, per-row
limits, trees of one size, heads swapped, rows joining, kept prefixes, a run stopped by NaN, the draft vocabulary).

The stand-in is graph_standin.py's, the one every CPU graph test uses (a replay re-runs the step of the decoder it
was captured with, so every Python value on that decoder is the capture's, and reads the tensors the capture read
through the target, the heads, the tree and the caches: their attributes as they were then, the addresses a real
graph reads); a capture that builds such a tensor is recorded (on a GPU it would land in the graph's pool, or fail it).
"""
from __future__ import annotations

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.errors import NonFiniteError
from amphista_engine.heads import random_heads
from graph_standin import CPUGraphs

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPTS = ["The quick brown fox jumps", "def f(x):", "Hello there"]


def _engines(tiny_hf_dir, kind="amphista", **heads_kw):
    """(eager engine, graphed engine) on the tiny checkpoint, with the same random heads."""
    out = []
    for graphed in (False, True):
        e = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=512, max_batch_size=4,
                                   cuda_graphs=graphed)
        if graphed:
            e.graphs = CPUGraphs()
        if kind:
            e.load_heads(random_heads(kind, e.model, num_heads=4, seed=1, **heads_kw))
        out.append(e)
    return out


def _ids(results, steps=False):
    return [(r.token_ids, r.finish_reason) + ((r.stats.decode_steps, r.stats.accept_hist) if steps else ())
            for r in results]


def _same(eager, graphed, call, what=""):
    """call(engine) on both engines (the default generator reseeded alike); their answers, asserted equal."""
    torch.manual_seed(5)
    want = call(eager)
    torch.manual_seed(5)
    got = call(graphed)
    assert got == want, (what, want, got)
    assert not graphed.graphs.built_in_capture, graphed.graphs.built_in_capture
    return want


def _replayed(graphed):
    st = graphed.graphs.stats
    assert st.replays > 0 and st.failed_captures == 0, st.to_dict()


def test_sampling_settings_and_acceptance_rules_in_turn(tiny_hf_dir):
    """Runs that differ only in temperature, top_k, top_p or the acceptance rule. Unseeded: seeded runs key their
    graphs by their own generator, so only the default generator's runs share graphs across runs. One prompt: an
    eager engine drops ended rows, which moves the random draws of the rows left (a graphed one keeps them)."""
    eager, graphed = _engines(tiny_hf_dir)
    plain = [dict(temperature=0.7), dict(temperature=1.3), dict(temperature=1.0, top_k=3),
             dict(temperature=1.0, top_k=20), dict(temperature=1.0, top_p=0.5), dict(temperature=1.0, top_p=0.9)]
    spec = [dict(temperature=0.7), dict(temperature=1.3), dict(temperature=1.0, top_k=3),
            dict(temperature=1.0, top_k=20), dict(temperature=1.0, top_p=0.5),
            dict(temperature=0.5, acceptance="rejection"), dict(temperature=0.5, acceptance="typical"),
            dict(temperature=2.0, acceptance="typical")]
    for group, extra in ((plain, {}), (spec, dict(speculative="amphista"))):
        answers = [_same(eager, graphed, lambda e: _ids(e.generate_batch([PROMPTS[0]], 20, chat=False, **kw, **extra)),
                         kw) for kw in group]
        assert len({str(a) for a in answers}) == len(group)        # each setting changed the answer
    _replayed(graphed)


def test_ending_ids_min_tokens_and_row_limits_in_turn(tiny_hf_dir):
    """stop_token_ids, ignore_eos and min_tokens (the held-back ids are copied in, their count and min_tokens keyed),
    and per-row max_new_tokens (rows ending mid-batch, batches of 2 and 3), plain and speculative, greedy."""
    eager, graphed = _engines(tiny_hf_dir)
    for spec in (None, "amphista"):
        def run(e, limit=24, prompts=PROMPTS[:2], **kw):
            return _ids(e.generate_batch(prompts, limit, chat=False, speculative=spec, **kw), steps=True)
        free = _same(eager, graphed, run)
        a, b = free[0][0][5], free[1][0][5]              # tokens the rows give at their 6th place
        answers = [_same(eager, graphed, lambda e: run(e, **kw), kw) for kw in (
            dict(stop_token_ids=[a]), dict(stop_token_ids=[b]),
            dict(stop_token_ids=[a], min_tokens=9), dict(stop_token_ids=[b], min_tokens=9),
            dict(stop_token_ids=[a], min_tokens=3),
            dict(stop_token_ids=[a, b], ignore_eos=True, min_tokens=9), dict(ignore_eos=True, min_tokens=4),
            dict(limit=[5, 24]), dict(limit=[24, 5, 12], prompts=PROMPTS), dict(limit=[3, 9, 24], prompts=PROMPTS))]
        # the ids end rows, min_tokens holds them back, but not past its count (the 3rd: no change)
        assert answers[0][0][1] == "stop" and answers[2][0][1] != "stop" and answers[4] == answers[0]
        assert len({str(x) for x in answers[:4] + answers[5:]}) == len(answers) - 1
    _replayed(graphed)


def test_logit_bias_sets_and_top_logprobs_counts_in_turn(tiny_hf_dir):
    eager, graphed = _engines(tiny_hf_dir)
    for spec in (None, "amphista"):
        def run(e, **kw):
            rs = e.generate_batch(PROMPTS[:2], 20, chat=False, speculative=spec, **kw)
            return [(r.token_ids, r.token_logprobs, r.top_logprobs) for r in rs]
        free = _same(eager, graphed, run)
        t1, t2 = free[0][0][2], free[1][0][4]
        answers = [_same(eager, graphed, lambda e: run(e, **kw), kw) for kw in (
            dict(logit_bias={t1: -100}), dict(logit_bias={t2: -100}), dict(logit_bias={t1: -100, t2: -100, 7: 4.0}),
            dict(logprobs=True), dict(logprobs=True, top_logprobs=2), dict(logprobs=True, top_logprobs=5),
            dict(logprobs=True, top_logprobs=2, logit_bias={t1: -100}))]
        assert len({str(x) for x in answers}) == len(answers)
    _replayed(graphed)


def _drafted(e, **kw):
    """One prompt sampled with typical acceptance at a temperature where it takes nearly every drafted token: the
    answer's tokens depend on the drafts and the tree, where greedy tokens never do."""
    rule = dict(acceptance="typical") if kw.get("speculative") else {}
    return _ids(e.generate_batch([PROMPTS[0]], 32, chat=False, temperature=1.5, **rule, **kw), steps=True)


def test_trees_of_one_size_in_other_shapes(tiny_hf_dir):
    """Trees with the node count, paths and depth of each other but other ranks (two path lists, both named
    "custom"; two fitted trees of the heads), and a static against a dynamic tree of one size."""
    eager, graphed = _engines(tiny_hf_dir)
    a, b = [[0], [1], [0, 0], [1, 0]], [[0], [1], [0, 0], [1, 1]]
    for e in (eager, graphed):
        e.heads.config.extra["trees"] = {"mix-5": [[0], [1], [0, 0], [0, 1]], "tuned-5": [[0], [1], [1, 0], [1, 1]]}
    # each tree twice in a row: the second run replays the first one's graphs with its own drafts copied in
    trees = (a, a, b, b, "mix-5", "tuned-5", "tuned-5", "tree-16", "dynamic-16", "dynamic-16", "dynamic-8", a)
    answers = [_same(eager, graphed, lambda e: _drafted(e, tree=tree, speculative="amphista"), tree) for tree in trees]
    assert len({str(x) for x in answers}) == len(set(map(str, trees)))
    _replayed(graphed)


def test_heads_loaded_between_runs(tiny_hf_dir):
    eager, graphed = _engines(tiny_hf_dir)
    runs = (("amphista", 2), ("amphista", 3), ("medusa", 2), ("medusa", 3), ("amphista", 2))
    answers = []
    for kind, seed in runs:
        def run(e):
            e.load_heads(random_heads(kind, e.model, num_heads=4, seed=seed))
            return _drafted(e, speculative=kind)
        answers.append(_same(eager, graphed, run, (kind, seed)))
    assert len({str(x) for x in answers}) == len(runs) - 1 and answers[0] == answers[-1]
    _replayed(graphed)


@pytest.mark.parametrize("spec", [None, "amphista"])
def test_rows_that_end_and_join(tiny_hf_dir, spec):
    """A batch whose rows end (an eager engine drops them, a graphed one keeps them) and take joining prompts,
    greedy (the tokens) and sampled with typical acceptance (tokens that follow the drafts)."""
    eager, graphed = _engines(tiny_hf_dir)

    def run(e):
        queue = [("Hello", 9), ("The quick", 20), ("def f", 5), ("x", 12)]

        def admit(free):
            got = queue[:min(free, 1)]
            del queue[:len(got)]
            return got
        e.generate_batch(PROMPTS[:2], [6, 18], chat=False, speculative=spec, admit=admit)
        return _ids(e.last_results), _drafted(e, speculative=spec) if spec else None
    assert len(_same(eager, graphed, run)[0]) == 6
    _same(eager, graphed, run)                 # again, on the graphs the first run captured
    _replayed(graphed)


def test_reuse_prefix_turns(tiny_hf_dir):
    eager, graphed = _engines(tiny_hf_dir)

    def chat(e):
        out, text = [], "Hello"
        for turn in range(3):
            r = e.generate(text, 12, chat=False, reuse_prefix=True, speculative="amphista", temperature=1.5,
                           acceptance="typical")
            out.append((r.token_ids, r.stats.extra.get("prompt_tokens_reused"), r.stats.decode_steps))
            text += r.text + " and more" * (turn + 1)
        return out
    turns = _same(eager, graphed, chat)
    assert all(reused for _, reused, _ in turns[1:])
    _replayed(graphed)


@pytest.mark.parametrize("spec", [None, "amphista"])
def test_a_run_stopped_by_nan_then_a_normal_one(tiny_hf_dir, spec):
    """A weight turned inf mid-answer (in place: the graphs read it) stops the run by NonFiniteError; restored, the
    next runs (one on the graphs the stopped run left with NaN state, one of another batch size) decode as the eager
    engine's do: the caches are cleared in place, the new run's state is copied in."""
    eager, graphed = _engines(tiny_hf_dir)

    def run(e):
        w = e.model.layers[1].attention_norm.weight
        keep, stopped = w.detach().clone(), False
        rule = dict(acceptance="typical") if spec else {}
        try:
            for i, _ in enumerate(e.stream(PROMPTS[0], 40, chat=False, speculative=spec, temperature=1.5,
                                           ignore_eos=True, **rule)):
                if i == 4:
                    with torch.no_grad():
                        w.fill_(float("inf"))
        except NonFiniteError:
            stopped = True
        finally:
            with torch.no_grad():
                w.copy_(keep)
        return stopped, _drafted(e, speculative=spec), _ids(e.generate_batch(PROMPTS[:2], 24, chat=False,
                                                                            speculative=spec), steps=True)
    assert _same(eager, graphed, run)[0]
    _replayed(graphed)


def test_draft_vocabulary_changed_between_runs(tiny_hf_dir):
    """set_draft_vocab drops the heads' gathered LM-head rows (_w_sub): a graph kept reading the old rows, scoring the
    new vocabulary's slots with the old tokens (same tokens for greedy, other drafts: other steps). Now those rows
    are fingerprinted: rebuilt by the next prefill, they drop the stale graph for a recapture."""
    eager, graphed = _engines(tiny_hf_dir, "medusa", draft_vocab_size=64)
    perm = torch.randperm(eager.config.vocab_size, generator=torch.Generator().manual_seed(0))
    ids, other = perm[:64], perm[64:128]
    answers = []
    # A reordered vocabulary drafts the same tokens (a stale graph: other ones), another set other tokens
    for vocab in (ids, ids.flip(0), other, ids.roll(7)):
        def run(e):
            e.heads.set_draft_vocab(vocab)
            greedy = _ids(e.generate_batch(PROMPTS[:2], 24, chat=False, speculative="medusa"), steps=True)
            return _drafted(e, speculative="medusa"), greedy
        answers.append(_same(eager, graphed, run, vocab[:4].tolist()))
    assert answers[0] == answers[1] == answers[3] != answers[2]
    _replayed(graphed)


def test_a_larger_batch_between_runs_of_one(tiny_hf_dir):
    """A batch of 3 between sampled runs of 1 outgrows the heads' SAL cache (reallocated: heads.sal_cache is a new
    cache); the second run of 1 has the first one's graph key, and a graph that kept reading the old SAL cache drafted
    from its stale entries (and, on a GPU, freed memory). Its addresses are fingerprinted: the graph is recaptured."""
    eager, graphed = _engines(tiny_hf_dir)

    def run(e):
        first, sal = _drafted(e, speculative="amphista"), e.heads.sal_cache
        batch = _ids(e.generate_batch(PROMPTS, 8, chat=False, speculative="amphista"))
        assert e.heads.sal_cache is not sal
        return first, batch, _drafted(e, speculative="amphista")
    _same(eager, graphed, run)
    _replayed(graphed)
    assert graphed.graphs.stats.dropped >= 1
