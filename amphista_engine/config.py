"""The Llama-family architecture description (Llama, Mistral, Qwen2, Qwen3, SmolLM3, Phi-3), read from a Hugging Face
config.json or GGUF metadata."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelLoadError
from .values import is_integral, is_real

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                   "SmolLM3ForCausalLM", "Phi3ForCausalLM")
_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3")
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")


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
    # Mistral v0.1 attends over the last `sliding_window` positions only; the model here attends over all of
    # them, which is the same math up to that many positions, so the engine caps its cache there.
    sliding_window: int | None = None
    # The Llama layer's two variations that Qwen brought: biases on the q/k/v projections (Qwen2; Llama's and
    # Qwen3's attention_bias also on o), and an RMSNorm over each head of q and k before RoPE (Qwen3).
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    # SmolLM3: layers that attend without RoPE (NoPE; every 4th), by index
    nope_layers: tuple[int, ...] = ()
    # Phi-3: the checkpoint stores q/k/v as one qkv_proj and gate/up as one gate_up_proj (the model's own fused
    # layout, wqkv and w13), a Llama layer otherwise
    fused_checkpoint: bool = False

    def __post_init__(self):
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "head_dim"):
            value = getattr(self, key)
            if key == "head_dim" and value in (0, None):
                continue
            if not is_integral(value) or value <= 0:
                raise ConfigError(f"model config: {key} must be a positive integer, got {value!r}")
            setattr(self, key, int(value))
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        for key in ("norm_eps", "rope_theta"):
            if not is_real(getattr(self, key)) or not getattr(self, key) > 0:
                raise ConfigError(f"model config: {key} must be a positive number, got {getattr(self, key)!r}")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config: n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        _check_rope_scaling(self.rope_scaling)
        rs = self.rope_scaling or {}
        if rs.get("rope_type", rs.get("type")) == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(rs[key]) != self.head_dim // 2:
                    raise ConfigError(f"model config: rope_scaling {key} has {len(rs[key])} entries; head_dim "
                                      f"{self.head_dim} rotates {self.head_dim // 2} frequencies")
        self.nope_layers = tuple(self.nope_layers or ())
        if not all(is_integral(i) and 0 <= i < self.n_layers for i in self.nope_layers):
            raise ConfigError(f"model config: nope_layers must be layer indices below {self.n_layers}, "
                              f"got {list(self.nope_layers)}")
        if self.sliding_window is not None and (not is_integral(self.sliding_window) or self.sliding_window <= 0):
            raise ConfigError(f"model config: sliding_window must be a positive integer or null, "
                              f"got {self.sliding_window!r}")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ConfigError(f"a model config must be a JSON object, got a {type(cfg).__name__}")
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        model_type = cfg.get("model_type", "llama")
        if model_type not in _MODEL_TYPES or archs[0] not in SUPPORTED_ARCHS:
            raise ConfigError(f"unsupported architecture {archs[0]!r} (model_type {cfg.get('model_type')!r}); "
                              f"amphista-engine runs Llama-family models: {', '.join(SUPPORTED_ARCHS)}")
        _check_hf_options(cfg)
        # transformers' Qwen2 layers always carry q/k/v biases (no config key) and no o bias; attention_bias
        # puts them on all four projections in Llama, Mistral and Qwen3.
        attention_bias = bool(cfg.get("attention_bias", False))
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
                sliding_window=_hf_sliding_window(cfg, model_type),
                qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias, qk_norm=model_type == "qwen3",
                nope_layers=_hf_nope_layers(cfg) if model_type == "smollm3" else (),
                fused_checkpoint=model_type == "phi3",
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"config file not found: {path}")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:    # ValueError: bad JSON or bad UTF-8
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf(cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _hf_nope_layers(cfg: dict[str, Any]) -> tuple[int, ...]:
    """SmolLM3's layers without RoPE: `no_rope_layers` lists 1 (RoPE) or 0 (none) per layer; without it, every
    `no_rope_layer_interval`-th layer (4) has none, as transformers' SmolLM3Config fills the list."""
    flags = cfg.get("no_rope_layers")
    n = cfg.get("num_hidden_layers", 0)
    if flags is None:
        interval = cfg.get("no_rope_layer_interval", 4)
        if not is_integral(interval) or interval < 1:
            raise ConfigError(f"no_rope_layer_interval must be a positive integer, got {interval!r}")
        flags = [int((i + 1) % interval != 0) for i in range(n)]
    if not isinstance(flags, list) or len(flags) != n or any(f not in (0, 1) for f in flags):
        raise ConfigError(f"no_rope_layers must list 0 or 1 for each of the {n} layers, got {flags!r}")
    return tuple(i for i, f in enumerate(flags) if not f)


