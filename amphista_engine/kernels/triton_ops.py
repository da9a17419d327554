"""The `triton` backend table: one function per op, same signature as `ops`, launching the kernels in
`triton_kernels/`. Each function checks what its kernel supports and returns NotImplemented otherwise, so
the dispatcher runs the reference instead (wider trees, odd dtypes, mismatched layouts...).
"""
from __future__ import annotations

from typing import Optional

import torch

from .triton_kernels import acceptance as _acc
from .triton_kernels import activation as _act
from .triton_kernels import fused_input as _fi
from .triton_kernels import head_attention as _ha
from .triton_kernels import kv_cache as _kv
from .triton_kernels import linear as _lin
from .triton_kernels import norm_rope as _nr
from .triton_kernels import tree_attention as _ta

BACKEND = "triton"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_TREE = 64          # ancestor rows are one uint64
MAX_HEAD_DIM = 256     # one [BLOCK_M, D] query tile in registers
MIN_HEAD_DIM = 16      # tl.dot needs K >= 16 on the GPU
MAX_ROW = 32768        # row ops keep a whole row in one program


def _same_device(*ts) -> bool:
    dev = ts[0].device
    return all(t is None or t.device == dev for t in ts)


# ---- attention -----------------------------------------------------------------------------------------
def tree_attention(q, k_cache, v_cache, prefix_len, new_mask, kv_len: int, scale: Optional[float] = None,
                   dense_mask=None, order=None, window: Optional[int] = None, positions=None):
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or q.dtype not in FLOATS:
        return NotImplemented
    B, H, N, D = q.shape
    if (k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or k_cache.shape[0] < B or k_cache.shape[3] != D
            or H % k_cache.shape[1] or not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM or not 0 < N <= MAX_TREE
            or not _same_device(q, k_cache, v_cache, prefix_len, new_mask)):
        return NotImplemented
    if new_mask.dtype == torch.bool:
        if new_mask.shape[-2:] != (N, N):
            return NotImplemented
        bits = new_mask.reshape(-1, N, N)
        bits = (bits.long() << torch.arange(N, device=q.device)).sum(-1)
    elif new_mask.dtype == torch.int64 and new_mask.shape[-1] == N:
        bits = new_mask.reshape(-1, N)
    else:
        return NotImplemented
    if bits.shape[0] not in (1, B):
        return NotImplemented
    slide = {}
    if window is not None:
        if positions.shape[0] not in (1, B) or not _same_device(q, positions):
            return NotImplemented
        slide = dict(sliding=int(window), positions=positions)
    if order is not None:
        from . import gpu_exact
        if order.split.shape != (B, N) or order.window.shape[:2] != (B, N) or not _same_device(q, order.window):
            return NotImplemented
        return _ta.tree_attention_ordered(q, k_cache, v_cache, order.split, order.window, int(kv_len),
                                          gpu_exact.CHUNK, scale, **slide)
    return _ta.tree_attention(q, k_cache, v_cache, prefix_len, bits, int(kv_len), scale, **slide)


