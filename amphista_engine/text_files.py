"""Reading the text files users hand the CLI (prompt files, question files): UTF-8 only, refused by name."""
from __future__ import annotations

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
