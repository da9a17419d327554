"""The one backend switch for every hot op: `torch` (reference), `triton`, `cuda`, `cpu`.

Which backend runs, first match wins:
  1. `use_backend(name)` (a context manager, nestable: whatever runs inside the block in this thread / task, so
     an engine's generate() called there, and every step of an engine's stream started there, even iterated after
     the block or in another thread). `Engine(..., backend=name)` runs every call of that engine inside one, each
     step of its streams too, whichever thread asks for them (a server's scheduler),
  2. `set_backend(name)` (process-wide; `set_backend(None)` clears it),
  3. the environment variable AMPHISTA_BACKEND (read once, at the first hot op; after changing it inside a
     running process call clear_cache()),
  4. the default for the tensors' device: the fastest available there. On CUDA that is `triton` when
     triton imports (measured faster end to end than `cuda` on an H200), else `cuda` when the CUDA
     extension loads, else `torch`. On the CPU it is `cpu` (the C++ kernels of csrc/cpu, which take the
     decode step's small ops out of torch's dispatch overhead) when that extension loads, else `torch`.
     Triton runs on the CPU only through its interpreter (TRITON_INTERPRET=1), which tests pick explicitly.

A backend implements any subset of the ops; an op it lacks, or declines for an input it does not handle
(for instance a tree wider than 64 nodes), runs on the next backend of its chain: cuda -> triton -> torch,
cpu -> torch.
So a chosen backend never raises for lack of a kernel, and `torch` is always the last resort.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from types import ModuleType
from typing import Iterator, Optional

from ..env_settings import env_choice, env_switch
from ..errors import ConfigError

BACKENDS = ("torch", "triton", "cuda", "cpu")
ENV_VAR = "AMPHISTA_BACKEND"
# Programmatic dependent launch for the decode step's Triton kernels (triton_kernels/common.py): on by default where
# it can run (compiled kernels on Hopper and newer). An H100 timed the all-Triton 7B step at 5.18 ms with it against
# 5.35-5.41 without (benchmarks/results/gpu/h100_2026-12-05_*); "0" turns it off.
PDL_ENV = "AMPHISTA_PDL"

_global: Optional[str] = None
_scoped: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("amphista_backend", default=None)


def _check(name, where: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {name!r} ({where}); choose one of {', '.join(BACKENDS)}")
    return name.strip().lower()


def check_backend(name, where: str) -> str:
    """A backend's name as the switch takes it (stripped, lower case), or a ConfigError naming `where` it came from."""
    return _check(name, where)


_no_pdl: contextvars.ContextVar[bool] = contextvars.ContextVar("amphista_no_pdl", default=False)


def pdl_wanted() -> bool:
    """AMPHISTA_PDL: unset, "auto" or on (where it can run), off (never). A value it does not know is an error,
    not a silent default. Inside `without_pdl()`: no."""
    if _no_pdl.get():
        return False
    return env_switch(PDL_ENV, None, auto=True, hint="; auto and on: programmatic dependent launch where the GPU "
                      "has it (Hopper and newer)") is not False


@contextlib.contextmanager
def without_pdl() -> Iterator[None]:
    """Kernels launched (or captured) inside the block go without PDL, whatever AMPHISTA_PDL says."""
    token = _no_pdl.set(True)
    try:
        yield
    finally:
        _no_pdl.reset(token)


def set_backend(name: Optional[str]) -> None:
    """Pick the backend for the whole process; None goes back to the environment variable / default."""
    global _global
    _global = None if name is None else _check(name, "set_backend")


def scoped_backend() -> Optional[str]:
    """The backend the innermost use_backend block picked here (None: none): a stream started in the block takes it
    along to steps iterated after it."""
    return _scoped.get()


def process_backend() -> Optional[str]:
    """What set_backend set for the whole process (None: nothing), so a caller can put it back."""
    return _global


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """`with use_backend("triton"): ...` picks the backend inside the block only (None = no override: an
    enclosing use_backend's choice stays)."""
    if name is None:
        yield
        return
    token = _scoped.set(_check(name, "use_backend"))
    try:
        yield
    finally:
        _scoped.reset(token)


def _device_type(device) -> str:
    if device is None:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return getattr(device, "type", None) or str(device).split(":")[0]


# Every hot op asks for its backend, hundreds of times per decoding step: what cannot change while the
# process runs (availability, the environment variable) is looked up once and cached here.
_defaults: dict[str, str] = {}
_env: list = []                   # [] = not read yet, else [name or None]


