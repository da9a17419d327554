"""A compact Llama-family transformer (RMSNorm, RoPE with Llama-3 scaling, GQA, SwiGLU or a mixture of SwiGLU
experts).

Every forward names its tokens' positions and, when a KV cache is given, writes their K/V to the slots
right after each row's current cache length. Which earlier tokens a new token may see is given by
`AttentionSpec`: the whole cached prefix plus a [T, T] mask over the new tokens themselves. A causal
mask gives ordinary prefill/decoding, an ancestor mask gives tree verification; the same code serves both.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kernels import cpu_exact, cpu_ops, cpu_packed, gpu_exact, ops, reference, routed_linear
from .kv_cache import KVCache


@dataclass
class AttentionSpec:
    """Where the new tokens go and what they attend to.

    prefix_len: [B] long, device. Cached tokens every new token sees; new K/V go to slots prefix_len + i.
    new_mask:   [B or 1, T, T] bool. new_mask[b, i, j]: new token i sees new token j.
    kv_len:     host int >= max(prefix_len) + T. Only cache slots [0, kv_len) are read; a bucketed upper
                bound so attention cost tracks the real length without a device->host sync.
    decode:     a decoding step (plain or tree verification), whose tokens must come out the same whatever
                the slot layout: bf16 on the CPU then sums keys in position order (kernels/cpu_exact.py).
                Prefills, shared by every decoder, leave it False.
    """
    prefix_len: torch.Tensor
    new_mask: torch.Tensor
    kv_len: int
    decode: bool = False
    # The caller's promise that prefix_len is 0 in every row and new_mask is causal_mask(T): a prefill into an
    # empty cache. Past the kernels' 64 rows such a forward attends through SDPA's causal path over the new
    # tokens' own slots: the dense [B, T, kv_len] mask it built is never made (with its bool temporaries, a fp32
    # batch of 4 around a 6k-token prompt peaked 850 MiB over the cache, now 130), and SDPA skips the masked half
    # of the scores (a 4k-token SmolLM2 prefill, quant='none', 1 thread: fp32 15.8 -> 10.5 s, bf16 5.3 -> 3.1 s).
    empty_prefix: bool = False
    # The caller's promise that prefix_len is this host int in every row (a chat turn's kept prefix r, batch 1) and
    # new_mask is causal_mask(T). Past 64 new tokens such a prefill attends bottom-right causally over slots
    # [0, r + T) (causal_after_prefix) instead of through the dense [B, T, kv_len] mask, and skips the masked half of
    # the new block: a ~2,000-token message after a 68-token exchange, SmolLM2 quant='none', 1 thread, fp32 5.75 ->
    # 4.5 s, bf16 1.85 -> 1.45 s (python_tests/test_long_turn_prefill_user_qa.py).
    kept_prefix: int | None = None

    def dense_mask(self) -> torch.Tensor:
        """[B, T, kv_len] bool over cache slots."""
        T = self.new_mask.shape[-1]
        slots = torch.arange(self.kv_len, device=self.prefix_len.device)
        rel = slots[None, :] - self.prefix_len[:, None]                       # [B, S]
        in_prefix = rel < 0
        in_new = (rel >= 0) & (rel < T)
        idx = rel.clamp(0, T - 1)[:, None, :].expand(-1, T, -1)
        new = torch.gather(self.new_mask.expand(rel.shape[0], -1, -1), 2, idx)
        return in_prefix[:, None, :] | (in_new[:, None, :] & new)


def causal_mask(T: int, device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril_()[None]


# The mask argument of a forward over AttentionSpec(empty_prefix=True) with more new tokens than the kernels' ancestor
# bits hold (64): causal attention over cache slots [0, T), where those tokens' own K/V were just written.
CAUSAL_PREFILL = "causal-prefill"
CAUSAL_PREFILL_FROM = 65
WINDOW_PREFILL_CHUNK = 1024      # tokens per forward of a prompt when the cache reaches past a sliding window


def prefill_mask_args(spec: AttentionSpec, dtype):
    """The per-forward mask argument of a cached forward that is no decode step (ops.tree_mask_args), or
    CAUSAL_PREFILL for a long prefill into an empty cache (AttentionSpec.empty_prefix), CAUSAL_AFTER_PREFIX for one
    after a kept prefix (AttentionSpec.kept_prefix)."""
    if spec.empty_prefix and spec.new_mask.shape[-1] >= CAUSAL_PREFILL_FROM:
        return CAUSAL_PREFILL
    if spec.kept_prefix is not None and spec.new_mask.shape[-1] >= CAUSAL_PREFILL_FROM:
        return CAUSAL_AFTER_PREFIX
    return ops.tree_mask_args(spec.prefix_len, spec.new_mask, spec.kv_len, dtype)


# The mask argument of a forward over AttentionSpec(kept_prefix=r) past 64 new tokens: new token i sees cache slots
# [0, r + i] (causal_after_prefix), where the new tokens' own K/V were just written to [r, r + T).
CAUSAL_AFTER_PREFIX = "causal-after-prefix"
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def causal_after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: int) -> torch.Tensor:
    """q [B, H, T, D], k and v [B, H_kv, r + T, D] -> [B, H, T, D]: attention of new token i over slots [0, r + i].

    On the CPU: two flash calls, the r prefix slots unmasked and the new block causal, merged by their log-sum-exps
    (SDPA's bottom-right causal bias materializes a [T, r + T] mask per layer on the CPU, and its flash kernel does
    not skip masked blocks: per SmolLM2 layer at r = T = 2,000, fp32 154 ms dense, 169 bottom-right, 115 merged).
    Elsewhere (CUDA): SDPA with torch's bottom-right causal bias, which flash attention takes without a mask
    (K/V repeated per query head for GQA)."""
    T = q.shape[2]
    k, v = k[:, :, :r + T], v[:, :, :r + T]           # the cache's later slots hold stale or no tokens
    if r == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if q.device.type == "cpu" and _CPU_FLASH is not None and not torch.is_grad_enabled():
        try:
            o1, l1 = _CPU_FLASH(q, k[:, :, :r], v[:, :, :r], 0.0, False)
            o2, l2 = _CPU_FLASH(q, k[:, :, r:], v[:, :, r:], 0.0, True)
        except (RuntimeError, TypeError):   # a private op: a torch whose op takes no GQA (or other args) goes below
            pass
        else:
            lse = torch.logaddexp(l1, l2)[..., None]            # fp32 [B, H, T, 1]; the merge runs in fp32
            out = o1.float().mul_((l1[..., None] - lse).exp_())
            return out.add_(o2.float() * (l2[..., None] - lse).exp_()).to(q.dtype)
    from torch.nn.attention.bias import causal_lower_right
    if k.shape[1] != q.shape[1]:
        # the bias dispatches to the fused kernels' own ops, past SDPA's enable_gqa handling (memory-efficient
        # attention, fp32's CUDA kernel, takes no GQA): K/V repeated per query head instead
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, r + T))


@dataclass
class WindowMask:
    """The mask argument of a sliding layer in a forward whose keys reach past its window: bias [B, T, kv_len]
    (0 / -inf in the queries' dtype; [B, T, T] without a cache) that lets new token i see only the keys of positions
    > pos_i - window among what spec lets it see. Built once per forward, shared by the sliding layers, which then
    take SDPA (the reference path), where the kernels do not take the window (KernelWindow: the triton, cuda and
    cpu backends' decode and tree steps; the C++ layer stack windows its own, csrc/cpu/tree_attention.h)."""
    bias: torch.Tensor


def window_mask(spec: AttentionSpec | None, positions: torch.Tensor, window: int, T: int, dtype,
                cached: bool) -> WindowMask:
    """Cache slot s < prefix_len holds position s (prompts are right-padded, compaction moves accepted tokens to
    the slot of their position); new token j sits in slot prefix_len + j at positions[:, j]."""
    B = positions.shape[0]
    dev = positions.device
    if cached:
        seen = spec.dense_mask() & reference.window_keep(spec.prefix_len, positions, window, T, spec.kv_len)
    else:
        seen = (spec.new_mask if spec is not None else causal_mask(T, dev)).expand(B, T, T)
        key_pos = positions.expand(B, T)
        seen = seen & (key_pos[:, None, :] > key_pos[:, :, None] - window)
    return WindowMask(torch.zeros(seen.shape, dtype=dtype, device=dev).masked_fill_(~seen, float("-inf")))


@dataclass
class KernelWindow:
    """The mask argument of a sliding layer past its window where the triton / cuda / cpu backend runs tree
    attention: the forward's ancestor bits plus the window and the new tokens' positions, which the kernels apply
    themselves (ops.tree_attention's `window`), so no dense WindowMask is built and no layer falls back to SDPA."""
    bits: torch.Tensor          # [B or 1, N] int64 ancestor bits (ops.tree_mask_args, or the OrderedTree's)
    window: int
    positions: torch.Tensor     # [B or 1, N] int64
    order: gpu_exact.OrderedTree | None = None     # the row-invariant decode steps' layout, windowed alike


def kernel_window(mask, cache: KVCache | None, spec: AttentionSpec | None, positions, window: int | None,
                  ordered: bool) -> KernelWindow | None:
    """A KernelWindow for this forward's sliding layers where the kernels can take the window: a cached step past
    it whose mask is the kernels' ancestor bits (ops.tree_mask_args gave no dense mask) or the GPU's row-invariant
    layout (gpu_exact.OrderedTree), on the triton or cuda backend, or on the cpu backend where its kernel takes the
    window (fp32 / bf16, positions = prefix_len + depth: cpu_ops.takes_window). None elsewhere: the CPU's ordered
    steps window their own layout, the torch backend's dense mask and what the cpu kernel declines keep the
    WindowMask built once per forward, and prefill chunks (CAUSAL_*) and uncached forwards keep it too."""
    order = mask if isinstance(mask, gpu_exact.OrderedTree) else None
    if (window is None or cache is None or ordered or positions is None or spec.kv_len <= window
            or not (order is not None or isinstance(mask, tuple) and mask[1] is None
                    and mask[0].dtype == torch.long)):
        return None
    from .kernels import backend
    name = backend.resolve("tree_attention", cache.k.device)
    bits = order.bits if order is not None else mask[0]
    positions = positions.reshape(-1, positions.shape[-1])
    # where the cpu kernel would decline, the reference would rebuild the dense mask in every layer
    if not (name in ("triton", "cuda") or name == "cpu" and order is None
            and cpu_ops.takes_window(cache.k, spec.prefix_len, bits, positions)):
        return None
    return KernelWindow(bits, window, positions, order)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as Llama's reference does, so fp16/bf16 match it
        # (kernels.reference.rmsnorm; the kernel backends round the same way).
        return ops.rmsnorm(x, self.weight, self.eps)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm (transformers' Gemma3RMSNorm): normalise in fp32, times (1 + w) in fp32, one rounding to x's
    dtype; w is the checkpoint's (zero-centred) weight as stored. fp32 gives transformers' bits. In bf16 this rounds
    once, after the scale, as transformers does, where the Llama RMSNorm rounds the normalised x to bf16 and then
    multiplies by a bf16 weight: storing 1 + w as a Llama weight would have rounded 1 + w itself to bf16 (8 bits).
    out_scale: a constant folded into the scale (the q norm carries Gemma's query_pre_attn_scalar this way)."""

    def __init__(self, dim: int, eps: float, out_scale: float = 1.0):
        super().__init__()
        self.eps = eps
        self.out_scale = out_scale
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = 1.0 + self.weight.float()
        if self.out_scale != 1.0:
            scale = scale * self.out_scale
        return (xf * scale).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, freq_factors: torch.Tensor | None = None,
                  max_len: int | None = None) -> torch.Tensor:
    """The rotary_dim / 2 frequencies of the rotated pairs. max_len: the table's length (LongRoPE picks its factors
    by it)."""
    d = getattr(cfg, "rotary_dim", 0) or cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "longrope":
        # Phi-3's LongRoPE (transformers' _compute_longrope_parameters): per-frequency divisors, the short ones up to
        # the trained length and the long ones past it. transformers switches by the current sequence's length (and
        # then recomputes every position); a table is built once, so a cache longer than the trained length takes
        # the long factors for every position, what transformers gives a sequence that long.
        long = max_len is not None and max_len > rs["original_max_position_embeddings"]
        ext = torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float64)
        return (inv_freq / ext).float()
    if freq_factors is not None:          # GGUF stores Llama-3 scaling precomputed as divisors
        inv_freq = inv_freq / freq_factors.double()
    if kind == "linear":                  # with freq_factors too: llama.cpp applies both (freq_scale, factors)
        inv_freq = inv_freq / rs["factor"]
    elif kind == "yarn":
        inv_freq = _yarn_inv_freq(cfg, inv_freq, rs)
    elif kind == "llama3" and freq_factors is None:
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_len = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def _yarn_inv_freq(cfg: ModelConfig, inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    """YaRN (transformers' _compute_yarn_parameters, llama.cpp's rope_yarn): frequencies that turn fewer than
    beta_slow times over the trained length are interpolated (divided by the factor), those that turn more than
    beta_fast times are kept, with a linear ramp between."""
    d, base, factor = getattr(cfg, "rotary_dim", 0) or cfg.head_dim, cfg.rope_theta, rs["factor"]
    trained = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def dim_of(turns):                 # the dimension whose frequency turns `turns` times over the trained length
        return d * math.log(trained / (turns * 2 * math.pi)) / (2 * math.log(base))
    lo, hi = dim_of(beta_fast), dim_of(beta_slow)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo if hi != lo else 0.001)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What YaRN (0.1 ln(factor) + 1) and LongRoPE multiply cos and sin by (so q.k by its square), unless the config
    says."""
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in ("yarn", "longrope"):
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    if kind == "longrope":               # sqrt(1 + ln(factor) / ln(trained length)), as transformers
        factor, trained = rs["factor"], rs["original_max_position_embeddings"]
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(trained))

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return mscale(rs["factor"], rs["mscale"]) / mscale(rs["factor"], rs["mscale_all_dim"])
    return mscale(rs["factor"])


def rope_table(cfg: ModelConfig, max_len: int, freq_factors=None) -> torch.Tensor:
    """[max_len, head_dim] as (cos | sin) halves, fp32: looked up by position, so any position order works. With
    partial RoPE (cfg.rotary_dim, below head_dim) the rotated pairs are the first rotary_dim / 2 columns of each
    half and the rest rotate by nothing (cos 1, sin 0), for q/k rows in rotary_rows' order."""
    # Dynamic NTK ("dynamic") is the unscaled table up to max_position_embeddings, as in transformers; past it
    # transformers rescales every position by the sequence's current length, which a table cannot follow, and the
    # target refuses such lengths (check_rope_len). The heads' own tables stay unscaled.
    inv_freq = rope_inv_freq(cfg, freq_factors, max_len)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    factor = rope_attention_factor(cfg)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    rest = cfg.head_dim // 2 - inv_freq.shape[0]
    if rest:
        # transformers scales only the rotated dims' cos and sin by the attention factor: the others pass unscaled
        cos = torch.cat([cos, torch.ones(max_len, rest)], dim=-1)
        sin = torch.cat([sin, torch.zeros(max_len, rest)], dim=-1)
    return torch.cat([cos, sin], dim=-1)


def rotary_rows(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """[head_dim] long: for each row of a head of q or k in the model, the checkpoint row it takes. Checkpoints with
    partial RoPE (Hugging Face's Phi-3, llama.cpp's NeoX graphs) rotate pairs (i, i + R/2), i < R/2, of the first R =
    rotary_dim dims and pass the rest; here pair i sits at (i, i + head_dim/2) and the passed dims fill the rest of
    each half, so that every RoPE path (reference, kernels, the C++ layer stack) rotates whole heads with rope_table's
    rows. Scores see only q . k, the same in any order shared by q and k."""
    r, half = rotary_dim // 2, head_dim // 2
    return torch.cat([torch.arange(r), torch.arange(rotary_dim, rotary_dim + half - r), torch.arange(r, rotary_dim),
                      torch.arange(rotary_dim + half - r, head_dim)])


def local_rope_table(cfg: ModelConfig, max_len: int) -> torch.Tensor | None:
    """Gemma 3's sliding layers' table: base rope_local_theta, no scaling (None for other models)."""
    if not cfg.sliding_layers or cfg.rope_local_theta is None:
        return None
    return rope_table(dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None), max_len)


def no_rotation(rope: torch.Tensor) -> torch.Tensor:
    """RoPE rows (cos | sin) that rotate by nothing: cos 1, sin 0, so every RoPE path (the kernels' fused cache
    write included) leaves q and k exactly as they are."""
    half = rope.shape[-1] // 2
    return torch.cat([torch.ones_like(rope[..., :half]), torch.zeros_like(rope[..., half:])], dim=-1)


def check_rope_len(cfg: ModelConfig, max_len: int) -> None:
    """Refuse a cache longer than a dynamic-NTK model's trained length. Scaling the base once for the cache's
    length (what this did) changed every position's angles, a 5-token prompt's too, so the logits differed from
    transformers' (~1e-2 relative on a tiny model) whenever max_seq_len passed max_position_embeddings."""
    from .errors import ConfigError
    rs = cfg.rope_scaling or {}
    trained = cfg.max_position_embeddings
    if rs.get("rope_type", rs.get("type")) == "dynamic" and max_len > trained:
        raise ConfigError(f"max_seq_len={max_len} is past the {trained} positions {cfg.name} was trained on, and its "
                          f"rope_scaling is 'dynamic' (NTK): transformers rescales RoPE there by the sequence's "
                          f"current length, which a static KV cache cannot reproduce; use max_seq_len <= {trained}")


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; rope: [B, T, D] rows of rope_table. Rotate-half (Hugging Face) convention."""
    half = x.shape[-1] // 2
    cos, sin = rope[..., None, :half], rope[..., None, half:]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, q + 2 * kv, bias=cfg.qkv_bias)   # one matmul instead of three
        self.wo = nn.Linear(q, cfg.dim, bias=cfg.o_bias)
        self.split = (q, kv, kv)
        # Qwen3: an RMSNorm over each head's q and k, before RoPE
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        if cfg.gemma:
            # Gemma 3 scales scores by query_pre_attn_scalar ** -0.5, every attention path here by head_dim ** -0.5:
            # q carries the ratio (RoPE is linear), so no path needs a scale argument. Gemma-3-270M/1B/4B/12B have
            # query_pre_attn_scalar == head_dim (a ratio of 1, bits unchanged); 27B's differs (fp32: ~1e-7 relative).
            qpas = cfg.query_pre_attn_scalar or cfg.head_dim
            self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps, math.sqrt(cfg.head_dim / qpas))
            self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps)
        self.use_rope = layer_idx not in cfg.nope_layers       # SmolLM3's NoPE layers attend without it
        self.sliding = layer_idx in cfg.sliding_layers          # attends over the last cfg.sliding_window positions

    def forward(self, x, rope, cache: KVCache | None, spec: AttentionSpec | None, mask):
        """mask: [B, T, T] bool without a cache (None: causal, which lets SDPA skip the masked half); with a
        cache, ops.tree_mask_args(...), CAUSAL_PREFILL or CAUSAL_AFTER_PREFIX (prefill_mask_args), or the exact paths'
        cpu_exact.OrderedLayout / gpu_exact.OrderedTree; a sliding layer past its window a WindowMask or, on the
        kernel backends, a KernelWindow (each built once per forward)."""
        return self.wo(self.core(self.wqkv(x), rope, cache, spec, mask))

    def core(self, qkv, rope, cache: KVCache | None, spec: AttentionSpec | None, mask):
        """Attention between the projections: qkv [B, T, (H + 2 H_kv) D] -> [B, T, H D], before wo."""
        B, T, _ = qkv.shape
        if self.q_norm is not None:
            qkv = self.norm_qk(qkv)
        if not self.use_rope:
            rope = no_rotation(rope)
        if cache is not None and isinstance(mask, WindowMask):          # a sliding layer past its window
            q = cache.write_qkv(self.layer_idx, spec.prefix_len, qkv, rope, self.n_heads).transpose(1, 2)
            kv = mask.bias.shape[-1]
            kc, vc = cache.k[self.layer_idx, :B, :, :kv], cache.v[self.layer_idx, :B, :, :kv]
            out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask.bias[:, None], enable_gqa=True)
        elif cache is not None and isinstance(mask, str) and mask == CAUSAL_PREFILL:
            q = cache.write_qkv(self.layer_idx, spec.prefix_len, qkv, rope, self.n_heads).transpose(1, 2)
            kc, vc = cache.k[self.layer_idx, :B, :, :T], cache.v[self.layer_idx, :B, :, :T]
            out = F.scaled_dot_product_attention(q, kc, vc, is_causal=True, enable_gqa=True)
        elif cache is not None and isinstance(mask, str) and mask == CAUSAL_AFTER_PREFIX:
            q = cache.write_qkv(self.layer_idx, spec.prefix_len, qkv, rope, self.n_heads).transpose(1, 2)
            out = causal_after_prefix(q, cache.k[self.layer_idx, :B], cache.v[self.layer_idx, :B], spec.kept_prefix)
        elif cache is not None and isinstance(mask, KernelWindow):          # the same, windowed in the kernel
            q = cache.write_qkv(self.layer_idx, spec.prefix_len, qkv, rope, self.n_heads).transpose(1, 2)
            kc, vc = cache.k[self.layer_idx, :B], cache.v[self.layer_idx, :B]
            out = ops.tree_attention(q, kc, vc, spec.prefix_len, mask.bits, spec.kv_len, window=mask.window,
                                     positions=mask.positions, order=mask.order)
        elif cache is not None and isinstance(mask, gpu_exact.OrderedTree):
            q = cache.write_qkv(self.layer_idx, spec.prefix_len, qkv, rope, self.n_heads).transpose(1, 2)
            kc, vc = cache.k[self.layer_idx, :B], cache.v[self.layer_idx, :B]
            out = ops.tree_attention(q, kc, vc, spec.prefix_len, mask.bits, spec.kv_len, order=mask)
        elif cache is not None and not isinstance(mask, cpu_exact.OrderedLayout):
            # RoPE on q and k and the cache write in one launch on the kernel backends
            q = cache.write_qkv(self.layer_idx, spec.prefix_len, qkv, rope, self.n_heads).transpose(1, 2)
            kc, vc = cache.k[self.layer_idx, :B], cache.v[self.layer_idx, :B]
            new_mask, dense = mask
            out = ops.tree_attention(q, kc, vc, spec.prefix_len, new_mask, spec.kv_len, dense_mask=dense)
        elif cache is not None:                            # the CPU's ordered decode steps (cpu_exact.OrderedLayout)
            q = cache.write_qkv(self.layer_idx, spec.prefix_len, qkv, rope, self.n_heads).transpose(1, 2)
            out = cpu_exact.attention(q, cache.k[self.layer_idx, :B], cache.v[self.layer_idx, :B], mask)
        else:
            q, k, v = qkv.split(self.split, dim=-1)
            q = ops.rope(q.view(B, T, self.n_heads, self.head_dim), rope).transpose(1, 2)
            k = ops.rope(k.view(B, T, self.n_kv_heads, self.head_dim), rope).transpose(1, 2)
            v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            elif isinstance(mask, WindowMask):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bias[:, None], enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        return out.transpose(1, 2).reshape(B, T, -1)

    def norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv with each head of q and k RMS-normalised (Qwen3), so every attention path after it runs unchanged."""
        B, T, _ = qkv.shape
        q, k, v = qkv.split(self.split, dim=-1)
        q = self.q_norm(q.reshape(B, T, self.n_heads, self.head_dim)).reshape(B, T, -1)
        k = self.k_norm(k.reshape(B, T, self.n_kv_heads, self.head_dim)).reshape(B, T, -1)
        return torch.cat([q, k, v], dim=-1)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)   # gate | up, fused
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.gelu = getattr(cfg, "gemma", False)     # Gemma 3: gelu_pytorch_tanh(gate) * up

    def forward(self, x):
        return self.w2(ops.gelu_mul(self.w13(x)) if self.gelu else ops.silu_mul(self.w13(x)))


# Up to this many tokens per sequence in a forward (decode steps, tree verification: at most 64 nodes), an MoE
# layer gathers each token's chosen experts; longer forwards (prefills) run every expert over the tokens.
MOE_GATHER_ROWS = 64
# The dense path's chunk of tokens is sized so its [E, chunk, 2I] intermediate stays under this many elements
MOE_DENSE_ELEMENTS = 1 << 26


class Router(nn.Module):
    """An MoE layer's router, [n_experts, d]. Not an nn.Linear on purpose: 4-bit quantization (cpu_quant), oneDNN
    packing and CUDA routing adapt nn.Linear layers, and the router must stay in the model's float dtype: a rounding
    there moves which experts a token takes, not just its value."""

    def __init__(self, n_experts: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, dim))


