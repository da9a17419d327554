"""The frozen target's final-norm hidden states that `amphista train` feeds the heads: computed per batch or read
from a disk cache (`--cache-hidden`) that one forward over the data fills once.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path

import torch

from ..errors import ConfigError, InputError
from .data import Sequence


_MODEL_FILES = ("config.json", "*.safetensors", "*.gguf")


def check_cache_dir(path, out=None, flag: str = "--cache-hidden") -> None:
    """Refuses a cache folder that is a model's or a heads folder (config.json, *.safetensors or *.gguf in it) or
    the heads' --out: the cache's meta.json and one .pt per sequence were written among the weights, and --out's
    heads among the cache. A folder that does not exist yet, is empty, or is a cache (meta.json, *.pt) is taken."""
    if not path:
        return
    p = Path(path).expanduser()
    if out and _same_folder(p, Path(out).expanduser()):
        raise InputError(f"{flag} {path} is the --out folder of the heads: the cached hidden states (one file per "
                         f"sequence) would be written among the heads; give the cache a folder of its own, e.g. "
                         f"{p.parent / (p.name + '-hidden')}")
    if not p.is_dir():
        return
    found = next((f.name for pattern in _MODEL_FILES for f in sorted(p.glob(pattern))), None)
    if found is not None:
        raise InputError(f"{flag} {path} holds {found}: a model or heads folder, and the cached hidden states (one "
                         f"file per sequence) would be written among its files; give the cache a folder of its own "
                         f"(a new one, or one that an earlier --cache-hidden run filled)")


def _same_folder(a: Path, b: Path) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):     # both may not exist yet (a fresh run)
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def fill_hidden_cache(hs: "HiddenSource", seqs: list[Sequence], batch_tokens: int, device, progress=True) -> dict:
    """One target forward over every sequence (train and held-out) into the disk cache, batched by length so
    little is padding; runs of both kinds (even in parallel) then read the states instead of recomputing them."""
    from tqdm import tqdm
    total = len(seqs)
    hs.check_can_compute(seqs)
    if hs.dir:       # entries already on disk are not read back: a refill after new data only computes the new
        todo = [s for s in seqs if not hs.has(s)]
        hs.hits += len(seqs) - len(todo)
        seqs = todo
    seqs = sorted(seqs, key=lambda s: len(s.ids))
    batches, cur = [], []
    for s in seqs:
        if cur and len(s.ids) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(s)
    batches += [cur] if cur else []
    with tqdm(total=sum(len(s.ids) for s in seqs), unit="tok", disable=not progress, file=sys.stderr,
              dynamic_ncols=True, desc="hidden cache") as bar:
        for batch in batches:
            hs.get(batch, pad_batch(batch, device)[0])
            bar.update(sum(len(s.ids) for s in batch))
    print(f"train: hidden cache {hs.dir}: {hs.hits} sequence(s) already there, {hs.misses} computed",
          file=sys.stderr)
    return {"sequences": total, "cached_before": hs.hits, "computed": hs.misses}


def pad_batch(seqs: list[Sequence], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(s.ids) for s in seqs)
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        x[b, :len(s.ids)] = torch.tensor(s.ids)
    lengths = torch.tensor([len(s.ids) for s in seqs])
    plen = torch.tensor([s.prompt_len for s in seqs])
    return x.to(device), lengths.to(device), plen.to(device)


_SKETCH_VALUES = 8      # per weight tensor


def weights_sketch(target) -> list[float]:
    """A few evenly spaced values of each of the target's weights (by name): what tells apart two models of one
    LM head (which the cache's fingerprint hashes), compared within a tolerance so that fp32, bf16 and fp16 loads
    of one checkpoint agree."""
    out = []
    for _, p in sorted(target.named_parameters()):
        flat = p.detach().reshape(-1)
        if not flat.is_floating_point() or not flat.numel():
            continue
        k = min(flat.numel(), _SKETCH_VALUES)
        idx = torch.arange(k) * (flat.numel() - 1) // max(1, k - 1)     # integers: a float linspace overran 2^24
        out += flat[idx.to(flat.device)].float().cpu().tolist()
    return out


def same_weights(a, b) -> bool:
    """Sketches of one model's weights: equal up to a 16-bit rounding (fp16 subnormals included)."""
    return (isinstance(a, list) and len(a) == len(b)
            and all(isinstance(x, (int, float)) and abs(x - y) <= 2 ** -7 * max(abs(x), abs(y)) + 1e-6
                    for x, y in zip(a, b)))


_DTYPE_FLAG = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class HiddenSource:
    """Final-norm target hidden states per sequence: computed by the frozen target or read from a disk cache.

    With a cache the states are stored as bf16 and always used as stored (also on the first use), so a run's
    numbers do not depend on whether an entry was already cached."""

    def __init__(self, target, cache_dir: str | None, fingerprint: str):
        self.target, self.dir = target, Path(cache_dir) if cache_dir else None
        self.hits = self.misses = 0
        self.unreadable = 0     # cache entries that could not be read back (recomputed and rewritten)
        if self.dir:
            if self.dir.exists() and not self.dir.is_dir():     # mkdir's own error said only "File exists"
                raise InputError(f"--cache-hidden {self.dir} is a file; give a directory for the cached hidden "
                                 f"states (created if missing)")
            check_cache_dir(self.dir)        # before mkdir and meta.json: a model's folder keeps only its files
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "meta.json"
            info = {"fingerprint": fingerprint, "dtype": "bfloat16", "format": 1}
            sketch = weights_sketch(target)
            if meta.exists():
                try:
                    old = json.loads(meta.read_text())
                except (ValueError, OSError) as e:
                    old = None
                    why = f"{type(e).__name__}: {e}"
                else:
                    why = f"it holds {type(old).__name__}"
                if not isinstance(old, dict):
                    # the entries' target and dtype are unknown: reading them could train on another model's states
                    raise ConfigError(f"hidden-state cache {self.dir}: {meta} is not a cache record that `train` "
                                      f"wrote ({why:.160}); use another --cache-hidden directory")
                # caches written before the key existed were all computed by an fp32 target
                self.computed_in = old.pop("computed_in", "float32")
                theirs = old.pop("weights", None)       # absent in caches written before 2026-12-07: unchecked
                if old != info:
                    raise ConfigError(f"hidden-state cache {self.dir} was built for another target or format "
                                      f"({old}); use another --cache-hidden directory")
                if theirs is not None and not same_weights(theirs, sketch):
                    # the fingerprint is the LM head's alone: a fine-tune that kept its embeddings (a merged
                    # LoRA) has the same one, and its run read the other model's hidden states
                    raise ConfigError(f"hidden-state cache {self.dir} was built by another model with this one's LM "
                                      f"head (fingerprint {fingerprint}; their transformer weights differ): its "
                                      f"states are not this --model's; use another --cache-hidden directory")
            else:
                meta.write_text(json.dumps({**info, "computed_in": self.own_dtype, "weights": sketch}))
                self.computed_in = self.own_dtype

    @property
    def own_dtype(self) -> str:
        return str(self.target.tok_embeddings.weight.dtype).removeprefix("torch.")

    def check_can_compute(self, seqs: list[Sequence]) -> None:
        """Refuses, before any work, to add entries computed in another dtype than the cache's: a bf16 target's
        states differ from an fp32 target's by ~2% (argmax flips at ~1% of positions), and one cache must hold
        one kind. A full cache is read by a target of any dtype: states are used as stored."""
        if not self.dir or self.computed_in == self.own_dtype:
            return
        missing = sum(not self.has(s) for s in seqs)
        if missing:
            raise ConfigError(f"hidden-state cache {self.dir} was filled by a {self.computed_in} target, this run's "
                              f"target is {self.own_dtype}, and {missing} of {len(seqs)} sequence(s) are not in it: "
                              f"complete it with `train --fill-cache --dtype {_DTYPE_FLAG[self.computed_in]}` "
                              f"first, or use another --cache-hidden directory")

    def has(self, s: Sequence) -> bool:
        return self._file(s).exists()

    def _file(self, s: Sequence) -> Path:
        return self.dir / f"{hashlib.sha1((s.id + '|' + ','.join(map(str, s.ids))).encode()).hexdigest()[:24]}.pt"

    @torch.no_grad()
    def get(self, seqs: list[Sequence], x: torch.Tensor) -> torch.Tensor:
        """[B, T, d] fp32 (zeros past each sequence's end)."""
        B, T = x.shape
        d = self.target.config.dim
        dev = x.device
        out = torch.zeros(B, T, d, device=dev)
        missing = list(range(B))
        if self.dir:
            missing = []
            for b, s in enumerate(seqs):
                f = self._file(s)
                try:
                    h = torch.load(f, map_location=dev, weights_only=True)
                    out[b, :len(s.ids)] = h.float()
                    self.hits += 1
                except FileNotFoundError:
                    missing.append(b)
                except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, AttributeError, TypeError):
                    # a torn or foreign entry (a copied cache cut short, a disk error): recomputed and rewritten,
                    # as a missing one, instead of failing the run deep in torch.load
                    if not self.unreadable:
                        print(f"train: warning: unreadable hidden-state cache entry {f}: recomputed (and any "
                              f"other such entry)", file=sys.stderr)
                    self.unreadable += 1
                    missing.append(b)
        if missing:
            self.check_can_compute([seqs[b] for b in missing])      # callers check up front; this is the backstop
            self.misses += len(missing)
            xm = x[missing]
            Tm = max(len(seqs[b].ids) for b in missing)
            xm = xm[:, :Tm]
            pos = torch.arange(Tm, device=dev)[None].expand(len(missing), -1)
            _, h = self.target(xm, pos, return_hidden=True, logits_at=torch.zeros(len(missing), 1, dtype=torch.long,
                                                                                  device=dev))
            for j, b in enumerate(missing):
                n = len(seqs[b].ids)
                hb = h[j, :n]
                if self.dir:
                    hb = hb.to(torch.bfloat16)
                    tmp = self._file(seqs[b]).with_suffix(f".tmp{os.getpid()}")
                    torch.save(hb.cpu().clone(), tmp)
                    os.replace(tmp, self._file(seqs[b]))
                out[b, :n] = hb.float()
        return out
