"""Sampling parameters, their validation, and the one logits -> probabilities transform all decoders share."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields

import torch

from .errors import HUGE_INT_DIGITS, InputError, refuse_huge_ints
from .values import is_integral, is_real

# The smallest temperature and repetition penalty taken: logits are divided by them in fp32, where below ~1e-37 the
# quotient overflows to inf and the sampler meets NaN. 1e-6 leaves logits of any real size finite.
MIN_DIVISOR = 1e-6
# The largest |logit_bias| taken: far past any logit (OpenAI's -100 already bans a token), and far from fp32's overflow
MAX_LOGIT_BIAS = 1e6
# The largest repetition_penalty and |presence_penalty|, |frequency_penalty| taken: past fp32's range a penalty
# became inf, and 0 * inf made NaN logits (every count-0 token under frequency_penalty=1e300, a seen token whose
# logit is 0 under repetition_penalty=1e39), so answers came out garbage; 1e6 already all but bans a token.
MAX_PENALTY = 1e6


def _as_float(v) -> float:
    try:
        return float(v)
    except OverflowError:
        return float("inf")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    repetition_penalty: float = 1.0   # 1 = off
    seed: int | None = None
    # OpenAI's penalties on the tokens generated so far (not the prompt's): logit - frequency_penalty * count -
    # presence_penalty * (count > 0). 0 = off. A tree node is penalised for its own path's tokens too (tree_penalties).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # {token id: value added to its logit}, kept as sorted (id, value) pairs (hashable: a CUDA graph key holds the
    # params). Unlike the penalties it is the same at every position, so speculative decoding takes it too.
    logit_bias: tuple = ()
    # min-p sampling (vLLM's, HF's min_p): keep the tokens at least min_p times as likely as the most likely one.
    # 0 = off. Last, so the positional fields above keep their places.
    min_p: float = 0.0
    # vLLM's allowed_token_ids: only these may be chosen (None = off; EOS ids are not added). bad_words_ids: the
    # token sequences of vLLM's bad_words; one of one token is never chosen, a longer one's last token is not where
    # the answer's latest tokens are the rest. Both at -inf in the logits every token is chosen from, as logit_bias.
    allowed_token_ids: tuple | None = None
    bad_words_ids: tuple = ()

    def __post_init__(self):
        # before a check quotes one: Python cannot write an int past 4300 digits (10**5000) into a message
        refuse_huge_ints({f.name: getattr(self, f.name) for f in fields(self)})
        for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            v = getattr(self, name)      # bools are ints to Python: a flag passed here by mistake is no number
            if not (is_integral(v) if name == "top_k" else is_real(v, finite=False)):
                kind = "an integer" if name == "top_k" else "a number"
                raise InputError(f"{name} must be {kind}, got {type(v).__name__} {v!r}")
            # numpy's numbers (np.float32(0.7), a top_k from an array) kept as Python's, as CUDA graph keys and
            # JSON stats hold them; an int too large for a float is infinite, refused below
            object.__setattr__(self, name, int(v) if name == "top_k" else _as_float(v))
        if not 0 <= self.temperature < float("inf"):
            raise InputError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature!r}")
        if 0 < self.temperature < MIN_DIVISOR:
            raise InputError(f"temperature must be 0 (greedy) or at least {MIN_DIVISOR:g}, got {self.temperature!r}: "
                             f"logits / temperature would overflow")
        if self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise InputError(f"repetition_penalty must be finite and > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.repetition_penalty < MIN_DIVISOR:
            raise InputError(f"repetition_penalty must be at least {MIN_DIVISOR:g} (1 = off), got "
                             f"{self.repetition_penalty!r}: logits / repetition_penalty would overflow")
        if self.repetition_penalty > MAX_PENALTY:
            raise InputError(f"repetition_penalty must be at most {MAX_PENALTY:g} (1 = off), got "
                             f"{self.repetition_penalty!r}: logits * repetition_penalty would overflow")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"{name} must be a finite number (0 = off), got {getattr(self, name)!r}")
            if abs(getattr(self, name)) > MAX_PENALTY:
                raise InputError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 = off; OpenAI's range is "
                                 f"[-2, 2]), got {getattr(self, name)!r}: larger ones overflow the logits")
        object.__setattr__(self, "logit_bias", check_logit_bias(self.logit_bias))
        object.__setattr__(self, "allowed_token_ids", check_token_ids(self.allowed_token_ids, "allowed_token_ids"))
        words = self.bad_words_ids
        if not isinstance(words, (list, tuple)):
            raise InputError(f"bad_words_ids must be a list of token id lists, got {type(words).__name__}")
        object.__setattr__(self, "bad_words_ids", tuple(
            tuple(check_token_ids(w, f"bad_words_ids[{i}]", keep_order=True)) for i, w in enumerate(words)))
        if self.seed is not None and (not is_integral(self.seed) or not 0 <= self.seed < 2**64):
            raise InputError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """presence_penalty or frequency_penalty is on: each step needs the counts of the tokens generated so far."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def bias_tensor(self, vocab_size: int, device) -> torch.Tensor | None:
        """logit_bias as a dense fp32 [vocab_size] row, -inf outside allowed_token_ids and at one-token bad words
        (None without any); an id past the vocabulary is refused."""
        words = [w for w in self.bad_words_ids if len(w) == 1]
        named = {"logit_bias": [i for i, _ in self.logit_bias], "allowed_token_ids": self.allowed_token_ids or (),
                 "bad_words": [t for w in self.bad_words_ids for t in w]}
        for name, ids in named.items():
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise InputError(f"{name}: token id {bad[0]} is not in the model's vocabulary (ids 0.."
                                 f"{vocab_size - 1})")
        if self.allowed_token_ids is not None and set(self.allowed_token_ids) <= {w[0] for w in words}:
            raise InputError("allowed_token_ids: every allowed token is one of the bad_words: no token is left")
        if not (self.logit_bias or self.allowed_token_ids is not None or words):
            return None
        bias = torch.zeros(vocab_size, dtype=torch.float32)
        if self.logit_bias:
            ids, values = zip(*self.logit_bias)
            bias[list(ids)] = torch.tensor(values, dtype=torch.float32)
        if self.allowed_token_ids is not None:
            keep = torch.ones(vocab_size, dtype=torch.bool)
            keep[list(self.allowed_token_ids)] = False
            bias.masked_fill_(keep, float("-inf"))
        if words:
            bias[[w[0] for w in words]] = float("-inf")
        return bias.to(device)

    def generator(self, device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return seeded_generator(self.seed, device)


def check_logit_bias(bias) -> tuple:
    """logit_bias as sorted (token id, value) pairs: a dict {id: value} (or such pairs); ids integers >= 0 (strings of
    digits too, as OpenAI's JSON keys are), values finite numbers."""
    if bias is None:
        return ()
    if isinstance(bias, dict):
        items = list(bias.items())
    elif isinstance(bias, (list, tuple)) and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in bias):
        items = [tuple(x) for x in bias]
    else:
        raise InputError(f"logit_bias must be a dict {{token id: bias}}, got {type(bias).__name__} {bias!r:.80}")
    out = {}
    for key, value in items:
        # ASCII digits only: str.isdigit() also takes "²" (int() then raised a bare ValueError) and "٣" (taken as 3)
        if isinstance(key, str) and key.strip().isascii() and key.strip().isdigit():
            if len(key.strip()) > HUGE_INT_DIGITS:     # int() of one past 4300 digits raised Python's ValueError
                raise InputError(f"logit_bias: a key is a string of {len(key.strip())} digits: far past any token id")
            key = int(key)
        if not is_integral(key) or key < 0:
            raise InputError(f"logit_bias: keys must be token ids (integers >= 0), got {key!r:.40}")
        # finite by the range comparison (NaN and +-inf fail it): is_real's math.isfinite raised a bare OverflowError
        # on a huge int (10**400)
        if not is_real(value, finite=False) or not abs(value) <= MAX_LOGIT_BIAS:
            raise InputError(f"logit_bias[{int(key)}] must be a number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                             f"got {value!r:.40}")
        out[int(key)] = _as_float(value)
    return tuple(sorted(out.items()))


def check_token_ids(ids, name: str, keep_order: bool = False) -> tuple | None:
    """A non-empty list (tuple, 1-D array) of token ids as a tuple of ints, sorted and without repeats unless
    keep_order (a word's tokens); None stays None (off). Ids past the vocabulary are refused by bias_tensor."""
    if ids is None:
        return None
    if getattr(ids, "ndim", 1) == 1 and hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise InputError(f"{name} must be a list of token ids, got {type(ids).__name__} {ids!r:.80}")
    if not ids:
        raise InputError(f"{name} is an empty list: give at least one token id (or none at all for no limit)")
    for i in ids:
        if not is_integral(i) or i < 0:
            raise InputError(f"{name}: {i!r:.40} is not a token id (an integer >= 0)")
    return tuple(int(i) for i in ids) if keep_order else tuple(sorted({int(i) for i in ids}))


_MT_WORDS = 624          # mt19937's state: 624 32-bit words
_MT_STATE_AT = 24        # their offset in torch's CPU generator state (seed u64, left i32, seeded i32, next u64)


def seeded_generator(seed: int, device) -> torch.Generator:
    """A generator seeded with all 64 bits of `seed` (0 <= seed < 2**64).

    torch's CPU generator (mt19937) keeps only the low 32 bits of manual_seed's value, so seeds 2**32 apart drew
    the same numbers: seed=1 and seed=2**32 + 1 (a 64-bit hash or time_ns) gave the same answer. Seeds below 2**32
    keep manual_seed's stream; larger ones get the state Python's random.seed(seed) builds from both halves
    (mt19937's init_by_array), which no 32-bit seed's state equals. CUDA's Philox takes all 64 bits itself."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    if g.device.type != "cpu" or seed < 2**32:
        return g
    state = g.get_state().clone()
    words = state[_MT_STATE_AT:_MT_STATE_AT + 8 * _MT_WORDS]
    words = words.view(torch.int64) if words.numel() == 8 * _MT_WORDS else None
    low = seed % 2**32                # manual_seed's state: init_genrand(low), whose first two words are these
    if words is None or [int(w) for w in words[:2]] != [low, (1812433253 * (low ^ (low >> 30)) + 1) % 2**32]:
        # another torch's layout: not overwritten blindly
        import warnings
        warnings.warn(f"seed {seed}: this torch's CPU generator state has an unknown layout, so only the seed's low "
                      f"32 bits are used (seeds 2**32 apart draw alike)", stacklevel=3)
        return g
    # Python's state after seeding is mt19937's right after init (the next draw twists first): as torch's,
    # whose left = 1, next = 0 after manual_seed are kept
    words.copy_(torch.tensor(random.Random(seed).getstate()[1][:_MT_WORDS], dtype=torch.int64))
    g.set_state(state)
    return g


def probs_from_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                      min_p: float = 0.0):
    """Target distribution [..., V] in fp32: softmax(logits / T) restricted to top-k, then to the nucleus (keep a
    token while the mass strictly before it is < top_p), then to min-p (tokens at least min_p times as likely as the
    most likely one), renormalised. T = 0: one-hot argmax. transformers' order (vLLM takes the nucleus of what min-p
    left instead: the two differ only where both are set).
    Plain sampling and tree rejection sampling both use this, so they sample the same distribution."""
    if temperature == 0:
        # scatter, not F.one_hot: one_hot validates class ids on the host on some backends
        return torch.zeros_like(logits, dtype=torch.float).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    x = logits.float() / temperature
    if 0 < top_k < x.shape[-1]:
        x = x.masked_fill(x < x.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
    p = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        p = _nucleus(p, top_p)
    if min_p > 0:
        # p_i >= min_p * p_max read on the logits, x_i - x_max >= ln(min_p): a cut after the nucleus keeps ratios,
        # and the top token always stays (min_p <= 1)
        p = p.masked_fill(x < x.amax(-1, keepdim=True) + math.log(min_p), 0.0)
    if top_p < 1.0 or min_p > 0:
        p = p / p.sum(-1, keepdim=True)
    return p


NUCLEUS_CANDIDATES = 1024   # the CPU's top_p looks among this many most likely tokens before sorting them all
NUCLEUS_FIRST = 64          # ... and among this many first (topk: ~80 us against ~160 us for 1024 on a 49k vocabulary)


def _nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """p with the tokens outside the nucleus zeroed. Stable: of tokens tied at the nucleus' edge (common with bf16
    logits) the lowest ids are kept, greedy's tie rule, on every device; the CPU's unstable sort kept whichever its
    internal order put first.

    Sorting a 49k vocabulary takes ~4.5 ms on a CPU core, about a 4-bit SmolLM2 step: on the CPU (where reading a
    value costs no sync) the nucleus is first sought among the top NUCLEUS_CANDIDATES tokens (~0.3 ms), ordered as
    the full sort orders them, so their running sums are the same numbers; and among the top NUCLEUS_FIRST before
    them (a T = 0.7, top_p 0.9 nucleus of SmolLM2 held 4 tokens at the median, 82 at most). That is exact wherever
    the nucleus closes inside them with its edge value above the smallest candidate (every token tied with the edge
    is then a candidate); elsewhere, and on GPUs, the whole vocabulary is sorted."""
    # The mass before a token is read in fp64 against top_p times the row's own total: fp32 softmax rows sum to
    # 1 +- a few 1e-7 and fp32 running sums near 1 are 6e-8 apart, so at top_p 0.9999 the edge moved by hundreds of
    # a 49k vocabulary's tail tokens against the exact nucleus (transformers' tail-first sum is exact there)
    limit = top_p * p.sum(-1, keepdim=True, dtype=torch.float64)
    for k in (NUCLEUS_FIRST, NUCLEUS_CANDIDATES):
        if p.device.type != "cpu" or p.shape[-1] <= 2 * k:
            break
        vals, ids = p.topk(k, dim=-1, sorted=False)
        ids, order = ids.sort(dim=-1)                              # ids ascending, then values descending, stably
        vals = vals.gather(-1, order)
        vals, order = vals.sort(dim=-1, descending=True, stable=True)
        ids = ids.gather(-1, order)
        keep = _mass_before(vals) < limit
        n = keep.sum(-1, keepdim=True)                             # nucleus size per row (0: NaN probabilities)
        if bool(((n >= 1) & (n < k) & (vals.gather(-1, (n - 1).clamp(min=0)) > vals[..., -1:])).all()):
            return torch.zeros_like(p).scatter_(-1, ids, vals * keep)
    sp, order = p.sort(dim=-1, descending=True, stable=True)
    drop = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, _mass_before(sp) >= limit)
    return p.masked_fill(drop, 0.0)


def _mass_before(sorted_p: torch.Tensor) -> torch.Tensor:
    """Each token's running mass before it, in fp64 (the same numbers for any prefix of the same order)."""
    s = sorted_p.double()
    return s.cumsum(-1) - s


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties. counts: [B, V] of each token's count in the answer so far."""
    logits = logits.float() - frequency * counts
    return logits - presence * (counts > 0)


