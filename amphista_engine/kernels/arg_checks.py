"""Host-side argument checks for the ops in `ops.py`, one `check_<op>` per op.

Each op checks on the host what shapes, dtypes and host ints can tell, before any backend runs: a wrong shape
would otherwise surface as a raw torch error from the reference, an opaque Triton error, an out-of-bounds access
in a C++ kernel, or a silent broadcast. Each check's first test is one boolean expression over shapes that every
good call passes (~1 us); only a call that fails it pays for the named error. Device values (token ids, slot
indices, prefix lengths) are never read: that would sync the device every layer of every step.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, InputError
from ..values import is_int


def sh(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def autocast(t: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(t.device.type)     # mixed float dtypes are legal under autocast (training)


def need_tensors(op: str, **named) -> None:
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{op}: {name} must be a tensor; got {type(t).__name__}")


def need_dim(op: str, name: str, t: torch.Tensor, dims, what: str) -> None:
    if t.dim() not in dims:
        raise ConfigError(f"{op}: {name} must be {what}; got shape {tuple(t.shape)}")


def need_dtype(op: str, name: str, t: torch.Tensor, dtypes, what: str) -> None:
    if t.dtype not in dtypes:
        raise ConfigError(f"{op}: {name} must be {what}; got {t.dtype}")


def need_float(op: str, name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ConfigError(f"{op}: {name} must be a floating-point tensor; got {t.dtype}")


LONG = (torch.long,)


TOKEN_DTYPES = (torch.long, torch.int32)


INT_DTYPES = (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_layer(op: str, layer, L: int) -> None:
    if not is_int(layer) or not 0 <= layer < L:
        raise InputError(f"{op}: layer must be an int in [0, L) = [0, {L}); got {layer!r}")


def check_cache(op: str, k_buf, v_buf) -> None:
    need_tensors(op, k_buf=k_buf, v_buf=v_buf)
    if k_buf.dim() != 5 or v_buf.shape != k_buf.shape:
        raise ConfigError(f"{op}: k_buf and v_buf must be one [L, B_max, H_kv, S, D] shape; got {tuple(k_buf.shape)} "
                          f"and {tuple(v_buf.shape)}")
    if v_buf.dtype != k_buf.dtype:
        raise ConfigError(f"{op}: k_buf and v_buf must share a dtype; got {k_buf.dtype} and {v_buf.dtype}")


def check_start(op: str, name: str, start, B: int) -> None:
    need_tensors(op, **{name: start})
    if start.shape != (B,) or start.dtype != torch.long:
        raise ConfigError(f"{op}: {name} must be an int64 [B] = [{B}] tensor; got {start.dtype} {tuple(start.shape)}")


def check_rope_rows(op: str, rope_rows, B: int, T: int, D: int) -> None:
    need_tensors(op, rope_rows=rope_rows)
    rs = tuple(rope_rows.shape)
    if not (rs == (T, D) or len(rs) == 3 and rs[0] in (1, B) and rs[1:] == (T, D)):
        raise ConfigError(f"{op}: rope_rows must be [B or 1, T, D] = [{B} or 1, {T}, {D}] (or [T, D]); got {rs}")
    need_float(op, "rope_rows", rope_rows)


def check_tree_attention(q, k_cache, v_cache, prefix_len, kv_len, new_mask, dense_mask):
    """What the host can check without reading the device: a window past the cache would send the kernels'
    loads past the buffer (the reference would raise, the cpu kernel clamp), and a mask of another N would be
    broadcast or misread. prefix_len's values stay the caller's promise (prefix_len[b] + N <= kv_len): reading
    them would sync the device every layer."""
    qs, ks, ms = q.shape, k_cache.shape, new_mask.shape
    if (len(qs) == 4 and len(ks) == 4 and v_cache.shape == ks and qs[3] == ks[3] and ks[0] >= qs[0] and ks[1]
            and not qs[1] % ks[1] and type(kv_len) is int and qs[2] <= kv_len <= ks[2]
            and prefix_len.dtype == torch.long and prefix_len.shape == qs[:1]
            and (ms[-2:] == qs[2:3] * 2 and new_mask.dtype == torch.bool and (len(ms) == 2 or len(ms) == 3
                                                                               and ms[0] in (1, qs[0]))
                 or ms[-1:] == qs[2:3] and new_mask.dtype == torch.long and (len(ms) == 1 or len(ms) == 2
                                                                              and ms[0] in (1, qs[0])))
            and (dense_mask is None or dense_mask.shape == (qs[0], qs[2], kv_len))
            and (k_cache.dtype == q.dtype and v_cache.dtype == q.dtype or autocast(q))):
        return                          # every layer of every step passes here: the fast path is one test
    op = "tree_attention"
    need_tensors(op, q=q, k_cache=k_cache, v_cache=v_cache, prefix_len=prefix_len, new_mask=new_mask)
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ConfigError(f"{op}: q must be [B, H, N, D] and k_cache/v_cache one [B, H_kv, S, D] shape; "
                          f"got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, N, D = q.shape
    _, H_kv, S, Dk = k_cache.shape
    if Dk != D or H_kv == 0 or H % H_kv or k_cache.shape[0] < B:
        raise ConfigError(f"{op}: q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)} "
                          f"(head dims equal, H a multiple of H_kv, at least B cache rows)")
    if not is_int(kv_len) or not N <= kv_len <= S:
        raise InputError(f"{op}: kv_len must be an int in [N, S] = [{N}, {S}]; got {kv_len!r}")
    if prefix_len.shape != (B,) or prefix_len.dtype != torch.long:
        raise ConfigError(f"{op}: prefix_len must be an int64 [B] = [{B}] tensor; got "
                          f"{prefix_len.dtype} {tuple(prefix_len.shape)}")
    if (k_cache.dtype != q.dtype or v_cache.dtype != q.dtype) and not autocast(q):
        raise ConfigError(f"{op}: q, k_cache and v_cache must share a dtype (outside autocast); got {q.dtype}, "
                          f"{k_cache.dtype} and {v_cache.dtype}")
    raise ConfigError(f"{op}: new_mask must be bool [B or 1, N, N] / [N, N] or int64 ancestor bits [B or 1, N] / "
                      f"[N] (B = {B}, N = {N}), and dense_mask None or [B, N, kv_len] = [{B}, {N}, {kv_len}]; "
                      f"got new_mask {new_mask.dtype} {tuple(ms)}, dense_mask {sh(dense_mask)}")


def check_tree_window(q, window, positions):
    """tree_attention's sliding window: an int >= 1 with the new tokens' positions, int64 [B or 1, N] / [N] on
    q's device. Returns positions as [B or 1, N]."""
    op = "tree_attention"
    B, N = q.shape[0], q.shape[2]
    if not is_int(window) or window < 1:
        raise InputError(f"{op}: window must be an int >= 1 (None: no sliding window); got {window!r}")
    ps = positions.shape if isinstance(positions, torch.Tensor) else None
    if (ps is None or positions.dtype != torch.long or positions.device != q.device
            or not (ps == (N,) or len(ps) == 2 and ps[1] == N and ps[0] in (1, B))):
        raise ConfigError(f"{op}: window needs positions, an int64 [B or 1, N] / [N] = [{B}, {N}] tensor on "
                          f"{q.device}; got {sh(positions)}"
                          + (f" {positions.dtype} on {positions.device}" if ps is not None else ""))
    return positions.reshape(-1, N)


