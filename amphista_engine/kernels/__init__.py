"""Kernels for the speculative hot path behind one backend switch.

    from amphista_engine.kernels import ops, set_backend, use_backend, get_backend
    out = ops.tree_attention(q, k_cache, v_cache, prefix_len, bits, kv_len)

Files, one concern each:
  backend.py     the switch (torch | triton | cuda | cpu), its default per device and the fallback chain
  ops.py         the dispatching functions and their documented signatures
  reference.py   the torch backend: exactly what the engine computes without kernels
  triton_ops.py  the triton backend: argument checks, grids, launches (kernels in triton_kernels/)
  cuda_ops.py    the cuda backend: wrappers around the CUDA extension `_C` (ops it lacks fall to triton)
  cpu_ops.py     the cpu backend: wrappers around the CPU extension `_cpu` (csrc/cpu; ops it lacks fall to torch)
"""
from . import ops
from .backend import (BACKENDS, ENV_VAR, cpu_available, cuda_available, default_backend, get_backend, resolve,
                      set_backend, triton_available, use_backend)

__all__ = ["ops", "BACKENDS", "ENV_VAR", "get_backend", "set_backend", "use_backend", "default_backend",
           "resolve", "triton_available", "cuda_available", "cpu_available"]
