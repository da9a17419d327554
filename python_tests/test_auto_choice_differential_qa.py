"""Differential QA of `speculative="auto"` / `tree="auto"`: the speed check's pick (speculation_check.py) against a
brute-force reference written from the README and the module doc, for seeded random step costs (injected in place of
the timing), recorded taus, batches, sampling settings and penalties; and the step-cost file's key and fallbacks."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from amphista_engine import speculation_check as sc
from amphista_engine.errors import AmphistaError
from amphista_engine.heads import random_heads

pytest.importorskip("transformers")      # tiny_hf_dir

POOL = ["chain-1", "chain-2", "chain-3", "chain-4", "dynamic-4", "dynamic-8", "dynamic-16", "tree-16",
        "mc_sim_7b_63"]


@pytest.fixture(scope="module")
def engine(tiny_fp32_amphista4_engine):
    return tiny_fp32_amphista4_engine


@pytest.fixture(autouse=True)
def _fresh(engine, monkeypatch):
    extra = engine.heads.config.extra
    monkeypatch.setattr(sc, "costs_file", lambda: None)
    yield
    engine.heads.config.extra = extra
    engine._checks.clear()


class FakeClock:
    """_time_steps stand-in: seeded random costs per (timed batch, tree), the plain step's per timed batch."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.plain, self.step, self.calls = {}, {}, []

    def plain_ms(self, batch):
        return self.plain.setdefault(batch, round(self.rng.uniform(2.0, 40.0), 3))

    def step_ms(self, batch, name):
        # ratios from under one plain step (AMX) to several (AVX2 bf16), rounded away from exact ties
        return self.step.setdefault((batch, name), round(self.plain_ms(batch) * self.rng.uniform(0.9, 4.0), 3))

    def __call__(self, engine, specs, prompt_tokens, cache_len, repeats, warmup, batch=1, settle=None):
        self.calls.append(([s.name for s in specs], batch))
        return self.plain_ms(batch), {s.name: self.step_ms(batch, s.name) for s in specs}


def _record(engine, taus: dict, key: str = "tree_search_mix"):
    engine.heads.config.extra = {**(engine.heads.config.extra or {}), key: {"decoding_tau": taus}}
    engine._checks.clear()


# ---- the reference, from the docs alone ------------------------------------------------------------------------------

def _along(points, x):
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return max(0.0, y1 + (y1 - y0) / (x1 - x0) * (x - x1))


def ref_share(temperature, top_p, min_p, rep, pres, freq):
    share = 1.0
    if temperature > 0:
        nucleus = min(1.0, max(0.0, (1 - top_p) / 0.1, min_p / 0.05))
        rows = [(0.0, 1.0), (0.3, 1.0), (0.7, 0.86 + 0.09 * nucleus), (1.0, 0.57 + 0.20 * nucleus)]
        share *= _along(rows, temperature)
    if rep > 1.0:
        share *= _along([(1.0, 1.0), (1.1, 0.80), (1.3, 0.46)], rep)
    if pres > 0:
        share *= _along([(0.0, 1.0), (0.8, 0.87)], pres)
    if freq > 0:
        share *= _along([(0.0, 1.0), (0.5, 0.83)], freq)
    return share


def ref_pick(engine, taus, cost, share):
    """(timed trees, best, its speedup): the heads' recorded trees that fit the CPU's verification, less those another
    beats on nodes and tau, smallest first; three timed, then one more while the biggest timed one wins."""
    specs = {}
    for name, tau in taus.items():
        try:
            s = engine._tree_spec(name)
        except AmphistaError:
            continue
        if tau and s.max_depth <= 7 and s.num_nodes <= 64:
            specs[name] = s
    keep = [n for n in specs if not any(
        specs[o].num_nodes <= specs[n].num_nodes and taus[o] >= taus[n]
        and (specs[o].num_nodes, taus[o]) != (specs[n].num_nodes, taus[n]) for o in specs)]
    keep.sort(key=lambda n: (specs[n].num_nodes, n))

    def speed(n):
        plain, step = cost(n)
        return (1 + (taus[n] * 0.9 - 1) * share) * plain / step

    k = min(3, len(keep))
    while True:
        best = max(keep[:k], key=speed)        # ties: the smaller tree (first in order)
        if best != keep[k - 1] or k == len(keep):
            return keep[:k], best, speed(best)
        k += 1


