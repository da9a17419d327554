"""KV-cache write at explicit slots and compaction of the accepted path, all layers in one launch.

Cache buffers are [L, B_max, H_kv, S, D] (KVCache.k / .v). The torch reference builds an index tensor as
large as the data (scatter_/gather need one index per element) and, for compaction, gathers into a
temporary and scatters back: three full passes plus index traffic. Here each program copies rows of D
contiguous elements directly.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import cdiv, next_pow2


@triton.jit
def _kv_write_kernel(Kc, Vc, Kn, Vn, Start, H, T, S,
                     stride_cb, stride_ch, stride_cs, stride_cd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd,
                     HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(Start + b) + t
    ok = (t < T) & (slot >= 0) & (slot < S)            # out-of-range slots are dropped, never written
    d = tl.arange(0, BLOCK_D)
    m = ok[:, None] & (d < HEAD_D)[None, :]
    dst = b * stride_cb + h * stride_ch + slot[:, None] * stride_cs + d[None, :] * stride_cd
    k = tl.load(Kn + b * stride_kb + h * stride_kh + t[:, None] * stride_kt + d[None, :] * stride_kd, mask=m)
    tl.store(Kc + dst, k, mask=m)
    v = tl.load(Vn + b * stride_vb + h * stride_vh + t[:, None] * stride_vt + d[None, :] * stride_vd, mask=m)
    tl.store(Vc + dst, v, mask=m)


def kv_write(k_buf, v_buf, layer: int, start, k, v) -> None:
    """Launcher: k, v [B, H_kv, T, D] (any strides) -> slots start[b] + t of k_buf[layer], v_buf[layer]."""
    B, H, T, D = k.shape
    kc, vc = k_buf[layer], v_buf[layer]
    if B == 0 or T == 0:
        return
    block_t = min(16, next_pow2(T))
    _kv_write_kernel[(B * H, cdiv(T, block_t))](
        kc, vc, k, v, start, H, T, kc.shape[2], *kc.stride(), *k.stride(), *v.stride(),
        HEAD_D=D, BLOCK_D=next_pow2(D), BLOCK_T=block_t, num_warps=2,
    )


@triton.jit
def _move_rows(base, src, dst, m_ok, d, d_ok, stride_s, stride_d):
    m = m_ok[:, None] & d_ok[None, :]
    rows = tl.load(base + src[:, None] * stride_s + d[None, :] * stride_d, mask=m)
    # Every thread's reads land before any thread's writes: a destination may be another row's source.
    tl.debug_barrier()
    tl.store(base + dst[:, None] * stride_s + d[None, :] * stride_d, rows, mask=m)


@triton.jit
def _kv_compact_kernel(Kc, Vc, Src, DstStart, B, H, M, S,
                       stride_l, stride_b, stride_h, stride_s, stride_d, stride_src_b, stride_src_m,
                       HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)                             # one (layer, row, kv head) ...
    l = (pid // (B * H)).to(tl.int64)
    b = ((pid // H) % B).to(tl.int64)
    h = (pid % H).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    src = tl.load(Src + b * stride_src_b + m * stride_src_m, mask=m_ok, other=0)
    src = tl.minimum(tl.maximum(src, 0), S - 1)
    dst = tl.minimum(tl.maximum(tl.load(DstStart + b) + m, 0), S - 1)   # in the row, as the other backends clamp
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    off = l * stride_l + b * stride_b + h * stride_h
    # ... moves all M slots of K (axis 1 = 0) or V (axis 1 = 1) in one program, so no other program
    # touches these rows and the barrier alone orders overlapping moves.
    if tl.program_id(1) == 0:
        _move_rows(Kc + off, src, dst, m_ok, d, d_ok, stride_s, stride_d)
    else:
        _move_rows(Vc + off, src, dst, m_ok, d, d_ok, stride_s, stride_d)


def kv_compact(k_buf, v_buf, src, dst_start) -> None:
    """Launcher: slot src[b, m] -> dst_start[b] + m (clamped to [0, S)) for every layer, K and V, one launch."""
    L, _, H, S, D = k_buf.shape
    B, M = src.shape
    if B == 0 or M == 0:
        return
    _kv_compact_kernel[(L * B * H, 2)](
        k_buf, v_buf, src, dst_start, B, H, M, S, *k_buf.stride(), *src.stride(),
        HEAD_D=D, BLOCK_D=next_pow2(D), BLOCK_M=next_pow2(M), num_warps=1 if M * D <= 1024 else 4,
    )
