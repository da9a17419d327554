"""The `cpu` backend: the ops the CPU extension `_cpu` implements (csrc/cpu/*.h), same signatures as `ops`.

A CPU decode step of a small model is bound by dispatch overhead, not by its small ops' arithmetic: the torch
reference spends ~3-6 us per op, and an RMSNorm with its residual add, or RoPE with the cache write, is 5-15 ops
on a few kilobytes. Each op here is one C++ call over raw addresses (the extension never links libtorch, so it
works with any torch), threaded only for big calls such as a prefill. The kernels compute each row on its own in
a fixed order, so a token comes out the same bits whatever else the call holds; their results equal the
reference's up to summation order (bit for bit for RoPE, the cache writes and compaction).

Tree attention sums every token's keys in position order by construction (prefix, then its ancestors), so the
model's decode steps need none of kernels/cpu_exact.py's layout around flash to keep the CPU's speculative ==
plain greedy (`orders_keys`). It is also faster than that layout: several times for a plain step (it reads the
prefix, not 512-slot blocks, and needs no padded query rows), and it scores 16 keys at once for trees.

Greedy acceptance (each node's argmax, the longest matching path, the bonus token) is one call here too, as on the
GPU backends. Products with 4-bit and 8-bit weights (kernels/cpu_quant.py's layers) run here too, on weights packed once by
pack_int4 / pack_int8 (csrc/cpu/quant_matmul.h): torch's int4 kernel costs about as much per row as for one row,
so a tree's verification cost what the tree saved. With those products fast, Python became most of a 4-bit decode
step (ten ops a layer at ~10-20 us each), so `decoder_layers` runs a 4-bit model's whole layer stack in one call
(csrc/cpu/decoder.h). Float matmuls stay with torch (oneDNN), and so does SwiGLU's activation as a separate op: a
C++ silu with a vectorised exp measured slower than torch's two ops at decode sizes on a 2-core AVX-512 EPYC (7.8
vs 6.0 us for one row of 1536, 45 vs 28 us for 16 rows); inside decoder_layers it costs no dispatch.

Threads: OpenMP's, shared with torch (the module links libgomp.so.1, the soname torch's CPU wheels load), or, for
steps of models on quantized kernels, the extension's own pool: kernels/cpu_threads.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._ext import optional_module
from .cpu_threads import kernel_threads

BACKEND = "cpu"

_CODES = {torch.float32: 0, torch.bfloat16: 2}    # csrc/cpu/common.h DType (the CUDA module's codes)
MAX_HEAD_DIM = 512                                 # csrc/cpu/tree_attention.h kMaxDynamicD: its stack buffers
_HOW_TO_BUILD = "it is built by `pip install -e .` where a C++17 compiler exists"


def load_extension():
    """The `_cpu` module, or None when it is not built or cannot load (cached after the first call)."""
    return optional_module("_cpu", _HOW_TO_BUILD)[0]


def takes(dtype: torch.dtype) -> bool:
    """Whether the extension's kernels take tensors of this dtype (fp32 and bf16; fp16 runs torch's ops)."""
    return dtype in _CODES


def extension_error() -> str | None:
    """Why load_extension() returns None; None when the extension loaded."""
    return optional_module("_cpu", _HOW_TO_BUILD)[1]


def _cpu(*ts) -> bool:
    return all(t.device.type == "cpu" for t in ts)


# ---- norms ---------------------------------------------------------------------------------------------
def rmsnorm(x, w, eps: float):
    ext, code = load_extension(), _CODES.get(x.dtype)
    if (ext is None or code is None or w.dtype != x.dtype or not _cpu(x, w) or not x.is_contiguous()
            or not w.is_contiguous() or w.shape != x.shape[-1:] or x.numel() == 0):
        return NotImplemented
    out = torch.empty_like(x)
    d = x.shape[-1]
    ext.rmsnorm(x.data_ptr(), 0, w.data_ptr(), 0, out.data_ptr(), x.numel() // d, d, eps, code,
                kernel_threads())
    return out


def add_rmsnorm(x, residual, w, eps: float):
    ext, code = load_extension(), _CODES.get(x.dtype)
    if (ext is None or code is None or residual.dtype != x.dtype or w.dtype != x.dtype or residual.shape != x.shape
            or not _cpu(x, residual, w) or not x.is_contiguous() or not residual.is_contiguous()
            or not w.is_contiguous() or w.shape != x.shape[-1:] or x.numel() == 0):
        return NotImplemented              # a residual broadcast over x's leading dims: the reference
    s, out = torch.empty_like(x), torch.empty_like(x)
    d = x.shape[-1]
    ext.rmsnorm(x.data_ptr(), residual.data_ptr(), w.data_ptr(), s.data_ptr(), out.data_ptr(), x.numel() // d, d,
                eps, code, kernel_threads())
    return s, out


# ---- KV cache ------------------------------------------------------------------------------------------
def qkv_rope_write(qkv, rope_rows, k_buf, v_buf, layer: int, start, n_heads: int, n_kv_heads: int):
    ext, code = load_extension(), _CODES.get(qkv.dtype)
    if ext is None or code is None or qkv.dim() != 3 or k_buf.dim() != 5 or rope_rows.dim() != 3:
        return NotImplemented
    B, T, width = qkv.shape
    L, B_max, H_kv, S, D = k_buf.shape
    if (k_buf.dtype != qkv.dtype or v_buf.dtype != qkv.dtype or v_buf.shape != k_buf.shape
            or not (k_buf.is_contiguous() and v_buf.is_contiguous()) or H_kv != n_kv_heads
            or width != (n_heads + 2 * H_kv) * D or D % 2 or n_heads % H_kv or B > B_max or not 0 <= layer < L
            or rope_rows.dtype != torch.float32 or rope_rows.shape[0] not in (1, B) or rope_rows.shape[1:] != (T, D)
            or qkv.stride(-1) != 1 or rope_rows.stride(-1) != 1 or start.dtype != torch.long
            or start.shape != (B,) or not start.is_contiguous() or not _cpu(qkv, rope_rows, k_buf, v_buf, start)
            or qkv.numel() == 0):
        return NotImplemented
    q = torch.empty(B, T, n_heads, D, dtype=qkv.dtype)
    rope_sb = rope_rows.stride(0) if rope_rows.shape[0] > 1 else 0
    rope_st = rope_rows.stride(1) if T > 1 else D
    qkv_sb = qkv.stride(0) if B > 1 else 0
    qkv_st = qkv.stride(1) if T > 1 else width
    k_layer, v_layer = k_buf[layer], v_buf[layer]
    ext.qkv_rope_write(qkv.data_ptr(), qkv_sb, qkv_st, rope_rows.data_ptr(), rope_sb, rope_st, k_layer.data_ptr(),
                       v_layer.data_ptr(), H_kv * S * D, S * D, S, start.data_ptr(), q.data_ptr(), B, T, n_heads,
                       H_kv, D, code, kernel_threads())
    return q


def kv_compact(k_buf, v_buf, src, dst_start):
    ext = load_extension()
    if (ext is None or k_buf.dim() != 5 or k_buf.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or v_buf.dtype != k_buf.dtype or v_buf.shape != k_buf.shape or src.dim() != 2
            or src.dtype != torch.long or dst_start.dtype != torch.long or dst_start.shape != src.shape[:1]
            or not (k_buf.is_contiguous() and v_buf.is_contiguous() and src.is_contiguous()
                    and dst_start.is_contiguous()) or not _cpu(k_buf, v_buf, src, dst_start)
            or src.shape[0] > k_buf.shape[1] or src.numel() == 0):
        return NotImplemented
    L, B_max, H_kv, S, D = k_buf.shape
    B, M = src.shape
    ext.kv_compact(k_buf.data_ptr(), v_buf.data_ptr(), src.data_ptr(), dst_start.data_ptr(), L, B_max, H_kv, S, D, B,
                   M, k_buf.element_size(), kernel_threads())


# ---- attention -----------------------------------------------------------------------------------------
def orders_keys(k_cache: torch.Tensor) -> bool:
    """Whether ops.tree_attention over this cache runs this backend's kernel, which sums every token's keys in
    position order by construction: the model's decode steps then need none of kernels/cpu_exact.py's layout
    (aligned split, key windows, padded rows) to keep speculative == plain greedy."""
    from . import backend
    return (k_cache.device.type == "cpu" and k_cache.dtype in _CODES
            and backend.resolve("tree_attention", k_cache.device) == BACKEND)


def _bits(new_mask, B: int, N: int):
    """new_mask as contiguous int64 ancestor bits [B or 1, N] (and the batch stride), or None."""
    if new_mask.dtype == torch.bool:
        if new_mask.dim() != 3 or new_mask.shape[-2:] != (N, N) or N > 64:
            return None
        from .reference import mask_bits
        new_mask = mask_bits(new_mask)
    if new_mask.dtype != torch.long or new_mask.shape[-1] != N or new_mask.dim() not in (1, 2):
        return None
    bits = new_mask.reshape(-1, N).contiguous()
    if bits.shape[0] not in (1, B):
        return None
    return bits, (N if bits.shape[0] > 1 else 0)


_BIT_INDEX = torch.arange(64)


def _window_positions_fit(prefix_len, bits, positions, N: int) -> bool:
    """Whether the new tokens' positions are prefix_len + depth, depth = ancestor bits' count - 1: the rule by which
    the kernel places a token in its window (csrc/cpu/tree_attention.h). The engine's trees meet it; other
    positions (left for the reference) would window the wrong keys."""
    if positions.dtype != torch.long or positions.shape[-1] != N or positions.device.type != "cpu":
        return False
    B = prefix_len.shape[0]
    if B * N <= 64:          # every layer of a step asks: a few list reads beat ~6 tensor ops (26 us a layer)
        pos, starts, rows = positions.reshape(-1, N).tolist(), prefix_len.tolist(), bits.tolist()
        return all(p == start + (x & 0xFFFFFFFFFFFFFFFF).bit_count() - 1
                   for b, start in enumerate(starts)
                   for p, x in zip(pos[b if len(pos) > 1 else 0], rows[b if len(rows) > 1 else 0]))
    depth = ((bits[..., None] >> _BIT_INDEX) & 1).sum(-1) - 1            # the kernel's popcount of all 64 bits
    return torch.equal((positions.reshape(-1, N) - depth).expand(B, N), prefix_len[:, None].expand(-1, N))


def takes_window(k_cache, prefix_len, bits, positions) -> bool:
    """Whether tree_attention with a window over this cache (the model's [L, B, H_kv, S, D] or a layer's) runs the
    kernel for these int64 ancestor bits and positions, not the reference (model.kernel_window asks once a forward)."""
    return (orders_keys(k_cache) and load_extension() is not None and k_cache.shape[-1] <= MAX_HEAD_DIM
            and bits.dtype == torch.long and bits.shape[-1] <= 64
            and _window_positions_fit(prefix_len, bits.reshape(-1, bits.shape[-1]), positions, bits.shape[-1]))


def tree_attention(q, k_cache, v_cache, prefix_len, new_mask, kv_len: int, scale=None, dense_mask=None, order=None,
                   window=None, positions=None):
    """window, positions: ops.tree_attention's sliding window, taken where the positions are what the kernel reads
    off the ancestor bits (_window_positions_fit); it then reads only the window's keys."""
    ext, code = load_extension(), _CODES.get(q.dtype)
    if ext is None or code is None or order is not None or q.dim() != 4 or k_cache.dim() != 4:
        return NotImplemented
    B, H, N, D = q.shape
    _, H_kv, S, _ = k_cache.shape
    if (k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or v_cache.shape != k_cache.shape
            or k_cache.shape[0] < B or k_cache.shape[3] != D or H % H_kv or N > 64 or S < N
            or q.stride(-1) != 1 or k_cache.stride()[2:] != (D, 1) or v_cache.stride() != k_cache.stride()
            or prefix_len.dtype != torch.long or prefix_len.shape != (B,) or not prefix_len.is_contiguous()
            or not _cpu(q, k_cache, v_cache, prefix_len, new_mask) or q.numel() == 0 or D > MAX_HEAD_DIM
            or (scale is not None and not (math.isfinite(scale) and scale > 0))):
        return NotImplemented                      # the reference takes what the kernel's binding refuses
    mask = _bits(new_mask, B, N)
    if mask is None:
        return NotImplemented
    bits, bits_sb = mask
    if window is not None and not _window_positions_fit(prefix_len, bits, positions, N):
        return NotImplemented
    out = torch.empty(B, N, H, D, dtype=q.dtype)
    ext.tree_attention(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k_cache.data_ptr(), v_cache.data_ptr(),
                       k_cache.stride(0), k_cache.stride(1), prefix_len.data_ptr(), bits.data_ptr(), bits_sb,
                       out.data_ptr(), B, H, H_kv, N, D, S, scale if scale is not None else D ** -0.5, code,
                       kernel_threads(), 0 if window is None else int(window))
    return out.transpose(1, 2)