def default_backend(device=None) -> str:
    """The fastest backend available for tensors on `device` (None: CUDA if present, else CPU)."""
    dev = _device_type(device)
    name = _defaults.get(dev)
    if name is None:
        name = "torch"
        # Triton first on CUDA: measured side by side on an H200 (benchmarks/results/gpu/h200_2026-11-27_tune),
        # the Llama-7B-shape decode step under CUDA graphs took 4.71 ms with triton and 5.30 ms with cuda
        # (plain), 5.94 vs 6.54 ms (Amphista, 64 nodes): our CUDA tree attention was the slower kernel. It is
        # rewritten since (cp.async, in-kernel merge, 2026-12-04c) and untimed: benchmarks/gpu_decide.py says
        # when the cuda rows justify switching.
        if dev == "cuda":
            if triton_available():
                name = "triton"
            elif cuda_available():
                name = "cuda"
        elif dev == "cpu" and cpu_available():
            name = "cpu"
        _defaults[dev] = name
    return name


def _env_backend() -> Optional[str]:
    if not _env:
        _env.append(env_choice(ENV_VAR, BACKENDS, None, message="unknown kernel backend {raw!r} (environment "
                               "variable {name}; unset it for the device's default); choose one of {choices}"))
    return _env[0]


def get_backend(device=None) -> str:
    """The backend hot ops on `device` run on now (see the module docstring for the order of choice)."""
    return _scoped.get() or _global or _env_backend() or default_backend(device)


# ---- availability --------------------------------------------------------------------------------------
def triton_available() -> bool:
    """triton imports (it does not say whether it can run on a given device: see triton_runs_on)."""
    try:
        import triton  # noqa: F401
        return True
    except Exception:       # ImportError, or a broken install raising anything at import
        return False


def triton_interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    try:
        import triton
        return bool(triton.knobs.runtime.interpret)
    except Exception:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device_type: str) -> bool:
    if not triton_available():
        return False
    # Compiled kernels need a GPU; the interpreter runs on host memory (and only there: it copies CPU
    # tensors, so interpreting kernels on CUDA tensors would be slow, though correct).
    return device_type == "cuda" or (device_type == "cpu" and triton_interpreting())


def cuda_available() -> bool:
    """The CUDA extension `amphista_engine._C` loads (it is built only where nvcc exists)."""
    from .._ext import load_extension
    try:
        return load_extension() is not None
    except Exception:
        return False


def cpu_available() -> bool:
    """The CPU extension `amphista_engine._cpu` loads (built by `pip install` where a C++ compiler exists)."""
    from .cpu_ops import load_extension
    try:
        return load_extension() is not None
    except Exception:
        return False


_chains: dict[tuple[str, str], list[ModuleType]] = {}


def clear_cache() -> None:
    """Forget cached choices: re-read AMPHISTA_BACKEND and re-detect what is available (e.g. in tests)."""
    _chains.clear()
    _defaults.clear()
    _env.clear()


def chain(device=None) -> list[ModuleType]:
    """Implementation modules to try, in order, for tensors on `device` under the current backend.

    Cached per (backend, device type): every hot op asks, hundreds of times per decoding step."""
    key = (get_backend(device), _device_type(device))
    mods = _chains.get(key)
    if mods is None:
        mods = _chains[key] = _build_chain(*key)
    return mods


def _build_chain(name: str, dev: str) -> list[ModuleType]:
    from . import reference
    mods: list[ModuleType] = []
    if name == "cpu" and dev == "cpu" and cpu_available():
        from . import cpu_ops
        mods.append(cpu_ops)
    if name == "cuda" and dev == "cuda" and cuda_available():
        from . import cuda_ops
        mods.append(cuda_ops)
    if name in ("cuda", "triton") and triton_runs_on(dev):
        from . import triton_ops
        mods.append(triton_ops)
    mods.append(reference)
    return mods


def unmet_choice(device=None) -> Optional[str]:
    """Why a backend picked by name does not run the kernels on `device` (None where it does, or none was
    picked): the chain falls back without a word per op, so the engine says it once, at load."""
    name = _scoped.get() or _global or _env_backend()
    if name is None or name == "torch":
        return None
    dev = _device_type(device)
    served = chain(device)[0].BACKEND
    if served == name:
        return None
    if name == "cpu":
        why = "it runs CPU tensors only" if dev != "cpu" else "the CPU extension amphista_engine._cpu does not load"
    elif name == "cuda" and dev != "cuda":
        why = "it runs CUDA tensors only"
    elif name == "cuda":
        why = "the CUDA extension amphista_engine._C does not load (built where nvcc exists: pip install -e .)"
    elif not triton_available():        # before the interpreter's hint: TRITON_INTERPRET=1 cannot help then
        why = "triton does not import"
    elif dev == "cpu":
        why = "Triton runs on a CPU only through its interpreter (TRITON_INTERPRET=1), for tests"
    else:
        why = "triton does not run on this device"
    return f"kernel backend {name!r} does not run on {dev} here: {why}; the ops run on {served!r} instead"


def resolve(op: str, device=None) -> str:
    """Which backend module would serve `op` on `device` (ignoring per-input declines): for logs and tests."""
    for mod in chain(device):
        if hasattr(mod, op):
            return mod.BACKEND
    return "torch"
