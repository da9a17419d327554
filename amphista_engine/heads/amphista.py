"""Amphista drafting heads: fusion -> Staged Adaptation Layers (causal, own KV cache) -> per-head ResBlocks
-> Auto-embedding Block (bi-directional attention across the K heads) -> RMSNorm -> LM head.

One pass drafts all K tokens (non-autoregressive). The SAL are `model.Block`s, so they share the target's
attention, RoPE and cache code; `forward_train` runs them causally over whole sequences, `step` incrementally.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_ops, cpu_quant, ops
from ..kv_cache import KVCache
from ..model import AttentionSpec, Block, FeedForward, RMSNorm, causal_mask, prefill_mask_args, rope_table
from .config import HeadsConfig
from .medusa import DraftHeads, HeadResBlocks


class AEBLayer(nn.Module):
    """Pre-norm encoder layer over the K head slots: unmasked multi-head self-attention + SwiGLU MLP."""

    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        d = cfg.dim
        self.n_heads = cfg.aeb_heads
        self.attention_norm = RMSNorm(d, cfg.norm_eps)
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.feed_forward = FeedForward(SimpleNamespace(dim=d, intermediate_size=cfg.aeb_intermediate_size))

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, K, d]; pos_emb [K, d] is added first (the first layer gets the block's position embedding)."""
        # pos-emb add + RMSNorm + QKV + unmasked attention across the K slots (every head sees every head)
        if cpu_quant.on_codes(self.wqkv):      # 4-bit heads: the projection on the codes (ops.head_attention's math)
            x = x if pos_emb is None else x + pos_emb
            N, K, d = x.shape
            q, k, v = self.wqkv(self.attention_norm(x)).view(N, K, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
            attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, K, d)
        else:
            x, attn = ops.head_attention(x, pos_emb, self.attention_norm.weight, self.attention_norm.eps,
                                         self.wqkv.weight, self.n_heads)
        x = x + self.wo(attn)
        return x + self.feed_forward(self.ffn_norm(x))


