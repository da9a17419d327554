"""Heads checkpoints: a directory of config.json + model.safetensors, tied to the target by an LM-head fingerprint.

Also: the public Medusa `medusa_lm_head.pt` layout, and fresh (trainable) or random (test/benchmark) heads.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from ..errors import ConfigError, HeadsMismatchError, InputError, ModelLoadError
from .amphista import AmphistaHeads
from .config import HeadsConfig
from .medusa import DraftHeads, MedusaHeads

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FINGERPRINT_ROWS = 256
# model.safetensors also keeps rows of the LM head the heads were trained with (save_heads), so that a converted or
# quantized copy of that model (an fp16 or 4-bit GGUF of the same checkpoint), whose fingerprint differs, is told
# apart from another model: relative L2 distance of those rows, SmolLM2-135M's LM head requantized: Q5_0 0.055,
# Q4_1 0.089, Q4_0 0.11, bf16 0.0014; random weights of the same scale 1.42, the same rows in another order 1.07.
SKETCH_KEY = "target_lm_head_sketch"
SKETCH_ROWS = 64
SKETCH_TOLERANCE = 0.4
# The attribute of loaded heads that holds the rows their checkpoint kept (not a buffer: out of state_dict), so that
# heads taken on a converted copy of their model keep them through save_heads and Engine.load_heads(module).
KEPT_SKETCH = "target_sketch"


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


# The attribute of a loaded model's LM head (nn.Linear) that holds the fingerprint of the checkpoint values it was
# built from, whatever dtype it holds them in now.
CHECKPOINT_FINGERPRINT = "checkpoint_fingerprint"


def lm_head_fingerprint(target) -> str:
    """'V{V}-d{d}-{hash}' of the target's LM head (a Transformer, an nn.Linear or the [V, d] weight).

    Hashes 256 evenly spaced rows rounded to bf16, so fp32/fp16/bf16 loads of one bf16 or fp16 checkpoint agree:
    such values survive every one of those dtypes, and rounding an fp16 value to bf16 is the same single
    rounding whichever dtype held it. Values below 2^-14 are flushed to zero because fp16 stores them as
    subnormals with fewer bits. fp32-born weights (a GGUF file's dequantized values) loaded as fp16 would round
    twice and hash differently, so a model the loaders built answers with the fingerprint of the checkpoint's own
    values, recorded before the dtype cast (`CHECKPOINT_FINGERPRINT` on its LM head, loading.build_model).
    """
    head = getattr(target, "output", target)
    recorded = getattr(head, CHECKPOINT_FINGERPRINT, None)
    if recorded is not None:
        return recorded
    w = getattr(head, "weight", head).detach()
    V, d = w.shape
    rows = torch.linspace(0, V - 1, min(V, FINGERPRINT_ROWS)).round().long()
    s = w[rows.to(w.device)].float().cpu().to(torch.bfloat16).float()
    s = torch.where(s.abs() < 2.0 ** -14, torch.zeros_like(s), s)    # also turns -0.0 into +0.0
    return f"V{V}-d{d}-{hashlib.sha256(s.numpy().tobytes()).hexdigest()[:16]}"


def lm_head_rows(target, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The target's LM head weight ([V, d], or the rows `rows` picks) as floats of its model's dtype: the weight
    itself, or a 4-bit engine's int8 rows where quantize_head freed it (cpu_quant.Int8Linear.float_rows)."""
    head = target.output
    dtype = target.tok_embeddings.weight.dtype
    if hasattr(head, "float_rows"):
        return head.float_rows(rows, dtype)
    w = head.weight.detach()
    return w if rows is None else w.index_select(0, rows.to(w.device))


def lm_head_sketch(target) -> torch.Tensor | None:
    """SKETCH_ROWS evenly spaced rows of the target's LM head (a Transformer, an nn.Linear or the [V, d] weight),
    fp32 on the CPU; None where no float weight is at hand."""
    head = getattr(target, "output", target)
    w = getattr(head, "weight", head)
    if isinstance(w, torch.Tensor) and w.is_meta:       # a 4-bit engine's untied head kept its rows (quantize_head)
        return getattr(head, "sketch", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        return None
    rows = torch.linspace(0, w.shape[0] - 1, min(w.shape[0], SKETCH_ROWS)).round().long()
    return w.detach()[rows.to(w.device)].float().cpu().contiguous()


def sketch_distance(sketch: torch.Tensor, target) -> float | None:
    """||target's rows - sketch|| / ||sketch||; None where they cannot be compared."""
    here = lm_head_sketch(target)
    if here is None or here.shape != sketch.shape or not torch.isfinite(sketch).all():
        return None
    norm = float(sketch.norm())
    return float((here - sketch).norm()) / norm if norm > 0 else None


def heads_sketch(heads: DraftHeads, fingerprint: str | None = None) -> torch.Tensor | None:
    """The LM-head rows of the model the heads were trained for (fingerprint: its, by default the heads' config's):
    those their checkpoint kept (load_heads keeps them on the heads, so heads taken on a converted or quantized copy
    of that model still carry its rows), else the bound target's where it is that model; None where neither is."""
    kept = getattr(heads, KEPT_SKETCH, None)
    if kept is not None:
        return kept
    bound = heads._bound
    if bound is not None and lm_head_fingerprint(bound[1]) == (fingerprint or heads.config.target_fingerprint):
        return lm_head_sketch(bound[1])
    return None


def converted_copy_distance(heads: DraftHeads, target) -> float | None:
    """sketch_distance of the heads' LM-head rows (heads_sketch) from `target`'s where it is at most
    SKETCH_TOLERANCE (a converted or quantized copy of their model: warned about, taken), else None."""
    sketch = heads_sketch(heads)
    distance = None if sketch is None else sketch_distance(sketch, target)
    if distance is None or distance > SKETCH_TOLERANCE:
        return None
    warnings.warn(f"the heads were trained with an LM head that this model's differs from by {distance:.1%} "
                  f"(relative L2 over {SKETCH_ROWS} rows): a converted or quantized copy of their model, taken for "
                  "it; output is the same (the model verifies every drafted token), the heads may accept fewer "
                  "tokens than on the model they were trained with", stacklevel=3)
    return distance


# The part of a heads config that was fitted to its weights (`amphista tree-search --save`): the trees under
# extra.trees and the records of their taus (tree_search for the `tuned` prefix, tree_search_P for prefix P), which
# speculative="auto" reads. A record keeps WEIGHTS_KEY, the weights_stamp of the heads it was fitted to: heads
# retrained and saved again (save_heads keeps their config's extra) or a model.safetensors replaced by hand must
# not keep trees and taus fitted to other weights.
WEIGHTS_KEY = "weights"


def weights_stamp(state: dict) -> str:
    """A short hash of heads weights (a state dict, the checkpoint file's tensors or heads.state_dict()) rounded to
    bf16: the same for a file and for its fp32 or bf16 load, or a save of those in bf16 or fp32."""
    h = hashlib.sha1()
    for name in sorted(state):
        if name == SKETCH_KEY:
            continue
        t = state[name].detach()
        t = t.to(torch.bfloat16) if t.is_floating_point() else t.long()
        h.update(name.encode())
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fitted_prefix(record_key: str) -> str | None:
    """The tree-name prefix a tree-search record's trees carry: tree_search -> tuned, tree_search_P -> P."""
    if record_key == "tree_search":
        return "tuned"
    return record_key.removeprefix("tree_search_") if record_key.startswith("tree_search_") else None


def drop_fitted(extra: dict, prefixes, why: str | None = None) -> list[str]:
    """Removes the records and trees of these prefixes from a config's extra (in place); returns the trees removed.
    why: warn, naming them and `why`."""
    gone = []
    trees = extra.get("trees") if isinstance(extra.get("trees"), dict) else {}
    for key in [k for k in extra if fitted_prefix(k) in prefixes]:
        del extra[key]
    for name in [n for n in trees if isinstance(n, str) and n.rpartition("-")[0] in prefixes]:
        del trees[name]
        gone.append(name)
    if "trees" in extra and not trees:
        del extra["trees"]
    if why and gone:
        warnings.warn(f"dropped the fitted trees {', '.join(sorted(gone))} and their recorded taus: {why}; run "
                      f"`amphista tree-search --save` on these heads to fit them again", stacklevel=3)
    return gone


def stale_prefixes(extra: dict, stamp: str) -> list[str]:
    """Prefixes of the tree-search records in extra that were fitted to other weights than those with `stamp`."""
    return [fitted_prefix(k) for k, rec in extra.items() if fitted_prefix(k) is not None and isinstance(rec, dict)
            and rec.get(WEIGHTS_KEY) not in (None, stamp)]


def weights_digest(heads: DraftHeads) -> str:
    """A short hash of the heads' weights: results computed with heads that were retrained in place (same path)
    must not pass for the new heads' (eval and eval-tau resume by it)."""
    h = hashlib.sha1()
    for name, t in sorted(heads.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def build_heads(config: HeadsConfig) -> DraftHeads:
    return (AmphistaHeads if config.kind == "amphista" else MedusaHeads)(config)


def _init_from_target(heads: DraftHeads, target):
    """Start near the target: the final norm as the target's, per-head LM heads as copies of its LM head."""
    with torch.no_grad():
        if isinstance(heads, AmphistaHeads):
            heads.norm.weight.copy_(target.norm.weight)
        if heads.config.per_head_lm_head:
            # with a draft vocabulary each head scores draft_vocab_size slots: copy those tokens' rows, not all V
            # (the full [V, d] head did not fit [K, draft_vocab_size, d] and new_heads raised a bare RuntimeError)
            rows = heads.draft_vocab if heads.config.draft_vocab_size else None
            heads.lm_heads.copy_(lm_head_rows(target, rows)[None].expand_as(heads.lm_heads))


def new_heads(kind: str, target, num_heads: int = 4, dtype=None, draft_vocab=None, **overrides) -> DraftHeads:
    """Fresh heads for training: default init, identity ResBlocks (W = 0), bound to `target`. draft_vocab: the
    token ids the heads draft over (draft_vocab_size is their count where not given), set before the per-head LM
    heads are copied from the target: set later (set_draft_vocab), those heads kept the rows of tokens 0..n-1, the
    placeholder vocabulary's, each slot scoring one token with another token's row."""
    if draft_vocab is not None:
        overrides.setdefault("draft_vocab_size", torch.as_tensor(draft_vocab).numel())
    cfg = HeadsConfig.for_target(target.config, kind=kind, num_heads=num_heads,
                                 target_fingerprint=lm_head_fingerprint(target), **overrides)
    heads = build_heads(cfg)
    if draft_vocab is not None:
        heads.set_draft_vocab(draft_vocab)
    if isinstance(heads, AmphistaHeads):
        torch.nn.init.normal_(heads.pos_emb, std=0.02)
    _init_from_target(heads, target)
    # the model's device and dtype (its embedding and LM head weights may be meta tensors: cpu_quant)
    return heads.to(device=target.device, dtype=dtype or target.tok_embeddings.weight.dtype).bind(target)


def random_heads(kind: str, target, num_heads: int = 4, seed: int = 0, std: float = 0.02, dtype=None,
                 **overrides) -> DraftHeads:
    """Random heads for tests and benchmarks; ResBlocks get N(0, 1/d) weights so the K drafts differ."""
    heads = new_heads(kind, target, num_heads=num_heads, dtype=torch.float32, **overrides).cpu()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if name.endswith("norm.weight") or name == "lm_heads":
                continue
            scale = p.shape[-1] ** -0.5 if name.startswith("res.") else std
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return heads.to(device=target.device, dtype=dtype or target.tok_embeddings.weight.dtype).eval() \
        .requires_grad_(False).bind(target)


def save_heads(heads: DraftHeads, directory, dtype=None) -> Path:
    """Writes config.json + model.safetensors (the config's dtype, bf16 by default); the target's embedding
    and LM head are not stored."""
    from safetensors.torch import save_file

    cfg = HeadsConfig.from_dict(heads.config.to_dict())
    if not cfg.target_fingerprint:
        if heads._bound is None:
            raise ConfigError("heads have no target fingerprint: bind them to their target before saving")
        cfg.target_fingerprint = lm_head_fingerprint(heads._bound[1])
    dt = _dtype(dtype or cfg.dtype)
    cfg.dtype = _dtype_name(dt)
    path = Path(directory).expanduser()
    check_heads_folder(path)
    if dt == torch.float16:
        # fp16 holds magnitudes up to 65504: a larger weight would be written as inf, and every draft after it NaN
        big = next(((k, v) for k, v in heads.state_dict().items()
                    if v.is_floating_point() and v.numel() and float(v.detach().abs().max()) > 65504), None)
        if big is not None:
            raise ConfigError(f"heads weight {big[0]} reaches {float(big[1].detach().abs().max()):.4g}, past fp16's "
                              "largest value (65504): saved in fp16 it would become inf; save in bf16 (the "
                              "default) or fp32")
    path.mkdir(parents=True, exist_ok=True)
    # Only floating tensors take the save dtype: the draft vocabulary's token ids stay integers.
    state = {k: v.detach().to(device="cpu", dtype=dt if v.is_floating_point() else v.dtype).contiguous()
             for k, v in heads.state_dict().items()}
    if any(fitted_prefix(k) for k in cfg.extra):
        # heads loaded, trained further and saved keep their config's extra: not the trees fitted to their old weights
        drop_fitted(cfg.extra, stale_prefixes(cfg.extra, weights_stamp(state)),
                    why="they were fitted to other weights than the heads saved")
    # The rows of the model the heads were trained for, also where they are bound to a converted copy of it (kept
    # from their checkpoint): without them the saved heads no longer loaded on the copy they were loaded on.
    sketch = heads_sketch(heads, cfg.target_fingerprint)
    if sketch is not None:
        state[SKETCH_KEY] = sketch.to(dt)   # 64 rows: bf16's rounding (0.14%) is nothing to SKETCH_TOLERANCE
    try:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt", "kind": cfg.kind})
    except Exception as e:    # safetensors' own error type: a read-only folder ended a training run with its trace
        raise InputError(f"cannot write the heads to {path / 'model.safetensors'}: {e}") from None
    # Replaced whole: a config.json torn by a crash or a full disk mid-write left heads that no longer load
    tmp = path / ".config.json.tmp"
    try:
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        os.replace(tmp, path / "config.json")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_heads_folder(path) -> None:
    """save_heads (and `train --out`) write config.json + model.safetensors: a folder where those are a model's
    checkpoint is refused (its weights would be replaced by the heads'), not overwritten."""
    cfg_file = Path(path) / "config.json"
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else None
    except (OSError, ValueError, RecursionError):       # unreadable or torn: nothing a heads save would destroy
        return
    if isinstance(raw, dict) and "dim" not in raw and ("model_type" in raw or "architectures" in raw):
        raise ConfigError(f"{path} holds a model checkpoint (config.json with model_type {raw.get('model_type')!r}): "
                          f"saving heads there would overwrite the model's config.json and model.safetensors; "
                          f"save the heads to a folder of their own")


def _assign(heads: DraftHeads, state: dict[str, torch.Tensor], source, device, dtype) -> DraftHeads:
    """Loads `state` into heads built on the meta device (no double allocation); mismatches -> ConfigError."""
    expected = {k: v.shape for k, v in heads.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"{source}: tensors do not match the config (missing: {missing or 'none'}; "
                          f"unexpected: {unexpected or 'none'})")
    params = dict(heads.named_parameters())
    for k, shape in expected.items():
        t = state[k]
        if t.shape != shape:
            c = heads.config
            raise ConfigError(f"{source}: tensor {k} has shape {tuple(t.shape)}, the config (kind={c.kind}, "
                              f"num_heads={c.num_heads}, dim={c.dim}) expects {tuple(shape)}")
        if k in params:     # weights: floating point and finite (NaN weights would draft garbage)
            if not t.is_floating_point():
                raise ConfigError(f"{source}: tensor {k} has dtype {t.dtype}; weights must be floating point")
            if not torch.isfinite(t).all():
                raise ConfigError(f"{source}: tensor {k} holds NaN or infinite values")
    if heads.config.draft_vocab_size:     # checked before it is cast: float ids would be truncated silently
        try:
            ids = heads.check_draft_vocab(state["draft_vocab"])
        except ConfigError as e:
            raise ConfigError(f"{source}: bad draft_vocab tensor: {e}") from None
        state = {**state, "draft_vocab": ids}
    heads.load_state_dict({k: v.to(device=device, dtype=dtype if v.is_floating_point() else torch.long)
                           for k, v in state.items()}, assign=True)
    heads._w_sub = heads._slot_map = heads._codes_sub = None
    return heads.eval().requires_grad_(False)   # for inference; a trainer resuming calls requires_grad_()


def read_heads_config(path) -> tuple[Path, HeadsConfig]:
    """(directory, config) of a heads directory (or its config.json / model.safetensors), checked; no weights
    read, so callers can size things (head count, fitted trees) before loading a model."""
    from ..text_files import missing_note
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"heads path not found: {path}{missing_note(path)}")
    if path.is_file() and path.name not in ("config.json", "model.safetensors", "medusa_lm_head.pt"):
        raise ModelLoadError(f"heads path {path} is a file; expected a heads directory (config.json + "
                             f"model.safetensors, as save_heads writes)")
    directory = path if path.is_dir() else path.parent
    if not os.access(directory, os.R_OK | os.X_OK):
        # its files were reported one by one ("Permission denied: DIR/medusa_lm_head.pt")
        raise ModelLoadError(f"heads directory {directory} cannot be read (permission denied): make it readable "
                             f"(chmod u+rx)")
    cfg_file, weights = directory / "config.json", directory / "model.safetensors"
    if (directory / "medusa_lm_head.pt").is_file() and not weights.is_file():
        # a public Medusa checkpoint (FasterDecoding/Medusa) was told it "lacks" files of another layout
        raise ModelLoadError(f"{directory} holds public Medusa heads (medusa_lm_head.pt), not heads in this engine's "
                             f"layout (config.json + model.safetensors): load them with amphista_engine.heads."
                             f"load_medusa_checkpoint(path, engine.model) and pass that module to engine.load_heads")
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ModelLoadError(f"heads directory {directory} lacks {f.name} (expected config.json + "
                                 f"model.safetensors, as save_heads writes)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:    # Recursion: arrays nested deep
        raise ConfigError(f"{cfg_file} is not valid JSON: {str(e) or type(e).__name__}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {cfg_file}: {e}") from None
    if isinstance(raw, dict) and "dim" not in raw and ("model_type" in raw or "architectures" in raw):
        raise ModelLoadError(f"{directory} holds a model checkpoint (config.json with model_type "
                             f"{raw.get('model_type')!r}), not drafting heads; pass a heads directory "
                             f"(config.json + model.safetensors, as save_heads writes)")
    try:
        cfg = HeadsConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    return directory, cfg


def _copy_distance(weights: Path, target) -> float | None:
    """sketch_distance of the LM-head rows a heads file keeps (save_heads) from `target`'s; None where the file
    keeps none (heads saved before 2026-12-05, or from a model without float LM-head weights) or is unreadable."""
    from safetensors import safe_open
    try:
        with safe_open(str(weights), framework="pt") as f:
            if SKETCH_KEY not in f.keys():
                return None
            sketch = f.get_tensor(SKETCH_KEY).float()
    except Exception:          # a damaged file is named by the full read that follows, or by the mismatch
        return None
    return sketch_distance(sketch, target)


def trained_model(cfg: HeadsConfig) -> str | None:
    """The --model that `amphista train` recorded for heads it wrote (None for heads from elsewhere)."""
    training = cfg.extra.get("training")
    model = training.get("model") if isinstance(training, dict) else None
    return model if isinstance(model, str) and model else None


def load_heads(path, target, device=None, dtype=None, num_heads: int | None = None,
               target_name: str | None = None) -> DraftHeads:
    """Loads a heads directory (or its config.json / model.safetensors) for `target`, bound to it.

    Defaults to the target's device and dtype. Heads built for another target raise HeadsMismatchError, naming the
    model the heads were trained with (where `train` recorded it) and `target_name` (what the target was loaded as).
    """
    from safetensors.torch import load_file

    directory, cfg = read_heads_config(path)
    weights = directory / "model.safetensors"
    fp, tc = lm_head_fingerprint(target), target.config
    same_shape = (cfg.dim, cfg.vocab_size) == (tc.dim, tc.vocab_size)
    distance = None
    if same_shape and cfg.target_fingerprint and cfg.target_fingerprint != fp:
        distance = _copy_distance(weights, target)
        if distance is not None and distance <= SKETCH_TOLERANCE:
            warnings.warn(f"heads in {directory} were trained with an LM head that this model's differs from by "
                          f"{distance:.1%} (relative L2 over {SKETCH_ROWS} rows): a converted or quantized copy of "
                          "their model, taken for it; output is the same (the model verifies every drafted token), "
                          "the heads may accept fewer tokens than on the model they were trained with", stacklevel=2)
            fp = cfg.target_fingerprint
    if not same_shape or (cfg.target_fingerprint and cfg.target_fingerprint != fp):
        # the fingerprints alone do not tell a user which model to pass: name the models where they are known
        trained = trained_model(cfg)
        raise HeadsMismatchError(
            f"heads in {directory} were built for another target"
            + (f" (trained with --model {trained})" if trained else "")
            + f": theirs has LM-head fingerprint {cfg.target_fingerprint or '(none)'} (d={cfg.dim}, "
            f"V={cfg.vocab_size}), the loaded model" + (f" {target_name}" if target_name else "")
            + f" has {fp} (d={tc.dim}, V={tc.vocab_size}); load them with the model they were trained for, or "
            f"train heads for this one"
            # same shapes: maybe the very model in another file (a quantized or fp16 GGUF of it); such a copy loads
            # (above) where the heads keep LM-head rows to compare, else only the exact values do
            + ((f" (this model's LM-head rows differ from theirs by {distance:.0%}, relative L2: not a converted or "
                f"quantized copy of their model)" if distance is not None else
                " (these heads keep no LM-head rows to tell a converted or quantized copy of their model from another "
                "model, so only the exact model counts: distill and train with the file you decode with)")
               if same_shape else ""))
    if num_heads is not None and num_heads != cfg.num_heads:
        raise ConfigError(f"heads in {directory} have {cfg.num_heads} heads, {num_heads} were requested")
    # the model's device and dtype (its embedding and LM head weights may be meta tensors: cpu_quant)
    device = torch.device(device) if device is not None else target.device
    dtype = _dtype(dtype or target.tok_embeddings.weight.dtype)
    try:
        with open(weights, "rb"):   # safetensors says "No such file or directory" for a file it may not read
            pass
        state = load_file(str(weights))
    except OSError as e:
        raise ModelLoadError(f"cannot read {weights}: {e.strerror or e}") from None
    except Exception as e:   # safetensors raises its own error types for truncated/corrupt files
        raise ModelLoadError(f"cannot read {weights}: {e}: truncated or corrupt file?") from None
    sketch = state.pop(SKETCH_KEY, None)
    records = [k for k, rec in cfg.extra.items() if fitted_prefix(k) and isinstance(rec, dict)]
    if records:
        # trees fitted to other weights (a model.safetensors replaced since tree-search --save) are not offered, and
        # speculative="auto" does not weigh their taus; the others are stamped with these weights (in memory), so a
        # save of these heads after more training drops them (save_heads)
        stamp = weights_stamp(state)
        drop_fitted(cfg.extra, stale_prefixes(cfg.extra, stamp),
                    why=f"{weights} holds other weights than those they were fitted to")
        for k in records:
            if k in cfg.extra:
                cfg.extra[k].setdefault(WEIGHTS_KEY, stamp)
    with torch.device("meta"):
        heads = build_heads(cfg)
    heads = _assign(heads, state, weights, device, dtype).bind(target)
    if sketch is not None and sketch.shape == (min(cfg.vocab_size, SKETCH_ROWS), cfg.dim):
        setattr(heads, KEPT_SKETCH, sketch.float().contiguous())
    return heads


_MEDUSA_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


def load_medusa_checkpoint(path, target, device=None, dtype=None, num_heads: int | None = None) -> MedusaHeads:
    """Public Medusa heads (FasterDecoding/Medusa `medusa_lm_head.pt`, or its directory) as MedusaHeads.

    Layout: medusa_head[k] = Sequential(ResBlock * layers, Linear(d, V, bias=False)), so keys are
    `{k}.{j}.linear.weight|bias` (j < layers) and `{k}.{layers}.weight`. num_heads keeps the first heads.
    """
    path = Path(path).expanduser()
    file = path / "medusa_lm_head.pt" if path.is_dir() else path
    if not file.is_file():
        raise ModelLoadError(f"Medusa heads file not found: {file}")
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot read {file} as a Medusa heads checkpoint: {e}") from None
    sd = {k.removeprefix("medusa_head."): v for k, v in sd.items()} if isinstance(sd, dict) else {}
    parsed = {k: _MEDUSA_KEY.match(k) for k in sd}
    if not sd or not all(parsed.values()):
        bad = [k for k, m in parsed.items() if not m][:5]
        raise ConfigError(f"{file} is not in the Medusa medusa_lm_head.pt layout (unexpected keys: {bad})")
    K_all = 1 + max(int(m.group(1)) for m in parsed.values())
    layers = sum(1 for k in sd if k.startswith("0.") and k.endswith(".linear.weight"))
    K = num_heads or K_all
    if not 1 <= K <= K_all:
        raise ConfigError(f"{file} has {K_all} Medusa heads, {num_heads} were requested")
    per_head_lm = all(f"{k}.{layers}.weight" in sd for k in range(K))
    if not layers and not per_head_lm:
        raise ConfigError(f"{file} holds neither ResBlocks nor LM heads")
    bias = "0.0.linear.bias" in sd
    ref = sd[f"0.{layers}.weight"] if per_head_lm else sd["0.0.linear.weight"]
    d, V = ref.shape[1], (ref.shape[0] if per_head_lm else target.config.vocab_size)
    fp, tc = lm_head_fingerprint(target), target.config
    if (d, V) != (tc.dim, tc.vocab_size):
        raise HeadsMismatchError(f"Medusa heads in {file} are for d={d}, V={V} (public checkpoint, no "
                                 f"fingerprint), the loaded model has {fp} (d={tc.dim}, V={tc.vocab_size})")
    cfg = HeadsConfig.for_target(tc, kind="medusa", num_heads=K, medusa_layers=layers, resblock_bias=bias,
                                 per_head_lm_head=per_head_lm, target_fingerprint=fp)

    def stacked(name, shape):   # [layers, K, ...] from {k}.{j}.{name}
        if not layers:
            return torch.zeros(0, K, *shape)
        return torch.stack([torch.stack([sd[f"{k}.{j}.{name}"] for k in range(K)]) for j in range(layers)])

    try:
        state = {"res.weight": stacked("linear.weight", (d, d))}
        if bias:
            state["res.bias"] = stacked("linear.bias", (d,))
        if per_head_lm:
            state["lm_heads"] = torch.stack([sd[f"{k}.{layers}.weight"] for k in range(K)])
    except (KeyError, RuntimeError) as e:
        raise ConfigError(f"{file}: Medusa heads are inconsistent ({e})") from None
    with torch.device("meta"):
        heads = MedusaHeads(cfg)
    # the model's device and dtype (its embedding and LM head weights may be meta tensors: cpu_quant)
    return _assign(heads, state, file, torch.device(device) if device is not None else target.device,
                   _dtype(dtype or target.tok_embeddings.weight.dtype)).bind(target)
