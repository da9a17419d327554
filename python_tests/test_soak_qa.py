"""QA of one Engine used for a long time, as a server or a notebook uses it (2026-12-05): many runs with changing
settings must neither grow the engine's memory nor let one run's state reach the next. Each test pins a bug that
a soak run found, with a short sequence on a tiny random checkpoint."""
from __future__ import annotations

import pytest
import torch

from amphista_engine import Engine, InputError
from amphista_engine.errors import NonFiniteError
from amphista_engine.heads import random_heads
from conftest import random_tiny_model

pytest.importorskip("transformers")        # tiny_hf_dir writes its checkpoint with it
pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT, OTHER = "The quick brown fox", "Hello, world!"


def _engine(tiny_hf_dir, kind=None, **kw):
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=256, **kw)
    if kind:
        eng.load_heads(random_heads(kind, eng.model, num_heads=3, seed=1))
    return eng


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    return _engine(tiny_hf_dir, "amphista")


def test_a_run_that_does_not_finish_leaves_no_result_not_the_previous_one(engine):
    """A stream closed early, or a run stopped by NonFiniteError, left `last_result` at an earlier run's result:
    a caller reading it after `break` got another prompt's text and stats without a word."""
    engine.generate(OTHER, max_new_tokens=4, chat=False)
    stream = engine.stream(PROMPT, max_new_tokens=20, chat=False)
    next(stream)
    stream.close()
    assert engine.last_result is None and engine.last_results == []
    engine.generate_batch([OTHER, PROMPT], max_new_tokens=4, chat=False)
    head, real = engine.model.output, engine.model.output.forward
    head.forward = lambda x: real(x).fill_(float("nan"))
    try:
        with pytest.raises(NonFiniteError):
            engine.generate(PROMPT, max_new_tokens=8, chat=False, speculative="amphista")
    finally:
        del head.forward
    assert engine.last_result is None and engine.last_results == []
    # an overtaken stream's error leaves the result of the run that overtook it
    first = engine.stream(PROMPT, max_new_tokens=20, chat=False)
    next(first)
    other = engine.generate(OTHER, max_new_tokens=4, chat=False)
    with pytest.raises(InputError, match="overtaken"):
        list(first)
    assert engine.last_result is other


def test_trees_kept_per_engine_stay_bounded(tiny_hf_dir, monkeypatch, tmp_path):
    """Every path list and every edit of a tree file was built and kept for the engine's lifetime: a server whose
    requests name their own trees grew without bound (529 trees after 300 requests). The most recent are kept;
    an evicted tree is rebuilt, and decodes as before."""
    import json
    import os

    from amphista_engine import engine as engine_module
    monkeypatch.setattr(engine_module, "KEPT_TREES", 4)
    eng = _engine(tiny_hf_dir, "amphista")
    trees = [[[0]] + [[r] for r in range(1, n)] for n in range(2, 9)]
    runs = [eng.generate(PROMPT, max_new_tokens=6, chat=False, speculative="amphista", tree=t).token_ids
            for t in trees]
    assert len(eng._trees) == 4
    file = tmp_path / "tree.json"
    for i, t in enumerate(trees[:3]):
        file.write_text(json.dumps(t))
        os.utime(file, ns=(i * 10**9, i * 10**9))         # an edit: a new modification time
        eng.generate(PROMPT, max_new_tokens=2, chat=False, speculative="amphista", tree=str(file))
    assert len(eng._trees) == 4
    again = eng.generate(PROMPT, max_new_tokens=6, chat=False, speculative="amphista", tree=trees[0]).token_ids
    assert again == runs[0] == eng.generate(PROMPT, max_new_tokens=6, chat=False).token_ids


