"""`--speculative auto` on the CPU: speculation only where a timed step says it is faster than plain decoding."""
from __future__ import annotations

import json

import pytest

from amphista_engine import Engine, InputError
from amphista_engine.cli import main
from amphista_engine.heads import random_heads
from amphista_engine.heads.checkpoint import save_heads
from amphista_engine.shipped_heads import shipped_heads
from amphista_engine.speculation_check import HELD_OUT_DISCOUNT, candidate_trees, check_speculation, expected_tau
from conftest import needs_smollm2

pytest.importorskip("transformers")      # tiny_hf_dir


@pytest.fixture(scope="module")
def engine(tiny_fp32_amphista4_engine):
    return tiny_fp32_amphista4_engine


def _record_tau(engine, tree: str, tau: float | None):
    engine.heads.config.extra = {} if tau is None else {"tree_search": {"decoding_tau": {tree: tau}}}


def test_verdict_weighs_the_measured_step_cost_against_the_heads_tau(engine):
    _record_tau(engine, "tree-16", 50.0)              # no tree step costs 45 plain steps: speculation pays
    yes = check_speculation(engine, repeats=2, warmup=1)
    assert yes.pays and yes.tree == "tree-16" and yes.expected_tau == 50.0
    assert yes.plain_ms > 0 and yes.step_ms > 0 and yes.step_ratio == yes.step_ms / yes.plain_ms
    assert "speculation is faster" in yes.reason
    _record_tau(engine, "tree-16", 1.0)               # a tree step never costs less than 0.9 plain steps
    # 5 rounds: the verdict takes the median round, so one slow spell of a busy machine on a plain step (once 5.3 ms
    # against the tree's 3.1 in 2 rounds) does not make tau 1.0 pay
    no = check_speculation(engine, repeats=5, warmup=1)
    assert not no.pays and "plain decoding is faster" in no.reason and f"{no.step_ratio:.2f} plain steps" in no.reason
    _record_tau(engine, "tree-16", None)              # nothing to weigh against: do as asked, and say why
    unknown = check_speculation(engine, repeats=2, warmup=1)
    assert unknown.pays and unknown.plain_ms is None and "no measured tau" in unknown.reason


def test_expected_tau_prefers_the_traffic_weighted_fit():
    class Cfg:
        extra = {"tree_search": {"decoding_tau": {"tree-16": 2.5}},
                 "tree_search_mix": {"decoding_tau": {"tree-16": 2.3}}}
    assert expected_tau(Cfg, "tree-16") == 2.3 and expected_tau(Cfg, "tree-32") is None
    assert 0 < HELD_OUT_DISCOUNT < 1


def _cli_with_heads(tiny_hf_dir, tmp_path, extra: dict):
    """Random Amphista heads recording `extra` (their tree-search taus), saved; and `amphista generate` args
    that load them."""
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=512)
    heads = random_heads("amphista", eng.model, num_heads=4, seed=1)
    heads.config.extra = extra
    save_heads(heads, tmp_path / "heads")
    return heads, ["generate", "hi", "--model", str(tiny_hf_dir), "--max-new-tokens", "3", "--no-chat", "--device",
                   "cpu", "--max-seq-len", "256", "--heads", str(tmp_path / "heads"), "--json"]


@pytest.mark.parametrize("tau,method", [(1.0, None), (50.0, "amphista")])
def test_cli_auto_follows_the_check_and_an_explicit_method_does_not(tiny_hf_dir, tmp_path, capsys, tau, method):
    _, args = _cli_with_heads(tiny_hf_dir, tmp_path, {"tree_search": {"decoding_tau": {"tree-16": tau}}})
    assert main(args) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["speculative"] == method and out["speculation_check"]["pays"] == (method is not None)
    assert "note: a tree-16 step costs" in cap.err
    assert main(args + ["--speculative", "amphista"]) == 0       # asked for by name: no check, heads used
    cap = capsys.readouterr()
    assert json.loads(cap.out)["speculative"] == "amphista" and "note:" not in cap.err


def test_check_fits_a_small_cache(tiny_hf_dir):
    """A short cache shortens the timing prompt rather than overflowing it; one too short to time anything
    leaves the heads on, and says why."""
    for max_seq_len, timed in ((96, True), (40, False)):
        eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=max_seq_len)
        eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
        _record_tau(eng, "tree-16", 50.0)
        res = check_speculation(eng, repeats=2, warmup=1)
        assert res.pays and (res.plain_ms is not None) == timed
        assert timed or "too small" in res.reason


