"""The common drafting-heads base (target binding, LM head, batched ResBlocks) and the Medusa baseline."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, HeadsMismatchError
from ..kernels import backend, cpu_ops, cpu_packed
from .config import HeadsConfig


class HeadResBlocks(nn.Module):
    """K independent stacks of ResBlocks x + SiLU(W x + b), one batched matmul per layer for all heads.

    weight [layers, K, d, d] (nn.Linear's out x in layout), zero: every head starts as the identity.
    """

    def __init__(self, num_heads: int, dim: int, layers: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(layers, num_heads, dim, dim))
        self.bias = nn.Parameter(torch.zeros(layers, num_heads, dim)) if bias else None
        self._codes = None   # per layer: the K heads' weights stacked [K d, d] as codes (cpu_quant.quantize_heads)

    def use_codes(self, pack) -> float:
        """Multiply codes from now on (inference; the float weights stay for training). pack(w [N, K]) ->
        (cpu_ops.PackedWeights or None, error). Returns the largest error."""
        L, K, d, _ = self.weight.shape
        if not L:
            # medusa_layers=0 (public Medusa heads that are per-head LM heads only): nothing to pack, and max() of
            # no errors raised, failing Engine.load_heads on a 4-bit engine
            self._codes = None
            return 0.0
        packed = [pack(self.weight[j].reshape(K * d, d)) for j in range(L)]
        self._codes = None if any(p is None for p, _ in packed) else [p for p, _ in packed]
        return max(err for _, err in packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K, d] (slot k feeds head k) -> [..., K, d]."""
        if self._codes is not None and not (torch.is_grad_enabled() and x.requires_grad):
            out = self._forward_codes(x)
            if out is not NotImplemented:
                return out
        for j in range(self.weight.shape[0]):
            y = torch.einsum("...ki,koi->...ko", x, self.weight[j])   # bmm with K as the batch
            x = x + F.silu(y if self.bias is None else y + self.bias[j])
        # The einsum leaves K outermost in memory: contiguous, the LM head that follows stays one matmul instead of a
        # bmm against a per-row copy of its weight (15x a training step with KL at every position)
        return x.contiguous()

    def _forward_codes(self, x: torch.Tensor):
        # One product per layer against all K heads' rows at once, every slot times every head (K x the
        # arithmetic, the same weight bytes, one call instead of K); slot k keeps head k's block.
        K, d = x.shape[-2:]
        for j, packed in enumerate(self._codes):
            y = cpu_ops.packed_linear(x, packed)                            # [..., K, K d]
            if y is NotImplemented:
                return NotImplemented
            y = y.view(*x.shape[:-1], K, d).diagonal(dim1=-3, dim2=-2).movedim(-1, -2)   # [..., K, d]
            x = x + F.silu(y if self.bias is None else y + self.bias[j])
        return x.contiguous()


class DraftHeads(nn.Module):
    """What the speculative decoder and the trainer call: bind, reset_cache, step, forward_train."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        # The target's embedding and LM head, held in a tuple so nn.Module does not register them: they stay
        # out of parameters(), state_dict() and .to(), frozen and shared by reference.
        self._bound: tuple[nn.Embedding, nn.Linear, torch.Tensor | None] | None = None
        n_out = config.draft_vocab_size or config.vocab_size
        if config.draft_vocab_size:
            # Draft slot i scores token draft_vocab[i]; a buffer so it travels with the checkpoint.
            # Made on the CPU: checkpoint loading builds heads on the meta device, where arange runs as a
            # Python reference that imports torch._dynamo (~0.5-2 s).
            ids = torch.arange(config.draft_vocab_size, device="cpu")
            self.register_buffer("draft_vocab", ids.to(torch.empty(0).device))
        self._w_sub = None    # the target LM head's draft-vocabulary rows, gathered once (see output_weight)
        self._codes_sub = None  # (the target's int8 LM head, its draft rows packed) (see _output_codes)
        self._slot_map = None  # token id -> draft slot (see slots_of), built once per device
        if config.per_head_lm_head:
            self.lm_heads = nn.Parameter(torch.zeros(config.num_heads, n_out, config.dim))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def bind(self, target) -> "DraftHeads":
        c, tc = self.config, target.config
        if (tc.dim, tc.vocab_size) != (c.dim, c.vocab_size):
            raise HeadsMismatchError(f"heads are for d={c.dim}, V={c.vocab_size}; the target has d={tc.dim}, "
                                     f"V={tc.vocab_size}")
        self._bound = (target.tok_embeddings, target.output, getattr(target, "rope_freq_factors", None))
        self._w_sub = self._codes_sub = None
        return self

    def set_draft_vocab(self, token_ids) -> "DraftHeads":
        """Sets the draft vocabulary (config.draft_vocab_size distinct ids in [0, V)), e.g. the most frequent
        tokens of the training data. Per-head LM heads (per_head_lm_head) keep their rows, which may be trained:
        fresh ones start from the target's rows of the vocabulary given to new_heads(draft_vocab=...)."""
        ids = self.check_draft_vocab(token_ids)
        self.draft_vocab.copy_(ids.to(self.draft_vocab.device))
        self._w_sub = self._slot_map = self._codes_sub = None
        return self

    def check_draft_vocab(self, token_ids) -> torch.Tensor:
        """token_ids as a CPU int64 tensor, once they are config.draft_vocab_size distinct integer ids in [0, V)."""
        c = self.config
        if not c.draft_vocab_size:
            raise ConfigError("these heads draft over the full vocabulary (draft_vocab_size = 0)")
        ids = torch.as_tensor(token_ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:   # 1.5 -> 1 would be silent
            raise ConfigError(f"draft vocabulary token ids must be integers, got dtype {ids.dtype}")
        ids = ids.detach().to(device="cpu", dtype=torch.long).flatten()
        if ids.numel() != c.draft_vocab_size or ids.unique().numel() != ids.numel() \
                or int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size:
            raise ConfigError(f"draft vocabulary must be {c.draft_vocab_size} distinct token ids in "
                              f"[0, {c.vocab_size})")
        return ids

    def token_ids(self, slots: torch.Tensor) -> torch.Tensor:
        """Draft slots (indices into the logits' last dim) -> token ids."""
        return self.draft_vocab[slots] if self.config.draft_vocab_size else slots

    def slots_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> draft slots (the inverse of token_ids); -1 for a token outside the draft vocabulary."""
        if not self.config.draft_vocab_size:
            return tokens
        inv = self._slot_map
        if inv is None or inv.device != tokens.device:
            inv = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=tokens.device)
            inv[self.draft_vocab.to(tokens.device)] = torch.arange(self.config.draft_vocab_size, device=tokens.device)
            self._slot_map = inv
        return inv[tokens]

    def output_weight(self) -> torch.Tensor:
        """The shared LM head the drafts are scored with: the target's [V, d], or its draft-vocabulary rows (int8
        rows as floats where a 4-bit engine freed the float head: cpu_quant.quantize_head)."""
        emb, head = self._target()[:2]
        w = head.weight
        if not self.config.draft_vocab_size and not w.is_meta:
            return w
        # where the rows live: a 4-bit model's tied head and coded table are both meta (cpu_quant.CodesEmbedding), and
        # comparing with the meta device gathered the rows again at every call
        device = next((t.device for t in (w, emb.weight) if not t.is_meta), torch.device("cpu"))
        sub = self._w_sub
        if sub is None or sub.device != device or sub.dtype != w.dtype:
            # Frozen target: gathered once per bind / vocabulary, not per step (a static tensor for CUDA graphs).
            rows = self.draft_vocab if self.config.draft_vocab_size else None
            with torch.inference_mode(False):       # gathered while decoding, they must serve training too
                sub = self._w_sub = (head.float_rows(rows, w.dtype) if w.is_meta
                                     else w.detach().index_select(0, rows.to(w.device)))
        return sub

    def _target(self):
        if self._bound is None:
            raise RuntimeError("drafting heads are not bound to a target model: call heads.bind(model) first")
        return self._bound

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K', d] final features of the first K' <= K heads -> [..., K', V] (V = draft_vocab_size when set:
        map with token_ids)."""
        if self.config.per_head_lm_head:
            return torch.einsum("...kd,kvd->...kv", x, self.lm_heads[:x.shape[-2]])
        codes = None if torch.is_grad_enabled() and x.requires_grad else self._output_codes()   # no backward there
        if codes is not None:
            out = cpu_ops.packed_linear(x, codes)
            if out is not NotImplemented:
                return out
        head = self._target()[1]
        if not self.config.draft_vocab_size and type(head) is cpu_packed.PackedLinear and head.bias is None:
            # the target's own oneDNN copy scores the full vocabulary: packing its weight again here kept a third
            # copy of the LM head (and an engine that freed the float weight has only that copy)
            return head(x.to(head.weight.dtype))
        w = self.output_weight()
        return cpu_packed.linear(x.to(w.dtype), w)

    def _output_codes(self):
        """A 4-bit target's LM head runs int8 on the cpu backend (kernels/cpu_quant.py): the draft scores its rows
        the same way (int8 codes of the draft vocabulary's rows, a quarter of the bytes of fp32). None elsewhere."""
        packed = getattr(self._target()[1], "_packed_native", None)
        if packed is None or packed.bits != 8 or backend.resolve("quant_linear", "cpu") != cpu_ops.BACKEND:
            return None
        cached = self._codes_sub
        if cached is None or cached[0] is not packed:
            codes, scale = cpu_ops.unpack(packed)
            if self.config.draft_vocab_size:
                ids = self.draft_vocab.to(codes.device)
                codes, scale = codes[ids], scale[ids]
            cached = self._codes_sub = (packed, cpu_ops.pack_int8(codes, scale))
        return cached[1]

    def reset_cache(self, batch: int, max_seq_len: int):
        pass

    def cache_epoch(self) -> int:
        """Changes whenever the heads' own cache is reset: a kept prefix is only valid within one epoch."""
        return 0

    def resume_cache(self, length: int):
        """Continue row 0 after its first `length` entries (a prefix kept from the previous run)."""

    def keep_rows(self, keep: torch.Tensor):
        """Rows keep[i] of the heads' own cache become row i (a batch dropped its ended rows)."""

    def prefill_rows(self, rows: torch.Tensor, hidden, next_tokens, count, kv_len: int,
                     depth: int | None = None) -> torch.Tensor:
        """Drafts [len(rows), K, V] for prompts that join a run between steps, as step() drafts at a prefill: their
        entries go to rows `rows` of the heads' own cache, the other rows' untouched. Heads without a cache of
        their own just draft."""
        return self.step(hidden, next_tokens, count, kv_len, depth)


class MedusaHeads(DraftHeads):
    """K ResBlock stacks on the target's last hidden state h_t, then the (target's or own) LM head."""

    def __init__(self, config: HeadsConfig):
        super().__init__(config)
        self.res = HeadResBlocks(config.num_heads, config.dim, config.medusa_layers, config.resblock_bias)

    def _heads(self, h: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """h: [..., d] -> logits [..., K, V] (of the first `depth` heads where given)."""
        x = h.unsqueeze(-2).expand(*h.shape[:-1], self.num_heads, h.shape[-1])
        return self.logits(self.res(x.to(self.res.weight.dtype))[..., :depth, :])

    def step(self, hidden, next_tokens, count, kv_len: int, depth: int | None = None) -> torch.Tensor:
        """hidden [B, M, d]; drafts from row b's entry count[b] - 1 -> [B, K, V]. Medusa ignores the tokens.
        depth: only the first `depth` heads' logits ([B, depth, V]), all a tree that deep reads: a CPU's LM-head
        rows cost about as much each as the whole ResBlocks pass."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self._heads(hidden[rows, count - 1], depth)

    def forward_train(self, hidden, next_tokens) -> torch.Tensor:
        """hidden [B, T, d] -> [B, T, K, V]."""
        return self._heads(hidden)
