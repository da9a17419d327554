"""A tree d deep reads the drafts of the first d heads only, so the speculative decoder asks the heads for those
(heads.step(..., depth=d)): on a CPU each head's LM-head rows cost about as much as the whole ResBlocks pass. The
drafts it gets must be the full drafts' first d rows, and the answers those of plain decoding."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.heads import random_heads
from model_helpers import rel_err as _rel

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.mark.parametrize("kind,extra", [("amphista", {}), ("medusa", {}), ("medusa", {"per_head_lm_head": True})])
def test_a_shallow_draft_is_the_full_drafts_first_heads(tiny_amphista_engine, kind, extra):
    model = tiny_amphista_engine.model
    heads = random_heads(kind, model, num_heads=4, seed=3, **extra)
    if extra.get("per_head_lm_head"):
        with torch.no_grad():
            heads.lm_heads.copy_(torch.randn(heads.lm_heads.shape, generator=torch.Generator().manual_seed(4)))
    g = torch.Generator().manual_seed(5)
    B, M, d = 3, 6, model.config.dim
    hidden = torch.randn(B, M, d, generator=g)
    nxt = torch.randint(0, model.config.vocab_size, (B, M), generator=g)
    count = torch.tensor([6, 2, 4])
    with torch.inference_mode():
        heads.reset_cache(B, 64)
        full = heads.step(hidden, nxt, count, 64)
        for depth in (1, 2, 3, 4):
            heads.reset_cache(B, 64)
            part = heads.step(hidden, nxt, count, 64, depth=depth)
            assert part.shape == (B, depth, full.shape[-1])
            assert _rel(part, full[:, :depth]) < 1e-5, (kind, depth)


@pytest.mark.parametrize("tree,depth", [("chain-2", 2), ([[0], [1], [0, 0]], 2), ("dynamic-3", 2), ("dynamic-6", 3)])
def test_the_decoder_scores_only_the_heads_its_tree_reads(tiny_amphista_engine, monkeypatch, tree, depth):
    engine = tiny_amphista_engine
    engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
    rows, real = [], engine.heads.logits

    def logits(x):
        rows.append(x.shape[-2])
        return real(x)
    monkeypatch.setattr(engine.heads, "logits", logits)
    prompt = [5, 9, 13, 21, 34, 55]
    plain = engine.generate(prompt, max_new_tokens=12, ignore_eos=True)
    spec = engine.generate(prompt, max_new_tokens=12, ignore_eos=True, speculative="amphista", tree=tree)
    assert rows and set(rows) == {depth}, rows
    assert spec.token_ids == plain.token_ids
    assert spec.stats.tau > 0


def test_joiners_draft_as_deep_as_the_tree(tiny_amphista_engine):
    """Rows that join a run (admit) get drafts of the run's depth: a full-depth draft copied into the run's drafts
    raised a shape error."""
    engine = tiny_amphista_engine
    engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=2))
    engine._cache_for(2)
    waiting = [[7, 8, 9, 10]]

    def admit(free):
        got = [(p, 6) for p in waiting[:free]]
        del waiting[:free]
        return got
    alone = engine.generate([7, 8, 9, 10], max_new_tokens=6, ignore_eos=True).token_ids
    out = engine.generate([3, 4, 5], max_new_tokens=6, ignore_eos=True, speculative="amphista", tree="chain-2",
                          admit=admit)
    assert not waiting and out.token_ids
    assert engine.last_results[1].token_ids == alone


def test_the_heads_take_only_the_rows_some_batch_row_accepted(tiny_amphista_engine, monkeypatch):
    """On a CPU the heads' fusion and SAL cost by the row: after a step they take as many rows as the longest accepted
    path (the tree's D + 1 before)."""
    engine = tiny_amphista_engine
    engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
    seen, real = [], engine.heads.step

    def step(hidden, next_tokens, count, kv_len, depth=None):
        out = real(hidden, next_tokens, count, kv_len, depth)
        seen.append((hidden.shape[1], int(count.max())))
        return out
    monkeypatch.setattr(engine.heads, "step", step)
    prompts = [[5, 9, 13, 21, 34, 55], [3, 1, 4, 1, 5]]
    plain = engine.generate_batch(prompts, max_new_tokens=16, ignore_eos=True)
    spec = engine.generate_batch(prompts, max_new_tokens=16, ignore_eos=True, speculative="amphista", tree="chain-3")
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    steps = seen[1:]                              # after the prompt's pass
    assert steps and all(rows == max(accepted, 1) for rows, accepted in steps), steps
    assert any(rows < 4 for rows, _ in steps), steps      # chain-3: D + 1 = 4 rows before


def test_padding_rows_past_every_count_leave_the_drafts_alone(tiny_amphista_engine):
    """What the trimming relies on: rows past every row's count change no draft (they land past the new lengths)."""
    heads = random_heads("amphista", tiny_amphista_engine.model, num_heads=3, seed=6)
    g = torch.Generator().manual_seed(7)
    d, V = tiny_amphista_engine.model.config.dim, tiny_amphista_engine.model.config.vocab_size
    prompt_h, prompt_t = torch.randn(2, 5, d, generator=g), torch.randint(0, V, (2, 5), generator=g)
    step_h, step_t = torch.randn(2, 4, d, generator=g), torch.randint(0, V, (2, 4), generator=g)
    count = torch.tensor([2, 1])
    drafts = {}
    with torch.inference_mode():
        for rows in (4, 2):
            heads.reset_cache(2, 64)
            heads.step(prompt_h, prompt_t, torch.tensor([5, 3]), 64)
            drafts[rows] = heads.step(step_h[:, :rows], step_t[:, :rows], count, 64)
    assert _rel(drafts[2], drafts[4]) < 1e-6