def test_engine_auto_uses_the_heads_only_where_they_pay(tiny_hf_dir, monkeypatch):
    """Engine.generate(speculative="auto"): one timed check per tree and heads, then plain or speculative steps;
    new heads are checked anew. Greedy output is the same either way."""
    import amphista_engine.speculation_check as sc
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    calls = []
    real = sc.check_speculation
    # 5 rounds: tau 1.0 must not pay through one slow plain step (see the test above)
    monkeypatch.setattr(sc, "check_speculation", lambda *a, **k: calls.append(1) or real(*a, repeats=5, warmup=1))
    plain = eng.generate("hello there", max_new_tokens=6, chat=False, speculative="auto")   # no heads: plain
    assert calls == [] and plain.stats.tau == 1.0
    results = {}
    for tau in (1.0, 50.0):
        heads = random_heads("amphista", eng.model, num_heads=4, seed=1)
        heads.config.extra = {"tree_search": {"decoding_tau": {"tree-16": tau}}}
        eng.load_heads(heads)
        results[tau] = [eng.generate("hello there", max_new_tokens=6, chat=False, speculative="auto")
                        for _ in range(2)]
    assert len(calls) == 2                            # once per heads, not once per generate
    assert all(r.stats.extra.get("tree") is None for r in results[1.0])
    assert all(r.stats.extra.get("tree") == "tree-16" for r in results[50.0])
    assert all(r.token_ids == plain.token_ids for rs in results.values() for r in rs)
    eng.heads = None
    with pytest.raises(Exception, match="needs drafting heads"):
        eng.speculation_check()


def test_step_costs_persist_between_engines(tiny_hf_dir, tmp_path, monkeypatch):
    """A second process (here: a fresh engine) reuses the step times measured by the first for the same setup
    and weighs them against its heads' own tau; another tree or dtype is measured anew; a corrupt file or
    entry is measured over; AMPHISTA_CACHE_DIR=off keeps nothing."""
    import amphista_engine.speculation_check as sc
    monkeypatch.setenv(sc.CACHE_ENV, str(tmp_path / "cache"))
    timings = []
    # synthetic costs (a tree step dearer than a plain one): measured on a busy machine, a plain step once took
    # longer than a 16-node one (5.3 vs 3.1 ms), and tau 1.0 "paid"; what is kept is what this test is about
    fake = _synthetic_steps([])
    monkeypatch.setattr(sc, "_time_steps", lambda *a: timings.append(",".join(t.name for t in a[1])) or fake(*a))

    def check(tau, tree="tree-16", dtype="fp32"):
        eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype=dtype, max_seq_len=256)
        eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
        _record_tau(eng, tree, tau)
        return check_speculation(eng, tree, repeats=2, warmup=1)

    first = check(50.0)
    assert timings == ["tree-16"] and first.pays and first.measured_on is None
    again = check(1.0)                                  # same setup, other heads' tau: cached times, new verdict
    assert timings == ["tree-16"] and not again.pays and again.measured_on is not None
    assert (again.plain_ms, again.step_ms) == (first.plain_ms, first.step_ms) and "kept in" in again.reason
    check(50.0, tree="chain-2")
    check(50.0, dtype="bf16")
    assert timings == ["tree-16", "chain-2", "tree-16"]
    file = sc.costs_file()
    assert file == tmp_path / "cache" / sc.COSTS_FILE and len(json.loads(file.read_text())) == 3
    entries = json.loads(file.read_text())
    file.write_text(json.dumps({k: {"plain_ms": "x"} for k in entries}))
    check(50.0)
    file.write_text("{not json")
    check(50.0)
    assert timings[3:] == ["tree-16", "tree-16"] and len(json.loads(file.read_text())) == 1
    monkeypatch.setenv(sc.CACHE_ENV, "off")
    assert sc.costs_file() is None
    check(50.0)
    check(50.0)
    assert timings[5:] == ["tree-16", "tree-16"]


def _synthetic_steps(calls):
    """_time_steps stand-in: a plain step of 10 ms and a tree step of 10 (1 + nodes / 16) ms, so the choice
    below depends on the taus only, not on this machine's timing noise."""
    def fake(engine, specs, *rest):
        calls.append([s.name for s in specs])
        return 10.0, {s.name: 10.0 * (1 + s.num_nodes / 16) for s in specs}
    return fake