def check_head_attention(z, pos_emb, norm_w, wqkv, n_heads):
    zs = z.shape
    if (len(zs) == 3 and norm_w.shape == zs[2:] and wqkv.shape == (3 * zs[2], zs[2]) and type(n_heads) is int
            and n_heads > 0 and not zs[2] % n_heads and (pos_emb is None or pos_emb.shape == zs[1:])
            and z.dtype.is_floating_point and wqkv.dtype == z.dtype and norm_w.dtype == z.dtype
            and (pos_emb is None or pos_emb.dtype == z.dtype)):
        return
    op = "head_attention"
    need_tensors(op, z=z, norm_w=norm_w, wqkv=wqkv)
    need_dim(op, "z", z, (3,), "[N, K, d]")
    N, K, d = z.shape
    need_float(op, "z", z)
    if pos_emb is not None and (not isinstance(pos_emb, torch.Tensor) or pos_emb.shape != (K, d)):
        raise ConfigError(f"{op}: pos_emb must be None or [K, d] = [{K}, {d}]; got {sh(pos_emb)}")
    if norm_w.shape != (d,):
        raise ConfigError(f"{op}: norm_w must be [d] = [{d}]; got {tuple(norm_w.shape)}")
    if wqkv.shape != (3 * d, d):
        raise ConfigError(f"{op}: wqkv must be [3d, d] = [{3 * d}, {d}]; got {tuple(wqkv.shape)}")
    if not is_int(n_heads) or n_heads <= 0 or d % n_heads:
        raise ConfigError(f"{op}: n_heads must be a positive int dividing d = {d}; got {n_heads!r}")
    a_dtype = torch.promote_types(z.dtype if pos_emb is None else torch.promote_types(z.dtype, pos_emb.dtype),
                                  norm_w.dtype)          # what rmsnorm(z + pos_emb) hands the QKV product
    if a_dtype != wqkv.dtype and not autocast(z):
        raise ConfigError(f"{op}: the normed input ({a_dtype}, from z, pos_emb and norm_w) and wqkv ({wqkv.dtype}) "
                          "must share a dtype (outside autocast)")


