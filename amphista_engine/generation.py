"""Decoders (plain now, speculative beside it) and the host loop that turns their steps into text.

A decoder has two calls: `prefill(prompts)` returns the first sampled token per row, and `step()` returns
a fixed-width block of new tokens per row plus how many of them are real. Both stay on the device; the host
loop reads one small tensor per step, because it must stream text and test stop conditions anyway.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import InputError, NonFiniteError
from .kernels.cpu_threads import on_pool
from .kv_cache import KVCache
from .model import AttentionSpec, Transformer, causal_mask
from .sampling import SamplingParams, answer_penalties, sample, tree_penalties

KV_BUCKET = 128   # attention reads cache slots in multiples of this; bounds work to the real length
NON_FINITE = -2   # a token no vocabulary has: its row's logits held a NaN or an infinity
NO_TOKEN = -3     # another: every token of its row was ruled out (allowed_token_ids, bad_words, a grammar, ...)
# sequence_scores pads a CPU forward to a multiple of this many tokens: the fp32 SIMD lanes (AVX-512) over which
# PyTorch's CPU flash attention sums keys, as kernels/cpu_exact.py's WINDOW is; AVX2's 8 lanes divide it
SCORE_ALIGN = 16


def flag_non_finite(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """tokens [B, ...] with every token of a row whose logits [B, ..., V] hold a NaN or +inf (or are all -inf)
    set to NON_FINITE: the host reads tokens every step anyway, so the check costs one reduction, no sync. amax
    propagates NaN; -inf logits (masked tokens) are no fault while the row has a finite maximum."""
    ok = torch.isfinite(logits.amax(tuple(range(1, logits.dim()))))     # [B]: few ops, each costs ~5 us on a CPU
    return torch.where(ok.view(-1, *([1] * (tokens.dim() - 1))), tokens, NON_FINITE)


def flag_no_token(tokens: torch.Tensor, chosen_from: torch.Tensor | None,
                  nodes: torch.Tensor | None = None) -> torch.Tensor:
    """tokens [B, ...] with every token of a row set to NO_TOKEN where the logits a token was chosen from (after
    logit_bias, allowed_token_ids, bad words, min_tokens, a grammar and the penalties) are all -inf: sampling there
    drew any token at all (NaN probabilities) and greedy took token 0. chosen_from: [B, V], or a verified tree's
    [B, N, V] with nodes [B, D + 1] the accepted nodes (-1 past them): a ruled-out node nobody accepted is no fault,
    and only the tokens [B, D + 1] from the first ruled-out accepted node on are flagged (token j is chosen at node
    j): those before it are plain decoding's, and a row that ends in them (max_new_tokens, a stop string) never
    reaches the ruled-out position, as a plain run never does.
    One reduction, no sync, as flag_non_finite; none where chosen_from is None (nothing was masked)."""
    if chosen_from is None:
        return tokens
    dead = chosen_from.amax(-1) == float("-inf")
    if nodes is not None:
        dead = (dead.gather(1, nodes.clamp(min=0)) & (nodes >= 0)).cumsum(1) > 0
        return torch.where(dead, NO_TOKEN, tokens)
    return torch.where(dead.view(-1, *([1] * (tokens.dim() - 1))), NO_TOKEN, tokens)


def no_token_message(places: list[tuple[str, int]]) -> str:
    """The error of rows left no token to choose: places, (what names the row, its new token number) each."""
    where = " and ".join(f"at new token {n} of {what}" for what, n in places)
    return (f"no token is left to choose {where}: allowed_token_ids, bad_words, logit_bias, min_tokens and "
            f"response_format together rule out every token there; allow more tokens")


def no_token_error(rows: list[tuple[int, int]]) -> InputError:
    """InputError for rows left no token to choose, (row, new token number) each, in the prompts' order. One row's
    carries prompt_index and new_token (a server names it by its request: the row is its own numbering)."""
    e = InputError(no_token_message([(f"prompt {row}", n) for row, n in rows]))
    if len(rows) == 1:
        e.prompt_index, e.new_token = rows[0]
    return e


def check_finite(decoder, tokens: list[int], row: int, emitted: int):
    """Raises NonFiniteError where a step's tokens carry NON_FINITE, after marking the caches for clearing; an
    InputError where they carry NO_TOKEN."""
    if NO_TOKEN in tokens and NON_FINITE not in tokens:
        raise no_token_error([(row, emitted + 1)])
    if NON_FINITE not in tokens:
        return
    for cache in (decoder.cache, getattr(getattr(decoder, "heads", None), "sal_cache", None)):
        if cache is not None:
            cache.dirty = True
    where = f"the model's logits are not finite (NaN or inf) at new token {emitted + 1} of prompt {row}"
    bad = _non_finite_weight(decoder)
    if bad is not None:
        raise NonFiniteError(f"{where}: the {bad} holds NaN or inf, so the checkpoint is damaged (or was changed "
                             f"after loading); no token from it can be trusted. The KV cache is cleared before the "
                             f"next run")
    dtype = decoder.cache.k.dtype
    hint = " (fp16 overflows where bf16 and fp32 do not: try dtype bf16 or fp32)" if dtype == torch.float16 else ""
    raise NonFiniteError(f"{where}: its activations overflowed{hint}; no token from them can be trusted. The KV "
                         f"cache is cleared before the next run")


def _non_finite_weight(decoder) -> str | None:
    """The first weight of the target, then of the heads, holding a NaN or an infinity ("target weight NAME"), or
    None. Looked for only once a step's logits were not finite: a damaged checkpoint is named then, and loading
    pays nothing for the check (a 7B model's scan costs seconds on a CPU). Parameters only: buffers such as masks
    may hold -inf by design."""
    for owner, module in (("target", decoder.model), ("heads'", getattr(decoder, "heads", None))):
        if isinstance(module, torch.nn.Module):
            for name, w in module.named_parameters():
                if w.is_floating_point() and w.device.type != "meta" and not bool(torch.isfinite(w).all()):
                    return f"{owner} weight {name}"
    return None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, N] fp32 log-probabilities of tokens [B, N] under logits [B, N, V]: the target's own distribution, before
    temperature, top-k/top-p or a repetition penalty (what OpenAI's and vLLM's logprobs report by default)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None].clamp(min=0))[..., 0]


MAX_TOP_LOGPROBS = 20     # OpenAI's limit for top_logprobs
LOGPROB_FLOOR = -9999.0   # vLLM's: a logprob of -inf (a token the model rules out) as a number JSON can carry


def token_scores(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0, ranks: bool = False):
    """(token_logprobs(logits, tokens), top values [B, N, top], top ids [B, N, top]) from one log_softmax, so a
    greedy token's logprob is bit-equal to the first of its top list; the last two None where top is 0. The top
    entries are sorted by log-probability, descending (the same distribution: before temperature and the rest).
    ranks: a fourth item, each token's rank in the vocabulary (vLLM's prompt_logprobs rank: the tokens at least as
    likely as it, itself included, so 1 is the likeliest)."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    lp = lsm.gather(-1, tokens[..., None].clamp(min=0))[..., 0]
    values, ids = lsm.topk(min(top, lsm.shape[-1]), dim=-1) if top else (None, None)
    if ranks:
        return lp, values, ids, (lsm >= lp[..., None]).sum(-1)
    return lp, values, ids


