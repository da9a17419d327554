"""Few-row linear layers (decoding: 1..16 rows) as a weight-streaming GEMM.

A decoding step is a chain of GEMVs whose cost is reading the weights once. The kernel is the fused SAL
input's GEMM (fused_input.py) without its embedding half: narrow column tiles so every SM streams a share of
W, long K tiles and a deep pipeline so many weight bytes are in flight per program. On an H200 that tiling read
the 7B-shaped fusion weight at 20.5 us against cuBLAS's 26 us through torch; whether it beats cuBLAS on the
model's own GEMVs is what benchmarks/kernels/linear.py and the GPU suite's A/B measure, so the model's layers
reach it only when AMPHISTA_TRITON_LINEAR=1 routes them through ops.linear (kernels/routed_linear.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, dot, exact_dot, launch_first_fitting, next_pow2, stream_block_n
from .fused_input import FUSED_INPUT_CONFIGS

MAX_ROWS = 16          # one row tile: more rows are a GEMM, cuBLAS's job


@triton.jit
def _linear_kernel(X, W, Out, M, N, K, stride_xm, stride_wn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    w_cols = W + rn.to(tl.int64)[None, :] * stride_wn      # W [N, K]: output n reads row n, read as column n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(X + rm64[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += dot(a, w, EXACT)
    tl.store(Out + rm64[:, None] * stride_om + rn[None, :], acc.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def linear(x: torch.Tensor, w: torch.Tensor, block_n: int | None = None, block_k: int | None = None,
           num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """Launcher: x [..., K] with at most MAX_ROWS rows (last dim contiguous), w [N, K] contiguous, same dtype
    -> x @ w.T [..., N], fp32 accumulation rounded once. Launch parameters open for benchmarks."""
    K = x.shape[-1]
    N = w.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=w.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.view(*lead, N)
    block_m = max(16, next_pow2(M))
    if block_n is None:
        block_n = stream_block_n(N, 1, x.device)

    def launch(block_k, num_stages):
        _linear_kernel[(cdiv(N, block_n),)](
            x2, w, out, M, N, K, x2.stride(0), w.stride(0), N,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, max(64, next_pow2(K))),
            EXACT=exact_dot(w.dtype), num_warps=num_warps, num_stages=num_stages)

    if block_k is not None or num_stages is not None:
        launch(block_k or 64, num_stages or 3)
    else:
        launch_first_fitting(launch, FUSED_INPUT_CONFIGS, (x.device, w.dtype, block_m, block_n, num_warps, "linear"))
    return out.view(*lead, N)
