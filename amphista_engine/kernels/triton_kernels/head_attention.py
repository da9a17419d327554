"""The Auto-embedding Block's attention: pos-emb add + RMSNorm, QKV projection, bi-directional attention
across the K head slots.

Three launches where the reference makes about fifteen:
  1. one fused add + RMSNorm kernel writes both the residual stream x = z + P and RMSNorm(x);
  2. the QKV projection stays a cuBLAS GEMM (F.linear): it is the one op here that moves real bytes (3d x d
     weights), cuBLAS streams them at full bandwidth with the whole GPU, and a Triton kernel that also did
     the attention would have to give each head's program its slice of the weights alone;
  3. one kernel attends across the K slots for every (position, head) straight out of the packed QKV
     rows and writes the heads concatenated, the layout the output projection reads: no view/permute
     copies, no SDPA dispatch. K is tiny (4 by default), so the K x K scores are a broadcast product in
     registers, not a tensor-core matmul.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import next_pow2
from .norm_rope import rmsnorm


@triton.jit
def _slot_attention_kernel(QKV, Out, n_heads, K, d, hd, qk_scale,
                           stride_qkv_row, stride_out_row,
                           BLOCK_K: tl.constexpr, BLOCK_HD: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // n_heads
    h = pid % n_heads
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    c = tl.arange(0, BLOCK_HD)
    m = k_ok[:, None] & (c < hd)[None, :]
    row = (n * K + kk).to(tl.int64)                     # the K slot rows of position n
    base = QKV + row[:, None] * stride_qkv_row + h * hd + c[None, :]   # packed as (q | k | v) x heads x hd
    q = tl.load(base, mask=m, other=0.0).to(tl.float32)
    k = tl.load(base + d, mask=m, other=0.0).to(tl.float32)
    v = tl.load(base + 2 * d, mask=m, other=0.0).to(tl.float32)
    s = tl.sum(q[:, None, :] * k[None, :, :], 2) * qk_scale          # [K, K], base-2 logits
    s = tl.where(k_ok[None, :], s, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    o = tl.sum(p[:, :, None] * v[None, :, :], 1)                       # [K, hd]
    tl.store(Out + row[:, None] * stride_out_row + h * hd + c[None, :], o.to(Out.dtype.element_ty), mask=m)


def slot_attention(qkv: torch.Tensor, n_heads: int, scale: float | None = None) -> torch.Tensor:
    """Bi-directional attention across slots: qkv [N, K, 3d] packed (q | k | v, heads of d / n_heads)
    -> [N, K, d], heads concatenated."""
    N, K, three_d = qkv.shape
    d = three_d // 3
    hd = d // n_heads
    out = torch.empty(N, K, d, dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0:
        return out
    qkv2 = qkv.reshape(N * K, three_d)
    scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
    _slot_attention_kernel[(N * n_heads,)](
        qkv2, out, n_heads, K, d, hd, scale * 1.4426950408889634, qkv2.stride(0), d,
        BLOCK_K=next_pow2(K), BLOCK_HD=next_pow2(hd), num_warps=2,
    )
    return out


def head_attention(z, pos_emb, norm_w, eps: float, wqkv, n_heads: int, scale: float | None = None):
    """Launcher for ops.head_attention: returns (x, attn), both [N, K, d]."""
    # the norm kernel reads w and the pos-emb rows with unit column stride: a strided view gave wrong rows
    norm_w = norm_w.contiguous()
    pos_emb = pos_emb.contiguous() if pos_emb is not None else None
    if pos_emb is not None:
        x, h = rmsnorm(z, norm_w, eps, residual=pos_emb)
    else:
        x, h = z, rmsnorm(z, norm_w, eps)
    return x, slot_attention(F.linear(h, wqkv), n_heads, scale)