# ---- acceptance ----------------------------------------------------------------------------------------
def greedy_accept(tokens, logits, retrieve):
    ext, code = load_extension(), _CODES.get(logits.dtype)
    if (ext is None or code is None or tokens.dim() != 2 or logits.dim() != 3 or logits.shape[:2] != tokens.shape
            or tokens.dtype != torch.long or retrieve.dtype != torch.long or retrieve.dim() not in (2, 3)
            or (retrieve.dim() == 3 and retrieve.shape[0] not in (1, tokens.shape[0]))
            or not _cpu(tokens, logits, retrieve) or tokens.numel() == 0 or logits.shape[-1] == 0
            or retrieve.shape[-2] == 0 or retrieve.shape[-1] == 0):
        return NotImplemented
    B, N = tokens.shape
    r = retrieve.contiguous()
    P, D1 = r.shape[-2:]
    tokens, logits = tokens.contiguous(), logits.contiguous()
    pred = torch.empty(B, N, dtype=torch.long)
    accept_len, best, nxt = (torch.empty(B, dtype=torch.long) for _ in range(3))
    nodes, emitted = torch.empty(B, D1, dtype=torch.long), torch.empty(B, D1, dtype=torch.long)
    paths_ok = ext.greedy_accept(tokens.data_ptr(), logits.data_ptr(), r.data_ptr(),
                                 P * D1 if r.dim() == 3 and r.shape[0] > 1 else 0, r.shape[0] if r.dim() == 3 else 1,
                                 pred.data_ptr(), accept_len.data_ptr(), best.data_ptr(), nodes.data_ptr(),
                                 nxt.data_ptr(), emitted.data_ptr(), B, N, logits.shape[-1], P, D1, code,
                                 kernel_threads())
    if not paths_ok:
        return NotImplemented                  # node ids the reference rejects with its own error
    from ..acceptance import AcceptResult
    return AcceptResult(accept_len, best, nodes, nxt, emitted)


