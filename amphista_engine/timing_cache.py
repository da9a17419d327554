"""Measurements kept between processes, so a machine pays for each once: the CPU's plain and tree step times
(speculation_check.py) and, on a GPU, which GEMM runs each routed product (kernels/linear_choice.py). One JSON
file each, in $AMPHISTA_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, under amphista-engine/;
AMPHISTA_CACHE_DIR=off (or 0 / false / no / none) measures in every process; =on (1 / true / yes) is the
default place. Every entry's key says what it was measured on."""
from __future__ import annotations

import json
import os
from pathlib import Path

try:
    import fcntl
except ImportError:                      # Windows: writers are not serialised (a lost entry is measured again)
    fcntl = None

CACHE_ENV = "AMPHISTA_CACHE_DIR"


def path(name: str) -> Path | None:
    """The file `name` in the cache directory; None when AMPHISTA_CACHE_DIR=off, or there is no home to keep it in."""
    # imported here: read() and write() stay loadable from this file alone (a test's writer processes do that)
    from .env_settings import OFF_WORDS, ON_WORDS, env_text
    where = env_text(CACHE_ENV)
    if where.lower() in (*OFF_WORDS, "none"):
        return None
    if where.lower() in ON_WORDS:      # a switch word, not a folder: ./on or ./1 was never what was meant
        where = ""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        if where:
            base = Path(where)
        else:      # a relative XDG_CACHE_HOME is invalid (XDG spec): not a folder wherever the process started
            base = Path(xdg if os.path.isabs(xdg) else Path.home() / ".cache") / "amphista-engine"
        return base.expanduser() / name
    except RuntimeError:     # no HOME and no passwd entry (a container's arbitrary uid): nowhere to keep them
        return None


def read(file: Path) -> dict:
    """The file's entries; {} when there is none yet, or it is unreadable or not ours (measured again, and
    rewritten)."""
    try:
        entries = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):      # RecursionError: JSON nested too deep to parse
        return {}
    return entries if isinstance(entries, dict) else {}


def write(file: Path, entries: dict) -> None:
    """Adds `entries` to the file, keeping what other processes wrote since it was read. Best effort: a
    read-only or full disk costs the next process a measurement, nothing more."""
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        # Two writers reading the same old file would each drop the other's new entries: one at a time
        with open(file.with_name(f"{file.name}.lock"), "a") as lock:
            try:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
            except OSError:                  # a file system without locks: written unserialised, as before
                pass
            merged = {**read(file), **entries}
            tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
            os.replace(tmp, file)        # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        try:
            tmp.unlink(missing_ok=True)      # not one stray file per process (the file's name taken by a folder)
        except OSError:
            pass
