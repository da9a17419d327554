"""Fused RMSNorm (optionally with a residual / position-embedding add) and RoPE at explicit positions.

Both are memory-bound row ops: one program reads a row once and writes it once, where the torch reference
makes 6-10 passes (casts, pow, mean, rsqrt, mul, cast, mul; or slice/cat for RoPE). Rounding follows the
reference exactly: RMSNorm normalises in fp32, rounds to x's dtype, then multiplies by w (so bf16 results
match Llama's reference bit for bit up to rsqrt's last ulp); RoPE rotates in fp32 and rounds once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_pow2, num_warps_for


@triton.jit
def _rmsnorm_kernel(X, R, W, S, Y, n_cols, r_period, eps,
                    stride_x, stride_r, stride_s, stride_y,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        # residual row r = row % r_period: a [P, d] table added to every group of P rows (AEB pos-emb)
        r = tl.load(R + (row % r_period) * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)   # torch adds in x's dtype
        tl.store(S + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * inv).to(x.dtype)                    # round to x's dtype first, as RMSNorm.forward does
    w = tl.load(W + cols, mask=ok, other=0.0)
    tl.store(Y + row * stride_y + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(Y.dtype.element_ty),
             mask=ok)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Launcher: rows of x [..., d] (last dim contiguous). With residual [..., d] (x's shape, or [P, d] with
    x.shape[-2] == P, broadcast over the leading dims) returns (x + residual, rmsnorm), else rmsnorm."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.promote_types(w.dtype, x.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else y
    rows = x2.shape[0]
    if rows == 0:
        return (s, y) if residual is not None else y
    r2 = residual.reshape(-1, d) if residual is not None else x2
    block = next_pow2(d)
    _rmsnorm_kernel[(rows,)](
        x2, r2, w, s, y, d, r2.shape[0], float(eps),
        x2.stride(0), r2.stride(0), d, d,
        HAS_RES=residual is not None, BLOCK=block, num_warps=num_warps_for(block),
    )
    return (s, y) if residual is not None else y


@triton.jit
def _rope_kernel(X, R, Out, T, H, half,
                 stride_xb, stride_xt, stride_xh, stride_xd,
                 stride_rb, stride_rt, stride_rd,
                 stride_ob, stride_ot, stride_oh,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0)                             # one (row, token) per program ...
    b = (pid // T).to(tl.int64)
    t = pid % T
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)   # ... and a block of heads
    c = tl.arange(0, BLOCK_HALF)
    c_ok = c < half
    rbase = R + b * stride_rb + t * stride_rt
    cos = tl.load(rbase + c * stride_rd, mask=c_ok, other=0.0)[None, :]
    sin = tl.load(rbase + (c + half) * stride_rd, mask=c_ok, other=0.0)[None, :]
    m = (h < H)[:, None] & c_ok[None, :]
    xbase = X + b * stride_xb + t * stride_xt + h[:, None] * stride_xh
    x1 = tl.load(xbase + c[None, :] * stride_xd, mask=m, other=0.0)
    x2 = tl.load(xbase + (c[None, :] + half) * stride_xd, mask=m, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    obase = Out + b * stride_ob + t * stride_ot + h[:, None] * stride_oh
    tl.store(obase + c[None, :], (x1f * cos - x2f * sin).to(x1.dtype), mask=m)
    tl.store(obase + half + c[None, :], (x2f * cos + x1f * sin).to(x1.dtype), mask=m)


def rope(x: torch.Tensor, rope_rows: torch.Tensor) -> torch.Tensor:
    """Launcher: x [B, T, H, D] any strides; rope_rows [B or 1, T, D] fp32. Returns contiguous [B, T, H, D]."""
    B, T, H, D = x.shape
    out = torch.empty(B, T, H, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = D // 2
    block_half = next_pow2(half)
    block_h = max(1, min(next_pow2(H), 4096 // block_half))    # ~4K elements of x per program
    _rope_kernel[(B * T, cdiv(H, block_h))](
        x, rope_rows, out, T, H, half,
        *x.stride(), rope_rows.stride(0) if rope_rows.shape[0] > 1 else 0, rope_rows.stride(1), rope_rows.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4,
    )
    return out
