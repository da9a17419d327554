"""Attention whose result for a token does not depend on how the step laid out its keys: bf16 greedy on the
CPU stays token-for-token identical between plain decoding and tree verification.

A token at position p attends to the keys of positions 0..p. Plain decoding finds them in cache slots 0..p;
a tree node finds its ancestors in slots scattered among its siblings'. PyTorch's CPU flash attention sums
over keys in blocks of up to 512 whose sizes follow the key count, so the same keys in another layout round
differently, and in bf16 a near-tie between two tokens then flips (benchmarks/results/cpu_bf16/divergence.md).

Here every query's keys are split at a point that depends on its position only, s(p) = the multiple of
ALIGN at most p - MAX_DEPTH (at least 0), and one flash attention call reads, for all queries at once and in
place in the cache (the windows go to scratch slots past the prefix, `scratch_slots`),
- cache slots [0, kv) with kv rounded up to flash's 512-key block: keys [0, s(p)) sit in slots 0..s(p) - 1
  in every layout (s(p) never passes the step's prefix), so they fall into the same blocks at the same
  offsets whatever the key count; the rest of the prefix is masked for that query;
- then N windows of WINDOW keys, one per query, holding positions s(p)..p gathered in position order (the
  others' windows masked). A window starts a fresh block or sits at a multiple of WINDOW inside one, so
  its keys keep their SIMD lanes, and masked keys only add exact zeros to each lane's running sum.
The flash call itself is row-count invariant only for blocks of >= 4 query rows: without AMX, PyTorch's
CPU flash attention multiplies through oneDNN's AVX-512 bf16 gemm, which takes other kernels for 1 and for
2-3 rows, and each rounds the fp32 sums differently (on an AMD EPYC a plain step, 3 rows for SmolLM2, left
the speculative answer in 70 of 80 MT-Bench questions). So the query rows are padded (`flash_rows`) until
every block of flash's query split holds >= MIN_ROWS rows; the padded rows see every key and are dropped.
Linear layers are made row-count invariant in `cpu_packed` (ROW_CHUNK); everything else in a forward is
per-row elementwise or reduces within one row. Decode steps only (`AttentionSpec.decode`): prefills are
shared by every decoder. Cost (benchmarks/results/cpu_bf16/ordered_attention.md): about one plain step's
time for plain steps, ~1.2x a 16-32-node SDPA verification. `python_tests/test_cpu_exact.py` checks plain ==
tree rows bit for bit on random trees and bf16 plain == speculative greedy decoding on the real model.

This is the torch backend's way. The cpu backend's tree attention (csrc/cpu/tree_attention.h) takes each token's
keys in position order by itself, so the model skips this layout there (cpu_ops.orders_keys).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .cpu_packed import CHUNKED_UP_TO

ALIGN = 8           # split points are multiples of this
MAX_DEPTH = 7       # deepest new token (tree depth) that keeps s(p) inside the prefix: heads draft <= 7
WINDOW = 16         # >= ALIGN + MAX_DEPTH: keys [s(p), p] always fit; a multiple of the 16 fp32 SIMD lanes
KV_BLOCK = 512      # PyTorch's CPU flash attention key block (FlashAttentionKernel.cpp, kv_split_size)
MIN_ROWS = 4        # fewest query rows per flash block that take the same gemm kernel as any larger block


def _q_split(rows: int) -> int:
    """PyTorch's CPU flash attention query block for `rows` query rows (FlashAttentionKernel.cpp)."""
    return 256 if rows >= 768 else 64 if rows >= 192 else 32


def flash_rows(rows: int) -> int:
    """The least row count >= rows whose every query block (the last one included) has >= MIN_ROWS rows."""
    rows = max(rows, MIN_ROWS)
    while 0 < rows % _q_split(rows) < MIN_ROWS:
        rows += MIN_ROWS - rows % _q_split(rows)
    return rows