@pytest.mark.parametrize("taus,timed,chosen", [
    # the best of the three smallest is not the biggest of them: nothing bigger is timed
    ({"chain-1": 1.5, "chain-2": 2.0, "chain-3": 2.05, "tree-16": 2.2, "tree-32": 3.8},
     [["chain-1", "chain-2", "chain-3"]], "chain-2"),
    # the biggest timed tree keeps winning: climb to the next size until it stops
    ({"chain-1": 1.5, "chain-2": 2.0, "chain-3": 2.6, "tree-16": 4.4, "tree-32": 6.0},
     [["chain-1", "chain-2", "chain-3"], ["tree-16"], ["tree-32"]], "tree-16"),
])
def test_no_tree_named_picks_the_fastest_of_the_heads_trees(engine, monkeypatch, taus, timed, chosen):
    import amphista_engine.speculation_check as sc
    calls = []
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps(calls))
    # a tree another beats on size and tau, and one deeper than the 4 heads, are never candidates
    engine.heads.config.extra = {"tree_search_mix": {"decoding_tau": {**taus, "mc_sim_7b_63": 1.0, "chain-5": 9.0}},
                                 "tree_search": {"decoding_tau": {"tree-16": 99.0}}}    # the mix record comes first
    engine._checks.clear()
    res = check_speculation(engine, repeats=2, warmup=1)
    assert calls == timed and res.tree == chosen and res.pays
    assert list(res.compared) == [t for batch in timed for t in batch]
    best = res.compared[chosen]
    assert best["speedup"] == max(c["speedup"] for c in res.compared.values())
    assert best["speedup"] == pytest.approx(taus[chosen] * HELD_OUT_DISCOUNT / best["step_ratio"], rel=1e-3)
    assert f"{chosen} comes out best here" in res.reason
    named = check_speculation(engine, "tree-32", repeats=2, warmup=1)     # a named tree is the only one weighed
    assert named.tree == "tree-32" and list(named.compared) == ["tree-32"] and calls[-1] == ["tree-32"]
    # and the Engine decodes on the tree the check chose (greedy output is the plain one either way)
    out = engine.generate("hello there", max_new_tokens=5, chat=False, speculative="auto")
    assert out.stats.extra["tree"] == chosen
    # tree="auto" asks for the same pick with the heads forced on; a named tree is kept
    forced = engine.generate("hello there", max_new_tokens=5, chat=False, speculative="amphista", tree="auto")
    assert forced.stats.extra["tree"] == chosen and forced.token_ids == out.token_ids
    named_run = engine.generate("hello there", max_new_tokens=5, chat=False, speculative="auto", tree="tree-32")
    assert named_run.stats.extra["tree"] == "tree-32"


