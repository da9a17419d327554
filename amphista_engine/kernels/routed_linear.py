"""Linear layers routed through `ops.linear`, so the backend switch reaches the decode step's weight GEMVs.

The target's and the heads' nn.Linear layers call cuBLAS directly. Routing them through `ops.linear` lets the
triton backend take the few-row products (triton_kernels/linear.py). It is off unless AMPHISTA_TRITON_LINEAR=1:
the kernel has not yet been timed against cuBLAS on the model's own GEMVs, and a Python dispatch per layer
would cost eager (graph-less) steps time for nothing. The Engine routes its model and heads on CUDA when it is
on; benchmarks/latency_gpu.py times both ways side by side.
"""
from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar

import torch.nn.functional as F
from torch import nn

from . import ops

ENV_VAR = "AMPHISTA_TRITON_LINEAR"
MAX_ROWS = 16      # the few-row kernel's one row tile (triton_kernels/linear.py); more rows go to cuBLAS
# Set around a forward whose rows must round alike whatever their count (kernels/gpu_exact.py): the routed
# products then stay on the kernel backends' fixed 16-row blocks for any row count instead of going to cuBLAS.
_INVARIANT_ROWS: ContextVar[bool] = ContextVar("amphista_invariant_rows", default=False)


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "0") == "1"


@contextlib.contextmanager
def invariant_rows(on: bool = True):
    """Within the block (on=True), routed linears ask ops.linear for row-count-invariant products."""
    token = _INVARIANT_ROWS.set(on)
    try:
        yield
    finally:
        _INVARIANT_ROWS.reset(token)


class RoutedLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose product goes through ops.linear."""

    def forward(self, x):
        if self.bias is not None:
            return F.linear(x, self.weight, self.bias)
        return ops.linear(x, self.weight, batch_invariant=_INVARIANT_ROWS.get())


def route_linears(module: nn.Module, on: bool = True) -> int:
    """Turns every plain nn.Linear inside `module` into a RoutedLinear (on=False: back); returns how many."""
    src, dst = (nn.Linear, RoutedLinear) if on else (RoutedLinear, nn.Linear)
    n = 0
    for m in module.modules():
        if type(m) is src:
            m.__class__ = dst
            n += 1
    return n
