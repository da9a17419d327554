"""The Llama-family architecture description (Llama, Mistral, Qwen2, Qwen3, SmolLM3, Phi-3, Gemma 3, and the
mixture-of-experts Qwen3-MoE and Mixtral), read from a Hugging Face config.json or GGUF metadata."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelLoadError
from .values import is_integral, is_real

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                   "SmolLM3ForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration",
                   "Qwen3MoeForCausalLM", "MixtralForCausalLM")
_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "gemma3_text", "gemma3", "qwen3_moe",
                "mixtral")
# Mixture-of-experts families this engine does not run, and what in them it lacks (by model_type)
_REFUSED_MOE = {
    "qwen2_moe": "Qwen2-MoE adds a shared expert behind a sigmoid gate (shared_expert, shared_expert_gate) to every "
                 "sparse block",
    "deepseek_v2": "DeepSeek-V2 attends through multi-head latent attention and routes over groups with shared experts",
    "deepseek_v3": "DeepSeek-V3 attends through multi-head latent attention and routes by sigmoid scores over groups "
                   "with shared experts",
    "qwen3_next": "Qwen3-Next mixes linear-attention layers and a shared expert into its sparse blocks",
    "olmoe": "OLMoE normalises the whole q and k projections, not each head",
    "phimoe": "Phi-3.5-MoE routes by sparsemixer, not softmax top-k",
    "dbrx": "DBRX fuses its attention and experts in its own layout",
    "gpt_oss": "gpt-oss has attention sinks and biased, clamped experts",
    "granitemoe": "Granite-MoE scales embeddings, residuals and logits by its own multipliers",
    "jetmoe": "JetMoE routes attention heads too (mixture of attention heads)",
}
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
# Far past any real model (the largest have ~160 layers and ~400 experts): a corrupt or hand-edited count of 2**63
# looped over every layer's tensor names and never returned, one of a million took 15 s to say tensors were missing.
MAX_LAYERS = MAX_EXPERTS = 65536


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
    # Partial RoPE (Phi-4-mini's partial_rotary_factor 0.75): the first rotary_dim dims of each head rotate, in the
    # checkpoint's rotate-half pairs (i, i + rotary_dim/2), the rest pass through. 0: head_dim, whole heads. A
    # rope_scaling dict's partial_rotary_factor (transformers keeps it there) sets it too: the drafting heads take
    # the target's dict, whose LongRoPE lists have rotary_dim/2 entries. The loaders move each head's q/k rows so that
    # pair (i, i + rotary_dim/2) sits at (i, i + head_dim/2) (model.rotary_rows): every RoPE path stays whole-head.
    # Left 0 once resolved where all dims rotate.
    rotary_dim: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    name: str = "llama"
    # The window of the layers in `sliding_layers` (below): each of their tokens attends over the last
    # `sliding_window` positions only (its own included). Without sliding layers no layer slides.
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
    # Gemma 3: norms that scale by (1 + w) in fp32 (GemmaRMSNorm), a norm after attention and after the MLP too,
    # embeddings times sqrt(dim), a GELU (tanh) MLP, q/k norms, tied embeddings
    gemma: bool = False
    # Gemma 3: the attention scale is query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5)
    query_pre_attn_scalar: float | None = None
    # Layers that attend over the last `sliding_window` positions only (the others over all): every layer of
    # Mistral, Mixtral, Phi-3 and Qwen3-MoE, Qwen2/Qwen3's from max_window_layers on, SmolLM3's NoPE layers, Gemma 3's
    # local ones. Gemma 3's also rotate by RoPE base rope_local_theta, unscaled (None: the other layers' table).
    sliding_layers: tuple[int, ...] = ()
    rope_local_theta: float | None = None
    final_logit_softcapping: float | None = None    # logits = cap * tanh(logits / cap)
    # Mixture of experts (Qwen3-MoE, Mixtral): in the layers `moe_layers` the MLP is `n_experts` SwiGLU experts of
    # width moe_intermediate_size behind a router; each token runs through the `experts_per_token` experts of
    # largest router softmax, weighted by those probabilities (renormalised to sum 1 where norm_topk_prob). The other
    # layers keep the dense MLP of intermediate_size. moe_weights_fp32: the weighting in fp32 and the product rounded
    # to the model's dtype after (Mixtral), else the weights rounded to the model's dtype first (Qwen3-MoE).
    n_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = True
    moe_weights_fp32: bool = False

    def __post_init__(self):
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "head_dim",
                    "rotary_dim"):
            value = getattr(self, key)
            if key in ("head_dim", "rotary_dim") and value in (0, None):
                continue
            if not is_integral(value) or value <= 0:
                raise ConfigError(f"model config: {key} must be a positive integer, got {value!r}")
            setattr(self, key, int(value))
        for key, most in (("n_layers", MAX_LAYERS), ("n_experts", MAX_EXPERTS)):
            if is_integral(getattr(self, key)) and getattr(self, key) > most:
                raise ConfigError(f"model config: {key} is {_big(getattr(self, key))}, far past any model's "
                                  f"(at most {most})")
        if not is_integral(self.max_position_embeddings) or self.max_position_embeddings <= 0:
            # a string ("4096") passed here and failed in the engine with "'>' not supported between int and str"
            raise ConfigError(f"model config: max_position_embeddings must be a positive integer, got "
                              f"{self.max_position_embeddings!r:.80}")
        self.max_position_embeddings = int(self.max_position_embeddings)
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
        rot = self._resolve_rotary_dim(rs.get("partial_rotary_factor"))
        if rs.get("rope_type", rs.get("type")) == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(rs[key]) != rot // 2:
                    raise ConfigError(f"model config: rope_scaling {key} has {len(rs[key])} entries; RoPE rotates "
                                      f"{rot} of head_dim {self.head_dim}'s dims: {rot // 2} frequencies")
        self.nope_layers = tuple(self.nope_layers or ())
        if not all(is_integral(i) and 0 <= i < self.n_layers for i in self.nope_layers):
            raise ConfigError(f"model config: nope_layers must be layer indices below {self.n_layers}, "
                              f"got {list(self.nope_layers)}")
        if self.sliding_window is not None and (not is_integral(self.sliding_window) or self.sliding_window <= 0):
            raise ConfigError(f"model config: sliding_window must be a positive integer or null, "
                              f"got {self.sliding_window!r}")
        self.sliding_layers = tuple(self.sliding_layers or ())
        if not all(is_integral(i) and 0 <= i < self.n_layers for i in self.sliding_layers):
            raise ConfigError(f"model config: sliding_layers must be layer indices below {self.n_layers}, "
                              f"got {list(self.sliding_layers)}")
        if self.sliding_layers and self.sliding_window is None:
            raise ConfigError("model config: sliding_layers need a sliding_window")
        self.moe_layers = tuple(self.moe_layers or ())
        if self.moe_layers:
            for key in ("n_experts", "experts_per_token", "moe_intermediate_size"):
                value = getattr(self, key)
                if not is_integral(value) or value <= 0:
                    raise ConfigError(f"model config: {key} must be a positive integer for mixture-of-experts layers, "
                                      f"got {value!r}")
                setattr(self, key, int(value))
            if self.experts_per_token > self.n_experts:
                raise ConfigError(f"model config: {self.experts_per_token} experts per token (num_experts_per_tok) "
                                  f"but only {self.n_experts} experts")
            if not all(is_integral(i) and 0 <= i < self.n_layers for i in self.moe_layers):
                raise ConfigError(f"model config: moe_layers must be layer indices below {self.n_layers}, "
                                  f"got {list(self.moe_layers)}")
            if self.gemma:
                raise ConfigError("model config: Gemma 3 has no mixture-of-experts layers")
        for key in ("query_pre_attn_scalar", "rope_local_theta", "final_logit_softcapping"):
            value = getattr(self, key)
            if value is not None and (not is_real(value) or not value > 0):
                raise ConfigError(f"model config: {key} must be a positive number or null, got {value!r}")

    def _resolve_rotary_dim(self, partial) -> int:
        """The rotated dims (returned); rotary_dim keeps them only where they are fewer than head_dim, so that a
        dataclasses.replace with another head_dim does not inherit the old width."""
        if partial is not None:
            if not is_real(partial) or not 0 < partial <= 1:
                raise ConfigError(f"model config: partial_rotary_factor must be a number in (0, 1], got {partial!r}")
            rot = int(self.head_dim * partial)         # transformers' rounding (int(head_dim * factor))
            if rot <= 0:
                raise ConfigError(f"model config: partial_rotary_factor {partial} rotates no dim of head_dim "
                                  f"{self.head_dim}")
            if self.rotary_dim and self.rotary_dim != rot:
                raise ConfigError(f"model config: rotary_dim is {self.rotary_dim}, but rope_scaling's "
                                  f"partial_rotary_factor {partial} rotates {rot} of head_dim {self.head_dim}")
            self.rotary_dim = rot
        rot = self.rotary_dim or self.head_dim
        if rot > self.head_dim or rot % 2:
            how = f" (partial_rotary_factor {partial})" if partial is not None else ""
            raise ConfigError(f"model config: RoPE must rotate an even number of dims, at most head_dim "
                              f"({self.head_dim}), got rotary_dim {rot}{how}")
        self.rotary_dim = 0 if rot == self.head_dim else rot
        return rot

    @property
    def real_window(self) -> int | None:
        """The window the model's sliding layers attend over, or None: no layer slides."""
        return self.sliding_window if self.sliding_layers else None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ConfigError(f"a model config must be a JSON object, got a {type(cfg).__name__}")
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        model_type = cfg.get("model_type", "llama")
        # a number, a list or an object here met TypeError / KeyError deep in the family checks below
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"architectures must be a list of class names (e.g. [\"LlamaForCausalLM\"]), got "
                              f"{archs!r:.80}")
        if not isinstance(model_type, str):
            raise ConfigError(f"model_type must be a string (e.g. \"llama\"), got {model_type!r:.80}")
        for key in ("rope_scaling", "rope_parameters"):
            if cfg.get(key) is not None and not isinstance(cfg[key], dict):
                raise ConfigError(f"{key} must be an object or null, got {cfg[key]!r:.80}")
        layers = cfg.get("num_hidden_layers")
        if is_integral(layers) and layers > MAX_LAYERS:     # before the per-layer lists below are built
            raise ConfigError(f"num_hidden_layers is {_big(layers)}, far past any model's (at most {MAX_LAYERS})")
        _refuse_other_gemmas(cfg, archs[0], model_type)
        _refuse_other_moes(cfg, archs[0], model_type)
        if model_type in ("gemma3", "gemma3_text"):
            return _gemma3_from_hf(cls, cfg, archs[0], model_type)
        if model_type not in _MODEL_TYPES or archs[0] not in SUPPORTED_ARCHS:
            raise ConfigError(f"unsupported architecture {archs[0]!r} (model_type {cfg.get('model_type')!r}); "
                              f"amphista-engine runs Llama-family models: {', '.join(SUPPORTED_ARCHS)}")
        # a key left out takes its family's transformers default, not Llama's: a Mixtral config.json without
        # rope_theta ran RoPE base 10000 where transformers runs 1e6 (logits ~0.5 relative apart)
        cfg = {**_HF_FAMILY_DEFAULTS.get(model_type, {}), **cfg}
        _check_hf_options(cfg, partial_ok=model_type == "phi3")
        # of the families here only transformers' Phi-3 honours partial_rotary_factor (the others' are refused above)
        partial = _hf_partial_rotary(cfg) if model_type == "phi3" else None
        scaling = _hf_rope_scaling(cfg)
        if scaling is not None and partial is not None:
            scaling["partial_rotary_factor"] = partial     # the lists' length, also for the heads that copy the dict
        # transformers' Qwen2 layers always carry q/k/v biases (no config key) and no o bias; attention_bias
        # puts them on all four projections in Llama, Qwen3, SmolLM3 and Qwen3-MoE. Mistral, Mixtral and Phi-3 read
        # no such key (a config with it set was refused for lacking biases transformers never loads).
        attention_bias = bool(cfg.get("attention_bias", False)) and model_type in ("llama", "qwen3", "smollm3",
                                                                                   "qwen3_moe")
        try:
            return cls(
                vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                intermediate_size=cfg["intermediate_size"], head_dim=cfg.get("head_dim") or 0,
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=(cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)),
                rope_scaling=scaling, rotary_dim=_hf_rotary_dim(cfg, partial),
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id") or [],
                name=cfg.get("_name_or_path") or archs[0],
                **_hf_sliding(cfg, model_type),
                qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
                qk_norm=model_type in ("qwen3", "qwen3_moe"),
                nope_layers=_hf_nope_layers(cfg) if model_type == "smollm3" else (),
                fused_checkpoint=model_type == "phi3",
                **_hf_moe(cfg, model_type),
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
        except (OSError, ValueError, RecursionError) as e:    # ValueError: bad JSON or bad UTF-8
            # RecursionError: arrays nested thousands deep, which json's decoder recurses into
            raise ConfigError(f"{path} is not valid JSON: {str(e) or type(e).__name__}") from None
        try:
            return cls.from_hf(cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# transformers' <Family>Config defaults where they are not the ones from_hf falls back to (Llama's): what a
# config.json that leaves the key out runs with there. max_position_embeddings sizes YaRN's and Llama-3's trained
# length where the rope dict names none, and where dynamic NTK starts rescaling.
_HF_FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 131_072, "sliding_window": 4096},
    "mixtral": {"max_position_embeddings": 131_072, "rope_theta": 1e6, "rms_norm_eps": 1e-5},
    # their window where use_sliding_window is true (a config that left sliding_window out slid nothing here)
    "qwen2": {"max_position_embeddings": 32_768, "sliding_window": 4096},
    "qwen3": {"max_position_embeddings": 32_768, "head_dim": 128, "sliding_window": 4096},
    "qwen3_moe": {"max_position_embeddings": 32_768, "sliding_window": 4096},
    "smollm3": {"max_position_embeddings": 32_768, "rope_theta": 2e6, "tie_word_embeddings": True},
    "phi3": {"rms_norm_eps": 1e-5},
}

