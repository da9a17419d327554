"""Spec-Bench-format question files: one JSON object per line with question_id, category and turns."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import InputError
from ..text_files import read_utf8, user_path


def read_questions(path, categories=None, limit: int | None = None, per_category: int | None = None) -> list[dict]:
    """Questions in file order, filtered to `categories` (names from the file), then the first `per_category`
    of each category (a balanced subset: MT-Bench files are sorted by category), then the first `limit`.

    Every problem names the file and line, so a hand-edited benchmark file is quick to fix.
    """
    path = Path(user_path(path))          # "~/q.jsonl" from Python, as a shell would expand it
    if path.is_dir():       # "not found" would send the user looking for a path that is there
        raise InputError(f"questions file {path} is a directory; give the Spec-Bench-format JSONL file")
    if not path.is_file():
        raise InputError(f"questions file not found: {path}")
    text = read_utf8(path, line_in_name=True).removeprefix("\ufeff")   # a byte order mark (Notepad) is no JSON
    if not text.strip():    # said as such: "no questions" or a line-1 complaint reads as a format problem
        raise InputError(f"questions file {path} is empty{' (only blank lines)' if text else ''}; give a Spec-Bench-"
                         "format JSONL file, one question per line with question_id, category and turns")
    questions, seen = [], {}
    # split on "\n" only: splitlines() would also break at control characters inside JSON strings
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not a valid JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(q, dict):
            raise InputError(f"{path}:{n}: expected a JSON object, got {type(q).__name__}")
        missing = [k for k in ("question_id", "category", "turns") if k not in q]
        if missing:
            raise InputError(f"{path}:{n}: question lacks {', '.join(missing)} "
                             "(Spec-Bench format: question_id, category, turns)")
        turns = q["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise InputError(f"{path}:{n}: 'turns' must be a non-empty list of non-empty strings")
        if not isinstance(q["category"], str) or not q["category"]:
            raise InputError(f"{path}:{n}: 'category' must be a non-empty string")
        qid = q["question_id"]
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise InputError(f"{path}:{n}: 'question_id' must be an integer or a string, got {qid!r}")
        if qid in seen:    # answers are keyed by question id, so a duplicate would be silently skipped
            raise InputError(f"{path}:{n}: duplicate question_id {qid!r} (first on line {seen[qid]})")
        seen[qid] = n
        questions.append({"question_id": qid, "category": q["category"], "turns": turns})
    if not questions:
        raise InputError(f"no questions in {path}")

    if categories:
        wanted = [c.strip() for c in (categories.split(",") if isinstance(categories, str) else categories)]
        wanted = [c for c in wanted if c]
        known = sorted({q["category"] for q in questions})
        if not wanted:      # "," or " ": filtering by it kept no question, and a 0-question run passed as complete
            raise InputError(f"--categories {categories!r} names no category; {path.name} has: {', '.join(known)}")
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise InputError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}; "
                             f"{path.name} has: {', '.join(known)}")
        questions = [q for q in questions if q["category"] in wanted]
    if per_category is not None:
        if per_category < 1:
            raise InputError(f"--per-category must be a positive integer, got {per_category}")
        taken: dict[str, int] = {}
        kept = []
        for q in questions:
            if taken.get(q["category"], 0) < per_category:
                taken[q["category"]] = taken.get(q["category"], 0) + 1
                kept.append(q)
        questions = kept
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be a positive integer, got {limit}")
        questions = questions[:limit]
    return questions


def question_digest(question: dict) -> str:
    """A digest of what a question asks (category and turns): answers kept in an --out are reused only for the
    question they answered, not for an edited one under the same question_id (or another file's)."""
    text = json.dumps([question["category"], question["turns"]], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
