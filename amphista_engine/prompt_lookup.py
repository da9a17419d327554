"""Prompt lookup decoding: draft the tokens that followed the latest earlier occurrence of the text's last n tokens.

No trained heads: the drafts are copied from the row's own text (prompt and answer so far) and, where given, from a
predicted output (OpenAI's `prediction`), so any model speculates where its answer repeats what it has read (edits
of a given text, code, quotes, names, a list it goes on with). Tree verification keeps greedy output equal to plain
decoding's and sampling lossless: a draft is only a guess, checked like a head's.

The search runs on the device with fixed shapes (no host sync, CUDA-graph safe): for n = max_ngram down to
min_ngram, every window of n history tokens is compared with the last n, and the longest n's latest match drafts
the tokens after it (vLLM's ngram proposer and transformers' prompt_lookup_num_tokens run the same search on the
host, a sync per step). A prediction is searched first, at its earliest match past where the answer last followed
it: an answer tracks its prediction in order, where the history's latest match is the best guess.
"""
from __future__ import annotations

import inspect

import torch

from .errors import ConfigError

MAX_DEPTH = 16              # a chain of 17 nodes: past it a miss wastes more than the copy can win
MAX_NGRAM, MIN_NGRAM = 3, 1
# A CPU pays a chain by the node, and a step with no match verifies the root alone (a plain step's cost): a copy found
# on one token's evidence is right too seldom to pay there (4-bit SmolLM2, code edits: floor 2 ran 1.54x plain against
# floor 1's 1.45x; MT-Bench 0.74x against 0.65x; benchmarks/results/cpu_lookup_ab_q4.md). A GPU verifies the chain at
# about a plain step's cost, so it drafts from any match.
CPU_MIN_NGRAM = 2
# The drafted token's score in the one-hot draft: far above the 0 of the others, so the answer's penalties
# (presence 2, repetition's division) leave it first, while logit_bias's ban (-100) puts it below them.
HIT = 50.0


def prediction_ids(tokenizer, prediction: str, max_seq_len: int | None = None) -> list[int]:
    """A predicted output's token ids: what a lookup run drafts from (Engine.stream_batch: its first max_seq_len, as
    no answer is longer than the cache, so neither is the part of a prediction worth searching) and, whole, what the
    usage counts accepted and rejected prediction tokens on (OpenAI counts every token sent: a prediction longer than
    the cache was counted short), one encoding so the two never differ."""
    ids = tokenizer.encode(prediction, add_bos=False)
    return ids if max_seq_len is None else ids[:max_seq_len]


def common_subsequence(a: list[int], b: list[int]) -> int:
    """The length of the longest common subsequence of a and b: a's tokens that appear, in order, in b (OpenAI's
    accepted prediction tokens, a the prediction and b an answer). Not difflib.SequenceMatcher's matching blocks,
    which undercount (greedy blocks: ~180 of 8192 random tokens of 50 kinds where ~2000 match in order) and are
    quadratic in Python on repetitive text (6 s for 8192 x 8192 copies of one token, 2 s for a 3-token cycle): a
    bit-parallel LCS (Hyyrö's: one pass over b, a's positions as the bits of one int) is O(len(a) * len(b) / 30)
    big-int digit work, ~10 ms for those, and the prefix and suffix the two share (any LCS may keep them) are taken
    off first, so an answer that follows its prediction costs about nothing."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi and a[lo] == b[lo]:
        lo += 1
    end = 0
    while end < hi - lo and a[-1 - end] == b[-1 - end]:
        end += 1
    a, b = a[lo:len(a) - end], b[lo:len(b) - end]
    if not a or not b:
        return lo + end
    masks: dict[int, int] = {}          # each token: the bits of its positions in a
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | 1 << i
    full = (1 << len(a)) - 1
    v = full                            # a zero bit per a's token matched so far
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return lo + end + len(a) - v.bit_count()


def prediction_counts(pred_ids: list[int], answer_ids: list[int]) -> tuple[int, int]:
    """OpenAI's (accepted_prediction_tokens, rejected_prediction_tokens) of one answer: the prediction's tokens the
    answer has in order (common_subsequence), and the rest. On the whole prediction's prediction_ids."""
    accepted = common_subsequence(pred_ids, answer_ids)
    return accepted, len(pred_ids) - accepted


def default_min_ngram(device) -> int:
    return CPU_MIN_NGRAM if torch.device(device).type == "cpu" else MIN_NGRAM


def default_depth(device) -> int:
    """The untimed chain: a GPU verifies 8 nodes at a plain step's cost (weight-bound), so it drafts 7 (the exact
    paths' deepest); a CPU pays by the node (a 4-node step ~1.8 plain ones on SmolLM2's 4-bit weights), so 4."""
    return 7 if torch.device(device).type != "cpu" else 4


