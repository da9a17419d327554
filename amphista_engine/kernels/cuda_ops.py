"""The `cuda` backend: the ops the CUDA extension `_C` implements (csrc/*.cuh), same signatures as `ops`.

Each function checks what its kernel takes (CUDA tensors on one device, dtypes, shapes, strides and the
alignment of 16-byte accesses) and returns NotImplemented otherwise, so the dispatcher falls through to the
next backend (triton, then the torch reference) instead of raising. Ops missing here (typical_accept) fall
through the same way. The extension takes raw device pointers, element strides and the current stream of the
tensors' device, so every launch orders correctly with torch's own work and is captured by CUDA graphs.
Matmuls stay with cuBLAS (torch): the kernels here fuse what surrounds them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .._ext import DTYPE_CODES, load_extension
from . import split_merge

BACKEND = "cuda"

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TREE_HEAD_DIMS = (64, 128)        # compiled tree-attention instantiations
MAX_TREE = 64                     # one uint64 ancestor row per node
MAX_AEB_SLOTS, MAX_AEB_HEAD_DIM = 64, 256
COMPACT_SMEM = 48 * 1024          # kv_compact stages one head's moved rows in shared memory
CHUNK = 64                        # keys per tree-attention iteration (split-K granularity)
MAX_SCALE = 1e6                   # the bindings take softmax scales in [0, 1e6] and raise ValueError otherwise

_sm_count: dict[int, int] = {}


def _code(t: torch.Tensor) -> int:
    return DTYPE_CODES[str(t.dtype).removeprefix("torch.")]


def _on(dev: torch.device, *ts) -> bool:
    """Every tensor given (None skipped) lives on the CUDA device `dev`."""
    return dev.type == "cuda" and all(t is None or (isinstance(t, torch.Tensor) and t.device == dev) for t in ts)


def _aligned(t: torch.Tensor, nbytes: int = 16) -> bool:
    return t.data_ptr() % nbytes == 0


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """Element strides of all dims but the last; a size-1 dim's stride is arbitrary in torch, so it is 0."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape[:-1], t.stride()[:-1]))


def _scale_ok(scale: float) -> bool:
    return math.isfinite(scale) and 0 <= scale <= MAX_SCALE


