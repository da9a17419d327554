"""`HeadsConfig`: one description for Amphista and Medusa heads; it is the checkpoint's config.json.

Every choice the Amphista abstract leaves open (marked "(ours)" in AMPHISTA_DESIGN.md) is a field here, so a
checkpoint records how it was built and a choice changes without code changes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig
from ..errors import ConfigError
from ..values import is_int, is_real

KINDS = ("amphista", "medusa")
FUSIONS = ("concat", "none")
DTYPES = ("float32", "float16", "bfloat16")


VERSION = 1                                    # the newest config version this code reads


def _check_extra(cfg: "HeadsConfig", bad):
    """The parts of the free-form `extra` that decoding reads: the fitted trees (`trees`: name -> rank paths, as
    `tree-search --save` writes) and the taus recorded for trees (`tree_search*`, read by speculation_check)."""
    from ..tree import TOPK, TREES, get_tree_choices

    trees = cfg.extra.get("trees")
    if trees is not None:
        if not isinstance(trees, dict):
            bad(f"extra.trees must map tree names to lists of rank paths, got {type(trees).__name__}")
        for name, paths in trees.items():
            if not isinstance(name, str) or not name.strip() or name in TREES \
                    or name.startswith(("dynamic-", "chain-", "[")) or name.endswith(".json"):
                bad(f"extra.trees: fitted tree name {name!r} would shadow a built-in tree, a dynamic tree or a "
                    f"tree file; rename it (e.g. tuned-N)")
            if not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
                bad(f"extra.trees[{name!r}] must be a list of rank paths (lists of integers), got {paths!r:.80}")
            try:
                checked = get_tree_choices(paths)
            except ConfigError as e:
                bad(f"extra.trees[{name!r}]: {e}")
            if not checked:
                bad(f"extra.trees[{name!r}] has no paths")
            depth, rank = max(len(p) for p in checked), max(max(p) for p in checked)
            if depth > cfg.num_heads:
                bad(f"extra.trees[{name!r}] is {depth} deep but the heads draft only {cfg.num_heads} tokens")
            if rank >= TOPK:
                bad(f"extra.trees[{name!r}] uses top-k rank {rank}; ranks must be below {TOPK}")
    for key, record in cfg.extra.items():
        if not key.startswith("tree_search") or record is None:
            continue
        if not isinstance(record, dict):
            bad(f"extra.{key} must be an object (a tree-search record), got {type(record).__name__}")
        for field_ in ("decoding_tau", "expected_tau"):
            taus = record.get(field_)
            if taus is None:
                continue
            # a tau is tokens per target forward: at least 1, and finite (speculation_check divides by it)
            if not isinstance(taus, dict) or not all(is_real(v) and v >= 1 for v in taus.values()):
                bad(f"extra.{key}.{field_} must map tree names to finite numbers >= 1, got {taus!r:.80}")


def llama_ffn_size(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width, 8d/3 rounded up (576 -> 1536 as in SmolLM2-135M, 4096 -> 11008 as in Llama-2-7B)."""
    return multiple_of * -(-(8 * dim // 3) // multiple_of)


@dataclass
class HeadsConfig:
    dim: int                                   # target hidden size d
    vocab_size: int                            # target vocabulary V
    kind: str = "amphista"                     # "amphista" | "medusa"
    num_heads: int = 4                         # K: head k (1-based) guesses x_{t+1+k}
    # Target attention shape and RoPE, copied from its ModelConfig: the SAL layers are Llama decoder layers
    # that attend at the target's positions.
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    # (ours) fusion: "concat" = EAGLE-style u_t = W_fuse [h_t ; E(x_{t+1})]; "none" = u_t = h_t.
    fusion: str = "concat"
    n_stages: int = 2
    layers_per_stage: int = 1
    # (ours) the SAL stage each head reads; default: nearer half -> stage 0, farther half -> the last stage.
    stage_of_head: list[int] | None = None
    sal_intermediate_size: int = 0             # 0 -> llama_ffn_size(dim)
    aeb_layers: int = 1
    aeb_heads: int = 0                         # 0 -> dim // head_dim (the target's head width)
    aeb_intermediate_size: int = 0             # 0 -> llama_ffn_size(dim)
    per_head_lm_head: bool = False             # True: each head owns a trainable [V, d] copy (Medusa-style)
    # (ours) draft vocabulary: heads score only these many token ids (the most frequent in the training data,
    # stored as the `draft_vocab` tensor), FR-Spec style; 0 = the full vocabulary. Verification still uses
    # the target's full LM head, so output is unchanged; a token outside the set just cannot be drafted.
    draft_vocab_size: int = 0
    medusa_layers: int = 1                     # ResBlocks per Medusa head
    resblock_bias: bool = True                 # nn.Linear(d, d) with bias, as public Medusa heads
    target_fingerprint: str = ""               # checkpoint.lm_head_fingerprint of the target
    dtype: str = "bfloat16"                    # dtype of saved tensors
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)   # free-form notes (training recipe, data, ...)

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"heads config: {msg}")

        if self.kind not in KINDS:
            bad(f"kind must be one of {KINDS}, got {self.kind!r}")
        for key in ("dim", "vocab_size", "num_heads", "n_stages", "layers_per_stage", "aeb_layers", "version"):
            if not is_int(getattr(self, key)) or getattr(self, key) <= 0:      # True is no head count
                bad(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.version > VERSION:
            bad(f"version {self.version} is newer than this engine reads ({VERSION}); upgrade amphista-engine")
        for key in ("n_heads", "n_kv_heads", "head_dim", "sal_intermediate_size", "aeb_heads", "aeb_intermediate_size",
                    "max_position_embeddings", "medusa_layers"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                bad(f"{key} must be an integer >= 0, got {getattr(self, key)!r}")
        for key in ("per_head_lm_head", "resblock_bias"):      # "no" is truthy: not a silent yes
            if not isinstance(getattr(self, key), bool):
                bad(f"{key} must be true or false, got {getattr(self, key)!r}")
        for key in ("norm_eps", "rope_theta"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not is_real(v) or not v > 0:
                bad(f"{key} must be a positive number, got {v!r}")
        if not isinstance(self.target_fingerprint, str):
            bad(f"target_fingerprint must be a string, got {self.target_fingerprint!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            bad(f"rope_scaling must be an object or null, got {self.rope_scaling!r}")
        if not isinstance(self.extra, dict):
            bad(f"extra must be an object, got {type(self.extra).__name__}")
        if not is_int(self.draft_vocab_size) or not 0 <= self.draft_vocab_size <= self.vocab_size:
            bad(f"draft_vocab_size must be in [0, vocab_size={self.vocab_size}], got {self.draft_vocab_size!r}")
        if self.fusion not in FUSIONS:
            bad(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.dtype not in DTYPES:
            bad(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        K, S = self.num_heads, self.n_stages
        if self.stage_of_head is None:
            self.stage_of_head = [0 if k < K // 2 else S - 1 for k in range(K)]
        soh = self.stage_of_head
        if not isinstance(soh, (list, tuple)) or not all(is_int(s) for s in soh) \
                or len(soh) != K or not all(0 <= s < S for s in soh):
            bad(f"stage_of_head must list {K} stage indices in [0, {S}), got {self.stage_of_head}")
        self.sal_intermediate_size = self.sal_intermediate_size or llama_ffn_size(self.dim)
        self.aeb_intermediate_size = self.aeb_intermediate_size or llama_ffn_size(self.dim)
        if self.kind == "amphista":
            if self.n_heads <= 0 or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
                bad(f"n_heads ({self.n_heads}) must be a positive multiple of n_kv_heads ({self.n_kv_heads})")
            self.head_dim = self.head_dim or self.dim // self.n_heads
            if self.head_dim <= 0 or self.head_dim % 2:
                bad(f"head_dim must be positive and even for RoPE, got {self.head_dim}")
            if not self.aeb_heads:
                self.aeb_heads = self.dim // self.head_dim if self.dim % self.head_dim == 0 else 1
            if self.aeb_heads <= 0 or self.dim % self.aeb_heads:
                bad(f"aeb_heads ({self.aeb_heads}) must divide dim ({self.dim})")
        self.stage_of_head = list(soh)
        _check_extra(self, bad)

    @classmethod
    def for_target(cls, target_cfg: ModelConfig, kind: str = "amphista", **overrides) -> "HeadsConfig":
        c = target_cfg
        base = dict(dim=c.dim, vocab_size=c.vocab_size, kind=kind, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                    head_dim=c.head_dim, norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                    rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None,
                    max_position_embeddings=c.max_position_embeddings)
        return cls(**{**base, **overrides})

    def sal_model_config(self) -> ModelConfig:
        """The Llama config of the SAL decoder layers (vocab is unused: they take vectors, not tokens)."""
        rs = self.rope_scaling
        if rs and rs.get("rope_type", rs.get("type")) == "longrope":
            # LongRoPE picks its factors by the table's length (model.rope_inv_freq): the SAL's table is as long as
            # a training batch but as the cache when decoding, so a position rotated by the short factors in training
            # and by the long ones in decoding (a cache past original_max_position_embeddings). Plain RoPE rotates
            # a position the same whatever the table; its factor lists would also not fit whole-head rotation
            # where the target rotates part of each head (Phi-4-mini: building the heads failed)
            rs = None
        return ModelConfig(vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_stages * self.layers_per_stage,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                           intermediate_size=self.sal_intermediate_size, head_dim=self.head_dim,
                           norm_eps=self.norm_eps, rope_theta=self.rope_theta, rope_scaling=rs,
                           max_position_embeddings=self.max_position_embeddings, name="amphista-sal")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadsConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"heads config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"heads config: unknown field(s) {', '.join(unknown)}")
        missing = [k for k in ("dim", "vocab_size") if k not in d]
        if missing:
            raise ConfigError(f"heads config lacks required field(s) {', '.join(missing)}")
        try:
            return cls(**d)
        except TypeError as e:   # e.g. a list where an int belongs
            raise ConfigError(f"heads config: {e}") from None