def split_chain(tree):
    """(the heads' tree, the lookup's chain or None) of a heads+lookup run's tree: "TREE+chain-K" is the heads' TREE
    and the chain beside it; anything else is the heads' tree alone (the chain then the device's default)."""
    if isinstance(tree, str) and "+chain-" in tree:
        heads_tree, _, chain = tree.rpartition("+")
        return heads_tree, chain
    return tree, None


def chain_depth(tree, device) -> int:
    """The chain a lookup run verifies: tree None or "auto" (the device's default), or "chain-K". A lookup drafts
    one token per depth, so a tree with siblings would verify nodes it has no guess for."""
    if tree is None or tree == "auto":
        return default_depth(device)
    k = tree.removeprefix("chain-") if isinstance(tree, str) and tree.startswith("chain-") else ""
    if not (k.isascii() and k.isdigit() and 1 <= int(k) <= MAX_DEPTH):
        raise ConfigError(f"speculative='lookup' drafts one token per depth, a chain: tree must be 'chain-K' with K "
                          f"in 1..{MAX_DEPTH} (or None for the device's default, chain-{default_depth(device)}), "
                          f"got {tree!r}")
    return int(k)


def chain_spec(k: int, device):
    """The TreeSpec of a lookup alone: a chain of k nodes drafted at rank 0 (one-hot drafts), whose `bare` part is the
    root alone (a step no row has a match for verifies it as a plain step)."""
    from .speculative import TreeSpec
    from .tree import build_tree
    spec = TreeSpec([(0,) * d for d in range(1, k + 1)], k, device)
    spec.name, spec.bare = f"chain-{k}", build_tree([], 1, device)
    return spec


def _match_ends(src: torch.Tensor, valid: torch.Tensor, last: torch.Tensor) -> list[torch.Tensor]:
    """[B, W] bool per n = 1..N (N = last.shape[1]; last[:, k] is the text's k-th token from its end): the n tokens
    of src ending at column e are the text's last n, and at least one token follows them inside [0, valid). One
    compare per k, each n's match the running AND of the first n (a search per n from the window's start took
    0.8 ms a step on the dev VM, this 0.4, beside a ~18 ms 4-bit SmolLM2 step)."""
    B, W = src.shape
    acc = torch.arange(W, device=src.device)[None] + 1 < valid[:, None]
    out = []
    for k in range(last.shape[1]):
        shifted = torch.cat([src.new_full((B, k), -1), src[:, :W - k]], 1) if k else src     # column e: src[e - k]
        acc = acc & (shifted == last[:, k:k + 1])
        out.append(acc)
    return out