def sequence_scores(model, ids: list[int], start: int = 1, top: int = 0, block: int = 512, ranks: bool = False):
    """The log-probability of each token ids[start:] given the tokens before it, from one forward pass of `model`
    over ids (no KV cache: it attends causally within them), the logits at position i - 1 scoring token i. Returns
    (logprobs [n - start] fp64 on the CPU, top values [n - start, top] fp32 or None, top ids or None). The LM head
    runs on the scored positions only; their log_softmax is taken `block` rows at a time, so a long prompt holds one
    block's fp32 copy of the logits at once. Shared by Engine.prompt_logprobs and evaluation.perplexity. ranks: a
    fourth item, each token's rank in the vocabulary (token_scores; [n - start] int64 on the CPU)."""
    n = len(ids)
    if not 1 <= start < n:
        raise ValueError(f"start must be in [1, {n}), got {start}")
    device = model.device
    # Why pad: PyTorch's CPU causal SDPA sums each query's keys in SCORE_ALIGN-lane vectors and the last
    # (T mod SCORE_ALIGN) keys of the call apart, so a position's fp32 attention output depended on the sequence's
    # total length in its last bit, which the 4-bit layers' int8-rounded activations grew to up to 0.3 nats of a
    # token's logprob (a prefix scored alone vs inside a longer text). Attention is causal, so trailing filler
    # tokens cannot reach the real positions; with T a multiple of SCORE_ALIGN a real position is computed the
    # same bits whatever the length, below 768 tokens (kernels/cpu_exact._q_split: from there flash's 256-row query
    # blocks still move a position by up to ~0.04 nats; python_tests/test_prompt_scores_user_qa.py).
    padded = n
    if device.type == "cpu":
        padded = min(max(n, getattr(model, "rope_len", n)), -(-n // SCORE_ALIGN) * SCORE_ALIGN)
    tokens = torch.tensor([ids + [ids[-1]] * (padded - n)], device=device)
    with torch.inference_mode():
        targets = tokens[0, start:n]
        cache = _score_cache(model, n)
        if cache is not None:
            hidden = _chunked_hidden(model, tokens[:, :n], cache)[0, start - 1:n - 1]
            parts = [token_scores(model.logits(hidden[s:s + block]), targets[s:s + block], top, ranks)
                     for s in range(0, n - start, block)]
        else:
            logits = model(tokens, torch.arange(padded, device=device)[None],
                           logits_at=torch.arange(start - 1, n - 1, device=device)[None])[0]
            parts = [token_scores(logits[s:s + block], targets[s:s + block], top, ranks)
                     for s in range(0, n - start, block)]
    lp = torch.cat([p[0] for p in parts]).double().cpu()
    out = (lp, None, None) if not top else (lp, torch.cat([p[1] for p in parts]).cpu(),
                                            torch.cat([p[2] for p in parts]).cpu())
    return out + (torch.cat([p[3] for p in parts]).cpu(),) if ranks else out


def _score_cache(model, n: int) -> KVCache | None:
    """A KV cache for scoring n tokens in chunks where the model prefills in chunks (Transformer.prefill_chunk: a 4-bit
    model on the cpu backend, whose C++ layer stack sums attention in position order for up to STACK_ROWS rows).
    Padding to SCORE_ALIGN did not make SDPA's causal path length-invariant on every CPU: on an AVX2 AMD EPYC its
    matmuls round by the key count (lengths 208-368 of 768 apart in the last bit), which the int8-rounded
    activations grew to 0.14 nats of a token's logprob. None: one forward, as before."""
    if model.device.type != "cpu":
        return None
    cache = KVCache.for_model(model.config, 1, n, model.tok_embeddings.weight.dtype, model.device)
    return cache if model.prefill_chunk(cache) is not None else None


def _chunked_hidden(model, tokens: torch.Tensor, cache: KVCache, start: int = 0,
                    chunk: int | None = None) -> torch.Tensor:
    """Final-norm hidden states [B, T - start, d] of tokens[:, start:] prefilled through `cache` in the model's
    prefill chunks (Transformer.prefill_chunk; or `chunk` tokens a forward), from position `start` (every row's
    cache holds [0, start)): a position's chunk and the keys it reads depend on the position only, not on the
    length."""
    chunk, (B, T), device = chunk or model.prefill_chunk(cache), tokens.shape, tokens.device
    hidden = []
    for s in range(start, T, chunk):
        e = min(s + chunk, T)
        cache.length[:B] = s
        spec = AttentionSpec(cache.length[:B], causal_mask(e - s, device), kv_window(e, cache.max_seq_len))
        _, h = model(tokens[:, s:e], torch.arange(s, e, device=device)[None].expand(B, e - s), cache, spec,
                     return_hidden=True, logits_at=torch.empty(B, 0, dtype=torch.long, device=device))
        hidden.append(h)
    return torch.cat(hidden, 1)


def kv_window(upper: int, max_seq_len: int) -> int:
    return min(max_seq_len, -(-upper // KV_BUCKET) * KV_BUCKET)


class PlainDecoder:
    """Autoregressive decoding over a static cache, any batch size, rows of different prompt lengths."""

    tokens_per_step = 1

    def __init__(self, model: Transformer, cache: KVCache, params: SamplingParams):
        self.model, self.cache, self.params = model, cache, params
        self.device = model.device
        self.generator = params.generator(self.device)
        # logit_bias as a dense [V] row added to the logits every token is chosen from (None: no bias); counts [B, V]:
        # the answer's tokens so far, for presence/frequency penalties (set at prefill; None when they are off)
        self.bias = params.bias_tensor(model.config.vocab_size, self.device)
        # bad words of several tokens (vLLM's bad_words): bad_last [W] is banned where the answer's latest tokens are
        # bad_prefix [W, R]'s row (newest first, -1 past a word's length: any token); recent [B, R]: each row's
        # last R answer tokens, oldest first (-1 before its first: a word never spans the prompt), set at prefill
        self.bad_last = self.bad_prefix = self.recent = None
        multi = [w for w in params.bad_words_ids if len(w) > 1]
        if multi:
            R = max(len(w) for w in multi) - 1
            self.bad_last = torch.tensor([w[-1] for w in multi], device=self.device)
            self.bad_prefix = torch.tensor([list(w[-2::-1]) + [-1] * (R + 1 - len(w)) for w in multi],
                                           device=self.device)
        self.seen = self.counts = None       # seen [B, V]: the prompt's and answer's tokens (repetition_penalty)
        # Set by the engine (stream_batch(min_tokens=N)): the ending token ids (EOS, stop_token_ids) that no token
        # may be before a row has N; produced [B]: each row's tokens so far (set at prefill)
        self.min_tokens, self.ban_ids, self.produced = 0, None, None
        self.host_len = 0        # host-side upper bound of every row's length: sizes the attention window only
        self.forwards = 0
        # Set by the engine before prefill (batch 1): the cache already holds this many leading prompt tokens'
        # K/V from the previous run (Engine.stream(..., reuse_prefix=True)), so only the rest is prefilled.
        self.prefix_reuse = 0
        # Set by the engine (stream_batch(logprobs=True)): each step also fills step_logprobs [B, tokens], the
        # target's log-probability of each token it gives, read by the host loop with the tokens
        self.logprobs = False
        self.step_logprobs: torch.Tensor | None = None
        # stream_batch(top_logprobs=N): also step_top_values / step_top_ids [B, tokens, N], the N most likely tokens
        # at each given token's position (rebound each step, as step_logprobs)
        self.top_logprobs = 0
        self.step_top_values: torch.Tensor | None = None
        self.step_top_ids: torch.Tensor | None = None
        # Set by the engine (stream_batch(response_format=...)): structured.Constraint, the rows' grammar matchers;
        # `emitted` holds the last step's tokens and counts until the next step advances the matchers by them
        self.constraint = None
        self.emitted = None

    @on_pool
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Right-padded batch prefill; each row's cache length becomes its own prompt length."""
        B, T = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p)
        tokens = tokens.to(self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        r = self.prefix_reuse if B == 1 else 0
        self.cache.reset()
        if r:
            self.cache.length[:B] = r
        chunk = self.model.prefill_chunk(self.cache)
        if chunk is None or T - r <= chunk:
            # r == 0: every row starts at slot 0 (reset above), so a long prompt attends without a dense mask; so
            # does a long message after a kept prefix (r > 0: batch 1, the host knows its one row's start)
            spec = AttentionSpec(self.cache.length[:B], causal_mask(T - r, self.device),
                                 kv_window(T, self.cache.max_seq_len), empty_prefix=r == 0, kept_prefix=r)
            positions = torch.arange(r, T, device=self.device)[None].expand(B, T - r)
            logits, hidden = self.model(tokens[:, r:], positions, self.cache, spec, return_hidden=True,
                                        logits_at=(lengths - 1 - r)[:, None])
        else:
            logits, hidden = self._prefill_chunks(tokens, lengths, r, chunk)
        self.cache.length[:B] = lengths      # padded slots past a row's length are overwritten later
        self.host_len = T
        # 1 while a row decodes, 0 once it ended (end_row): its cache length stops there, never past its prompt +
        # its own max_new_tokens while the batch's longer rows go on (rows of one batch may have their own limits)
        self.ongoing = torch.ones(B, dtype=torch.long, device=self.device)
        self.forwards += 1
        self.seen = None
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            # a short row's right padding (token 0) is no token of its prompt: it takes the row's first token
            pad = torch.arange(T, device=self.device)[None] >= lengths[:, None]
            self.seen.scatter_(1, torch.where(pad, tokens[:, :1], tokens), True)
        self.counts = None
        self.produced = torch.zeros(B, dtype=torch.long, device=self.device) if self.min_tokens else None
        if self.params.penalized:
            self.counts = torch.zeros(B, self.model.config.vocab_size, dtype=torch.int32, device=self.device)
        if self.bad_prefix is not None:
            self.recent = torch.full((B, self.bad_prefix.shape[1]), -1, dtype=torch.long, device=self.device)
        self._on_prefill(tokens[:, r:], hidden)
        self.next = self._sample(logits[:, -1])
        self.emitted = (self.next[:, None], torch.ones_like(self.next))
        if self.logprobs:
            self._score(logits[:, -1:], self.next[:, None])
        # not the state tensor itself: it changes in place every step
        return flag_no_token(flag_non_finite(self.next, logits), self.chosen_from)

    def _prefill_chunks(self, tokens, lengths, r: int, chunk: int):
        """Prefill [r, T) in forwards of `chunk` tokens (_chunked_hidden): (last-token logits, hidden)."""
        hidden = _chunked_hidden(self.model, tokens, self.cache, r, chunk)
        last = (lengths - 1 - r)[:, None, None].expand(-1, 1, hidden.shape[-1])
        return self.model.logits(torch.gather(hidden, 1, last)), hidden     # as the forward's logits_at does

    def _score(self, logits: torch.Tensor, tokens: torch.Tensor):
        """step_logprobs (and the top_logprobs tensors) of tokens [B, n] at logits [B, n, V]. Rebound, never updated
        in place: a captured graph re-points them after each replay (cuda_graphs' `rebound`)."""
        self.step_logprobs, self.step_top_values, self.step_top_ids = token_scores(logits, tokens, self.top_logprobs)

    def _on_prefill(self, tokens: torch.Tensor, hidden: torch.Tensor):
        """Hook for decoders that also need the prompt's hidden states (the drafting heads do): those of the
        prefilled tokens, the ones after prefix_reuse."""

    def _biased(self, logits: torch.Tensor, tree=None) -> torch.Tensor:
        """logits + logit_bias (with allowed_token_ids' and one-token bad words' -inf), then the bad words of several
        tokens banned, in fp32 (the logits themselves without either): what tokens are chosen from, in plain steps
        and tree verification alike (each node after its own path: tree), so greedy speculative output still
        equals plain output."""
        if self.bias is not None:
            logits = logits.float() + self.bias
        if self.bad_last is None:
            return logits
        hit = ((self._latest(tree)[..., None, :] == self.bad_prefix) | (self.bad_prefix < 0)).all(-1)   # [B, (N,) W]
        ban = torch.where(hit, float("-inf"), 0.0)
        return logits.float().scatter_add(-1, self.bad_last.expand(*hit.shape), ban)    # a copy: logprobs read them

    def _latest(self, tree=None) -> torch.Tensor:
        """The R tokens before the one chosen next, newest first: [B, R] the answer's, or [B, N, R] at each node of a
        verified tree, its path below the root (the node itself first) and then the answer's (the root is in it)."""
        back = self.recent.flip(1)
        if tree is None:
            return back
        tokens, R = tree.tokens, back.shape[1]
        B, N = tokens.shape
        depth, parent = ((t if tree.batched else t.expand(B, N)) for t in (tree.depth, tree.parent))
        node = torch.arange(N, device=tokens.device).expand(B, N)
        used = torch.zeros_like(node)        # answer tokens each node's walk has taken
        out = []
        for _ in range(R):
            inside = depth.gather(1, node) > 0
            out.append(torch.where(inside, tokens.gather(1, node), back.gather(1, used)))
            used = used + (~inside).long()
            node = torch.where(inside, parent.gather(1, node).clamp(min=0), node)
        return torch.stack(out, -1)

    def _held_back(self, logits: torch.Tensor, depth: torch.Tensor | int = 0) -> torch.Tensor:
        """min_tokens: the ending tokens' logits at -inf where the token chosen from them would be a row's
        (produced + depth)-th, below min_tokens (depth: a tree node's, [N] or [B, N]; logits [B, V] or [B, N, V])."""
        if self.produced is None:
            return logits
        early = self.produced.view(-1, *([1] * (logits.dim() - 2))) + depth < self.min_tokens
        held = torch.where(early, float("-inf"), 0.0)[..., None].expand(*early.shape, len(self.ban_ids))
        return logits.float().scatter_add(-1, self.ban_ids.expand(*early.shape, -1), held)

    def _constrained(self, logits: torch.Tensor, tree=None) -> torch.Tensor:
        """response_format: what each row's grammar forbids at -inf (per tree node in a speculative step)."""
        if self.constraint is None:
            return logits
        if tree is None:
            return self.constraint.apply(logits)
        return self.constraint.apply_tree(logits, tree.tokens, tree.mask if tree.batched else tree.mask[None],
                                          tree.depth if tree.batched else tree.depth[None])

    def _advance_constraint(self):
        """The rows' grammar matchers past the tokens the last step emitted (a host sync: constrained runs are
        eager anyway)."""
        if self.constraint is not None and self.emitted is not None:
            self.constraint.consume(*self.emitted)
            self.emitted = None

    def _penalised(self, logits: torch.Tensor, tree=None) -> torch.Tensor:
        """The repetition, presence and frequency penalties on the answer so far: logits [B, V], or at every node of a
        verified tree (logits [B, N, V]), each node also penalised for its own path's tokens."""
        if self.seen is None and self.counts is None:
            return logits
        if tree is not None:
            return tree_penalties(logits, tree.tokens, tree.path_below_root(), self.seen, self.counts, self.params)
        return answer_penalties(logits, self.seen, self.counts, self.params)

    def _record(self, tokens: torch.Tensor, count: torch.Tensor | None = None):
        """Emitted tokens [B, n] into seen / counts: each row's first count[b] (None: all n). A row's unused entries
        stand on its first token (a row that emitted none has ended: nothing it holds is read again)."""
        if self.recent is not None:       # each row's last R tokens of recent + its first count[b] of tokens
            take = torch.full_like(tokens[:, 0], tokens.shape[1]) if count is None else count
            at = take[:, None] + torch.arange(self.recent.shape[1], device=tokens.device)
            self.recent.copy_(torch.cat([self.recent, tokens], 1).gather(1, at))
        if self.seen is None and self.counts is None:
            return
        real = None if count is None else torch.arange(tokens.shape[1], device=tokens.device) < count[:, None]
        if self.seen is not None:
            self.seen.scatter_(1, tokens if real is None else torch.where(real, tokens, tokens[:, :1]), True)
        if self.counts is not None:
            ones = torch.ones_like(tokens, dtype=torch.int32) if real is None else real.int()
            self.counts.scatter_add_(1, tokens, ones)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        # first, as vLLM's logits processors come before its penalties
        raw, logits = logits, self._penalised(self._constrained(self._held_back(self._biased(logits))))
        # rebound each step (flag_no_token reads it); None where nothing masked a token (each mask gives its input
        # back when off): all -inf there is the model's own, which flag_non_finite names
        self.chosen_from = None if logits is raw else logits
        tok = sample(logits, self.params, self.generator)
        self._record(tok[:, None])
        if self.produced is not None:
            self.produced += 1
        return tok

    @torch.inference_mode()
    def end_row(self, i: int):
        """Row i's answer is complete (the driver drops its later tokens): its cache length stops advancing. The
        host loop drops ended rows only in bunches (keep_rows, never under CUDA graphs), and a row kept meanwhile
        went on one slot a step: past its prompt + its own max_new_tokens where another row's limit is larger."""
        self.ongoing[i] = 0

    def can_drop_rows(self) -> bool:
        """Eager decoding only: a captured CUDA graph holds the batch size and the state buffers (and on a GPU a
        step costs about the same for fewer rows)."""
        return getattr(self, "_decode_graphs", None) is None

    @torch.inference_mode()
    def keep_rows(self, keep: list[int]):
        """Go on with only these rows, renumbered 0..n-1: rows that ended stop costing compute (a batch of
        distillation answers runs until its longest answer ends; on a CPU a step costs ~linearly in rows)."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)     # [] too (every row ended, one joins)
        self.cache.keep_rows(idx)
        self.next = self.next[idx]
        self.ongoing = self.ongoing[idx]
        if self.step_logprobs is not None:
            self.step_logprobs = self.step_logprobs[idx]
        if self.step_top_values is not None:      # a dropped row drops its top entries too
            self.step_top_values, self.step_top_ids = self.step_top_values[idx], self.step_top_ids[idx]
        if self.seen is not None:
            self.seen = self.seen[idx]
        if self.counts is not None:
            self.counts = self.counts[idx]
        if self.produced is not None:
            self.produced = self.produced[idx]
        if self.recent is not None:
            self.recent = self.recent[idx]
        if self.constraint is not None:
            self._advance_constraint()
            self.constraint.keep(keep)
        return idx

    # ---- rows that join a run between steps (stream_batch's admit: a server's requests arriving mid-run) -----------
    def row_capacity(self) -> int:
        """How many rows the batch may grow to (add_rows): the cache's; none under a response_format (the joiners'
        matchers would need their own prefill's token)."""
        return 0 if self.constraint is not None else self.cache.batch

    def _grow(self, B: int):
        """The per-row state tensors with rows up to B (new rows zero: ended until add_rows fills them)."""
        def grow(t):
            return t if t is None or t.shape[0] >= B else torch.cat([t, t.new_zeros((B - t.shape[0],) + t.shape[1:])])
        for name in ("next", "ongoing", "seen", "counts", "produced", "draft", "last_count", "recent"):
            if getattr(self, name, None) is not None:
                setattr(self, name, grow(getattr(self, name)))

    @on_pool
    @torch.inference_mode()
    def add_rows(self, slots: list[int], prompts: list[list[int]]):
        """Prefill prompts into cache rows `slots` (ended rows, or the next rows past the batch, up to row_capacity)
        while the other rows keep their state. The prompts prefill as a batch of their own into a cache of their
        length, whose K/V are then copied into place: the same bits a run of their own gives them. Returns the prefill
        decoder (its `next`: the new rows' first tokens, and their logprobs where the run reports them)."""
        k, T = len(prompts), max(len(p) for p in prompts)
        cfg = self.model.config
        tmp = PlainDecoder(self.model, KVCache.for_model(cfg, k, kv_window(T, self.cache.max_seq_len),
                                                         self.cache.k.dtype, self.device), self.params)
        tmp.generator, tmp.logprobs, tmp.top_logprobs = self.generator, self.logprobs, self.top_logprobs
        tmp.min_tokens, tmp.ban_ids = self.min_tokens, self.ban_ids
        captured = {}
        tmp._on_prefill = lambda tokens, hidden: captured.update(tokens=tokens, hidden=hidden)
        tmp.first = tmp.prefill(prompts)
        self.forwards += 1
        self._grow(max(slots) + 1)
        idx = torch.tensor(slots, device=self.device)
        for j, (slot, p) in enumerate(zip(slots, prompts)):
            self.cache.k[:, slot, :, :len(p)] = tmp.cache.k[:, j, :, :len(p)]
            self.cache.v[:, slot, :, :len(p)] = tmp.cache.v[:, j, :, :len(p)]
        self.cache.length[idx] = tmp.cache.length[:k]
        self.host_len = max(self.host_len, T)
        self.next[idx] = tmp.next
        self.ongoing[idx] = 1
        if self.seen is not None:
            self.seen[idx] = tmp.seen
        if self.counts is not None:
            self.counts[idx] = tmp.counts
        if self.produced is not None:
            self.produced[idx] = tmp.produced
        if self.recent is not None:
            self.recent[idx] = tmp.recent
        # rebound by every step for every row: the next step's cover the new rows too
        self.step_logprobs = self.step_top_values = self.step_top_ids = None
        self._on_add_rows(idx, tmp, captured)
        return tmp

    def _on_add_rows(self, idx: torch.Tensor, tmp: "PlainDecoder", captured: dict):
        """Hook for decoders with more per-row state (the drafting heads' own cache, the drafts)."""

    @on_pool
    @torch.inference_mode()
    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the last token, sample the next. Returns ([B, 1] tokens, [B] count of real tokens)."""
        self.host_len += 1
        self.forwards += 1
        self._advance_constraint()
        out = self.step_device(kv_window(self.host_len, self.cache.max_seq_len))
        if self.constraint is not None:
            self.emitted = (self.next[:, None].clone(), torch.ones_like(self.next))
        return out

    def step_device(self, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The device work of a step. It updates the decoder's state tensors in place (never rebinds them),
        so a CUDA graph that captured one call can replay it."""
        B = self.next.shape[0]
        length = self.cache.length[:B]
        spec = AttentionSpec(length, causal_mask(1, self.device), kv_len, decode=True)
        logits = self.model(self.next[:, None], length[:, None], self.cache, spec)
        length += self.ongoing           # an ended row stays where it is (end_row)
        self.next.copy_(self._sample(logits[:, -1]))
        if self.logprobs:       # rebound, not updated in place: a captured graph re-points it after each replay
            self._score(logits[:, -1:], self.next[:, None])
        return flag_no_token(flag_non_finite(self.next[:, None], logits), self.chosen_from), torch.ones_like(self.next)


@dataclass
class GenerationStats:
    """Counts and timings of one answer. A batch's row counts its own tokens and steps (new_tokens, decode_steps,
    step_tokens, accept_hist: the steps until it ended), but its times are the batch's. Times are milliseconds of wall
    clock: prefill_ms the prompt's forward (and first token), decode_ms the steps after it (less the time a stream's
    caller spent between chunks). decode_tokens_per_s and tau are derived; extra holds what a run adds: the tree,
    its time split (time_ms), prompt_tokens_reused. to_dict() gives plain JSON-serializable values."""
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    decode_steps: int = 0             # target forwards after prefill
    step_tokens: int = 0              # tokens those forwards produced that were used (an ending EOS included)
    accept_hist: list[int] = field(default_factory=list)   # accept_hist[n]: steps that emitted n tokens
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        # Tokens after the first (the first comes from prefill) over decode time.
        return (self.new_tokens - 1) / (self.decode_ms / 1e3) if self.decode_ms > 0 and self.new_tokens > 1 else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens emitted per target forward during decoding (plain decoding: 1.00)."""
        return self.step_tokens / self.decode_steps if self.decode_steps else 0.0

    def record_step(self, used: int):
        self.decode_steps += 1
        self.step_tokens += used
        self.accept_hist.extend([0] * (used + 1 - len(self.accept_hist)))
        self.accept_hist[used] += 1

    def to_dict(self) -> dict:
        # Null where no decoding step ran (the one token came from the prefill): 0.0 read as a measured tau below
        # any decoder's 1, and as a rate, as `amphista eval` and eval-tau already leave such answers out
        stepped = self.decode_steps > 0
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_ms": round(self.prefill_ms, 3), "decode_ms": round(self.decode_ms, 3),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 3) if stepped else None,
                "decode_steps": self.decode_steps, "tau": round(self.tau, 4) if stepped else None,
                "accept_hist": self.accept_hist, **self.extra}

    def summary(self) -> str:
        reused = self.extra.get("prompt_tokens_reused")
        head = (f"prompt {self.prompt_tokens} tok" + (f" ({reused} kept from the last turn)" if reused else "")
                + f" | prefill {self.prefill_ms:.0f} ms | {self.new_tokens} new tok")
        if not self.decode_steps:           # the one token came from the prefill: no rate or tau to speak of
            return head + " | no decoding step"
        return head + f" at {self.decode_tokens_per_s:.1f} tok/s | tau {self.tau:.2f}"


@dataclass
class RowState:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    shown: int = 0                 # chars of text already streamed
    finish_reason: str | None = None
    # Special tokens left out of `text` (not EOS: `<|im_start|>` after a raw prompt), as (where in text, their
    # text): stop strings are matched in the text with them shown, so a stop that names one still stops there.
    specials: list[tuple[int, str]] = field(default_factory=list)
    logprobs: list[float] | None = None      # one per id, where the run asked for them
    top_logprobs: list[list[tuple[int, float]]] | None = None    # one list per id, where the run asked for them
    # the EOS that ended the row (not in ids) as (id, logprob, top list or None), where the run asked for logprobs:
    # OpenAI's completions list it (lm-eval's echo reads token_logprobs[ctxlen:-1], the last being the answer's)
    eos_logprob: tuple | None = None
    # vLLM's stop_reason: the stop_token_ids id (left out of ids) or the stop string that ended the row; None where
    # it ended otherwise (EOS, length)
    stop_reason: int | str | None = None
    # min_tokens (vLLM's): the raw length of the text of the row's first min_tokens tokens. A stop string ends the
    # row only where it completes past it, in a later token's text (it may start before); 0 where min_tokens is off.
    stop_from: int = 0

    def raw(self, text: str) -> str:
        """`text` (the row's, or it and the text held back after it) with the special tokens shown where they came."""
        if not self.specials:
            return text
        parts, at = [], 0
        for pos, piece in self.specials:
            parts += [text[at:pos], piece]
            at = pos
        return "".join(parts) + text[at:]

    def raw_len(self) -> int:
        """len(raw(text)): the text and the special tokens within it (not those placed after held-back text)."""
        n = len(self.text)
        return n + sum(len(piece) for pos, piece in self.specials if pos <= n)

    def text_pos(self, raw_pos: int, text: str) -> int:
        """The position in `text` of position raw_pos of raw(text) (inside a special's text: where it stands)."""
        shift = 0
        for pos, piece in self.specials:
            pos = min(pos, len(text))       # one placed after held-back text stands at the end until it comes out
            if raw_pos <= pos + shift:
                break
            if raw_pos < pos + shift + len(piece):
                return pos
            shift += len(piece)
        return min(max(0, raw_pos - shift), len(text))

    def cut_at_stop(self, stop: list[str], start: int, held: str, keep: bool | list[str] = False):
        """Ends the row before the first stop string to complete in raw(text + held) from raw position `start` (keep:
        after it, vLLM's include_stop_str_in_output; a list: after those stop strings only) that ends past stop_from.
        held: the text the stream decoder holds back (it ends in half a character, or in a byte run): the row ends
        here if a stop completes in it, and then that text is final, what the stream's flush would give."""
        text = self.text + held
        raw = self.raw(text)
        # The first to end, as the text comes a character at a time; of those ending there, the longest. The first to
        # start (before) made a token's boundaries decide: stops "bc" and "abcd" in "abcd" cut at "a" where "bc"
        # came in a token of its own, but at "" where one token brought "bcd", completing both at once.
        hits = [(i + len(s), i, s) for s in stop for i in [raw.find(s, max(start, self.stop_from - len(s) + 1))]
                if i >= 0]
        if hits:
            end, at, self.stop_reason = min(hits)
            kept = keep is True or (keep and self.stop_reason in keep)
            self.text, self.finish_reason = text[:self.text_pos(end if kept else at, text)], "stop"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _consume(row: RowState, toks: list[int], stream, eos: dict[int, str], stop: list[str], hold: int,
             max_new_tokens: int, special_text=lambda tok: None, lps: list[float] | None = None,
             tops: list | None = None, keep_stop: bool | list[str] = False,
             min_tokens: int = 0) -> tuple[int, str]:
    """Append one step's tokens to a row. Returns (tokens used incl. a final EOS, text safe to stream). eos: the
    tokens that end a row, with the finish reason each gives ("eos", or "stop" for stop_token_ids).
    special_text(tok): the text of a special token the stream leaves out, None for the others. lps: the tokens'
    log-probabilities, kept beside the ids the row keeps (row.logprobs); tops: their top_logprobs lists
    (row.top_logprobs). keep_stop: a stop string stays at the end of the text (cut_at_stop's keep).
    min_tokens: stop strings are looked for from the row's (min_tokens + 1)-th token on, token by token (vLLM's
    detokenizer: `len(output_token_ids) > min_tokens`), and only where they complete past the first min_tokens
    tokens' text (RowState.stop_from); the hold still keeps back a stop's start in that text."""
    used = 0
    for i, tok in enumerate(toks):
        if row.finish_reason:
            break
        used += 1
        if tok in eos:
            row.finish_reason = eos[tok]
            row.stop_reason = tok if row.finish_reason == "stop" else None
            if lps is not None:
                row.eos_logprob = (tok, lps[i], None if tops is None else tops[i])
            break
        row.ids.append(tok)
        if lps is not None:
            row.logprobs.append(lps[i])
        if tops is not None:
            row.top_logprobs.append(tops[i])
        before = row.raw_len()
        delta = stream.push(tok)
        row.text += delta
        piece = special_text(tok)
        # Text the stream holds back (push gave nothing: it ends in half a character, or in a byte run). A skipped
        # special stands after it. A stop completed in it ends the row now (up to its first U+FFFD: not in half a
        # character still arriving): before, a run that ended there (max_new_tokens, EOS) flushed it past the stop.
        held = stream.pending if not delta and (stop or piece is not None) else ""
        if piece is not None:
            at = len(row.text) + len(held)
            row.specials.append((max(at, row.specials[-1][0]) if row.specials else at, piece))
        if stop and len(row.ids) > min_tokens:
            row.cut_at_stop(stop, max(0, before - hold), held.partition("\ufffd")[0], keep_stop)
        elif len(row.ids) == min_tokens:
            row.stop_from = row.raw_len()
        if len(row.ids) >= max_new_tokens and not row.finish_reason:
            row.finish_reason = "length"
    if row.finish_reason in ("eos", "length") or (row.finish_reason == "stop" and toks and toks[used - 1] in eos):
        before, ended = row.raw_len(), (row.finish_reason, row.stop_reason)
        row.text += stream.flush()     # bytes of a character the model never finished
        if stop and len(row.ids) > min_tokens:      # now final: a stop may hold the U+FFFD of such bytes
            row.cut_at_stop(stop, max(0, before - hold), "", keep_stop)
            if ended[0] != "length":   # an EOS / stop id ended the row first (vLLM checks it before stop strings):
                row.finish_reason, row.stop_reason = ended     # the text is cut, the ending token still counts
    # Hold back a possible stop-string prefix until it is decided, so the stream never shows one.
    end = len(row.text) if row.finish_reason else max(row.shown, row.text_pos(row.raw_len() - hold, row.text))
    delta, row.shown = row.text[row.shown:end], max(row.shown, end)
    return used, delta


def _tops(decoder) -> list:
    """The step's top_logprobs as [row][token] lists of (token id, logprob) pairs, best first."""
    values, ids = decoder.step_top_values.tolist(), decoder.step_top_ids.tolist()
    return [[list(zip(i_t, v_t)) for i_t, v_t in zip(i_r, v_r)] for i_r, v_r in zip(ids, values)]


# A CPU prefill costs about its rows x its longest prompt in token-forwards (padding computes as much as prompt tokens
# do), plus a fixed cost per forward that reads every weight once: ~16 prompt tokens' worth on a CPU (SmolLM2,
# 4-bit, 2 cores: a decode step ~5 ms, a prompt token ~1.3 ms in a long prefill).
FORWARD_TOKENS = 16


def prefill_groups(lengths: list[int], covers_all: bool = False) -> list[list[int]]:
    """Rows (indices into lengths) in groups of one padded forward each, shortest prompts first, where that saves a
    fifth or more of one padded forward of them all; else [every row]. covers_all: the first group's forward runs
    every row (the others as 1-token placeholders until their own group), so it costs len(lengths) x its longest."""
    B = len(lengths)
    order = sorted(range(B), key=lengths.__getitem__)
    L = [lengths[i] for i in order]
    best, cut = [0] + [None] * B, [0] * (B + 1)
    for j in range(1, B + 1):            # best[j]: the cheapest grouping of the j shortest rows (groups contiguous)
        for i in range(j):
            cost = best[i] + (B if covers_all and i == 0 else j - i) * L[j - 1] + FORWARD_TOKENS
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    if best[B] > 0.8 * (B * L[-1] + FORWARD_TOKENS):
        return [list(range(B))]
    groups, j = [], B
    while j:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return groups[::-1]


def _prefill(decoder, prompts: list[list[int]], want_lps: bool, want_tops: bool) -> tuple[list, list, list]:
    """decoder.prefill(prompts): each row's first token, and its logprob and top_logprobs where wanted. On a CPU,
    prompts of very unequal lengths prefill in groups (prefill_groups): the shortest with every other row as a
    1-token placeholder, then each longer group into its rows as joining rows do (add_rows: the same bits as a run
    of their own). One padded forward cost a long prompt beside four short ones 4.9x its own prefill."""
    B = len(prompts)
    groups = [list(range(B))]
    # Not for seeded sampling: each group draws its first tokens apart, so a row's random numbers depend on the
    # grouping, and the grouping on the memory free at the time (_room_for_groups): the same seeded call gave
    # other answers on a busier machine, where the seed promises the same answer each time.
    # A drafter or stand-in decoder without add_rows (row_capacity) prefills at once.
    can = B > 1 and isinstance(decoder, PlainDecoder) and decoder.device.type == "cpu" and decoder.row_capacity() > 0
    if can and not (decoder.generator is not None and not decoder.params.greedy):
        groups = prefill_groups([len(p) for p in prompts], covers_all=True)
        if len(groups) > 1 and not _room_for_groups(decoder.cache, [[prompts[b] for b in g] for g in groups[1:]]):
            groups = [list(range(B))]
    head = set(groups[0])
    first = decoder.prefill([p if b in head else p[:1] for b, p in enumerate(prompts)]).tolist()
    lps = decoder.step_logprobs.tolist() if want_lps else [None] * B
    tops = _tops(decoder) if want_tops else [None] * B
    if len(groups) > 1:
        later = [b for g in groups[1:] for b in g]
        got = _add_rows(decoder, later, [prompts[b] for b in later], want_lps, want_tops, groups[1:])
        for j, b in enumerate(later):
            first[b], lps[b], tops[b] = got[0][j], got[1][j], got[2][j]
    return first, lps, tops


def _room_for_groups(cache: KVCache, groups: list[list[list[int]]]) -> bool:
    """Whether the memory has room, with half to spare, for the largest cache a later group prefills in (add_rows
    builds one for its rows, beside the batch's): a batch prefilled at once needs none."""
    from .kernels import cpu_exact
    from .kv_cache import available_memory
    free = available_memory(cache.k.device)
    per_slot = cache.nbytes / (cache.k.shape[1] * cache.k.shape[3])      # a row's slot, K and V of every layer
    slots = [len(g) * (T + cpu_exact.scratch_slots(T)) for g in groups
             for T in [kv_window(max(len(p) for p in g), cache.max_seq_len)]]
    return free is None or per_slot * max(slots) < free / 2


def _add_rows(decoder, slots: list[int], prompts: list[list[int]], want_lps: bool, want_tops: bool,
              groups: list[list[int]] | None = None) -> tuple[list, list, list]:
    """decoder.add_rows(slots, prompts), on a CPU in groups of like lengths (prefill_groups; `groups`: the slots
    already grouped): each prompt's first token, logprob and top_logprobs, in the order of `prompts`."""
    at = {slot: j for j, slot in enumerate(slots)}
    if groups is None:
        groups = [list(range(len(slots)))]
        if len(slots) > 1 and decoder.device.type == "cpu":
            groups = prefill_groups([len(p) for p in prompts])
        groups = [[slots[j] for j in g] for g in groups]
    first, lps, tops = [None] * len(slots), [None] * len(slots), [None] * len(slots)
    for group in groups:
        tmp = decoder.add_rows(group, [prompts[at[slot]] for slot in group])
        got = tmp.first.tolist(), tmp.step_logprobs.tolist() if want_lps else None, _tops(tmp) if want_tops else None
        for j, slot in enumerate(group):
            first[at[slot]] = got[0][j]
            lps[at[slot]] = got[1][j] if want_lps else None
            tops[at[slot]] = got[2][j] if want_tops else None
    return first, lps, tops


def run(decoder, prompts: list[list[int]], tokenizer, max_new_tokens: int | list[int], eos_ids, stop: list[str],
        stats: list[GenerationStats], on_row_end=None, admit=None, stop_ids=(),
        keep_stop: bool | list[str] = False, continued: bool = False,
        min_tokens: int = 0, row_errors: bool = False) -> Iterator[tuple[int, str]]:
    """Drive a decoder until every row ends; yields (row, text delta) and fills `stats` and `decoder.rows`.
    max_new_tokens: one limit for every row, or a list of one per row (each row ends at its own).
    on_row_end(row): called when a row ends, before its last delta is yielded; its stats then time that row alone
    (new_tokens, decode_ms), until the run's end sets every row's to the whole batch's.
    admit(free): called between steps while the decoder has `free` rows to give (ended rows, or rows past the
    batch up to its cache's); returns a list of at most `free` entries, each (prompt ids, max_new_tokens) to join
    the run, or an exception (a prompt refused): entry i becomes row len(rows) + i, a refused one yields (row,
    exception) and ends at once. decoder.row_prompts lists every row's prompt ids (None for a refused one).

    stop_ids: token ids that end a row as EOS does (left out of its ids and text), with finish_reason "stop".
    keep_stop: a row ended by a stop string keeps it at the end of its text (vLLM's include_stop_str_in_output);
    a list: only those stop strings are kept.
    continued: every row's prompt ends inside a message the row continues (continue_final_message; joiners too):
    its text is read after the prompt's last tokens (StreamDecoder's context), so prefill + text reads as the
    tokens do (a Llama 2 `▁world` after "Hello" gives " world"). Otherwise text == decode(ids) alone.
    min_tokens: every row's (joiners' too): a stop string that completes within a row's first min_tokens tokens
    does not end it (vLLM's); EOS and stop_ids are held back by the decoder's own min_tokens (its logits).
    row_errors (implied by admit): a row left no token to choose yields (row, InputError) and ends there while the
    others go on (its prompt None in row_prompts); otherwise one InputError ends the run, naming every row of the
    prompts that failed at that step, in the prompts' order.

    Tokens past EOS, a stop string or a row's max_new_tokens inside one step are dropped here, never emitted.
    """
    B = len(prompts)
    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * B
    if len(limits) != B:
        raise ValueError(f"{len(limits)} max_new_tokens for {B} prompts")
    rows = decoder.rows = [RowState() for _ in range(B)]
    decoder.row_prompts = list(prompts)
    eos = {t: "eos" for t in eos_ids}
    eos.update({t: "stop" for t in stop_ids if t not in eos})
    hold = max((len(s) for s in stop), default=1) - 1
    # Special tokens that are not EOS (`<|im_start|>` when a raw prompt lets the model open the next turn) are left
    # out of the answer, as Hugging Face's pipelines and vLLM leave them out: text == decode(ids, skip_special_tokens=
    # True). Stop strings still see them (special_text). A tokenizer without special_ids (tests' stubs) shows all.
    # Tokens a run with tools shows (Tokenizer.showing: Mistral's [TOOL_CALLS]) are in the text already: seen again
    # through special_text, a stop string met them twice ("[ARGS]{" left "...[ARGS]" in the answer).
    shown = getattr(tokenizer, "shown_ids", frozenset)()
    skipped = frozenset(getattr(tokenizer, "special_ids", ())) - set(eos) - shown

    def context(prompt) -> dict:
        return {"context": prompt} if continued else {}

    if skipped:
        def new_stream(prompt):
            return tokenizer.stream_decoder(skip_special_tokens=True, **context(prompt))
        pieces: dict[int, str] = {}

        def special_text(tok: int) -> str | None:
            if tok not in skipped:
                return None
            if tok not in pieces:
                pieces[tok] = tokenizer.decode([tok])
            return pieces[tok]
    else:
        def new_stream(prompt):
            return tokenizer.stream_decoder(**context(prompt))

        def special_text(tok: int) -> str | None:
            return None
    streams = [new_stream(p) for p in prompts]
    want_lps = getattr(decoder, "logprobs", False)
    want_tops = want_lps and getattr(decoder, "top_logprobs", 0) > 0
    t0 = time.perf_counter()
    first, lps, tops = _prefill(decoder, prompts, want_lps, want_tops)
    pending = [[t] for t in first]
    t1 = time.perf_counter()
    started = [t1] * B                 # when each row's decoding began (a row that joined: its own prefill's end)
    if want_lps:
        for r in rows:
            r.logprobs = []
            if want_tops:
                r.top_logprobs = []
    row_errors = row_errors or admit is not None
    ruled_out = set()                  # rows whose pending tokens stop short of a ruled-out position (NO_TOKEN)

    def take(b: int, toks: list[int]) -> list[int]:
        """Row b's new tokens, checked: those before a ruled-out position (the row may end in them, as a plain run
        does, never choosing there; else it fails at that token, row_failed, in the prompts' order whichever
        decoder row it took); NON_FINITE raises at once."""
        if NO_TOKEN in toks and NON_FINITE not in toks:
            ruled_out.add(b)
            return toks[:toks.index(NO_TOKEN)]
        check_finite(decoder, toks, b, len(rows[b].ids))
        return toks
    for b in range(B):
        pending[b] = take(b, pending[b])
    for b in range(B):
        stats[b].prompt_tokens, stats[b].prefill_ms = len(prompts[b]), (t1 - t0) * 1e3
    fresh = set(range(B))              # rows whose pending token came from their prefill: no decode step
    live = list(range(B))              # decoder row i is prompt row live[i]
    drop_rows = (B > 1 or admit is not None) and getattr(decoder, "can_drop_rows", lambda: False)()

    def row_failed(b: int) -> InputError:
        """Row b, its tokens up to a ruled-out position taken, is left no token to choose: it fails alone, as it
        does decoded alone (the same options leave other rows tokens: a bad word of several tokens, a grammar's
        state are a row's own). Where the caller takes (row, error) items (row_errors), the row ends with its
        error (its result None, as a refused joiner's) and the others go on: raised, the error ended the whole run,
        and a server's streams that shared it ended with another request's error."""
        e = no_token_error([(b, len(rows[b].ids) + 1)])
        rows[b].finish_reason = "error"
        decoder.row_prompts[b] = None
        if b in live and hasattr(decoder, "end_row"):
            decoder.end_row(live.index(b))
        return e
    capacity = decoder.row_capacity() if admit is not None else 0
    while True:
        failures = []                  # (row, new token) of rows failed at this step, where raised (not row_errors)
        for b in range(len(rows)):
            was_done = rows[b].finish_reason is not None
            toks, pending[b] = pending[b], []
            used, delta = _consume(rows[b], toks, streams[b], eos, stop, hold, limits[b], special_text,
                                   lps[b], tops[b], keep_stop, min_tokens)
            if b in ruled_out:
                ruled_out.discard(b)
                if not rows[b].finish_reason:
                    failed = row_failed(b)
                    if not row_errors:          # once every row has taken this step's tokens: all of them named
                        failures.append((b, failed.new_token))
                        continue
                    if delta:                   # its tokens before the ruled-out position, then its error
                        yield b, delta
                    yield b, failed
                    continue
            if toks and not (b in fresh or was_done):
                stats[b].record_step(used)
            if rows[b].finish_reason and not was_done:
                if b in live and hasattr(decoder, "end_row"):
                    decoder.end_row(live.index(b))
                if on_row_end is not None:
                    stats[b].new_tokens = len(rows[b].ids)
                    stats[b].decode_ms = (time.perf_counter() - started[b]) * 1e3
                    on_row_end(b)
            if delta:
                yield b, delta
        if failures:
            raise no_token_error(failures)
        fresh.clear()
        if admit is not None and capacity:
            ended = [i for i, b in enumerate(live) if rows[b].finish_reason]
            free = len(ended) + max(0, capacity - len(live))
            entries = list(admit(free) or ()) if free else []
            joining = []
            for entry in entries[:free]:
                b = len(rows)
                rows.append(RowState())
                streams.append(new_stream(() if isinstance(entry, BaseException) else entry[0]))
                stats.append(GenerationStats())
                pending.append([])
                lps.append(None)
                tops.append(None)
                started.append(time.perf_counter())
                if isinstance(entry, BaseException):
                    rows[b].finish_reason = "error"
                    limits.append(0)
                    decoder.row_prompts.append(None)
                    yield b, entry
                    continue
                ids, limit = entry
                limits.append(limit)
                decoder.row_prompts.append(ids)
                if want_lps:
                    rows[b].logprobs = []
                    if want_tops:
                        rows[b].top_logprobs = []
                joining.append(b)
            if len(entries) > free:
                raise ValueError(f"admit({free}) returned {len(entries)} prompts: at most {free} rows are free")
            if joining:
                if drop_rows:                  # ended rows go first: the new ones take the rows after the rest
                    going = [i for i, b in enumerate(live) if not rows[b].finish_reason]
                    if len(going) < len(live):
                        decoder.keep_rows(going)
                        live = [live[i] for i in going]
                    ended = []
                slots = (ended + list(range(len(live), capacity)))[:len(joining)]
                ta = time.perf_counter()
                first, first_lps, first_tops = _add_rows(decoder, slots, [decoder.row_prompts[b] for b in joining],
                                                         want_lps, want_tops)
                tb = time.perf_counter()
                for j, (slot, b) in enumerate(zip(slots, joining)):
                    if slot < len(live):
                        live[slot] = b
                    else:
                        live.append(b)
                    pending[b] = take(b, [first[j]])
                    lps[b] = first_lps[j] if want_lps else None
                    tops[b] = first_tops[j] if want_tops else None
                    stats[b].prompt_tokens = len(decoder.row_prompts[b])
                    stats[b].prefill_ms, started[b] = (tb - ta) * 1e3, tb
                    fresh.add(b)
                continue                       # their first tokens, before the next step
        if all(r.finish_reason for r in rows):
            break
        if drop_rows:
            going = [i for i, b in enumerate(live) if not rows[b].finish_reason]
            if len(live) - len(going) >= max(1, len(live) // 8):   # each drop copies the live rows' cache
                decoder.keep_rows(going)
                live = [live[i] for i in going]
        out, count = decoder.step()
        n, toks = count.tolist(), out.tolist()          # the one host sync per step
        step_lps = decoder.step_logprobs.tolist() if want_lps else None
        step_tops = _tops(decoder) if want_tops else None
        for i, b in enumerate(live):
            if not rows[b].finish_reason:
                pending[b] = take(b, toks[i][:n[i]])
                lps[b] = step_lps[i][:n[i]] if want_lps else None
                tops[b] = step_tops[i][:n[i]] if want_tops else None
    _sync(decoder.device)
    t2 = time.perf_counter()
    for b in range(len(rows)):
        stats[b].new_tokens = len(rows[b].ids)
        stats[b].decode_ms = (t2 - started[b]) * 1e3
