"""Tree-masked verification attention over a static KV cache, flash-decoding style.

Queries: the N new tokens of a row (tree nodes, N <= 64; N = 1 is plain decoding) for all H query heads.
Keys/values: cache slots [0, prefix_len[b]) (the accepted prefix, always visible) and the N new slots
[prefix_len[b], prefix_len[b] + N), visible to node i only where bit j of its uint64 ancestor row is set.

Layout of the work (why):
  * One program owns one KV head and a block of BLOCK_M query rows, a row being a (node, query head of
    this KV group) pair. Every K/V tile it loads serves all G = H / H_kv heads that share it and all
    nodes, so GQA costs no extra KV traffic and tl.dot gets M = N * G rows even at N = 1.
  * The key range is cut into SPLITS chunks along the sequence (split-K, "flash decoding"): with one
    request a decode step has only H_kv programs per layer, far fewer than the GPU's SMs; splitting the
    prefix gives every SM a share of the cache. Each split writes its softmax-normalised partial output
    and log-sum-exp; the splits are then merged by a second small kernel ("launch") or by whichever split
    of a program group finishes last ("kernel"), as kernels/split_merge.py decides (`merge`). With one
    split the first kernel writes the output directly and neither runs.
  * Inside a split, tiles that lie entirely in the prefix need no mask (the common case, cheapest loop);
    only the tail tiles that touch the tree slots evaluate the ancestor bits.
  * Softmax runs in base 2 (exp2 with log2(e) folded into the scale) in fp32; P is rounded to V's dtype
    for the second matmul, as flash attention does; accumulation is fp32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..split_merge import arrival_counters, resolve
from .common import cdiv, dot, exact_dot, launch_first_fitting, next_pow2, pdl, pdl_launch, pdl_start, sm_count

BLOCK_N = 64          # keys per tile: a [64, 128] bf16 K tile is 16 KiB, two stages fit every SM
MIN_CHUNK = 128       # keys per split at least: below this the merge costs more than the parallelism gains
MERGE_ROWS = 16       # output rows per merge program
# Partial-output traffic (G*N*splits rows of fp32) may reach about half the K/V bytes of a split. Measured on
# an H200 (benchmarks/results/gpu/h200_2026-11-27_tune): the former 1/8 left a 64-node tree with one split
# (SmolLM2 shape, prefix 2048: 25.9 us; 4 splits: 10.7 us) and two on the 7B shape at prefix 1024 (14.7 us; 4: 12.4).
PARTIAL_BUDGET = 2


@triton.jit
def _program_ids(H_KV, G: tl.constexpr):
    """Grid (B * H_kv, row blocks, splits) -> (b, kv head, row block, split, H), b as int64 for addressing."""
    pid_bh = tl.program_id(0)
    return (pid_bh // H_KV).to(tl.int64), pid_bh % H_KV, tl.program_id(1), tl.program_id(2), H_KV * G


@triton.jit
def _program_rows(Q, stride_qb, stride_qh, stride_qn, stride_qd, b64, kvh, pid_m, N,
                  G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """A program's query rows, (node, query head of KV head kvh) pairs, and their q tile [BLOCK_M, BLOCK_D]."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N * G
    node = rows // G
    head = kvh * G + rows % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    q = tl.load(Q + b64 * stride_qb + head[:, None] * stride_qh + node[:, None] * stride_qn
                + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return row_ok, node, head, d, d_ok, q


@triton.jit
def _store_partial(OPart, LsePart, acc, m_i, l_i, row_ok, node, head, d, d_ok, b64, H, N, splits, split,
                   HEAD_D: tl.constexpr):
    """A split's softmax-normalised output and log-sum-exp (-inf for rows it gave no key) for the merge."""
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    prow = ((b64 * H + head) * N + node) * splits + split          # [B, H, N, splits] row-major
    tl.store(LsePart + prow, lse, mask=row_ok)
    tl.store(OPart + prow[:, None] * HEAD_D + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_if_last(OPart, LsePart, Counter, Out, stride_ob, stride_oh, stride_on, stride_od,
                   row_ok, node, head, d, d_ok, b64, H, N, splits,
                   HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Called by every split of a program group after its _store_partial: the last to arrive merges the
    group's rows (the same sum as _tree_attn_merge) and re-arms the group's counter for the next launch.

    Ordering (the cooperative-groups grid-barrier pattern): the CTA barrier puts every thread's partial stores
    before thread 0's acq_rel atomic (Triton issues a scalar atomic from one thread and broadcasts the result
    through shared memory, behind another barrier); the last arriver's acquire then orders its loads after
    all the other splits' releases. The loads go to L2 (.cg): the partials were written by other SMs."""
    tl.debug_barrier()
    group = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    ticket = tl.atomic_add(Counter + group, 1, sem="acq_rel", scope="gpu")
    if ticket == splits - 1:
        tl.atomic_xchg(Counter + group, 0, sem="relaxed", scope="gpu")
        prow = ((b64 * H + head) * N + node) * splits          # the row's split 0, [B, H, N, splits] row-major
        s = tl.arange(0, BLOCK_S)
        lse = tl.load(LsePart + prow[:, None] + s[None, :], mask=row_ok[:, None] & (s < splits)[None, :],
                      other=float("-inf"), cache_modifier=".cg")
        m = tl.max(lse, 1)
        m = tl.where(m == float("-inf"), 0.0, m)               # a row no key reached: zeros below, like SDPA
        w = tl.exp2(lse - m[:, None])
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        od_mask = row_ok[:, None] & d_ok[None, :]
        for i in range(0, splits):
            w_i = tl.sum(tl.where(s[None, :] == i, w, 0.0), 1)
            o = tl.load(OPart + (prow + i)[:, None] * HEAD_D + d[None, :], mask=od_mask, other=0.0,
                        cache_modifier=".cg")
            acc += w_i[:, None] * o
        denom = tl.sum(w, 1)
        denom = tl.where(row_ok & (denom > 0), denom, 1.0)     # padding rows, rows no key reached: 0
        tl.store(Out + b64 * stride_ob + head[:, None] * stride_oh + node[:, None] * stride_on
                 + d[None, :] * stride_od, (acc / denom[:, None]).to(Out.dtype.element_ty), mask=od_mask)


@triton.jit
def _attn_tile(q, acc, m_i, l_i, k_base, v_base, start, hi, P, bits, d, d_ok,
               stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr, ROW_BOUND: tl.constexpr = False,
               load_hi=0, WINDOW: tl.constexpr = False, lo_row=0, pos_row=0, SLIDE: tl.constexpr = False):
    """One K/V tile [start, start + BLOCK_N) of the online softmax; returns the updated (acc, m_i, l_i).
    MASKED: keys past hi are out, and tree slots (from P on) need the row's ancestor bit; with ROW_BOUND
    instead, `bits` holds each row's own key bound (the ordered path's s(p)). WINDOW: the loads stop at
    load_hi (a host bound) instead of hi, and V is zeroed past hi in registers (so stale or NaN cache slots
    cannot reach 0 * NaN); the scores there are masked like any key past hi. SLIDE (a sliding window, MASKED
    tiles): a key is seen only from position lo_row (per row) on; prefix slot j holds position j, tree slot t
    the position at pos_row + t (the row's new-token positions)."""
    j = start + tl.arange(0, BLOCK_N)
    if WINDOW:
        ld_mask = (j < load_hi)[:, None] & d_ok[None, :]
    elif MASKED:
        ld_mask = (j < hi)[:, None] & d_ok[None, :]
    else:
        ld_mask = d_ok[None, :]
    k = tl.load(k_base + j[:, None] * stride_ks + d[None, :] * stride_kd, mask=ld_mask, other=0.0)
    v = tl.load(v_base + j[:, None] * stride_vs + d[None, :] * stride_vd, mask=ld_mask, other=0.0)
    if WINDOW:
        v = tl.where((j < hi)[:, None], v, tl.zeros_like(v))
    s = dot(q, tl.trans(k), EXACT) * qk_scale
    if MASKED:
        k_ok = j < hi
        if ROW_BOUND:
            allowed = k_ok[None, :] & (j[None, :] < bits[:, None])
            if SLIDE:                                      # prefix keys: slot j holds position j
                allowed = allowed & (j[None, :] >= lo_row[:, None])
        else:
            rel = j - P                                    # tree slot index of key j (negative: prefix)
            in_tree = (rel >= 0) & k_ok
            shift = tl.where(in_tree, rel, 0).to(tl.int64)
            anc = ((bits[:, None] >> shift[None, :]) & 1) != 0
            allowed = k_ok[None, :] & ((j < P)[None, :] | (in_tree[None, :] & anc))
            if SLIDE:
                kpos = tl.where(in_tree, tl.load(pos_row + shift, mask=in_tree, other=0).to(tl.int32), j)
                allowed = allowed & (kpos[None, :] >= lo_row[:, None])
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row may see no key of this tile (or split) at all: keep exp2 arguments finite then.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, EXACT)
    return acc, m_new, l_i


@triton.jit
def _tree_attn_fwd(
    Q, K, V, Bits, PrefixLen, Out, OPart, LsePart, Counter, Pos,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_bb, stride_bn,
    stride_ob, stride_oh, stride_on, stride_od,
    H_KV, N, kv_len, chunk, splits, qk_scale, stride_pb, sliding,
    G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, EXACT: tl.constexpr,
    MERGE_HERE: tl.constexpr = False, BLOCK_S: tl.constexpr = 1, PDL: tl.constexpr = False,
    WINDOW: tl.constexpr = False, SLIDE: tl.constexpr = False,
):
    pdl_start(PDL)
    b64, kvh, pid_m, split, H = _program_ids(H_KV, G)
    row_ok, node, head, d, d_ok, q = _program_rows(Q, stride_qb, stride_qh, stride_qn, stride_qd, b64, kvh, pid_m, N,
                                                   G, HEAD_D, BLOCK_D, BLOCK_M)
    bits = tl.load(Bits + b64 * stride_bb + node * stride_bn, mask=row_ok, other=0)
    P = tl.load(PrefixLen + b64).to(tl.int32)
    total = tl.minimum(P + N, kv_len)                  # the reference never reads slots >= kv_len
    lo = split * chunk
    hi = tl.minimum(lo + chunk, total)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if SLIDE:
        # A sliding window: row r sees positions >= lo_row[r]. The splits share the keys from the block holding
        # the lowest such position (never past the tree slots, whose positions are their own) to the row's end,
        # the last split taking whatever is left, so keys below every row's window are never loaded.
        pos_row = Pos + b64 * stride_pb
        lo_row = tl.load(pos_row + node, mask=row_ok, other=0).to(tl.int32) - sliding + 1
        lo_min = tl.min(tl.where(row_ok, lo_row, 1 << 30), 0)
        lo_max = tl.max(tl.where(row_ok, lo_row, -(1 << 30)), 0)
        lo = tl.maximum(tl.minimum(lo_min, P), 0) // BLOCK_N * BLOCK_N + split * chunk
        hi = tl.where(split == splits - 1, total, tl.minimum(lo + chunk, total))
        end_full = lo + tl.maximum(tl.minimum(hi, P) - lo, 0) // BLOCK_N * BLOCK_N
        # Tiles below some row's window start take the mask; from the first tile every row sees whole to the
        # prefix's last whole tile, none does
        mid = tl.minimum(lo + tl.cdiv(tl.maximum(lo_max - lo, 0), BLOCK_N) * BLOCK_N, end_full)
        for start in range(lo, mid, BLOCK_N):
            acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, k_base, v_base, start, hi, P, bits, d, d_ok,
                                       stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                       BLOCK_N, True, EXACT, lo_row=lo_row, pos_row=pos_row, SLIDE=True)
        for start in range(mid, end_full, BLOCK_N):
            acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, k_base, v_base, start, hi, P, bits, d, d_ok,
                                       stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                       BLOCK_N, False, EXACT)
        for start in range(end_full, hi, BLOCK_N):
            acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, k_base, v_base, start, hi, P, bits, d, d_ok,
                                       stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                       BLOCK_N, True, EXACT, lo_row=lo_row, pos_row=pos_row, SLIDE=True)
    elif WINDOW:
        # One masked loop over the split's share of the host's window [0, kv_len): no load waits for the
        # prefix length (only the mask does), at the price of reading the window's tail past the row's end.
        for start in range(lo, tl.minimum(lo + chunk, kv_len), BLOCK_N):
            acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, k_base, v_base, start, hi, P, bits, d, d_ok,
                                       stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                       BLOCK_N, True, EXACT, load_hi=kv_len, WINDOW=True)
    else:
        # Tiles wholly inside the prefix: every key visible, no mask to compute.
        end_full = lo + tl.maximum(tl.minimum(hi, P) - lo, 0) // BLOCK_N * BLOCK_N
        for start in range(lo, end_full, BLOCK_N):
            acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, k_base, v_base, start, hi, P, bits, d, d_ok,
                                       stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                       BLOCK_N, False, EXACT)
        # The rest: the prefix's ragged end and the tree slots, under the ancestor mask.
        for start in range(end_full, hi, BLOCK_N):
            acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, k_base, v_base, start, hi, P, bits, d, d_ok,
                                       stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                       BLOCK_N, True, EXACT)

    if SINGLE:
        out = acc / tl.where(row_ok & (l_i > 0), l_i, 1.0)[:, None]  # a row no key reached: zeros, like SDPA
        tl.store(Out + b64 * stride_ob + head[:, None] * stride_oh + node[:, None] * stride_on
                 + d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        _store_partial(OPart, LsePart, acc, m_i, l_i, row_ok, node, head, d, d_ok, b64, H, N, splits, split, HEAD_D)
        if MERGE_HERE:
            _merge_if_last(OPart, LsePart, Counter, Out, stride_ob, stride_oh, stride_on, stride_od,
                           row_ok, node, head, d, d_ok, b64, H, N, splits, HEAD_D, BLOCK_M, BLOCK_D, BLOCK_S)


@triton.jit
def _tree_attn_merge(OPart, LsePart, Out, stride_ob, stride_oh, stride_on, stride_od, n_rows, H, N, splits,
                     HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                     SEQUENTIAL: tl.constexpr, PDL: tl.constexpr = False):
    """out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse): the exact softmax over all splits.

    BLOCK_R output rows (one (b, h, node) each) per program; the splits are summed in a loop so the
    registers hold one [BLOCK_R, D] partial at a time. SEQUENTIAL sums the denominator in that loop too, in
    split order, so trailing empty splits (w = 0) leave the result bit-identical (the ordered path)."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = row < n_rows
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    od_mask = r_ok[:, None] & (d < HEAD_D)[None, :]
    lse = tl.load(LsePart + row[:, None] * splits + s[None, :], mask=r_ok[:, None] & (s < splits)[None, :],
                  other=float("-inf"))
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)          # a row no key reached: zeros below, like SDPA
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    wsum = tl.zeros([BLOCK_R], tl.float32)
    for i in range(0, splits):
        w = tl.exp2(tl.load(LsePart + row * splits + i, mask=r_ok, other=float("-inf")) - m)
        o = tl.load(OPart + (row * splits + i)[:, None] * HEAD_D + d[None, :], mask=od_mask, other=0.0)
        acc += w[:, None] * o
        wsum += w
    if SEQUENTIAL:
        denom = wsum
    else:
        denom = tl.sum(tl.exp2(lse - m[:, None]), 1)
    denom = tl.where(r_ok & (denom > 0), denom, 1.0)  # padding rows, rows no key reached (acc 0): zeros
    b = row // (H * N)
    h = (row // N) % H
    n = row % N
    tl.store(Out + b[:, None] * stride_ob + h[:, None] * stride_oh + n[:, None] * stride_on + d[None, :] * stride_od,
             (acc / denom[:, None]).to(Out.dtype.element_ty), mask=od_mask)


@triton.jit
def _tree_attn_ordered_fwd(
    Q, K, V, Split, Win, OPart, LsePart, Pos,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_sb, stride_wb, stride_wn,
    H_KV, N, splits, qk_scale, stride_pb, sliding,
    G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, WINDOW: tl.constexpr, EXACT: tl.constexpr, SLIDE: tl.constexpr = False,
):
    """Split 0: each row's window, positions s(p)..p one key at a time in position order. Split c >= 1:
    prefix keys [(c - 1) CHUNK, c CHUNK) below each row's s(p), in BLOCK_N tiles at fixed offsets. Whatever
    else shares the program (other nodes, more splits, a longer kv_len) only adds exact zeros to a row.
    SLIDE (a sliding window): a row sees positions from lo_row = its position - sliding + 1 on; tiles below every
    row's lo_row are skipped (they would add exact zeros), the rest keep their fixed offsets."""
    b64, kvh, pid_m, split, H = _program_ids(H_KV, G)
    row_ok, node, head, d, d_ok, q = _program_rows(Q, stride_qb, stride_qh, stride_qn, stride_qd, b64, kvh, pid_m, N,
                                                   G, HEAD_D, BLOCK_D, BLOCK_M)
    s_row = tl.load(Split + b64 * stride_sb + node, mask=row_ok, other=0)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo_row = tl.zeros([BLOCK_M], tl.int32)
    if SLIDE:
        lo_row = tl.load(Pos + b64 * stride_pb + node, mask=row_ok, other=0).to(tl.int32) - sliding + 1
    if split == 0:
        qf = q.to(tl.float32)
        w_row = Win + b64 * stride_wb + node * stride_wn
        for w in range(0, WINDOW):
            slot = tl.load(w_row + w, mask=row_ok, other=-1)
            ok = slot >= 0
            if SLIDE:
                ok = ok & (s_row + w >= lo_row)           # window entry w holds position s(p) + w
            kv_mask = ok[:, None] & d_ok[None, :]
            slot64 = tl.where(ok, slot, 0).to(tl.int64)
            k = tl.load(k_base + slot64[:, None] * stride_ks + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + slot64[:, None] * stride_vs + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            sc = tl.where(ok, tl.sum(qf * k.to(tl.float32), 1) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, sc)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(sc - m_safe)
            l_i = l_i * alpha + p
            # P rounded to V's dtype, as the tiles' second matmul does
            acc = acc * alpha[:, None] + p.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32)
            m_i = m_new
    else:
        lo = (split - 1) * CHUNK
        hi = tl.minimum(lo + CHUNK, tl.max(s_row, 0))
        if SLIDE:
            first = tl.maximum(tl.min(tl.where(row_ok, lo_row, 1 << 30), 0), 0) // BLOCK_N * BLOCK_N
            lo = tl.maximum(lo, first)
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, k_base, v_base, start, hi, 0, s_row, d, d_ok,
                                       stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                       BLOCK_N, True, EXACT, True, lo_row=lo_row, SLIDE=SLIDE)
    _store_partial(OPart, LsePart, acc, m_i, l_i, row_ok, node, head, d, d_ok, b64, H, N, splits, split, HEAD_D)


