"""A batch of prompts of very unequal lengths prefills in groups on a CPU (generation.prefill_groups): one padded
forward computed every short prompt as long as the longest (a long prompt beside four short ones cost 4.9x its own
prefill). Rows must still answer exactly as alone, with the same first-token logprobs, joiners (admit) included."""
from __future__ import annotations

import pytest

from amphista_engine import generation
from amphista_engine.generation import prefill_groups

pytestmark = pytest.mark.usefixtures("one_thread_module")

LONG = [(7 * i + 3) % 200 + 5 for i in range(180)]
SHORT = [[11, 12, 13], [40, 41], [90, 91, 92, 93, 94], [150, 7, 8, 9]]


def test_groups_follow_the_padded_cost():
    # the long row alone; the short ones with it as a 1-token placeholder (covers_all)
    assert prefill_groups([300, 3, 4, 5, 2], covers_all=True) == [[1, 2, 3, 4], [0]]
    assert prefill_groups([300, 3, 300, 4]) == [[1, 3], [0, 2]]
    # like lengths, or too little padding to pay a forward: one group
    assert prefill_groups([50, 50, 50, 50], covers_all=True) == [[0, 1, 2, 3]]
    assert prefill_groups([10, 12], covers_all=True) == [[0, 1]]
    assert prefill_groups([7]) == [[0]]
    for lengths in ([1, 500, 2, 499, 3, 250], [64, 1, 1, 1, 1, 1, 1, 1, 1]):
        groups = prefill_groups(lengths, covers_all=True)
        assert sorted(b for g in groups for b in g) == list(range(len(lengths)))
        assert len(groups) > 1


def _forwards(engine, monkeypatch) -> list[tuple[int, int]]:
    """(rows, tokens) of every forward of more than one token a row (prefills) from now on."""
    seen, real = [], engine.model.forward

    def forward(tokens, *a, **k):
        if tokens.shape[1] > 1:
            seen.append(tuple(tokens.shape))
        return real(tokens, *a, **k)
    monkeypatch.setattr(engine.model, "forward", forward)
    return seen


@pytest.mark.parametrize("spec", [None, "amphista"])
def test_a_long_prompt_beside_short_ones_prefills_apart_and_rows_answer_as_alone(tiny_fp32_amphista4_engine,
                                                                                 monkeypatch, spec):
    engine = tiny_fp32_amphista4_engine
    prompts = [SHORT[0], LONG, *SHORT[1:]]
    kw = dict(max_new_tokens=10, ignore_eos=True, speculative=spec, logprobs=True, top_logprobs=2)
    alone = [engine.generate(p, **kw) for p in prompts]
    seen = _forwards(engine, monkeypatch)
    batch = engine.generate_batch(prompts, **kw)
    # no forward pads the short rows to the long prompt: the long one runs alone
    assert max(rows * tokens for rows, tokens in seen) <= len(LONG), seen
    assert (1, len(LONG)) in seen
    for a, b in zip(alone, batch):
        assert b.token_ids == a.token_ids
        assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-5)
        assert [[t for t, _ in top] for top in b.top_logprobs] == [[t for t, _ in top] for top in a.top_logprobs]
        assert b.stats.prompt_tokens == a.stats.prompt_tokens


def test_one_padded_forward_where_grouping_is_off(tiny_fp32_amphista4_engine, monkeypatch):
    """The measurement above can fail: with grouping off the batch pads every row to the long prompt."""
    engine = tiny_fp32_amphista4_engine
    monkeypatch.setattr(generation, "prefill_groups", lambda lengths, covers_all=False: [list(range(len(lengths)))])
    seen = _forwards(engine, monkeypatch)
    engine.generate_batch([LONG, *SHORT], max_new_tokens=2)
    assert (1 + len(SHORT), len(LONG)) in seen


def test_joiners_of_unequal_lengths_prefill_apart(tiny_fp32_amphista4_engine, monkeypatch):
    engine = tiny_fp32_amphista4_engine
    joiners = [SHORT[0], LONG, SHORT[1]]
    alone = [engine.generate(p, max_new_tokens=8, ignore_eos=True).token_ids for p in [SHORT[2], *joiners]]
    waiting = list(joiners)

    def admit(free):
        got = [(p, 8) for p in waiting[:free]]
        del waiting[:free]
        return got
    engine._cache_for(4)          # spare rows for the joiners, as a server's reserve_batch allocates them
    seen = _forwards(engine, monkeypatch)
    out = engine.generate(SHORT[2], max_new_tokens=8, ignore_eos=True, admit=admit)
    assert not waiting
    assert out.token_ids == alone[0]
    assert [r.token_ids for r in engine.last_results[1:]] == alone[1:]
    assert max(rows * tokens for rows, tokens in seen) <= len(LONG), seen


def test_no_groups_without_memory_for_their_own_cache(tiny_fp32_amphista4_engine, monkeypatch):
    """A later group prefills into a cache of its own beside the batch's: where the memory has no room for it, the
    batch prefills at once, as before."""
    from amphista_engine import kv_cache
    engine = tiny_fp32_amphista4_engine
    engine._cache_for(1 + len(SHORT))                 # the batch's own cache, allocated before memory "runs out"
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 64 << 10)
    seen = _forwards(engine, monkeypatch)
    engine.generate_batch([LONG, *SHORT], max_new_tokens=2)
    assert (1 + len(SHORT), len(LONG)) in seen


def test_the_heads_group_cache_holds_only_its_window(tiny_fp32_amphista4_engine, monkeypatch):
    """A later group's heads entries go to a cache of their own: at the engine's max_seq_len it cost every row its
    whole length, which `_room_for_groups` does not count; it holds the group's attention window, and the rows still
    answer as alone (the speculative test above)."""
    from amphista_engine.heads import amphista
    engine = tiny_fp32_amphista4_engine
    sizes, real = [], amphista.KVCache

    def cache(n_layers, batch, n_kv_heads, max_seq_len, *a, **k):
        sizes.append(max_seq_len)
        return real(n_layers, batch, n_kv_heads, max_seq_len, *a, **k)
    engine.generate_batch([SHORT[0], LONG], max_new_tokens=2, speculative="amphista")  # the batch's caches exist
    monkeypatch.setattr(amphista, "KVCache", cache)
    engine.generate_batch([SHORT[0], LONG], max_new_tokens=2, speculative="amphista")
    assert sizes and max(sizes) == generation.kv_window(len(LONG), engine.max_seq_len) < engine.max_seq_len, sizes
