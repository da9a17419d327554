"""`amphista eval-tau`: mean tau per category on a Spec-Bench-format question file (first turns, greedy)."""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from ..errors import InputError
from ..evaluation.questions import question_digest, read_questions
from ..heads import weights_digest
from ..text_files import user_path
from ..values import is_int


def eval_tau(questions, heads, model: str = "smollm2-135m", tree=None, max_new_tokens: int = 256,
             limit: int | None = None, out=None, device=None, dtype=None, max_seq_len: int = 2048,
             speculative: str = "auto", engine=None, quiet: bool = False, per_category: int | None = None) -> dict:
    from tqdm import tqdm

    from ..shipped_heads import heads_dir, resolve_heads
    out = user_path(out)
    if out is not None and Path(out).is_dir():
        raise InputError(f"--out {out} is a directory; give the JSON file to write")
    qs = read_questions(questions, None, limit, per_category)       # names a file that is not UTF-8 itself
    _previous_result(out)           # a file --out would overwrite is refused before the load
    if not is_int(max_new_tokens) or max_new_tokens < 1:      # before the (slow) model load
        raise InputError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if engine is None:
        from ..engine import Engine
        engine = Engine.from_pretrained(model, device=device, dtype=dtype, max_seq_len=max_seq_len,
                                        quant="none")      # as the committed tau records were measured
        engine.loaded_name = model
    if str(heads) != "none":
        # the directory, not the word: a rerun naming the same heads by path, alias or `default` resumes (the CLI
        # passes it resolved; from Python `default` was recorded as typed)
        method = speculative if speculative in ("amphista", "medusa") else "amphista"     # resolve_heads' default
        heads = heads_dir(heads, engine.loaded_name, "heads", method, missing_ok=True)
    kind = resolve_heads(engine, str(heads), speculative)
    if kind is None:
        raise InputError("eval-tau needs drafting heads")
    # the weights' digest, not just the path: heads retrained in place must not resume stale rows
    setting = {"heads": str(heads), "heads_digest": weights_digest(engine.heads), "kind": kind,
               "tree": tree or "default", "max_new_tokens": max_new_tokens}
    # the target too: the same heads directory loads on another model of its shape, or in another dtype
    target = {"model": str(engine.loaded_name), "dtype": str(engine.dtype).removeprefix("torch.")}
    rows = _resume_rows(out, setting, target)
    _check_questions_unchanged(out, qs, rows)
    done = {r["question_id"] for r in rows}
    t0 = time.perf_counter()
    for q in tqdm(qs, unit="q", file=sys.stderr, disable=quiet, desc=f"eval-tau {kind}"):
        if q.get("question_id") in done:
            continue
        # A message list, as `amphista eval` asks its first turns: a string took no chat template on a model without
        # one of its own, so eval-tau measured the heads on the raw question where eval measured the chat's answer.
        r = engine.generate([{"role": "user", "content": q["turns"][0]}], max_new_tokens=max_new_tokens,
                            speculative=kind, tree=tree)
        rows.append({"question_id": q.get("question_id"), "category": q.get("category", "all"),
                     "tau": round(r.stats.tau, 4) if r.stats.decode_steps else None,
                     "new_tokens": r.stats.new_tokens, "decode_steps": r.stats.decode_steps,
                     "step_tokens": r.stats.step_tokens, "tree": r.stats.extra.get("tree"),
                     "question_digest": question_digest(q)})
        if out:     # after every question: a killed run resumes from here
            _write(out, {**setting, **target, "partial": True, "per_question": rows})
    wanted = {q.get("question_id") for q in qs}
    # rows of questions outside this selection (an earlier run with a larger --limit) stay in the file, apart from
    # the summary's rows, so a later run that selects them again does not answer them anew
    others = [r for r in rows if r["question_id"] not in wanted]
    rows = [r for r in rows if r["question_id"] in wanted]
    per_cat = defaultdict(list)
    for r in rows:
        per_cat[r["category"]].append(r)

    # Null where no decoding step ran (--max-new-tokens 1, an answer ended at its first token): such a question
    # measured no tau, and counted as 0.0 (which no decoder reaches: tau >= 1) it pulled mean_tau down.
    def tau_of(rs):   # token-weighted: all tokens over all target forwards
        steps = sum(r["decode_steps"] for r in rs)
        return round(sum(r["step_tokens"] for r in rs) / steps, 4) if steps else None

    def mean_tau(rs):   # question-weighted, over the questions that took a step (from the counts, not rounded taus)
        taus = [r["step_tokens"] / r["decode_steps"] for r in rs if r["decode_steps"]]
        return round(sum(taus) / len(taus), 4) if taus else None

    table = {c: {"tau": tau_of(v), "mean_tau": mean_tau(v), "questions": len(v)} for c, v in sorted(per_cat.items())}
    overall = {"tau": tau_of(rows), "mean_tau": mean_tau(rows)}
    result = {**setting, **target, "tree_used": _tree_used(engine, tree, rows), "questions": len(qs),
              "overall": overall, "per_category": table, "per_question": rows,
              "wall_s": round(time.perf_counter() - t0, 1)}
    if not quiet:
        def cell(x):
            return f"{'-':>6}" if x is None else f"{x:>6.3f}"
        print(f"{'category':<14} {'n':>3} {'tau':>6} {'mean':>6}")
        for c, v in table.items():
            print(f"{c:<14} {v['questions']:>3} {cell(v['tau'])} {cell(v['mean_tau'])}")
        print(f"{'overall':<14} {len(qs):>3} {cell(overall['tau'])} {cell(overall['mean_tau'])}")
    if out:
        _write(out, {**result, "other_questions": others} if others else result)
    return result


