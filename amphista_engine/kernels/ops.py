"""The hot ops of a speculative decoding step, each with one signature on every backend.

Call these, not a backend module: each call picks the backend for its tensors' device (`backend.chain`)
and falls through to the next backend when one lacks the op or declines the input. Inputs that require
grad (with grad mode on) always take the reference, which autograd can differentiate. Results are the same
tensors as the torch reference's, up to floating-point rounding (see python_tests/test_kernels_triton.py
for the tolerances). Shapes use B batch rows, N tree nodes / new tokens, H query heads, H_kv KV heads,
D head dim, S cache capacity, L layers, d model width, V vocabulary, K drafting heads.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError
from . import arg_checks as checks, backend, reference


def _run(op: str, device, *args, **kwargs):
    # Kernels have no backward: under autograd (training, or any input that requires grad) the reference
    # runs, so one model class serves training and inference. Inference mode skips this check cheaply.
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return getattr(reference, op)(*args, **kwargs)
    for mod in backend.chain(device):
        fn = getattr(mod, op, None)
        if fn is None:
            continue
        out = fn(*args, **kwargs)
        if out is not NotImplemented:
            return out
    raise AssertionError(f"no backend ran {op}")   # unreachable: the reference implements every op


# ---- attention -----------------------------------------------------------------------------------------
def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_len: torch.Tensor,
                   new_mask: torch.Tensor, kv_len: int, scale: Optional[float] = None,
                   dense_mask: Optional[torch.Tensor] = None, order=None, window: Optional[int] = None,
                   positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of N new tokens over a static KV cache whose slots [prefix_len, prefix_len + N) already
    hold the new tokens' own K/V (write them with kv_write first).

    q:          [B, H, N, D] (any strides), query heads; H a multiple of H_kv (GQA).
    k_cache/v_cache: [B, H_kv, S, D] one layer of the cache (KVCache.k[layer, :B]), S >= kv_len.
    prefix_len: [B] long, device: new token i of row b sees every slot < prefix_len[b] ...
    new_mask:   ... and new token j (slot prefix_len[b] + j) iff new_mask says so: either bool
                [B or 1, N, N] (AttentionSpec.new_mask) or int64 ancestor bits [B or 1, N] / [N] (bit j of
                row i, read as uint64; TreeBuffers.ancestor_bits, or mask_bits(new_mask)). N <= 64 for bits.
    kv_len:     host int >= max(prefix_len) + N: the reference reads slots [0, kv_len); kernels use it to
                size their split-K grid and as a cap on each row's end prefix_len[b] + N.
    scale:      softmax scale, default 1 / sqrt(D).
    dense_mask: optional AttentionSpec.dense_mask() [B, N, kv_len] already built for this forward, bool or
                additive in q's dtype (tree_mask_args); only the reference reads it (saves rebuilding it per
                layer). Kernels use prefix_len + bits.
    order:      optional gpu_exact.OrderedTree for this forward: the triton backend then takes its
                row-invariant path (a token's result the same in a plain step and in any tree); the reference
                computes the same attention unordered, the CUDA backend declines.
    window:     optional sliding window W >= 1 (a sliding layer past its window): on top of the mask above,
                new token i sees only keys of position > positions[b, i] - W, where cache slot s < prefix_len[b]
                holds position s (compaction keeps slot == position) and new slot prefix_len[b] + j holds
                new token j at positions[b, j]. Explicit positions, not depths read off the ancestor bits: they
                are what the forward's RoPE rows used, whatever the tree's node order. The kernels start their
                key loop at the block holding the lowest position any of their queries sees (a plain step reads
                about W keys, not the whole prefix); with `order` the row-invariant path windows alike (skipped
                tiles add exact zeros). None: no window, the same launch as before.
    positions:  [B or 1, N] / [N] int64 on q's device, the new tokens' positions (the forward's `positions`);
                required with `window`, ignored without.
    Returns [B, H, N, D] in q's dtype (kernels return a transposed view of a [B, N, H, D] buffer, so
    `out.transpose(1, 2).reshape(B, N, H * D)` is free).
    """
    checks.check_tree_attention(q, k_cache, v_cache, prefix_len, kv_len, new_mask, dense_mask)
    if window is None:
        return _run("tree_attention", q.device, q, k_cache, v_cache, prefix_len, new_mask, kv_len, scale,
                    dense_mask, order=order)
    positions = checks.check_tree_window(q, window, positions)
    return _run("tree_attention", q.device, q, k_cache, v_cache, prefix_len, new_mask, kv_len, scale,
                dense_mask, order=order, window=window, positions=positions)


