"""Amphista's fusion input u = W_fuse [h ; E(x)] as one GEMM whose A operand is gathered on the fly.

The reference looks up E(x) (one launch, writes M x d), casts both halves, concatenates them (writes
M x 2d) and multiplies. Here the K loop of the GEMM simply reads its first d columns from the hidden states
and its last d from the embedding rows of the tokens, cast to the weight dtype on load: the concatenation
and the embedding lookup never touch memory. M (accepted positions per step, times batch) is small, so the
GEMM is weight-bound; programs tile the d output columns finely so that every SM streams a share of W.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, dot, exact_dot, launch_first_fitting, next_pow2, stream_block_n


@triton.jit
def _fused_input_kernel(Hid, Tok, E, W, Out, M, D,
                        stride_hm, stride_em, stride_wn, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EXACT: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < D
    tok = tl.load(Tok + rm, mask=m_ok, other=0).to(tl.int64)
    rm64 = rm.to(tl.int64)
    w_rows = W + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):                    # columns 0..d-1 of [h ; E(x)]: the hidden state
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < D
        a = tl.load(Hid + rm64[:, None] * stride_hm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += dot(a.to(w.dtype), w, EXACT)            # h.to(W's dtype) as the reference
    for k0 in range(0, D, BLOCK_K):                    # columns d..2d-1: the token's embedding row
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < D
        a = tl.load(E + tok[:, None] * stride_em + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + (D + rk)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += dot(a.to(w.dtype), w, EXACT)
    tl.store(Out + rm64[:, None] * stride_om + rn[None, :], acc.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# (K tile, pipeline stages), fastest first on an H200; later ones for GPUs (or fp32 operands) with less
# shared memory.
FUSED_INPUT_CONFIGS = [dict(block_k=256, num_stages=4), dict(block_k=256, num_stages=3),
                       dict(block_k=128, num_stages=3), dict(block_k=64, num_stages=2)]


def fused_sal_input(hidden, tokens, emb_weight, w_fuse, block_n: int | None = None, block_k: int | None = None,
                    num_warps: int = 4, num_stages: int | None = None):
    """Launcher: hidden [..., d], tokens [...], emb_weight [V, d], w_fuse [d, 2d] -> [..., d] (W's dtype).
    block_n (None = heuristic), block_k, num_warps and num_stages are open for benchmarks/kernels/tune.py."""
    d = hidden.shape[-1]
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, d)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    tok = tokens.reshape(-1).contiguous()
    M = h2.shape[0]
    out = torch.empty(M, d, dtype=w_fuse.dtype, device=hidden.device)
    if M == 0:
        return out.view(*lead, d)
    block_m = min(64, max(16, next_pow2(M)))
    if block_n is None:
        block_n = stream_block_n(d, cdiv(M, block_m), hidden.device)

    def launch(block_k, num_stages):
        _fused_input_kernel[(cdiv(M, block_m), cdiv(d, block_n))](
            h2, tok, emb_weight, w_fuse, out, M, d, h2.stride(0), emb_weight.stride(0), w_fuse.stride(0), d,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, max(64, next_pow2(d))),
            EXACT=exact_dot(w_fuse.dtype), num_warps=num_warps, num_stages=num_stages)

    if block_k is not None or num_stages is not None:          # explicit (benchmarks/kernels/tune.py)
        launch(block_k or 64, num_stages or 3)
    else:
        # Long K tiles, deep pipeline: the most weight bytes in flight per program. H200, 7B shape (M = 1):
        # 20.5 us with (256, 4) against 51.9 us with (64, 3) (cuBLAS through torch: 26 us).
        launch_first_fitting(launch, FUSED_INPUT_CONFIGS,
                             (hidden.device, h2.dtype, w_fuse.dtype, block_m, block_n, num_warps, "fused_input"))
    return out.view(*lead, d)
