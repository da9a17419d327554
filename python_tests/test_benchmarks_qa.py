"""The benchmark scripts still start as documented: GPU-only ones stop at once on a CPU with one line, scripts that
need transformers say so, and the scripts' own helpers read what the repository commits. Fast: each test runs a
script to its first decision (or --help) in a subprocess, or calls one helper."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DISTILL = BENCH / "results" / "training_smollm2" / "distill"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")


def _run(args, env=None, timeout=60, cwd=ROOT):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _one_clear_line(proc, prefix: str):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@no_gpu
def test_gpu_check_stops_at_once_without_a_gpu():
    """Before: the Triton kernel tests ran in the interpreter for many minutes on a CPU."""
    proc = _run(["bash", str(BENCH / "kernels" / "gpu_check.sh")], timeout=30)
    assert proc.returncode == 2
    _one_clear_line(proc, "gpu_check: no CUDA device")


@no_gpu
def test_greedy_agreement_stops_at_once_without_a_gpu(tmp_path):
    """Before: a stack trace ('Torch not compiled with CUDA enabled') after building the model."""
    proc = _run([sys.executable, str(BENCH / "gpu_greedy_agreement.py"), "--out", str(tmp_path)], timeout=30)
    assert proc.returncode == 2
    _one_clear_line(proc, "gpu_greedy_agreement: no CUDA device")


@no_gpu
def test_tune_says_there_is_nothing_to_sweep_without_triton_on_a_device(tmp_path):
    """Before: an empty table and exit status 0 when TRITON_INTERPRET was not set on a CPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH / "kernels" / "tune.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    _one_clear_line(proc, "tune: nothing to sweep here")
    assert "TRITON_INTERPRET=1" in proc.stderr and not (tmp_path / "tune.json").exists()


@pytest.mark.parametrize("script", ["peer_transformers.py", "ar_latency.py"])
def test_transformers_missing_is_one_line(tmp_path, script):
    """Before: a traceback from `import transformers` after the model had loaded."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "transformers.py").write_text("raise ImportError('transformers blocked by the test')\n")
    proc = _run([sys.executable, str(BENCH / script), "--out", str(tmp_path / "out")],
                env={"PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}, timeout=30)
    assert proc.returncode == 1
    _one_clear_line(proc, f"{script.removesuffix('.py')}: needs Hugging Face transformers")
    assert not (tmp_path / "out").exists()


def test_bf16_divergence_has_a_command_line(tmp_path):
    """Before: no options at all; `--help` ran the whole 8-question bf16 benchmark (minutes)."""
    proc = _run([sys.executable, str(BENCH / "bf16_divergence.py"), "--help"], timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--questions" in proc.stdout and "--max-new-tokens" in proc.stdout


@pytest.mark.skipif(not DISTILL.is_dir(), reason="committed distillation shards absent")
def test_tau_consistency_reads_the_committed_gzipped_shards():
    """Before: Path.read_text on a .jsonl.gz shard (UnicodeDecodeError) after load_shard had read it fine."""
    shard = min(DISTILL.glob("*.jsonl.gz"), key=lambda p: p.stat().st_size)
    records = _load(BENCH / "tau_consistency.py").read_records([shard])
    assert len(records) > 100
    assert all(isinstance(r["prompt"], (str, list)) for r in records.values())


def test_tau_consistency_trees_include_the_heads_fitted_ones():
    from amphista_engine.errors import ConfigError
    tree_paths = _load(BENCH / "tau_consistency.py").tree_paths
    fitted = {"mix-4": [[0], [1], [0, 0]]}
    assert tree_paths("mix-4", fitted) == {(0,), (1,), (0, 0)}
    assert len(tree_paths("tree-16", fitted)) == 15
    for bad in ("dynamic-8", "mix-9"):
        with pytest.raises(ConfigError, match="mix-4"):
            tree_paths(bad, fitted)
