"""Greedy and typical acceptance: per-node row statistics, then one program per batch row for the paths.

The reference is ~25 small launches (argmax, gathers, cumprod, max/argmax, the _finish gathers...). Here:
  1. `_row_stats`: one program per (row, node) streams the node's logits once: the argmax (greedy), and
     for typical acceptance the softmax's max and sum and the entropy threshold min(threshold,
     alpha * exp(-H)). Probabilities are then exp(x / T - max) / sum, as torch.softmax forms them: a
     log-sum-exp near x / T ~ 80 would round log-probs of -1e-6 to 0 and tie paths the reference tells apart.
     This is the only part that reads V-sized data, so it gets B * N programs.
  2. `_accept_row`: one program per batch row evaluates every retrieve path at once (a [P, D] tile):
     compare, longest accepted prefix, best path (first on ties; typical: then the highest log-likelihood),
     its nodes, the bonus token (greedy: argmax at the last node; typical: the exponential race over the
     last node's distribution, with noise drawn by torch from the caller's generator exactly as the
     reference draws it) and the emitted tokens. All outputs of AcceptResult come from this program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_pow2

BLOCK_V = 1024


@triton.jit
def _row_stats(Logits, Pred, Stats, Thresh, N, V, stride_b, stride_n, temperature, alpha, threshold,
               TYPICAL: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)                # b * N + n: outputs are [B, N] contiguous
    base = Logits + (row // N) * stride_b + (row % N) * stride_n
    offs = tl.arange(0, BLOCK_V)
    best_v = tl.full([], float("-inf"), tl.float32)
    best_i = tl.zeros([], tl.int32)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        ok = start + offs < V
        x = tl.load(base + start + offs, mask=ok, other=float("-inf")).to(tl.float32)
        xa = tl.where(x == x, x, float("inf"))         # torch.argmax takes NaN for the max: so do the other backends
        cmax = tl.max(xa, 0)
        cidx = tl.argmax(xa, 0, tie_break_left=True)   # first index of the max, as torch.argmax
        best_i = tl.where(cmax > best_v, start + cidx, best_i)      # strict: earlier chunks win ties
        best_v = tl.maximum(best_v, cmax)
        if TYPICAL:
            y = x / temperature
            m_new = tl.maximum(m, tl.max(y, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new), 0)
            m = m_new
    tl.store(Pred + row, best_i.to(tl.int64))
    if TYPICAL:
        ent = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK_V):              # second pass: H = -sum p log(p + 1e-5) (Medusa's eps)
            ok = start + offs < V
            x = tl.load(base + start + offs, mask=ok, other=float("-inf")).to(tl.float32)
            p = tl.exp(x / temperature - m) / s
            ent -= tl.sum(tl.where(ok, p * tl.log(p + 1e-5), 0.0), 0)
        tl.store(Stats + 2 * row, m)
        tl.store(Stats + 2 * row + 1, s)
        tl.store(Thresh + row, tl.minimum(alpha * tl.exp(-ent), threshold))


@triton.jit
def _accept_row(Tokens, Pred, Logits, Stats, Thresh, Retrieve, Noise,
                AcceptLen, BestPath, Nodes, NextTok, Emitted,
                N, V, P, D1, stride_tb, stride_rb, stride_rp, stride_lb, stride_ln, stride_eb, temperature,
                TYPICAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    j = tl.arange(0, BLOCK_D)                          # path step j: node at column j -> node at column j + 1
    p_ok = p < P
    step_ok = p_ok[:, None] & (j < D1 - 1)[None, :]
    rbase = Retrieve + b * stride_rb + p[:, None] * stride_rp
    par = tl.maximum(tl.load(rbase + j[None, :], mask=step_ok, other=0), 0)
    child = tl.load(rbase + j[None, :] + 1, mask=step_ok, other=-1)
    valid = step_ok & (child >= 0)
    tok_child = tl.load(Tokens + b * stride_tb + tl.maximum(child, 0), mask=step_ok, other=-1)
    if TYPICAL:
        lg = tl.load(Logits + b * stride_lb + par * stride_ln + tok_child, mask=valid, other=0.0).to(tl.float32)
        m_par = tl.load(Stats + 2 * (b * N + par), mask=valid, other=0.0)
        s_par = tl.load(Stats + 2 * (b * N + par) + 1, mask=valid, other=1.0)
        p_child = tl.exp(lg / temperature - m_par) / s_par                          # p_parent(child)
        ok = valid & (p_child > tl.load(Thresh + b * N + par, mask=valid, other=1.0))
        logp = tl.log(tl.where(ok, p_child, 1.0))      # only accepted steps are summed below
    else:
        ok = valid & (tok_child == tl.load(Pred + b * N + par, mask=valid, other=-1))
    # accepted steps of a path = index of its first failure (all D steps accepted: D)
    lens = tl.min(tl.where(ok, BLOCK_D, j[None, :]), 1)
    lens = tl.where(p_ok, tl.minimum(lens, D1 - 1), -1)
    acc_len = tl.max(lens, 0)
    if TYPICAL:   # longest first, then the highest sum of the accepted tokens' log-probs, then the first row
        ll = tl.sum(tl.where(j[None, :] < acc_len, tl.where(valid, logp, 0.0), 0.0), 1)
        ll = tl.where(lens == acc_len, ll, float("-inf"))
        best = tl.min(tl.where(ll == tl.max(ll, 0), p, BLOCK_P), 0)
    else:
        best = tl.min(tl.where(lens == acc_len, p, BLOCK_P), 0)

    col = tl.arange(0, BLOCK_D)
    col_ok = col < D1
    bbase = Retrieve + b * stride_rb + best * stride_rp
    nodes = tl.load(bbase + col, mask=col_ok, other=-1)
    nodes = tl.where(col <= acc_len, nodes, -1)
    last = tl.sum(tl.where(col == acc_len, nodes, 0), 0).to(tl.int64)
    if TYPICAL:
        # exponential race: argmax p_i / E_i, E ~ Exp(1) clamped at 1e-30, as acceptance._sample
        m_last = tl.load(Stats + 2 * (b * N + last))
        s_last = tl.load(Stats + 2 * (b * N + last) + 1)
        lbase = Logits + b * stride_lb + last * stride_ln
        offs = tl.arange(0, BLOCK_V)
        best_r = tl.full([], -1.0, tl.float32)
        nxt = tl.zeros([], tl.int32)
        for start in range(0, V, BLOCK_V):
            vok = start + offs < V
            x = tl.load(lbase + start + offs, mask=vok, other=float("-inf")).to(tl.float32)
            e = tl.maximum(tl.load(Noise + b * stride_eb + start + offs, mask=vok, other=1.0), 1e-30)
            r = tl.where(vok, tl.exp(x / temperature - m_last) / s_last / e, -1.0)
            cmax = tl.max(r, 0)
            nxt = tl.where(cmax > best_r, start + tl.argmax(r, 0, tie_break_left=True), nxt)
            best_r = tl.maximum(best_r, cmax)
        nxt = nxt.to(tl.int64)
    else:
        nxt = tl.load(Pred + b * N + last)
    # emitted[j]: the token of accepted node j + 1, then the bonus at j = accept_len, then -1
    after_node = tl.load(bbase + col + 1, mask=col < acc_len, other=0)
    after = tl.load(Tokens + b * stride_tb + tl.maximum(after_node, 0), mask=col < acc_len, other=-1)
    emitted = tl.where(col < acc_len, after, tl.where(col == acc_len, nxt, -1))
    tl.store(AcceptLen + b, acc_len.to(tl.int64))
    tl.store(BestPath + b, best.to(tl.int64))
    tl.store(NextTok + b, nxt)
    tl.store(Nodes + b * D1 + col, nodes, mask=col_ok)
    tl.store(Emitted + b * D1 + col, emitted, mask=col_ok)


def accept(tokens, logits, retrieve, typical: bool, temperature: float = 1.0, posterior_threshold: float = 0.09,
           posterior_alpha: float = 0.3, generator=None):
    """Launcher for greedy (typical=False) and typical acceptance. Returns the AcceptResult fields."""
    B, N, V = logits.shape
    dev = tokens.device
    tokens = tokens.contiguous()
    retrieve = retrieve.contiguous()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    P, D1 = retrieve.shape[-2:]
    stride_rb = retrieve.stride(0) if retrieve.dim() == 3 and retrieve.shape[0] > 1 else 0
    pred = torch.empty(B, N, dtype=torch.long, device=dev)
    stats = thresh = pred
    if typical:
        stats = torch.empty(B, N, 2, dtype=torch.float32, device=dev)         # softmax max and sum per node
        thresh = torch.empty(B, N, dtype=torch.float32, device=dev)
    _row_stats[(B * N,)](logits, pred, stats, thresh, N, V, logits.stride(0), logits.stride(1), float(temperature),
                         float(posterior_alpha), float(posterior_threshold),
                         TYPICAL=typical, BLOCK_V=BLOCK_V, num_warps=4)
    # The bonus noise: the same draw, same shape and dtype as sampling.exponential_race's, from the same generator.
    noise = torch.empty(B, V, dtype=torch.float32, device=dev).exponential_(generator=generator) if typical \
        else pred
    accept_len = torch.empty(B, dtype=torch.long, device=dev)
    best = torch.empty(B, dtype=torch.long, device=dev)
    nxt = torch.empty(B, dtype=torch.long, device=dev)
    nodes = torch.empty(B, D1, dtype=torch.long, device=dev)
    emitted = torch.empty(B, D1, dtype=torch.long, device=dev)
    _accept_row[(B,)](tokens, pred, logits, stats, thresh, retrieve, noise, accept_len, best, nodes, nxt, emitted,
                      N, V, P, D1, tokens.stride(0), stride_rb, retrieve.stride(-2), logits.stride(0),
                      logits.stride(1), noise.stride(0), float(temperature),
                      TYPICAL=typical, BLOCK_P=next_pow2(P), BLOCK_D=next_pow2(D1), BLOCK_V=BLOCK_V, num_warps=4)
    return accept_len, best, nodes, nxt, emitted
