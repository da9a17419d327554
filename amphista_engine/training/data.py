"""Distillation data I/O: prompt files in, an append-only JSONL shard out, and the shard read back for training.

Shard records (one JSON object per line): {"id", "source", "prompt", "prompt_ids", "answer_ids", "answer",
"finish_reason", "max_new_tokens", "target_fingerprint"}. `prompt_ids` is the chat-formatted prompt as the target saw
it; `answer_ids` the target's greedy answer without the EOS token (`finish_reason` says whether it ended on EOS or on
the length limit, `max_new_tokens`, absent in shards written before 2026-12-04, what that limit was; sampled answers
also carry `temperature` and `top_p`). `target_fingerprint` (heads.lm_head_fingerprint of the model that wrote the
record; absent in older shards, the committed ones among them) ties the ids to their tokenizer and distribution.

Crash safety: every record is written with ONE os.write of the whole line (newline included), then flushed and
fsynced. A run killed mid-write can leave at most a partial last line, with no newline; `ShardWriter` trims it on
start (the record is regenerated), so a shard never holds a duplicated or truncated record.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import sys
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import InputError
from ..text_files import read_utf8, user_path

EVAL_NAMES = ("mt_bench", "mt-bench", "spec_bench", "spec-bench", "question.jsonl")


OOV = "token id out of the target's vocabulary"     # a skip reason

SAMPLE_SEP = "#"     # `distill --samples`: answer k of prompt ID is record ID#s{k}


def prompt_id(record_id: str) -> str:
    """The prompt a record answers (sampled answers of one prompt share it)."""
    return record_id.split(SAMPLE_SEP)[0]


@dataclass
class Prompt:
    id: str
    source: str
    prompt: str


EVAL_HASHES = Path(__file__).resolve().parent.parent / "data" / "eval_prompt_hashes.txt"


def eval_prompt_key(text: str) -> str:
    """A prompt's key for the evaluation check: case and runs of whitespace do not hide a copied question."""
    return hashlib.sha1(re.sub(r"\s+", " ", text).strip().lower().encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def _eval_keys() -> frozenset[str]:
    return frozenset(line.strip() for line in EVAL_HASHES.read_text().splitlines()
                     if line.strip() and not line.startswith("#"))


def write_eval_prompt_hashes(questions, out=EVAL_HASHES):
    """Rebuilds the packaged keys from a Spec-Bench-format question file (every turn of every question)."""
    keys = sorted({eval_prompt_key(t) for line in Path(questions).read_text().splitlines() if line.strip()
                   for t in json.loads(line)["turns"]})
    head = [line for line in Path(out).read_text().splitlines() if line.startswith("#")] if Path(out).exists() else []
    Path(out).write_text("\n".join(head + keys) + "\n")
    _eval_keys.cache_clear()


def refuse_eval_prompts(where, items):
    """items: (id, prompt text). Evaluation questions (MT-Bench, by content) must never become training data,
    whatever file or format they arrive in."""
    keys = _eval_keys()
    hits = [i for i, text in items if isinstance(text, str) and eval_prompt_key(text) in keys]
    if hits:
        raise InputError(f"{where}: {len(hits)} prompt(s) are MT-Bench evaluation questions (first: id {hits[0]}): "
                         f"never train on evaluation data; remove them")


def prompt_text_decoder(tokenizer):
    """ids -> the user's prompt text inside a chat-formatted prompt (prompt_ids as `distill` writes them), for
    the evaluation-question check of records that carry no prompt text: the hashed keys are of the bare question,
    so the template's text around the message (found by rendering a placeholder) is cut off."""
    from ..chat import render_chat
    mark = "\x00PROMPT\x00"
    try:
        tpl = render_chat(tokenizer, mark) if tokenizer.chat_template else mark
    except Exception:      # noqa: BLE001 -- a template that cannot render: the whole decoded text is checked
        tpl = mark
    pre, _, post = tpl.partition(mark)
    # only the user header's line and the end-of-turn line: a record written with another system prompt still
    # has its question between them
    head = pre.splitlines(keepends=True)[-1] if pre else ""
    tail = post.splitlines(keepends=True)[0] if post else ""

    def text(ids: list[int]) -> str:
        s = tokenizer.decode(ids)
        i = s.rfind(head) if head else -1
        if i < 0:        # no template around it: the bare prompt, after a BOS the encoder may have added
            return tokenizer.decode(ids, skip_special_tokens=True)
        s = s[i + len(head):]
        j = s.rfind(tail) if tail else -1
        return s[:j] if j >= 0 else s
    return text


def _refuse_eval_file(path: Path, first: object):
    name = path.name.lower()
    if any(n in name for n in EVAL_NAMES):
        raise InputError(f"{path} looks like an evaluation file ({path.name}): never train on evaluation data; "
                         f"use ../shared/data/train_prompts.jsonl or a ShareGPT JSON file")
    if isinstance(first, dict) and "turns" in first and "category" in first:
        raise InputError(f"{path} is a Spec-Bench/MT-Bench question file (records have 'turns' and 'category'): "
                         f"evaluation questions must not be used as training prompts")


def _sharegpt(items: list, path: Path) -> list[Prompt]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
            raise InputError(f"{path}: item {i} is not a ShareGPT record with a 'conversations' list")
        base = str(item.get("id", f"sharegpt-{i}"))
        for j, turn in enumerate(item["conversations"]):
            if isinstance(turn, dict) and turn.get("from") in ("human", "user") and str(turn.get("value", "")).strip():
                out.append(Prompt(f"{base}-t{j}", str(item.get("source", "sharegpt")), str(turn["value"])))
    return out


def read_prompts(path, limit: int | None = None, balance_by_source: bool = False, seed: int = 0) -> list[Prompt]:
    """Prompts from a train_prompts.jsonl-style file ({"id","source","prompt"} per line) or ShareGPT JSON
    (a list of {"conversations": [{"from": "human"|"gpt", "value"}]}: every human turn becomes a prompt).

    balance_by_source: shuffle each source (seeded) and take prompts round-robin across sources, so the first N
    prompts are as balanced as the sources allow. Evaluation files (MT-Bench / Spec-Bench) are refused.
    """
    path = Path(user_path(path))          # "~/p.jsonl" from Python, as a shell would expand it
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be a positive integer, got {limit}")
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    # a byte-order mark (Windows editors save "UTF-8" with one) is no JSON: it failed line 1 as malformed, and
    # hid a ShareGPT file's opening '['
    text = read_utf8(path).removeprefix("\ufeff")
    if not text.strip():
        raise InputError(f"prompts file {path} is empty")
    prompts: list[Prompt] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        _refuse_eval_file(path, items[0] if items else None)
        prompts = _sharegpt(items, path)
    else:
        for n, line in enumerate(text.split("\n"), 1):   # not splitlines(): \x1c, \u2028 may sit in strings
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                # the first line not JSON at all: a plain-text prompt list, not a JSONL file with one bad line
                hint = ("; prompt files are JSONL ({\"id\", \"source\", \"prompt\"} per line) or ShareGPT JSON, not "
                        "plain text lines") if not prompts and not line.lstrip().startswith(("{", "[", '"')) else ""
                raise InputError(f"{path}:{n}: malformed JSON line ({e}){hint}") from None
            if n == 1 or not prompts:
                _refuse_eval_file(path, rec)
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise InputError(f"{path}:{n}: expected an object with a string 'prompt' "
                                 f"(and 'id', 'source'), got {str(rec)[:80]!r}")
            if "turns" in rec and "category" in rec:
                _refuse_eval_file(path, rec)
            if rec["prompt"].strip():
                prompts.append(Prompt(str(rec.get("id", f"{path.stem}-{n}")), str(rec.get("source", "unknown")),
                                      rec["prompt"]))
    if not prompts:
        raise InputError(f"no prompts found in {path}")
    refuse_eval_prompts(path, ((p.id, p.prompt) for p in prompts))
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        first = next(i for i in ids if i in seen or seen.add(i))
        raise InputError(f"{path}: prompt ids are not unique (the shard resumes by id): id {first!r} names "
                         f"{ids.count(first)} prompts")
    if balance_by_source:
        rng = random.Random(seed)
        by: dict[str, list[Prompt]] = defaultdict(list)
        for p in prompts:
            by[p.source].append(p)
        queues = [by[s] for s in sorted(by)]
        for q in queues:
            rng.shuffle(q)
        prompts = []
        while any(queues):
            for q in queues:
                if q:
                    prompts.append(q.pop())
    return prompts if limit is None else prompts[:limit]


def prompt_digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class ShardWriter:
    """Append-only JSONL shard: trims a partial last line on open, knows the ids already written."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ids: set[str] = set()
        self.max_new_tokens: set[int] = set()    # the answer budgets its records were written with (where recorded)
        self.targets: set[str] = set()           # the target fingerprints its records name (where recorded)
        # id -> a digest of the prompt text its record answers (where recorded): an id reused by another prompt
        # file for another prompt must not pass for that prompt's answer (distill refuses it)
        self.prompts: dict[str, str] = {}
        self.trimmed = 0          # bytes of a partial last record removed on open
        self.bad_lines = 0
        if self.path.exists():
            self._recover()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _recover(self):
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1          # everything after the last newline is a partial record
        if end < len(data):
            self.trimmed = len(data) - end
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            print(f"distill: removed a truncated last record ({self.trimmed} bytes) from {self.path}",
                  file=sys.stderr)
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.ids.add(str(rec["id"]))
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                self.bad_lines += 1
                continue
            if not isinstance(rec.get("answer_ids"), list):
                # a prompt file given as --out: its ids would pass for answered prompts, and answers would be
                # appended to it
                raise InputError(f"{self.path} holds records that are not distill answers (id {rec['id']} has no "
                                 f"'answer_ids'): is it a prompt file? give --out a new or distilled JSONL shard")
            if isinstance(rec.get("max_new_tokens"), int):
                self.max_new_tokens.add(rec["max_new_tokens"])
            if isinstance(rec.get("target_fingerprint"), str):
                self.targets.add(rec["target_fingerprint"])
            if isinstance(rec.get("prompt"), str):
                self.prompts[str(rec["id"])] = prompt_digest(rec["prompt"])

    def write(self, record: dict):
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        n = os.write(self.fd, line)           # O_APPEND: one write lands the whole line at the end
        while n < len(line):                  # a short write (rare; e.g. a full disk) finishes the same line
            n += os.write(self.fd, line[n:])
        os.fsync(self.fd)
        self.ids.add(str(record["id"]))
        if isinstance(record.get("prompt"), str):
            self.prompts[str(record["id"])] = prompt_digest(record["prompt"])

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class Sequence:
    id: str
    ids: list[int]          # prompt_ids + answer_ids
    prompt_len: int
    source: str = ""        # the prompt's source (train_prompts.jsonl's `source`): what --source-weights weighs


@dataclass
class ShardData:
    sequences: list[Sequence] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # records skipped as a duplicate id whose tokens differ from the kept record's: another prompt answered under
    # the same id (prompt files whose ids collide), lost unless the user renames them; (id, its file, kept's file)
    collisions: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.ids) for s in self.sequences)


def load_shard(paths, vocab_size: int, max_len: int, min_answer: int = 2, fingerprint: str | None = None,
               prompt_text=None) -> ShardData:
    """Reads one or more shards for training. Bad records are skipped and counted by reason (never a crash
    mid-training); a file with no usable record is an InputError.

    fingerprint: the loaded target's lm_head_fingerprint; a record naming another target is an InputError (its ids
    belong to another tokenizer). prompt_text: ids -> text (prompt_text_decoder), so that records without prompt
    text are checked against the evaluation questions too."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out, seen = ShardData(), {}
    for path in (Path(user_path(p)) for p in paths):
        if not path.is_file():
            raise InputError(f"training data not found: {path}")
        try:
            _read_records(path, vocab_size, max_len, min_answer, out, seen, fingerprint, prompt_text)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise InputError(f"{path}: not a readable gzip file ({e}); shards are JSONL, optionally gzipped") from None
    if not out.sequences:
        why = ", ".join(f"{k}: {v}" for k, v in out.skipped.items()) or "no records"
        if out.skipped.get(OOV):        # every usable-looking record past the vocabulary: another model's ids
            why += (f"; ids at or past this target's vocabulary size {vocab_size} were written by another model's "
                    f"tokenizer: train with the --model that distilled them")
        raise InputError(f"no usable training records in {', '.join(map(str, paths))} ({why})")
    if out.collisions:
        rid, here, there = out.collisions[0]
        print(f"warning: {len(out.collisions)} record(s) skipped as a duplicate id differ from the record kept under "
              f"that id (first: id {rid!r} in {here}; kept: the one in {there}): the ids of two prompt files collide, "
              f"and those answers are not trained on; give the prompts ids unique across files and distill them "
              f"again", file=sys.stderr)
    return out