def _random_case(rng):
    names = rng.sample(POOL, rng.randint(1, len(POOL)))
    taus = {n: round(rng.uniform(1.0, 3.6), 3) for n in names}
    temperature = rng.choice([0.0, 0.0, 0.2, 0.5, 0.7, 0.9, 1.0, 1.3, 2.5])
    top_p = rng.choice([1.0, 1.0, 0.95, 0.9, 0.5])
    min_p = rng.choice([0.0, 0.0, 0.02, 0.05, 0.2])
    pens = (rng.choice([1.0, 1.0, 0.9, 1.05, 1.2, 1.5, 2.0]), rng.choice([0.0, 0.0, -0.5, 0.4, 1.0, 2.0]),
            rng.choice([0.0, 0.0, -1.0, 0.3, 0.7, 1.5]))
    batch = rng.choice([1, 1, 2, 3, 5, 8, 9, 20])
    return taus, temperature, top_p, min_p, pens, batch


@pytest.mark.parametrize("seed", range(60))
def test_the_pick_is_the_reference_argmax(engine, monkeypatch, seed):
    rng = random.Random(seed)
    clock = FakeClock(seed)
    monkeypatch.setattr(sc, "_time_steps", clock)
    taus, temperature, top_p, min_p, pens, batch = _random_case(rng)
    _record(engine, taus)
    rows = min(batch, sc.MAX_TIMED_BATCH)
    share = ref_share(temperature, top_p, min_p, *pens)
    assert sc.sampled_share(temperature, top_p, min_p) * sc.penalty_share(*pens) == pytest.approx(share, abs=1e-12)
    timed, best, speed = ref_pick(engine, taus, lambda n: (clock.plain_ms(rows), clock.step_ms(rows, n)), share)
    kind, tree, check = engine.resolve_speculation("auto", None, temperature, top_p, batch, min_p, *pens)
    assert clock.calls and all(b == rows for _, b in clock.calls)
    assert sorted(n for names, _ in clock.calls for n in names) == sorted(timed)
    assert (tree, check.tree) == (best, best)
    pays = speed >= sc.MIN_GAIN
    assert check.pays is pays and kind == ("amphista" if pays else None)
    assert set(check.compared) == set(timed)
    for n in timed:
        assert check.compared[n]["expected_tau"] == taus[n]
    plain, step = clock.plain_ms(rows), clock.step_ms(rows, best)
    assert (check.plain_ms, check.step_ms, check.expected_tau) == (plain, step, taus[best])
    # the reason's numbers are the ones weighed
    tau_here = 1 + (taus[best] * 0.9 - 1) * share
    r = check.reason
    assert f"a {best} step costs {step / plain:.2f} plain steps" in r
    assert f"({step:.1f} vs {plain:.1f} ms" in r and f"~{tau_here:.2f} tokens per step" in r
    assert f"({taus[best]:.2f} greedy on held-out data, x0.9" in r
    assert (f"keep {share:.0%} of the tokens" in r or f"keeps {share:.0%} of the tokens" in r) == (share != 1.0)
    assert (f"for a batch of {rows} rows" in r) == (batch > 1)
    assert ("larger batches are weighed at this size" in r) == (batch >= sc.MAX_TIMED_BATCH)
    assert (f"({', '.join(timed)} timed)" in r) == (len(timed) > 1)
    verdict = ("speculation is faster" if pays else "plain decoding is faster" if speed <= 1 else
               f"speculation would gain {speed:.2f}x, under the {sc.MIN_GAIN}x")
    assert verdict in r
    # tree="auto" under a named method makes the same pick and keeps the method even where plain is faster
    kind2, tree2, _ = engine.resolve_speculation("amphista", "auto", temperature, top_p, batch, min_p, *pens)
    assert (kind2, tree2) == ("amphista", best)
    # a named tree weighs that tree only
    named = rng.choice(sorted(taus))
    try:
        engine._tree_spec(named)
    except AmphistaError:
        return
    res = engine.speculation_check(named, temperature, top_p, batch, min_p, *pens)
    assert res.tree == named and list(res.compared) == [named]