# ---- trees ---------------------------------------------------------------------------------------------
def dynamic_tree(root, values, indices, num_nodes: int):
    ext = load_extension()
    if (ext is None or values.dim() != 3 or values.dtype != torch.float32 or indices.shape != values.shape
            or indices.dtype != torch.long or root.shape != values.shape[:1] or root.dtype != torch.long
            or not _cpu(root, values, indices) or values.numel() == 0 or num_nodes < 2):
        return NotImplemented
    B, K, k = values.shape
    N, D = num_nodes, min(K, num_nodes - 1)
    tokens, depth, parent, rank = (torch.empty(B, N, dtype=torch.long) for _ in range(4))
    bits = torch.empty(B, N, dtype=torch.long) if N <= 64 else None
    mask = torch.empty(B, N, N, dtype=torch.bool)
    retrieve = torch.empty(B, N - 1, D + 1, dtype=torch.long)
    values, indices, root = values.contiguous(), indices.contiguous(), root.contiguous()
    if not ext.dynamic_tree(values.data_ptr(), indices.data_ptr(), root.data_ptr(), B, K, k, N, tokens.data_ptr(),
                            depth.data_ptr(), parent.data_ptr(), rank.data_ptr(),
                            bits.data_ptr() if bits is not None else 0, mask.data_ptr(), retrieve.data_ptr()):
        return NotImplemented                  # a NaN score: the reference's sort orders it
    return tokens, depth, parent, rank, bits, mask, retrieve


