"""SwiGLU's activation, silu(gate) * up, over the fused gate | up projection in one pass.

The torch reference takes two launches and writes silu(gate) to memory only to read it back for the product.
Rounding follows it: silu in fp32 rounded to x's dtype, then the product in fp32 rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_pow2, num_warps_for, pdl, pdl_launch, pdl_start


@triton.jit
def silu_times(gate, up):
    """silu(gate) * up in gate's dtype, rounded as torch does: silu in fp32 rounded to the dtype, then the
    product in fp32 rounded once (shared with the GEMV's SwiGLU prologue, triton_kernels/linear.py)."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_mul_kernel(X, Y, n, stride_x, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)                # one row per program ...
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)   # ... and a block of its n outputs
    ok = cols < n
    gate = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    up = tl.load(X + row * stride_x + n + cols, mask=ok, other=0.0)
    tl.store(Y + row * n + cols, silu_times(gate, up), mask=ok)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """Launcher: x [..., 2I] (last dim contiguous) -> silu(x[..., :I]) * x[..., I:], a new [..., I] tensor."""
    n = x.shape[-1] // 2
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x2 = x.reshape(-1, 2 * n)
    block = min(next_pow2(n), 1024)
    on = pdl(x.device)
    _silu_mul_kernel[(x2.shape[0], cdiv(n, block))](x2, y, n, x2.stride(0), BLOCK=block, PDL=on,
                                                    num_warps=num_warps_for(block), **pdl_launch(on))
    return y
