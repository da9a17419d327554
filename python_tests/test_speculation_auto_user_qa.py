"""QA of `speculative="auto"` as a user meets it: the speed check's choice of trees, and the file of step times it
keeps between processes (timing_cache.py), which must never turn a run into a traceback."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from amphista_engine import Engine
from amphista_engine import speculation_check as sc
from amphista_engine import timing_cache
from amphista_engine.heads import random_heads
from conftest import needs_smollm2

pytest.importorskip("transformers")      # tiny_hf_dir


@pytest.fixture(scope="module")
def engine(tiny_fp32_amphista4_engine):
    return tiny_fp32_amphista4_engine


def _synthetic_steps(calls):
    """_time_steps stand-in: a plain step of 10 ms and a tree step of 10 (1 + nodes / 16) ms (the decision logic
    only, not this machine's timing noise)."""
    def fake(engine, specs, *rest):
        calls.append([s.name for s in specs])
        return 10.0, {s.name: 10.0 * (1 + s.num_nodes / 16) for s in specs}
    return fake


def _record(engine, taus: dict):
    engine.heads.config.extra = {"tree_search_mix": {"decoding_tau": taus}}
    engine._checks.clear()


def test_heads_recording_two_trees_time_both(engine, monkeypatch):
    """Heads whose tree search recorded two trees (fewer than the three timed first) raised an IndexError from the
    size climb, from every `speculative="auto"` run."""
    calls = []
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps(calls))
    for taus, chosen in (({"chain-1": 1.5, "chain-2": 2.0}, "chain-2"), ({"chain-1": 1.5, "chain-2": 1.55}, "chain-1")):
        _record(engine, taus)
        res = engine.speculation_check()
        assert calls[-1] == ["chain-1", "chain-2"] and res.tree == chosen and set(res.compared) == set(taus)
        out = engine.generate("hello there", max_new_tokens=4, chat=False, speculative="auto")
        assert out.stats.extra["tree"] == chosen


def test_trees_too_big_for_the_cache_are_left_out_not_all_untimed(tiny_hf_dir, monkeypatch):
    """A cache with room to time the heads' small trees but not their biggest one used to give up timing
    altogether and speculate untimed ("speculating as asked", though nobody asked): now the trees that fit are
    timed and weighed."""
    calls = []
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps(calls))
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
    _record(eng, {"chain-1": 1.01, "tree-32": 3.0})    # chain-1's step cost 1.06 plain steps: plain is faster
    res = eng.speculation_check()
    assert calls == [["chain-1"]] and res.plain_ms == 10.0 and not res.pays and list(res.compared) == ["chain-1"]
    assert "as asked" not in res.reason
    out = eng.generate("hello there", max_new_tokens=4, chat=False, speculative="auto")
    assert "tree" not in out.stats.extra                # decoded plainly, as the check found faster
    eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
    _record(eng, {"tree-32": 3.0})                      # nothing fits: untimed, and said so without "as asked"
    res = eng.speculation_check()
    assert res.plain_ms is None and "too small" in res.reason and "untimed" in res.reason


@pytest.fixture(scope="module")
def smollm2_engine():
    eng = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=128)
    eng.load_heads("default")
    return eng


@needs_smollm2
def test_shipped_heads_in_a_128_token_cache_are_timed(smollm2_engine, monkeypatch):
    """`amphista generate --max-seq-len 128` printed "too small to time a tree step: speculating as asked" and
    decoded on an untimed mix-4: dynamic-4 needs 80 slots to time, only dynamic-64 needs more than 128."""
    calls = []
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps(calls))
    monkeypatch.setattr(sc, "costs_file", lambda: None)
    res = smollm2_engine.speculation_check()
    assert res.plain_ms is not None and calls[0] == ["dynamic-4", "dynamic-8", "dynamic-16"]
    assert "dynamic-64" not in res.compared and res.tree in res.compared


def _check_with_cache(engine, monkeypatch, tmp_path, calls):
    monkeypatch.setenv(sc.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps(calls))
    _record(engine, {"chain-1": 50.0})
    return engine.speculation_check()


@pytest.mark.parametrize("content", ["{\"abc\": {\"plain_ms\": 1", "[1, 2]", "\"text\"", "[" * 100_000,
                                     "{\"x\": [\"plain_ms\"], \"y\": null}", b"\xff\xfe\x00{"])
def test_a_corrupt_costs_file_is_measured_over(engine, monkeypatch, tmp_path, content):
    """Truncated, wrongly typed, not UTF-8 or nested past Python's recursion limit (that one raised RecursionError
    out of every check): measured anew and rewritten."""
    file = tmp_path / sc.COSTS_FILE
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    calls = []
    res = _check_with_cache(engine, monkeypatch, tmp_path, calls)
    assert calls == [["chain-1"]] and res.pays and res.measured_on is None
    kept = json.loads(file.read_text())
    assert [e for e in kept.values() if isinstance(e, dict) and e.get("plain_ms") == 10.0]