def _tree_used(engine, tree, rows: list[dict]):
    """The tree the answers were decoded on, as their stats name it (a list where they differ): `--tree auto` is
    the tree the speculation check picked, which resolving the word afterwards refused (unknown tree 'auto') once
    every question had been answered. Rows of older files name none: then the tree `tree` resolves to."""
    used = sorted({r["tree"] for r in rows if r.get("tree")})
    if len(used) > 1:
        return used
    if used:
        return used[0]
    return None if tree == "auto" else engine._tree_spec(tree).name


def _check_questions_unchanged(out, qs: list[dict], rows: list[dict]):
    """Rows are reused by question_id: not for another text of the question (an edited file, another file's ids)."""
    digests = {q["question_id"]: question_digest(q) for q in qs}
    changed = [str(r["question_id"]) for r in rows
               if r.get("question_digest") is not None and r["question_id"] in digests
               and r["question_digest"] != digests[r["question_id"]]]
    if changed:
        raise InputError(f"{out} holds rows for another version of question(s) {', '.join(changed[:5])} (category or "
                         "turns differ from the questions file's); pick another --out")


def _previous_result(out) -> dict | None:
    """The eval-tau result in `out`, or None (no file, or an empty one)."""
    if not out or not Path(out).is_file():
        return None
    text = Path(out).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return None
    try:
        prev = json.loads(text)
    except json.JSONDecodeError:
        prev = None
    # The writes below are atomic, so a file that is not a result object is not ours (the questions file, another
    # tool's output): it was overwritten without a word.
    if not isinstance(prev, dict) or not isinstance(prev.get("per_question"), list):
        raise InputError(f"--out {out} exists and is not an eval-tau result; it would be overwritten: pick another "
                         "--out (or delete that file)")
    return prev


def _resume_rows(out, setting: dict, target: dict | None = None) -> list[dict]:
    """Per-question rows already in `out` from a run with the same heads, kind, tree and token budget (and target
    model and dtype, where the file records them: older files do not)."""
    if not out or not Path(out).is_file():
        return []
    prev = _previous_result(out)
    if prev is None:
        return []
    if any(prev.get(k) != v for k, v in setting.items()):
        raise InputError(f"{out} holds a run with other settings "
                         f"({ {k: prev.get(k) for k in setting} }); pick another --out")
    other = {k: prev[k] for k, v in (target or {}).items() if k in prev and prev[k] != v}
    if other:
        raise InputError(f"{out} holds a run on another target ({other}, now {target}); pick another --out")
    return [r for r in prev.get("per_question", []) + prev.get("other_questions", []) if "step_tokens" in r]


def _write(out, obj):
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