def tree_mask_args(prefix_len: torch.Tensor, new_mask: torch.Tensor, kv_len: int,
                   dtype: Optional[torch.dtype] = None):
    """(new_mask, dense_mask) to pass to every layer's tree_attention in one forward, built once.

    The torch backend wants the dense [B, N, kv_len] mask; kernels want ancestor bits (N <= 64). With `dtype`
    (the queries' dtype) the dense mask comes additive (0 / -inf) in it: SDPA would otherwise convert a bool mask
    to that in every layer (the same values; ~35 us a layer on a 2-core CPU)."""
    dev = prefix_len.device
    n = new_mask.shape[-1]
    if backend.resolve("tree_attention", dev) != "torch" and new_mask.dtype == torch.bool and n <= 64:
        return reference.mask_bits(new_mask), None
    from ..model import AttentionSpec
    dense = AttentionSpec(prefix_len, reference._new_mask_bool(new_mask, n), kv_len).dense_mask()
    if dtype is not None:
        dense = torch.zeros(dense.shape, dtype=dtype, device=dev).masked_fill_(~dense, float("-inf"))
    return new_mask, dense


def head_attention(z: torch.Tensor, pos_emb: Optional[torch.Tensor], norm_w: torch.Tensor, eps: float,
                   wqkv: torch.Tensor, n_heads: int, scale: Optional[float] = None):
    """The Auto-embedding Block's attention half for one layer: position-embedding add, RMSNorm, the QKV
    projection and bi-directional (unmasked) multi-head attention across the K head slots.

    z: [N, K, d]; pos_emb: [K, d] or None (layers after the first); norm_w: [d] (attention_norm.weight);
    wqkv: [3d, d] (nn.Linear weight, q | k | v rows, each n_heads x d / n_heads).
    Returns (x, attn), both [N, K, d]: x = z + pos_emb is the residual stream, attn the attention output
    before the output projection (heads concatenated, ready for wo). A ConfigError names a wrong shape, a
    non-float z or an n_heads that does not divide d.
    """
    checks.check_head_attention(z, pos_emb, norm_w, wqkv, n_heads)
    return _run("head_attention", z.device, z, pos_emb, norm_w, eps, wqkv, n_heads, scale)


# ---- staged adaptation input ---------------------------------------------------------------------------
def fused_sal_input(hidden: torch.Tensor, tokens: torch.Tensor, emb_weight: torch.Tensor,
                    w_fuse: torch.Tensor) -> torch.Tensor:
    """Amphista's fusion u = W_fuse [h ; E(x)] without materialising E(x) or the concatenation.

    hidden [..., d] (any float dtype), tokens [...] long, emb_weight [V, d] the target's embedding table,
    w_fuse [d, 2d] (nn.Linear weight). Returns u [..., d] in w_fuse's dtype. The SAL then runs its own
    RMSNorm (rmsnorm) and attention (tree_attention with a causal new_mask) over its cache. Shapes and dtypes
    are checked (ConfigError); token ids < V stay the caller's promise (reading them would sync the device)."""
    checks.check_fused_sal_input(hidden, tokens, emb_weight, w_fuse)
    return _run("fused_sal_input", hidden.device, hidden, tokens, emb_weight, w_fuse)


# ---- norms and RoPE ------------------------------------------------------------------------------------
def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., d] * rsqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, times w [d] (RMSNorm.forward).
    A ConfigError where x is not float or w is not [d]."""
    xs = x.shape
    if not (len(xs) and w.shape == xs[-1:] and x.dtype.is_floating_point):
        checks.check_row_op("rmsnorm", x, w)
    return _run("rmsnorm", x.device, x, w, eps)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float):
    """(s, rmsnorm(s, w, eps)) with s = x + residual; residual [..., d] broadcasts over x's leading dims (it may
    not widen x: s has x's shape). A ConfigError where the shapes do not fit."""
    xs = x.shape
    if not (residual.shape == xs and len(xs) and w.shape == xs[-1:] and x.dtype.is_floating_point):
        checks.check_row_op("add_rmsnorm", x, w)
        checks.need_tensors("add_rmsnorm", residual=residual)
        rs = residual.shape
        if not (len(rs) <= len(xs) and rs[-1:] == xs[-1:] and checks.broadcasts_to(rs, xs)):
            raise ConfigError(f"add_rmsnorm: residual must be [..., d] broadcasting to x's {tuple(xs)}; "
                              f"got {tuple(rs)}")
    return _run("add_rmsnorm", x.device, x, residual, w, eps)


