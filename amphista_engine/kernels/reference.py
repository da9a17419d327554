"""The `torch` backend: the reference for every hot op, exactly the math the engine computes without kernels.

Every other backend is tested against these functions. Where the engine already has the function
(`model.apply_rope`, `model.AttentionSpec.dense_mask`, `acceptance.greedy_accept`...), the reference calls
it, imported lazily because the model itself dispatches through `kernels.ops`. Where the engine's code is a
method that will dispatch here (RMSNorm.forward, KVCache.write/compact), the math lives here, verbatim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_packed

BACKEND = "torch"


# ---- masks ---------------------------------------------------------------------------------------------
def mask_bits(new_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """[..., N, N] bool -> [..., N] int64 rows read as uint64 (bit j of row i = mask[i, j]); None if N > 64."""
    n = new_mask.shape[-1]
    if n > 64:
        return None
    # distinct powers of two never carry, so the int64 sum is the uint64 bit pattern (bit 63 -> negative)
    return (new_mask.long() << torch.arange(n, device=new_mask.device)).sum(-1)


def bits_to_mask(bits: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N] int64 ancestor bits -> [..., N, N] bool."""
    j = torch.arange(n, device=bits.device)
    return ((bits[..., :, None] >> j) & 1).bool()


def _new_mask_bool(new_mask: torch.Tensor, n: int) -> torch.Tensor:
    if new_mask.dtype == torch.bool:
        return new_mask if new_mask.dim() == 3 else new_mask.reshape(-1, n, n)
    return bits_to_mask(new_mask.reshape(-1, n), n)


# ---- attention -----------------------------------------------------------------------------------------
def window_keep(prefix_len, positions, window: int, n: int, kv_len: int) -> torch.Tensor:
    """[B, N, kv_len] bool: key slot s within the sliding window of new token i, i.e. key position > positions[b, i]
    - window, where slot s < prefix_len[b] holds position s and slot prefix_len[b] + j new token j's positions[b, j]
    (ops.tree_attention's `window`; model.window_mask's rule)."""
    B = prefix_len.shape[0]
    pos = positions.reshape(-1, n).expand(B, n)
    slots = torch.arange(kv_len, device=prefix_len.device)
    rel = slots[None, :] - prefix_len[:, None]                                   # [B, kv_len]
    new_pos = torch.gather(pos, 1, rel.clamp(0, n - 1))
    key_pos = torch.where((rel >= 0) & (rel < n), new_pos, slots[None, :])
    return key_pos[:, None, :] > pos[:, :, None] - window


def tree_attention(q, k_cache, v_cache, prefix_len, new_mask, kv_len: int, scale: Optional[float] = None,
                   dense_mask: Optional[torch.Tensor] = None, order=None, window: Optional[int] = None,
                   positions: Optional[torch.Tensor] = None):
    """The model's cached attention: SDPA over cache slots [0, kv_len) with AttentionSpec.dense_mask(), and
    with `window` only the keys window_keep lets through. `order` (gpu_exact.OrderedTree) asks the kernels for
    their row-invariant path; the reference result is the same attention, so it has nothing to change."""
    from ..model import AttentionSpec
    n = q.shape[2]
    if dense_mask is None:
        dense_mask = AttentionSpec(prefix_len, _new_mask_bool(new_mask, n), kv_len).dense_mask()
    if window is not None:
        keep = window_keep(prefix_len, positions, window, n, kv_len)
        dense_mask = dense_mask & keep if dense_mask.dtype == torch.bool else \
            dense_mask.masked_fill(~keep, float("-inf"))
    B = q.shape[0]
    k, v = k_cache[:B, :, :kv_len], v_cache[:B, :, :kv_len]      # a cache may hold more rows than this batch
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask[:, None], scale=scale, enable_gqa=True)


def head_attention(z, pos_emb, norm_w, eps: float, wqkv, n_heads: int, scale: Optional[float] = None):
    """AEBLayer's attention half: x = z (+ pos_emb); h = RMSNorm(x); bi-directional MHA over the K slots.

    Returns (x, attn): x [N, K, d] is the residual stream (the caller adds wo(attn) to it),
    attn [N, K, d] is the attention output before the output projection, heads concatenated.
    """
    x = z if pos_emb is None else z + pos_emb
    N, K, d = x.shape
    # bare weights (not nn.Linear): cpu_packed.linear multiplies a oneDNN-packed copy in CPU inference, as the
    # engine's packed layers do (MKL's few-row products are ~3x slower on AMD CPUs), else F.linear
    qkv = cpu_packed.linear(rmsnorm(x, norm_w, eps), wqkv)
    q, k, v = qkv.view(N, K, 3, n_heads, d // n_heads).permute(2, 0, 3, 1, 4)   # no -1: N may be 0
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)         # no mask: every head sees every head
    return x, out.transpose(1, 2).reshape(N, K, d)


# ---- staged adaptation input ---------------------------------------------------------------------------
def fused_sal_input(hidden, tokens, emb_weight, w_fuse):
    """u = W_fuse [h ; E(tokens)] in W_fuse's dtype (AmphistaHeads._fuse with fusion = "concat").

    hidden [..., d], tokens [...] long, emb_weight [V, d] (the target's embedding table), w_fuse [d, 2d].
    """
    dtype = w_fuse.dtype
    emb = F.embedding(tokens, emb_weight)
    return cpu_packed.linear(torch.cat([hidden.to(dtype), emb.to(dtype)], dim=-1), w_fuse)   # as in head_attention