def test_cli_auto_reports_the_trees_it_weighed(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    import amphista_engine.speculation_check as sc
    calls = []
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps(calls))
    heads, args = _cli_with_heads(tiny_hf_dir, tmp_path,
                                  {"tree_search_mix": {"decoding_tau": {"chain-1": 1.5, "chain-2": 2.0, "chain-3": 2.05}}})
    assert main(args) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["speculation_check"]["tree"] == "chain-2" and out["stats"]["tree"] == "chain-2"
    assert set(out["speculation_check"]["compared"]) == {"chain-1", "chain-2", "chain-3"}
    assert "chain-2 comes out best here" in cap.err
    heads.config.extra["tree_search_mix"]["decoding_tau"] = {"chain-1": 1.01, "chain-2": 1.02, "chain-3": 1.03}
    save_heads(heads, tmp_path / "heads")          # no tree pays: auto decodes plainly, a named method keeps heads
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["speculative"] is None and out["speculation_check"]["tree"] == "chain-1"
    assert main(args + ["--speculative", "amphista", "--tree", "auto"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["speculative"] == "amphista" and out["stats"]["tree"] == out["speculation_check"]["tree"]
    assert "uses the heads anyway" in cap.err


@needs_smollm2
def test_shipped_heads_offer_a_ladder_of_dynamic_trees():
    """What a CPU climbs with the shipped heads: their dynamic-N trees by size. Each beat the fitted mix-N tree of
    its size on held-out tau (tree-search --dynamic), and those beat the generic trees they record a tau for
    (tree-16, tree-32, mc_sim_7b_63), so only the dynamic ladder is left to time."""
    eng = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=512, quant="none")
    for kind, alias in (("amphista", "default"), ("medusa", "smollm2-135m-medusa")):   # the Python API's names
        eng.load_heads(alias)
        assert eng.heads.config.kind == kind
        ladder = candidate_trees(eng)
        assert [s.name for s in ladder] == ["dynamic-4", "dynamic-8", "dynamic-16", "dynamic-32", "dynamic-64"]
        assert [s.num_nodes for s in ladder] == [4, 8, 16, 32, 64]
        taus = [expected_tau(eng.heads.config, s.name) for s in ladder]
        fitted = [expected_tau(eng.heads.config, f"mix-{s.num_nodes}") for s in ladder]
        assert taus == sorted(taus) and all(t > f for t, f in zip(taus, fitted))
        assert expected_tau(eng.heads.config, "tree-16") < fitted[2]


def test_heads_aliases_resolve_to_shipped_directories(tmp_path, monkeypatch):
    from amphista_engine.shipped_heads import heads_alias
    assert heads_alias("default", "smollm2-135m") == shipped_heads("smollm2-135m", "amphista")
    assert heads_alias("smollm2-135m-medusa", "whatever") == shipped_heads("smollm2-135m", "medusa")
    with pytest.raises(InputError, match="no drafting heads are shipped for 'my.gguf'"):
        heads_alias("default", "my.gguf")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()                      # a directory of that name wins over the alias
    assert heads_alias("default", "smollm2-135m") == "default"
    assert heads_alias("/no/such/heads", "smollm2-135m") == "/no/such/heads"   # left for load_heads to name


def test_sampled_share_follows_the_measured_table():
    from amphista_engine.speculation_check import SAMPLED_KEPT, sampled_share
    assert sampled_share(0.0) == 1.0 and sampled_share(0.0, 0.5) == 1.0
    for t, at_1, at_09 in SAMPLED_KEPT:                  # the measured rows are met exactly
        if t > 0:
            assert sampled_share(t) == pytest.approx(at_1) and sampled_share(t, 0.9) == pytest.approx(at_09)
    ts = [0.05 * i for i in range(1, 60)]
    shares = [sampled_share(t) for t in ts]
    assert all(0.0 <= a <= 1.0 for a in shares) and all(b <= a + 1e-12 for a, b in zip(shares, shares[1:]))
    assert sampled_share(1.5) < sampled_share(1.0) and sampled_share(50.0) == 0.0
    assert sampled_share(0.7) < sampled_share(0.7, 0.95) < sampled_share(0.7, 0.9) == sampled_share(0.7, 0.2)


def test_auto_weighs_sampling_below_greedy(engine, monkeypatch):
    """Heads whose greedy tau pays for the tree step, but whose tokens past the first mostly go at temperature 1:
    speculative="auto" speculates greedy and decodes plainly when sampling; each setting gets its own verdict."""
    import amphista_engine.speculation_check as sc
    calls = []
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps(calls))     # a tree-16 step: 2.0 plain steps
    _record_tau(engine, "tree-16", 2.5)                                  # greedy here: 2.25 tokens a step
    engine._checks.clear()
    greedy = engine.speculation_check()
    hot = engine.speculation_check(temperature=1.0)
    assert greedy.pays and greedy.tree == "tree-16" and not hot.pays
    assert "temperature 1" in hot.reason and "temperature" not in greedy.reason
    assert hot.compared["tree-16"]["speedup"] == pytest.approx((1 + 1.25 * sc.sampled_share(1.0)) / 2.0, rel=1e-3)
    runs = {t: engine.generate("hello there", max_new_tokens=4, chat=False, speculative="auto", temperature=t,
                               seed=0) for t in (0.0, 1.0)}
    assert runs[0.0].stats.extra["tree"] == "tree-16" and "tree" not in runs[1.0].stats.extra
    assert engine.speculation_check(temperature=0.2).pays     # at or below 0.3 sampling was measured to keep all
    with pytest.raises(InputError, match="top_p"):
        engine.speculation_check(temperature=0.7, top_p=0)
    engine._checks.clear()


