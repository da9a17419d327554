"""The kernel backend switch as a user meets it on a CPU (README "Kernels and the backend switch"): AMPHISTA_BACKEND
and use_backend, what the default is with and without the `_cpu` extension, a backend that cannot run here named
once at load, a misspelt one refused with the choices, scoped choices that stay with their engine, triton through
the interpreter giving torch's greedy tokens, and the kernel microbenchmarks timing only kernels that exist."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from amphista_engine import _ext
from amphista_engine.errors import ConfigError
from amphista_engine.kernels import backend, cpu_ops, get_backend, ops, reference, set_backend, triton_ops, use_backend

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("one_thread_module"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")]


@pytest.fixture(autouse=True)
def fresh_switch(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    backend.clear_cache()
    yield
    set_backend(None)
    backend.clear_cache()


def _load(hf_dir, **kw):
    from amphista_engine import Engine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine.from_pretrained(str(hf_dir), device="cpu", dtype="fp32", max_seq_len=96, **kw)
    return engine, [str(w.message) for w in caught if "kernel backend" in str(w.message)]


def test_env_var_names_and_precedence(monkeypatch):
    default = "cpu" if backend.cpu_available() else "torch"
    assert get_backend("cpu") == default
    for raw, want in [("torch", "torch"), (" CPU ", "cpu"), ("triton", "triton"), ("cuda", "cuda")]:
        monkeypatch.setenv(backend.ENV_VAR, raw)
        backend.clear_cache()
        assert get_backend("cpu") == want
    set_backend("cpu")                              # process-wide beats the variable ...
    assert get_backend("cpu") == "cpu"
    with use_backend("torch"):                      # ... and a scoped choice beats both
        assert get_backend("cpu") == "torch"
        with use_backend(None):
            assert get_backend("cpu") == "torch"
    assert get_backend("cpu") == "cpu"


@pytest.mark.parametrize("where", ["env", "use_backend", "set_backend"])
def test_a_misspelt_backend_is_refused_with_the_choices(monkeypatch, where):
    with pytest.raises(ConfigError) as err:
        if where == "env":
            monkeypatch.setenv(backend.ENV_VAR, "trition")
            backend.clear_cache()
            get_backend("cpu")
        elif where == "use_backend":
            with use_backend("trition"):
                pass
        else:
            set_backend("trition")
    msg = str(err.value)
    assert "'trition'" in msg and all(b in msg for b in backend.BACKENDS)
    if where == "env":
        assert backend.ENV_VAR in msg and "unset" in msg


@pytest.mark.parametrize("name,why", [("cuda", "CUDA tensors only"), ("triton", "TRITON_INTERPRET=1")])
def test_a_backend_that_cannot_run_on_the_cpu_is_named_once_at_load(tiny_hf_dir, monkeypatch, name, why):
    monkeypatch.setenv(backend.ENV_VAR, name)
    # the tests' TRITON_INTERPRET=1 would run triton's code (cuda falls back to it): a user's shell has no interpreter
    monkeypatch.setattr(backend, "triton_interpreting", lambda: False)
    backend.clear_cache()
    engine, said = _load(tiny_hf_dir)
    assert len(said) == 1 and repr(name) in said[0] and why in said[0] and "'torch' instead" in said[0]
    assert len(engine.generate("hello", max_new_tokens=3, ignore_eos=True).token_ids) == 3
    monkeypatch.setenv(backend.ENV_VAR, "tourch")
    backend.clear_cache()
    with pytest.raises(ConfigError, match="unknown kernel backend 'tourch'"):
        _load(tiny_hf_dir)


def test_triton_not_importable_is_not_blamed_on_the_interpreter(monkeypatch):
    """Before: on a CPU the warning always said to set TRITON_INTERPRET=1, also where triton does not import."""
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with use_backend("triton"):
        msg = backend.unmet_choice("cpu")
    assert "triton does not import" in msg and "TRITON_INTERPRET" not in msg


def test_without_the_cpu_extension_the_default_is_torch(tiny_hf_dir, monkeypatch):
    monkeypatch.setitem(_ext._optional, "_cpu", (None, "amphista_engine._cpu cannot be imported (test)"))
    backend.clear_cache()
    assert backend.default_backend("cpu") == "torch" and backend.chain("cpu") == [reference]
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    backend.clear_cache()
    _, said = _load(tiny_hf_dir)
    assert len(said) == 1 and "amphista_engine._cpu does not load" in said[0]


def _spy(monkeypatch, mod, op, counts):
    fn = getattr(mod, op)

    def spy(*a, **k):
        out = fn(*a, **k)
        if out is not NotImplemented:
            counts[mod.BACKEND] = counts.get(mod.BACKEND, 0) + 1
        return out
    monkeypatch.setattr(mod, op, spy)


@pytest.mark.skipif(not backend.cpu_available(), reason="needs the _cpu extension")
def test_scoped_backends_stay_with_their_engine(tiny_hf_dir, monkeypatch):
    from amphista_engine.heads import random_heads
    a, _ = _load(tiny_hf_dir)
    b, _ = _load(tiny_hf_dir)
    for e in (a, b):
        e.load_heads(random_heads("amphista", e.model, num_heads=3, seed=1))
    counts: dict[str, int] = {}
    for mod in (reference, cpu_ops):
        _spy(monkeypatch, mod, "tree_attention", counts)
    answers = {}
    for _ in range(2):
        for e, be in ((a, "torch"), (b, "cpu"), (a, "cpu"), (b, "torch")):
            for spec in (None, "amphista"):
                counts.clear()
                with use_backend(be):
                    got = e.generate("the quick brown fox", max_new_tokens=10, speculative=spec,
                                     ignore_eos=True).token_ids
                assert set(counts) == {be}, (be, spec, counts)
                assert answers.setdefault((be, spec), got) == got
    assert get_backend("cpu") == "cpu"


@pytest.mark.skipif(not backend.triton_interpreting(), reason="needs TRITON_INTERPRET=1 before triton's import")
def test_triton_interpreter_greedy_equals_torch(tiny_hf_dir, monkeypatch):
    from amphista_engine.heads import random_heads
    engine, said = _load(tiny_hf_dir)
    assert not said
    engine.load_heads(random_heads("amphista", engine.model, num_heads=2, seed=1))
    counts: dict[str, int] = {}
    _spy(monkeypatch, triton_ops, "tree_attention", counts)
    for spec, n in ((None, 6), ("amphista", 5)):
        with use_backend("torch"):
            want = engine.generate("hello there", max_new_tokens=n, speculative=spec, ignore_eos=True).token_ids
        with use_backend("triton"):
            got = engine.generate("hello there", max_new_tokens=n, speculative=spec, ignore_eos=True).token_ids
        assert got == want and len(got) == n
    assert counts.get("triton", 0) > 0             # the interpreter ran, not a silent fallback to torch


def _bench(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels" / "run_all.py"), "--quick", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.skipif(not backend.cpu_available(), reason="needs the _cpu extension")
def test_quick_kernel_benchmarks_time_only_kernels_a_backend_has(tmp_path):
    """Before: a `cpu` row for every op, those the cpu backend lacks timing torch's code with a noise 'speedup'."""
    out = tmp_path / "k.json"
    proc = _bench("--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"tree_attention", "rmsnorm", "quant_linear", "silu_mul", "typical_accept"} <= kernels
    cpu_rows = {r["kernel"] for r in rows if r["backend"] == "cpu"}
    assert {"tree_attention", "add_rmsnorm", "qkv_rope_write", "kv_compact", "greedy_accept"} <= cpu_rows
    for k in cpu_rows:
        with use_backend("cpu"):
            assert backend.resolve(k, "cpu") == "cpu", k
    assert "silu_mul" in proc.stderr and "left out" in proc.stderr
    assert hasattr(ops, "silu_mul") and not hasattr(cpu_ops, "silu_mul")


def test_bench_backends_are_checked_before_any_benchmark_runs():
    """Before: a misspelt --backends failed every benchmark with a traceback; `triton` without the interpreter
    timed torch's ops under triton's name."""
    proc = _bench("--backends", "torch,trion")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'trion'" in proc.stderr and "triton, cuda, cpu" in proc.stderr
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels" / "rmsnorm.py"), "--quick",
                           "--backends", "torch,triton"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "TRITON_INTERPRET=1" in proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| rmsnorm")]
    assert table and not any("| triton |" in line for line in table)


def test_generate_json_reports_the_kernel_backend(tiny_hf_dir, capsys):
    """`amphista generate --json` said which linears ran but not which kernel backend served the hot ops (`amphista
    bench` reports it as `kernels`)."""
    from amphista_engine.cli import main
    argv = ["generate", "hi", "--model", str(tiny_hf_dir), "--device", "cpu", "--max-seq-len", "64",
            "--max-new-tokens", "2", "--json", "--speculative", "none"]
    for be in ("torch", "cpu") if cpu_ops.load_extension() is not None else ("torch",):
        set_backend(be)
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["kernels"] == be
