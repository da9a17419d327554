"""How a decoder's linear layers run on its device, decided in one place for the Engine and `amphista bench`.

On the CPU, bf16/fp32 weights are packed once for oneDNN (cpu_packed.py; AMPHISTA_CPU_PACK=0 turns it off).
On CUDA they stay with cuBLAS unless AMPHISTA_TRITON_LINEAR=1 or AMPHISTA_EXACT_GREEDY=1 routes them through
ops.linear (routed_linear.py; the exact path's row-invariant GEMMs are the kernel backends'). A benchmark that
skipped this would time other linears than the ones decoding runs (fp32 on an AMD CPU: ~1.2x slower steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LinearSetup:
    packed: bool = False      # CPU: weights laid out for oneDNN once
    routed: bool = False      # CUDA: products through the backend switch (ops.linear)

    @classmethod
    def for_device(cls, device, dtype: torch.dtype) -> "LinearSetup":
        from . import cpu_packed, gpu_exact, routed_linear
        kind = torch.device(device).type
        return cls(packed=kind == "cpu" and cpu_packed.available(dtype),
                   routed=kind == "cuda" and (routed_linear.enabled() or gpu_exact.enabled()))

    def apply(self, module: nn.Module) -> nn.Module:
        """Adapts the target's or the heads' nn.Linear layers in place (layers already adapted are left alone)."""
        from . import cpu_packed, routed_linear
        if self.packed:
            cpu_packed.pack_linears(module)
        if self.routed:
            routed_linear.route_linears(module)
        return module

    def describe(self) -> str:
        return "oneDNN-packed" if self.packed else "routed through ops.linear" if self.routed else "torch default"
