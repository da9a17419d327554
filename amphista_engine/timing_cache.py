"""Measurements kept between processes, so a machine pays for each once: the CPU's plain and tree step times
(speculation_check.py) and, on a GPU, which GEMM runs each routed product (kernels/linear_choice.py). One JSON
file each, in $AMPHISTA_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, under amphista-engine/;
AMPHISTA_CACHE_DIR=off measures in every process. Every entry's key says what it was measured on."""
from __future__ import annotations

import json
import os
from pathlib import Path

CACHE_ENV = "AMPHISTA_CACHE_DIR"


def path(name: str) -> Path | None:
    """The file `name` in the cache directory; None when AMPHISTA_CACHE_DIR=off."""
    where = os.environ.get(CACHE_ENV, "").strip()
    if where.lower() in ("off", "0", "none", "false", "no"):
        return None
    if where:
        base = Path(where)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "amphista-engine"
    return base.expanduser() / name


def read(file: Path) -> dict:
    """The file's entries; {} when there is none yet, or it is unreadable or not ours (measured again, and
    rewritten)."""
    try:
        entries = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write(file: Path, entries: dict) -> None:
    """Adds `entries` to the file, keeping what other processes wrote since it was read. Best effort: a
    read-only or full disk costs the next process a measurement, nothing more."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        merged = {**read(file), **entries}
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
        os.replace(tmp, file)            # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass
