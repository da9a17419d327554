"""Continuous batching: prompts that join a run between its steps (stream_batch's admit) decode exactly as they do in a
run of their own: plain and speculative, eager (ended rows dropped, new ones appended) and through the CUDA-graph
bookkeeping (ended rows' slots reused, the batch grown), with the per-row options (limits, logprobs, penalties)."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.errors import CacheFullError, InputError
from amphista_engine.generation import GenerationStats, PlainDecoder, run
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams

from conftest import collect, random_tiny_model
from test_speculative import OracleHeads, _NoText

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPTS = ["The quick brown fox", "def f(x):", "Hello world, this is", "Once upon a time", "A B C D", "x = 1"]
LIMITS = [20, 5, 12, 9, 15, 7]


class Feeder:
    """admit(free): hands out the queued (prompt, limit) pairs, `per_call` at a time (all that fit when None), none
    in its first `wait` calls."""

    def __init__(self, items, per_call=None, wait=0):
        self.queue, self.per_call, self.wait, self.calls = list(items), per_call, wait, []

    def __call__(self, free):
        self.calls.append(free)
        if len(self.calls) <= self.wait:
            return []
        n = free if self.per_call is None else min(free, self.per_call)
        out, self.queue = self.queue[:n], self.queue[n:]
        return out


@pytest.fixture(scope="module")
def engine(tiny_amphista_engine):
    tiny_amphista_engine.reserve_batch(3)
    return tiny_amphista_engine


@pytest.mark.parametrize("speculative", [None, "amphista", "lookup", "amphista+lookup"])
@pytest.mark.parametrize("per_call", [1, None])
def test_joined_prompts_answer_as_alone(engine, speculative, per_call):
    opts = dict(chat=False, speculative=speculative, logprobs=True, top_logprobs=2)
    alone = [engine.generate(p, max_new_tokens=n, **opts) for p, n in zip(PROMPTS, LIMITS)]
    feed = Feeder(zip(PROMPTS[1:], LIMITS[1:]), per_call)
    texts, results, errors = collect(engine.stream_batch([PROMPTS[0]], [LIMITS[0]], admit=feed, row_results=True,
                                                         **opts))
    assert not errors and not feed.queue
    assert max(feed.calls) <= 3 and len(feed.calls) > 1        # the cache's 3 rows, given back as rows end
    for i, a in enumerate(alone):
        r = engine.last_results[i]
        assert (r.token_ids, r.finish_reason, r.text, texts.get(i, "")) == (a.token_ids, a.finish_reason, a.text,
                                                                             a.text), i
        assert r.prompt_token_ids == a.prompt_token_ids and results[i].token_ids == a.token_ids
        assert r.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-5)
        assert [[t for t, _ in top] for top in r.top_logprobs] == [[t for t, _ in top] for top in a.top_logprobs]
        assert r.stats.prompt_tokens == len(a.prompt_token_ids) and r.stats.new_tokens == len(a.token_ids)


def test_penalties_and_bias_follow_joined_rows(engine):
    opts = dict(chat=False, speculative=None, repetition_penalty=1.3, frequency_penalty=0.7, logit_bias={5: 2.0})
    alone = [engine.generate(p, max_new_tokens=n, **opts) for p, n in zip(PROMPTS[:4], LIMITS[:4])]
    feed = Feeder(zip(PROMPTS[1:4], LIMITS[1:4]), per_call=1)
    collect(engine.stream_batch([PROMPTS[0]], [LIMITS[0]], admit=feed, **opts))
    assert [r.token_ids for r in engine.last_results] == [a.token_ids for a in alone]


def test_refused_prompts_yield_errors_and_the_run_goes_on(engine):
    alone = engine.generate(PROMPTS[1], chat=False, max_new_tokens=6)
    feed = Feeder([("", 5), ("fox " * 200, 5), (PROMPTS[1], 6), (PROMPTS[2], 0)])
    texts, results, errors = collect(engine.stream_batch([PROMPTS[0]], 12, chat=False, admit=feed,
                                                         row_results=True))
    assert set(errors) == {1, 2, 4} and isinstance(errors[2], CacheFullError)
    assert "longer than the cache" in str(errors[2]) and "prompt 2" not in str(errors[2])
    assert "prompt is empty" in str(errors[1]) and "max_new_tokens must be a positive integer" in str(errors[4])
    assert engine.last_results[1] is None and engine.last_results[3].token_ids == alone.token_ids
    assert engine.last_results[0].finish_reason == "length" and not feed.queue


def test_admit_is_checked(engine):
    with pytest.raises(InputError, match="admit must be a function"):
        engine.generate_batch(["a"], max_new_tokens=2, admit=3)
    with pytest.raises(InputError, match="do not mix"):
        engine.generate("a", max_new_tokens=2, admit=lambda free: [], reuse_prefix=True)
    with pytest.raises(InputError, match=r"admit\(2\) returned 3 prompts"):
        engine.generate_batch(["a"], max_new_tokens=4, chat=False, admit=lambda free: [("b", 2)] * (free + 1))


# ---- the decoder level: eager drops vs graph-style slot reuse ---------------------------------------------------
def _ids(model, prompts, limits, params=SamplingParams(), batch=3, admit=None, graphs=None, heads=None):
    cache = KVCache.for_model(model.config, batch, 256, torch.float32, "cpu")
    if heads is None:
        dec = PlainDecoder(model, cache, params)
    else:
        from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
        dec = SpeculativeDecoder(model, cache, heads, TreeSpec("tree-16", heads.num_heads, "cpu"), params)
        dec.admits = True
    if graphs is not None:
        graphs.attach(dec)
    stats = [GenerationStats() for _ in prompts]
    list(run(dec, prompts, _NoText(), limits, [], [], stats, admit=admit))
    return [r.ids for r in dec.rows], dec


@pytest.mark.parametrize("kind", ["plain", "amphista"])
def test_graph_bookkeeping_reuses_ended_slots(kind):
    """Under CUDA graphs no row is dropped: a joining prompt takes an ended row's slot (state tensors updated in
    place, so the captured graph reads them) or grows the batch (a new key). The CPU double of the graphs checks the
    bookkeeping: every row's tokens as alone."""
    from amphista_engine.heads import random_heads
    from graph_standin import CPUGraphs as _CPUGraphs
    model = random_tiny_model(seed=11)
    prompts = [[5, 9, 2, 33, 17], [1], [60, 61, 62, 63, 1, 2, 3], [7, 7, 7], [40, 41], [3, 2, 1, 0]]
    limits = [30, 6, 14, 9, 20, 11]
    heads = random_heads("amphista", model, num_heads=3, seed=1) if kind == "amphista" else None
    alone = [_ids(model, [p], [n], heads=heads)[0][0] for p, n in zip(prompts, limits)]
    for graphs in (None, _CPUGraphs()):
        feed = Feeder(zip(prompts[1:], limits[1:]), per_call=1)
        got, dec = _ids(model, prompts[:1], limits[:1], admit=feed, graphs=graphs, heads=heads)
        assert got == alone and not feed.queue
        if graphs is not None:
            assert graphs.stats.replays > 0 and dec.next.shape[0] <= 3
    if kind == "amphista":       # long accepted runs: joined rows accept several tokens a step, as alone
        refs = [p + a for p, a in zip(prompts, alone)]
        feed = Feeder(zip(prompts[1:], limits[1:]), per_call=1)
        oracle = RowOracle(refs)
        got, dec = _ids(model, prompts[:1], limits[:1], admit=feed, heads=oracle)
        assert got == alone and oracle.accepted > len(alone) * 2


