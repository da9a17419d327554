"""Heads trained by us and shipped inside the package, and how the CLI picks which heads to use."""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import AmphistaError, InputError

DATA = Path(__file__).parent / "data" / "heads"
# model alias -> its shipped heads, by method; directories hold config.json + model.safetensors
SHIPPED = {"smollm2-135m": {"amphista": DATA / "smollm2-135m-amphista", "medusa": DATA / "smollm2-135m-medusa"}}


def _alias_of(model) -> str:
    """The alias whose shipped file `model` is (the SmolLM2 GGUF given by its path), else str(model)."""
    key = str(model)
    if key in SHIPPED or not key.endswith(".gguf"):
        return key
    from .loading import resolve_model_path
    for alias in SHIPPED:
        try:
            if Path(key).expanduser().resolve() == resolve_model_path(alias).resolve():
                return alias
        except (AmphistaError, OSError):    # the alias's package is not installed: no match
            continue
    return key


def shipped_heads(model: str, method: str) -> Path | None:
    path = SHIPPED.get(_alias_of(model), {}).get(method)
    return path if path is not None and (path / "config.json").is_file() else None


def heads_alias(heads, model: str):
    """"default" (the Amphista heads shipped for `model`) or a shipped directory's name (e.g.
    "smollm2-135m-medusa") -> its path; anything else, or a name that is also an existing path, unchanged."""
    if isinstance(heads, str) and not heads.strip():     # Path("") is the working directory
        raise InputError("heads is an empty string; pass a heads directory or \"default\"")
    if not isinstance(heads, str) or Path(heads).exists():
        return heads
    if heads == "default":
        path = shipped_heads(model, "amphista")
        if path is None:
            raise InputError(f"no drafting heads are shipped for {model!r}; pass a heads directory")
        return path
    named = {p.name: p for methods in SHIPPED.values() for p in methods.values()}
    return named.get(heads, heads)


def resolve_heads(engine, heads: str, speculative: str) -> str | None:
    """Load the heads the CLI flags ask for; returns the speculative method to run, or None for plain."""
    if heads == "none" and speculative not in ("auto", "none"):
        raise InputError(f"--speculative {speculative} needs drafting heads, but --heads none loads none; "
                         f"drop --heads none (shipped heads) or pass --heads DIR")
    if speculative == "none" or heads == "none":
        return None
    if heads == "default":
        method = "amphista" if speculative == "auto" else speculative
        path = shipped_heads(engine.loaded_name, method)
        if path is None:
            if speculative != "auto":
                raise InputError(f"no {method} heads are shipped for {engine.loaded_name!r}; pass --heads DIR")
            print(f"note: no drafting heads shipped for {engine.loaded_name!r}; plain decoding", file=sys.stderr)
            return None
        heads = str(path)
    loaded = engine.load_heads(heads)
    kind = loaded.config.kind
    if speculative not in ("auto", kind):
        raise InputError(f"--speculative {speculative} but the heads in {heads} are {kind} heads")
    return kind