def check_fused_sal_input(hidden, tokens, emb_weight, w_fuse):
    hs, es = hidden.shape, emb_weight.shape
    if (len(hs) and tokens.shape == hs[:-1] and len(es) == 2 and es[1] == hs[-1]
            and w_fuse.shape == (hs[-1], 2 * hs[-1]) and tokens.dtype in TOKEN_DTYPES):
        return
    op = "fused_sal_input"
    need_tensors(op, hidden=hidden, tokens=tokens, emb_weight=emb_weight, w_fuse=w_fuse)
    if hidden.dim() == 0:
        raise ConfigError(f"{op}: hidden must be [..., d]; got a 0-dim tensor")
    d = hidden.shape[-1]
    if tokens.shape != hidden.shape[:-1]:
        raise ConfigError(f"{op}: tokens must be hidden's leading dims {tuple(hidden.shape[:-1])}; "
                          f"got {tuple(tokens.shape)}")
    need_dtype(op, "tokens", tokens, TOKEN_DTYPES, "int64 or int32 token ids")
    if emb_weight.dim() != 2 or emb_weight.shape[1] != d:
        raise ConfigError(f"{op}: emb_weight must be [V, d] with d = {d}; got {tuple(emb_weight.shape)}")
    if w_fuse.shape != (d, 2 * d):
        raise ConfigError(f"{op}: w_fuse must be [d, 2d] = [{d}, {2 * d}]; got {tuple(w_fuse.shape)}")


def broadcasts_to(shape, target) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def check_row_op(op: str, x, w) -> None:
    need_tensors(op, x=x, w=w)
    if x.dim() == 0:
        raise ConfigError(f"{op}: x must be [..., d]; got a 0-dim tensor")
    need_float(op, "x", x)
    if w.shape != x.shape[-1:]:
        raise ConfigError(f"{op}: w must be [d] = [{x.shape[-1]}] (x {tuple(x.shape)}); got {tuple(w.shape)}")


def check_rope(x, rope_rows):
    need_tensors("rope", x=x, rope_rows=rope_rows)
    need_dim("rope", "x", x, (4,), "[B, T, H, D]")
    B, T, H, D = x.shape
    if D % 2:
        raise ConfigError(f"rope: x's head dim D must be even (cos | sin halves); got x {tuple(x.shape)}")
    need_float("rope", "x", x)
    check_rope_rows("rope", rope_rows, B, T, D)


