"""Structured output (response_format), side by side: free text vs a JSON schema, plain vs Amphista decoding, on the
embedded model (4-bit SmolLM2 on a CPU by default). Each task asks for one JSON object of a fixed schema; every arm
runs every task, rotating which arm goes first so a noisy VM's drift falls on all alike (benchmarks/common.py).

Reported per arm: decode tokens/s, tau, the mean host time of the grammar masks per step, and for the constrained
arms how many answers parse as JSON with the schema's required keys (the free arms: how many happen to). Greedy
constrained Amphista answers are checked equal to constrained plain answers.

    OMP_NUM_THREADS=2 python benchmarks/structured_ab.py [--tree dynamic-4] [--max-new-tokens 160] [--out DIR]
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amphista_engine import structured  # noqa: E402
from amphista_engine.engine import Engine  # noqa: E402
from benchmarks.common import RESULTS, hardware, md_table, rotating_runs, write_results  # noqa: E402

_S = {"type": "string", "maxLength": 60}
TASKS = [
    ("Invent a fictional person and describe them.",
     {"name": _S, "age": {"type": "integer"}, "city": _S, "hobbies": {"type": "array", "items": _S, "maxItems": 4}}),
    ("Describe a recipe for pancakes.",
     {"title": _S, "servings": {"type": "integer"}, "ingredients": {"type": "array", "items": _S, "maxItems": 8},
      "minutes": {"type": "integer"}}),
    ("Summarize the plot of a made-up science fiction movie.",
     {"title": _S, "year": {"type": "integer"}, "genre": {"enum": ["sci-fi", "drama", "comedy"]}, "summary": _S}),
    ("Describe a laptop for sale in an online shop.",
     {"product": _S, "price_usd": {"type": "number"}, "in_stock": {"type": "boolean"}, "features":
      {"type": "array", "items": _S, "maxItems": 5}}),
    ("Give a weather report for a city of your choice.",
     {"city": _S, "temperature_c": {"type": "number"}, "conditions": _S, "wind_kmh": {"type": "integer"}}),
    ("Describe a book you would recommend.",
     {"title": _S, "author": _S, "pages": {"type": "integer"}, "why": _S}),
    ("Plan a one-day trip to a mountain.",
     {"destination": _S, "start_time": _S, "steps": {"type": "array", "items": _S, "maxItems": 6}}),
    ("Describe a pet dog.",
     {"name": _S, "breed": _S, "age_years": {"type": "integer"}, "good_with_kids": {"type": "boolean"}}),
]


def schema_of(props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def valid(text: str, props: dict) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == set(props)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tree", default="dynamic-4")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--out", type=Path, default=RESULTS / "structured_ab")
    args = ap.parse_args()
    engine = Engine.from_pretrained(args.model, device="cpu")
    engine.load_heads("default")

    # the grammar masks' host time: Constraint's apply / apply_tree, summed per run
    mask_s = {"t": 0.0}
    for name in ("apply", "apply_tree"):
        fn = getattr(structured.Constraint, name)

        def timed(self, *a, _fn=fn, **k):
            t = time.perf_counter()
            try:
                return _fn(self, *a, **k)
            finally:
                mask_s["t"] += time.perf_counter() - t
        setattr(structured.Constraint, name, timed)

    # "json, drafts free": the first head's drafts not held to the grammar (Constraint.first_head off), for its A/B
    arms = [("plain", "free"), ("plain", "json"), ("amphista", "free"), ("amphista", "json"),
            ("amphista", "json, drafts free")]
    first_head = structured.Constraint.first_head
    texts, masks = {}, {}

    def run(arm, i):
        method, form = arm
        prompt, props = TASKS[i]
        rf = None if form == "free" else {"type": "json_schema", "json_schema": {"schema": schema_of(props)}}
        q = [{"role": "user", "content": f"{prompt} Answer with a JSON object with the keys {', '.join(props)}."}]
        mask_s["t"] = 0.0
        structured.Constraint.first_head = (first_head if form != "json, drafts free"
                                             else lambda self, draft, token_ids=None: draft)
        spec = dict(speculative="amphista", tree=args.tree) if method == "amphista" else dict(speculative=None)
        r = engine.generate(q, max_new_tokens=args.max_new_tokens, response_format=rf, **spec)
        texts[arm + (i,)] = r.text
        masks[arm + (i,)] = (mask_s["t"], r.stats.decode_steps)
        return r

    engine.generate("warm up", max_new_tokens=8, speculative="amphista", tree=args.tree,
                    response_format={"type": "json_object"})
    toks, secs, steps, outs = rotating_runs(list(range(len(TASKS))), arms, run)
    rows = []
    for arm in arms:
        n = len(TASKS)
        m = [masks[arm + (i,)] for i in range(n)]
        rows.append({"method": arm[0], "format": arm[1], "tok_s": toks[arm] / secs[arm], "tau": toks[arm] / steps[arm],
                     "mask_ms_per_step": 1e3 * sum(t for t, _ in m) / max(1, sum(s for _, s in m)),
                     "valid_json": f"{sum(valid(texts[arm + (i,)], TASKS[i][1]) for i in range(n))}/{n}"})
    base = {r["format"]: r["tok_s"] for r in rows if r["method"] == "plain"}
    for r in rows:
        r["x_plain_same_format"] = r["tok_s"] / base[r["format"].split(",")[0]]
    equal = sum(outs[("plain", "json", i)] == outs[("amphista", "json", i)]
                == outs[("amphista", "json, drafts free", i)] for i in range(len(TASKS)))
    table = md_table(rows, ["method", "format", "tok_s", "tau", "x_plain_same_format", "mask_ms_per_step",
                            "valid_json"])
    table += (f"\n\nconstrained greedy answers equal (plain, amphista, amphista with free drafts): "
              f"{equal}/{len(TASKS)}\n")
    table += "\nanswers (json arms):\n\n" + "\n".join(
        f"- {i}: `{json.dumps(texts[('amphista', 'json', i)])[:240]}`" for i in range(len(TASKS)))
    write_results("structured_ab", rows, {"hardware": hardware(engine.device), "model": args.model, "tree": args.tree,
                                          "max_new_tokens": args.max_new_tokens, "tasks": len(TASKS)}, table,
                  args.out)


if __name__ == "__main__":
    main()