def _repeated(logits: torch.Tensor, penalty: float) -> torch.Tensor:
    return torch.where(logits > 0, logits / penalty, logits * penalty)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the context. seen: [B, V] bool."""
    if penalty == 1.0:
        return logits
    logits = logits.float()          # fp16 logits / a penalty < 1 overflow past 65504
    return torch.where(seen, _repeated(logits, penalty), logits)


def answer_penalties(logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
                     params: SamplingParams) -> torch.Tensor:
    """repetition_penalty over seen, then presence / frequency over counts (None: that penalty is off), in plain
    decoding's order; seen / counts broadcast against logits (a [B, 1, V] view ranks [B, K, V] drafts alike)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = apply_penalties(logits, counts, params.presence_penalty, params.frequency_penalty)
    return logits


def tree_penalties(logits: torch.Tensor, tokens: torch.Tensor, path: torch.Tensor, seen: torch.Tensor | None,
                   counts: torch.Tensor | None, params: SamplingParams) -> torch.Tensor:
    """The penalties plain decoding would apply at every node of a verified tree: on the answer before the step
    (seen / counts [B, V], the root's token included) plus the node's own path below the root.

    logits [B, N, V]; tokens [B, N] (node tokens); path [B, N, N] or [N, N] bool: path[n, m] = node m is below the
    root and an ancestor-or-self of node n. Every value is the float plain decoding computes for that node's context
    (greedy output stays exact): the same formulas, elementwise, on the same logits.

    Only the columns of tokens some row has seen or counted, and the tree's own, change. A CPU (where reading a
    count costs no sync) penalises just those: the full [B, N, V] broadcast, ~10 passes over the logits, cost ~7 ms
    a tree-16 step on one core against a ~4-7 ms plain step (4-bit SmolLM2). A GPU broadcasts: fixed shapes for its
    graphs."""
    logits = logits.float()
    if logits.device.type != "cpu":
        return _tree_penalties_dense(logits, tokens, path, seen, counts, params)
    touched = torch.zeros(logits.shape[-1], dtype=torch.bool)
    for t in (seen, None if counts is None else counts > 0):
        if t is not None:
            touched |= t.any(0)
    touched[tokens.flatten()] = True
    cols = touched.nonzero().squeeze(1)
    slot = torch.empty(logits.shape[-1], dtype=torch.long)
    slot[cols] = torch.arange(len(cols))
    sub = _tree_penalties_dense(logits[..., cols], slot[tokens], path, None if seen is None else seen[:, cols],
                                None if counts is None else counts[:, cols], params)
    return logits.index_copy(2, cols, sub)         # a copy: the model's logits stay its own (logprobs read them)


