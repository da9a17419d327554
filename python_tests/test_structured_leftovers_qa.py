"""Structured output, what the grammar engine (llguidance 1.9) compiles inexactly and structured.py now holds exactly
or refuses by name: number bounds that meet only through allOf, $ref or anyOf (each schema alone was checked, so
{"allOf": [{"exclusiveMinimum": 0}, {"maximum": 0.5}]} let 0 through), leap days in format date and date-time
(2023-02-29 passed), and integer bounds, const and enum values past 2^53 (read as 64-bit floats: minimum
9007199254740993 let 9007199254740992 through).

No model: each grammar is run on llguidance's byte tokenizer, and every instance it accepts is checked against the
schema by the exact validator of test_structured_conformance_qa (errors, _format_ok; no jsonschema package here)."""
from __future__ import annotations

import json
import random
from decimal import Decimal

import llguidance
import pytest

from test_structured_conformance_qa import _format_ok, errors
from amphista_engine.errors import InputError
from amphista_engine.structured import EXACT_BOUND, grammar_source, refuse_inexact_bounds

BYTES = llguidance.LLTokenizer("byte")
N = EXACT_BOUND
_matchers: dict[str, llguidance.LLMatcher] = {}


def source(schema) -> str:
    return grammar_source({"type": "json_schema", "json_schema": {"schema": schema}})


def accepts(src: str, text: str) -> bool:
    m = _matchers.get(src)
    if m is None:
        m = _matchers[src] = llguidance.LLMatcher(BYTES, src)
        assert not m.is_error(), m.get_error()
    m.reset()
    ids = BYTES.tokenize_bytes(text.encode())
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def valid(text: str, schema) -> bool:
    return not errors(json.loads(text, parse_float=Decimal), schema)


# --- bounds that meet through allOf, $ref, anyOf ----------------------------------------------------------------

POS = {"type": "number", "exclusiveMinimum": 0}


@pytest.mark.parametrize("schema, said", [
    ({"allOf": [POS, {"maximum": 0.5}]}, "exclusiveMinimum 0 with an upper bound of 0.5 \\(the bounds meet"),
    ({"type": "object", "properties": {"p": {"$ref": "#/$defs/pos", "maximum": 0.5}}, "$defs": {"pos": POS}},
     "exclusiveMinimum 0 .* at properties.p "),
    ({"anyOf": [POS, {"type": "string"}], "exclusiveMaximum": 0.75}, "exclusiveMinimum 0 with an upper bound of 0.75"),
    ({"allOf": [{"anyOf": [{"exclusiveMinimum": 0}, {"type": "boolean"}]}, {"type": "number", "maximum": 0.5}]},
     "exclusiveMinimum 0"),
    ({"allOf": [{"type": "object", "properties": {"a": POS}}, {"properties": {"a": {"maximum": 0.5}}}]},
     "at properties.a "),
    ({"allOf": [{"type": "object", "additionalProperties": POS}, {"properties": {"a": {"maximum": 0.5}}}]},
     "at properties.a "),
    ({"type": "array", "items": {"allOf": [{"type": "array", "items": POS}, {"items": {"maximum": 0.5}}]}},
     "at items.items "),
    ({"type": "array", "prefixItems": [{"$ref": "#/$defs/neg"}], "$defs": {"neg": {"allOf": [
        {"type": "number", "exclusiveMaximum": -3}, {"$ref": "#/$defs/low"}]}, "low": {"minimum": -3.5}}},
     "exclusiveMaximum -3 with a lower bound of -3.5 at prefixItems\\[0\\]"),
    # draft 4's boolean form, which llguidance reads as excluding the minimum beside it
    ({"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 0.5}, "exclusiveMinimum 0 "),
    # a recursive definition reached through the $ref beside the bound
    ({"$defs": {"n": {"type": "object", "properties": {"v": {"allOf": [POS]}, "next": {"$ref": "#/$defs/n"}}}},
      "$ref": "#/$defs/n", "properties": {"v": {"maximum": 0.5}}}, "at properties.v "),
])
def test_bounds_that_meet_through_merges_are_refused_by_name(schema, said):
    # before: each schema was checked alone and the grammar let the excluded bound (0 or -3) through
    with pytest.raises(InputError, match=f"^response_format json_schema\\.schema: .*{said}"):
        source(schema)


def test_integer_bounds_meeting_through_allof_are_refused():
    # llguidance names the empty integer range itself once the merge gives it the integer type
    with pytest.raises(InputError, match="no integer"):
        source({"allOf": [{"type": "integer", "exclusiveMinimum": 0}, {"maximum": 0.5}]})


@pytest.mark.parametrize("schema, good, bad", [
    ({"allOf": [POS, {"maximum": 1}]}, ["0.5", "1"], ["0", "-0", "1.5"]),
    ({"allOf": [POS, {"minimum": 0.1, "maximum": 0.5}]}, ["0.25"], ["0", "0.05"]),
    ({"anyOf": [POS, {"type": "number", "maximum": 0.5}]}, ["0", "7", "-3"], ["true"]),
    ({"$defs": {"pos": POS}, "type": "object", "properties": {"p": {"$ref": "#/$defs/pos", "maximum": 3}}},
     ['{"p": 2.5}'], ['{"p": 0}']),
])
def test_merged_bounds_the_grammar_holds_exactly_still_compile(schema, good, bad):
    src = source(schema)
    for text in good + bad:
        assert accepts(src, text) == valid(text, schema) == (text in good), (schema, text)


def test_the_merge_check_is_bounded():
    # 2^30 branches of anyOf through $refs, each a path without sharing: worked out once per definition
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}", "minimum": i}]}
            for i in range(30)}
    defs["d30"] = {"type": "number", "exclusiveMinimum": 0}
    with pytest.raises(InputError, match="exclusiveMinimum 0 with an upper bound of 0.5"):
        refuse_inexact_bounds({"$ref": "#/$defs/d0", "maximum": 0.5, "$defs": defs})