def _hf_sliding_window(cfg: dict[str, Any], model_type: str) -> int | None:
    """The window some layer attends over, as transformers reads it: Mistral applies `sliding_window` unless
    `use_sliding_window` is false; Qwen2/Qwen3/SmolLM3 only where `use_sliding_window` is true (their default is
    false), and then to the layers from `max_window_layers` on (none where that is past the last layer), or as
    `layer_types` says where the config lists them."""
    window = cfg.get("sliding_window")
    opt_in = model_type in ("qwen2", "qwen3", "smollm3")
    if window is None or not cfg.get("use_sliding_window", not opt_in):
        return None
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        return window if "sliding_attention" in layer_types else None
    if opt_in and cfg.get("max_window_layers", 0) >= cfg.get("num_hidden_layers", 0):
        return None
    return window


def _hf_rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    # transformers 5 moved rope settings into `rope_parameters`; older configs use `rope_scaling`.
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    rs = dict(rs)
    rs.pop("rope_theta", None)
    kind = rs.get("rope_type", rs.get("type", "default"))
    phi3 = cfg.get("model_type") == "phi3"
    # transformers' Phi3Config reads a "yarn" type as LongRoPE too (its factor lists): running real YaRN ignored them
    if kind in ("longrope", "su") or (phi3 and kind == "yarn"):      # Phi-3's (early configs call it "su")
        rs.pop("type", None)
        rs["rope_type"] = kind = "longrope"
        # Phi3Config always has a top-level original_max_position_embeddings (default 4096) and it overrides the
        # rope dict's: a config without it got other angles than transformers' (~1e-3 relative on a tiny model)
        original = cfg.get("original_max_position_embeddings", 4096 if phi3 else
                           rs.get("original_max_position_embeddings"))
        rs["original_max_position_embeddings"] = original if original is not None else cfg.get(
            "max_position_embeddings")
        if rs.get("factor") is None and is_real(rs["original_max_position_embeddings"]) \
                and is_real(cfg.get("max_position_embeddings")) and rs["original_max_position_embeddings"] > 0:
            # transformers' default: the ratio of the two lengths (it sizes the attention factor)
            rs["factor"] = cfg["max_position_embeddings"] / rs["original_max_position_embeddings"]
    if kind in ("yarn", "llama3") and "original_max_position_embeddings" in cfg:
        # transformers gives a top-level original_max_position_embeddings priority (standardize_rope_params)
        rs["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    elif kind in ("yarn", "llama3") and rs.get("original_max_position_embeddings") is None \
            and cfg.get("max_position_embeddings") is not None:
        # and defaults it to max_position_embeddings: a llama3 config without it took Llama 3's 8192 here, other
        # angles than transformers' (logits ~2e-2 apart on a tiny model trained on 64 positions)
        rs["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    return None if kind == "default" else rs


# Llama options this engine's model does not implement: loading such a checkpoint would run other math than it
# was trained with, so it is refused rather than giving fluent-looking garbage.
_HF_ACTIVATIONS = ("silu", "swish")


def _check_hf_options(cfg: dict[str, Any]) -> None:
    if cfg.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported: amphista-engine's MLP layers have no biases")
    partial = cfg.get("partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"partial_rotary_factor={partial!r} is not supported: RoPE rotates whole heads here")
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act not in _HF_ACTIVATIONS:
        raise ConfigError(f"hidden_act {act!r} is not supported (Llama-family models use 'silu')")
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise ConfigError(f"quantized checkpoints (quantization_config, quant_method {method!r}) are not "
                          "supported: load the unquantized weights, or a GGUF file")


def _check_rope_scaling(rs) -> None:
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise ConfigError(f"model config: rope_scaling must be an object, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in SUPPORTED_ROPE_SCALING:
        raise ConfigError(f"model config: rope_scaling type {kind!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_ROPE_SCALING)})")
    if kind == "default":
        return
    factor = rs.get("factor")
    if not is_real(factor) or factor <= 0:
        raise ConfigError(f"model config: rope_scaling type {kind!r} needs a positive number 'factor', "
                          f"got {factor!r}")
    if kind == "llama3":
        lo, hi = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs.get("original_max_position_embeddings", 8192)
        for key, value in (("low_freq_factor", lo), ("high_freq_factor", hi),
                           ("original_max_position_embeddings", old)):
            if not is_real(value) or value <= 0:
                raise ConfigError(f"model config: rope_scaling {key} must be a positive number, got {value!r}")
        if hi <= lo:
            raise ConfigError(f"model config: rope_scaling high_freq_factor ({hi}) must exceed "
                              f"low_freq_factor ({lo})")
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            value = rs.get(key)
            if not isinstance(value, list) or not value or not all(is_real(v) and v > 0 for v in value):
                raise ConfigError(f"model config: rope_scaling type 'longrope' needs {key}, a list of positive "
                                  f"numbers, got {value!r:.80}")
        for key in ("original_max_position_embeddings", "attention_factor"):
            value = rs.get(key)
            if value is not None and (not is_real(value) or value <= 0):
                raise ConfigError(f"model config: rope_scaling {key} must be a positive number, got {value!r}")
    if kind == "yarn":
        for key in ("original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
                    "mscale_all_dim"):
            value = rs.get(key)
            if value is not None and (not is_real(value) or value <= 0):
                raise ConfigError(f"model config: rope_scaling {key} must be a positive number, got {value!r}")