# ---- products with quantized weights ------------------------------------------------------------------
GROUP = 32            # input values per 4-bit group and per int8 activation scale (quant_matmul.h kQuantGroup)
COL_BLOCK = 16        # output columns per vector of the kernel
COL_PAD = 64          # packed columns are padded to a multiple of this (the widest column tile)


@dataclass
class PackedWeights:
    """A layer's weights in the kernel's layout (csrc/cpu/quant_matmul.h). bits 4: codes [N_pad/16, K/32, 4, 64]
    uint8 (two 4-bit codes a byte), scales [N_pad/16, K/32, 2, 16] fp16 (s, z: w = code * s + z); bits 8: codes
    [N_pad/16, K/4, 64] uint8 (w + 128), scales [N_pad] fp32 (w = code * scale per column)."""
    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    n: int
    k: int


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def pack_int4(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> PackedWeights | None:
    """codes [N, K] in 0..15, s and z [N, K/32] (w = code * s + z per group of 32 along K) -> PackedWeights, or
    None when the extension is absent or a scale does not fit fp16 (the layer then runs torch's kernel)."""
    N, K = codes.shape
    if load_extension() is None or K % GROUP or s.shape != (N, K // GROUP) or z.shape != s.shape:
        return None
    s16, z16 = s.to(torch.float16), z.to(torch.float16)
    if not (torch.isfinite(s16).all() and torch.isfinite(z16).all()):
        return None
    n_pad = -(-N // COL_PAD) * COL_PAD
    G = K // GROUP
    q = _pad_rows(codes.to(torch.uint8), n_pad).view(n_pad // COL_BLOCK, COL_BLOCK, G, 4, 2, 4)
    q = q.permute(0, 2, 3, 1, 5, 4)                       # [block, g, chunk, column, j, low/high]
    packed = (q[..., 0] | (q[..., 1] << 4)).reshape(n_pad // COL_BLOCK, G, 4, 64).contiguous()
    sz = torch.stack([_pad_rows(s16, n_pad), _pad_rows(z16, n_pad)], -1)   # [N_pad, G, 2]
    sz = sz.view(n_pad // COL_BLOCK, COL_BLOCK, G, 2).permute(0, 2, 3, 1).contiguous()
    return PackedWeights(4, packed, sz, N, K)


def pack_int8(codes: torch.Tensor, scale: torch.Tensor) -> PackedWeights | None:
    """codes [N, K] int8 in -127..127, scale [N] (w = code * scale per row) -> PackedWeights, or None without
    the extension."""
    N, K = codes.shape
    if load_extension() is None or K % GROUP or scale.shape != (N,):
        return None
    n_pad = -(-N // COL_PAD) * COL_PAD
    u = (_pad_rows(codes.to(torch.int16), n_pad) + 128).to(torch.uint8)
    packed = u.view(n_pad // COL_BLOCK, COL_BLOCK, K // 4, 4).permute(0, 2, 1, 3).reshape(
        n_pad // COL_BLOCK, K // 4, 64).contiguous()
    return PackedWeights(8, packed, _pad_rows(scale.float(), n_pad).contiguous(), N, K)


def unpack(p: PackedWeights):
    """The inverse of pack_int4 (codes [N, K] int32, s, z [N, K/32] fp32) and pack_int8 (codes [N, K] int8,
    scale [N] fp32)."""
    nb = p.codes.shape[0]
    if p.bits == 8:
        u = p.codes.view(nb, p.k // 4, COL_BLOCK, 4).permute(0, 2, 1, 3).reshape(nb * COL_BLOCK, p.k)
        return (u[:p.n].to(torch.int16) - 128).to(torch.int8), p.scales[:p.n].clone()
    G = p.k // GROUP
    b = p.codes.view(nb, G, 4, COL_BLOCK, 4)
    q = torch.stack([b & 15, b >> 4], -1)                 # [block, g, chunk, column, j, low/high]
    codes = q.permute(0, 3, 1, 2, 5, 4).reshape(nb * COL_BLOCK, p.k)[:p.n].to(torch.int32)
    sz = p.scales.permute(0, 3, 1, 2).reshape(nb * COL_BLOCK, G, 2)[:p.n].float()
    return codes, sz[..., 0].contiguous(), sz[..., 1].contiguous()


def packed_linear(x, packed: PackedWeights, bias=None):
    """x [..., K] @ the packed weights' w.T (+ bias) -> [..., N] in x's dtype; NotImplemented where the kernel
    cannot run."""
    ext, code = load_extension(), _CODES.get(x.dtype)
    if packed is None or ext is None or code is None or x.device.type != "cpu" or x.shape[-1] != packed.k:
        return NotImplemented
    flat = x.reshape(-1, packed.k)
    if flat.stride(-1) != 1 or (flat.shape[0] > 1 and flat.stride(0) < packed.k):
        flat = flat.contiguous()
    rows = flat.shape[0]
    out = torch.empty(rows, packed.n, dtype=x.dtype)
    if rows:
        ext.quant_linear(packed.bits, flat.data_ptr(), flat.stride(0) if rows > 1 else packed.k, rows, packed.k,
                         code, packed.codes.data_ptr(), packed.scales.data_ptr(), packed.n, out.data_ptr(),
                         packed.n, kernel_threads())
    out = out.view(*x.shape[:-1], packed.n)
    return out if bias is None else out + bias


def quant_linear(x, layer):
    return packed_linear(x, getattr(layer, "_packed_native", None), layer.bias)


# ---- a 4-bit model's decoder layers in one call ---------------------------------------------------------
STACK_ROWS = 64       # tokens per decoder_layers call: one uint64 of ancestor bits per token


def stack_runs(layers, final_norm, cfg, dtype, owner) -> bool:
    """Whether decoder_layers runs these layers (all 4-bit codes of the cpu kernel, under the cpu backend)."""
    from . import backend
    return (load_extension() is not None and dtype in _CODES
            and backend.resolve("quant_linear", torch.device("cpu")) == BACKEND
            and _layer_table(layers, final_norm, cfg, dtype, owner) is not None)


def _gemma_scale(norm) -> torch.Tensor:
    """A GemmaRMSNorm as decoder.h's RMSNorm weight: (1 + w) * out_scale in fp32. For fp32 activations the two
    norms are one computation (x * rsqrt(mean(x^2) + eps) times that scale); bf16 would round where Gemma does not."""
    return ((1.0 + norm.weight.detach().float()) * norm.out_scale).contiguous()


LAYER_FIELDS = 17      # decoder.h kLayerFields


def _layer_table(layers, final_norm, cfg, dtype, owner):
    """[L, 17] int64 addresses of each layer's norms and packed weights, of its q/k/v bias and q/k norms or 0, of
    Gemma 3's post-attention and post-MLP norms or 0, its sliding flag and which linears are int8 rows rather than
    4-bit groups (decoder.h LayerField order), cached on
    `owner`; None when a layer is not all 4-bit or int8 codes of the cpu kernel (or shapes, dtypes or eps do not fit, or wo
    has a bias). Gemma 3's (1 + w) norms go in as fp32 scales (_gemma_scale), kept alive with the table; Gemma only
    in fp32 (its norms round once, the stack's twice in bf16)."""
    gemma = getattr(cfg, "gemma", False)
    if (gemma and dtype != torch.float32) or getattr(cfg, "moe_layers", ()):
        return None             # mixture-of-experts layers (model.MoEFeedForward): the Python layer loop runs them
    first, last = layers[0], layers[-1]
    key = (dtype, len(layers), id(first), id(getattr(first.attention.wqkv, "_packed_native", None)),
           id(getattr(last.feed_forward.w2, "_packed_native", None)), final_norm.weight.data_ptr())
    tables = owner.__dict__.setdefault("_cpu_decoder_tables", {})
    if key in tables:
        return tables[key]
    fields = getattr(load_extension(), "decoder_layer_fields", None)
    if fields is None or fields() != LAYER_FIELDS:      # built from older sources: rebuild (pip install -e .)
        tables[key] = None
        return None
    rows, table, keep = [], None, []
    eps = {final_norm.eps}
    shapes = ((cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim), (cfg.n_heads * cfg.head_dim, cfg.dim),
              (cfg.dim, 2 * cfg.intermediate_size), (cfg.intermediate_size, cfg.dim))
    for layer in layers:
        att, ffn = layer.attention, layer.feed_forward
        linears = (att.wqkv, att.wo, ffn.w13, ffn.w2)
        packed = [getattr(m, "_packed_native", None) for m in linears]
        q_norm, k_norm = getattr(att, "q_norm", None), getattr(att, "k_norm", None)      # Qwen3's, Gemma's
        post = (None, None)
        if gemma:
            norms = (_gemma_scale(layer.attention_norm), _gemma_scale(layer.ffn_norm))
            extras = (att.wqkv.bias, _gemma_scale(q_norm), _gemma_scale(k_norm))
            post = (_gemma_scale(layer.post_attention_norm), _gemma_scale(layer.post_ffn_norm))
            keep += [*norms, *extras[1:], *post]
            eps |= {layer.post_attention_norm.eps, layer.post_ffn_norm.eps}
        else:
            norms = (layer.attention_norm.weight, layer.ffn_norm.weight)
            extras = (att.wqkv.bias, None if q_norm is None else q_norm.weight,
                      None if k_norm is None else k_norm.weight)
        if (any(p is None or p.bits not in (4, 8) or (p.k, p.n) != s for p, s in zip(packed, shapes))
                or any(m.bias is not None for m in linears[1:]) or (q_norm is None) != (k_norm is None)
                or any(w is not None and (w.dtype != dtype or not w.is_contiguous()) for w in norms + extras)):
            break
        eps |= {layer.attention_norm.eps, layer.ffn_norm.eps} | ({q_norm.eps, k_norm.eps} if q_norm else set())
        row = [norms[0].data_ptr()]
        for p in packed[:2]:
            row += [p.codes.data_ptr(), p.scales.data_ptr()]
        row.append(norms[1].data_ptr())
        for p in packed[2:]:
            row += [p.codes.data_ptr(), p.scales.data_ptr()]
        row += [0 if t is None else t.data_ptr() for t in extras]
        row += [0 if t is None else t.data_ptr() for t in post] + [int(getattr(att, "sliding", False))]
        row.append(sum(1 << j for j, p in enumerate(packed) if p.bits == 8))       # decoder.h kInt8Mask
        rows.append(row)
    else:
        final = _gemma_scale(final_norm) if gemma else final_norm.weight
        if len(eps) == 1 and final.dtype == dtype and final.is_contiguous():
            table = torch.tensor(rows, dtype=torch.long)
            table.final_norm, table.keep = final, keep + [final]    # alive as long as the table's addresses
    tables[key] = table
    return table


def decoder_layers(layers, final_norm, cfg, x, rope_rows, k, v, prefix_len, bits, owner, rope_local=None):
    """model.Block layers one after another (Block.forward with each layer's add + norm fused with the next's, as
    Transformer.forward runs them) over x [B, T, d], in one call of csrc/cpu/decoder.h, in place: returns (x, h)
    with h = final_norm(x) (final_norm None: h is not wanted). k, v: these layers' cache buffers [L, B_max, H_kv,
    S, D]; bits: ancestor-or-self bits [B or 1, T] long (ops.tree_mask_args), T <= 64; owner: where the weights'
    address table is cached (the model). The sliding layers' window comes from cfg (real_window) and the layers;
    Gemma 3: rope_local, its sliding layers' RoPE rows (its post-norms come from cfg and the layers). For 4-bit
    layers (cpu_quant with this extension) under the cpu backend; NotImplemented otherwise (the caller runs its
    layer loop)."""
    from . import backend
    ext, code = load_extension(), _CODES.get(x.dtype)
    if ext is None or code is None or x.dim() != 3 or x.device.type != "cpu" or not x.is_contiguous():
        return NotImplemented
    B, T, d = x.shape
    if (T > STACK_ROWS or backend.resolve("quant_linear", x.device) != BACKEND
            or (torch.is_grad_enabled() and x.requires_grad)
            or not isinstance(bits, torch.Tensor) or bits.dtype != torch.long or bits.shape[-1] != T
            or bits.reshape(-1, T).shape[0] not in (1, B) or k.dtype != x.dtype or v.dtype != x.dtype
            or not (k.is_contiguous() and v.is_contiguous()) or k.shape[0] != len(layers) or B > k.shape[1]
            or k.shape != v.shape or rope_rows.dtype != torch.float32 or rope_rows.shape[-2:] != (T, k.shape[-1])
            or prefix_len.dtype != torch.long or prefix_len.shape != (B,)):
        return NotImplemented
    norm = final_norm if final_norm is not None else layers[0].attention_norm
    table = _layer_table(layers, norm, cfg, x.dtype, owner)
    if table is None:
        return NotImplemented
    # Only a config with NoPE layers looks at each layer (module attribute lookups: ~1 us a layer, every step)
    ropes = [getattr(layer.attention, "use_rope", True) for layer in layers] if getattr(cfg, "nope_layers", ()) \
        else [True]
    if any(ropes) and not all(ropes):
        # SmolLM3's NoPE layers: the C++ stack takes one RoPE table for all its layers, so runs of layers alike are
        # stacked one after another. Refused here, they took the Python layer loop, whose one padded prefill made a
        # 4-bit batch row differ from the same prompt alone (the stack's exactness, README), at that loop's speed.
        start = 0
        for end in range(1, len(layers) + 1):
            if end < len(layers) and ropes[end] == ropes[start]:
                continue
            out = decoder_layers(layers[start:end], final_norm if end == len(layers) else None, cfg, x, rope_rows,
                                 k[start:end], v[start:end], prefix_len, bits, owner)
            assert out is not NotImplemented, "a run of the layers the whole stack took was refused"
            start = end
        return out
    if not any(ropes):                  # NoPE layers: rows that rotate by nothing
        from ..model import no_rotation
        rope_rows = no_rotation(rope_rows)
    L, B_max, H_kv, S, D = k.shape
    bits = bits.reshape(-1, T).contiguous()
    rope_rows = rope_rows.contiguous()
    prefix_len = prefix_len.contiguous()
    h = torch.empty_like(x)
    gemma = getattr(cfg, "gemma", False)
    if gemma and rope_local is not None:
        rope_local = rope_local.contiguous()
        assert rope_local.shape == rope_rows.shape
    ext.decoder_layers(x.data_ptr(), h.data_ptr(), table.data_ptr(), table.final_norm.data_ptr(),
                       rope_rows.data_ptr(), T * D if rope_rows.shape[0] > 1 else 0, k.data_ptr(), v.data_ptr(),
                       prefix_len.data_ptr(), bits.data_ptr(), T if bits.shape[0] > 1 else 0, L, B, T, d, cfg.n_heads,
                       H_kv, D, cfg.intermediate_size, B_max, S, norm.eps, code, kernel_threads(),
                       rope_local.data_ptr() if gemma and rope_local is not None else 0,
                       getattr(cfg, "real_window", None) or 0, gemma)
    return x, h