def test_ties_go_to_the_smaller_tree(engine, monkeypatch):
    """Equal speedups: the first of the trees in size order wins (max keeps the first), and the climb stops there."""
    monkeypatch.setattr(sc, "_time_steps", lambda e, specs, *a: (10.0, {s.name: 10.0 * s.num_nodes for s in specs}))
    # chain-1 (2 nodes) at tau 2 and chain-3 (4 nodes) at tau 4: 1.8 x 10 / 20 = 3.6 x 10 / 40
    _record(engine, {"chain-1": 2.0, "chain-3": 4.0})
    res = engine.speculation_check()
    assert res.compared["chain-1"]["speedup"] == res.compared["chain-3"]["speedup"] == 0.9
    assert (1 + (2.0 * 0.9 - 1)) * 10 / 20 == (1 + (4.0 * 0.9 - 1)) * 10 / 40      # an exact tie in floats too
    assert res.tree == "chain-1" and not res.pays


def test_no_recorded_tau_no_heads_and_a_named_tree_without_tau(engine, monkeypatch):
    clock = FakeClock(1)
    monkeypatch.setattr(sc, "_time_steps", clock)
    # nothing recorded: the engine's default tree, untimed, speculating (module doc and reason)
    engine.heads.config.extra = {}
    engine._checks.clear()
    kind, tree, check = engine.resolve_speculation("auto", None)
    assert (kind, check.pays, clock.calls) == ("amphista", True, []) and "no measured tau" in check.reason
    assert tree == engine._tree_spec(None).name
    # a named tree the record lacks: the same, for that tree
    _record(engine, {"chain-2": 2.0})
    kind, tree, check = engine.resolve_speculation("auto", "chain-3")
    assert (tree, check.tree, check.pays, clock.calls) == ("chain-3", "chain-3", True, [])
    # no heads: auto decodes plainly, nothing weighed; the check itself refuses with an InputError
    heads = engine.heads
    try:
        engine.load_heads(None)
        assert engine.resolve_speculation("auto", None) == (None, None, None)
        assert engine.resolve_speculation("auto", "auto") == (None, "auto", None)
        with pytest.raises(AmphistaError, match="needs drafting heads"):
            engine.speculation_check()
    finally:
        engine.load_heads(heads)


@pytest.mark.parametrize("bad", ["abc", [2.0], {"x": 1}, float("nan"), float("inf"), -2.0, True])
def test_a_nonsense_recorded_tau_counts_as_none_recorded(engine, monkeypatch, bad):
    """A heads config edited by hand (or written by other tools) with a tau that is no number raised a ValueError /
    TypeError from every `speculative="auto"` run; NaN made the pick depend on the order of the trees, and inf or a
    negative tau decided the verdict. Such a tree has no recorded tau: the others are weighed without it."""
    clock = FakeClock(2)
    monkeypatch.setattr(sc, "_time_steps", clock)
    _record(engine, {"chain-1": 1.5, "chain-2": bad, "dynamic-4": 2.0})
    res = engine.speculation_check()
    assert set(res.compared) == {"chain-1", "dynamic-4"}
    assert all(math.isfinite(v["speedup"]) for v in res.compared.values())
    assert sc.expected_tau(engine.heads.config, "chain-2") is None
    # named, it is the "no measured tau" fallback, not a crash
    res = engine.speculation_check("chain-2")
    assert res.pays and "no measured tau" in res.reason


# ---- the step-cost file -------------------------------------------------------------------------------------------

def _with_file(monkeypatch, tmp_path):
    monkeypatch.setattr(sc, "costs_file", lambda: tmp_path / sc.COSTS_FILE)
    return tmp_path / sc.COSTS_FILE