class AmphistaHeads(DraftHeads):
    def __init__(self, config: HeadsConfig):
        super().__init__(config)
        c, d = config, config.dim
        self.sal_config = c.sal_model_config()
        self.fuse = nn.Linear(2 * d, d, bias=False) if c.fusion == "concat" else None
        # Layer i belongs to stage i // layers_per_stage; its index is its slot in the SAL KV cache.
        self.sal = nn.ModuleList(Block(self.sal_config, i) for i in range(self.sal_config.n_layers))
        self.res = HeadResBlocks(c.num_heads, d, 1, c.resblock_bias)
        self.pos_emb = nn.Parameter(torch.zeros(c.num_heads, d))
        self.aeb = nn.ModuleList(AEBLayer(c) for _ in range(c.aeb_layers))
        self.norm = RMSNorm(d, c.norm_eps)
        # Plain attributes, not buffers: .to(bf16) must not round the RoPE table, and both are rebuilt lazily
        # on the heads' device (construction may happen on the meta device).
        self.sal_cache: KVCache | None = None
        self._epoch = 0
        self._empty = False                   # set by reset_cache: the SAL cache holds nothing yet
        self._resumed: int | None = None      # set by resume_cache(r): the next step's rows all start at r
        self._rope = None
        self._stage_index = None
        self._stages = None                   # the SAL's layers by stage (lists), for the cpu backend's stack call
        self._aeb_stack = None                # the AEB as decoder layers for that call (see _mix_native)

    def bind(self, target) -> "AmphistaHeads":
        super().bind(target)
        self._rope = None   # rebuilt with the target's RoPE frequency factors (GGUF Llama-3)
        return self

    # ---- pieces ------------------------------------------------------------------------------------------
    def _rope_rows(self, n: int, device) -> torch.Tensor:
        """The SAL's RoPE table with >= n rows, fp32, built from the config (+ the target's GGUF freq factors)."""
        if self._rope is None or self._rope.shape[0] < n or self._rope.device != device:
            ff = self._bound[2] if self._bound is not None else None
            n = max(n, self._rope.shape[0] if self._rope is not None else 0)
            with torch.inference_mode(False):   # made while decoding, it must serve training too: autograd refuses
                self._rope = rope_table(self.sal_config, n, ff).to(device)     # inference tensors
        return self._rope

    def _fuse(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.norm.weight.dtype
        if self.fuse is None:
            return hidden.to(dtype)
        emb = self._target()[0]
        # 4-bit heads: the product on the codes; a 4-bit target's table as codes (cpu_quant.CodesEmbedding): its
        # lookup. Either way ops.fused_sal_input's math
        if cpu_quant.on_codes(self.fuse) or emb.weight.is_meta:
            return self.fuse(torch.cat([hidden.to(dtype), emb(next_tokens).to(dtype)], dim=-1))
        # W_fuse [h ; E(x)] without materialising E(x) or the concatenation
        return ops.fused_sal_input(hidden, next_tokens, emb.weight, self.fuse.weight)

    def _sal(self, x, rope, cache, spec, mask) -> list[torch.Tensor]:
        """Runs the SAL; returns each stage's output (the residual stream after its last layer)."""
        outs, lps = [], self.config.layers_per_stage
        if cache is not None and isinstance(mask, tuple) and mask[1] is None:
            # 4-bit layers on the cpu backend: each stage in one C++ call (csrc/cpu/decoder.h), in place
            if self._stages is None:
                layers = list(self.sal)
                self._stages = [layers[i:i + lps] for i in range(0, len(layers), lps)]
            for i, stage in enumerate(self._stages):
                done = cpu_ops.decoder_layers(stage, None, self.sal_config, x, rope, cache.k[i * lps:(i + 1) * lps],
                                              cache.v[i * lps:(i + 1) * lps], spec.prefix_len, mask[0], self)
                if done is NotImplemented:
                    break
                outs.append(done[0])
                x = done[0].clone()           # the next stage updates its input in place
        for i in range(len(outs) * lps, len(self.sal)):   # float layers (or what the call declined)
            x = self.sal[i](x, rope, cache, spec, mask)
            if (i + 1) % lps == 0:
                outs.append(x)
        return outs

    def _mix_native(self, z: torch.Tensor):
        """4-bit AEB layers on the cpu backend: the block and the final norm in one decoder-stack call
        (csrc/cpu/decoder.h), as decoder layers over the K slots with no rotation (cos 1, sin 0), an empty
        prefix and every slot seeing every slot, in a scratch cache of K slots. NotImplemented elsewhere."""
        if not cpu_quant.on_codes(self.aeb[0].wqkv) or torch.is_grad_enabled() and z.requires_grad:
            return NotImplemented
        N, K, d = z.shape
        st = self._aeb_stack
        if st is None or st.rope.device != z.device:
            H = self.config.aeb_heads
            half = torch.ones(K, d // H // 2, device=z.device)
            st = self._aeb_stack = SimpleNamespace(
                cfg=SimpleNamespace(dim=d, n_heads=H, n_kv_heads=H, head_dim=d // H,
                                    intermediate_size=self.config.aeb_intermediate_size),
                layers=[SimpleNamespace(attention=SimpleNamespace(wqkv=m.wqkv, wo=m.wo), feed_forward=m.feed_forward,
                                        attention_norm=m.attention_norm, ffn_norm=m.ffn_norm) for m in self.aeb],
                rope=torch.cat([half, torch.zeros_like(half)], -1)[None],
                bits=torch.full((1, K), (1 << K) - 1 if K < 64 else -1, dtype=torch.long, device=z.device), k=None)
        if st.k is None or st.k.shape[1] != N or st.k.dtype != z.dtype:     # the scratch cache: per batch size
            st.k = torch.empty(len(st.layers), N, st.cfg.n_heads, K, st.cfg.head_dim, dtype=z.dtype, device=z.device)
            st.v = torch.empty_like(st.k)
            st.prefix = torch.zeros(N, dtype=torch.long, device=z.device)
        x = z + self.pos_emb                                       # a new tensor: the call updates it in place
        out = cpu_ops.decoder_layers(st.layers, self.norm, st.cfg, x, st.rope, st.k, st.v, st.prefix, st.bits, self)
        return out if out is NotImplemented else out[1]

    def mix(self, z: torch.Tensor) -> torch.Tensor:
        """Auto-embedding Block + final norm. z: [..., K, d] head projections -> [..., K, d] features."""
        lead, (K, d) = z.shape[:-2], z.shape[-2:]
        z = z.reshape(-1, K, d)
        native = self._mix_native(z)
        if native is not NotImplemented:
            return native.view(*lead, K, d)
        for i, layer in enumerate(self.aeb):
            z = layer(z, self.pos_emb if i == 0 else None)
        return self.norm(z).view(*lead, K, d)

    def draft(self, stages: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """stages: [..., S, d] stage outputs at the drafting position(s) -> logits [..., K, V]; of the first `depth`
        heads where given (the block still attends over all K slots: each head sees the others)."""
        if self._stage_index is None or self._stage_index.device != stages.device:
            with torch.inference_mode(False):       # as _rope_rows' table: it serves training too
                self._stage_index = torch.tensor(self.config.stage_of_head, device=stages.device)
        x = stages.index_select(-2, self._stage_index)              # [..., K, d]: head k's input
        return self.logits(self.mix(self.res(x))[..., :depth, :])

    # ---- the interface -----------------------------------------------------------------------------------
    def reset_cache(self, batch: int, max_seq_len: int):
        p, c = self.norm.weight, self.sal_config
        cache = self.sal_cache
        # A larger batch's buffers serve a smaller one (rows [:batch]), as the target's cache does: an engine
        # alternating batch sizes would otherwise reallocate them each time, and on a GPU recapture every graph.
        if (cache is None or cache.batch < batch or cache.max_seq_len != max_seq_len
                or cache.k.dtype != p.dtype or cache.k.device != p.device):
            self.sal_cache = None   # free the old buffers first
            self.sal_cache = KVCache(c.n_layers, batch, c.n_kv_heads, max_seq_len, c.head_dim, p.dtype, p.device)
        else:
            self.sal_cache.reset()   # same buffers: captured CUDA graphs stay valid
        self._epoch += 1
        self._rope_rows(max_seq_len, p.device)
        self._empty = True       # the next step (the prompt's) starts every row at slot 0

    def _take_empty(self) -> int | None:
        """The SAL cache length every row has at this step where the host knows it, once: 0 after reset_cache,
        r after resume_cache(r) (batch 1), else None."""
        start = 0 if self._empty else self._resumed
        self._empty, self._resumed = False, None
        return start

    def cache_epoch(self) -> int:
        return self._epoch

    def resume_cache(self, length: int):
        self.sal_cache.length[:1] = length
        self._empty = False
        self._resumed = length       # the next step's new entries attend after it without a dense mask

    def keep_rows(self, keep: torch.Tensor):
        self.sal_cache.keep_rows(keep)

    def prefill_rows(self, rows: torch.Tensor, hidden, next_tokens, count, kv_len: int,
                     depth: int | None = None) -> torch.Tensor:
        # The prompts' entries go to a cache of their own, as at a reset (every row from slot 0), then into place.
        # It holds only the window the step attends over: at the main cache's length it cost a row's whole
        # max_seq_len (~6 MB for SmolLM2 at 2048) that the batch prefill's memory check does not count.
        main, c, p = self.sal_cache, self.sal_config, self.norm.weight
        k, T = hidden.shape[0], hidden.shape[1]
        window = max(T, min(kv_len, main.max_seq_len))
        own = KVCache(c.n_layers, k, c.n_kv_heads, window, c.head_dim, p.dtype, p.device)
        state = (self._empty, self._resumed)
        self.sal_cache, self._empty, self._resumed = own, True, None
        try:
            draft = self.step(hidden, next_tokens, count, kv_len, depth)
        finally:
            self.sal_cache, (self._empty, self._resumed) = main, state
        main.k[:, rows, :, :T] = own.k[:, :, :, :T]
        main.v[:, rows, :, :T] = own.v[:, :, :, :T]
        main.length[rows] = own.length[:k]
        return draft

    def step(self, hidden, next_tokens, count, kv_len: int, depth: int | None = None) -> torch.Tensor:
        """hidden [B, M, d] at target positions L_b + m (L_b = SAL cache length), next_tokens [B, M], count [B].

        Writes all M entries to the SAL cache (padding lands past the new length, where it is overwritten
        before anything reads it), advances the length by count and drafts from entry count - 1 -> [B, K, V]
        ([B, depth, V] where given: the heads a tree that deep reads; each head's LM-head rows cost a CPU about
        as much as the whole ResBlocks pass).
        """
        cache = self.sal_cache
        if cache is None:
            raise RuntimeError("AmphistaHeads.step before reset_cache(batch, max_seq_len)")
        B, M, _ = hidden.shape
        dev = hidden.device
        start = cache.length[:B].clone()   # the length advances below; the spec keeps the old one
        positions = start[:, None] + torch.arange(M, device=dev)
        rope = self._rope_rows(cache.max_seq_len, dev)[positions]
        # After a reset (or a resume, batch 1) a long prompt's entries attend causally without a dense [B, M, kv_len]
        # mask (prefill_mask_args)
        known = self._take_empty()
        spec = AttentionSpec(prefix_len=start, new_mask=causal_mask(M, dev), kv_len=min(kv_len, cache.max_seq_len),
                             empty_prefix=known == 0, kept_prefix=known if B == 1 or known == 0 else None)
        mask = prefill_mask_args(spec, cache.k.dtype)
        outs = self._sal(self._fuse(hidden, next_tokens), rope, cache, spec, mask)
        cache.length[:B] += count
        rows, last = torch.arange(B, device=dev), count - 1
        return self.draft(torch.stack([o[rows, last] for o in outs], dim=1), depth)   # [B, S, d] -> [B, K, V]

    def forward_train(self, hidden, next_tokens) -> torch.Tensor:
        """hidden [B, T, d] at positions 0..T-1, causal over the whole sequence, no cache -> [B, T, K, V]."""
        B, T, _ = hidden.shape
        rope = self._rope_rows(T, hidden.device)[:T][None]
        outs = self._sal(self._fuse(hidden, next_tokens), rope, None, None, None)   # None: causal
        return self.draft(torch.stack(outs, dim=2))
