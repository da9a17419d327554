"""`amphista eval-tau`: mean tau per category on a Spec-Bench-format question file (first turns, greedy)."""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from ..errors import InputError
from ..evaluation.questions import read_questions


def eval_tau(questions, heads, model: str = "smollm2-135m", tree=None, max_new_tokens: int = 256,
             limit: int | None = None, out=None, device=None, dtype=None, max_seq_len: int = 2048,
             speculative: str = "auto", engine=None, quiet: bool = False, per_category: int | None = None) -> dict:
    from tqdm import tqdm

    from ..shipped_heads import resolve_heads
    qs = read_questions(questions, None, limit, per_category)
    if engine is None:
        from ..engine import Engine
        engine = Engine.from_pretrained(model, device=device, dtype=dtype, max_seq_len=max_seq_len)
        engine.loaded_name = model
    kind = resolve_heads(engine, str(heads), speculative)
    if kind is None:
        raise InputError("eval-tau needs drafting heads")
    per_cat, rows = defaultdict(list), []
    t0 = time.perf_counter()
    for q in tqdm(qs, unit="q", file=sys.stderr, disable=quiet, desc=f"eval-tau {kind}"):
        r = engine.generate(q["turns"][0], max_new_tokens=max_new_tokens, speculative=kind, tree=tree)
        cat = q.get("category", "all")
        per_cat[cat].append(r.stats)
        rows.append({"question_id": q.get("question_id"), "category": cat, "tau": round(r.stats.tau, 4),
                     "new_tokens": r.stats.new_tokens, "decode_steps": r.stats.decode_steps})

    def tau_of(stats):   # token-weighted: all tokens over all target forwards
        steps = sum(s.decode_steps for s in stats)
        return sum(s.step_tokens for s in stats) / steps if steps else 0.0

    table = {c: {"tau": round(tau_of(v), 4), "mean_tau": round(sum(s.tau for s in v) / len(v), 4),
                 "questions": len(v)} for c, v in sorted(per_cat.items())}
    allst = [s for v in per_cat.values() for s in v]
    result = {"heads": str(heads), "kind": kind, "tree": tree or "default", "max_new_tokens": max_new_tokens,
              "questions": len(qs), "overall": {"tau": round(tau_of(allst), 4),
                                                 "mean_tau": round(sum(s.tau for s in allst) / len(allst), 4)},
              "per_category": table, "per_question": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    if not quiet:
        print(f"{'category':<14} {'n':>3} {'tau':>6} {'mean':>6}")
        for c, v in table.items():
            print(f"{c:<14} {v['questions']:>3} {v['tau']:>6.3f} {v['mean_tau']:>6.3f}")
        print(f"{'overall':<14} {len(qs):>3} {result['overall']['tau']:>6.3f} {result['overall']['mean_tau']:>6.3f}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