def applies(kv: torch.Tensor, rounded_linears: bool = False) -> bool:
    """For a bf16 or fp16 KV cache on the CPU (fp16's near-ties flip as bf16's do: SmolLM2's 5th greedy token of
    a short poem did), and an fp32 one with AMPHISTA_EXACT_GREEDY=1 or under linears that round their inputs to
    bf16 (cpu_quant's 4-bit weights: there a last-bit difference in fp32 attention is enough to flip a greedy token,
    as seen in a 128-token answer of SmolLM2). fp32 rounds 65536x finer
    than bf16 and the committed fp32 evaluations never saw a mismatch, so there it is opt-in: with the linears
    packed for oneDNN (row-count invariant, cpu_packed) it makes plain and tree rows equal bit for bit, at ~8%
    of a plain or tree-16 step (fp32 A/B in benchmarks/results/cpu_ordered_attention_fp32.md)."""
    if kv.device.type != "cpu":
        return False
    from .gpu_exact import enabled as exact_greedy_requested      # gpu_exact imports this module
    half = kv.dtype in (torch.bfloat16, torch.float16)
    return half or (kv.dtype == torch.float32 and (rounded_linears or exact_greedy_requested()))


@dataclass
class OrderedLayout:
    """Built once per forward, shared by every layer. Keys: cache slots [0, kv), then N windows of WINDOW."""
    kv: int                    # a multiple of KV_BLOCK, >= the forward's kv_len
    tail_slots: torch.Tensor   # [B, N * WINDOW] long: the cache slot of position s(p) + w, per token's window
    window_start: torch.Tensor  # [B] long, all kv: where the windows go in a cache with scratch slots
    bias: torch.Tensor         # [B, 1, R, kv + N * WINDOW] 0 / -inf, query rows ordered (g, n) like q, then
                               # R - G * N padding rows (flash_rows)


def position_windows(prefix_len: torch.Tensor, new_mask: torch.Tensor):
    """Each new token's keys in position order, split where only its position decides (shared with the GPU's
    kernels/gpu_exact.py). prefix_len [B]; new_mask [B or 1, N, N] ancestor-or-self.

    Returns (pos, split, slots): pos [B, N] the token's position; split [B, N] = s(p), keys before it sit in
    cache slots 0..s(p) - 1 in any layout; slots [B, N, WINDOW] long, the cache slot of position s(p) + w
    (windows run past p into whatever slot: callers mask w > p - s(p))."""
    B, N = prefix_len.shape[0], new_mask.shape[-1]
    dev = prefix_len.device
    m = new_mask.expand(B, N, N)
    depth = m.sum(-1) - 1                                                   # [B, N]
    pos = prefix_len[:, None] + depth
    split = (pos - MAX_DEPTH).clamp(min=0) // ALIGN * ALIGN                 # [B, N]
    # anc[b, i, r]: node i's ancestor at depth r (entries past its depth point at node 0)
    at = torch.where(m, depth[:, None, :].expand(B, N, N), N)
    anc = torch.zeros(B, N, N + 1, dtype=torch.long, device=dev)
    anc.scatter_(2, at, torch.arange(N, device=dev).expand(B, N, N))
    w = split[..., None] + torch.arange(WINDOW, device=dev)                  # [B, N, W] positions
    rel = w - prefix_len[:, None, None]                                     # >= 0: depth among the new tokens
    new_slot = prefix_len[:, None, None] + anc.gather(2, rel.clamp(0, N - 1))
    return pos, split, torch.where(rel < 0, w, new_slot)


