"""Decode steps whose result for a token does not depend on how many tokens the step verifies: bf16 greedy
speculative decoding on the GPU then emits plain greedy decoding's tokens (opt-in: AMPHISTA_EXACT_GREEDY=1).

The GPU's usual path rounds a token's computation differently in a 64-node verification than in a one-token
plain step, so at a near-tie between two tokens the two decoders part (benchmarks/gpu_greedy_agreement.py: at
about token 50 of one prompt in two on random weights, H200, 2026-11-27/28). Three things differ, and each
has a row-invariant replacement here, applied to decode steps only (prefills are shared by every decoder):
  * cuBLAS picks its GEMM kernel (tiles, split-K) by row count. The routed linears take the few-row Triton
    GEMM (kernels/routed_linear.py, invariant_rows) for any row count, in tiles of a fixed 16 rows, so every
    row sees one instruction sequence. The norms and the activation stay row-wise launches of their own
    (unfused layers): fused into the GEMMs, every program would redo them for all of a tree's rows, and a
    64-node step cost 5.3 plain steps on an H200 (2026-12-04, then fused).
  * Tree attention picks its key splits and row blocks by tree size and prefix, and finds a node's
    ancestors in slots scattered among its siblings. The ordered kernel (triton_kernels/tree_attention.py,
    tree_attention_ordered) splits each token's keys where only its position decides, as kernels/cpu_exact.py
    does on the CPU: positions [0, s(p)) from the prefix in chunks of CHUNK keys and tiles of BLOCK_N at fixed
    offsets, then a window of positions s(p)..p gathered one key at a time in position order; the split partials
    merge in a fixed order, and empty ones add exact zeros.
  * Row-wise ops (RoPE, the cache write, argmax) are already invariant.
What the ordered path costs against the default one is measured by the GPU suite's latency and agreement
stages. The torch reference backend does not reorder anything (it is the CPU's fp32 path; bf16 on the CPU
has kernels/cpu_exact.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import cpu_exact
from ..env_settings import env_switch

ENV_VAR = "AMPHISTA_EXACT_GREEDY"
WINDOW = cpu_exact.WINDOW          # positions s(p)..p, at most ALIGN - 1 + MAX_DEPTH + 1 of them
MAX_DEPTH = cpu_exact.MAX_DEPTH
CHUNK = 256                        # prefix keys per split: a multiple of the kernel's 64-key tile


def enabled() -> bool:
    """AMPHISTA_EXACT_GREEDY, off by default; read on every call (tests and benchmarks flip it)."""
    return bool(env_switch(ENV_VAR, False))


@contextlib.contextmanager
def enabled_for(model):
    """Within the block, `model` decodes on this path as the Engine sets it up with AMPHISTA_EXACT_GREEDY=1
    (the flag on, the linears routed); both are restored after. For benchmarks' side-by-side rows."""
    from ..evaluation.env import env_var
    from .routed_linear import RoutedLinear, route_linears
    was_routed = type(model.output) is RoutedLinear
    with env_var(ENV_VAR, "1"):
        route_linears(model)
        try:
            yield model
        finally:
            if not was_routed:
                route_linears(model, on=False)


def applies(kv: torch.Tensor) -> bool:
    """For a half-precision KV cache on a CUDA device, when enabled (fp32 keeps the decoders equal in practice,
    and the CPU has its own exact path)."""
    return enabled() and kv.device.type == "cuda" and kv.dtype in (torch.bfloat16, torch.float16)


@dataclass
class OrderedTree:
    """Built once per decode forward, shared by every layer."""
    new_mask: torch.Tensor     # [B or 1, N, N] bool, ancestor-or-self: what the reference backend reads
    bits: torch.Tensor         # [B or 1, N] int64 ancestor bits
    split: torch.Tensor        # [B, N] int32: s(p), the token's keys before it come from prefix slots 0..s(p) - 1
    window: torch.Tensor       # [B, N, WINDOW] int32: cache slot of position s(p) + w, -1 past the token itself


def layout(prefix_len: torch.Tensor, new_mask: torch.Tensor) -> OrderedTree:
    """prefix_len [B]; new_mask [B or 1, N, N] bool ancestor-or-self. Every new token at most MAX_DEPTH deep."""
    from .reference import mask_bits
    pos, split, slots = cpu_exact.position_windows(prefix_len, new_mask)
    w = split[..., None] + torch.arange(WINDOW, device=prefix_len.device)
    window = torch.where(w <= pos[..., None], slots, -1).to(torch.int32)
    return OrderedTree(new_mask, mask_bits(new_mask), split.to(torch.int32).contiguous(), window.contiguous())
