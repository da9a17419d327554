"""The Llama-family architecture description, read from a Hugging Face config.json or GGUF metadata."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelLoadError

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3", "dynamic")


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    name: str = "llama"

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "head_dim"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model config: {key} must be positive, got {getattr(self, key)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config: n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if kind not in SUPPORTED_ROPE_SCALING:
            raise ConfigError(f"model config: rope_scaling type {kind!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_SCALING)})")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") not in ("llama", "mistral") or archs[0] not in SUPPORTED_ARCHS:
            raise ConfigError(f"unsupported architecture {archs[0]!r} (model_type {cfg.get('model_type')!r}); "
                              f"amphista-engine runs Llama-family models: {', '.join(SUPPORTED_ARCHS)}")
        try:
            return cls(
                vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                intermediate_size=cfg["intermediate_size"], head_dim=cfg.get("head_dim") or 0,
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=(cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)),
                rope_scaling=_hf_rope_scaling(cfg),
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id") or [],
                name=cfg.get("_name_or_path") or archs[0],
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"config file not found: {path}")
        try:
            return cls.from_hf(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _hf_rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    # transformers 5 moved rope settings into `rope_parameters`; older configs use `rope_scaling`.
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    rs = dict(rs)
    rs.pop("rope_theta", None)
    kind = rs.get("rope_type", rs.get("type", "default"))
    return None if kind == "default" else rs