def layout(prefix_len: torch.Tensor, new_mask: torch.Tensor, kv_len: int, capacity: int, dtype: torch.dtype,
           groups: int, window: int | None = None) -> OrderedLayout:
    """prefix_len [B]; new_mask [B or 1, N, N] bool, ancestor-or-self (causal for prefill and plain steps);
    kv_len the forward's key window; capacity the cache's slot count; groups = query heads per KV head.
    Requires every new token's depth (ancestors among the new tokens) <= MAX_DEPTH, or the new tokens to
    form one causal chain (a prefill), so that keys before s(p) sit in slots 0..s(p) - 1.
    window: a Gemma 3 sliding layer's; keys of positions <= p - window are masked too (slots < kv hold their own
    position, the windows position s(p) + w)."""
    B, N = prefix_len.shape[0], new_mask.shape[-1]
    dev = prefix_len.device
    pos, split, slots = position_windows(prefix_len, new_mask)
    tail_slots = slots.clamp_(0, capacity - 1).reshape(B, N * WINDOW)
    kv = -(-kv_len // KV_BLOCK) * KV_BLOCK
    key = torch.arange(kv + N * WINDOW, device=dev)
    own = key - kv - torch.arange(N, device=dev)[:, None] * WINDOW          # [N, K]: offset in own window
    seen = (key < split[..., None]) | ((own >= 0) & (own < WINDOW) & (split[..., None] + own <= pos[..., None]))
    if window is not None:
        key_pos = torch.where(key < kv, key, split[..., None] + own)
        seen &= key_pos > pos[..., None] - window
    bias = torch.zeros(seen.shape, dtype=dtype, device=dev).masked_fill_(~seen, float("-inf"))
    bias = bias[:, None, None].expand(B, 1, groups, N, -1).reshape(B, 1, groups * N, -1)
    pad = flash_rows(groups * N) - groups * N
    if pad:
        bias = torch.cat([bias, bias.new_zeros(B, 1, pad, bias.shape[-1])], dim=2)
    return OrderedLayout(kv, tail_slots, torch.full((B,), kv, device=dev), bias)


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def scratch_slots(max_seq_len: int) -> int:
    """Slots a CPU cache keeps past max_seq_len for a step's windows: they go right after slot `kv` (the prefix
    rounded up to KV_BLOCK) for the biggest tree this path takes, so flash reads the cache in place. Copying
    the prefix out instead cost ~4 ms of a ~28 ms 4-bit SmolLM2 step (two 0.4 MB copies per layer)."""
    return -(-max_seq_len // KV_BLOCK) * KV_BLOCK - max_seq_len + CHUNKED_UP_TO * WINDOW


def _keys(k_cache: torch.Tensor, v_cache: torch.Tensor, lay: OrderedLayout):
    """K and V as flash reads them, [B, H_kv, kv + N * WINDOW, D] each: cache slots [0, kv), then the windows.
    Slots [kv_len, kv) hold stale (finite) keys, masked, so they add exact zeros."""
    end = lay.kv + lay.tail_slots.shape[1]
    if end > k_cache.shape[2]:   # no scratch slots for these windows (a cache not from KVCache.for_model)
        return copied_keys(k_cache, lay), copied_keys(v_cache, lay)
    # The windows are the accepted-path move of compaction: slot tail_slots[b, m] -> kv + m, K and V of this
    # layer in one call (one C++ call on the cpu backend, where the torch ops took ~30 us a layer).
    ops.kv_compact(k_cache[None], v_cache[None], lay.tail_slots, lay.window_start)
    return k_cache[:, :, :end], v_cache[:, :, :end]


def copied_keys(cache: torch.Tensor, lay: OrderedLayout) -> torch.Tensor:
    """_keys's result in a new tensor, the cache untouched: the same keys in the same order, so flash gives
    the same bits (benchmarks/cpu_inplace_keys_ab.py times both)."""
    B, Hkv, S, D = cache.shape
    live = min(lay.kv, S)
    out = cache.new_empty(B, Hkv, lay.kv + lay.tail_slots.shape[1], D)
    out[:, :, :live] = cache[:, :, :live]
    if live < lay.kv:
        out[:, :, live:lay.kv] = 0          # masked keys must still be finite (0 * inf is NaN)
    for b in range(B):
        out[b, :, lay.kv:] = cache[b].index_select(1, lay.tail_slots[b])
    return out


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lay: OrderedLayout,
              scale: float | None = None) -> torch.Tensor:
    """q [B, H, N, D]; k_cache/v_cache [B, H_kv, S, D] with the new tokens' K/V already written.
    Returns [B, H, N, D] in q's dtype: ops.tree_attention's result up to bf16 rounding."""
    B, H, N, D = q.shape
    Hkv = k_cache.shape[1]
    # The query heads sharing a KV head become G * N query rows of one flash call (rows never interact),
    # padded to the layout's row count.
    rows = H // Hkv * N
    q = q.reshape(B, Hkv, rows, D)
    pad = lay.bias.shape[2] - rows
    if pad:
        q = torch.cat([q, q.new_zeros(B, Hkv, pad, D)], dim=2)
    out, _ = _flash(q, *_keys(k_cache, v_cache, lay), attn_mask=lay.bias, scale=scale)
    return out[:, :, :rows].reshape(B, H, N, D)