class PromptLookup:
    """A drafter with the heads' interface (reset_cache, resume_cache, step, prefill_rows, keep_rows, cache_epoch)
    over a token history per row: hist[b, j] is row b's token at position j + 1, what a step's next_tokens give (the
    heads pair hidden state j with it), so the prompt's first token is the one never searched."""
    kind = "lookup"         # the method a run's stats name (GenerationStats.extra["method"])

    def __init__(self, vocab_size: int, device, dtype=torch.float32, max_ngram: int = MAX_NGRAM,
                 min_ngram: int = MIN_NGRAM):
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.vocab_size, self.max_ngram, self.min_ngram = vocab_size, max_ngram, min_ngram
        self.device, self.dtype = torch.device(device), dtype
        self.hist = self.length = self.found = None
        self.pred = self.pred_len = self.pred_at = None      # the rows' predicted outputs (set_prediction)
        self._predictions = None
        self._epoch = 0

    # ---- the heads' interface ----------------------------------------------------------------------------
    def reset_cache(self, batch: int, max_seq_len: int):
        # one scratch slot past the cache: the padding entries of a step land there (_write_and_draft)
        if self.hist is None or self.hist.shape[0] < batch or self.hist.shape[1] != max_seq_len + 1:
            self.hist = self.length = None
            self.hist = torch.zeros(batch, max_seq_len + 1, dtype=torch.long, device=self.device)
            self.length = torch.zeros(batch, dtype=torch.long, device=self.device)
            self.found = torch.zeros(batch, dtype=torch.bool, device=self.device)
        else:
            self.length.zero_()      # same buffers: captured CUDA graphs stay valid
        self._epoch += 1
        self._place_predictions()

    def cache_epoch(self) -> int:
        return self._epoch

    def resume_cache(self, length: int):
        self.length[:1] = length
        self._place_predictions()

    def keep_rows(self, keep: torch.Tensor):
        n = len(keep)
        self.hist[:n] = self.hist[keep]
        self.length[:n] = self.length[keep]
        self.found[:n] = self.found[keep]
        if self.pred is not None:
            for t in (self.pred, self.pred_len, self.pred_at):
                t[:n] = t[keep]

    def prefill_rows(self, rows: torch.Tensor, hidden, next_tokens, count, kv_len: int, depth: int = MAX_DEPTH):
        return self._one_hot(self.join(rows, next_tokens, count, depth), self.found[rows])

    def step(self, hidden, next_tokens, count, kv_len: int, depth: int = MAX_DEPTH) -> torch.Tensor:
        """next_tokens [B, M] (count[b] of them real) go after row b's history -> drafts [B, depth, V], one-hot
        (all zeros for a row with no match)."""
        tokens = self.advance(next_tokens, count, depth)
        return self._one_hot(tokens, self.found[:tokens.shape[0]])

    def _one_hot(self, tokens: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
        B, depth = tokens.shape
        draft = torch.zeros(B, depth, self.vocab_size, dtype=self.dtype, device=tokens.device)
        return draft.scatter_(2, tokens[..., None], (found.to(self.dtype) * HIT)[:, None, None].expand(B, depth, 1))

    def advance(self, next_tokens, count, depth: int) -> torch.Tensor:
        """As step, the drafted tokens [B, depth] (0 where found[b] is False)."""
        return self._write_and_draft(slice(0, next_tokens.shape[0]), next_tokens, count, depth)

    def join(self, rows: torch.Tensor, next_tokens, count, depth: int) -> torch.Tensor:
        """Rows `rows` start afresh with these prompts (a run's joiners): their drafted tokens [len(rows), depth]."""
        self.length[rows] = 0
        if self.pred is not None:       # a joiner shares the run's options, its prediction too: the first row's
            self.pred[rows], self.pred_len[rows], self.pred_at[rows] = self._first_pred, self._first_pred_len, 0
        return self._write_and_draft(rows, next_tokens, count, depth)

    # ---- predicted outputs -------------------------------------------------------------------------------
    def set_prediction(self, predictions: list[list[int]] | None):
        """Each row's predicted output (token ids; [] for a row without one), searched before its history; None: no
        row has one. Takes effect at the next reset_cache / resume_cache (the run's prefill)."""
        self._predictions = predictions if predictions and any(predictions) else None

    def _place_predictions(self):
        if self._predictions is None:
            self.pred = self.pred_len = self.pred_at = None
            return
        rows, P = self.hist.shape[0], max(len(p) for p in self._predictions)
        if self.pred is None or self.pred.shape[0] != rows or self.pred.shape[1] < P:
            # a power of two: runs with similar predictions keep the buffers a captured graph reads
            width = 1 << max(P - 1, 1).bit_length()
            self.pred = torch.full((rows, width), -1, dtype=torch.long, device=self.device)
            self.pred_len = torch.zeros(rows, dtype=torch.long, device=self.device)
            self.pred_at = torch.zeros(rows, dtype=torch.long, device=self.device)
        host = torch.full(self.pred.shape, -1, dtype=torch.long)
        for i, p in enumerate(self._predictions[:rows]):
            host[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        self.pred.copy_(host)
        self._first_pred, self._first_pred_len = self.pred[0].clone(), len(self._predictions[0])
        self.pred_len.copy_(torch.tensor([len(p) for p in self._predictions[:rows]]
                                         + [0] * max(rows - len(self._predictions), 0)))
        self.pred_at.zero_()

    # ---- the search --------------------------------------------------------------------------------------
    def _write_and_draft(self, rows, next_tokens, count, depth: int) -> torch.Tensor:
        hist, length = self.hist[rows], self.length[rows]          # views for a slice, copies for an index tensor
        B, M = next_tokens.shape
        scratch = hist.shape[1] - 1
        step = torch.arange(M, device=hist.device)[None]
        cols = torch.where(step < count[:, None], length[:, None] + step, scratch).clamp(max=scratch)
        hist.scatter_(1, cols, next_tokens.long())
        length += count
        if not isinstance(rows, slice):
            self.hist[rows], self.length[rows] = hist, length
        tokens, found = self._draft_tokens(hist, length, rows, depth)
        self.found[rows] = found        # read by the decoder's host loop (a CPU verifies the root alone without one)
        return tokens

    def _draft_tokens(self, hist, length, rows, depth: int):
        """([B, depth] drafted tokens, [B] bool: a match was found; tokens are 0 where none was)."""
        B, W = hist.shape
        dev = hist.device
        src = torch.zeros(B, dtype=torch.long, device=dev)          # where the copy starts in hist
        found = torch.zeros(B, dtype=torch.bool, device=dev)
        cols = torch.arange(W, device=dev)
        pred = self.pred is not None
        if pred:
            pr, plen, pat = self.pred[rows], self.pred_len[rows], self.pred_at[rows]
            P = pr.shape[1]
            pcols = torch.arange(P, device=dev)
            from_pred = torch.zeros(B, dtype=torch.bool, device=dev)
            pred_src = torch.zeros(B, dtype=torch.long, device=dev)
        # the text's last max_ngram tokens, newest first (a shorter text has no n-gram past its length: -2 never
        # equals a token, nor the -1 the shifted windows start with)
        back = length[:, None] - 1 - torch.arange(self.max_ngram, device=dev)
        last = torch.where(back >= 0, hist.gather(1, back.clamp(min=0)), -2)
        in_hist = _match_ends(hist, length, last)
        if pred:
            in_pred = _match_ends(pr, plen, last)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if pred:
                m = in_pred[n - 1]
                later = torch.where(m & (pcols[None] - n + 1 >= pat[:, None]), pcols[None], P).min(1).values
                e = torch.where(later < P, later, torch.where(m, pcols[None], P).min(1).values)
                hit = (e < P) & ~found
                pred_src = torch.where(hit, e + 1, pred_src)
                from_pred |= hit
                found |= hit
            # the latest match that ends before the text's last token (so never the suffix itself)
            e = torch.where(in_hist[n - 1], cols[None], -1).max(1).values
            hit = (e >= 0) & ~found
            src = torch.where(hit, e + 1, src)
            found |= hit
        k = torch.arange(depth, device=dev)[None]
        # The copy may run into the text's end: past it the text repeats with period length - src (the tokens after
        # the match are the suffix itself), so a loop the answer is caught in is drafted whole
        period = (length - src).clamp(min=1)[:, None]
        tokens = hist.gather(1, (src[:, None] + k % period).clamp(max=W - 1))
        if pred:
            pk = pred_src[:, None] + k
            ptoks = pr.gather(1, pk.clamp(max=P - 1))
            # past the prediction's end no guess: 0, a token verification will most likely refuse
            tokens = torch.where(from_pred[:, None], torch.where(pk < plen[:, None], ptoks, 0), tokens)
            # the next search starts where this copy did, less the n-gram that found it
            self.pred_at[rows] = torch.where(from_pred, (pred_src - self.max_ngram).clamp(min=0), pat)
        return torch.where(found[:, None], tokens, 0), found


class HeadsWithLookup:
    """Trained heads and prompt lookup drafting together (speculative="amphista+lookup"): the tree verifies the heads'
    nodes and the lookup's chain off the root in one forward (TreeSpec's `chain`), so a step keeps the longer of the
    heads' guess and a copy from the text. Everything else a decoder or a graph asks of the heads is the heads'."""

    def __init__(self, heads, lookup: PromptLookup, depth: int):
        self.heads, self.lookup, self.chain_depth = heads, lookup, depth
        self.kind = f"{heads.config.kind}+lookup"
        self._takes_depth = "depth" in inspect.signature(heads.step).parameters
        self.chain = None             # [batch, depth]: the chain's tokens for the next step, written in place

    def __getattr__(self, name):      # config, token_ids, sal_cache, keep_rows' absence... as the heads have them
        return getattr(self.heads, name)

    @property
    def found(self):
        return self.lookup.found

    def reset_cache(self, batch: int, max_seq_len: int):
        self.heads.reset_cache(batch, max_seq_len)
        self.lookup.reset_cache(batch, max_seq_len)
        if self.chain is None or self.chain.shape[0] < batch:
            self.chain = torch.zeros(batch, self.chain_depth, dtype=torch.long, device=self.lookup.device)

    def resume_cache(self, length: int):
        self.heads.resume_cache(length)
        self.lookup.resume_cache(length)

    def cache_epoch(self):
        return self.heads.cache_epoch(), self.lookup.cache_epoch()

    def keep_rows(self, keep: torch.Tensor):
        self.heads.keep_rows(keep)
        self.lookup.keep_rows(keep)
        self.chain[:len(keep)] = self.chain[keep]

    def set_prediction(self, predictions):
        self.lookup.set_prediction(predictions)

    def prefill_rows(self, rows: torch.Tensor, hidden, next_tokens, count, kv_len: int, depth: int | None = None):
        self.chain[rows] = self.lookup.join(rows, next_tokens, count, self.chain_depth)
        return self.heads.prefill_rows(rows, hidden, next_tokens, count, kv_len, **self._depth(depth))

    def step(self, hidden, next_tokens, count, kv_len: int, depth: int | None = None) -> torch.Tensor:
        self.chain[:next_tokens.shape[0]].copy_(self.lookup.advance(next_tokens, count, self.chain_depth))
        return self.heads.step(hidden, next_tokens, count, kv_len, **self._depth(depth))

    def _depth(self, depth):
        return {"depth": depth} if self._takes_depth and depth is not None else {}
