"""`amphista train --init-from DIR`: start from trained heads instead of the identity init, optionally larger.

Training compute is what the shipped heads lack (benchmarks/results/TRAINING.md), so a new recipe should not
have to pay for the steps the old heads already took. The new heads may have more Staged Adaptation Layers per
stage (`--layers-per-stage`) or more Auto-embedding layers (`--aeb-layers`) than the source: each source
layer keeps its place at the front of its stage (or of the AEB), and every added layer starts with zero
output projections (attention `wo` and MLP `w2`), i.e. as an exact pass-through of the residual stream. The
grown heads therefore draft exactly what the source heads drafted, and training only adds to them.

Wider MLPs (`--sal-intermediate-size`, `--aeb-intermediate-size`) grow the same way: the source's SwiGLU units
keep their rows, and the added units get the fresh init on their input side (gate and up rows of w13: nonzero,
so they receive gradient) and zero output columns (w2), so they add nothing until trained.
"""
from __future__ import annotations

import re

import torch

from ..errors import ConfigError

# Config fields the two heads must share for the weights to mean the same thing.
_SAME = ("kind", "dim", "vocab_size", "num_heads", "n_heads", "n_kv_heads", "head_dim", "n_stages", "stage_of_head",
         "fusion", "aeb_heads", "per_head_lm_head",
         "draft_vocab_size", "medusa_layers", "resblock_bias", "target_fingerprint")
_LAYER = re.compile(r"^(sal|aeb)\.(\d+)\.(.+)$")
_GROWS = ("layers_per_stage", "aeb_layers", "sal_intermediate_size", "aeb_intermediate_size")
# The `amphista train` flag that sets each config field: a mismatch says what to pass, not only the field's name.
_FLAGS = {"kind": "--kind", "num_heads": "--num-heads", "stage_of_head": "--stage-of-head",
          "draft_vocab_size": "--draft-vocab", **{k: "--" + k.replace("_", "-") for k in _GROWS}}
# Fields the target fixes: the source heads were trained for another model.
_TARGET = ("dim", "vocab_size", "n_heads", "n_kv_heads", "head_dim", "target_fingerprint")


def _hint(key: str, value) -> str:
    """What makes the new heads match the source's `value` of config field `key`."""
    if key in _FLAGS:
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        return f"pass {_FLAGS[key]} {text}"
    if key in _TARGET:
        return "they were trained for another target: pass the --model they were trained for"
    if key == "n_stages":
        return "set by their --stage-of-head"
    return "no train flag sets it: start without --init-from"


def _mismatch(key: str, source, requested) -> str:
    return f"{key}: {source!r} vs {requested!r} ({_hint(key, source)})"


def layer_map(src_cfg, dst_cfg) -> dict[tuple[str, int], int]:
    """(group, source layer index) -> destination index: a SAL layer keeps its stage and its rank in it."""
    out = {("aeb", i): i for i in range(src_cfg.aeb_layers)}
    lo, ln = src_cfg.layers_per_stage, dst_cfg.layers_per_stage
    for s in range(src_cfg.n_stages):
        for i in range(lo):
            out[("sal", s * lo + i)] = s * ln + i
    return out


def warm_start(heads, source) -> list[str]:
    """Copies `source`'s weights into `heads` (same target, same or deeper layout). Layers the source lacks
    become pass-throughs. Returns the names of those added layers (e.g. ['sal.1', 'aeb.1'])."""
    a, b = source.config, heads.config
    # Source heads bound to the very target the new ones are (load_heads took them for it: maybe as a converted or
    # quantized copy of the model they were trained with, whose fingerprint differs) start the new heads for it.
    same_target = source._bound is not None and heads._bound is not None and source._bound[1] is heads._bound[1]
    # Other kinds' heads share no weights, and the fields one kind derives (aeb_heads) differ with it: naming them
    # too told a user training --kind amphista from Medusa heads that "no train flag sets" aeb_heads
    keys = ("kind",) if a.kind != b.kind else _SAME
    diff = [_mismatch(k, getattr(a, k), getattr(b, k)) for k in keys if getattr(a, k) != getattr(b, k)
            and not (k == "target_fingerprint" and same_target)]
    if diff:
        raise ConfigError("--init-from: the source heads differ from the requested ones (source vs requested) in "
                          + "; ".join(diff))
    shrunk = [f"{k} {getattr(a, k)} -> {getattr(b, k)} (pass {_FLAGS[k]} {getattr(a, k)} or more)" for k in _GROWS
              if getattr(b, k) < getattr(a, k)]
    if b.kind == "amphista" and shrunk:
        raise ConfigError("--init-from: heads can only grow, not shrink (" + "; ".join(shrunk) + ")")
    mapping = layer_map(a, b) if b.kind == "amphista" else {}
    dst = heads.state_dict()
    with torch.no_grad():
        for name, t in source.state_dict().items():
            m = _LAYER.match(name)
            key = f"{m[1]}.{mapping[(m[1], int(m[2]))]}.{m[3]}" if m else name
            d, t = dst[key], t.to(dst[key].dtype)
            if key.endswith("feed_forward.w13.weight") and t.shape != d.shape:
                # a wider MLP: w13 is gate | up fused, so the source's gate and up rows go to the front of each half
                n, m = t.shape[0] // 2, d.shape[0] // 2
                d[:n].copy_(t[:n])
                d[m:m + n].copy_(t[n:])
            else:   # w2 of a wider MLP: the source's units are its leading columns
                d[tuple(slice(0, n) for n in t.shape)].copy_(t)
        # every destination layer no source layer maps to starts as a pass-through
        kept = {(g, j) for (g, _), j in mapping.items()}
        added = sorted(f"{g}.{i}" for g in ("sal", "aeb") for i in range(len(getattr(heads, g, ())))
                       if (g, i) not in kept)
        if b.kind == "amphista":
            for group, width in (("sal", a.sal_intermediate_size), ("aeb", a.aeb_intermediate_size)):
                for layer in getattr(heads, group):
                    layer.feed_forward.w2.weight[:, width:] = 0
        for name in added:
            group, i = name.split(".")
            layer = getattr(heads, group)[int(i)]
            wo = layer.attention.wo if hasattr(layer, "attention") else layer.wo
            wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
    if b.draft_vocab_size:
        heads.set_draft_vocab(source.draft_vocab.clone())     # re-gathers the LM-head rows of the copied set
    return added
