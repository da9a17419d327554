"""Heads trained by us and shipped inside the package, and how the CLI picks which heads to use."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from .errors import AmphistaError, InputError, ModelLoadError

DATA = Path(__file__).parent / "data" / "heads"
# model alias -> its shipped heads, by method; directories hold config.json + model.safetensors
SHIPPED = {"smollm2-135m": {"amphista": DATA / "smollm2-135m-amphista", "medusa": DATA / "smollm2-135m-medusa"}}


_HEAD_BYTES = 4 << 20       # the GGUF header (metadata with the tokenizer, the tensor table) lies in it
_STRIDE, _BLOCK = 32 << 10, 4 << 10


def _content_print(path: Path, size: int) -> str:
    """sha256 of a model file's first 4 MiB and of a 4 KiB block every 32 KiB after it: ~20 ms on a 100 MB file
    (the whole file took ~80 ms). With the size it tells a copy of the shipped GGUF from another model: another
    quantisation or conversion differs in size and header; a fine-tune of the same shape in the weights, and every
    tensor over 32 KiB (each matrix) is sampled."""
    import hashlib
    import mmap
    h = hashlib.sha256()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as buf:
        h.update(buf[:_HEAD_BYTES])
        for at in range(_HEAD_BYTES, size, _STRIDE):
            h.update(buf[at:at + _BLOCK])
        h.update(buf[max(0, size - _BLOCK):])
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _cached_print(path: str, size: int, mtime_ns: int, ino: int) -> str:
    return _content_print(Path(path), size)


def _file_print(path: Path) -> tuple[int, str] | None:
    """(size, content print) of a file; cached per path and stat, as the shipped file is compared each time."""
    try:
        st = os.stat(path)
        return st.st_size, _cached_print(str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    except (OSError, ValueError):       # unreadable, or mmap of an empty file
        return None


def _same_content(path: Path, shipped: Path) -> bool:
    """Whether `path` is a copy of the shipped model file: the size first (a stat, no read), then the print."""
    try:
        if os.path.getsize(path) != os.path.getsize(shipped):
            return False
    except OSError:
        return False
    mine, theirs = _file_print(path), _file_print(shipped)
    return mine is not None and mine == theirs


def _alias_of(model) -> str:
    """The alias whose shipped file `model` is (the SmolLM2 GGUF given by its path, a link to it, a copy of it, a
    folder holding it alone, as the loader takes them), else str(model)."""
    key = str(model)
    if key in SHIPPED:
        return key
    from .loading import _lone_gguf, resolve_model_path
    try:
        path = Path(key).expanduser()
        if path.is_dir() and not (path / "config.json").exists():
            path = _lone_gguf(path)
        if not path.is_file():
            return key
    except (AmphistaError, OSError, ValueError):   # no model there: named by the load
        return key
    for alias in SHIPPED:
        try:
            shipped = resolve_model_path(alias)
            # a copy (cp to ~/models) is the same model: its heads are the shipped ones
            if os.path.samefile(path, shipped) or _same_content(path, shipped):
                return alias
        except (AmphistaError, OSError):    # the alias's package is not installed: no match
            continue
    return key


def shipped_heads(model: str, method: str) -> Path | None:
    path = SHIPPED.get(_alias_of(model), {}).get(method)
    return path if path is not None and (path / "config.json").is_file() else None


def shipped_names() -> dict[str, Path]:
    """Every shipped heads directory by its name ("smollm2-135m-amphista", "smollm2-135m-medusa")."""
    return {p.name: p for methods in SHIPPED.values() for p in methods.values()}


def _no_shipped(model, method: str | None, flag: str | None, model_error: str | None = None) -> InputError:
    """`default` where nothing is shipped for `model`: one message for every command (and the Python API). A model
    that is not found (a typo'd alias) is said to be the problem: "pass --heads DIR" was the wrong advice there."""
    if flag is None:
        return InputError(f"no {method or 'drafting'} heads are shipped for {str(model)!r}; pass a heads directory")
    what = f"no {method or 'drafting'} heads are shipped for model {str(model)!r} ({flag} default)"
    if model_error:
        return InputError(f"{what}: the model itself is not found: {model_error}")
    return InputError(f"{what}; pass {flag} DIR (a heads directory)")


def _model_error(model) -> str | None:
    """Why `model` names no model (as loading would say it), or None where it resolves (or is no name: a loaded
    target given by the caller)."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    from .loading import resolve_model_path
    try:
        resolve_model_path(model)
    except AmphistaError as e:
        return str(e)
    return None


def _not_found(heads: str, flag: str | None) -> AmphistaError:
    """A heads name that is neither a path nor a shipped name: a near miss of one is named (a typo'd alias said
    only "heads path not found"), else the forms that are taken."""
    import difflib
    names = list(shipped_names())
    words = [w for w in names + ["default", "none"] if w != heads]
    close = difflib.get_close_matches(heads.strip().lower(), words, n=1, cutoff=0.75)
    hint = (f"; did you mean {close[0]!r}?" if close else
            f" (pass a heads directory, 'default' for the heads shipped for the model, or a shipped heads name: "
            f"{', '.join(names)})")
    from .text_files import missing_note
    expanded = Path(heads).expanduser()
    shown = f"{heads} ({expanded})" if str(expanded) != heads else heads
    return ModelLoadError(f"{flag + ': ' if flag else ''}heads path not found: {shown}{missing_note(expanded)}{hint}")


def _bare_name(text: str) -> bool:
    """A name with no directory part (smollm2-135m-medusaa, defualt): meant as an alias, not a path."""
    return not any(sep in text for sep in ("/", "\\", os.sep)) and not text.startswith((".", "~"))


def heads_alias(heads, model: str):
    """"default" (the Amphista heads shipped for `model`) or a shipped directory's name (e.g.
    "smollm2-135m-medusa") -> its path; anything else, or a name that is also an existing path, unchanged. A bare
    name that is neither (a typo'd alias) is refused here, with the near miss named; a missing path with a directory
    part is left for load_heads to name."""
    if isinstance(heads, str) and not heads.strip():     # Path("") is the working directory
        raise InputError("heads is an empty string; pass a heads directory or \"default\"")
    if not isinstance(heads, str) or Path(heads).exists():
        return heads
    if heads == "default":
        path = shipped_heads(model, "amphista")
        if path is None:
            raise _no_shipped(model, None, None)
        return path
    named = shipped_names()
    if heads in named:
        return named[heads]
    if _bare_name(heads):
        raise _not_found(heads, None)
    return heads


def heads_dir(heads, model, flag: str, method: str = "amphista", none: str | None = None,
              missing_ok: bool = False) -> Path:
    """A heads flag's value as the heads directory it names, checked before any model loads, the same way for
    every command: an existing path (made absolute, so that a resumed run compares directories, not spellings),
    "default" (the `method` heads shipped for `model`), or a shipped directory's name. "none" is refused with
    `none` (why the command needs heads), where the caller did not take it already. missing_ok: a missing path
    with a directory part comes back as given (the caller names it later); a bare name is still refused."""
    if not isinstance(heads, (str, os.PathLike)):
        raise InputError(f"{flag} must be a heads directory, 'default' or a shipped heads name, got "
                         f"{type(heads).__name__} {heads!r:.80}")
    text = os.fspath(heads)
    if not text.strip():
        raise InputError(f"{flag} is empty; pass a heads directory or 'default'")
    path = Path(text).expanduser()
    if path.exists():
        return Path(os.path.abspath(path))       # symlinks kept: the path a user gave is the one reports name
    if text == "none":
        raise InputError(f"{flag} none: {none or 'this command needs drafting heads'}")
    if text == "default":
        found = shipped_heads(model, method)
        if found is None:
            raise _no_shipped(model, method, flag, _model_error(model))
        return found
    named = shipped_names()
    if text in named:
        return named[text]
    if missing_ok and not _bare_name(text):
        return path
    raise _not_found(text, flag)


def check_lookup_heads(heads) -> None:
    """--heads beside --speculative lookup, which drafts from the text itself: only the default (nothing asked) is
    taken; a heads directory or name would be loaded for nothing, and none asks for plain decoding."""
    if heads != "default":
        raise InputError(f"--heads {heads} does not go with --speculative lookup: prompt lookup drafts from the "
                         f"prompt and answer themselves and loads no heads; drop --heads"
                         + (" (or give --speculative none for plain decoding)" if heads == "none" else ""))


def resolve_heads(engine, heads: str, speculative: str) -> str | None:
    """Load the heads the CLI flags ask for; returns the speculative method to run, or None for plain."""
    if speculative == "lookup":
        check_lookup_heads(heads)
        return "lookup"
    if heads not in ("default", "none") or Path(heads).exists():     # a path wins over the words, as in heads_alias
        heads = str(heads_dir(heads, engine.loaded_name, "--heads"))
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
                raise _no_shipped(engine.loaded_name, method, "--heads")
            print(f"note: no drafting heads shipped for {engine.loaded_name!r}; plain decoding", file=sys.stderr)
            return None
        heads = str(path)
    loaded = engine.load_heads(heads)
    kind = loaded.config.kind
    if speculative not in ("auto", kind):
        raise InputError(f"--speculative {speculative} but the heads in {heads} are {kind} heads")
    return kind
