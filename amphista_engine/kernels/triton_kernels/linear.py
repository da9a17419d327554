"""Few-row linear layers (decoding: a plain step's row, up to a tree's 64) as a weight-streaming GEMM,
optionally fused with the ops around them in a Llama block (the RMSNorm before, SwiGLU's activation before, the
residual add after).

A decoding step is a chain of GEMVs whose cost is reading the weights once. The kernel is the fused SAL
input's GEMM (fused_input.py) without its embedding half: narrow column tiles so every SM streams a share of
W, long K tiles and a deep pipeline so many weight bytes are in flight per program. On an H200 (2026-12-04,
benchmarks/results/gpu/h200_2026-12-04b_suite) a graphed 7B decode step with these GEMVs took 4.18 ms against
4.40 with cuBLAS; the products read the weights at 90% of copy bandwidth. The fused forms took 4.78 ms: with
the prologue on the one row of a decode step (ONE_ROW; on all 16 rows of the MMA tile they took 10.8 ms), the
RMS pre-pass over K, a loop of serial loads, still delayed the weight stream by more than the norm launch it
saves (w13 +norm 61 us, bare 47 + norm 2); one row now takes its RMS from one load (ROW_K), untimed. The model's layers reach the kernel through ops.linear (kernels/routed_linear.py), on the
shapes where it measured faster than cuBLAS on the device (kernels/linear_choice.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..routed_linear import MAX_ROWS  # one row tile: more rows are a GEMM, cuBLAS's job
from .activation import silu_times
from .common import cdiv, dot, exact_dot, launch_first_fitting, next_pow2, pdl, pdl_launch, pdl_start, stream_block_n
from .fused_input import FUSED_INPUT_CONFIGS
from .norm_rope import scale_normed


@triton.jit
def _rows(X, rm, rk, M, K, stride_xm):
    """x[rm, rk] (zeros outside the matrix)."""
    return tl.load(X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :],
                   other=0.0)


@triton.jit
def _store_rows(acc, Out, R, rm, rn, M, N, stride_om, stride_rm, RESIDUAL: tl.constexpr):
    out = acc.to(Out.dtype.element_ty)
    rm64 = rm.to(tl.int64)
    o_ok = (rm < M)[:, None] & (rn < N)[None, :]
    if RESIDUAL:
        # the residual add after the layer, in the output dtype as `x + layer(x)` rounds it
        r = tl.load(R + rm64[:, None] * stride_rm + rn[None, :], mask=o_ok, other=0.0)
        out = (out.to(tl.float32) + r.to(tl.float32)).to(Out.dtype.element_ty)
    tl.store(Out + rm64[:, None] * stride_om + rn[None, :], out, mask=o_ok)


@triton.jit
def _linear_kernel(X, W, Out, G, R, M, N, K, eps, stride_xm, stride_wn, stride_om, stride_rm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr,
                   NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, ONE_ROW: tl.constexpr,
                   ROW_BLOCKS: tl.constexpr, PDL: tl.constexpr, PREFETCH_K: tl.constexpr, LINE: tl.constexpr,
                   ROW_K: tl.constexpr):
    if PDL:
        # This program's first PREFETCH_K weights of each column into L2 while the previous kernel drains
        # (common.py: weights are never written while decoding), one prefetch per 128-byte line.
        pn = tl.minimum(tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
        pk = tl.minimum(tl.arange(0, PREFETCH_K // LINE) * LINE, K - 1)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l",
                                  [W + pn.to(tl.int64)[:, None] * stride_wn + pk[None, :]], dtype=tl.int32,
                                  is_pure=False, pack=1)
    pdl_start(PDL)
    # Row blocks vary fastest: the programs that read one column tile of W run side by side (L2 serves the rest).
    # ROW_BLOCKS > 1 (2 or 4; bare products only): the program takes that many 16-row blocks and multiplies
    # each weight tile it loads with all of them, one 16-row MMA each: a 64-node tree's rows read W once,
    # not four times, and every row still gets the MMA (and the bits) it gets alone.
    rm = tl.program_id(0) * (BLOCK_M * ROW_BLOCKS) + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    x_rows = X + rm64[:, None] * stride_xm
    if NORM:
        # Every program recomputes its rows' RMS: the row is a few KiB that L2 holds, and it saves the
        # separate norm launch (and its gap in the graph) the unfused layer pays.
        if ROW_K > 0:
            # One row (ONE_ROW, K <= ROW_K): all of it in one load, one L2 round trip. The loop below waits for
            # each of its K / BLOCK_K loads in turn (nothing pipelines them), and that wait cost a 7B w13
            # ~14 us of its 61 us fused product on an H200 (2026-12-04b; bare, 47 us).
            kk = tl.arange(0, ROW_K)
            xr = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)
            inv1 = tl.rsqrt(tl.sum(xr * xr, 0) / K + eps)
        else:
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
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
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
        if ROW_BLOCKS > 1:
            acc1 += dot(_rows(X, rm + BLOCK_M, rk, M, K, stride_xm), w, EXACT)
        if ROW_BLOCKS > 2:
            acc2 += dot(_rows(X, rm + 2 * BLOCK_M, rk, M, K, stride_xm), w, EXACT)
            acc3 += dot(_rows(X, rm + 3 * BLOCK_M, rk, M, K, stride_xm), w, EXACT)
    _store_rows(acc, Out, R, rm, rn, M, N, stride_om, stride_rm, RESIDUAL)
    if ROW_BLOCKS > 1:
        _store_rows(acc1, Out, R, rm + BLOCK_M, rn, M, N, stride_om, stride_rm, RESIDUAL)
    if ROW_BLOCKS > 2:
        _store_rows(acc2, Out, R, rm + 2 * BLOCK_M, rn, M, N, stride_om, stride_rm, RESIDUAL)
        _store_rows(acc3, Out, R, rm + 3 * BLOCK_M, rn, M, N, stride_om, stride_rm, RESIDUAL)


# (K tile, pipeline stages) for a bare product over 64-wide column tiles (w13, LM heads), fastest first. On an
# H200 (2026-12-04, results/gpu/h200_2026-12-04b_tune) the 7B w13 (22016x4096, one row) took 42.8 us with
# (128, 3) against 46.6 us with the fused input's (256, 4). Prologues keep FUSED_INPUT_CONFIGS, where the
# same sweep found (256, *) faster. Every row-block count starts from the same K tile on an H100/H200's shared
# memory, so the exact path's rows see one summation grouping whatever the step's size.
WIDE_BARE_CONFIGS = [dict(block_k=128, num_stages=3), dict(block_k=128, num_stages=2), dict(block_k=64, num_stages=2)]


PREFETCH_K = 512     # weights per column a PDL program pulls into L2 before it waits (2-4 K tiles)
ONE_LOAD_K = 8192    # the longest row a one-row norm prologue loads at once


def row_blocks_for(m: int, prologue: bool) -> int:
    """16-row blocks per program: 1 up to 16 rows, then 2 or 4 for bare products (ROW_BLOCKS), so up to 64
    rows read the weights once. Prologues stay one block a program (their per-row norm scale)."""
    if m <= MAX_ROWS or prologue:
        return 1
    return 2 if m <= 2 * MAX_ROWS else 4


def linear(x: torch.Tensor, w: torch.Tensor, block_n: int | None = None, block_k: int | None = None,
           num_warps: int = 4, num_stages: int | None = None, norm_weight: torch.Tensor | None = None,
           eps: float = 0.0, silu: bool = False, residual: torch.Tensor | None = None,
           one_row: bool | None = None, row_blocks: int | None = None) -> torch.Tensor:
    """Launcher: x [..., K] (last dim contiguous), w [N, K] contiguous, same dtype -> x @ w.T [..., N], fp32
    accumulation rounded once. Rows go in MMAs of 16 (MAX_ROWS), so a row's result never depends on how
    many others share the call (kernels/gpu_exact.py). A program multiplies each weight tile with up to four
    such blocks (row_blocks, None = row_blocks_for), so up to 64 rows read W once; more re-read it per 64.
    The routed layers take it for products over 16 rows where it measured faster than cuBLAS
    (kernels/linear_choice.py), and always on the exact path. Launch parameters open for benchmarks.

    Fused around the product (ops.fused_linear): norm_weight [K] applies RMSNorm to x's rows first; silu=True
    takes x [..., 2K] as gate | up and uses silu(gate) * up; residual [..., N] is added to the result.

    one_row: with a single row, run the prologue on that row alone (ONE_ROW) rather than on the 16-row tile;
    None = whenever there is one row and a prologue; False is for benchmarks. A SwiGLU prologue gives the same
    bits both ways. A norm's one-row form sums the row's squares in one pass, so its scale may differ from the
    16-row loop's in the last fp32 bit (the exact path, kernels/gpu_exact.py, never fuses)."""
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
    prologue = flags["NORM"] or silu
    if row_blocks is None:
        row_blocks = row_blocks_for(M, prologue)
    if row_blocks not in (1, 2, 4) or (row_blocks > 1 and prologue):
        raise ValueError(f"row_blocks={row_blocks}: 1, 2 or 4, and 1 with a norm or silu prologue")
    flags["ROW_BLOCKS"] = row_blocks
    flags["PDL"] = pdl(x.device)
    # the one-row norm's single load of the row, for rows up to ONE_LOAD_K (registers: ONE_LOAD_K / 128 a thread)
    flags["ROW_K"] = next_pow2(K) if flags["ONE_ROW"] and flags["NORM"] and next_pow2(K) <= ONE_LOAD_K else 0

    def launch(block_k, num_stages):
        _linear_kernel[(cdiv(M, block_m * row_blocks), cdiv(N, block_n))](
            x2, w, out, norm_weight if norm_weight is not None else w, r2, M, N, K, float(eps),
            x2.stride(0), w.stride(0), N, r2.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, max(64, next_pow2(K))),
            EXACT=exact_dot(w.dtype), PREFETCH_K=PREFETCH_K, LINE=128 // w.element_size(), num_warps=num_warps,
            num_stages=num_stages, **flags, **pdl_launch(flags["PDL"]))

    if block_k is not None or num_stages is not None:
        launch(block_k or 64, num_stages or 3)
    else:
        configs = WIDE_BARE_CONFIGS if block_n == 64 and not prologue else FUSED_INPUT_CONFIGS
        launch_first_fitting(launch, configs,
                             (x.device, w.dtype, block_m, block_n, num_warps, "linear", *flags.values()))
    return out.view(*lead, N)