class RowOracle(OracleHeads):
    """OracleHeads with one reference per row (rows in the order they join), a cache length per row, and the
    joining and dropping of rows that the engine's heads do."""

    def __init__(self, refs):
        super().__init__(refs[0], 64, 3, hit=0.9)
        self.refs, self.joined, self.accepted = refs, 0, 0

    def reset_cache(self, batch, max_seq_len):
        self.length, self.row_ref, self.joined = torch.zeros(batch, dtype=torch.long), [0] * batch, 1

    def keep_rows(self, keep):
        self.length[:len(keep)] = self.length[keep].clone()
        self.row_ref[:len(keep)] = [self.row_ref[i] for i in keep.tolist()]

    def prefill_rows(self, rows, hidden, nxt, count, kv_len):
        for r in rows.tolist():
            self.length[r], self.row_ref[r] = 0, self.joined
            self.joined += 1
        return self._draft(rows, count)

    def step(self, hidden, next_tokens, count, kv_len):
        self.accepted += int((count - 1).clamp(min=0).sum())
        return self._draft(torch.arange(count.shape[0]), count)

    def _draft(self, rows, count):
        logits = torch.randn(len(rows), self.num_heads, self.V, generator=self.g)
        for j, r in enumerate(rows.tolist()):
            self.length[r] += count[j]
            ref = self.refs[self.row_ref[r]]
            for k in range(self.num_heads):
                pos = int(self.length[r]) + 1 + k
                if pos < len(ref) and torch.rand(1, generator=self.g).item() < self.hit:
                    logits[j, k, ref[pos]] = 100.0
        return logits


