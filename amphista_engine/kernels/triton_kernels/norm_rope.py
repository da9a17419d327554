"""Fused RMSNorm (optionally with a residual / position-embedding add) and RoPE at explicit positions, alone
or fused with the KV-cache write of the attention's fused QKV projection.

All are memory-bound row ops: one program reads a row once and writes it once, where the torch reference
makes 6-10 passes (casts, pow, mean, rsqrt, mul, cast, mul; or slice/cat for RoPE). Rounding follows the
reference exactly: RMSNorm normalises in fp32, rounds to x's dtype, then multiplies by w (so bf16 results
match Llama's reference bit for bit up to rsqrt's last ulp); RoPE rotates in fp32 and rounds once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_pow2, num_warps_for, pdl, pdl_launch, pdl_start


@triton.jit
def scale_normed(x, inv, w, out_dtype: tl.constexpr):
    """RMSNorm's output from x and its 1 / rms: normalised in fp32 and rounded to x's dtype first, as
    RMSNorm.forward does, then scaled by w (shared with the GEMV's norm prologue, triton_kernels/linear.py)."""
    normed = (x.to(tl.float32) * inv).to(x.dtype)
    return (normed.to(tl.float32) * w.to(tl.float32)).to(out_dtype)


@triton.jit
def _rmsnorm_kernel(X, R, W, S, Y, n_cols, r_period, eps,
                    stride_x, stride_r, stride_s, stride_y,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
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
    w = tl.load(W + cols, mask=ok, other=0.0)
    tl.store(Y + row * stride_y + cols, scale_normed(x, inv, w, Y.dtype.element_ty), mask=ok)


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
    on = pdl(x.device)
    _rmsnorm_kernel[(rows,)](
        x2, r2, w, s, y, d, r2.shape[0], float(eps),
        x2.stride(0), r2.stride(0), d, d,
        HAS_RES=residual is not None, BLOCK=block, PDL=on, num_warps=num_warps_for(block), **pdl_launch(on),
    )
    return (s, y) if residual is not None else y


@triton.jit
def _rotate(x1, x2, cos, sin):
    """A head's rotated halves (x1 cos - x2 sin, x2 cos + x1 sin), in fp32, each rounded once to x's dtype."""
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    return (x1f * cos - x2f * sin).to(x1.dtype), (x2f * cos + x1f * sin).to(x1.dtype)


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
    y1, y2 = _rotate(x1, x2, cos, sin)
    obase = Out + b * stride_ob + t * stride_ot + h[:, None] * stride_oh
    tl.store(obase + c[None, :], y1, mask=m)
    tl.store(obase + half + c[None, :], y2, mask=m)


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


@triton.jit
def _rotate_heads(src, dst, h, n, stride_dh, half, cos, sin, BLOCK_HALF: tl.constexpr):
    """One token's heads h < n: head j at src + j * 2 * half (contiguous) rotated to dst + j * stride_dh."""
    c = tl.arange(0, BLOCK_HALF)
    m = (h < n)[:, None] & (c < half)[None, :]
    x = src + h[:, None] * (2 * half) + c[None, :]
    y1, y2 = _rotate(tl.load(x, mask=m), tl.load(x + half, mask=m), cos, sin)
    y = dst + h[:, None] * stride_dh + c[None, :]
    tl.store(y, y1, mask=m)
    tl.store(y + half, y2, mask=m)


@triton.jit
def _qkv_rope_write_kernel(QKV, R, Q, Kc, Vc, Start, T, H, H_KV, S, half, n_q_blocks,
                           stride_xb, stride_xt, stride_rb, stride_rt, stride_rd,
                           stride_qb, stride_qt, stride_qh, stride_cb, stride_ch, stride_cs,
                           BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                           PDL: tl.constexpr):
    pdl_start(PDL)
    pid = tl.program_id(0)                             # one (row, token) per program ...
    b = (pid // T).to(tl.int64)
    t = pid % T
    c = tl.arange(0, BLOCK_HALF)
    rbase = R + b * stride_rb + t * stride_rt
    cos = tl.load(rbase + c * stride_rd, mask=c < half, other=0.0)[None, :]
    sin = tl.load(rbase + (c + half) * stride_rd, mask=c < half, other=0.0)[None, :]
    x = QKV + b * stride_xb + t * stride_xt            # q | k | v heads, 2 * half apart
    blk = tl.program_id(1)                             # ... and a block of q heads, or of k and v heads
    if blk < n_q_blocks:
        _rotate_heads(x, Q + b * stride_qb + t * stride_qt, blk * BLOCK_Q + tl.arange(0, BLOCK_Q), H, stride_qh,
                      half, cos, sin, BLOCK_HALF)
    else:
        h = (blk - n_q_blocks) * BLOCK_KV + tl.arange(0, BLOCK_KV)
        slot = tl.load(Start + b) + t
        # An out-of-range slot is dropped, never written (as kv_write): none of its heads passes the masks.
        n_ok = tl.where((slot >= 0) & (slot < S), H_KV, 0)
        off = b * stride_cb + slot * stride_cs
        _rotate_heads(x + H * 2 * half, Kc + off, h, n_ok, stride_ch, half, cos, sin, BLOCK_HALF)
        d = tl.arange(0, 2 * BLOCK_HALF)
        m = (h < n_ok)[:, None] & (d < 2 * half)[None, :]
        v = tl.load(x + (H + H_KV + h[:, None]) * (2 * half) + d[None, :], mask=m)
        tl.store(Vc + off + h[:, None] * stride_ch + d[None, :], v, mask=m)


def qkv_rope_write(qkv, rope_rows, k_buf, v_buf, layer: int, start, n_heads: int, n_kv_heads: int):
    """Launcher: qkv [B, T, (H + 2 H_kv) D] and the cache buffers [L, B_max, H_kv, S, D] with contiguous last
    dims (the buffers with equal strides); rope_rows [B or 1, T, D] fp32; start [B] long, contiguous. Writes
    rotated k and v to slots start[b] + t of layer `layer`; returns rotated q, contiguous [B, T, H, D]."""
    B, T, _ = qkv.shape
    D = k_buf.shape[-1]
    q = torch.empty(B, T, n_heads, D, dtype=qkv.dtype, device=qkv.device)
    if B * T == 0:
        return q
    kc, vc = k_buf[layer], v_buf[layer]
    half = D // 2
    block_half = next_pow2(half)
    block_q = max(1, min(next_pow2(n_heads), 4096 // block_half))       # ~4K elements per program, as rope
    block_kv = max(1, min(next_pow2(n_kv_heads), 4096 // block_half))
    n_q_blocks = cdiv(n_heads, block_q)
    on = pdl(qkv.device)
    _qkv_rope_write_kernel[(B * T, n_q_blocks + cdiv(n_kv_heads, block_kv))](
        qkv, rope_rows, q, kc, vc, start, T, n_heads, n_kv_heads, kc.shape[2], half, n_q_blocks,
        qkv.stride(0), qkv.stride(1), rope_rows.stride(0) if rope_rows.shape[0] > 1 else 0, rope_rows.stride(1),
        rope_rows.stride(2), q.stride(0), q.stride(1), q.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_HALF=block_half, PDL=on, num_warps=4, **pdl_launch(on),
    )
    return q
