"""What `amphista train` reads in which step: the held-out split, source weights, and the batch plan.

Everything here is a pure function of the data, the seed and the step, which is what makes `--resume` continue
exactly and lets tree-search and the benchmarks rebuild the same held-out set.
"""
from __future__ import annotations

import hashlib
import math
import random

from ..errors import ConfigError
from .data import Sequence, prompt_id


def parse_source_weights(spec) -> dict[str, float]:
    """'a=2,b=0.5' (or a dict) -> {source: weight}; unlisted sources weigh 1."""
    if not spec:
        return {}
    items = spec.items() if isinstance(spec, dict) else (
        part.rpartition("=")[::2] for part in str(spec).split(",") if part.strip())
    out = {}
    for name, text in items:
        name = str(name).strip()
        try:
            w = float(text)
        except (TypeError, ValueError):
            w = float("nan")
        if not name or not math.isfinite(w) or w < 0:
            entry = f"{name}={text}" if name else str(text)
            raise ConfigError(f"--source-weights: bad entry {entry!r}; expected SOURCE=WEIGHT with WEIGHT >= 0, "
                              f"e.g. 'alpaca_en_demo=3,gsm8k_train=0.5'")
        if name in out:     # 's=1,s=2' took the last and dropped the first without a word
            raise ConfigError(f"--source-weights: source {name!r} is given twice in {spec!r}; give each source once")
        out[name] = w
    return out


def check_source_weights(weights: dict[str, float], seqs: list[Sequence]):
    """Names must exist in the data (a typo would silently weigh 1), and something must be left to train on."""
    sources = {s.source for s in seqs}
    unknown = sorted(set(weights) - sources)
    if unknown:
        raise ConfigError(f"--source-weights names source(s) not in the training data: {', '.join(unknown)}; "
                          f"the data's sources: {', '.join(sorted(sources))}")
    if weights and not any(weights.get(s.source, 1.0) > 0 for s in seqs):
        raise ConfigError("--source-weights gives every training sequence weight 0")


# ---- data plan -------------------------------------------------------------------------------------------
def split_heldout(seqs: list[Sequence], frac: float) -> tuple[list[Sequence], list[Sequence]]:
    """Deterministic by id hash (independent of the seed and of the file order). Sampled answers of one prompt
    (ids ID#s0, ID#s1, ... from `distill --samples`) hash as ID, so they land on the same side."""
    if frac <= 0 or len(seqs) < 2:
        return seqs, []
    key = _heldout_key
    # Small data may hash no id under frac: then the lowest prompt is held out (with its sampled answers). A held
    # prompt never trains: held-out numbers, and the trees tree-search fits on them, would flatter the heads.
    held_ids = {prompt_id(s.id) for s in seqs if key(s) < frac} or {prompt_id(min(seqs, key=key).id)}
    held = [s for s in seqs if prompt_id(s.id) in held_ids]
    train = [s for s in seqs if prompt_id(s.id) not in held_ids]
    return (train, held) if train else (seqs, [])      # one prompt, or frac covering them all: nothing held


def _heldout_key(s: Sequence) -> float:
    return int(hashlib.sha1(prompt_id(s.id).encode()).hexdigest()[:8], 16) / 16 ** 8


def no_heldout_reason(seqs: list[Sequence], frac: float) -> str:
    """Why split_heldout(seqs, frac) held nothing out, and what to pass instead. A large frac is not "too small to
    hold anything": it would hold out every prompt, which leaves nothing to train on, so the split keeps them all."""
    if frac <= 0:
        return f"--eval-frac {frac} held out no sequence"
    if len(seqs) < 2:
        return f"the data holds {len(seqs)} sequence(s); holding one out needs at least 2"
    prompts = {prompt_id(s.id) for s in seqs}
    if len(prompts) < 2:
        return (f"all {len(seqs)} sequences answer one prompt; holding it out would leave nothing to train on, so "
                f"every sequence trains")
    # any frac up to the largest prompt key leaves that prompt (at least) to train on
    most = math.floor(max(map(_heldout_key, seqs)) * 100) / 100
    lower = f"pass --eval-frac {most} or less" if most > 0 else "pass a smaller --eval-frac"
    return (f"--eval-frac {frac} would hold out every one of the {len(prompts)} prompts and leave nothing to "
            f"train on, so none was held out and all sequences train; {lower} to keep some for evaluation")