def test_costs_prefilled_in_the_file_decide_as_timed_ones(engine, monkeypatch, tmp_path):
    """Differential: the pick from costs read off the file is the pick from the same costs timed."""
    file = _with_file(monkeypatch, tmp_path)
    for seed in range(8):
        rng = random.Random(100 + seed)
        taus, temperature, top_p, min_p, pens, batch = _random_case(rng)
        _record(engine, taus)
        clock = FakeClock(seed)
        monkeypatch.setattr(sc, "_time_steps", clock)
        file.unlink(missing_ok=True)
        timed = engine.speculation_check(None, temperature, top_p, batch, min_p, *pens)
        engine._checks.clear()
        clock.calls.clear()
        kept = engine.speculation_check(None, temperature, top_p, batch, min_p, *pens)
        assert clock.calls == []
        assert (kept.tree, kept.pays, kept.compared) == (timed.tree, timed.pays, timed.compared)
        assert kept.measured_on is not None and f"kept in {file}" in kept.reason


@pytest.mark.parametrize("content", ["", "{", "[1, 2]", "null", '"x"', "\x00\xff", '{"k": 1}'])
def test_a_corrupt_file_is_timed_over_and_rewritten(engine, monkeypatch, tmp_path, content):
    file = _with_file(monkeypatch, tmp_path)
    file.write_bytes(content.encode("latin-1"))     # "\x00\xff": bytes that are no UTF-8
    clock = FakeClock(3)
    monkeypatch.setattr(sc, "_time_steps", clock)
    _record(engine, {"chain-1": 1.6, "chain-2": 2.2})
    res = engine.speculation_check()
    assert clock.calls and res.measured_on is None
    assert len(json.loads(file.read_text())) >= 2


@pytest.mark.parametrize("entry", [{"plain_ms": -1, "step_ms": 2}, {"plain_ms": 0, "step_ms": 2},
                                   {"plain_ms": "1", "step_ms": 2}, {"plain_ms": True, "step_ms": 2},
                                   {"plain_ms": 1e400, "step_ms": 2}, {"step_ms": 2}, [1, 2], "x", None])
def test_nonsense_entries_are_timed_over(engine, monkeypatch, tmp_path, entry):
    file = _with_file(monkeypatch, tmp_path)
    _record(engine, {"chain-1": 1.6})
    key = sc.cost_key(engine, engine._tree_spec("chain-1"), 128)
    file.write_text(json.dumps({key: entry}))
    clock = FakeClock(4)
    monkeypatch.setattr(sc, "_time_steps", clock)
    res = engine.speculation_check()
    assert clock.calls == [(["chain-1"], 1)] and res.measured_on is None


def test_an_unreadable_file_costs_a_timing_only(engine, monkeypatch, tmp_path):
    file = _with_file(monkeypatch, tmp_path)
    file.mkdir()        # a folder where the file should be: unreadable and unwritable as a file
    clock = FakeClock(5)
    monkeypatch.setattr(sc, "_time_steps", clock)
    _record(engine, {"chain-1": 1.6})
    assert engine.speculation_check().measured_on is None and clock.calls


def _changes():
    """One key field changed at a time: (name, apply(engine, monkeypatch))."""
    def threads(e, mp):
        n = torch.get_num_threads()
        torch.set_num_threads(n + 1)
        return lambda: torch.set_num_threads(n)
    return [
        ("threads", threads),
        ("exact_greedy", lambda e, mp: mp.setenv("AMPHISTA_EXACT_GREEDY", "1")),
        ("dtype", lambda e, mp: mp.setattr(e, "dtype", torch.bfloat16)),
        ("quant", lambda e, mp: mp.setattr(e, "quant", "q8", raising=False)),
        ("packed", lambda e, mp: mp.setattr(e, "cpu_packed", not getattr(e, "cpu_packed", False), raising=False)),
        ("model", lambda e, mp: mp.setattr(e.config, "n_layers", e.config.n_layers + 1)),
        ("revision", lambda e, mp: mp.setattr(sc, "COSTS_REVISION", sc.COSTS_REVISION + 1)),
        ("cpu", lambda e, mp: mp.setattr(sc, "hardware", lambda d: "CPU another one, 1 threads")),
        ("kernels", lambda e, mp: mp.setattr("amphista_engine.kernels.get_backend", lambda d: "not-the-same")),
    ]


