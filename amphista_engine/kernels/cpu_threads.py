"""Which threads run a CPU decode step's kernels.

By default the `cpu` backend's kernels run on OpenMP's threads, shared with torch's ops. Each kernel call is then
an OpenMP parallel region, whose end waits for every thread of the team: on a machine where other work runs, a
worker is often descheduled, and each of a step's ~300 calls waited for the scheduler to run it again (plain 4-bit
decoding with two threads on two busy cores: ~40 tok/s, a third of one thread's speed;
benchmarks/results/cpu_busy_machine_threads.md).

A step whose products all run on the extension's quantized kernels (a 4-bit / 8-bit model, `quant="auto"` on a
CPU) therefore runs them on the extension's own pool (csrc/cpu/thread_pool.h), where the calling thread takes over
the chunks of a worker that has not started, with torch's ops on one thread for the step: they are small there,
and torch's OpenMP workers, which spin for milliseconds after each parallel op, would take the cores the pool's
workers need (the pool beside torch's two threads was 1.3x slower on a quiet 2-core VM). The thread count is
still torch's (`torch.set_num_threads` / OMP_NUM_THREADS), read when the step starts. Float weights keep OpenMP:
their big products are torch's. Measured on a 2-core AVX-512 Xeon VM (benchmarks/cpu_pool_ab.py): beside one busy
process a 4-bit step costs what one thread's does, where OpenMP's cost 1.8x-13x that; on a quiet machine it is
within ~2% of OpenMP's (benchmarks/results/cpu_pool_ab*.md).

Thread counts are process-wide: while a step runs on the pool, torch's ops in other Python threads run on one
thread too (another engine's float products would be slower meanwhile, never wrong).

AMPHISTA_CPU_POOL=omp keeps OpenMP for every step (the behaviour before the pool); =own uses the pool for every
step, float weights too (for A/B runs).
"""
from __future__ import annotations

import functools
import os
import threading

import torch

_POOL_CHOICES = ("auto", "own", "omp")

_lock = threading.Lock()
_depth = 0                  # steps running under the pool, in any thread
_torch_threads = 0          # torch's thread count before the first of them
_kernel_threads = 0         # the kernels' count while they run (0: torch's)


def pool_setting() -> str:
    value = os.environ.get("AMPHISTA_CPU_POOL", "auto").strip().lower() or "auto"
    if value not in _POOL_CHOICES:
        from ..errors import ConfigError
        raise ConfigError(f"AMPHISTA_CPU_POOL={value!r}: must be one of {', '.join(_POOL_CHOICES)}")
    return value


def kernel_threads() -> int:
    """The thread count the extension's kernels are called with."""
    return _kernel_threads or torch.get_num_threads()


def runs_on_pool(model, heads=None) -> bool:
    """Whether decode steps of `model` (and its drafting heads) run the extension's kernels on its own pool (see
    the module docstring)."""
    from . import cpu_ops, cpu_quant        # they import this module
    setting = pool_setting()
    if setting == "omp" or cpu_ops.load_extension() is None:
        return False
    device = model.tok_embeddings.weight.device
    if device.type != "cpu":
        return False
    if setting == "own":
        return True
    modules = [*model.modules(), *(heads.modules() if isinstance(heads, torch.nn.Module) else ())]
    linears = [m for m in modules if isinstance(m, torch.nn.Linear)]
    return bool(linears) and all(cpu_quant.on_codes(m) and m._packed_native is not None for m in linears)


def _extension():
    from . import cpu_ops
    return cpu_ops.load_extension()


class _PoolSteps:
    """The block runs on the pool: torch's ops on one thread, the kernels on torch's former count."""

    def __enter__(self):
        global _depth, _torch_threads, _kernel_threads
        with _lock:
            if _depth == 0:
                _torch_threads = torch.get_num_threads()
                if _torch_threads > 1:
                    _kernel_threads = _torch_threads
                    _extension().set_pool("own")
                    torch.set_num_threads(1)
            _depth += 1

    def __exit__(self, *exc):
        global _depth, _kernel_threads
        with _lock:
            _depth -= 1
            if _depth == 0 and _kernel_threads:
                torch.set_num_threads(_torch_threads)
                _extension().set_pool("omp")
                _kernel_threads = 0
        return False


_POOL_STEPS = _PoolSteps()


def on_pool(method):
    """Decorates a decoder's prefill / step: it runs on the pool when its model's steps do (`runs_on_pool`,
    decided once per decoder)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        on = self.__dict__.get("_runs_on_pool")
        if on is None:
            on = self._runs_on_pool = runs_on_pool(self.model, getattr(self, "heads", None))
        if not on:
            return method(self, *args, **kwargs)
        with _POOL_STEPS:
            return method(self, *args, **kwargs)
    return run