# ---- norms and RoPE ------------------------------------------------------------------------------------
def rmsnorm(x, w, eps: float):
    """RMSNorm.forward: normalise in fp32, round to x's dtype, scale by w (Llama's reference order)."""
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)    # the same math in one op (~20 us less per call on a CPU)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def add_rmsnorm(x, residual, w, eps: float):
    """(s, rmsnorm(s)) with s = x + residual (residual broadcasts over x's leading dims)."""
    s = x + residual
    return s, rmsnorm(s, w, eps)


def rope(x, rope_rows):
    """model.apply_rope: x [B, T, H, D] rotated by rope_rows [B or 1, T, D] (cos | sin halves, fp32)."""
    from ..model import apply_rope
    return apply_rope(x, rope_rows)


# ---- linear layers -------------------------------------------------------------------------------------
def linear(x, w, batch_invariant: bool = False):
    """nn.Linear without bias: x [..., K] @ w.T, w [N, K]. batch_invariant asks the kernels for
    row-count-independent rounding; the reference has no say in it."""
    return F.linear(x, w)


def quant_linear(x, layer):
    """A cpu_quant layer's product on torch's own kernels (bf16 activations, see cpu_quant.py), bias included."""
    return layer.torch_forward(x)


def fused_linear(x, w, norm_weight=None, eps: float = 0.0, silu: bool = False, residual=None,
                 batch_invariant: bool = False):
    """linear(a, w) (+ residual) with a = rmsnorm(x, norm_weight, eps) or silu_mul(x) or x: one decode-step
    layer with the row op before it and the residual add after it (the model's unfused ops, in order).
    batch_invariant asks the kernels for row-count-independent rounding; the reference has no say in it."""
    a = x
    if norm_weight is not None:
        a = rmsnorm(a, norm_weight, eps)
    if silu:
        a = silu_mul(a)
    out = linear(a, w)
    return out if residual is None else residual + out


# ---- activation ----------------------------------------------------------------------------------------
def silu_mul(x):
    """FeedForward's SwiGLU activation: x [..., 2I] as gate | up halves -> silu(gate) * up [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_mul(x):
    """Gemma's GeGLU activation: x [..., 2I] as gate | up halves -> gelu_tanh(gate) * up [..., I] (transformers'
    gelu_pytorch_tanh: the gate's GELU rounded to x's dtype before the product). Reference only: the kernel
    backends have no such op and fall through to this one."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


# ---- KV cache ------------------------------------------------------------------------------------------
def kv_write(k_buf, v_buf, layer: int, start, k, v):
    """KVCache.write: k, v [B, H, T, D] go to slots start[b] .. start[b] + T - 1 of layer `layer`.

    k_buf, v_buf: the cache buffers [L, B_max, H, S, D]; start: [B] long (device)."""
    B, H, T, D = k.shape
    if B == 1 and k_buf.device.type == "cpu":        # one indexed copy per buffer, ~2x faster than index_put
        slots = start[:1] + torch.arange(T, device=k.device)
        k_buf[layer, 0].index_copy_(1, slots, k[0])
        v_buf[layer, 0].index_copy_(1, slots, v[0])
        return
    rows = torch.arange(B, device=k.device)[:, None]
    slots = start[:, None] + torch.arange(T, device=k.device)                 # [B, T]
    # advanced indexing (index_put), not scatter_: the CPU's bf16 scatter_ is ~10x slower than fp32's
    k_buf[layer][rows, :, slots] = k.transpose(1, 2)                            # [B, T, H, D]
    v_buf[layer][rows, :, slots] = v.transpose(1, 2)


def qkv_rope_write(qkv, rope_rows, k_buf, v_buf, layer: int, start, n_heads: int, n_kv_heads: int):
    """Attention.forward's cached path before attention: split the fused QKV output [B, T, (H + 2 H_kv) D],
    RoPE on q and k, k and v to the cache (kv_write); returns q [B, T, H, D]."""
    B, T, _ = qkv.shape
    D = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    qk, v = qkv.split(((n_heads + n_kv_heads) * D, n_kv_heads * D), dim=-1)
    q, k = rope(qk.view(B, T, n_heads + n_kv_heads, D), rope_rows).split((n_heads, n_kv_heads), dim=2)  # one pass
    kv_write(k_buf, v_buf, layer, start, k.transpose(1, 2), v.view(B, T, n_kv_heads, D).transpose(1, 2))
    return q


def kv_compact(k_buf, v_buf, src, dst_start):
    """KVCache.compact: copy slots src[b, m] to dst_start[b] + m for every layer at once.

    Entries past a row's accepted count may hold any valid slot (they land beyond the new length).
    Gathering first makes overlapping moves safe."""
    S = k_buf.shape[3]
    B, M = src.shape
    dst = (dst_start[:, None] + torch.arange(M, device=src.device)).clamp_(0, S - 1)
    src = src.clamp(0, S - 1)
    rows = torch.arange(B, device=src.device)[:, None]
    for buf in (k_buf, v_buf):
        buf[:, rows, :, dst] = buf[:, rows, :, src]        # [B, M, L, H, D]; index_put as in kv_write


# ---- acceptance ----------------------------------------------------------------------------------------
def greedy_accept(tokens, logits, retrieve):
    from ..acceptance import greedy_accept as ref
    return ref(tokens, logits, retrieve)


def typical_accept(tokens, logits, retrieve, temperature: float, posterior_threshold: float = 0.09,
                   posterior_alpha: float = 0.3, generator: Optional[torch.Generator] = None):
    from ..acceptance import typical_accept as ref
    return ref(tokens, logits, retrieve, temperature, posterior_threshold, posterior_alpha, generator)


# ---- trees ---------------------------------------------------------------------------------------------
def dynamic_tree(root, values, indices, num_nodes: int):
    from ..tree import dynamic_tree_buffers
    return dynamic_tree_buffers(root, values, indices, num_nodes)
