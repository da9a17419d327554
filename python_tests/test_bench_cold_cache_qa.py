"""The kernel microbenchmarks time with a cold L2 (benchmarks/kernels/_bench.py): before, the inputs were replayed
back to back (a CUDA graph of 20 calls), so whatever fit in L2 stayed there and a copy of a kernel's bytes read
144% of the copy ceiling (H100, prefix 1024). No GPU here: the CUDA path runs on fake events, graphs and flushes
that log what the timing does, on a device clock that only the work advances."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "benchmarks" / "kernels"
sys.path.insert(0, str(KERNELS))

import _bench  # noqa: E402

FLUSH_US, CALL_US = 100.0, 2.0


class _FakeCuda:
    """Device clock and log: a flush costs FLUSH_US of device time, a call of the timed function CALL_US."""

    def __init__(self):
        self.clock = 0.0
        self.log: list[str] = []

    def call(self):
        self.log.append("call")
        self.clock += CALL_US

    def flush(self):
        self.log.append("flush")
        self.clock += FLUSH_US

    def event(self):
        fake = self

        class Event:
            def record(self):
                fake.log.append("record")
                self.at = fake.clock

            def synchronize(self):
                pass

            def elapsed_time(self, end):            # ms, as torch.cuda.Event's
                return (end.at - self.at) / 1e3
        return Event()

    def capture(self, fn, calls):
        fake = self
        self.log.append(f"capture x{calls}")

        class Graph:
            def replay(self):
                fake.log.append("replay")
                for _ in range(calls):
                    fn()
        return Graph()


def _bench_on_fake_gpu(monkeypatch, *flags, iters=20, reps=7):
    """A Bench that believes it runs on CUDA, its device calls replaced by a _FakeCuda."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    bench = _bench.Bench(_bench.parse_args("qa", ["--quick", "--backends", "torch", "--reps", str(reps), *flags]))
    bench.iters = iters                      # the GPU default; --quick's 1 would hide the graph's length
    fake = _FakeCuda()
    monkeypatch.setattr(bench, "flush_l2", fake.flush)
    monkeypatch.setattr(bench, "_event", fake.event)
    monkeypatch.setattr(bench, "_sync", lambda: fake.log.append("sync"))
    monkeypatch.setattr(bench, "_capture", fake.capture)
    bench._ceiling = 1000.0                  # GB/s: the ceiling's own copy is another test
    return bench, fake


def _timed_windows(log: list[str]) -> list[tuple[str, list[str]]]:
    """(what came just before the start event, what ran between start and end) for each timed window."""
    out, i = [], 0
    while i < len(log):
        if log[i] == "record":
            j = log.index("record", i + 1)
            before = next((e for e in reversed(log[:i]) if e != "sync"), "")
            out.append((before, log[i + 1:j]))
            i = j + 1
        else:
            i += 1
    return out


def test_cold_graph_timing_flushes_before_every_timed_replay(monkeypatch):
    """Before: no flush at all; one graph of 20 calls replayed, 19 of them on inputs the last one left in L2."""
    bench, fake = _bench_on_fake_gpu(monkeypatch)
    assert bench.cold and bench.l2_mode == "cold"
    us = bench._graph_us(fake.call)
    assert fake.log[0] == "capture x1"                  # one call a graph: a second would find its inputs in L2
    windows = _timed_windows(fake.log)
    assert len(windows) == bench.reps
    assert all(before == "flush" and inside == ["replay", "call"] for before, inside in windows)
    assert us == pytest.approx(CALL_US)                 # the flush's own time stays out of the measurement


def test_cold_eager_timing_flushes_then_lets_the_device_idle(monkeypatch):
    """eager_us keeps its meaning (host dispatch included): flush, sync, then the call between the events."""
    bench, fake = _bench_on_fake_gpu(monkeypatch)
    us = bench._eager_us(fake.call)
    timed = fake.log[3:]                                 # after the 3 warm-up calls
    assert fake.log[:3] == ["call"] * 3
    windows = _timed_windows(timed)
    assert len(windows) == bench.reps
    assert all(before == "flush" and inside == ["call"] for before, inside in windows)
    for i, e in enumerate(timed):
        if e == "flush":
            assert timed[i + 1] == "sync"
    assert us == pytest.approx(CALL_US)


