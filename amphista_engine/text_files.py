"""Reading the text files users hand the CLI (prompt files, question files): UTF-8 only, refused by name. Also the
paths they hand it: `~` expanded as a shell expands it, and output paths checked before the work that fills them."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError


def read_utf8(path: Path, line_in_name: bool = False) -> str:
    """The file's text; a file that is not UTF-8 is an InputError naming the first bad byte. line_in_name:
    name it PATH:LINE, as line-by-line (JSONL) readers name their other errors."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f"{path}:{line}" if line_in_name else str(path)
        raise InputError(f"{where}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}: {e.reason}); "
                         f"re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def user_path(path):
    """`path` with a leading `~` expanded, as a shell expands it (None stays None). The shell leaves `--out=~/x`
    and a quoted "~/x" alone: as typed they made a folder named `~` in the working directory."""
    if path is None:
        return None
    text = os.fspath(path)
    return os.path.expanduser(text) if text.startswith("~") else text


def missing_note(path) -> str:
    """Why a path that does not exist is missing where that is not plain: a symbolic link whose target is gone."""
    path = Path(path)
    if path.is_symlink():
        try:
            return f" (a symbolic link to {os.readlink(path)}, which does not exist)"
        except OSError:
            pass
    return ""


def check_out_path(flag: str, path, folder: bool) -> Path:
    """An output path (`path` as the user gave it, `~` expanded), checked before the (slow) work whose results it
    takes: folder=True a folder (made later, or already there), else a file. A parent that is a file, or a folder
    this process cannot write to, is an InputError naming the flag and the path: such an --out failed after the
    load, the timing or the training, with an OSError naming part of it ("File exists: afile") or, where
    safetensors wrote it, a traceback. A file where a folder is wanted, or the reverse, is left to the command,
    which names what it writes there."""
    if os.fspath(path) == "":      # Path("") is ".": the working folder was taken as the file or folder named
        raise InputError(f"{flag} is an empty path; give the {'folder' if folder else 'file'} to write")
    p = Path(user_path(path))
    from . import shipped_heads
    # distill's shard, eval-tau's and tree-search's JSON went into the shipped heads (or the package's data) as
    # into any folder: `pip install` owns those files, and the heads' loader reads that folder
    for package in (shipped_heads.DATA, Path(__file__).resolve().parent / "data"):
        if p.resolve().is_relative_to(Path(package).resolve()):
            raise InputError(f"{flag} {path} is inside the package's shipped heads and data ({package}): write "
                             f"{'them' if folder else 'it'} to a folder of your own")
    if p.exists() and p.is_dir() != folder:
        return p            # each command names that in its own words (what it writes there)
    anchor = p if folder else p.parent
    # worded as the OS's error that would have come later ("Not a directory: PATH"), then what is wrong where
    while not anchor.exists() and anchor != anchor.parent:     # the folders to be made: their first existing parent
        if anchor.is_symlink():
            raise InputError(f"No such file or directory: {path} ({flag}: {anchor} is a symbolic link to "
                             f"{os.readlink(anchor)}, which does not exist)")
        anchor = anchor.parent
    if not anchor.is_dir():
        raise InputError(f"Not a directory: {path} ({flag}: {anchor} is a file, not a folder)")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise InputError(f"Permission denied: {path} ({flag}: the folder {anchor} is not writable)")
    if not folder and p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"Permission denied: {path} ({flag}: the file is not writable)")
    return p
