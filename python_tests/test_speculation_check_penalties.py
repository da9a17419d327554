"""`--speculative auto` weighs the heads' tau down under repetition / presence / frequency penalties
(speculation_check.penalty_share, from benchmarks/results/cpu_penalties_ab.md), as it does for sampling: a run whose
penalty leaves the tree step unpaid decodes plainly."""
from __future__ import annotations

import pytest

import amphista_engine.speculation_check as sc
from amphista_engine import InputError

from test_speculation_check import _record_tau, _synthetic_steps

pytest.importorskip("transformers")      # tiny_hf_dir


@pytest.fixture(scope="module")
def engine(tiny_fp32_amphista4_engine):
    return tiny_fp32_amphista4_engine


def test_penalty_share_follows_the_measured_rows():
    assert sc.penalty_share() == 1.0
    for name, rows in sc.PENALTY_KEPT.items():
        for value, kept in rows:                     # each measured row is met exactly
            assert sc.penalty_share(**{name: value}) == pytest.approx(kept)
        grid = [rows[0][0] + 0.05 * i for i in range(60)]
        shares = [sc.penalty_share(**{name: v}) for v in grid]
        assert all(0.0 <= s <= 1.0 for s in shares) and all(b <= a + 1e-12 for a, b in zip(shares, shares[1:]))
        assert sc.penalty_share(**{name: 100.0}) == 0.0      # far past the rows: nothing kept
    assert sc.penalty_share(repetition_penalty=1.2) == pytest.approx((0.80 + 0.46) / 2)
    # penalties that favour repeats count as off (a conservative guess), and several multiply
    assert sc.penalty_share(0.9, -1.0, -0.5) == 1.0
    assert sc.penalty_share(1.1, 0.8, 0.5) == pytest.approx(0.80 * 0.87 * 0.83)


def test_auto_decodes_plainly_where_a_penalty_leaves_the_tree_unpaid(engine, monkeypatch):
    calls = []
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps(calls))     # a tree-16 step: 2.0 plain steps
    _record_tau(engine, "tree-16", 2.5)                                  # greedy here: 2.25 tokens a step
    engine._checks.clear()
    try:
        plain = engine.speculation_check()
        strong = engine.speculation_check(repetition_penalty=1.3)
        mild = engine.speculation_check(presence_penalty=0.1)
        assert plain.pays and not strong.pays and mild.pays
        assert "repetition 1.3" in strong.reason and "penalties" not in plain.reason
        assert strong.compared["tree-16"]["speedup"] == pytest.approx(
            (1 + 1.25 * sc.penalty_share(1.3)) / 2.0, rel=1e-3)
        # sampling and a penalty weigh together, and each setting keeps its own verdict
        both = engine.speculation_check(temperature=0.7, frequency_penalty=0.5)
        assert both.compared["tree-16"]["speedup"] == pytest.approx(
            (1 + 1.25 * sc.sampled_share(0.7) * sc.penalty_share(frequency_penalty=0.5)) / 2.0, rel=1e-3)
        assert "temperature 0.7 and penalties" in both.reason
        runs = {p: engine.generate("hello there", max_new_tokens=4, chat=False, speculative="auto",
                                   repetition_penalty=p) for p in (1.0, 1.3)}
        assert runs[1.0].stats.extra["tree"] == "tree-16" and "tree" not in runs[1.3].stats.extra
        with pytest.raises(InputError, match="repetition_penalty"):
            engine.speculation_check(repetition_penalty=0)
    finally:
        engine._checks.clear()