# --- leap days ----------------------------------------------------------------------------------------------------

YEARS = (0, 4, 1900, 2000, 2023, 2024, 2100, 2400, 9999)


@pytest.mark.parametrize("schema, tail", [
    ({"type": "string", "format": "date"}, ""),
    ({"type": "string", "format": "date-time"}, "T12:30:00Z"),
    ({"type": ["string", "null"], "format": "date", "pattern": "^[0-9]"}, ""),        # a pattern of its own too
    ({"allOf": [{"$ref": "#/$defs/d"}], "$defs": {"d": {"type": "string", "format": "date"}}}, ""),
])
def test_leap_days_are_exact(schema, tail):
    # before: llguidance's date regex took 02-29 in every year ("2023-02-29" and "1900-02-29T..." passed)
    given = json.dumps(schema)
    src = source(schema)
    assert json.dumps(schema) == given          # the caller's schema is not changed
    for year in YEARS:
        for month in (1, 2, 3, 4, 12):
            for day in (1, 28, 29, 30, 31):
                date = f"{year:04d}-{month:02d}-{day:02d}"
                text = f'"{date}{tail}"'
                assert accepts(src, text) == _format_ok(date, "date"), text
                assert accepts(src, text) == valid(text, schema), text


def test_a_date_pattern_of_the_schemas_own_still_holds():
    src = source({"type": "string", "format": "date", "pattern": "^2023"})
    assert accepts(src, '"2023-03-01"') and not accepts(src, '"2024-02-29"') and not accepts(src, '"2023-02-29"')


def test_a_grammars_json_blocks_get_the_same_checks():
    # a Lark grammar's %json blocks (and so tool calls' arguments) compile as a json_schema's do
    src = grammar_source({"type": "grammar", "grammar": 'start: %json {"type": "string", "format": "date"}'})
    assert accepts(src, '"2024-02-29"') and not accepts(src, '"2023-02-29"')
    block = json.dumps({"type": "object", "properties": {"p": {"allOf": [POS, {"maximum": 0.5}]}}})
    with pytest.raises(InputError, match="^response_format: a %json block's schema: exclusiveMinimum 0 .* at "
                                         "properties.p "):
        grammar_source({"type": "grammar", "grammar": f"start: %json {block}"})


