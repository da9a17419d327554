"""The backend switch per engine (issue 5: "selectable per engine and by environment variable"):
Engine(backend=...) runs every call of that engine on its backend, a stream's steps too wherever they are
iterated (after the call, in another thread: a server's scheduler), where `use_backend` around a call reached only
that thread's eager work (a stream started in such a block now steps on it too). The CLI's --backend sets it for
the process (as AMPHISTA_BACKEND does) and puts it back."""
from __future__ import annotations

import threading

import pytest

from amphista_engine import Engine
from amphista_engine.errors import ConfigError, InputError
from amphista_engine.heads import random_heads
from amphista_engine.kernels import backend, cpu_available

pytestmark = [pytest.mark.usefixtures("one_thread_module"),
              pytest.mark.skipif(not cpu_available(), reason="needs the CPU extension: two backends to tell apart")]


@pytest.fixture
def seen(monkeypatch):
    """The backend each hot op was dispatched under, from now on (any thread)."""
    got, real = [], backend.chain

    def chain(device=None):
        got.append(backend.get_backend(device))
        return real(device)
    monkeypatch.setattr(backend, "chain", chain)
    return got


@pytest.fixture(scope="module")
def torch_engine(tiny_hf_dir):
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=128, backend="torch")
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    return eng


def test_an_engine_runs_its_calls_on_its_own_backend(torch_engine, seen):
    assert torch_engine.backend == "torch"
    torch_engine.generate("hello there", max_new_tokens=4, chat=False, ignore_eos=True)
    torch_engine.generate("hello there", max_new_tokens=4, chat=False, ignore_eos=True, speculative="amphista",
                          tree="chain-3")
    torch_engine.prompt_logprobs("hello there")
    assert seen and set(seen) == {"torch"}, set(seen)


def test_its_backend_wins_over_the_process_choice(torch_engine, seen):
    backend.set_backend("cpu")
    try:
        torch_engine.generate("hello", max_new_tokens=3, chat=False, ignore_eos=True)
        with backend.use_backend("cpu"):
            torch_engine.generate("hello", max_new_tokens=3, chat=False, ignore_eos=True)
    finally:
        backend.set_backend(None)
    assert seen and set(seen) == {"torch"}, set(seen)


def test_a_stream_steps_on_it_after_the_call_and_in_another_thread(torch_engine, seen):
    stream = torch_engine.stream_batch(["one", "two words"], max_new_tokens=5, chat=False, ignore_eos=True,
                                       speculative="amphista", tree="chain-3")
    assert backend.get_backend("cpu") == "cpu"     # the process's own default, where the steps run below
    out: list = []
    worker = threading.Thread(target=lambda: out.extend(stream))
    worker.start()
    worker.join()
    assert out and len(torch_engine.last_results) == 2
    assert seen and set(seen) == {"torch"}, set(seen)


def test_without_one_the_process_choice_runs(tiny_hf_dir, seen):
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64)
    assert eng.backend is None
    eng.generate("hello", max_new_tokens=3, chat=False, ignore_eos=True)
    assert set(seen) == {"cpu"}, set(seen)
    seen.clear()
    with backend.use_backend("torch"):
        eng.generate("hello", max_new_tokens=3, chat=False, ignore_eos=True)
    assert set(seen) == {"torch"}, set(seen)


def test_a_stream_started_in_a_use_backend_block_steps_on_it_after_the_block(tiny_hf_dir, seen):
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64)
    with backend.use_backend("torch"):
        stream = eng.stream("hello", max_new_tokens=4, chat=False, ignore_eos=True)
    assert "".join(stream) and eng.last_result is not None
    assert seen and set(seen) == {"torch"}, set(seen)
    seen.clear()
    eng.generate("hello", max_new_tokens=2, chat=False, ignore_eos=True)     # outside any block: the default again
    assert set(seen) == {"cpu"}, set(seen)


def test_a_bad_backend_is_named_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown kernel backend 'tpu' \(Engine backend\)"):
        Engine.from_pretrained(str(tmp_path / "no-such-model"), backend="tpu")
    with pytest.raises(ConfigError, match="unknown kernel backend"):
        Engine.from_pretrained(str(tmp_path / "no-such-model"), backend=3)


def test_it_changes_between_runs_and_not_during_one(tiny_hf_dir, seen):
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=64, quant="q4", backend="cpu")
    a = eng.generate("hello", max_new_tokens=4, chat=False, ignore_eos=True)
    assert set(seen) == {"cpu"}, set(seen)
    seen.clear()
    eng.backend = "torch"                  # 4-bit layers too: torch's int4 kernels instead of the cpu backend's
    b = eng.generate("hello", max_new_tokens=4, chat=False, ignore_eos=True)
    assert set(seen) == {"torch"}, set(seen)
    assert len(a.token_ids) == len(b.token_ids) == 4
    stream = eng.stream("hello", max_new_tokens=4, chat=False, ignore_eos=True)
    next(stream)
    with pytest.raises(InputError, match="cannot change while a run or stream"):
        eng.backend = "cpu"
    stream.close()
    with pytest.raises(ConfigError, match="unknown kernel backend 'gpu'"):
        eng.backend = "gpu"
    eng.backend = None
    assert eng.backend is None


def test_the_cli_flag_sets_the_process_backend_and_puts_it_back(tiny_hf_dir, seen, capsys):
    from amphista_engine.cli import main
    assert main(["generate", "hi", "--model", str(tiny_hf_dir), "--max-new-tokens", "3", "--heads", "none",
                 "--no-chat", "--backend", "torch", "--json", "--max-seq-len", "128"]) == 0
    assert '"kernels": "torch"' in capsys.readouterr().out
    assert seen and set(seen) == {"torch"}, set(seen)
    assert backend.process_backend() is None and backend.get_backend("cpu") == "cpu"


def test_the_weights_line_names_the_engines_own_kernels(tiny_hf_dir):
    """engine.linears.describe() (the CLI's weights line) named the process backend's kernels, not the engine's."""
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=64, quant="q4", backend="torch")
    assert "torch's int4" in eng.linears.describe(), eng.linears.describe()
    eng.backend = "cpu"
    assert "the cpu backend's kernels" in eng.linears.describe(), eng.linears.describe()
