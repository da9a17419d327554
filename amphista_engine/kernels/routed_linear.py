"""Linear layers routed through `ops.linear`, so the backend switch reaches the decode step's weight GEMVs.

The target's and the heads' nn.Linear layers call cuBLAS directly. Routed, the products of decode steps can take
the triton backend's weight-streaming GEMM (triton_kernels/linear.py). The Engine routes its model and heads on
CUDA unless AMPHISTA_TRITON_LINEAR=0. With the default "auto", each weight shape and row count (up to
CHOICE_ROWS) takes the kernel or cuBLAS, whichever measured faster on the GPU (kernels/linear_choice.py): on an
H200 the kernel made a graphed 7B decode step 5% faster, yet lost to cuBLAS on some 13B and SmolLM2 shapes.
"1" sends every product of up to 16 rows to the kernel, as benchmarks/latency_gpu.py's forced rows do.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from . import linear_choice, ops
from ..env_settings import env_switch
from ..errors import ConfigError

ENV_VAR = "AMPHISTA_TRITON_LINEAR"
MODES = {None: "auto", True: "on", False: "off"}     # what AMPHISTA_TRITON_LINEAR's auto / on / off mean here
MAX_ROWS = 16      # the few-row kernel's one row tile (triton_kernels/linear.py)
# Up to this many rows (a 64-node tree's verification) a product may still take the kernel, in 16-row blocks
# that share each weight tile it loads, where that measured faster than cuBLAS (linear_choice.py); more go to
# cuBLAS.
CHOICE_ROWS = 64
# Set around a forward whose rows must round alike whatever their count (kernels/gpu_exact.py): the routed
# products then stay on the kernel backends' fixed 16-row blocks for any row count instead of going to cuBLAS.
_INVARIANT_ROWS: ContextVar[bool] = ContextVar("amphista_invariant_rows", default=False)
_MODE: ContextVar[str | None] = ContextVar("amphista_linear_mode", default=None)


def mode() -> str:
    """"auto" (per shape, the faster of kernel and cuBLAS), "on" (the kernel) or "off" (cuBLAS): set_mode's
    block, else AMPHISTA_TRITON_LINEAR."""
    m = _MODE.get()
    if m is not None:
        return m
    return MODES[env_switch(ENV_VAR, None, auto=True, hint="; auto: per weight shape, the faster of the Triton "
                            "kernel and cuBLAS, measured on the GPU; on: the kernel; off: cuBLAS")]


def enabled() -> bool:
    """Whether the Engine routes its linears on CUDA (every mode but "off")."""
    return mode() != "off"


@contextlib.contextmanager
def set_mode(m: str):
    """Within the block, routed linears run in mode m ("auto", "on", "off") whatever the environment says."""
    if m not in ("auto", "on", "off"):
        raise ConfigError(f"unknown routed-linear mode {m!r}; use auto, on or off")
    token = _MODE.set(m)
    try:
        yield
    finally:
        _MODE.reset(token)


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
        if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
            return F.linear(x, self.weight, self.bias)          # training: the kernels have no backward
        # A bias (Qwen's q/k/v) is added after the product, so the product keeps its row-invariant route
        y = self._product(x)
        return y if self.bias is None else y + self.bias

    def _product(self, x):
        if _INVARIANT_ROWS.get():
            return ops.linear(x, self.weight, batch_invariant=True)
        if linear_choice.kernel_for(x, self.weight):
            # over one row tile the kernel takes the rows in blocks (batch_invariant: any count, in 16-row MMAs)
            return ops.linear(x, self.weight, batch_invariant=x.numel() > MAX_ROWS * x.shape[-1])
        return F.linear(x, self.weight)


def route_linears(module: nn.Module, on: bool = True) -> int:
    """Turns every plain nn.Linear inside `module` into a RoutedLinear (on=False: back); returns how many."""
    src, dst = (nn.Linear, RoutedLinear) if on else (RoutedLinear, nn.Linear)
    n = 0
    for m in module.modules():
        if type(m) is src:
            m.__class__ = dst
            n += 1
    return n