def test_amphista_heads_prefill_rows_fills_their_own_cache_rows():
    """A joined row's drafts, now and at the next step (which reads the heads' cache), are the drafts it gets alone;
    the other rows' cache entries are untouched."""
    from amphista_engine.heads import random_heads
    model = random_tiny_model(seed=2)
    heads = random_heads("amphista", model, num_heads=3, seed=1).float()
    g = torch.Generator().manual_seed(0)
    d = model.config.dim

    def h(n):
        return torch.randn(1, n, d, generator=g), torch.randint(0, 64, (1, n), generator=g)

    (ha, ta), (ha2, ta2), (hb, tb), (hb2, tb2) = h(5), h(2), h(7), h(2)
    with torch.inference_mode():
        heads.reset_cache(1, 64)
        alone0 = heads.step(hb, tb, torch.tensor([7]), 64)
        alone1 = heads.step(hb2, tb2, torch.tensor([2]), 64)
        heads.reset_cache(3, 64)
        heads.step(ha, ta, torch.tensor([5]), 64)
        row0 = heads.sal_cache.k[:, 0, :, :5].clone()
        joined0 = heads.prefill_rows(torch.tensor([1]), hb, tb, torch.tensor([7]), 64)
        assert torch.equal(heads.sal_cache.k[:, 0, :, :5], row0)
        assert heads.sal_cache.length[:2].tolist() == [5, 7]
        joined1 = heads.step(torch.cat([ha2, hb2]), torch.cat([ta2, tb2]), torch.tensor([2, 2]), 64)
    torch.testing.assert_close(joined0, alone0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joined1[1:], alone1, rtol=1e-5, atol=1e-5)


def test_admit_runs_outside_the_steps_inference_mode(tiny_amphista_engine):
    """admit() is the caller's code: a tensor it makes must be an ordinary one (an inference tensor can never join an
    autograd graph later), as it would be anywhere else in the caller's loop."""
    engine = tiny_amphista_engine
    engine._cache_for(2)
    made, waiting = [], [[7, 8, 9]]

    def admit(free):
        made.append((torch.is_inference_mode_enabled(), torch.ones(2).is_inference()))
        got = [(p, 4) for p in waiting[:free]]
        del waiting[:free]
        return got
    engine.generate([3, 4, 5], max_new_tokens=6, ignore_eos=True, admit=admit)
    assert made and not waiting
    assert all(not mode and not inference for mode, inference in made), made
