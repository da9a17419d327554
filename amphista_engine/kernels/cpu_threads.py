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

torch's thread count is per Python thread: torch.set_num_threads sets the calling thread's OpenMP count (and the
count of threads that have not run an op yet), never another running thread's. So each thread saves and hands back
its own count around its steps, and its kernels run on that count (one saved for the process left a thread whose
step ended while another thread's ran on one thread for good, and handed that one the first thread's count).
A thread whose first torch op runs while another thread's step does starts on one thread (torch's count for new
threads is the last one set in any thread): set its count after that op. The extension's choice of pool is
process-wide: it stays on the own pool while any thread's step runs on it (another engine's float kernels then run
there too, on their own thread's count: never a different result).

AMPHISTA_CPU_POOL=omp keeps OpenMP for every step (the behaviour before the pool); =own uses the pool for every
step, float weights too (for A/B runs).
"""
from __future__ import annotations

import functools
import os
import threading

import torch

from ..env_settings import env_choice

_POOL_CHOICES = ("auto", "own", "omp")

_lock = threading.Lock()
_on_pool = 0                # Python threads in a step on the pool: the extension runs on its own pool while > 0
_kernel_threads = 0         # the kernels' count outside pool steps (0: torch's; tests fix it)
_local = threading.local()  # this thread's depth (nested steps), torch_threads (its count before), kernel_threads
_forked = False             # a forked child of a process that ran torch on several threads (_after_fork_in_child)


def pool_setting() -> str:
    return env_choice("AMPHISTA_CPU_POOL", _POOL_CHOICES, "auto")


def kernel_threads() -> int:
    """The thread count the extension's kernels are called with (in this Python thread)."""
    return getattr(_local, "kernel_threads", 0) or _kernel_threads or torch.get_num_threads()


def runs_on_pool(model, heads=None) -> bool:
    """Whether decode steps of `model` (and its drafting heads) run the extension's kernels on its own pool (see
    the module docstring)."""
    from . import cpu_ops, cpu_quant        # they import this module
    setting = pool_setting()
    if setting == "omp" or cpu_ops.load_extension() is None:
        return False
    device = model.device
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
    """The block runs on the pool: this thread's torch ops on one thread, the kernels on its former count."""

    def __enter__(self):
        global _on_pool
        depth = getattr(_local, "depth", 0)
        _local.depth = depth + 1
        if depth:
            return
        n = _local.torch_threads = torch.get_num_threads()
        if n > 1:
            _local.kernel_threads = n
            with _lock:
                _on_pool += 1
                if _on_pool == 1:
                    _extension().set_pool("own")
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        global _on_pool
        _local.depth -= 1
        if _local.depth or not getattr(_local, "kernel_threads", 0):
            return False
        _local.kernel_threads = 0
        torch.set_num_threads(_local.torch_threads)
        with _lock:
            _on_pool -= 1
            if _on_pool == 0:
                _extension().set_pool("omp")
        return False


def _after_fork_in_child():
    """Only the forking thread lives on in a child: the other threads' steps never end there. Left counted, they
    kept the extension on its own pool for good (and a lock one of them held would never be released).
    libgomp's parallel regions hang in a child forked after the parent ran some on more than one thread (its team's
    threads are gone): a float engine's first step there never returned. So in such a child every step runs as a
    pool step does, whatever its weights: torch's ops on one thread, the kernels on the pool, which starts its own
    workers there."""
    global _lock, _on_pool, _forked
    _lock = threading.Lock()
    _forked = _forked or torch.get_num_threads() > 1
    was, _on_pool = _on_pool, int(bool(getattr(_local, "kernel_threads", 0)))
    if was and not _on_pool:
        _extension().set_pool("omp")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_POOL_STEPS = _PoolSteps()


def one_thread_if_forked(fn):
    """Decorates an engine's calls that run torch's ops outside decode steps (loading, cache allocation, scoring):
    in a child forked from a process that ran torch on several threads (_after_fork_in_child) they run torch on one
    thread, as its steps do, where libgomp's regions hang (a batch's new KV cache, torch.zeros, never returned).
    The caller's count is handed back after the call; elsewhere the call is left as it is."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        n = torch.get_num_threads() if _forked else 1
        if n == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)
    return run


def on_pool(method):
    """Decorates a decoder's prefill / step: it runs on the pool when its model's steps do (`runs_on_pool`,
    decided once per decoder)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        on = self.__dict__.get("_runs_on_pool")
        if on is None:
            on = self._runs_on_pool = runs_on_pool(self.model, getattr(self, "heads", None))
        if not on and not _forked:
            return method(self, *args, **kwargs)
        with _POOL_STEPS:
            return method(self, *args, **kwargs)
    return run
