"""The `cuda` backend: ops the CUDA extension `_C` implements. Everything else falls through to triton.

Each function declines (returns NotImplemented) for inputs the extension's kernel does not take, so the
dispatcher moves on instead of raising.
"""
from __future__ import annotations

BACKEND = "cuda"


def rmsnorm(x, w, eps: float):
    from .._ext import rmsnorm_cuda
    if not (x.is_cuda and x.is_contiguous() and w.is_contiguous() and w.dtype == x.dtype and x.dim() >= 1):
        return NotImplemented
    return rmsnorm_cuda(x, w, eps)