def test_the_heads_cache_serves_every_batch_size_up_to_its_own(tiny_hf_dir):
    """Amphista's SAL cache was reallocated whenever the batch size changed (1, 2, 1, ...): new buffers each time,
    and on a GPU every captured graph reading them recaptured. A larger cache now serves smaller batches, as the
    target's cache does, with the same tokens as a fresh engine's."""
    eng = _engine(tiny_hf_dir, "amphista")
    spec = dict(max_new_tokens=10, chat=False, speculative="amphista", tree="tree-16")
    batch = eng.generate_batch([PROMPT, OTHER], **spec)
    buffers = eng.heads.sal_cache.k
    single = eng.generate(PROMPT, **spec)
    assert eng.heads.sal_cache.k is buffers
    fresh = _engine(tiny_hf_dir, "amphista")
    assert single.token_ids == fresh.generate(PROMPT, **spec).token_ids
    assert eng.generate_batch([PROMPT, OTHER], **spec)[1].token_ids == batch[1].token_ids
    assert [r.token_ids for r in batch] == [r.token_ids for r in fresh.generate_batch([PROMPT, OTHER], **spec)]


def test_a_speculation_check_is_a_run_for_the_streams_it_interrupts(tiny_hf_dir, monkeypatch):
    """A speculation check times steps on the drafting heads' own cache, resetting it: a stream resumed after
    one went on drafting from what the timing left there, and another thread's check did so in the middle of
    this thread's run (and timed its steps against it). It now overtakes a stream, and threads take turns as runs do."""
    eng = _engine(tiny_hf_dir, "amphista")
    eng.heads.config.extra = {"tree_search": {"decoding_tau": {"chain-2": 1.5}}}
    stream = eng.stream(PROMPT, max_new_tokens=40, chat=False, speculative="amphista", tree="chain-3")
    next(stream)
    from conftest import in_other_thread

    def other(run=False):
        eng.generate(OTHER, max_new_tokens=2, chat=False) if run else eng.speculation_check("chain-2")
    err = in_other_thread(other)
    assert isinstance(err, InputError) and "decoding in another thread" in str(err)
    assert eng.speculation_check("chain-2").plain_ms > 0              # timed, here: the stream is overtaken
    with pytest.raises(InputError, match="overtaken"):
        list(stream)
    from amphista_engine import speculation_check as sc
    real = sc.check_speculation
    errors = []

    def timing_meets_another_thread(engine, tree, **kw):     # another thread's run while this thread times steps
        errors.append(in_other_thread(lambda: other(run=True)))
        return real(engine, tree, **kw)
    monkeypatch.setattr(sc, "check_speculation", timing_meets_another_thread)
    eng.speculation_check("chain-3")
    assert len(errors) == 1 and "decoding in another thread" in str(errors[0])
    assert eng.generate(OTHER, max_new_tokens=3, chat=False).token_ids       # free again


@pytest.mark.parametrize("capture", ["works", "fails"])
def test_graph_bookkeeping_stays_bounded_under_seeded_sampling(capture):
    """A seeded sampling run's graph keys name its own generator, so every such run brings new keys: the warm-up
    counts, the uncapturable keys and the error list grew with each run of a long-lived engine (GPU)."""
    from amphista_engine.generation import PlainDecoder
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.sampling import SamplingParams
    from graph_standin import CPUGraphs as _CPUGraphs
    from test_cuda_graphs import decode

    class Failing(_CPUGraphs):
        def _record(self, decoder, eager, kv_len):
            raise RuntimeError("operation not permitted when stream is capturing")

    model = random_tiny_model(seed=2)
    cache = KVCache.for_model(model.config, 1, 128, torch.float32, "cpu")
    graphs = (_CPUGraphs if capture == "works" else Failing)(max_graphs=2)
    decoders = [PlainDecoder(model, cache, SamplingParams(temperature=0.8, seed=s)) for s in range(20)]
    for dec in decoders:         # all alive: their generators' ids, part of the keys, are not reused
        decode(dec, [[1, 2, 3]], 4, graphs=graphs)
    assert len(graphs.graphs) <= 2 and len(graphs.warm) <= 8 and len(graphs.uncapturable) <= 8
    assert len(graphs.stats.errors) <= 16
    assert graphs.stats.captures + graphs.stats.failed_captures >= 20