_GEMMA3_TEXT_DEFAULTS = {      # transformers' Gemma3TextConfig: Hub configs (4B+'s text_config) leave them out
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1,
    "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": None,
    "attn_logit_softcapping": None}


def _big(n: int) -> str:
    """n for a message: past 4300 digits str() raises ValueError itself."""
    from .errors import int_digits
    return str(n) if int_digits(n) <= 30 else f"an integer of {int_digits(n)} digits"


def _refuse_other_gemmas(cfg: dict[str, Any], arch: str, model_type: str) -> None:
    if model_type == "gemma2" or arch.startswith("Gemma2"):
        raise ConfigError(f"Gemma 2 ({arch!r}, model_type {model_type!r}) is not supported: its attention caps every "
                          "score with tanh (attn_logit_softcapping), which this engine's attention kernels do not "
                          "implement; Gemma 3 text models (Gemma3ForCausalLM) are supported")
    if model_type == "paligemma" or arch.startswith("PaliGemma"):
        # named here: the generic message listed Gemma3ForConditionalGeneration among the supported, which read as
        # if a vision-language Gemma were runnable
        raise ConfigError(f"PaliGemma ({arch!r}, model_type {model_type!r}) is not supported: its language model is "
                          "Gemma 1 or Gemma 2 behind a vision tower; of the Gemma family this engine runs Gemma 3 "
                          "text models (Gemma3ForCausalLM, the text part of Gemma3ForConditionalGeneration)")
    if model_type in ("gemma", "gemma3n", "gemma3n_text") or arch.startswith(("GemmaFor", "Gemma3n")):
        raise ConfigError(f"{arch!r} (model_type {model_type!r}) is not supported; of the Gemma family this engine "
                          "runs Gemma 3 text models (Gemma3ForCausalLM, the text part of Gemma3ForConditionalGeneration)")