def test_a_batch_is_weighed_at_its_own_size(engine, monkeypatch):
    """A tree step's B x N rows are compute where a plain step's B rows share the weight reads (on the AMX Xeon a
    4-bit batch of 4 ran 0.66x plain batch decoding speculatively): "auto" times both steps at the batch's size
    (up to MAX_TIMED_BATCH) and may decode a batch plainly where one row speculates. Each size keeps its verdict."""
    import amphista_engine.speculation_check as sc
    calls = []

    def fake(engine, specs, prompt_tokens, cache_len, repeats, warmup, batch=1, settle_steps=None):
        calls.append(batch)        # plain: 10 ms at any batch; a 16-node tree: 10 (1 + 16 B / 16) ms
        return 10.0, {s.name: 10.0 * (1 + s.num_nodes * batch / 16) for s in specs}
    monkeypatch.setattr(sc, "_time_steps", fake)
    _record_tau(engine, "tree-16", 3.0)          # 2.7 tokens a step: pays against 2 plain steps, not against 4
    engine._checks.clear()
    one, three = engine.speculation_check(), engine.speculation_check(batch=3)
    assert calls == [1, 3] and one.pays and not three.pays and "batch of 3 rows" in three.reason
    assert engine.speculation_check(batch=3) is three and calls == [1, 3]          # kept per size
    assert engine.speculation_check(batch=100).step_ratio == pytest.approx(1 + sc.MAX_TIMED_BATCH)
    assert calls[-1] == sc.MAX_TIMED_BATCH
    prompts = ["hello there", "the quick brown fox", "one two"]
    batch = engine.generate_batch(prompts, max_new_tokens=5, chat=False, speculative="auto")
    single = engine.generate(prompts[0], max_new_tokens=5, chat=False, speculative="auto")
    assert all("tree" not in r.stats.extra for r in batch) and single.stats.extra["tree"] == "tree-16"
    assert batch[0].token_ids == single.token_ids
    assert sc.cost_key(engine, engine._tree_spec("tree-16"), 128) != sc.cost_key(engine, engine._tree_spec("tree-16"),
                                                                                    128, 2)
    engine._checks.clear()


def test_timed_trees_each_step_from_their_own_place_in_the_heads_cache(engine, monkeypatch):
    """The timed trees share the heads, so their SAL cache: every step added its accepted tokens to the one length,
    which ran past the cache's end (an IndexError mid-check) where the heads accept much. Each step now starts at
    its own decoder's length."""
    import amphista_engine.speculation_check as sc
    from amphista_engine.speculative import SpeculativeDecoder
    seen = []
    real = SpeculativeDecoder.step_device

    def step_device(self, kv_len):
        B = self.next.shape[0]
        seen.append((self.heads.sal_cache.length[:B].tolist(), self.cache.length[:B].tolist()))
        return real(self, kv_len)
    monkeypatch.setattr(SpeculativeDecoder, "step_device", step_device)
    specs = [engine._tree_spec(t) for t in ("chain-1", "chain-2", "tree-16")]
    sc._time_steps(engine, specs, 16, 16 + 64, repeats=2, warmup=1, batch=2, settle_steps=0)
    assert len(seen) == 3 * 2 * 2 and all(sal == target for sal, target in seen), seen     # 2 rounds of 2 steps


def test_a_gain_under_the_margin_keeps_plain_decoding(engine, monkeypatch):
    """A thin predicted gain is within the check's noise: under MIN_GAIN the check keeps plain decoding (a predicted
    1.02x on 4-bit SmolLM2, a 2-core AMX Xeon, once came out 0.88x)."""
    import amphista_engine.speculation_check as sc
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps([]))     # a tree-16 step: 2.0 plain steps
    engine._checks.clear()
    _record_tau(engine, "tree-16", 2.06 / HELD_OUT_DISCOUNT)           # 2.06 tokens a step: 1.03x
    thin = check_speculation(engine, repeats=2, warmup=1)
    assert not thin.pays and f"gain 1.03x, under the {sc.MIN_GAIN}x" in thin.reason
    _record_tau(engine, "tree-16", 2.2 / HELD_OUT_DISCOUNT)            # 1.1x
    assert check_speculation(engine, repeats=2, warmup=1).pays
    _record_tau(engine, "tree-16", 1.9 / HELD_OUT_DISCOUNT)            # 0.95x
    assert "plain decoding is faster" in check_speculation(engine, repeats=2, warmup=1).reason


