"""How a decoder's linear layers run on its device, decided in one place for the Engine and `amphista bench`.

On the CPU, bf16/fp32 weights are packed once for oneDNN (cpu_packed.py; AMPHISTA_CPU_PACK=0 turns it off), and
with quant="q4" (or "auto" for a model whose layers are stored 4-bit, as a GGUF Q4_0/Q4_1/Q4_K file's are) the
target's layers run as 4-bit codes and its LM head as int8 (cpu_quant.py). On CUDA they are routed through the
backend switch unless AMPHISTA_TRITON_LINEAR=0 (routed_linear.py): each decode-step product (up to 64 rows)
then takes the faster of the Triton GEMM and cuBLAS for its shape (linear_choice.py), and the exact path's
row-invariant GEMMs (AMPHISTA_EXACT_GREEDY=1, routed whatever the switch says) are the kernel backends'. A
benchmark that skipped this would time other linears than the ones decoding runs (fp32 on an AMD CPU: ~1.2x
slower steps).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class LinearSetup:
    packed: bool = False      # CPU: weights laid out for oneDNN once
    routed: bool = False      # CUDA: products through the backend switch (ops.linear)
    quant: str = "none"       # CPU, the target only: "q4" (4-bit layers, int8 LM head), "auto" until applied
    dtype: torch.dtype | None = None   # the weights' and activations' dtype (what the CPU kernels can take)
    free_floats: bool = False   # CPU, the target only: keep only the packed copy of each float weight (a model
    #                             the engine loaded itself; one handed to Engine() stays the caller's, untouched)
    backend: str | None = None  # the engine's own kernel backend (Engine(backend=...)), which describe() names

    @classmethod
    def for_device(cls, device, dtype: torch.dtype, quant: str | None = "none",
                   free_floats: bool = False) -> "LinearSetup":
        from . import backend, cpu_packed, cpu_quant, gpu_exact, routed_linear
        kind = torch.device(device).type
        if kind == "cuda":
            backend.pdl_wanted()       # a bad AMPHISTA_PDL is refused at load, not at the first kernel launch
        quant = quant or "none"
        if quant not in cpu_quant.SCHEMES:
            raise ConfigError(f"unknown quant {quant!r}; use one of {', '.join(cpu_quant.SCHEMES)}")
        if quant == "q4" and kind != "cpu":
            raise ConfigError(f"quant='q4' runs on the CPU only (device {kind}); use quant='none' there")
        if quant == "q4" and not cpu_quant.available():
            raise ConfigError(f"quant='q4' needs torch's int4 CPU kernels (torch >= 2.5); this is torch "
                              f"{torch.__version__}")
        if quant == "auto" and not (kind == "cpu" and cpu_quant.available() and cpu_quant.measured_here()):
            quant = "none"           # "auto" where 4-bit cannot run, or was never timed
        return cls(packed=kind == "cpu" and cpu_packed.available(dtype),
                   routed=kind == "cuda" and (routed_linear.enabled() or gpu_exact.enabled()),
                   quant=quant, dtype=dtype, free_floats=free_floats)

    def apply(self, module: nn.Module) -> nn.Module:
        """Adapts the target's or the heads' nn.Linear layers in place (layers already adapted are left alone).
        quant "q4"/"auto" quantizes a target (a Transformer); `resolved(target)` then says what "auto" became, and
        with "q4" drafting heads get 4-bit layers too (cpu_quant.quantize_heads: the same tau on the shipped heads,
        where int8 heads had measured within noise of packed ones, benchmarks/results/cpu_q4_ab.md)."""
        from . import cpu_packed, cpu_quant, routed_linear
        from ..model import Transformer
        if self.quant != "none" and isinstance(module, Transformer):
            cpu_quant.quantize_linears(module, only_stored_4bit=self.quant == "auto")
        elif self.quant == "q4":
            cpu_quant.quantize_heads(module)
        if self.packed:
            cpu_packed.pack_linears(module, free_floats=self.free_floats and isinstance(module, Transformer))
        if self.routed:
            routed_linear.route_linears(module)
        return module

    def resolved(self, target: nn.Module) -> "LinearSetup":
        """This setup as `apply` left the target: quant "q4" where its linears run 4-bit, else "none"."""
        return dataclasses.replace(self, quant="q4" if getattr(target, "rounds_linear_inputs", False) else "none")

    def describe(self) -> str:
        if self.quant == "q4":
            from . import backend, cpu_ops
            with backend.use_backend(self.backend):
                served = backend.resolve("quant_linear", "cpu")
            native = (served == cpu_ops.BACKEND and cpu_ops.load_extension() is not None
                      and (self.dtype is None or cpu_ops.takes(self.dtype)))
            which = "the cpu backend's kernels, int8 activations" if native else "torch's int4/int8 CPU kernels"
            return f"4-bit layers, int8 LM head ({which})"
        if self.routed:
            from . import routed_linear
            return {"auto": "routed: each shape on the faster of the Triton GEMM and cuBLAS (timed once, kept)",
                    "on": "routed: the Triton GEMM for products of up to 16 rows",
                    "off": "routed for the exact path only"}[routed_linear.mode()]
        return "oneDNN-packed" if self.packed else "torch default"