ORDERED_BLOCK_M = 64     # one row block for every tree up to 64 nodes x G heads: the same tl.dot for all steps
ORDERED_STAGES = 2       # fixed too: one compiled kernel whatever the step


def tree_attention_ordered(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, split: torch.Tensor,
                           window: torch.Tensor, kv_len: int, chunk: int, scale: float | None = None,
                           sliding: int | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher of the row-invariant path (kernels/gpu_exact.py). q [B, H, N, D]; k_cache/v_cache
    [B, H_kv, S, D] with the new tokens' K/V written; split [B, N] int32 s(p); window [B, N, W] int32 slots
    (-1: none). sliding, positions: a sliding window W with the new tokens' positions [B or 1, N] int64 (as
    tree_attention's). Returns [B, H, N, D]."""
    B, H, N, D = q.shape
    H_kv = k_cache.shape[1]
    G = H // H_kv
    out_buf = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device)
    out = out_buf.transpose(1, 2)
    if B == 0 or N == 0:
        return out
    # Splits past a row's prefix are empty for it; their count follows kv_len (a host int), never the tree.
    splits = 1 + cdiv(kv_len, chunk)
    o_part = torch.empty(B, H, N, splits, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, H, N, splits, dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_d = next_pow2(D)
    slide = sliding is not None
    pos = positions.reshape(-1, N).contiguous() if slide else split           # unused without a window
    pos_sb = N if slide and pos.shape[0] > 1 else 0
    _tree_attn_ordered_fwd[(B * H_kv, cdiv(N * G, ORDERED_BLOCK_M), splits)](
        q, k_cache, v_cache, split, window, o_part, lse_part, pos,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        split.stride(0), window.stride(0), window.stride(1),
        H_kv, N, splits, scale * 1.4426950408889634, pos_sb, min(int(sliding), 1 << 30) if slide else 0,
        G=G, HEAD_D=D, BLOCK_D=block_d, BLOCK_M=ORDERED_BLOCK_M, BLOCK_N=BLOCK_N, CHUNK=chunk,
        WINDOW=window.shape[-1], EXACT=exact_dot(q.dtype), SLIDE=slide, num_warps=4, num_stages=ORDERED_STAGES,
    )
    n_rows = B * H * N
    _tree_attn_merge[(cdiv(n_rows, MERGE_ROWS),)](
        o_part, lse_part, out, *out.stride(), n_rows, H, N, splits,
        HEAD_D=D, BLOCK_D=block_d, BLOCK_R=MERGE_ROWS, BLOCK_S=next_pow2(splits), SEQUENTIAL=True, PDL=False,
        num_warps=4,
    )
    return out


def pick_splits(rows_programs: int, kv_len: int, rows_per_kv_head: int, device: torch.device) -> int:
    """Splits along the sequence: about two waves of programs over the SMs, but no split shorter than
    MIN_CHUNK keys, and the partial outputs (rows_per_kv_head fp32 rows per split) small next to K/V."""
    want = cdiv(2 * sm_count(device), max(rows_programs, 1))
    by_len = max(1, kv_len // MIN_CHUNK)
    by_traffic = max(1, kv_len // (PARTIAL_BUDGET * rows_per_kv_head))
    return max(1, min(want, by_len, by_traffic))


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_len: torch.Tensor,
                   bits: torch.Tensor, kv_len: int, scale: float | None = None, num_splits: int | None = None,
                   block_n: int = BLOCK_N, num_warps: int = 4, num_stages: int | None = None,
                   merge: str | None = None, window: bool = False, sliding: int | None = None,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher. q [B, H, N, D]; k_cache/v_cache [B, H_kv, S, D]; prefix_len [B]; bits int64 [Bm, N] with
    Bm in (1, B). Returns [B, H, N, D] (a view of a [B, N, H, D] buffer). num_splits: None = heuristic;
    it, block_n, num_warps and num_stages are open for benchmarks/kernels/tune.py. merge: "launch", "kernel"
    or "auto" (kernels/split_merge.py); None = its default_merge(). window (opt-in, untimed): one masked loop
    whose loads are bounded by kv_len, not by the prefix length (see _tree_attn_fwd): no load waits for that
    length, but the window's tail past the row's end is read too. Compiled for sm_90 (bf16, D = 128) it needs
    fewer registers and spills less: BLOCK_M 16, 174 registers vs 255 with 32 bytes spilled; 64 rows of one KV
    head, 212 vs 255 with 256 bytes spilled. The GPU tune weighs that against the extra bytes.
    sliding: a sliding window W (ops.tree_attention's `window`) with positions [B or 1, N] int64, the new tokens'
    positions: the splits then cover about W + N keys from the window's start, not kv_len (`window` is ignored)."""
    B, H, N, D = q.shape
    H_kv = k_cache.shape[1]
    G = H // H_kv
    out_buf = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device)
    out = out_buf.transpose(1, 2)
    if B == 0 or N == 0:
        return out
    rows = N * G
    block_m = min(64, max(16, next_pow2(rows)))
    m_blocks = cdiv(rows, block_m)
    slide = sliding is not None
    if slide:
        sliding = min(int(sliding), 1 << 30)      # an i32 argument; a window that long sees every position anyway
    # With a window the keys a program reads start within a block of its lowest window start (or at its tree
    # slots), so W + N + block_n bounds them when positions run from prefix_len on (the model's); the last split
    # still runs to the row's end whatever the positions.
    span = min(kv_len, sliding + N + block_n) if slide else kv_len
    window = window and not slide
    if num_splits is None:
        num_splits = pick_splits(B * H_kv * m_blocks, span, rows, q.device)
    chunk = cdiv(cdiv(span, max(num_splits, 1)), block_n) * block_n
    splits = max(1, cdiv(span, chunk))
    single = splits == 1
    merge = resolve(merge, block_m, splits=splits)
    counters = None if single or merge == "launch" else arrival_counters(q.device, B * H_kv * m_blocks)
    merge_here = counters is not None
    if single:
        o_part = lse_part = out_buf           # unused
    else:
        o_part = torch.empty(B, H, N, splits, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, H, N, splits, dtype=torch.float32, device=q.device)
    if counters is None:
        counters = prefix_len                 # unused
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bits = bits.reshape(-1, N)
    prefix_len = prefix_len.contiguous()
    pos = positions.reshape(-1, N).contiguous() if slide else prefix_len       # unused without a window
    pos_sb = N if slide and pos.shape[0] > 1 else 0
    block_d = next_pow2(D)
    on = pdl(q.device)

    def launch(num_stages):
        _tree_attn_fwd[(B * H_kv, m_blocks, splits)](
            q, k_cache, v_cache, bits, prefix_len, out, o_part, lse_part, counters, pos,
            *q.stride(), *k_cache.stride(), *v_cache.stride(),
            bits.stride(0) if bits.shape[0] > 1 else 0, bits.stride(1),
            *out.stride(),
            H_kv, N, kv_len, chunk, splits, scale * 1.4426950408889634, pos_sb, sliding if slide else 0,
            G=G, HEAD_D=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single,
            EXACT=exact_dot(q.dtype), MERGE_HERE=merge_here, BLOCK_S=next_pow2(splits) if merge_here else 1,
            PDL=on, WINDOW=window, SLIDE=slide, num_warps=num_warps, num_stages=num_stages, **pdl_launch(on),
        )

    if num_stages is not None:
        launch(num_stages)
    else:
        # A third pipeline stage pays once a split streams 4+ tiles (H200: prefix 4096, 8 tiles: 26.8 vs
        # 29.1 us) and costs a little on 2-tile splits (prefix 1024: 13.3 vs 12.8 us); two stages where
        # three do not fit (fp32 K/V tiles on a GPU with less shared memory).
        stages = [3, 2] if chunk // block_n >= 4 else [2]
        launch_first_fitting(launch, [dict(num_stages=st) for st in stages],
                             (q.device, q.dtype, G, D, block_m, block_n, single, merge_here, num_warps, stages[0],
                              on, slide, "tree_attention"))
    if not single and not merge_here:
        n_rows = B * H * N
        block_r = min(MERGE_ROWS, next_pow2(n_rows))
        _tree_attn_merge[(cdiv(n_rows, block_r),)](
            o_part, lse_part, out, *out.stride(), n_rows, H, N, splits,
            HEAD_D=D, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_S=next_pow2(splits), SEQUENTIAL=False, PDL=on,
            num_warps=4, **pdl_launch(on),
        )
    return out