class MoEFeedForward(nn.Module):
    """A sparse mixture-of-experts MLP (Qwen3-MoE's Qwen3MoeSparseMoeBlock, Mixtral's MixtralSparseMoeBlock).

    Routing as transformers': router logits in the model's dtype, softmax in fp32, top-k (torch.topk, so ties
    break alike), renormalised to sum 1 where cfg.norm_topk_prob, the weights rounded to the model's dtype before
    weighting (Qwen3-MoE) or kept fp32 with the product rounded after (Mixtral: moe_weights_fp32).

    Experts as 3-D parameters (transformers 5's layout): w13 [E, 2I, d] (gate | up), w2 [E, d, I]. One
    implementation with static shapes, no host sync and no Python loop over experts (CUDA graphs capture decode
    steps as they are):
    - forwards of up to MOE_GATHER_ROWS tokens a sequence (every decode and tree step): each token's k experts'
      weights are gathered (w13[idx]) and run as N*k one-row batched products, at most E (token, expert) pairs at a
      time, so that the gathered copy never exceeds the layer's own experts (Mixtral-8x7B's expert is 350 MB in
      bf16). A plain step reads the experts its token chose, not all E, and each (token, expert) product is a
      one-row product of the same shapes however many the step holds and however they are chunked, so a tree
      node's output equals a plain step's bit for bit (speculative == plain greedy). A wide tree pays for that:
      its pairs re-read experts chunk by chunk (a grouped-GEMM kernel would not; none here yet).
    - longer forwards (prefills): every expert over every token, [E, N, 2I] in one batched product (in chunks of
      tokens), then each token's k outputs picked out. E/k times the expert FLOPs, but no per-token weight copies
      (k x 350 MB a token on Mixtral-8x7B's shapes) and static shapes; prefill is shared by plain and speculative
      decoding, so its bits need not equal a decode step's.
    Both combine the k outputs alike, in top-k order, each rounded to the model's dtype first (as transformers'
    index_add_ in the model's dtype). The C++ layer stack and the fused decode layers decline MoE layers.

    4-bit on the CPU (quant 'q4', cpu_quant.quantize_linears): each expert's w13 and w2 become an Int4Linear of
    their own (`experts_q4`, the dense linears' packed codes and ops.quant_linear products, int8 activations) and
    the float stacks are freed (w13/w2 left as empty tensors); the router stays float. Forwards then group the
    (token, expert) pairs by expert on the host (no CUDA graphs on the CPU) and run each expert once over its rows
    (_packed_experts). The 4-bit kernels give a row the same bits whatever the row count, so this is the same bits
    as one-row products per pair: a tree node's output still equals a plain step's (speculative == plain greedy)."""

    experts_q4 = None     # [(w13, w2) Int4Linear per expert] once 4-bit (cpu_quant.quantize_experts)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, d, inter = cfg.n_experts, cfg.dim, cfg.moe_intermediate_size
        self.n_experts, self.top_k, self.norm_topk = E, cfg.experts_per_token, cfg.norm_topk_prob
        self.weights_fp32 = cfg.moe_weights_fp32
        self.gate = Router(E, d)
        self.w13 = nn.Parameter(torch.empty(E, 2 * inter, d))
        self.w2 = nn.Parameter(torch.empty(E, d, inter))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> (weights [N, k] (fp32 for Mixtral, else x's dtype), expert ids [N, k] long)."""
        if self.experts_q4 is None:
            logits = F.linear(x, self.gate.weight)
        else:       # 4-bit CPU path: one 1-row product per token, so a token's routing bits ignore the row count
            logits = torch.bmm(x[:, None, :], self.gate.weight.t().expand(x.shape[0], -1, -1))[:, 0]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        return (w if self.weights_fp32 else w.to(x.dtype)), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        T = shape[1] if x.dim() == 3 else shape[0]
        flat = x.reshape(-1, shape[-1])
        w, idx = self.route(flat)
        if self.experts_q4 is not None:
            y = self._packed_experts(flat, idx)
        else:
            y = self._gathered(flat, idx) if T <= MOE_GATHER_ROWS else self._dense(flat, idx)  # [N, k, d]
        out = (y * w[..., None]).to(x.dtype)
        return out.sum(dim=1).reshape(shape)

    def use_packed_experts(self, experts) -> None:
        """Runs the experts as the given 4-bit layers from now on and frees the float stacks (left as empty
        parameters of the same dtype, so dtype/device look-ups over the model's parameters still work)."""
        self.experts_q4 = list(experts)
        self.w13 = nn.Parameter(self.w13.new_empty(0), requires_grad=False)
        self.w2 = nn.Parameter(self.w2.new_empty(0), requires_grad=False)

    def _packed_experts(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """4-bit experts: the (token, expert) pairs sorted by expert, each chosen expert run once over its rows."""
        N, k = idx.shape
        e = idx.reshape(-1)
        order = torch.argsort(e, stable=True)
        xs = x[order // k]                                          # the pairs' tokens, grouped by expert
        y = x.new_empty(N * k, x.shape[-1])
        experts, counts = torch.unique_consecutive(e[order], return_counts=True)
        s = 0
        for ex, c in zip(experts.tolist(), counts.tolist()):
            w13, w2 = self.experts_q4[ex]
            y[order[s:s + c]] = ops.quant_linear(ops.silu_mul(ops.quant_linear(xs[s:s + c], w13)), w2)
            s += c
        return y.view(N, k, -1)

    def _gathered(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        N, k = idx.shape
        e = idx.reshape(-1)
        xk = x.repeat_interleave(k, dim=0)[:, None, :]                               # [N k, 1, d]
        parts = []
        for s in range(0, N * k, self.n_experts):       # at most E gathered experts at once
            es = e[s:s + self.n_experts]
            h = ops.silu_mul(torch.bmm(xk[s:s + self.n_experts], self.w13[es].transpose(1, 2)))   # [n, 1, I]
            parts.append(torch.bmm(h, self.w2[es].transpose(1, 2)))                               # [n, 1, d]
        return (torch.cat(parts) if len(parts) > 1 else parts[0]).view(N, k, -1)

    def _dense(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        N, k = idx.shape
        E, two_i = self.w13.shape[:2]
        chunk = max(1, MOE_DENSE_ELEMENTS // (E * two_i))
        parts = []
        for s in range(0, N, chunk):
            xs, ids = x[s:s + chunk], idx[s:s + chunk]
            h = ops.silu_mul(torch.matmul(xs[None], self.w13.transpose(1, 2)))       # [E, n, I]
            y = torch.matmul(h, self.w2.transpose(1, 2))                              # [E, n, d]
            rows = torch.arange(xs.shape[0], device=x.device)[:, None].expand_as(ids)
            parts.append(y[ids, rows])                                                # [n, k, d]
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Qwen3-MoE and Mixtral: a sparse mixture of experts where the config says (the other layers: dense)
        self.moe = layer_idx in cfg.moe_layers
        self.feed_forward = MoEFeedForward(cfg) if self.moe else FeedForward(cfg)
        if cfg.gemma:     # Gemma 3's sandwich: (1 + w) norms before and after attention and the MLP
            self.attention_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
            self.post_attention_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
            self.ffn_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)         # pre_feedforward_layernorm
            self.post_ffn_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)

    def forward_gemma(self, x, rope, cache, spec, mask):
        """A Gemma 3 layer (transformers' Gemma3DecoderLayer): x + post_norm(attention(norm(x))), then
        x + post_ffn_norm(mlp(ffn_norm(x))). Returns the new residual stream."""
        x = x + self.post_attention_norm(self.attention(self.attention_norm(x), rope, cache, spec, mask))
        return x + self.post_ffn_norm(self.feed_forward(self.ffn_norm(x)))

    def forward(self, x, rope, cache, spec, mask, h=None, next_norm: RMSNorm | None = None):
        """x: the residual stream; h: attention_norm(x) if the caller has it already. Returns the new residual
        stream, or with next_norm (the next layer's attention_norm, or the final norm) the pair
        (x, next_norm(x)): each residual add then runs fused with the norm after it (ops.add_rmsnorm)."""
        if h is None:
            h = self.attention_norm(x)
        attn = self.attention(h, rope, cache, spec, mask)
        x, h = ops.add_rmsnorm(attn, x, self.ffn_norm.weight, self.ffn_norm.eps)
        ffn = self.feed_forward(h)
        if next_norm is None:
            return x + ffn
        return ops.add_rmsnorm(ffn, x, next_norm.weight, next_norm.eps)

    def forward_fused(self, x, rope, cache, spec, mask):
        """The same layer as four weight-streaming launches plus attention, for decode steps whose linears
        are routed (kernels/routed_linear.py): each norm and the activation run in the prologue of the GEMV
        after them, each residual add in the epilogue of the one before (ops.fused_linear). Returns the new
        residual stream."""
        attn, ffn = self.attention, self.feed_forward
        qkv = ops.fused_linear(x, attn.wqkv.weight, self.attention_norm.weight, self.attention_norm.eps)
        x = ops.fused_linear(attn.core(qkv, rope, cache, spec, mask), attn.wo.weight, residual=x)
        up = ops.fused_linear(x, ffn.w13.weight, self.ffn_norm.weight, self.ffn_norm.eps)
        return ops.fused_linear(up, ffn.w2.weight, silu=True, residual=x)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq_len: int | None = None):
        super().__init__()
        self.config = cfg
        # build_model constructs on the meta device; there torch runs normal_ and arange as Python references
        # that import torch._dynamo, ~2 s of every start. So the embedding skips its random init there (its
        # values are replaced) and the RoPE table is computed on the CPU, then moved to the default device.
        default = torch.empty(0).device
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim)
                                           if default.type == "meta" else None)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps) if cfg.gemma else RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope_len = max_seq_len or cfg.max_position_embeddings
        # bf16 on the CPU: attention that sums each token's keys in position order whatever the step's slot
        # layout, so speculative greedy output equals plain greedy output (kernels/cpu_exact.py)
        self.ordered_attention = True
        # Set by cpu_quant.quantize_linears: the linears round their inputs to bf16, so a difference in the last
        # fp32 bit of attention between a tree and a plain step can flip a rounding; fp32 decode steps then take
        # the ordered attention too.
        self.rounds_linear_inputs = False
        # On: routed few-row steps run Block.forward_fused (norms, activation and residual adds inside the
        # GEMV launches). Off by default: on an H200 (2026-12-04, results/gpu/h200_2026-12-04b_suite) a 7B step
        # took 4.78 ms fused against 4.18 unfused (cuBLAS 4.40): each fused norm's pre-pass over K delayed the
        # weight stream more than the 2 us launch it saves (one load of the row since, untimed). SmolLM2's step
        # was 2% faster fused. Exact greedy never fuses.
        self.fuse_decode_layers = False
        self.register_buffer("rope_freq_factors", None, persistent=False)
        check_rope_len(cfg, self.rope_len)
        with torch.device("cpu"):
            rope = rope_table(cfg, self.rope_len)
            local = local_rope_table(cfg, self.rope_len)
        self.register_buffer("rope", rope.to(default), persistent=False)
        # Gemma 3's sliding layers: RoPE with base rope_local_theta, unscaled (None: every layer takes `rope`)
        self.register_buffer("rope_local", None if local is None else local.to(default), persistent=False)

    def orders_decode(self, cache: KVCache) -> bool:
        """Whether decode steps over `cache` must sum each token's keys in position order: through
        kernels/cpu_exact.py's layout around flash, or the cpu backend's attention, which does so by itself."""
        return self.ordered_attention and cpu_exact.applies(cache.k, self.rounds_linear_inputs)

    def routed(self) -> bool:
        """Linears routed through the kernel backends (kernels/routed_linear.py), usable without autograd."""
        return (type(self.output) is routed_linear.RoutedLinear
                and not (torch.is_grad_enabled() and self.output.weight.requires_grad))

    def invariant_decode(self, cache: KVCache) -> bool:
        """Whether decode steps over `cache` round each token alike whatever the step verifies (the GPU's
        half-precision path of kernels/gpu_exact.py: routed linears, AMPHISTA_EXACT_GREEDY=1)."""
        return self.ordered_attention and gpu_exact.applies(cache.k) and self.routed()

    def prefill_chunk(self, cache: KVCache) -> int | None:
        """Tokens per forward for a long prefill, or None for one forward. A 4-bit model on the cpu backend runs
        at most cpu_ops.STACK_ROWS tokens through its C++ layer stack; a longer forward took the Python layer
        loop, whose attention sums in another order, and int8-rounded activations can turn that last-bit
        difference into a different token. In chunks, a prompt's logits are the same bits whatever its length
        and whatever it is batched with."""
        if cache.k.device.type == "cpu" and cpu_ops.stack_runs(self.layers, self.norm, self.config, cache.k.dtype,
                                                               self):
            return cpu_ops.STACK_ROWS
        if self.config.real_window is not None and cache.max_seq_len > self.config.real_window:
            # A cache past a sliding window: a long prompt in chunks, so each sliding layer's dense window mask is
            # [B, chunk, kv_len] rather than [B, T, T] (a 32k prompt's fp32 mask alone would be 4 GiB)
            return max(WINDOW_PREFILL_CHUNK, CAUSAL_PREFILL_FROM)
        return None

    def fuses_layers(self, x: torch.Tensor) -> bool:
        """Whether this forward takes Block.forward_fused: the linears are routed and the step has few rows,
        the weight-streaming kernel's case. Training (tensors that need gradients) keeps the unfused layers,
        whose reference ops autograd knows."""
        return (self.fuse_decode_layers and self.routed() and x.shape[0] * x.shape[1] <= routed_linear.MAX_ROWS
                and not (self.config.qkv_bias or self.config.o_bias)      # the fused GEMVs take no bias
                and not self.config.gemma                                # nor Gemma's post-norms and GELU
                and not self.config.moe_layers)                          # nor MoE layers (MoEFeedForward)

    @property
    def device(self) -> torch.device:
        """Where the model runs: its final norm's device (the embedding's weight is a meta tensor where a 4-bit
        model keeps the table as codes, cpu_quant.CodesEmbedding)."""
        return self.norm.weight.device

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def setup_rope(self, max_len: int, freq_factors: torch.Tensor | None = None):
        """Rebuild the RoPE table on the model's device (after loading, or for a longer cache)."""
        check_rope_len(self.config, max_len)
        device = self.device
        self.rope_len = max_len
        if freq_factors is not None:
            self.rope_freq_factors = freq_factors.to(device)
        self.rope = rope_table(self.config, max_len, self.rope_freq_factors).to(device)
        local = local_rope_table(self.config, max_len)
        self.rope_local = None if local is None else local.to(device)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head over final-norm hidden states, with Gemma's final_logit_softcapping where set."""
        out = self.output(h)
        cap = self.config.final_logit_softcapping
        return out if cap is None else torch.tanh(out / cap) * cap

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                spec: AttentionSpec | None = None, return_hidden: bool = False, logits_at=None):
        """tokens, positions: [B, T]. Without a cache, attends causally within `tokens` (or spec.new_mask).

        logits_at: optional [B, M] indices into T; computes the LM head only there (prefill needs one row).
        Returns logits [B, T or M, V] (and the final-norm hidden states [B, T, d] if return_hidden).
        """
        B, T = tokens.shape
        invariant = cache is not None and spec.decode and self.invariant_decode(cache)
        # An ordered CPU decode step sums keys in position order, and keeps each row's bits in its packed products
        # too, also past the 64 rows up to which they keep them anyway (a batch's trees)
        ordered = cache is not None and spec.decode and self.orders_decode(cache)
        if cache is None:
            mask = spec.new_mask.expand(B, T, T) if spec is not None else None   # None: causal
        elif invariant:
            mask = gpu_exact.layout(spec.prefix_len, spec.new_mask)
        elif ordered and not cpu_ops.orders_keys(cache.k):
            mask = cpu_exact.layout(spec.prefix_len, spec.new_mask, spec.kv_len, cache.max_seq_len, cache.k.dtype,
                                    self.config.n_heads // self.config.n_kv_heads)
        else:
            mask = prefill_mask_args(spec, cache.k.dtype)
        # The row-invariant path keeps the layers unfused: the norms and the activation are row-wise launches,
        # the routed products fixed 16-row blocks for any row count. Fused, every GEMV program would redo the
        # prologue for all of a tree's rows (a 64-node step cost 5.3 plain steps on an H200, 2026-12-04).
        with routed_linear.invariant_rows(invariant), cpu_packed.invariant_rows(ordered):
            if self.config.gemma:
                return self._gemma_forward(tokens, positions, cache, spec, mask, return_hidden, logits_at, ordered)
            return self._layers_and_head(self.tok_embeddings(tokens), self.rope[positions], cache, spec, mask,
                                         return_hidden, logits_at, fuse=not invariant, positions=positions,
                                         ordered=ordered)

    def _gemma_forward(self, tokens, positions, cache, spec, mask, return_hidden: bool, logits_at, ordered: bool):
        """Gemma 3: embeddings times sqrt(dim) (the normalizer rounded to the model's dtype, as transformers), the
        layers in the C++ stack where they are 4-bit on the cpu backend (fp32), else one by one
        (Block.forward_gemma; no fused decode), sliding layers on the local RoPE
        table and, once a forward's keys reach past the window, their own mask (the kernels' KernelWindow on the
        triton, cuda and cpu backends, else a WindowMask, or on the CPU's ordered decode steps a windowed cpu_exact
        layout)."""
        cfg = self.config
        x = self.tok_embeddings(tokens)
        x = x * torch.tensor(math.sqrt(cfg.dim), dtype=x.dtype, device=x.device)
        rope = self.rope[positions]
        local = rope if self.rope_local is None else self.rope_local[positions]
        if cache is not None and isinstance(mask, tuple) and mask[1] is None:
            # 4-bit layers on the cpu backend: the whole stack in one C++ call (csrc/cpu/decoder.h: post-norms, GELU,
            # the sliding layers' RoPE rows and window), every token's keys in position order as for Llama layers
            native = cpu_ops.decoder_layers(self.layers, self.norm, cfg, x, rope, cache.k, cache.v, spec.prefix_len,
                                            mask[0], self, rope_local=local)
            if native is not NotImplemented:
                h = native[1]
                hl = h if logits_at is None else torch.gather(h, 1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
                logits = self.logits(hl)
                return (logits, h) if return_hidden else logits
        local_mask = kernel_window(mask, cache, spec, positions, cfg.real_window, ordered) or self._sliding_mask(
            mask, cache, spec, positions, x.dtype, ordered)
        for layer in self.layers:
            sliding = layer.attention.sliding
            x = layer.forward_gemma(x, local if sliding else rope, cache, spec, local_mask if sliding else mask)
        h = self.norm(x)
        hl = h if logits_at is None else torch.gather(h, 1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
        logits = self.logits(hl)
        return (logits, h) if return_hidden else logits

    def _sliding_mask(self, mask, cache, spec, positions, dtype, ordered: bool):
        """The sliding layers' mask argument in this forward (the other layers take `mask`): once its keys reach past
        the window a WindowMask (the reference SDPA path), or on the CPU's ordered decode steps a windowed cpu_exact
        layout; `mask` where no layer slides or no key can be a window behind a query."""
        W = self.config.real_window
        if W is None:
            return mask
        T = positions.shape[-1]
        # kv_len (or T) <= W: no key can be W positions behind a query, the window changes nothing
        past = (T if cache is None else spec.kv_len) > W
        if ordered and cache is not None and (cache.max_seq_len <= W or (
                not past and isinstance(mask, cpu_exact.OrderedLayout))):
            # no step over this cache reaches past the window (plain and tree steps alike take the full layers'
            # path), or the full layers' layout, which within the window is the same one
            return mask
        if ordered and cache is not None:
            # The CPU's exact decode steps: the sliding layers always sum in position order through cpu_exact's
            # layout (windowed when it matters), also where the cpu backend orders the full layers' keys itself, so
            # that a token's bits are the same in a plain step and in a tree step (whose kv_len may be past W where
            # the plain step's is not)
            cfg = self.config
            return cpu_exact.layout(spec.prefix_len, spec.new_mask, spec.kv_len, cache.max_seq_len, cache.k.dtype,
                                    cfg.n_heads // cfg.n_kv_heads, window=W if past else None)
        if past:
            return window_mask(spec, positions, W, T, dtype, cache is not None)
        return mask

    def _layers_and_head(self, x, rope, cache, spec, mask, return_hidden: bool, logits_at, fuse: bool,
                         positions=None, ordered: bool = False):
        # A 4-bit model on the cpu backend: the whole layer stack in one C++ call (csrc/cpu/decoder.h; a sliding
        # layer's window in its tree attention)
        native = (cpu_ops.decoder_layers(self.layers, self.norm, self.config, x, rope, cache.k, cache.v,
                                         spec.prefix_len, mask[0], self)
                  if cache is not None and isinstance(mask, tuple) and mask[1] is None else NotImplemented)
        # Mistral, Mixtral and Phi-3 slide every layer; Qwen2/Qwen3, SmolLM3 some (config.sliding_layers)
        local = mask if native is not NotImplemented or positions is None else kernel_window(
            mask, cache, spec, positions, self.config.real_window, ordered) or self._sliding_mask(
            mask, cache, spec, positions, x.dtype, ordered)
        masks = [mask] * len(self.layers) if local is mask else [
            local if layer.attention.sliding else mask for layer in self.layers]
        if native is not NotImplemented:
            h = native[1]
        elif fuse and self.fuses_layers(x):
            for layer, m in zip(self.layers, masks):
                x = layer.forward_fused(x, rope, cache, spec, m)
            xl = x if logits_at is None else torch.gather(x, 1, logits_at[..., None].expand(-1, -1, x.shape[-1]))
            logits = ops.fused_linear(xl, self.output.weight, self.norm.weight, self.norm.eps)
            return (logits, self.norm(x)) if return_hidden else logits
        else:
            h = self.layers[0].attention_norm(x)
            next_norms = [layer.attention_norm for layer in self.layers[1:]] + [self.norm]
            for layer, next_norm, m in zip(self.layers, next_norms, masks):
                x, h = layer(x, rope, cache, spec, m, h, next_norm)
        hl = h if logits_at is None else torch.gather(h, 1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
        logits = self.output(hl)
        return (logits, h) if return_hidden else logits
