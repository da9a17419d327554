"""`amphista train`: Amphista or Medusa heads trained on self-distillation data, the target frozen.

Per sequence x_0..x_{L-1} (prompt_ids + answer_ids, P prompt tokens), teacher forcing: the target's final-norm
hidden h_t and the next token x_{t+1} feed the heads at every position t at once (the SAL is causal over the
whole sequence). Head k (0-based) at position t drafts x_{t+k+2}: its target is the target model's distribution
at position t+k+1 (`--loss kl`, the default; logits recomputed from the frozen LM head on the fly) or the data
token x_{t+k+2} (`--loss ce`), weighted lambda^k.

Which positions count: t >= P-1 (the last prompt position onward: where the decoder drafts, since it drafts
from the prompt's last hidden state after prefill) with t+k+2 <= L-1 (the drafted token is an answer token of the
sequence). Prompt positions before that are seen by the SAL as context but carry no loss. The loss is the mean
over valid positions per head, summed over heads with weights lambda^k.

Memory: features [N, K, d] are computed once per step; logits [chunk, K, V] only per chunk of positions, each
chunk back-propagated into the features' gradient before the next, then one backward through the heads.

Determinism: the batch plan depends only on (seed, epoch), position sampling only on (seed, step), so
`--resume` from OUT/trainer_state.pt (fp32 master weights, AdamW, schedule, step) continues exactly.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, InputError
from ..text_files import user_path
from ..values import is_real
from .data import load_shard, prompt_text_decoder
from .hidden_cache import HiddenSource, fill_hidden_cache, pad_batch
from .plan import (BatchPlan, check_source_weights, epoch_batches, no_heldout_reason, parse_source_weights,
                   planned_sequences, source_mix, split_heldout)

STATE_FILE = "trainer_state.pt"


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C (SIGINT) inside the block is raised as KeyboardInterrupt when the block ends, so an optimizer update
    and its step count, or a checkpoint's files, are never left half done. Only in the main thread and under
    Python's own SIGINT handler (where SIGINT is ignored or handled otherwise, that stays so)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    got = []
    signal.signal(signal.SIGINT, lambda *_: got.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if got:
        raise KeyboardInterrupt


def _flag(field_name: str) -> str:
    """A TrainConfig field's command-line flag (`lam` is --lambda)."""
    return "--" + {"lam": "lambda"}.get(field_name, field_name).replace("_", "-")


def check_draft_vocab(size: int):
    """A --draft-vocab size heads can draft with (train's, and each of bench's): 0 (the full vocabulary) or at
    least 2."""
    if size < 0:
        raise ConfigError("--draft-vocab must be >= 0 (0 = the full vocabulary)")
    if size == 1:
        # a softmax over one slot is 1 whatever the logits: KL (and CE) are 0 at every position, no gradient; so
        # no trained heads have it, and bench timed heads that cannot exist
        raise ConfigError("--draft-vocab 1: heads that draft from a single token always give it probability 1, "
                          "so the loss is 0 everywhere and they learn nothing (no trained heads have it); pass "
                          "--draft-vocab 0 (the full vocabulary) or at least 2 (e.g. 8192)")