def epoch_batches(seqs: list[Sequence], batch_tokens: int, seed: int, epoch: int,
                  weights: dict[str, float] | None = None) -> list[list[int]]:
    """Shuffled batches of sequence indices; padded size B * T_max stays within batch_tokens. With source
    weights an epoch holds floor(w) copies of each sequence of a source plus one more with probability frac(w)
    (drawn per epoch from the same seed, so the plan stays a pure function of (seed, epoch))."""
    rng = random.Random(seed * 1_000_003 + epoch)
    if weights:
        order = []
        for i, s in enumerate(seqs):
            w = weights.get(s.source, 1.0)
            order += [i] * (int(w) + (rng.random() < w - int(w)))
    else:
        order = list(range(len(seqs)))
    rng.shuffle(order)
    batches, cur, tmax = [], [], 0
    for i in order:
        t = max(tmax, len(seqs[i].ids))
        if cur and t * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, t = [], len(seqs[i].ids)
        cur.append(i)
        tmax = t
    if cur:
        batches.append(cur)
    return batches


class BatchPlan:
    """Step -> batch over successive epochs. Each epoch packs its own shuffle, so epochs hold different numbers
    of batches: steps run through every batch of epoch 0, then of epoch 1, ... A pure function of (seed, step),
    which is what makes --resume exact."""

    def __init__(self, seqs: list[Sequence], batch_tokens: int, seed: int, weights: dict[str, float] | None = None):
        self.seqs, self.batch_tokens, self.seed, self.weights = seqs, batch_tokens, seed, weights
        self.starts = [0]               # starts[e]: first step of epoch e
        self._epoch, self._batches = None, None

    def batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            self._batches = epoch_batches(self.seqs, self.batch_tokens, self.seed, epoch, self.weights)
            self._epoch = epoch
        return self._batches

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, index of the batch within it)."""
        e = max(i for i, s in enumerate(self.starts) if s <= step)
        while True:
            n = len(self.batches(e))
            if e + 1 == len(self.starts):
                self.starts.append(self.starts[e] + n)
            if step < self.starts[e + 1]:
                return e, step - self.starts[e]
            e += 1

    def batch(self, step: int) -> list[Sequence]:
        epoch, idx = self.locate(step)
        return [self.seqs[i] for i in self.batches(epoch)[idx]]


def planned_sequences(plan: BatchPlan, steps: int) -> list[Sequence]:
    """Every sequence that steps [0, steps) of the plan read, once each, in data order. A stage that walks only part
    of an epoch (weights < 1 leave most of a source out of it) needs only these in the hidden cache."""
    used = set()
    for step in range(steps):
        epoch, idx = plan.locate(step)
        used.update(plan.batches(epoch)[idx])
    return [plan.seqs[i] for i in sorted(used)]


def source_mix(seqs: list[Sequence], weights: dict[str, float]) -> str:
    """Each source's share of the answer tokens an epoch trains on, weights applied: 'a 60.0%, b 40.0%'."""
    tok: dict[str, float] = {}
    for s in seqs:
        tok[s.source] = tok.get(s.source, 0.0) + (len(s.ids) - s.prompt_len) * weights.get(s.source, 1.0)
    total = sum(tok.values()) or 1.0
    return ", ".join(f"{k or '(none)'} {100 * v / total:.1f}%" for k, v in sorted(tok.items(), key=lambda kv: -kv[1]))