def _tree_penalties_dense(logits: torch.Tensor, tokens: torch.Tensor, path: torch.Tensor, seen: torch.Tensor | None,
                          counts: torch.Tensor | None, params: SamplingParams) -> torch.Tensor:
    """tree_penalties over every column of logits (fp32; left as they are: each write lands in a tensor made here).
    The shared part is a broadcast over the nodes; a path's own tokens (at most N per node) are rewritten from the unpenalised logit with
    the node's total count."""
    B, N = tokens.shape
    path = path.expand(B, N, N).float()
    # own[b, n, m]: how many of node n's path tokens equal node m's token; a node-by-node count without a [B, N, V]
    # tensor (V = 152k for Qwen). Rows m that share a token get the same values, so their writes below agree.
    own = torch.bmm(path, (tokens[:, :, None] == tokens[:, None, :]).float())
    at = tokens[:, None, :].expand(B, N, N)           # at[b, n, m] = node m's token: where node n's values change
    if seen is not None:
        raw = logits.gather(2, at)
        logits = torch.where(seen[:, None, :], _repeated(logits, params.repetition_penalty), logits)
        hit = seen.gather(1, tokens)[:, None, :] | (own > 0)
        logits.scatter_(2, at, torch.where(hit, _repeated(raw, params.repetition_penalty), raw))
    if counts is not None:
        raw = logits.gather(2, at)
        logits = apply_penalties(logits, counts[:, None, :], params.presence_penalty, params.frequency_penalty)
        total = counts.gather(1, tokens)[:, None, :] + own.int()
        logits.scatter_(2, at, apply_penalties(raw, total, params.presence_penalty, params.frequency_penalty))
    return logits


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim (the first maximum on ties). Plain decoding and greedy tree acceptance both
    call this, so they break ties alike; max().indices is ~2-3x faster than argmax() on CPU bf16 logits."""
    return logits.max(-1).indices


def sample(logits: torch.Tensor, params: SamplingParams, generator=None) -> torch.Tensor:
    """logits: [B, V] -> tokens [B] (long), on the device, no host sync."""
    if params.greedy:
        return greedy_token(logits)
    probs = probs_from_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    # NaN logits give NaN probabilities, which multinomial refused with a raw error on a CPU and a device-side
    # assert on CUDA (the context is lost). Any token will do there: the decoder flags the row (flag_non_finite).
    probs = probs.nan_to_num(nan=1.0)
    if probs.device.type == "cpu":
        return draw(probs, generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)    # as validated in captured CUDA graphs


def exponential_race(p: torch.Tensor, generator=None) -> torch.Tensor:
    """argmax p_i / E_i with E_i ~ Exp(1) a token: token i with probability p_i / sum(p), a zero-probability one
    never. Typical acceptance's bonus always draws so, on every device: its fused kernels (triton_kernels/
    acceptance.py) take the same noise from the same generator, so their bonus token equals the reference's."""
    e = torch.empty_like(p).exponential_(generator=generator).clamp_min_(1e-30)
    return (p / e).argmax(-1)


def draw(p: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row of p [B, V] (>= 0, any sum), token i with probability p_i / sum(p); no host sync, and a
    zero-probability token never comes out. Tree rejection sampling draws here, and plain sampling on a CPU.

    CPU: the inverse CDF, one uniform a row against the running sums (~30 us for a 49k vocabulary, where torch's
    multinomial and exponential_ took ~0.8 ms each: about a quarter of a 4-bit SmolLM2 step per draw, and a tree
    step draws up to depth + 1 times). Elsewhere the exponential race: fixed shapes for CUDA graphs, and fast there."""
    if p.device.type != "cpu":
        return exponential_race(p, generator)
    c = p.double().cumsum(-1)        # fp64: tokens far below the total keep their share of the running sum
    total = c[:, -1:]
    u = torch.rand(p.shape[0], 1, generator=generator, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))    # u < total: an index inside V
    # the first running sum above u: c[i] > c[i - 1], so p_i > 0
    return torch.searchsorted(c, u, right=True).clamp_(max=p.shape[-1] - 1).squeeze(-1)