@dataclass
class TrainConfig:
    data: list = field(default_factory=list)
    out: str = ""
    model: str = "smollm2-135m"
    device: str | None = None
    dtype: str | None = None            # target weights dtype
    kind: str = "amphista"
    num_heads: int = 4
    loss: str = "kl"
    lam: float = 0.8
    steps: int | None = None
    epochs: float | None = None
    batch_tokens: int = 4096
    loss_positions: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int | None = None
    clip: float = 1.0
    train_dtype: str = "fp32"
    save_dtype: str = "bf16"
    seed: int = 0
    cache_hidden: str | None = None
    eval_every: int = 0
    eval_frac: float = 0.05
    eval_max_seqs: int = 64
    save_every: int = 0
    max_seq_len: int = 1024
    resume: bool = False
    overwrite: bool = False             # replace heads (and a trainer state) already in `out` without --resume
    stop_after: int | None = None
    chunk: int = 256
    log: str | None = None
    stage_of_head: str | list | None = None
    mse_weight: float = 0.0             # + weight * full-vocabulary logit MSE to the teacher (all positions)
    mse_positions: int = 0              # > 0 (with loss_positions): the MSE on this many rows, a superset of KL's
    init: str = "identity"              # identity: every head starts as the target's own next-token head
    init_from: str | None = None        # start from these trained heads instead (warm_start.py; may grow them)
    layers_per_stage: int | None = None  # Amphista: SAL layers per stage (None = the default, 1)
    aeb_layers: int | None = None       # Amphista: auto-embedding layers (None = the default, 1)
    sal_intermediate_size: int | None = None   # Amphista: SAL MLP width (None = the default, Llama's for dim)
    aeb_intermediate_size: int | None = None   # Amphista: AEB MLP width (None = the default)
    draft_vocab: int = 0                # > 0: heads score only the N most frequent answer tokens (FR-Spec style)
    source_weights: str | dict | None = None   # "src=w,src=w": each epoch holds w copies of a source's sequences
    fill_cache: bool = False            # only compute every sequence's hidden states into cache_hidden, then stop
    fill_planned: bool = False          # with fill_cache: only the sequences steps [0, total) read + the held-out ones
    progress: bool = True

    def check(self):
        if not self.data:
            raise InputError("no training data given (--data)")
        if not self.out:
            raise InputError("no output directory given (--out)")
        if self.kind not in ("amphista", "medusa"):
            raise ConfigError(f"--kind must be amphista or medusa, got {self.kind!r}")
        if self.loss not in ("kl", "ce"):
            raise ConfigError(f"--loss must be kl or ce, got {self.loss!r}")
        if self.train_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"--train-dtype must be fp32 or bf16, got {self.train_dtype!r}")
        for name in ("num_heads", "batch_tokens", "chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        # NaN passes every comparison below and inf trains into NaN weights (or fails deep in torch): finite first
        for name in ("epochs", "lr", "lam", "eval_frac", "weight_decay", "clip", "mse_weight"):
            v = getattr(self, name)
            if v is not None and not is_real(v):
                raise ConfigError(f"{_flag(name)} must be a finite number, got {v!r}")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs <= 0:
            raise ConfigError("--steps / --epochs must be positive")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"--stop-after must be a step >= 1, got {self.stop_after}")
        # 0 has a meaning for each of these (no warmup, every position, at evals/end, at the end, no evaluation)
        for name in ("warmup", "loss_positions", "mse_positions", "save_every", "eval_every", "eval_max_seqs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.clip < 0:       # 0 turns clipping off; a negative norm bound would silently do the same
            raise ConfigError(f"--clip must be >= 0 (0 = no clipping), got {self.clip}")
        if self.max_seq_len < 2:
            raise ConfigError(f"--max-seq-len must be at least 2, got {self.max_seq_len}")
        if self.stage_of_head is not None and self.stage_of_head != "":
            soh = self.stage_of_head
            try:
                self.stage_of_head = [int(x) for x in (soh.split(",") if isinstance(soh, str) else soh)]
            except (TypeError, ValueError):
                raise ConfigError(f"--stage-of-head {soh!r}: expected a comma list of {self.num_heads} stage "
                                  f"indices, e.g. 0,0,1,1") from None
            if len(self.stage_of_head) != self.num_heads:
                raise ConfigError(f"--stage-of-head {soh!r}: lists {len(self.stage_of_head)} stage(s) for "
                                  f"{self.num_heads} heads (--num-heads)")
        if self.log and Path(self.log).is_dir():
            raise InputError(f"--log {self.log} is a directory; give a file to append JSON lines to")
        shards = [self.data] if isinstance(self.data, (str, Path)) else self.data
        if self.log and any(Path(d).expanduser().resolve() == Path(self.log).expanduser().resolve() for d in shards):
            # metrics appended to a distilled shard: every later read (and distill's resume) meets foreign lines
            raise InputError(f"--log {self.log} is a --data shard: metrics would be appended to the training data; "
                             f"give another file")
        if self.init not in ("identity", "default"):
            raise ConfigError(f"--init must be identity or default, got {self.init!r}")
        for name in ("layers_per_stage", "aeb_layers", "sal_intermediate_size", "aeb_intermediate_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.kind == "medusa":
            # Medusa heads have no SAL stages nor auto-embedding block: these were dropped without a word, and the
            # user trained (and compared) plain Medusa heads believing them deeper or wider
            given = [_flag(n) for n in ("stage_of_head", "layers_per_stage", "aeb_layers", "sal_intermediate_size",
                                        "aeb_intermediate_size") if getattr(self, n) not in (None, "")]
            if given:
                raise ConfigError(f"{', '.join(given)}: Amphista-only setting(s), but --kind medusa (Medusa heads "
                                  f"are one ResBlock per head); drop them, or train --kind amphista")
        if self.mse_weight < 0:
            raise ConfigError("--mse-weight must be >= 0")
        if self.mse_positions and not (self.mse_weight > 0 and 0 < self.loss_positions <= self.mse_positions):
            raise ConfigError("--mse-positions N needs --mse-weight > 0 and 0 < --loss-positions <= N (the MSE "
                              "rows include the KL rows)")
        if self.fill_cache and not self.cache_hidden:
            raise ConfigError("--fill-cache needs --cache-hidden DIR")
        if self.fill_planned and not self.fill_cache:
            raise ConfigError("--fill-planned only applies to --fill-cache")
        check_draft_vocab(self.draft_vocab)
        if self.steps is not None and not self.fill_cache:       # --fill-cache trains nothing: no schedule
            check_warmup(self.warmup, self.steps)
        if not 0 <= self.eval_frac < 1 or self.lr <= 0 or not 0 < self.lam <= 1:
            raise ConfigError(f"need 0 <= --eval-frac < 1, --lr > 0 and 0 < --lambda <= 1; got --eval-frac "
                              f"{self.eval_frac}, --lr {self.lr}, --lambda {self.lam}")
        if self.lr * self.weight_decay >= 1:
            # AdamW scales each weight by 1 - lr * weight_decay per step: at 1 or more it zeroes or flips them
            # (--weight-decay 1e30 saved heads of weights ~1e27 and reported success)
            raise ConfigError(f"--weight-decay {self.weight_decay} with --lr {self.lr}: AdamW multiplies the weights "
                              f"by 1 - lr x weight-decay each step, which must stay above 0; give a --weight-decay "
                              f"below {1 / self.lr:g} (typical: 0 to 0.1)")
        self.source_weights = parse_source_weights(self.source_weights)


def check_warmup(warmup: int | None, total: int, how: str = "--steps") -> None:
    """A warmup longer than the run leaves the learning rate below --lr at every step and skips the cosine decay:
    refused rather than trained on a fraction of the rate the user asked for."""
    if warmup is not None and warmup > total:
        raise ConfigError(f"--warmup {warmup} is longer than the run ({total} steps, from {how}): the learning rate "
                          f"would climb to only {total / warmup:.0%} of --lr and never decay; pass --warmup {total} "
                          f"or less (default: 5% of the steps), or train longer")


# ---- heads pieces --------------------------------------------------------------------------------------------
def head_features(heads, hidden: torch.Tensor, next_tokens: torch.Tensor, rows: torch.Tensor | None = None):
    """The heads' LM-head inputs: heads.logits(features) == heads.forward_train(...) -> [B, T, K, d], or
    [N, K, d] at rows [N, 2] = (b, t) only. The SAL runs over whole sequences; the per-position parts (ResBlocks,
    auto-embedding block, norm) only where the loss is taken."""
    from ..heads import AmphistaHeads
    K = heads.num_heads
    if isinstance(heads, AmphistaHeads):
        B, T, _ = hidden.shape
        rope = heads._rope_rows(T, hidden.device)[:T][None]
        outs = heads._sal(heads._fuse(hidden, next_tokens), rope, None, None, None)   # None: causal
        stages = torch.stack(outs, dim=2)                               # [B, T, S, d]
        if rows is not None:
            stages = stages[rows[:, 0], rows[:, 1]]
        idx = torch.tensor(heads.config.stage_of_head, device=hidden.device)
        return heads.mix(heads.res(stages.index_select(-2, idx)))
    h = hidden if rows is None else hidden[rows[:, 0], rows[:, 1]]
    x = h.unsqueeze(-2).expand(*h.shape[:-1], K, h.shape[-1])
    return heads.res(x.to(heads.res.weight.dtype))


@torch.no_grad()
def identity_init(heads, target):
    """Amphista starts as a pass-through of h_t: fusion = [I | 0], every residual branch's output projection
    (SAL and auto-embedding layers) zero, final norm scaled to h's RMS. Each head then drafts what the target
    predicts at t (a sane, calibrated start) instead of a random distribution. Medusa's ResBlocks already start
    as the identity."""
    from ..heads import AmphistaHeads
    if not isinstance(heads, AmphistaHeads):
        return
    d = heads.config.dim
    if heads.fuse is not None:
        heads.fuse.weight.zero_()
        heads.fuse.weight[:, :d].copy_(torch.eye(d))
    for layer in list(heads.sal) + list(heads.aeb):
        wo = layer.attention.wo if hasattr(layer, "attention") else layer.wo
        wo.weight.zero_()
        layer.feed_forward.w2.weight.zero_()
    heads.norm.weight.fill_(float(target.norm.weight.float().pow(2).mean().sqrt()))


def answer_token_counts(seqs, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in the answers of seqs: [vocab_size] int64."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in seqs:
        counts += torch.bincount(torch.tensor(s.ids[s.prompt_len:], dtype=torch.long), minlength=vocab_size)
    return counts


def frequent_tokens(seqs, n: int, vocab_size: int) -> tuple[torch.Tensor, float]:
    """The n most frequent answer tokens of seqs (ties by id) and the share of answer tokens they cover."""
    counts = answer_token_counts(seqs, vocab_size)
    # stable sort on -count keeps ids ascending among equal counts: deterministic for a given data set
    order = torch.sort(-counts, stable=True).indices[:n]
    return order, answer_share(counts, order)


def answer_share(counts: torch.Tensor, ids: torch.Tensor) -> float:
    """The share of answer tokens (counts from answer_token_counts) that the token ids cover."""
    return float(counts[ids].sum()) / max(1, int(counts.sum()))


def centered_gram(w: torch.Tensor) -> torch.Tensor:
    """G with e^T G e / V = the mean squared error of the softmax-relevant (centered) logits W e: [d, d]."""
    w = w.detach().double()
    s = w.sum(0)
    return ((w.T @ w - torch.outer(s, s) / w.shape[0]) / w.shape[0]).float()


def loss_rows(lengths: torch.Tensor, plen: torch.Tensor, T: int, K: int):
    """(b, t) rows that carry loss for head 0, and valid[b, t, k] for every head."""
    dev = lengths.device
    t = torch.arange(T, device=dev)[None, :, None]
    k = torch.arange(K, device=dev)[None, None, :]
    valid = (t >= (plen - 1)[:, None, None]) & (t + k + 2 <= (lengths - 1)[:, None, None])
    return valid


class LossComputer:
    def __init__(self, target, kind: str, lam: float, K: int, chunk: int, autocast):
        self.target, self.kind, self.chunk, self.autocast = target, kind, chunk, autocast
        self.w = torch.tensor([lam ** k for k in range(K)])
        self.K = K

    def __call__(self, heads, feats, hidden, x, rows, valid, backward: bool, topk: int = 5):
        """feats [N, K, d] (graph to the heads) at rows [N, 2] = (b, t); valid [N, K]. Returns (loss, stats)."""
        K, dev = self.K, feats.device
        w = self.w.to(dev)
        cnt = valid.sum(0).float()                                 # [K]; 0 where a head drafts past every end
        scale = w / cnt.clamp_min(1)                               # per-head mean, weighted
        leaf = feats.detach().requires_grad_(backward)
        total = torch.zeros((), device=dev)
        nll = torch.zeros(K, device=dev)
        top1 = torch.zeros(K, device=dev)
        top5 = torch.zeros(K, device=dev)
        per_sum = torch.zeros(K, device=dev)       # the loss's numerators: batches of a held-out set add up
        b, t = rows[:, 0], rows[:, 1]
        ks = torch.arange(K, device=dev)
        T = x.shape[1]
        # With a draft vocabulary the heads score V' tokens: the teacher is its distribution renormalised over
        # those V' tokens (what drafting can use), and data tokens map to their slot (-1 = not draftable).
        w_teacher = heads.output_weight()          # the target's LM head (rows of the draft vocabulary)
        for s in range(0, rows.shape[0], self.chunk):
            sl = slice(s, s + self.chunk)
            bb, tt, vv = b[sl], t[sl], valid[sl]
            tgt_pos = (tt[:, None] + ks[None] + 2).clamp(max=T - 1)               # drafted token index
            data_tok = x[bb[:, None], tgt_pos]                                      # [n, K]
            data_tok = heads.slots_of(data_tok)                                     # -1: not draftable
            if self.kind == "ce":
                vv = vv & (data_tok >= 0)
            in_vocab = data_tok >= 0
            data_tok = data_tok.clamp_min(0)
            with self.autocast():
                logits = heads.logits(leaf[sl]).float()
            logq = torch.log_softmax(logits, -1)
            if self.kind == "kl":
                with torch.no_grad(), self.autocast():
                    h_u = hidden[bb[:, None], (tt[:, None] + ks[None] + 1).clamp(max=T - 1)]   # [n, K, d]
                    tl = torch.nn.functional.linear(h_u.to(w_teacher.dtype), w_teacher).float()
                    cap = getattr(getattr(self.target, "config", None), "final_logit_softcapping", None)
                    if cap is not None:       # the target's own distribution (Gemma's softcap, Transformer.logits)
                        tl = torch.tanh(tl / cap) * cap
                logp = torch.log_softmax(tl, -1)
                per = (logp.exp() * (logp - logq)).sum(-1)                          # [n, K]
            else:
                per = -logq.gather(-1, data_tok[..., None]).squeeze(-1)
            per = per * vv
            loss = (per.sum(0) * scale).sum()
            if backward:
                loss.backward()
            with torch.no_grad():
                total += loss.detach()
                per_sum += per.sum(0).detach()
                nll += (-logq.gather(-1, data_tok[..., None]).squeeze(-1) * (vv & in_vocab)).sum(0).detach()
                top = logits.topk(min(topk, logits.shape[-1]), -1).indices
                hit = (top == data_tok[..., None]) & in_vocab[..., None]    # a token outside V' is a miss
                top1 += (hit[..., 0] & vv).sum(0)
                top5 += (hit.any(-1) & vv).sum(0)
        stats = {"count": cnt, "nll": nll, "top1": top1, "top5": top5, "loss_sum": per_sum}
        return total, leaf.grad if backward else None, stats


SUMMED_STATS = ("count", "nll", "top1", "top5", "loss_sum", "mse_sum")     # held-out stats added over batches


# ---- the trainer -------------------------------------------------------------------------------------------
# What --resume compares with the saved recipe. A difference in RESUME_SAME (which sequences train or are held
# out, the heads' layout, the batch plan, the optimizer) would make the continued run a different, unrecorded
# recipe: refused. RESUME_WARN are what a staged recipe changes on purpose (scripts/train_smollm2_heads.sh resumes
# with --loss-positions 0 for its KL-at-every-position stage): allowed, with a warning. Anything else (--steps,
# --stop-after, --save-every, --eval-every, --log, --cache-hidden, --save-dtype, ...) may change freely.
RESUME_SAME = ("kind", "num_heads", "loss", "lam", "seed", "batch_tokens", "lr", "draft_vocab", "layers_per_stage",
               "aeb_layers", "sal_intermediate_size", "aeb_intermediate_size", "source_weights", "eval_frac",
               "max_seq_len", "stage_of_head")
RESUME_WARN = ("loss_positions", "mse_weight", "mse_positions", "warmup", "train_dtype", "clip", "weight_decay")
_ABSENT = {"draft_vocab": 0, "source_weights": {}}     # states written before these options existed


def shard_digest(seqs, tokens: bool = False) -> str:
    """Which records training read (ids and lengths, in file order): a resumed run must read the same.
    tokens: their token ids too (another shard of the same ids and lengths, distilled anew, passed for the same)."""
    h = hashlib.sha1()
    for s in seqs:
        h.update(f"{s.id}\x00{s.prompt_len}\x00{len(s.ids)}\n".encode())
        if tokens:
            h.update(",".join(map(str, s.ids)).encode())
    return h.hexdigest()[:16]


def _stages(v):
    return [int(x) for x in v.split(",")] if isinstance(v, str) and v else (list(v) if v else None)


def check_resume_recipe(sf: Path, st: dict, recipe: dict, fp: str, data_digest: str,
                        tokens_digest: str | None = None) -> None:
    """Refuses a --resume whose recipe differs from the saved one in a key of RESUME_SAME (naming the keys), or
    whose data or target differ; warns for keys of RESUME_WARN."""
    theirs = st["recipe"]
    flag = _flag
    norm = lambda k, v: _stages(v) if k == "stage_of_head" else v
    differ = [f"{flag(k)} {norm(k, theirs.get(k, _ABSENT.get(k)))!r} -> {norm(k, recipe[k])!r}" for k in RESUME_SAME
              if norm(k, theirs.get(k, _ABSENT.get(k))) != norm(k, recipe[k])]
    if st.get("data_digest") not in (None, data_digest) or st.get("tokens_digest") not in (None, tokens_digest):
        differ.append(f"--data {theirs.get('data')} -> {recipe['data']} (the records read differ)")
    if st["fingerprint"] != fp:
        differ.append(f"target (LM-head fingerprint {st['fingerprint']} -> {fp})")
    if differ:
        raise ConfigError(f"--resume: {sf} was written by another recipe or target: {'; '.join(differ)}; resume "
                          f"with the saved settings, or start anew (--overwrite, or --init-from {sf.parent})")
    changed = [f"{flag(k)} {theirs[k]!r} -> {recipe[k]!r}" for k in RESUME_WARN
               if k in theirs and theirs[k] != recipe[k]]
    if "data_digest" not in st and [str(p) for p in theirs.get("data", [])] != [str(p) for p in recipe["data"]]:
        changed.append(f"--data {theirs.get('data')} -> {recipe['data']} (a state this old records no digest "
                       f"of its records)")
    if changed:
        print(f"train: warning: --resume continues with {'; '.join(changed)}: the run goes on as another recipe "
              f"from here", file=sys.stderr)


_STATE_KEYS = ("step", "heads", "optimizer", "scheduler", "torch_rng", "recipe", "fingerprint")


def read_trainer_state(sf: Path) -> dict:
    """OUT/trainer_state.pt for --resume; a torn, foreign or incomplete file is an InputError naming it."""
    try:
        st = torch.load(sf, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- pickle and torch raise many types for a file that is not theirs
        st, why = None, f"{type(e).__name__}: {e}"
    else:
        why = ("it holds " + type(st).__name__) if not isinstance(st, dict) else \
            "it lacks " + ", ".join(k for k in _STATE_KEYS if k not in st)
    if not isinstance(st, dict) or any(k not in st for k in _STATE_KEYS):
        raise InputError(f"--resume: {sf} is not a trainer state that `amphista train` wrote ({why:.200}); start "
                         f"anew with --overwrite, or keep its heads with --init-from {sf.parent} and another --out")
    return st


def _fitted_trees(out: Path) -> list[str]:
    try:
        return sorted(json.loads((out / "config.json").read_text()).get("extra", {}).get("trees", {}))
    except (OSError, ValueError, AttributeError):
        return []


def _lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


def _log(cfg: TrainConfig, rec: dict):
    if cfg.log:
        with open(cfg.log, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _fmt_eval(ev: dict) -> str:
    def row(v):
        return " ".join("-" if a is None else f"{a:.3f}" for a in v)
    return f"loss {ev['loss']:.4f} | top1 {row(ev['top1'])} | top5 {row(ev['top5'])}"


def train_heads(cfg: TrainConfig, target=None, tokenizer=None) -> dict:
    """Trains heads per `cfg`; `target` (a Transformer) overrides cfg.model (tests). Returns a summary.

    tokenizer: the target's (loaded with cfg.model; with a `target` given, optional): records without prompt text
    have their prompt_ids decoded for the check against evaluation questions."""
    from tqdm import tqdm

    from ..heads import lm_head_fingerprint, new_heads, save_heads
    from ..heads.checkpoint import _dtype

    cfg.check()
    # "~/heads" from Python, as a shell would expand it (the CLI expands its flags itself)
    cfg.out, cfg.log, cfg.cache_hidden = (user_path(p) for p in (cfg.out, cfg.log, cfg.cache_hidden))
    if isinstance(cfg.data, (str, Path)):
        cfg.data = [str(cfg.data)]
    out = Path(cfg.out)
    from .. import shipped_heads
    # `--init-from default --out <the shipped folder> --overwrite` replaced the package's own heads (what
    # `generate` loads by default) with a few steps' worth; tree-search --save refuses them the same way
    if out.expanduser().resolve().is_relative_to(shipped_heads.DATA.resolve()):
        raise InputError(f"--out {out} is inside the shipped heads ({shipped_heads.DATA}): train into a directory "
                         f"of your own (--init-from default starts from the shipped heads)")
    if out.exists() and not out.is_dir():       # mkdir's own error says only "File exists"
        raise InputError(f"--out {out} is a file; give a directory for the heads (config.json + model.safetensors)")
    if not cfg.fill_cache:      # a model's folder: --overwrite (which the refusal below suggests) replaced the model
        from ..heads.checkpoint import check_heads_folder
        check_heads_folder(out)
    existing = [f for f in (STATE_FILE, "model.safetensors") if (out / f).is_file()]
    if existing and not (cfg.resume or cfg.overwrite or cfg.fill_cache):
        raise InputError(f"{out} already holds {' and '.join(existing)}: pass --resume to continue that run, "
                         f"--overwrite to replace it, or another --out")
    out.mkdir(parents=True, exist_ok=True)      # now: a bad --out fails before hours of training, not at the save
    if cfg.log:
        Path(cfg.log).parent.mkdir(parents=True, exist_ok=True)     # once, not per logged step
    loaded_as = None        # the --model an --init-from mismatch names: only where `target` was loaded from it
    if target is None:
        from ..loading import load_model, parse_device, parse_dtype
        device = parse_device(cfg.device)
        dtype = parse_dtype(cfg.dtype, device)
        loaded = load_model(cfg.model, dtype=dtype, device=device, max_seq_len=cfg.max_seq_len)
        target, tokenizer, loaded_as = loaded.model, loaded.tokenizer, str(cfg.model)
        if Path(loaded_as).expanduser().exists():    # a path as typed means nothing from another folder: absolute
            loaded_as = str(Path(loaded_as).expanduser().resolve())
    target.eval().requires_grad_(False)
    dev = target.tok_embeddings.weight.device
    V = target.config.vocab_size
    max_len = min(cfg.max_seq_len, target.rope_len)
    fp = lm_head_fingerprint(target)

    data = load_shard(cfg.data, V, max_len, fingerprint=fp,
                      prompt_text=prompt_text_decoder(tokenizer) if tokenizer is not None else None)
    for why, n in data.skipped.items():
        print(f"train: skipped {n} record(s): {why}", file=sys.stderr)
    train_seqs, held_all = split_heldout(data.sequences, cfg.eval_frac)
    held = held_all[:cfg.eval_max_seqs]
    check_source_weights(cfg.source_weights, train_seqs)
    if cfg.source_weights:
        print(f"train: source mix per epoch (answer tokens x weight): {source_mix(train_seqs, cfg.source_weights)}",
              file=sys.stderr)
    per_epoch = len(epoch_batches(train_seqs, cfg.batch_tokens, cfg.seed, 0, cfg.source_weights))
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * per_epoch))
    warmup = cfg.warmup if cfg.warmup is not None else max(1, total // 20)
    if not cfg.fill_cache:
        check_warmup(cfg.warmup, total, "--steps" if cfg.steps else f"--epochs {cfg.epochs or 1} x {per_epoch} "
                     f"steps/epoch")
    if cfg.fill_cache:
        seqs = data.sequences
        if cfg.fill_planned:
            seqs = planned_sequences(BatchPlan(train_seqs, cfg.batch_tokens, cfg.seed, cfg.source_weights), total)
            seqs += held
            print(f"train: --fill-planned: {len(seqs)} of {len(data.sequences)} sequence(s) are read by steps "
                  f"[0, {total}) or held out", file=sys.stderr)
        return fill_hidden_cache(HiddenSource(target, cfg.cache_hidden, fp), seqs, cfg.batch_tokens, dev,
                                 cfg.progress)

    overrides = {}
    if cfg.stage_of_head:
        overrides["stage_of_head"] = list(cfg.stage_of_head)
    if cfg.draft_vocab:
        if cfg.draft_vocab > V:
            raise ConfigError(f"--draft-vocab {cfg.draft_vocab} exceeds the target's vocabulary ({V})")
        overrides["draft_vocab_size"] = cfg.draft_vocab
    for name in ("layers_per_stage", "aeb_layers", "sal_intermediate_size", "aeb_intermediate_size"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    torch.manual_seed(cfg.seed)
    try:
        heads = new_heads(cfg.kind, target, num_heads=cfg.num_heads, dtype=torch.float32, **overrides)
    except (RuntimeError, MemoryError) as e:
        # a size flag far too large (--sal-intermediate-size 99999999999) failed the allocation with torch's
        # "DefaultCPUAllocator: can't allocate memory" trace
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower() and "memory" not in str(e).lower():
            raise
        sizes = ", ".join(f"{_flag(n)} {getattr(cfg, n)}" for n in ("num_heads", "layers_per_stage", "aeb_layers",
                                                                     "sal_intermediate_size", "aeb_intermediate_size")
                          if getattr(cfg, n) is not None)
        raise ConfigError(f"the heads of these sizes ({sizes}) do not fit in memory ({str(e).splitlines()[0][:160]}); "
                          f"give smaller sizes (the defaults fit the model's width)") from None
    if cfg.draft_vocab:
        vocab, coverage = frequent_tokens(train_seqs, cfg.draft_vocab, V)
        heads.set_draft_vocab(vocab)
    if cfg.init == "identity":
        identity_init(heads, target)
    if cfg.init_from:
        from ..heads import load_heads
        from .warm_start import warm_start
        added = warm_start(heads, load_heads(cfg.init_from, target, dtype=torch.float32, target_name=loaded_as))
        print(f"train: started from the heads in {cfg.init_from}"
              + (f"; added pass-through layers {', '.join(added)}" if added else ""), file=sys.stderr)
    if cfg.draft_vocab:
        # a warm start keeps its source's draft vocabulary (its LM-head rows are what the heads learned against)
        what = f"the {cfg.draft_vocab} most frequent answer tokens"
        if not torch.equal(heads.draft_vocab.cpu(), vocab):
            what = f"the source heads {cfg.draft_vocab} tokens"
            coverage = answer_share(answer_token_counts(train_seqs, V), heads.draft_vocab.cpu())
        print(f"train: draft vocabulary = {what}, covering {100 * coverage:.2f}% of the training answers' tokens",
              file=sys.stderr)
    heads.train().requires_grad_(True)
    params = [p for p in heads.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    lr_at = _lr_lambda(warmup, total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    step, history = 0, []
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite", "stop_after", "progress", "log")}
    # the model a heads mismatch names later (checkpoint.trained_model): a target handed in was not loaded from
    # cfg.model, whose default would then name a model the heads were never trained for
    recipe["model"] = loaded_as
    data_digest, tokens_digest = shard_digest(data.sequences), shard_digest(data.sequences, tokens=True)
    if cfg.resume:
        sf = out / STATE_FILE
        if not sf.is_file():
            raise InputError(f"--resume: no trainer state in {out} ({STATE_FILE} missing)")
        st = read_trainer_state(sf)
        check_resume_recipe(sf, st, recipe, fp, data_digest, tokens_digest)
        heads.load_state_dict({k: v.to(dev) for k, v in st["heads"].items()})
        if cfg.draft_vocab:
            heads.set_draft_vocab(heads.draft_vocab.clone())    # drops the gathered LM-head rows of the old set
        decay_now = [g["weight_decay"] for g in opt.param_groups]
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, history = st["step"], st.get("history", [])
        # The saved groups carry the rate the saved schedule gave for the next step (0 once a run finished: its
        # cosine has decayed) and the saved weight decay; the scheduler recomputes the rate only after an update.
        # --steps/--epochs/--warmup (and --weight-decay, with a warning) may differ now, so the first resumed
        # update takes this run's values too; with none changed these equal what the saved groups hold.
        sched.last_epoch = step
        for g, base, wd in zip(opt.param_groups, sched.base_lrs, decay_now, strict=True):
            g["lr"], g["weight_decay"] = base * lr_at(step), wd
        sched._last_lr = [g["lr"] for g in opt.param_groups]     # get_last_lr() reports the rate the step uses
        torch.set_rng_state(st["torch_rng"])
        if step >= total:
            print(f"train: {sf} is at step {step} of {total}: nothing left to train (raise --steps to go on)",
                  file=sys.stderr)
        else:
            print(f"train: resumed from {sf} at step {step}/{total}", file=sys.stderr)
            fitted = _fitted_trees(out)
            if fitted:     # fitted to the heads as they are now: after more steps they would mislead --tree auto
                print(f"train: note: the trees fitted to these heads ({', '.join(fitted)}) are dropped from "
                      f"{out / 'config.json'} at the next save, as the heads change; run `amphista tree-search "
                      f"--save` again on the trained heads", file=sys.stderr)

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.train_dtype == "bf16")

    hs = HiddenSource(target, cfg.cache_hidden, fp)
    hs.check_can_compute(train_seqs + held)
    lossf = LossComputer(target, cfg.loss, cfg.lam, cfg.num_heads, cfg.chunk, autocast)

    if cfg.mse_weight > 0 and heads.config.per_head_lm_head:
        raise ConfigError("--mse-weight needs heads that share the target's LM head (per_head_lm_head=False)")
    gram = centered_gram(heads.output_weight()).to(dev) if cfg.mse_weight > 0 else None
    lam_w = torch.tensor([cfg.lam ** k for k in range(cfg.num_heads)], device=dev)

    def run_batch(seqs, sample_gen, backward):
        x, lengths, plen = pad_batch(seqs, dev)
        B, T = x.shape
        hidden = hs.get(seqs, x)
        nxt = torch.zeros_like(x)
        nxt[:, :-1] = x[:, 1:]
        valid = loss_rows(lengths, plen, T, cfg.num_heads)            # [B, T, K]
        rows = valid[..., 0].nonzero()                                 # [N, 2]
        if rows.shape[0] == 0:
            return None
        pick = None
        if sample_gen is not None and cfg.loss_positions and rows.shape[0] > cfg.loss_positions:
            perm = torch.randperm(rows.shape[0], generator=sample_gen)
            pick = perm[:cfg.loss_positions].sort().values.to(dev)
            if gram is not None and cfg.mse_positions and rows.shape[0] > cfg.mse_positions:
                # the MSE rows: a superset of the KL rows (the same permutation's first mse_positions), so the
                # per-row head features (AEB, ResBlocks) run on mse_positions rows instead of all of them
                keep = perm[:cfg.mse_positions].sort().values
                is_kl = torch.zeros(rows.shape[0], dtype=torch.bool)
                is_kl[pick.cpu()] = True
                rows, pick = rows[keep.to(dev)], is_kl[keep].nonzero().squeeze(1).to(dev)
        with autocast():
            if gram is None:
                if pick is not None:
                    rows = rows[pick]
                sel = head_features(heads, hidden, nxt, rows)              # [N, K, d]
                kl_rows, kl_sel = rows, sel
            else:
                sel = head_features(heads, hidden, nxt, rows)
                kl_rows, kl_sel = (rows, sel) if pick is None else (rows[pick], sel[pick])
        v_all = valid[rows[:, 0], rows[:, 1]]
        loss, g, stats = lossf(heads, kl_sel, hidden, x, kl_rows, valid[kl_rows[:, 0], kl_rows[:, 1]], backward)
        extra = torch.zeros((), device=dev)
        if gram is not None:
            ks = torch.arange(cfg.num_heads, device=dev)
            u = (rows[:, 1:2] + ks[None] + 1).clamp(max=T - 1)
            e = sel.float() - hidden[rows[:, :1], u]                      # [N, K, d]
            mse = ((e @ gram) * e).sum(-1) * v_all                       # [N, K]
            extra = cfg.mse_weight * (mse.sum(0) * lam_w / v_all.sum(0).clamp_min(1)).sum()
            stats["mse"] = (mse.sum(0) / v_all.sum(0).clamp_min(1)).detach()
            stats["mse_sum"] = mse.sum(0).detach()
        if backward:
            (extra + (kl_sel * g).sum()).backward() if gram is not None else kl_sel.backward(g)
        stats["tokens"] = int(lengths.sum())
        stats["positions"] = int(rows.shape[0])
        return loss + extra.detach(), stats

    @torch.no_grad()
    def evaluate() -> dict:
        heads.eval()
        agg = None
        bs = epoch_batches(held, cfg.batch_tokens, 0, 0)
        for bi in bs:
            r = run_batch([held[i] for i in bi], None, False)
            if r is None:
                continue
            st = r[1]
            agg = st if agg is None else {k: (agg[k] + st[k]) for k in st if k in SUMMED_STATS}
        heads.train()
        if agg is None:
            return {}
        # the training loss over every held-out position at once (per-head means, lambda^k-weighted): a mean of
        # per-batch losses weighed a batch of 3 positions as one of 3000, and moved with --batch-tokens
        n = agg["count"].clamp_min(1)
        loss = float((lossf.w.to(n.device) * agg["loss_sum"] / n).sum())
        if "mse_sum" in agg:
            loss += cfg.mse_weight * float((lam_w * agg["mse_sum"] / n).sum())
        c = agg["count"].tolist()

        def mean(v):     # None for a head no held-out position reaches (answers shorter than its lookahead)
            return [a / n if n else None for a, n in zip(v.tolist(), c)]
        return {"loss": loss, "nll": mean(agg["nll"]), "top1": mean(agg["top1"]),
                "top5": mean(agg["top5"]), "positions": int(c[0])}

    saved = [step]      # the step of the newest checkpoint in `out` (a fresh run's 0: none)

    @interrupts_held()      # a Ctrl-C never leaves a torn checkpoint: it lands once the files are written
    def checkpoint(reason: str):
        saved[0] = step
        out.mkdir(parents=True, exist_ok=True)
        heads.config.extra = {"training": {**recipe, "step": step, "total_steps": total,
                                           "train_sequences": len(train_seqs), "heldout_sequences": len(held),
                                           "train_tokens": sum(len(s.ids) for s in train_seqs),
                                           "last_eval": history[-1] if history else None}}
        save_heads(heads, out, dtype=_dtype(cfg.save_dtype))
        state = {"step": step, "heads": {k: v.detach().cpu().clone() for k, v in heads.state_dict().items()},
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                 "recipe": recipe, "fingerprint": fp, "history": history, "data_digest": data_digest,
                 "tokens_digest": tokens_digest}
        tmp = out / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, out / STATE_FILE)

    print(f"train: {cfg.kind} heads K={cfg.num_heads}, {len(train_seqs)} train / {len(held)} held-out sequences "
          f"({sum(len(s.ids) for s in train_seqs)} train tokens), {per_epoch} steps/epoch, {total} steps, "
          f"device {dev}", file=sys.stderr)
    if held and step == 0 and cfg.eval_every:
        ev = evaluate()
        history.append({"step": 0, **ev})
        _log(cfg, {"eval": True, "step": 0, **ev})
        print(f"train: eval step 0: {_fmt_eval(ev)}", file=sys.stderr)
    bar = tqdm(total=total, initial=step, unit="step", disable=not cfg.progress, file=sys.stderr,
               dynamic_ncols=True, desc=f"train {cfg.kind}")
    t0, toks, last_ev, stop, start = time.perf_counter(), 0, None, cfg.stop_after, step

    def _after_step(r, loss, gnorm, lr):
        """Progress, log, evaluation and checkpoint of the step just taken (lr: the rate its update used)."""
        nonlocal last_ev
        dt = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{toks / dt:.0f}")
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "elapsed_s": round(dt, 2)}
        if r is not None and "mse" in r[1]:
            rec["mse"] = [round(v, 4) for v in r[1]["mse"].tolist()]
        _log(cfg, rec)
        do_eval = held and (step == total or (cfg.eval_every and step % cfg.eval_every == 0))
        if do_eval:
            ev = evaluate()
            last_ev = ev
            history.append({"step": step, **ev})
            _log(cfg, {"eval": True, "step": step, **ev})
            bar.write(f"train: eval step {step}: {_fmt_eval(ev)}", file=sys.stderr)
        if do_eval or step == total or (cfg.save_every and step % cfg.save_every == 0) or step == stop:
            checkpoint("step")
    plan = BatchPlan(train_seqs, cfg.batch_tokens, cfg.seed, cfg.source_weights)
    try:
        while step < total:
            batch = plan.batch(step)
            gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
            opt.zero_grad(set_to_none=True)
            r = run_batch(batch, gen, True)
            with interrupts_held():      # the update and the step count change together or not at all
                if r is None:
                    loss, gnorm = float("nan"), 0.0
                else:
                    loss = float(r[0])
                    gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")))
                    if math.isfinite(gnorm):
                        opt.step()
                    else:
                        print(f"train: step {step}: non-finite gradient norm, update skipped", file=sys.stderr)
                    toks += r[1]["tokens"]
                # the rate this update used: after sched.step() the scheduler reports the next one (the last step's
                # record said 0)
                lr = opt.param_groups[0]["lr"]
                sched.step()
                step += 1
            _after_step(r, loss, gnorm, lr)
            if stop is not None and step >= stop:
                break
    except KeyboardInterrupt:
        bar.close()
        if step > saved[0]:
            checkpoint("interrupt")
            print(f"train: interrupted at step {step} of {total}: checkpoint saved in {out}; --resume continues "
                  f"from it", file=sys.stderr)
        else:
            print(f"train: interrupted at step {step} of {total}: "
                  + (f"{out} holds its checkpoint; --resume continues from it" if step else "nothing trained, "
                     "nothing saved"), file=sys.stderr)
        raise
    bar.close()
    wall = time.perf_counter() - t0
    if step > start:
        print(f"train: {step}/{total} steps in {wall:.0f} s; heads in {out} (hidden cache hits {hs.hits}, "
              f"misses {hs.misses})", file=sys.stderr)
    elif last_ev is None and history and history[-1]["step"] == step:
        last_ev = {k: v for k, v in history[-1].items() if k != "step"}    # the finished run's final evaluation
    return {"steps": step, "total_steps": total, "start_step": start, "wall_s": wall, "final_eval": last_ev or {},
            "history": history, "heads": heads, "train_sequences": len(train_seqs), "heldout_sequences": len(held),
            "heldout_total": len(held_all), "skipped": dict(data.skipped),
            "heldout_none": None if held_all else no_heldout_reason(data.sequences, cfg.eval_frac)}
