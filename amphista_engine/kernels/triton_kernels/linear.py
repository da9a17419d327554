"""Few-row linear layers (decoding: 1..16 rows) as a weight-streaming GEMM, optionally fused with the ops
around them in a Llama block (the RMSNorm before, SwiGLU's activation before, the residual add after).

A decoding step is a chain of GEMVs whose cost is reading the weights once. The kernel is the fused SAL
input's GEMM (fused_input.py) without its embedding half: narrow column tiles so every SM streams a share of
W, long K tiles and a deep pipeline so many weight bytes are in flight per program. On an H200 (2026-11-28,
benchmarks/results/gpu/h200_2026-11-28_*) it read the 7B shape's weights 4% faster than cuBLAS in a graphed
decode step, and the profile of that step put ~0.2 ms of its 4.3 ms in the norm and activation launches
between the GEMVs, which the fused forms remove. But the fused forms, timed on 2026-12-04, took 10.3 ms of GEMV
a 7B step: their prologue ran on the MMA tile's 16 rows though a decode step has one, in every program (PTX:
128 exp and divisions a thread per K tile for SwiGLU). One row now runs it on that row alone (ONE_ROW: 2 a
thread), not yet timed. The model's layers reach the kernel only when AMPHISTA_TRITON_LINEAR=1 routes them
through ops.linear / ops.fused_linear (kernels/routed_linear.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..routed_linear import MAX_ROWS  # one row tile: more rows are a GEMM, cuBLAS's job
from .activation import silu_times
from .common import cdiv, dot, exact_dot, launch_first_fitting, next_pow2, stream_block_n
from .fused_input import FUSED_INPUT_CONFIGS
from .norm_rope import scale_normed


@triton.jit
def _linear_kernel(X, W, Out, G, R, M, N, K, eps, stride_xm, stride_wn, stride_om, stride_rm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr,
                   NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, ONE_ROW: tl.constexpr):
    # Row blocks vary fastest: the programs that read one column tile of W run side by side (L2 serves the rest).
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    x_rows = X + rm64[:, None] * stride_xm
    if NORM:
        # Every program recomputes its rows' RMS: the row is a few KiB that L2 holds, and it saves the
        # separate norm launch (and its gap in the graph) the unfused layer pays.
        sq = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)
            sq += tl.sum(a * a, 1)
        inv = tl.rsqrt(sq / K + eps)
        if ONE_ROW:
            # row 0's entry, exactly (the other terms are zeros): the same scale as in the 16-row form
            inv1 = tl.sum(tl.where(rm == 0, inv, 0.0), 0)
    w_cols = W + rn.to(tl.int64)[None, :] * stride_wn      # W [N, K]: output n reads row n, read as column n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a_ok = m_ok[:, None] & k_ok[None, :]
        # Prologues round where the unfused ops write their outputs (ops.rmsnorm, ops.silu_mul), so the
        # fused layer computes the same GEMM input as the two launches it replaces.
        if ONE_ROW:
            # The prologue on the one real row only, then zero rows up to the MMA tile's 16: in the 16-row
            # form every program runs it on 15 rows of padding too (an H200 step took 3x the bare GEMVs).
            a1 = tl.load(X + rk, mask=k_ok, other=0.0)
            if NORM:
                a1 = scale_normed(a1, inv1, tl.load(G + rk, mask=k_ok, other=0.0), a1.dtype)
            if SILU:
                a1 = silu_times(a1, tl.load(X + K + rk, mask=k_ok, other=0.0))
            a = tl.where((rm == 0)[:, None], a1[None, :], tl.zeros_like(a1)[None, :])
        else:
            a = tl.load(x_rows + rk[None, :], mask=a_ok, other=0.0)
            if NORM:
                g = tl.load(G + rk, mask=k_ok, other=0.0)
                a = scale_normed(a, inv[:, None], g[None, :], a.dtype)
            if SILU:
                a = silu_times(a, tl.load(x_rows + K + rk[None, :], mask=a_ok, other=0.0))
        w = tl.load(w_cols + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += dot(a, w, EXACT)
    out = acc.to(Out.dtype.element_ty)
    o_ok = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        # the residual add after the layer, in the output dtype as `x + layer(x)` rounds it
        r = tl.load(R + rm64[:, None] * stride_rm + rn[None, :], mask=o_ok, other=0.0)
        out = (out.to(tl.float32) + r.to(tl.float32)).to(Out.dtype.element_ty)
    tl.store(Out + rm64[:, None] * stride_om + rn[None, :], out, mask=o_ok)


def linear(x: torch.Tensor, w: torch.Tensor, block_n: int | None = None, block_k: int | None = None,
           num_warps: int = 4, num_stages: int | None = None, norm_weight: torch.Tensor | None = None,
           eps: float = 0.0, silu: bool = False, residual: torch.Tensor | None = None,
           one_row: bool | None = None) -> torch.Tensor:
    """Launcher: x [..., K] (last dim contiguous), w [N, K] contiguous, same dtype -> x @ w.T [..., N], fp32
    accumulation rounded once. Rows go in blocks of 16 (MAX_ROWS), so a row's result never depends on how
    many others share the call (kernels/gpu_exact.py); more than a block re-reads W per block, so the routed
    layers send bigger products to cuBLAS unless they ask for that invariance. Launch parameters open for
    benchmarks.

    Fused around the product (ops.fused_linear): norm_weight [K] applies RMSNorm to x's rows first; silu=True
    takes x [..., 2K] as gate | up and uses silu(gate) * up; residual [..., N] is added to the result.

    one_row: with a single row, run the prologue on that row alone (ONE_ROW) rather than on the 16-row tile;
    None = whenever there is one row and a prologue. Both forms give the same bits (the same norm scale, the
    same elementwise ops on the row, the same MMA with zero rows around it), so the exact-greedy path
    (kernels/gpu_exact.py) takes it too; False is for benchmarks."""
    K = w.shape[1]
    N = w.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=w.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.view(*lead, N)
    r2 = residual.reshape(M, N) if residual is not None else out
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    block_m = MAX_ROWS
    if block_n is None:
        block_n = stream_block_n(N, 1, x.device)
    flags = dict(NORM=norm_weight is not None, SILU=silu, RESIDUAL=residual is not None)
    flags["ONE_ROW"] = (M == 1 and (flags["NORM"] or silu)) if one_row is None else (one_row and M == 1)

    def launch(block_k, num_stages):
        _linear_kernel[(cdiv(M, block_m), cdiv(N, block_n))](
            x2, w, out, norm_weight if norm_weight is not None else w, r2, M, N, K, float(eps),
            x2.stride(0), w.stride(0), N, r2.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, max(64, next_pow2(K))),
            EXACT=exact_dot(w.dtype), num_warps=num_warps, num_stages=num_stages, **flags)

    if block_k is not None or num_stages is not None:
        launch(block_k or 64, num_stages or 3)
    else:
        launch_first_fitting(launch, FUSED_INPUT_CONFIGS,
                             (x.device, w.dtype, block_m, block_n, num_warps, "linear", *flags.values()))
    return out.view(*lead, N)