def check_linear(op: str, x, w, a_dtype, k_mult: int) -> None:
    """x [..., k_mult K] against w [N, K]; a_dtype: the dtype of what reaches the product."""
    need_tensors(op, x=x, w=w)
    if w.dim() != 2:
        raise ConfigError(f"{op}: w must be [N, K] (an nn.Linear weight); got {tuple(w.shape)}")
    if x.dim() == 0 or x.shape[-1] != k_mult * w.shape[1]:
        what = "[..., 2K]" if k_mult == 2 else "[..., K]"
        raise ConfigError(f"{op}: x must be {what} with K = {w.shape[1]} (w {tuple(w.shape)}); got {tuple(x.shape)}")
    if a_dtype != w.dtype and not autocast(x):
        raise ConfigError(f"{op}: x and w must share a dtype (outside autocast); got {a_dtype} and {w.dtype}")


def check_quant_linear(x, layer, k) -> None:
    need_tensors("quant_linear", x=x)
    if not is_int(k) or not callable(getattr(type(layer), "torch_forward", None)):
        raise ConfigError(f"quant_linear: layer must be a cpu_quant layer (Int4Linear, Int8Linear); "
                          f"got {type(layer).__name__}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ConfigError(f"quant_linear: x must be [..., in_features] = [..., {k}]; got {tuple(x.shape)}")
    need_float("quant_linear", "x", x)


def check_fused_linear(x, w, norm_weight, silu, residual) -> None:
    op = "fused_linear"
    need_tensors(op, x=x, w=w)
    a_dtype = x.dtype
    if norm_weight is not None:
        need_tensors(op, norm_weight=norm_weight)
        if w.dim() == 2 and norm_weight.shape != w.shape[1:]:
            raise ConfigError(f"{op}: norm_weight must be [K] = [{w.shape[1]}] (w {tuple(w.shape)}); "
                              f"got {tuple(norm_weight.shape)}")
        a_dtype = torch.promote_types(x.dtype, norm_weight.dtype)     # rmsnorm's w * x
    check_linear(op, x, w, a_dtype, 2 if silu else 1)
    if silu or norm_weight is not None:
        need_float(op, "x", x)
    if residual is not None:
        need_tensors(op, residual=residual)
        out = torch.Size((*x.shape[:-1], w.shape[0]))
        if residual.shape[-1:] != out[-1:] or not broadcasts_to(residual.shape, out):
            raise ConfigError(f"{op}: residual must be the output's shape {tuple(out)} (or broadcast to it); "
                              f"got {tuple(residual.shape)}")


def check_kv_write(k_buf, v_buf, layer, start, k, v) -> None:
    op = "kv_write"
    check_cache(op, k_buf, v_buf)
    need_tensors(op, k=k, v=v)
    L, B_max, H_kv, S, D = k_buf.shape
    if k.dim() != 4 or v.shape != k.shape:
        raise ConfigError(f"{op}: k and v must be one [B, H_kv, T, D] shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, T, Dk = k.shape
    if H != H_kv or Dk != D or B > B_max:
        raise ConfigError(f"{op}: k {tuple(k.shape)} does not fit the cache {tuple(k_buf.shape)} (H_kv and D equal, "
                          f"B <= B_max)")
    if T > S:
        raise ConfigError(f"{op}: k holds T = {T} tokens, more than the cache's S = {S} slots")
    check_layer(op, layer, L)
    check_start(op, "start", start, B)
    if k.dtype != k_buf.dtype or v.dtype != k_buf.dtype:
        raise ConfigError(f"{op}: k and v must be in the cache's dtype {k_buf.dtype}; got {k.dtype} and {v.dtype}")


def check_qkv_rope_write(qkv, rope_rows, k_buf, v_buf, layer, start, n_heads, n_kv_heads) -> None:
    op = "qkv_rope_write"
    check_cache(op, k_buf, v_buf)
    need_tensors(op, qkv=qkv)
    L, B_max, H_kv, S, D = k_buf.shape
    if not is_int(n_heads) or n_heads <= 0:
        raise ConfigError(f"{op}: n_heads must be a positive int; got {n_heads!r}")
    if not is_int(n_kv_heads) or n_kv_heads != H_kv:
        raise ConfigError(f"{op}: n_kv_heads must equal the cache's H_kv = {H_kv}; got {n_kv_heads!r}")
    if D % 2:
        raise ConfigError(f"{op}: the cache's head dim D must be even (RoPE halves); got k_buf {tuple(k_buf.shape)}")
    need_dim(op, "qkv", qkv, (3,), "[B, T, (H + 2 H_kv) D]")
    B, T, W = qkv.shape
    if W != (n_heads + 2 * n_kv_heads) * D:
        raise ConfigError(f"{op}: qkv's width must be (n_heads + 2 n_kv_heads) D = ({n_heads} + 2 x {n_kv_heads}) x "
                          f"{D} = {(n_heads + 2 * n_kv_heads) * D}; got qkv {tuple(qkv.shape)}")
    if B > B_max:
        raise ConfigError(f"{op}: qkv has B = {B} rows, more than the cache's B_max = {B_max}")
    if T > S:
        raise ConfigError(f"{op}: qkv holds T = {T} tokens, more than the cache's S = {S} slots")
    check_layer(op, layer, L)
    check_start(op, "start", start, B)
    check_rope_rows(op, rope_rows, B, T, D)
    if qkv.dtype != k_buf.dtype:
        raise ConfigError(f"{op}: qkv must be in the cache's dtype {k_buf.dtype}; got {qkv.dtype}")


def check_kv_compact(k_buf, v_buf, src, dst_start) -> None:
    op = "kv_compact"
    check_cache(op, k_buf, v_buf)
    need_tensors(op, src=src)
    need_dim(op, "src", src, (2,), "[B, M] slot ids")
    need_dtype(op, "src", src, LONG, "int64 slot ids")
    B = src.shape[0]
    if B > k_buf.shape[1]:
        raise ConfigError(f"{op}: src has B = {B} rows, more than the cache's B_max = {k_buf.shape[1]}")
    check_start(op, "dst_start", dst_start, B)


def check_accept(op: str, tokens, logits, retrieve) -> None:
    ts, ls, rs = tokens.shape, logits.shape, retrieve.shape
    if (len(ts) == 2 and len(ls) == 3 and ls[:2] == ts and ls[2] and ts[1] and tokens.dtype == torch.long
            and retrieve.dtype == torch.long and logits.dtype.is_floating_point
            and (len(rs) == 2 or len(rs) == 3 and rs[0] in (1, ts[0])) and rs[-2] and rs[-1]):
        return                          # once per step, the fast path is one test
    need_tensors(op, tokens=tokens, logits=logits, retrieve=retrieve)
    need_dim(op, "tokens", tokens, (2,), "[B, N]")
    B, N = tokens.shape
    if N == 0:
        raise ConfigError(f"{op}: tokens must hold at least the root (N >= 1); got {tuple(tokens.shape)}")
    need_dtype(op, "tokens", tokens, LONG, "int64 token ids")
    if logits.dim() != 3 or logits.shape[:2] != (B, N) or logits.shape[2] == 0:
        raise ConfigError(f"{op}: logits must be [B, N, V] = [{B}, {N}, V >= 1]; got {tuple(logits.shape)}")
    need_float(op, "logits", logits)
    rs = tuple(retrieve.shape)
    if not (len(rs) == 2 or len(rs) == 3 and rs[0] in (1, B)) or 0 in rs[-2:]:
        raise ConfigError(f"{op}: retrieve must be [P, D+1] or [B or 1, P, D+1] (B = {B}, P and D+1 >= 1); got {rs}")
    need_dtype(op, "retrieve", retrieve, LONG, "int64 node ids")


def check_dynamic_tree(root, values, indices, num_nodes) -> None:
    op = "dynamic_tree"
    need_tensors(op, root=root, values=values, indices=indices)
    if values.dim() != 3 or indices.shape != values.shape:
        raise ConfigError(f"{op}: values and indices must both be [B, K, k]; got {tuple(values.shape)} "
                          f"and {tuple(indices.shape)}")
    B = values.shape[0]
    if root.shape != (B,):
        raise ConfigError(f"{op}: root must be [B] = [{B}]; got {tuple(root.shape)}")
    need_float(op, "values", values)
    need_dtype(op, "indices", indices, INT_DTYPES, "integer token ids")
    need_dtype(op, "root", root, INT_DTYPES, "integer token ids")
    if not is_int(num_nodes):
        raise ConfigError(f"{op}: num_nodes must be an int; got {num_nodes!r}")