def _refuse_other_moes(cfg: dict[str, Any], arch: str, model_type: str) -> None:
    """Mixture-of-experts models other than Qwen3-MoE and Mixtral, by name: the generic refusal listed only dense
    architectures, which did not say whether the experts or something else were the problem."""
    if model_type in ("qwen3_moe", "mixtral"):
        return
    why = _REFUSED_MOE.get(model_type)
    moe_like = why is not None or "moe" in model_type or "Moe" in arch or any(
        cfg.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size"))
    if moe_like:
        raise ConfigError(f"unsupported architecture {arch!r} (model_type {model_type!r}): a mixture-of-experts model "
                          f"this engine does not run{': ' + why if why else ''}; of mixture-of-experts models it runs "
                          "Qwen3-MoE "
                          "(Qwen3MoeForCausalLM) and Mixtral (MixtralForCausalLM)")


def _hf_moe(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The ModelConfig fields of a Qwen3-MoE or Mixtral config.json (transformers' Qwen3MoeDecoderLayer: a sparse
    block where the layer is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0; Mixtral: every layer,
    top-2 renormalised, its experts intermediate_size wide)."""
    n = cfg.get("num_hidden_layers", 0)
    if model_type == "mixtral":
        return dict(n_experts=cfg.get("num_local_experts", cfg.get("num_experts", 8)),
                    experts_per_token=cfg.get("num_experts_per_tok", 2),
                    moe_intermediate_size=cfg.get("intermediate_size"), norm_topk_prob=True, moe_weights_fp32=True,
                    moe_layers=tuple(range(n)) if is_integral(n) else ())
    if model_type != "qwen3_moe":
        return {}
    # the Hub's configs say num_experts; transformers 5 saves it as num_local_experts (its attribute_map)
    experts = cfg.get("num_experts", cfg.get("num_local_experts", 128))
    step = cfg.get("decoder_sparse_step", 1)
    only = cfg.get("mlp_only_layers") or []
    if not is_integral(step) or step < 1:
        raise ConfigError(f"decoder_sparse_step must be a positive integer, got {step!r}")
    if not isinstance(only, list) or not all(is_integral(i) for i in only):
        raise ConfigError(f"mlp_only_layers must list layer indices, got {only!r:.80}")
    if cfg.get("shared_expert_intermediate_size"):
        raise ConfigError("shared_expert_intermediate_size is set: a shared expert (Qwen2-MoE's) is not supported")
    layers = tuple(i for i in range(n if is_integral(n) else 0)
                   if i not in only and experts and (i + 1) % step == 0)
    return dict(n_experts=experts, experts_per_token=cfg.get("num_experts_per_tok", 8),
                moe_intermediate_size=cfg.get("moe_intermediate_size", 768), moe_layers=layers,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), moe_weights_fp32=False)


def _gemma3_from_hf(cls, top: dict[str, Any], arch: str, model_type: str) -> "ModelConfig":
    """Gemma 3 text models: Gemma3ForCausalLM (model_type gemma3_text) or the text part of a
    Gemma3ForConditionalGeneration config (model_type gemma3: its text_config; the vision tower is not loaded)."""
    if top.get("architectures") and arch not in ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"):
        # Gemma3ForSequenceClassification (a score head in place of the LM head) and Gemma3TextModel (no head) loaded
        # as language models through the tied embeddings: text from a model that never predicted tokens
        raise ConfigError(f"{arch!r} (model_type {model_type!r}) is not a Gemma 3 language model this engine runs: "
                          "it loads Gemma3ForCausalLM checkpoints and the text part of Gemma3ForConditionalGeneration "
                          "ones, whose LM head predicts the next token")
    if model_type == "gemma3":
        text = top.get("text_config") or {}
        if not isinstance(text, dict):
            raise ConfigError(f"a gemma3 config's text_config must be an object, got {text!r:.80}")
        cfg = {**_GEMMA3_TEXT_DEFAULTS, **text}
        # the top level's, where it has them; quantization_config too (a bitsandbytes/AWQ Gemma-3-4B's sits there,
        # not in text_config, and was not refused by name)
        for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings", "quantization_config"):
            if top.get(key) is not None:
                cfg[key] = top[key]
    else:
        cfg = {**_GEMMA3_TEXT_DEFAULTS, **top}
    for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if cfg.get(key):
            raise ConfigError(f"{key}={cfg[key]!r} is not supported: this engine's attention has no "
                              + ("score softcapping" if key.startswith("attn") else "bidirectional mode"))
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"hidden_activation {act!r} is not supported for Gemma 3 (it uses 'gelu_pytorch_tanh')")
    checked = {k: v for k, v in cfg.items() if k not in ("hidden_act", "hidden_activation", "rope_scaling",
                                                         "rope_parameters")}
    _check_hf_options({**checked, "hidden_act": "silu"})      # mlp_bias, partial rotary, quantization
    n = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        pattern = cfg.get("sliding_window_pattern", 6)
        if not is_integral(pattern) or pattern < 1:
            raise ConfigError(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if (not isinstance(layer_types, list) or len(layer_types) != n
            or any(t not in ("sliding_attention", "full_attention") for t in layer_types)):
        raise ConfigError(f"layer_types must list 'sliding_attention' or 'full_attention' for each of the {n} "
                          f"layers, got {layer_types!r:.200}")
    window = cfg.get("sliding_window")
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention") if window else ()
    # RoPE: transformers 5 writes rope_parameters per layer type; older configs rope_theta, rope_local_base_freq
    # and a rope_scaling that applies to the full-attention layers only
    rp = cfg.get("rope_parameters") or {}
    full = dict(rp.get("full_attention") or ({} if "sliding_attention" in rp else rp))
    local = dict(rp.get("sliding_attention") or {})
    if cfg.get("rope_scaling"):
        full.update(cfg["rope_scaling"])
    theta = full.pop("rope_theta", cfg.get("rope_theta", 1_000_000.0))
    local_theta = local.get("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
    for rope in (full, local):
        # a layer type's own partial_rotary_factor, refused as a top-level one is: it loaded, and the sliding layers
        # rotated part of each head too (transformers' Gemma 3 rotates whole heads there)
        _check_hf_options({"model_type": model_type, "rope_scaling": rope})
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ConfigError(f"Gemma 3 sliding layers' rope_parameters {local!r}: only unscaled RoPE is supported there")
    kind = full.get("rope_type", full.get("type", "default"))
    scaling = None if kind == "default" else full
    eos = cfg.get("eos_token_id")
    try:
        return cls(
            vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=n, n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"], head_dim=cfg.get("head_dim") or 0,
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 131_072),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True), bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos if eos is not None else [], name=top.get("_name_or_path") or arch,
            sliding_window=window if sliding else None, qkv_bias=bool(cfg.get("attention_bias")),
            o_bias=bool(cfg.get("attention_bias")), qk_norm=True, gemma=True,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"), sliding_layers=sliding,
            rope_local_theta=local_theta,
            # transformers' Gemma3ForConditionalGeneration never applies the text config's softcap (its
            # Gemma3ForCausalLM does; the Hub's Gemma 3 configs set none)
            final_logit_softcapping=cfg.get("final_logit_softcapping") if model_type == "gemma3_text" else None)
    except KeyError as e:
        raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None


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


def _hf_sliding(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """sliding_window and sliding_layers as transformers reads them: Mistral, Mixtral and Phi-3 apply
    `sliding_window` to every layer (their classes read neither `use_sliding_window` nor `layer_types`: a config
    whose use_sliding_window was false loaded with no window, other logits than transformers' past it);
    Qwen2/Qwen3/SmolLM3/Qwen3-MoE only where `use_sliding_window` is true (their default is false), and then to the
    layers `layer_types` names where the config lists them, else Qwen2/Qwen3's from `max_window_layers` on (none
    where that is past the last layer; without the key their classes' default, 28), SmolLM3's NoPE layers, every
    layer of Qwen3-MoE (it has no such key). Llama's class reads no window at all."""
    window = cfg.get("sliding_window")
    n = cfg.get("num_hidden_layers", 0)
    n = n if is_integral(n) and n > 0 else 0
    if window is None or model_type == "llama":
        return {"sliding_window": None, "sliding_layers": ()}
    if model_type in ("mistral", "mixtral", "phi3"):
        layers = tuple(range(n))
    elif not cfg.get("use_sliding_window", False):
        layers = ()
    elif model_type == "qwen3_moe":
        layers = tuple(range(n))
    elif isinstance(cfg.get("layer_types"), list) and cfg["layer_types"]:
        layer_types = cfg["layer_types"]
        if len(layer_types) != n or any(t not in ("sliding_attention", "full_attention") for t in layer_types):
            raise ConfigError(f"layer_types must list 'sliding_attention' or 'full_attention' for each of the {n} "
                              f"layers, got {layer_types!r:.200}")
        layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    elif model_type in ("qwen2", "qwen3"):
        first = cfg.get("max_window_layers", 28)
        if not is_integral(first) or first < 0:
            raise ConfigError(f"max_window_layers must be a non-negative integer, got {first!r:.80}")
        layers = tuple(range(first, n))
    else:
        layers = _hf_nope_layers(cfg)       # SmolLM3
    return {"sliding_window": window if layers else None, "sliding_layers": layers}


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


def _hf_partial_rotary(cfg: dict[str, Any]):
    """partial_rotary_factor as transformers reads it: the rope dict's (rope_scaling, else rope_parameters) over the
    top level's. None where neither sets one."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    partial = rs.get("partial_rotary_factor") if isinstance(rs, dict) else None
    return cfg.get("partial_rotary_factor") if partial is None else partial


def _hf_rotary_dim(cfg: dict[str, Any], partial) -> int:
    """The dims of each head RoPE rotates: int(head_dim * partial_rotary_factor), as transformers' Phi-3 (0: whole
    heads, or a config whose sizes ModelConfig then refuses by name)."""
    if partial is None:
        return 0
    if not is_real(partial) or not 0 < partial <= 1:
        raise ConfigError(f"partial_rotary_factor must be a number in (0, 1], got {partial!r}")
    width, hidden, heads = cfg.get("head_dim"), cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if not width and is_integral(hidden) and is_integral(heads) and heads > 0:
        width = hidden // heads
    if not is_integral(width) or width <= 0:
        return 0
    rot = int(width * partial)
    if rot <= 0 or rot % 2:
        raise ConfigError(f"partial_rotary_factor={partial!r} rotates {rot} of each head's {width} dims: RoPE needs "
                          "an even, positive number of them")
    return rot


def _check_hf_options(cfg: dict[str, Any], partial_ok: bool = False) -> None:
    if cfg.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported: amphista-engine's MLP layers have no biases")
    partial = _hf_partial_rotary(cfg)
    if partial not in (None, 1, 1.0) and not partial_ok:
        # transformers' Llama, Mistral, Qwen, SmolLM3 and Gemma 3 models rotate whole heads whatever the key says:
        # following the key would part from them, following them would ignore what the checkpoint claims
        raise ConfigError(f"partial_rotary_factor={partial!r} is not supported for model_type "
                          f"{cfg.get('model_type', 'llama')!r}: transformers' own model of that family rotates whole "
                          "heads whatever the key says, so which RoPE the checkpoint was trained with is unclear "
                          "(partial rotary embeddings load for Phi-3-architecture checkpoints, such as Phi-4-mini)")
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
