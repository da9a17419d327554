"""`amphista train --init-from DIR`: start from trained heads instead of the identity init, optionally deeper.

Training compute is what the shipped heads lack (benchmarks/results/TRAINING.md), so a new recipe should not
have to pay for the steps the old heads already took. The new heads may have more Staged Adaptation Layers per
stage (`--layers-per-stage`) or more Auto-embedding layers (`--aeb-layers`) than the source: each source
layer keeps its place at the front of its stage (or of the AEB), and every added layer starts with zero
output projections (attention `wo` and MLP `w2`), i.e. as an exact pass-through of the residual stream. The
grown heads therefore draft exactly what the source heads drafted, and training only adds to them.
"""
from __future__ import annotations

import re

import torch

from ..errors import ConfigError

# Config fields the two heads must share for the weights to mean the same thing.
_SAME = ("kind", "dim", "vocab_size", "num_heads", "n_heads", "n_kv_heads", "head_dim", "n_stages", "stage_of_head",
         "fusion", "sal_intermediate_size", "aeb_heads", "aeb_intermediate_size", "per_head_lm_head",
         "draft_vocab_size", "medusa_layers", "resblock_bias", "target_fingerprint")
_LAYER = re.compile(r"^(sal|aeb)\.(\d+)\.(.+)$")


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
    diff = [f"{k}: {getattr(a, k)!r} vs {getattr(b, k)!r}" for k in _SAME if getattr(a, k) != getattr(b, k)]
    if diff:
        raise ConfigError("--init-from: the source heads differ from the requested ones in " + "; ".join(diff))
    if b.kind == "amphista" and (b.layers_per_stage < a.layers_per_stage or b.aeb_layers < a.aeb_layers):
        raise ConfigError(f"--init-from: heads can only grow (source: {a.layers_per_stage} SAL layer(s) per stage, "
                          f"{a.aeb_layers} AEB layer(s); requested {b.layers_per_stage}, {b.aeb_layers})")
    mapping = layer_map(a, b) if b.kind == "amphista" else {}
    dst = heads.state_dict()
    with torch.no_grad():
        for name, t in source.state_dict().items():
            m = _LAYER.match(name)
            key = f"{m[1]}.{mapping[(m[1], int(m[2]))]}.{m[3]}" if m else name
            dst[key].copy_(t.to(dst[key].dtype))
        # every destination layer no source layer maps to starts as a pass-through
        kept = {(g, j) for (g, _), j in mapping.items()}
        added = sorted(f"{g}.{i}" for g in ("sal", "aeb") for i in range(len(getattr(heads, g, ())))
                       if (g, i) not in kept)
        for name in added:
            group, i = name.split(".")
            layer = getattr(heads, group)[int(i)]
            wo = layer.attention.wo if hasattr(layer, "attention") else layer.wo
            wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
    if b.draft_vocab_size:
        heads.set_draft_vocab(source.draft_vocab.clone())     # re-gathers the LM-head rows of the copied set
    return added