# --- integers past 2^53 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, said", [
    ({"type": "integer", "minimum": N + 1}, "minimum 9007199254740993 is not supported"),
    ({"type": "object", "properties": {"n": {"type": "integer", "maximum": -N - 1}}},
     "maximum -9007199254740993 at properties.n is not supported"),
    ({"type": "number", "exclusiveMinimum": 10 ** 17 + 1}, "exclusiveMinimum 100000000000000001 "),
    ({"$defs": {"big": {"type": "integer", "exclusiveMaximum": 2 ** 63 - 1}}, "$ref": "#/$defs/big"},
     "exclusiveMaximum 9223372036854775807 at \\$defs.big "),
    ({"type": "integer", "minimum": 1e20}, "minimum 1e\\+20 "),
    ({"type": "object", "properties": {"id": {"const": N + 1}}}, "const at properties.id holds the integer "
     "9007199254740993"),
    ({"enum": ["x", {"a": [-N - 3]}]}, "enum holds the integer -9007199254740995"),
])
def test_numbers_past_2_53_are_refused_by_name(schema, said):
    # before: minimum 9007199254740993 let 9007199254740992 through, const 9007199254740993 took only ...992
    with pytest.raises(InputError, match=f"^response_format json_schema\\.schema: {said}") as e:
        source(schema)
    assert "2^53 = 9007199254740992" in str(e.value)


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "integer", "minimum": N}, [str(N), str(N + 1)], [str(N - 1)]),
    ({"type": "integer", "maximum": -N}, [str(-N), str(-N - 1)], [str(-N + 1)]),
    ({"type": "integer", "exclusiveMaximum": N}, [str(N - 1)], [str(N)]),
    ({"type": "number", "exclusiveMinimum": -N}, [str(-N + 1), "0.5"], [str(-N)]),
    ({"const": N}, [str(N)], [str(N - 1)]),
])
def test_bounds_up_to_2_53_are_exact(schema, good, bad):
    src = source(schema)
    for text in good + bad:
        assert accepts(src, text) == valid(text, schema) == (text in good), (schema, text)


# --- a seeded sweep around all three ------------------------------------------------------------------------------

WHOLE, FRAC = [-2, -1, 0, 1, 2], [-1.5, -0.5, -0.25, 0.25, 0.5, 0.75, 1.5]
BIG = [N, N - 1, N + 1, -N - 1, 10 ** 17 + 1]
KEYS = ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"]


def _bounds(r: random.Random) -> dict:
    if r.random() < 0.5:        # an exclusive whole-number bound with the other bound near it
        w, up = r.choice(WHOLE), r.random() < 0.5
        near = w + r.choice([0.25, 0.5, 0.75, 1, 1.5]) * (1 if up else -1)
        return {"exclusiveMinimum" if up else "exclusiveMaximum": w,
                r.choice(["maximum", "exclusiveMaximum"] if up else ["minimum", "exclusiveMinimum"]): near}
    pool = WHOLE + FRAC + (BIG if r.random() < 0.3 else [])
    return {k: r.choice(pool) for k in r.sample(KEYS, r.randint(1, 3))}


def _joined(r: random.Random, parts: list[dict], defs: dict) -> dict:
    """One schema that is all of parts: flat, allOf, a $ref and its siblings, anyOf and its siblings, or allOf of an
    anyOf."""
    rest = {k: v for p in parts[1:] for k, v in p.items()}
    how = r.choice(["flat", "allOf", "ref", "anyOf", "allOf-anyOf"]) if len(parts) > 1 else "flat"
    if how == "flat":
        return {**parts[0], **rest}
    if how == "allOf":
        return {"allOf": parts}
    if how == "ref":
        defs[name := f"d{len(defs)}"] = parts[0]
        return {"$ref": f"#/$defs/{name}", **rest}
    if how == "anyOf":
        return {"anyOf": [parts[0], {"type": "string"}], **rest}
    return {"allOf": [{"anyOf": [parts[0], {"type": "boolean"}]}, *parts[1:]]}


