"""QA of the backend switch per engine: what ran its hot ops elsewhere, or said nothing.

- perplexity(engine, text) ran its forwards on the process's backend, not the engine's (Engine(backend=...));
- `engine.backend = "cuda"` on a CPU engine fell back to torch without a word, where a load with it warns;
- speculation_check kept one verdict per tree for an engine without a backend of its own: a call under another
  use_backend block (or set_backend) was served the verdict timed on the first backend."""
from __future__ import annotations

import pytest

from amphista_engine import Engine
from amphista_engine.heads import random_heads
from amphista_engine.kernels import backend, cpu_available
from test_engine_backend import seen  # noqa: F401  (the fixture: the backend each hot op ran on)

pytestmark = [pytest.mark.usefixtures("one_thread_module"),
              pytest.mark.skipif(not cpu_available(), reason="needs the CPU extension: two backends to tell apart")]


def test_perplexity_runs_on_the_engines_backend(tiny_hf_dir, seen):  # noqa: F811
    from amphista_engine.evaluation.perplexity import perplexity
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=128, backend="torch")
    seen.clear()
    result = perplexity(eng, "The quick brown fox jumps over the lazy dog. " * 12, ctx=32, max_chunks=2)
    assert result.tokens > 0
    assert seen and set(seen) == {"torch"}, set(seen)


def test_setting_a_backend_that_cannot_run_here_warns_as_a_load_does(tiny_hf_dir):
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64)
    with pytest.warns(UserWarning, match="kernel backend 'cuda' does not run on cpu"):
        eng.backend = "cuda"
    assert eng.backend == "cuda"


def test_a_speed_check_is_timed_on_the_backend_in_force(tiny_hf_dir, seen):  # noqa: F811
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    heads = random_heads("amphista", eng.model, num_heads=3, seed=1)
    heads.config.extra["tree_search"] = {"decoding_tau": {"chain-2": 2.0}}     # a tau to weigh: the check times
    eng.load_heads(heads)
    with backend.use_backend("cpu"):
        on_cpu = eng.speculation_check()
    assert on_cpu.plain_ms is not None
    seen.clear()
    with backend.use_backend("torch"):
        on_torch = eng.speculation_check()
    assert on_torch is not on_cpu and "torch" in seen, set(seen)
    seen.clear()
    with backend.use_backend("cpu"):
        assert eng.speculation_check() is on_cpu          # still kept for the backend that timed it
    assert not seen