_TOKENIZER_PROBES = 8      # fingerprint-less records per file whose prompt_ids are decoded against their text


def _squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _read_records(path: Path, vocab_size: int, max_len: int, min_answer: int, out: ShardData, seen: dict,
                  fingerprint: str | None, prompt_text):
    # Records without a target_fingerprint (shards written before it, the committed ones among them) name no
    # target: a shard of another tokenizer whose ids all fall inside this vocabulary trained on garbage without a
    # word. Their prompt text says which tokenizer wrote the ids: a few are decoded with this target's, and a file
    # none of whose probed prompts decode to their own text is refused (any match passes: a tokenizer that
    # normalizes some text must not refuse good data).
    probes = []
    # committed shards are gzipped (benchmarks/results/training_smollm2/distill/); distill writes plain JSONL
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        for raw in f:
            if not raw.strip():
                continue
            if not raw.endswith(b"\n"):
                out.skipped["truncated last line"] += 1
                continue
            rec = None
            try:
                rec = json.loads(raw)
                _refuse_eval_file(path, rec)    # its name and its records' shape, as distill checks a prompt file
                rid, p, a = str(rec["id"]), rec["prompt_ids"], rec["answer_ids"]
                if not (isinstance(p, list) and isinstance(a, list)
                        and all(isinstance(t, int) for t in p) and all(isinstance(t, int) for t in a)):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and "answer_ids" not in rec:
                    # the prompt file itself given as --data: "malformed record: 21070" did not say so
                    out.skipped["a prompt without answer_ids, as in a prompt file: `amphista distill` answers it"] += 1
                else:
                    out.skipped["malformed record"] += 1
                continue
            if rid in seen:
                out.skipped["duplicate id"] += 1
                kept = out.sequences[seen[rid][1]]
                if (kept.prompt_len, kept.ids) != (len(p), p + a):   # not one record read twice (overlapping shards)
                    out.collisions.append((rid, str(path), seen[rid][0]))
                continue
            theirs = rec.get("target_fingerprint")
            if fingerprint and theirs and theirs != fingerprint:
                raise InputError(f"{path}: record {rid} was distilled from another target (LM-head fingerprint "
                                 f"{theirs}; the loaded model has {fingerprint}): its token ids mean other "
                                 f"tokens; train with that --model or distill this one's data")
            text = rec.get("prompt")
            decodable = prompt_text is not None and p and all(0 <= t < vocab_size for t in p)
            if not isinstance(text, str) and decodable:
                text = prompt_text(p)
            elif (decodable and not theirs and len(probes) < _TOKENIZER_PROBES and isinstance(text, str)
                  and _squeezed(text)):
                probes.append((rid, text, _squeezed(text) in _squeezed(prompt_text(p))))
            refuse_eval_prompts(path, [(rid, text)])
            ids = p + a
            if not p or len(a) < min_answer:
                out.skipped["empty prompt or answer"] += 1
            elif any(t < 0 or t >= vocab_size for t in ids):
                out.skipped[OOV] += 1
            elif len(ids) > max_len:
                out.skipped[f"longer than max_seq_len={max_len}"] += 1
            else:
                seen[rid] = (str(path), len(out.sequences))     # its file, and where it is kept
                out.sequences.append(Sequence(rid, ids, len(p), str(rec.get("source") or "")))
    if probes and not any(ok for _, _, ok in probes):
        rid, text, _ = probes[0]
        raise InputError(f"{path}: its records name no target (no target_fingerprint), and the prompt_ids of "
                         f"{len(probes)} of them do not decode to their prompt text with this model's tokenizer "
                         f"(first: record {rid}, prompt {text[:50]!r}): they were distilled by another model, whose "
                         f"token ids mean other tokens here; train with that --model, or distill this one's data")