class _Launch:
    """`with _Launch(dev) as (ext, stream):` the extension and the handle of torch's current stream on dev,
    with dev made current only when it is not already (entering torch.cuda.device costs microseconds)."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.guard = None

    def __enter__(self):
        idx = self.dev.index if self.dev.index is not None else torch.cuda.current_device()
        if idx != torch.cuda.current_device():
            self.guard = torch.cuda.device(idx)
            self.guard.__enter__()
        return load_extension(), torch.cuda.current_stream(idx).cuda_stream

    def __exit__(self, *exc):
        if self.guard is not None:
            self.guard.__exit__(*exc)
        return False


_capable: dict[int, bool] = {}


def _ready(dev) -> bool:
    if dev.type != "cuda" or load_extension() is None:
        return False
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _capable:
        # The kernels use sm_80 features (cp.async, bf16 mma) and are built for 8.0+ (AMPHISTA_CUDA_ARCH): an
        # older GPU (a T4, sm_75) raised "no kernel image" instead of falling through to triton / torch.
        _capable[idx] = torch.cuda.get_device_capability(idx) >= (8, 0)
    return _capable[idx]


# ---- attention -----------------------------------------------------------------------------------------
def num_splits(batch_heads: int, row_tiles: int, kv_len: int, device) -> int:
    """Split-K factor for tree attention: enough blocks for ~2 waves of the GPU's SMs, but at least two
    64-key chunks per split (each split costs a partial write and a share of the merge)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    blocks = batch_heads * row_tiles
    chunks = -(-kv_len // CHUNK)
    want = -(-2 * _sm_count[idx] // blocks)
    return max(1, min(want, chunks // 2, 64))


def _tree_bits(new_mask: torch.Tensor, B: int, N: int):
    """(bits [B or 1, N] int64 contiguous, batch stride) from either mask form, or None if unusable."""
    if new_mask.dtype == torch.bool:
        if new_mask.shape[-2:] != (N, N) or new_mask.dim() not in (2, 3):
            return None
        bits = (new_mask.reshape(-1, N, N).long() << torch.arange(N, device=new_mask.device)).sum(-1)
    elif new_mask.dtype == torch.int64 and new_mask.dim() in (1, 2) and new_mask.shape[-1] == N:
        bits = new_mask.reshape(-1, N).contiguous()
    else:
        return None
    if bits.shape[0] not in (1, B):
        return None
    return bits, (0 if bits.shape[0] == 1 else N)


def tree_attention(q, k_cache, v_cache, prefix_len, new_mask, kv_len: int, scale: Optional[float] = None,
                   dense_mask=None, splits: Optional[int] = None, order=None, merge: Optional[str] = None,
                   window: Optional[int] = None, positions=None):
    """splits: the split-K factor (None = num_splits' heuristic; open for benchmarks/kernels/tune.py).
    window, positions: ops.tree_attention's sliding window; the splits then share about window + N keys.
    order: the row-invariant path (kernels/gpu_exact.py) is Triton's only, so this declines it.
    merge: how splits merge, "auto" | "kernel" | "launch" (kernels/split_merge.py); None = its default."""
    dev = q.device
    if order is not None or not _ready(dev) or q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        return NotImplemented
    B, H, N, D = q.shape
    Bk, Hkv, S, Dk = k_cache.shape
    if (q.dtype not in HALF or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or Dk != D
            or D not in TREE_HEAD_DIMS or not 1 <= N <= MAX_TREE or Bk < B or H % Hkv or B == 0
            or B * Hkv > 65535                   # the kernel's grid y: the binding refuses more, the others take it
            or not isinstance(kv_len, int) or not 1 <= kv_len <= S
            or not _on(dev, k_cache, v_cache, prefix_len, new_mask)):
        return NotImplemented
    # 32-bit fragment loads of q, 16-byte loads of K/V: strides in elements must allow them.
    qs, ks, vs = _strides(q), _strides(k_cache), _strides(v_cache)
    if (q.stride(3) != 1 or any(s % 2 for s in qs) or not _aligned(q, 4)
            or k_cache.stride(3) != 1 or any(s % 8 for s in ks) or not _aligned(k_cache)
            or v_cache.stride(3) != 1 or any(s % 8 for s in vs) or not _aligned(v_cache)):
        return NotImplemented
    if prefix_len.dim() != 1 or prefix_len.shape[0] != B:
        return NotImplemented
    got = _tree_bits(new_mask, B, N)
    if got is None:
        return NotImplemented
    bits, bits_sb = got
    span = kv_len
    pos, pos_sb = None, 0
    if window is not None:
        if positions.shape[0] not in (1, B) or not _on(dev, positions):
            return NotImplemented
        pos = positions.reshape(-1, N).to(torch.int64).contiguous()
        pos_sb = N if pos.shape[0] > 1 else 0
        span = min(kv_len, window + N + 64)        # the kernel's key span past the window's start chunk
    prefix = prefix_len if prefix_len.dtype == torch.int64 and prefix_len.is_contiguous() else \
        prefix_len.to(torch.int64).contiguous()
    scale = D ** -0.5 if scale is None else float(scale)
    if not _scale_ok(scale):
        return NotImplemented
    G = H // Hkv
    if splits is None:
        splits = num_splits(B * Hkv, -(-G * N // 64), span, dev)
    merge = split_merge.resolve(merge, G * N, splits=splits)
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=dev)
    rows = B * N * H
    work_o = work_ml = counters = None
    if splits > 1:
        work_o = torch.empty(splits, rows, D, dtype=torch.float32, device=dev)
        work_ml = torch.empty(2, splits, rows, dtype=torch.float32, device=dev)
        if merge == "kernel":                                  # one counter per (request, KV head, 64-row tile)
            counters = split_merge.arrival_counters(dev, B * Hkv * -(-G * N // 64))
    with _Launch(dev) as (ext, stream):
        ext.tree_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), prefix.data_ptr(), bits.data_ptr(),
                           out.data_ptr(), 0 if work_o is None else work_o.data_ptr(),
                           0 if work_ml is None else work_ml.data_ptr(),
                           0 if counters is None else counters.data_ptr(), B, H, Hkv, N, D, kv_len, S,
                           qs, ks, vs, bits_sb, splits, scale, _code(q), stream,
                           0 if pos is None else pos.data_ptr(), pos_sb, 0 if window is None else int(window))
    return out.transpose(1, 2)


def head_attention(z, pos_emb, norm_w, eps: float, wqkv, n_heads: int, scale: Optional[float] = None):
    dev = z.device
    if not _ready(dev) or z.dim() != 3 or z.dtype not in FLOATS or not isinstance(n_heads, int) or n_heads < 1:
        return NotImplemented
    if scale is not None and not _scale_ok(float(scale)):   # the other backends take it: fall through to them
        return NotImplemented
    N, K, d = z.shape
    if (d % n_heads or not 1 <= K <= MAX_AEB_SLOTS or d // n_heads > MAX_AEB_HEAD_DIM or N == 0
            or norm_w.dtype != z.dtype or wqkv.dtype != z.dtype or tuple(norm_w.shape) != (d,)
            or tuple(wqkv.shape) != (3 * d, d) or not _on(dev, pos_emb, norm_w, wqkv)
            or (pos_emb is not None and (pos_emb.dtype != z.dtype or tuple(pos_emb.shape) != (K, d)))):
        return NotImplemented
    if pos_emb is None:
        x, h = z, rmsnorm(z.contiguous(), norm_w.contiguous(), eps)
    else:                                                  # one launch: pos_emb [K, d] repeats over the requests
        got = add_rmsnorm(z.contiguous(), pos_emb.contiguous(), norm_w.contiguous(), eps)
        x, h = (z, got) if got is NotImplemented else got
    if h is NotImplemented:
        return NotImplemented
    qkv = F.linear(h, wqkv).contiguous()                   # [N, K, 3d]: q | k | v, heads concatenated
    hd = d // n_heads
    out = torch.empty(N, K, d, dtype=z.dtype, device=dev)
    with _Launch(dev) as (ext, stream):
        ext.head_attention(qkv.data_ptr(), out.data_ptr(), N, K, n_heads, hd,
                           float(hd ** -0.5 if scale is None else scale), _code(z), stream)
    return x, out


# ---- staged adaptation input ---------------------------------------------------------------------------
def fused_sal_input(hidden, tokens, emb_weight, w_fuse):
    dev = hidden.device
    if not _ready(dev) or hidden.dim() < 1 or w_fuse.dim() != 2 or emb_weight.dim() != 2:
        return NotImplemented
    d = hidden.shape[-1]
    if (tuple(w_fuse.shape) != (d, 2 * d) or w_fuse.dtype not in FLOATS or emb_weight.dtype != w_fuse.dtype
            or emb_weight.shape[1] != d or hidden.dtype not in FLOATS or tokens.shape != hidden.shape[:-1]
            or tokens.dtype not in (torch.int64, torch.int32) or not emb_weight.is_contiguous()
            or not _on(dev, tokens, emb_weight, w_fuse)):
        return NotImplemented
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, d).contiguous()
    tok = tokens.reshape(-1).to(torch.int64).contiguous()
    M = h.shape[0]
    if M == 0:
        return NotImplemented
    cat = torch.empty(M, 2 * d, dtype=w_fuse.dtype, device=dev)
    with _Launch(dev) as (ext, stream):
        ext.sal_concat(h.data_ptr(), _code(h), tok.data_ptr(), emb_weight.data_ptr(), cat.data_ptr(), _code(cat),
                       M, d, emb_weight.shape[0], stream)
    return F.linear(cat, w_fuse).view(*lead, d)


# ---- norms and RoPE ------------------------------------------------------------------------------------
def _row_op_ok(x, w) -> bool:
    return (x.dim() >= 1 and x.dtype in FLOATS and w.dtype == x.dtype and tuple(w.shape) == (x.shape[-1],)
            and x.is_contiguous() and w.is_contiguous() and x.numel() > 0 and _on(x.device, w)
            and x.numel() // x.shape[-1] < 2 ** 31)


def rmsnorm(x, w, eps: float):
    if not _ready(x.device) or not _row_op_ok(x, w) or not math.isfinite(eps) or eps < 0:
        return NotImplemented
    from .._ext import rmsnorm_cuda
    return rmsnorm_cuda(x, w, eps)


def add_rmsnorm(x, residual, w, eps: float):
    if (not _ready(x.device) or not _row_op_ok(x, w) or residual.dtype != x.dtype or not residual.is_contiguous()
            or not _on(x.device, residual) or not math.isfinite(eps) or eps < 0):
        return NotImplemented
    # residual: x's shape, or the trailing [T, d] repeated over x's leading dims (row r adds row r % T)
    if residual.shape != x.shape and not (residual.dim() == 2 and x.dim() >= 2 and residual.shape == x.shape[-2:]):
        return NotImplemented
    d = x.shape[-1]
    s, y = torch.empty_like(x), torch.empty_like(x)
    with _Launch(x.device) as (ext, stream):
        ext.add_rmsnorm(x.data_ptr(), residual.data_ptr(), w.data_ptr(), s.data_ptr(), y.data_ptr(),
                        x.numel() // d, residual.numel() // d, d, float(eps), _code(x), stream)
    return s, y


def rope(x, rope_rows):
    dev = x.device
    if not _ready(dev) or x.dim() != 4 or x.dtype not in FLOATS or rope_rows.dim() != 3:
        return NotImplemented
    B, T, H, D = x.shape
    if (D % 2 or x.stride(3) != 1 or rope_rows.dtype != torch.float32 or rope_rows.shape[1:] != (T, D)
            or rope_rows.shape[0] not in (1, B) or not rope_rows.is_contiguous() or x.numel() == 0
            or not _on(dev, rope_rows)):
        return NotImplemented
    out = torch.empty(B, T, H, D, dtype=x.dtype, device=dev)
    with _Launch(dev) as (ext, stream):
        ext.rope(x.data_ptr(), rope_rows.data_ptr(), out.data_ptr(), B, T, H, D, _strides(x),
                 0 if rope_rows.shape[0] == 1 else T * D, _code(x), stream)
    return out


# ---- KV cache ------------------------------------------------------------------------------------------
def _cache_ok(k_buf, v_buf) -> bool:
    return (k_buf.dim() == 5 and k_buf.shape == v_buf.shape and k_buf.dtype == v_buf.dtype
            and k_buf.dtype in FLOATS and k_buf.is_contiguous() and v_buf.is_contiguous())


def kv_write(k_buf, v_buf, layer: int, start, k, v):
    dev = k.device
    if not _ready(dev) or not _cache_ok(k_buf, v_buf) or k.dim() != 4 or v.shape != k.shape:
        return NotImplemented
    L, Bmax, H, S, D = k_buf.shape
    B, Hk, T, Dk = k.shape
    if (Hk != H or Dk != D or not 1 <= B <= Bmax or T == 0 or k.dtype != k_buf.dtype or v.dtype != k_buf.dtype
            or k.stride(3) != 1 or v.stride(3) != 1 or not isinstance(layer, int) or not 0 <= layer < L
            or start.dim() != 1 or start.shape[0] != B or not _on(dev, k_buf, v_buf, start, v)):
        return NotImplemented
    start = start if start.dtype == torch.int64 and start.is_contiguous() else start.to(torch.int64).contiguous()
    with _Launch(dev) as (ext, stream):
        ext.kv_write(k_buf.data_ptr(), v_buf.data_ptr(), start.data_ptr(), k.data_ptr(), v.data_ptr(), layer, L,
                     Bmax, B, H, T, S, D, _strides(k), _strides(v), _code(k), stream)
    return None


def kv_compact(k_buf, v_buf, src, dst_start):
    dev = k_buf.device
    if not _ready(dev) or not _cache_ok(k_buf, v_buf) or src.dim() != 2:
        return NotImplemented
    L, Bmax, H, S, D = k_buf.shape
    B, M = src.shape
    if (not 1 <= B <= Bmax or M == 0 or dst_start.dim() != 1 or dst_start.shape[0] != B
            or M * D * k_buf.element_size() > COMPACT_SMEM or L * B * H >= 2 ** 31
            or not _on(dev, v_buf, src, dst_start)):
        return NotImplemented
    src = src if src.dtype == torch.int64 and src.is_contiguous() else src.to(torch.int64).contiguous()
    dst_start = dst_start if dst_start.dtype == torch.int64 and dst_start.is_contiguous() else \
        dst_start.to(torch.int64).contiguous()
    with _Launch(dev) as (ext, stream):
        ext.kv_compact(k_buf.data_ptr(), v_buf.data_ptr(), src.data_ptr(), dst_start.data_ptr(), L, Bmax, B, H, S,
                       D, M, _code(k_buf), stream)
    return None


# ---- acceptance ----------------------------------------------------------------------------------------
def greedy_accept(tokens, logits, retrieve):
    dev = tokens.device
    if not _ready(dev) or tokens.dim() != 2 or logits.dim() != 3 or retrieve.dim() not in (2, 3):
        return NotImplemented
    B, N = tokens.shape
    V = logits.shape[-1]
    P, D1 = retrieve.shape[-2:]
    if (logits.shape[:2] != tokens.shape or logits.dtype not in FLOATS or tokens.dtype != torch.int64
            or retrieve.dtype != torch.int64 or B == 0 or N == 0 or V == 0 or P == 0 or D1 == 0 or D1 > 1024
            or P > 2 ** 24 or B * N >= 2 ** 31 or (retrieve.dim() == 3 and retrieve.shape[0] not in (1, B))
            or logits.stride(2) != 1 or not _on(dev, logits, retrieve)):
        return NotImplemented
    # The kernel addresses node row i = b * N + n as i * row_stride.
    row_stride = logits.stride(1) if N > 1 else (logits.stride(0) if B > 1 else V)
    if (B > 1 and N > 1 and logits.stride(0) != N * row_stride) or row_stride < V:
        return NotImplemented
    tokens = tokens.contiguous()
    retrieve = retrieve.contiguous()
    retrieve_sb = P * D1 if retrieve.dim() == 3 and retrieve.shape[0] == B and B > 1 else 0
    # One allocation for the workspace and every output; the fields are views of it.
    buf = torch.empty(B * (N + 3 + 2 * D1), dtype=torch.int64, device=dev)
    pred, accept_len, best, nxt, nodes, emitted = buf.split([B * N, B, B, B, B * D1, B * D1])
    with _Launch(dev) as (ext, stream):
        ext.greedy_accept(tokens.data_ptr(), logits.data_ptr(), retrieve.data_ptr(), pred.data_ptr(),
                          accept_len.data_ptr(), best.data_ptr(), nodes.data_ptr(), nxt.data_ptr(),
                          emitted.data_ptr(), B, N, V, P, D1, row_stride, retrieve_sb, _code(logits), stream)
    from ..acceptance import AcceptResult
    return AcceptResult(accept_len, best, nodes.view(B, D1), nxt, emitted.view(B, D1))