def test_a_folder_where_the_costs_file_should_be_leaves_no_stray_files(engine, monkeypatch, tmp_path):
    """The write fails (os.replace onto a folder): each process left a step_costs.json.PID.tmp behind."""
    (tmp_path / sc.COSTS_FILE).mkdir()
    calls = []
    for _ in range(2):
        assert _check_with_cache(engine, monkeypatch, tmp_path, calls).pays
    assert calls == [["chain-1"], ["chain-1"]]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_cache_folder_that_cannot_be_made_costs_a_measurement_only(engine, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")            # (root ignores chmod: a file in the path fails for everyone)
    calls = []
    assert _check_with_cache(engine, monkeypatch, blocker / "sub", calls).pays and calls == [["chain-1"]]


def test_no_home_directory_measures_in_every_process(engine, monkeypatch):
    """No HOME and no passwd entry (a container's arbitrary uid): Path.home() raises RuntimeError, which came out
    of every speculative="auto" run."""
    monkeypatch.delenv(sc.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home(cls=None):
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(pathlib.Path, "home", classmethod(no_home))
    assert sc.costs_file() is None
    calls = []
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps(calls))
    _record(engine, {"chain-1": 50.0})
    assert engine.speculation_check().pays and calls == [["chain-1"]]


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    """The XDG spec calls a relative path invalid: it made a cache folder wherever the process was started."""
    monkeypatch.delenv(sc.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    assert sc.costs_file() == tmp_path / ".cache" / "amphista-engine" / sc.COSTS_FILE
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sc.costs_file() == tmp_path / "xdg" / "amphista-engine" / sc.COSTS_FILE


_WRITER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("tc", sys.argv[1])
tc = importlib.util.module_from_spec(spec); spec.loader.exec_module(tc)
from pathlib import Path
file, tag, start = Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
while time.time() < start:
    pass
for i in range(150):
    tc.write(file, {f"{tag}{i}": {"plain_ms": 1.0, "step_ms": 2.0}})
"""


def test_two_processes_writing_at_once_keep_each_others_entries(tmp_path):
    """Each write read the file, merged and replaced it: a writer between another's read and replace lost its
    entries (~10% of them here), to be measured again by the next process."""
    import time
    file = tmp_path / sc.COSTS_FILE
    start = time.time() + 1.0           # both begin together, after Python's start-up
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, timing_cache.__file__, str(file), tag, str(start)])
             for tag in "ab"]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    entries = timing_cache.read(file)
    assert len(entries) == 300 and all(e == {"plain_ms": 1.0, "step_ms": 2.0} for e in entries.values())
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_times_kept_for_another_thread_count_or_heads_are_not_reused(engine):
    """The README: keyed by CPU, threads, ..., heads shapes and tree."""
    spec = engine._tree_spec("chain-1")
    key = sc.cost_key(engine, spec, 128)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert sc.cost_key(engine, spec, 128) != key
    finally:
        torch.set_num_threads(threads)
    assert sc.cost_key(engine, spec, 128) == key and sc.cost_key(engine, spec, 100) != key
    heads = engine.heads
    try:
        engine.load_heads(random_heads("medusa", engine.model, num_heads=4, seed=1))
        assert sc.cost_key(engine, engine._tree_spec("chain-1"), 128) != key
    finally:
        engine.load_heads(heads)


def test_the_cli_note_numbers_agree_with_each_other_and_the_check(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    """The note printed the step times rounded to whole ms beside the ratio of the unrounded ones: on a 4-bit CPU
    (steps of 8-15 ms) "costs 1.75 plain steps here (15 vs 8 ms)", or here "1.06 ... (11 vs 10 ms)"."""
    import re

    from amphista_engine.cli import main
    from amphista_engine.heads.checkpoint import save_heads
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps([]))
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    heads = random_heads("amphista", eng.model, num_heads=4, seed=1)
    heads.config.extra = {"tree_search_mix": {"decoding_tau": {"chain-1": 1.5}}}
    save_heads(heads, tmp_path / "heads")
    assert main(["generate", "hi", "--model", str(tiny_hf_dir), "--max-new-tokens", "3", "--no-chat", "--max-seq-len",
                 "256", "--heads", str(tmp_path / "heads"), "--json"]) == 0
    cap = capsys.readouterr()
    check = json.loads(cap.out)["speculation_check"]
    m = re.search(r"costs ([\d.]+) plain steps here \(([\d.]+) vs ([\d.]+) ms", cap.err)
    ratio, step, plain = map(float, m.groups())
    assert step / plain == pytest.approx(ratio, abs=0.01)
    assert (step, plain) == (round(check["step_ms"], 1), round(check["plain_ms"], 1))
    assert ratio == round(check["compared"]["chain-1"]["step_ratio"], 2)