def test_cold_loop_fallback_flushes_too(monkeypatch):
    """Where the capture fails, the eager loop it falls back to flushes before each timed call as well."""
    bench, fake = _bench_on_fake_gpu(monkeypatch)
    monkeypatch.setattr(bench, "_capture", lambda fn, calls: None)
    bench._graph_us(fake.call)
    windows = _timed_windows(fake.log)
    assert len(windows) == bench.reps and all(b == "flush" and i == ["call"] for b, i in windows)


def test_warm_l2_flag_restores_the_old_back_to_back_timing(monkeypatch):
    bench, fake = _bench_on_fake_gpu(monkeypatch, "--warm-l2")
    assert not bench.cold and bench.l2_mode == "warm"
    us = bench._graph_us(fake.call)
    assert "flush" not in fake.log
    assert fake.log[0] == f"capture x{bench.iters}"
    windows = _timed_windows(fake.log)
    assert len(windows) == bench.reps
    assert all(inside == ["replay"] + ["call"] * bench.iters for _, inside in windows)
    assert us == pytest.approx(CALL_US)
    fake.log.clear()
    bench._eager_us(fake.call)
    assert "flush" not in fake.log


@pytest.mark.parametrize("flags, mode", [((), "cold"), (("--warm-l2",), "warm")])
def test_rows_and_meta_record_the_l2_mode(monkeypatch, flags, mode):
    """Before: nothing in a row said how it was timed, so the old warm rows read like the new ones."""
    bench, fake = _bench_on_fake_gpu(monkeypatch, *flags)
    row = bench.row("k", "tiny", "case", "torch", fake.call, bytes_moved=1e6)
    assert row["l2"] == mode
    assert "l2" in _bench.COLS                          # the printed and recorded tables show it too
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(bench, "flush_bytes", lambda: 256 * 2**20)
    m = _bench.meta(bench)
    assert m["l2"] == mode
    assert ("cold L2" in m["timing"]) == (mode == "cold")


def test_gpu_copy_ceiling_never_fits_in_l2(monkeypatch):
    """The ceiling's buffers are far larger than any L2, quick or not, and it is timed without a flush (none is
    needed: back-to-back copies of 1 GiB find none of their bytes in L2). Before: --quick on a GPU copied 16 MiB,
    which fits in an H100's 50 MB L2: the ceiling was L2's bandwidth."""
    sizes = []
    real_empty = torch.empty

    def empty(n, dtype=None, device=None):
        sizes.append(n)
        return real_empty(1, dtype=dtype)
    for quick in (True, False):
        bench, fake = _bench_on_fake_gpu(monkeypatch)
        bench.quick, bench._ceiling = quick, None
        monkeypatch.setattr(bench, "flush_bytes", lambda: 4 * 60 * 10**6)      # an H200's L2 x 4
        monkeypatch.setattr(torch, "empty", empty)
        dst = types.SimpleNamespace(copy_=lambda src, fake=fake: fake.call())
        monkeypatch.setattr(torch, "empty_like", lambda t, dst=dst: dst)
        bench.copy_bandwidth_gbs()
        monkeypatch.setattr(torch, "empty", real_empty)
        assert sizes[-1] >= 4 * 60 * 10**6
        assert "call" in fake.log and "flush" not in fake.log
    assert sizes[-1] == 2**30


def test_cpu_runs_record_no_flush_and_accept_the_flag(tmp_path):
    """On a CPU nothing is flushed ("l2": "n/a") and --warm-l2 is harmless; every benchmark runs with --quick."""
    for flags in ((), ("--warm-l2",)):
        out = tmp_path / f"k{len(flags)}.json"
        proc = subprocess.run([sys.executable, str(KERNELS / "run_all.py"), "--quick", "--json", str(out), *flags],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        doc = json.loads(out.read_text())
        assert "errors" not in doc
        assert doc["meta"]["l2"] == "n/a"
        assert doc["rows"] and all(r["l2"] == "n/a" for r in doc["rows"])
        kernels = {r["kernel"] for r in doc["rows"]}
        assert {"tree_attention", "linear", "rmsnorm"} <= kernels


def test_single_scripts_and_tune_take_the_flag():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(KERNELS / "rmsnorm.py"), "--quick", "--warm-l2"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| l2 |" in proc.stdout and "| n/a |" in proc.stdout
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(KERNELS / "tune.py"), "--quick", "--warm-l2", "--out", "/nonexistent"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert "unrecognized arguments" not in proc.stderr
    assert "nothing to sweep here" in proc.stderr          # a CPU without the interpreter: the flag parsed first