def head_attention(z, pos_emb, norm_w, eps: float, wqkv, n_heads: int, scale: Optional[float] = None):
    if z.dim() != 3 or z.dtype not in FLOATS or z.shape[-1] % n_heads or z.shape[-1] > MAX_ROW:
        return NotImplemented
    N, K, d = z.shape
    if (norm_w.dtype != z.dtype or wqkv.dtype != z.dtype or tuple(wqkv.shape) != (3 * d, d) or K > 64
            or (pos_emb is not None and (pos_emb.dtype != z.dtype or tuple(pos_emb.shape) != (K, d)))
            or d // n_heads > MAX_HEAD_DIM or not _same_device(z, pos_emb, norm_w, wqkv)):
        return NotImplemented
    return _ha.head_attention(z, pos_emb, norm_w, eps, wqkv, n_heads, scale)


# ---- staged adaptation input ---------------------------------------------------------------------------
def fused_sal_input(hidden, tokens, emb_weight, w_fuse):
    d = hidden.shape[-1]
    if (w_fuse.dim() != 2 or tuple(w_fuse.shape) != (d, 2 * d) or w_fuse.dtype not in FLOATS
            or emb_weight.dim() != 2 or emb_weight.shape[1] != d or hidden.dtype not in FLOATS
            or emb_weight.dtype not in FLOATS or tokens.shape != hidden.shape[:-1]
            or tokens.dtype not in (torch.int64, torch.int32) or w_fuse.stride(1) != 1
            or emb_weight.stride(1) != 1 or not _same_device(hidden, tokens, emb_weight, w_fuse)):
        return NotImplemented
    return _fi.fused_sal_input(hidden, tokens, emb_weight, w_fuse)


# ---- norms and RoPE ------------------------------------------------------------------------------------
def _row_op_ok(x, w) -> bool:
    return (x.dim() >= 1 and x.dtype in FLOATS and w.dtype in FLOATS and tuple(w.shape) == (x.shape[-1],)
            and w.is_contiguous() and 0 < x.shape[-1] <= MAX_ROW and _same_device(x, w))


def rmsnorm(x, w, eps: float):
    if not _row_op_ok(x, w):
        return NotImplemented
    return _nr.rmsnorm(x, w, eps)


def add_rmsnorm(x, residual, w, eps: float):
    if not _row_op_ok(x, w) or residual.dtype != x.dtype or not _same_device(x, residual):
        return NotImplemented
    if residual.shape != x.shape and not (residual.dim() == 2 and x.dim() >= 2 and residual.shape == x.shape[-2:]):
        return NotImplemented
    if residual.shape == x.shape:
        residual = residual.reshape(-1, x.shape[-1])   # row i adds residual row i (period = all rows)
    return _nr.rmsnorm(x, w, eps, residual=residual.contiguous())


def rope(x, rope_rows):
    if x.dim() != 4 or x.dtype not in FLOATS or x.shape[-1] % 2 or rope_rows.dim() != 3:
        return NotImplemented
    B, T, H, D = x.shape
    if rope_rows.shape[1:] != (T, D) or rope_rows.shape[0] not in (1, B) or not _same_device(x, rope_rows):
        return NotImplemented
    return _nr.rope(x, rope_rows)


# ---- linear layers -------------------------------------------------------------------------------------
def linear(x, w, batch_invariant: bool = False):
    if (x.dim() < 1 or w.dim() != 2 or x.dtype not in FLOATS or w.dtype != x.dtype or x.shape[-1] != w.shape[1]
            or not w.is_contiguous() or not _same_device(x, w)
            or (x.numel() > _lin.MAX_ROWS * x.shape[-1] and not batch_invariant)):
        return NotImplemented
    return _lin.linear(x, w)


def fused_linear(x, w, norm_weight=None, eps: float = 0.0, silu: bool = False, residual=None,
                 batch_invariant: bool = False):
    if x.dim() < 1 or w.dim() != 2 or x.dtype not in FLOATS or w.dtype != x.dtype or not w.is_contiguous() \
            or x.shape[-1] != w.shape[1] * (2 if silu else 1) or not _same_device(x, w) \
            or (x.numel() > _lin.MAX_ROWS * x.shape[-1] and not batch_invariant):
        return NotImplemented
    if norm_weight is not None and (norm_weight.shape != (w.shape[1],) or norm_weight.dtype != x.dtype
                                    or not norm_weight.is_contiguous() or not _same_device(x, norm_weight)):
        return NotImplemented
    if residual is not None and (residual.shape != (*x.shape[:-1], w.shape[0]) or residual.dtype != x.dtype
                                 or not _same_device(x, residual)):
        return NotImplemented
    return _lin.linear(x, w, norm_weight=norm_weight, eps=eps, silu=silu, residual=residual)


# ---- activation ----------------------------------------------------------------------------------------
def silu_mul(x):
    if x.dim() < 1 or x.dtype not in FLOATS or x.shape[-1] % 2 or x.stride(-1) != 1:
        return NotImplemented
    return _act.silu_mul(x)


# ---- KV cache ------------------------------------------------------------------------------------------
def kv_write(k_buf, v_buf, layer: int, start, k, v):
    if k_buf.dim() != 5 or k.dim() != 4 or v.shape != k.shape or k_buf.shape != v_buf.shape:
        return NotImplemented
    B, H, T, D = k.shape
    if (k_buf.stride() != v_buf.stride() or k_buf.shape[2] != H or k_buf.shape[4] != D or B > k_buf.shape[1]
            or k.dtype != k_buf.dtype or v.dtype != k_buf.dtype or not _same_device(k_buf, v_buf, start, k, v)):
        return NotImplemented
    _kv.kv_write(k_buf, v_buf, int(layer), start.contiguous(), k, v)
    return None


def qkv_rope_write(qkv, rope_rows, k_buf, v_buf, layer: int, start, n_heads: int, n_kv_heads: int):
    if (qkv.dim() != 3 or k_buf.dim() != 5 or rope_rows.dim() != 3 or n_heads <= 0 or n_kv_heads <= 0
            or k_buf.shape != v_buf.shape or k_buf.stride() != v_buf.stride()):
        return NotImplemented
    B, T, W = qkv.shape
    D = k_buf.shape[4]
    if (W != (n_heads + 2 * n_kv_heads) * D or D % 2 or k_buf.shape[2] != n_kv_heads or B > k_buf.shape[1]
            or qkv.dtype not in FLOATS or k_buf.dtype != qkv.dtype or v_buf.dtype != qkv.dtype
            or qkv.stride(2) != 1 or k_buf.stride(4) != 1 or rope_rows.dtype != torch.float32
            or rope_rows.shape[1:] != (T, D) or rope_rows.shape[0] not in (1, B) or tuple(start.shape) != (B,)
            or not _same_device(qkv, rope_rows, k_buf, v_buf, start)):
        return NotImplemented
    return _nr.qkv_rope_write(qkv, rope_rows, k_buf, v_buf, int(layer), start.contiguous(), n_heads, n_kv_heads)


def kv_compact(k_buf, v_buf, src, dst_start):
    if (k_buf.dim() != 5 or k_buf.shape != v_buf.shape or k_buf.stride() != v_buf.stride() or src.dim() != 2
            or src.shape[0] > k_buf.shape[1] or src.shape[1] > 1024 or not _same_device(k_buf, v_buf, src, dst_start)):
        return NotImplemented
    _kv.kv_compact(k_buf, v_buf, src, dst_start.contiguous())
    return None


# ---- acceptance ----------------------------------------------------------------------------------------
def _accept_ok(tokens, logits, retrieve) -> bool:
    return (tokens.dim() == 2 and logits.dim() == 3 and logits.shape[:2] == tokens.shape
            and logits.dtype in FLOATS and retrieve.dim() in (2, 3) and retrieve.shape[-2] <= 1024
            and retrieve.shape[-1] <= 64 and (retrieve.dim() == 2 or retrieve.shape[0] in (1, tokens.shape[0]))
            and _same_device(tokens, logits, retrieve))


def _result(fields):
    from ..acceptance import AcceptResult
    return AcceptResult(*fields)


def greedy_accept(tokens, logits, retrieve):
    if not _accept_ok(tokens, logits, retrieve):
        return NotImplemented
    return _result(_acc.accept(tokens, logits, retrieve, typical=False))


def typical_accept(tokens, logits, retrieve, temperature: float, posterior_threshold: float = 0.09,
                   posterior_alpha: float = 0.3, generator=None):
    from ..acceptance import _check_sampling
    _check_sampling(temperature)                       # the reference's errors, before any launch
    if temperature == 0:
        return greedy_accept(tokens, logits, retrieve)
    if not _accept_ok(tokens, logits, retrieve):
        return NotImplemented
    return _result(_acc.accept(tokens, logits, retrieve, typical=True, temperature=temperature,
                               posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha,
                               generator=generator))