@pytest.mark.parametrize("change", _changes(), ids=[c[0] for c in _changes()])
def test_costs_kept_for_one_setup_are_never_used_for_another(engine, monkeypatch, tmp_path, change):
    """Differential over the key: the same check after one key field changed times its steps again (and its verdict,
    kept in the engine as well, is not served for the other setup)."""
    name, apply = change
    file = _with_file(monkeypatch, tmp_path)
    _record(engine, {"chain-1": 1.6, "chain-2": 2.2})
    clock = FakeClock(6)
    monkeypatch.setattr(sc, "_time_steps", clock)
    engine.speculation_check()
    spec = engine._tree_spec("chain-1")
    base = sc.cost_key(engine, spec, 128)
    assert base in json.loads(file.read_text())
    clock.calls.clear()
    undo = apply(engine, monkeypatch)
    try:
        assert sc.cost_key(engine, spec, 128) != base
        if name not in ("threads", "exact_greedy"):      # the others are fixed for an engine's life, set by hand
            engine._checks.clear()
        engine.speculation_check()
        assert clock.calls, f"{name}: the costs kept for another setup were used"
    finally:
        if undo:
            undo()
        engine._checks.clear()


def test_batches_are_keyed_by_their_timed_size(engine, monkeypatch, tmp_path):
    _with_file(monkeypatch, tmp_path)
    _record(engine, {"chain-1": 1.6})
    clock = FakeClock(7)
    monkeypatch.setattr(sc, "_time_steps", clock)
    for batch, timed in ((1, True), (2, True), (1, False), (3, True), (8, True), (9, False), (20, False)):
        clock.calls.clear()
        engine._checks.clear()
        engine.speculation_check(batch=batch)
        assert bool(clock.calls) is timed, batch
        if timed:
            assert clock.calls[0][1] == min(batch, sc.MAX_TIMED_BATCH)


@pytest.mark.parametrize("batch", [0, -1, 2.5, "3", None, True])
def test_a_bad_batch_is_refused_by_name(engine, batch):
    _record(engine, {"chain-1": 1.6})
    with pytest.raises(AmphistaError, match="batch"):
        engine.resolve_speculation("auto", None, batch=batch)


def test_another_models_heads_shapes_get_their_own_costs(engine, monkeypatch, tmp_path):
    file = _with_file(monkeypatch, tmp_path)
    _record(engine, {"chain-1": 1.6})
    clock = FakeClock(8)
    monkeypatch.setattr(sc, "_time_steps", clock)
    engine.speculation_check()
    heads = engine.heads
    try:
        engine.load_heads(random_heads("medusa", engine.model, num_heads=4, seed=1))
        _record(engine, {"chain-1": 1.6})
        clock.calls.clear()
        engine.speculation_check()
        assert clock.calls and len(json.loads(file.read_text())) == 2
    finally:
        engine.load_heads(heads)


@pytest.mark.parametrize("record", [[1, 2], "mix", {"decoding_tau": [1.5, 2.0]}, {"decoding_tau": "chain-1"}])
def test_a_malformed_tree_search_record_is_no_record(engine, monkeypatch, record):
    """A `tree_search_mix` record that is no mapping raised an AttributeError from every `speculative="auto"` run;
    now it counts as absent and the other record (`tree_search`) is weighed, as where the first has none."""
    clock = FakeClock(9)
    monkeypatch.setattr(sc, "_time_steps", clock)
    engine.heads.config.extra = {"tree_search_mix": record, "tree_search": {"decoding_tau": {"chain-2": 2.0}}}
    engine._checks.clear()
    res = engine.speculation_check()
    assert res.tree == "chain-2" and set(res.compared) == {"chain-2"}
    engine.heads.config.extra = {"tree_search_mix": record}
    engine._checks.clear()
    res = engine.speculation_check()
    assert res.pays and "no measured tau" in res.reason