def _case(r: random.Random):
    """A small schema around one feature, and the instances (JSON texts) to try on it."""
    defs, found = {}, []

    def leaf():
        if numbers:
            b = _bounds(r)
            found.extend(b.values())
            items = list(b.items())
            r.shuffle(items)
            parts = [p for p in (dict(items[::2]), dict(items[1::2])) if p] if r.random() < 0.7 else [b]
            kind = r.choice([{"type": "number"}, {"type": "integer"}, {}, {"type": ["number", "null"]}])
        else:
            parts = [{}] + ([{"pattern": r.choice(["^20", "^1900", "-02-", "^0000"])}] if r.random() < 0.3 else [])
            kind = {"type": "string", "format": fmt}
        parts[0] = {**kind, **parts[0]}
        return _joined(r, parts, defs)

    numbers, fmt = r.random() < 0.6, r.choice(["date", "date-time"])
    where = r.choice(["root", "prop", "items", "merged-prop", "merged-items"])
    put = "{}" if where == "root" else '{{"x": {}}}' if "prop" in where else "[{}]"
    if where == "root":
        schema = leaf()
    elif where in ("prop", "items"):
        schema = {"type": "object", "properties": {"x": leaf()}, "required": ["x"]} if where == "prop" else \
            {"type": "array", "items": leaf(), "minItems": 1, "maxItems": 1}
    elif where == "merged-prop":
        schema = {"allOf": [{"type": "object", "properties": {"x": leaf()}, "required": ["x"]},
                            {"properties": {"x": leaf()}}]}
    else:
        schema = {"allOf": [{"type": "array", "items": leaf(), "minItems": 1, "maxItems": 1}, {"items": leaf()}]}
    if defs:
        schema["$defs"] = defs
    if numbers:
        steps = ("-1", "-0.5", "-0.25", "0", "0.25", "0.5", "1")
        values = {Decimal(v) + Decimal(d) for v in found + [0] for d in steps}
        texts = sorted({str(int(v)) if v == v.to_integral_value() else str(v) for v in values} | {"-0"})
    else:
        tail = "T00:00:00Z" if fmt == "date-time" else ""
        texts = [f'"{y:04d}-{md}{tail}"' for y in (0, 1900, 2000, 2023, 2024, 2100)
                 for md in ("02-28", "02-29", "02-30", "03-01", "04-31")]
    return schema, [put.format(t) for t in texts], numbers


def test_seeded_sweep_accepts_only_valid_instances():
    """Every instance a compiled grammar accepts is valid (and every valid date is accepted); the rest are refused
    by name. Before: 300 seeds found ~200 accepted invalid instances (leap days, bounds met through allOf, $ref and
    anyOf, integers past 2^53); a 1500-seed run finds none now."""
    refused, compiled, accepted = [], 0, 0
    for seed in range(300):
        schema, texts, numbers = _case(random.Random(seed))
        try:
            src = source(schema)
        except InputError as e:
            refused.append(str(e))
            continue
        compiled += 1
        for text in texts:
            ok, good = accepts(src, text), valid(text, schema)
            accepted += ok
            assert good or not ok, (seed, schema, text, errors(json.loads(text, parse_float=Decimal), schema))
            assert numbers or ok or not good, (seed, schema, text)
    # the sweep reaches what it is for: grammars that compile and accept, and each refusal of ours
    assert compiled > 150 and accepted > 1000, (compiled, accepted)
    assert any("meet through" in e for e in refused) and any("2^53" in e for e in refused)


@pytest.mark.parametrize("schema", [
    {"allOf": [{"type": "number", "exclusiveMinimum": 10 ** 400}, {"maximum": 1e300}]},
    {"anyOf": [{"exclusiveMinimum": -10 ** 5000}] * 70 + [{"maximum": 1e300}]},
])
def test_a_huge_bound_met_through_a_merge_is_refused_by_name(schema):
    """Regression: a bound past 2^53 met only through allOf/anyOf reached the merged range check's float arithmetic
    first (OverflowError: a server's 500); it is refused by name, its digits counted, not quoted."""
    with pytest.raises(InputError, match=r"exclusiveMinimum -?\(an integer of \d+ digits\) at (allOf|anyOf)\[0\]"):
        refuse_inexact_bounds(schema)