def rope(x: torch.Tensor, rope_rows: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE at explicit positions: x [B, T, H, D] (any strides, e.g. a view of the fused QKV
    output), rope_rows [B or 1, T, D] fp32 rows of model.rope_table (cos | sin) gathered at each token's
    position ([T, D] rows shared by every batch row work too). Returns a new [B, T, H, D] tensor in x's dtype.
    A ConfigError where the shapes do not fit (D even) or a tensor is not float."""
    xs, rs = x.shape, rope_rows.shape
    if not (len(xs) == 4 and len(rs) == 3 and rs[1] == xs[1] and rs[2] == xs[3] and rs[0] in (1, xs[0])
            and not xs[3] % 2 and x.dtype.is_floating_point and rope_rows.dtype.is_floating_point):
        checks.check_rope(x, rope_rows)
    return _run("rope", x.device, x, rope_rows)


# ---- linear layers -------------------------------------------------------------------------------------
def linear(x: torch.Tensor, w: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """x [..., K] @ w.T for w [N, K] (an nn.Linear weight, no bias) -> [..., N] in w's dtype. The kernel
    backends take decoding's few-row products (weight-streaming GEMVs), cuBLAS through torch the rest. The
    model's layers call it only when routed (kernels/routed_linear.py). batch_invariant: the kernels take any
    row count, in fixed row blocks, so a row's result is the same bits whatever else is in the call
    (kernels/gpu_exact.py). A ConfigError where K differs or (outside autocast) the dtypes do."""
    xs, ws = x.shape, w.shape
    if not (len(xs) and len(ws) == 2 and xs[-1] == ws[1] and x.dtype == w.dtype):
        checks.check_linear("linear", x, w, x.dtype if isinstance(x, torch.Tensor) else None, 1)
    return _run("linear", x.device, x, w, batch_invariant)


def quant_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """layer(x) for a layer with quantized weights (kernels/cpu_quant.py: Int4Linear, Int8Linear), bias included:
    x [..., K] -> [..., N] in x's dtype. The cpu backend multiplies with int8 activations (csrc/cpu/
    quant_matmul.h), the reference with bf16 ones (torch's int4 / int8 kernels); each gives a row the same bits
    whatever the row count. A ConfigError where x is not a float [..., in_features] tensor."""
    k = getattr(layer, "in_features", None)
    xs = x.shape
    if not (len(xs) and xs[-1] == k and x.dtype.is_floating_point and hasattr(type(layer), "torch_forward")):
        checks.check_quant_linear(x, layer, k)
    return _run("quant_linear", x.device, x, layer)


def fused_linear(x: torch.Tensor, w: torch.Tensor, norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
                 silu: bool = False, residual: Optional[torch.Tensor] = None,
                 batch_invariant: bool = False) -> torch.Tensor:
    """One layer of a decode step with its neighbours: residual + linear(a, w), where a is rmsnorm(x,
    norm_weight, eps) when norm_weight is given, silu_mul(x) when silu (x then [..., 2K]), else x. The
    kernel backends fuse it into one weight-streaming launch for few rows; the reference runs the ops in
    turn, rounding where each writes its output, and the kernels round at the same points.
    batch_invariant: the kernels take any row count, in fixed row blocks, so a row's result is the same
    bits whatever else is in the call (kernels/gpu_exact.py); otherwise more than a few rows go to cuBLAS."""
    if norm_weight is not None and silu:
        raise ValueError("fused_linear: norm_weight and silu are separate prologues; pass one")
    xs, ws = x.shape, w.shape
    if not (len(ws) == 2 and len(xs) and xs[-1] == (2 * ws[1] if silu else ws[1]) and x.dtype == w.dtype
            and (norm_weight is None or norm_weight.shape == ws[1:] and norm_weight.dtype == w.dtype)
            and (residual is None or residual.shape[:-1] == xs[:-1] and residual.shape[-1:] == ws[:1])):
        checks.check_fused_linear(x, w, norm_weight, silu, residual)
    return _run("fused_linear", x.device, x, w, norm_weight, eps, silu, residual, batch_invariant)


# ---- activation ----------------------------------------------------------------------------------------
def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: x [..., 2I] (the fused gate | up projection, last dim contiguous) ->
    silu(gate) * up [..., I] in x's dtype, silu rounded to x's dtype before the product (FeedForward).
    A ConfigError where x is not float or its last dim is not a positive even size."""
    _check_gated("silu_mul", x)
    return _run("silu_mul", x.device, x)


def _check_gated(name: str, x) -> None:
    """x must be a float [..., 2I] (gate | up halves, 2I > 0): a ConfigError naming `name` otherwise."""
    xs = x.shape if isinstance(x, torch.Tensor) else ()
    if not (len(xs) and xs[-1] and not xs[-1] % 2 and x.dtype.is_floating_point):
        checks.need_tensors(name, x=x)
        if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % 2:
            raise ConfigError(f"{name}: x must be [..., 2I] (gate | up halves, 2I > 0); got {tuple(x.shape)}")
        checks.need_float(name, "x", x)


def gelu_mul(x: torch.Tensor) -> torch.Tensor:
    """Gemma 3's activation: x [..., 2I] (gate | up) -> gelu_tanh(gate) * up [..., I] in x's dtype. The reference
    runs it on every backend (no kernel has it). A ConfigError as silu_mul's."""
    _check_gated("gelu_mul", x)
    return reference.gelu_mul(x)


# ---- KV cache ------------------------------------------------------------------------------------------
def kv_write(k_buf: torch.Tensor, v_buf: torch.Tensor, layer: int, start: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """In place: k, v [B, H_kv, T, D] (any strides) to slots start[b] + t of layer `layer` of the cache
    buffers k_buf, v_buf [L, B_max, H_kv, S, D]. start [B] long, device. Slots outside [0, S) are the caller's
    error: the reference raises, kernels drop them (start lives on the device; checking it would sync).
    Shapes, dtypes, T <= S and 0 <= layer < L are checked on the host (ConfigError / InputError)."""
    kb, ks = k_buf.shape, k.shape
    if not (len(kb) == 5 and len(ks) == 4 and v_buf.shape == kb and v.shape == ks and ks[1] == kb[2]
            and ks[3] == kb[4] and ks[0] <= kb[1] and ks[2] <= kb[3] and type(layer) is int and 0 <= layer < kb[0]
            and start.shape == ks[:1] and start.dtype == torch.long and k.dtype == k_buf.dtype
            and v.dtype == k_buf.dtype and v_buf.dtype == k_buf.dtype):
        checks.check_kv_write(k_buf, v_buf, layer, start, k, v)
    _run("kv_write", k.device, k_buf, v_buf, layer, start, k, v)


def qkv_rope_write(qkv: torch.Tensor, rope_rows: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                   layer: int, start: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """The cached attention's input in one op: qkv [B, T, (H + 2 H_kv) D] is the fused QKV projection
    (q | k | v, heads of D). In place, k rotated by rope_rows (as `rope`) and v go to slots start[b] + t of
    layer `layer` of k_buf, v_buf [L, B_max, H_kv, S, D] (as `kv_write`; start [B] long, device; kernels
    drop slots outside [0, S)). Returns q rotated, a new [B, T, H, D] tensor in qkv's dtype. Shapes, dtypes,
    head counts, T <= S and 0 <= layer < L are checked on the host; start's values stay the caller's promise."""
    qs, kb, rs = qkv.shape, k_buf.shape, rope_rows.shape
    if not (len(qs) == 3 and len(kb) == 5 and v_buf.shape == kb and type(n_heads) is int and n_heads > 0
            and n_kv_heads == kb[2] and type(n_kv_heads) is int and qs[2] == (n_heads + 2 * n_kv_heads) * kb[4]
            and not kb[4] % 2 and qs[0] <= kb[1] and qs[1] <= kb[3] and type(layer) is int and 0 <= layer < kb[0]
            and start.shape == qs[:1] and start.dtype == torch.long and qkv.dtype == k_buf.dtype
            and v_buf.dtype == k_buf.dtype and len(rs) == 3 and rs[0] in (1, qs[0]) and rs[1] == qs[1]
            and rs[2] == kb[4] and rope_rows.dtype.is_floating_point):
        checks.check_qkv_rope_write(qkv, rope_rows, k_buf, v_buf, layer, start, n_heads, n_kv_heads)
    return _run("qkv_rope_write", qkv.device, qkv, rope_rows, k_buf, v_buf, layer, start, n_heads, n_kv_heads)


def kv_compact(k_buf: torch.Tensor, v_buf: torch.Tensor, src: torch.Tensor, dst_start: torch.Tensor) -> None:
    """In place, all layers, K and V, one launch: slot src[b, m] -> slot dst_start[b] + m (clamped to [0, S)).

    src [B, M] long slot ids (entries past a row's accepted count may be any slot: they land beyond the
    new length); dst_start [B] long. Overlapping moves are safe (every source is read before any write).
    Shapes and dtypes are checked on the host (ConfigError); src's values stay the caller's promise (the reference
    clamps them to [0, S), as every backend clamps destinations)."""
    kb, ss = k_buf.shape, src.shape
    if not (len(kb) == 5 and v_buf.shape == kb and len(ss) == 2 and ss[0] <= kb[1] and dst_start.shape == ss[:1]
            and src.dtype == torch.long and dst_start.dtype == torch.long and v_buf.dtype == k_buf.dtype):
        checks.check_kv_compact(k_buf, v_buf, src, dst_start)
    _run("kv_compact", k_buf.device, k_buf, v_buf, src, dst_start)


# ---- acceptance ----------------------------------------------------------------------------------------
def greedy_accept(tokens: torch.Tensor, logits: torch.Tensor, retrieve: torch.Tensor):
    """acceptance.greedy_accept: tokens [B, N], logits [B, N, V], retrieve [P, D+1] or [B, P, D+1]
    -> AcceptResult (accept_len, best_path, accepted_nodes, next_token, emitted). tokens and retrieve int64,
    logits float, P and D+1 >= 1 (ConfigError); retrieve's node ids (< N, or -1 past a path's end) stay the
    caller's promise: they live on the device."""
    checks.check_accept("greedy_accept", tokens, logits, retrieve)
    return _run("greedy_accept", tokens.device, tokens, logits, retrieve)


def typical_accept(tokens: torch.Tensor, logits: torch.Tensor, retrieve: torch.Tensor, temperature: float,
                   posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                   generator: Optional[torch.Generator] = None):
    """acceptance.typical_accept (Medusa's typical acceptance); draws the same random numbers from
    `generator` as the reference, so for a seeded generator the bonus token matches it too. The same checks as
    greedy_accept, and the temperature's and thresholds' (acceptance._check_sampling, _check_typical) for every
    backend."""
    checks.check_accept("typical_accept", tokens, logits, retrieve)
    from ..acceptance import _check_sampling, _check_typical
    _check_sampling(temperature)        # here, not only in the reference: every backend gets them
    _check_typical(posterior_threshold, posterior_alpha)
    return _run("typical_accept", tokens.device, tokens, logits, retrieve, temperature, posterior_threshold,
                posterior_alpha, generator)


# ---- trees ---------------------------------------------------------------------------------------------
def dynamic_tree(root: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, num_nodes: int):
    """tree.dynamic_tree's buffers: root [B] long, values [B, K, k] fp32 log-probs sorted descending per head,
    indices [B, K, k] their tokens -> (tokens [B, N], depth, parent, rank [B, N], ancestor bits [B, N] or None
    past 64 nodes, mask [B, N, N] bool, retrieve [B, N - 1, D + 1]); the same integers on every backend.
    A ConfigError where K heads x top-k cannot hold num_nodes nodes (kernels size their buffers by it).
    Shapes and dtypes are checked too (ConfigError); the scores' order stays the caller's promise."""
    from ..tree import dynamic_tree_depth
    vs = values.shape
    if not (len(vs) == 3 and indices.shape == vs and root.shape == vs[:1] and values.dtype.is_floating_point
            and indices.dtype == torch.long and root.dtype == torch.long and type(num_nodes) is int):
        checks.check_dynamic_tree(root, values, indices, num_nodes)
    dynamic_tree_depth(vs[1], vs[2], num_nodes)
    return _run("dynamic_tree", values.device, root, values, indices, num_nodes)


mask_bits = reference.mask_bits
bits_to_mask = reference.bits_to_mask

__all__ = ["tree_attention", "tree_mask_args", "head_attention", "fused_sal_input", "rmsnorm", "add_rmsnorm",
           "rope", "linear", "quant_linear", "silu_mul", "gelu_mul", "kv_write", "qkv_rope_write", "kv_compact", "greedy_accept",
           "typical_accept", "dynamic_tree", "mask_bits", "bits_to_mask"]