def test_steps_are_timed_once_they_settle_into_their_own_pace(engine, monkeypatch):
    """A step right after another decoder's steps can run slower than in a run, where steps follow their own kind
    (4-bit SmolLM2 on the AMX Xeon: a plain step 5.8 ms after tree steps, 4.5 ms after ~12 plain ones). Timed one
    step of each in turn, every plain step was such a first one and the check priced a tree step at 1.76 plain
    steps where runs paid 2.1-2.3. Here every step of a decoder straight after another decoder's costs 30 ms more:
    the times must be those of the steps that follow their own kind."""
    import time

    import amphista_engine.speculation_check as sc
    from amphista_engine.generation import PlainDecoder
    from amphista_engine.speculative import SpeculativeDecoder
    last = []

    def slow_after_a_switch(real):
        def step(self):
            if last and last[-1] is not self:
                time.sleep(0.03)
            last.append(self)
            return real(self)
        return step
    for cls in (PlainDecoder, SpeculativeDecoder):
        monkeypatch.setattr(cls, "step", slow_after_a_switch(cls.step))
    specs = [engine._tree_spec("tree-16")]
    plain_ms, step_ms = sc._time_steps(engine, specs, 16, 16 + 400, repeats=3, warmup=1)
    assert plain_ms < 30 and step_ms["tree-16"] < 30, (plain_ms, step_ms)
    rounds, per_round = sc._blocks(3)
    per_decoder = [sum(1 for d in last if d is dec) for dec in dict.fromkeys(last)]
    assert rounds * (1 + per_round) <= min(per_decoder) and max(per_decoder) <= rounds * (sc.SETTLE_STEPS + per_round)


@pytest.mark.parametrize("others, kept", [(0.6, False), (0.1, True), (None, True)])
def test_step_times_taken_on_a_busy_machine_are_not_kept(engine, tmp_path, monkeypatch, others, kept):
    """Timed while other processes kept the CPUs busy (test jobs beside it: a 4-bit plain step timed at 20.1 ms,
    4.5 ms alone), the times priced every later run once kept: used for this run only, and said so."""
    import amphista_engine.speculation_check as sc
    monkeypatch.setenv(sc.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(sc, "BUSY_SHARE", 0.25)          # conftest lifts it for the suite's shared machine
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps([]))
    monkeypatch.setattr(sc, "others_share", lambda before, after: others)
    _record_tau(engine, "tree-16", 50.0)
    res = check_speculation(engine, "tree-16", repeats=2, warmup=1)
    assert res.pays and res.plain_ms == 10.0 and res.measured_on is None
    assert (tmp_path / sc.COSTS_FILE).is_file() == kept
    assert ("kept 60% of this process' CPUs busy meanwhile, so these times are not kept" in res.reason) != kept


def test_others_share_counts_what_other_processes_used():
    from amphista_engine.speculation_check import cpu_ticks, others_share
    # (now, busy ticks of our CPUs, our own ticks, CPUs): 2 CPUs for 100 ticks, 150 busy, 50 of them ours
    assert others_share((0.0, 1000, 10, 2), (100.0, 1150, 60, 2)) == 0.5
    assert others_share((0.0, 1000, 10, 2), (100.0, 1100, 110, 2)) == 0.0        # all ours
    assert others_share((0.0, 1000, 10, 2), (5.0, 1010, 10, 2)) is None          # too short to tell
    assert others_share(None, (100.0, 1150, 60, 2)) is None
    now = cpu_ticks()
    if now is not None:          # Linux: real readings, each count sane
        assert now[0] > 0 and now[1] >= now[2] >= 0 and now[3] >= 1


def test_an_engine_times_again_once_its_busy_verdict_is_old(engine, tmp_path, monkeypatch):
    """Regression: a verdict timed on busy CPUs was kept in the engine for its whole life (a server's first check,
    taken while another process ran, priced every later request); it is kept BUSY_KEEP_S, then timed again. A
    verdict timed on idle CPUs stays."""
    import amphista_engine.speculation_check as sc
    monkeypatch.setenv(sc.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(sc, "BUSY_SHARE", 0.25)
    calls = []
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps(calls))
    share = [0.6]
    monkeypatch.setattr(sc, "others_share", lambda before, after: share[0])
    _record_tau(engine, "tree-16", 50.0)
    engine._checks.clear()
    try:
        first = engine.speculation_check("tree-16")
        assert first.busy_since is not None and len(calls) == 1
        assert engine.speculation_check("tree-16") is first and len(calls) == 1     # fresh: kept
        first.busy_since -= sc.BUSY_KEEP_S + 1
        share[0] = 0.0
        second = engine.speculation_check("tree-16")
        assert second is not first and second.busy_since is None and len(calls) == 2
        second_again = engine.speculation_check("tree-16")
        assert second_again is second and len(calls) == 2
    finally:
        engine._checks.clear()
