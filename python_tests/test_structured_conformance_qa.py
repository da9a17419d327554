"""A seeded conformance sweep over structured output (response_format json_schema / json_object) on the real
SmolLM2-135M (4-bit) with its shipped Amphista heads: every answer that ends on its own (not cut by max_new_tokens),
plain or speculative, sampled with seeds and logit_bias so answers wander, must be JSON that validates against its
random schema (nested objects with required/optional keys, additionalProperties false/true/a schema, arrays with
items/prefixItems/minItems/maxItems, enum/const, string lengths/patterns/formats, number bounds/multipleOf,
anyOf/allOf, $ref/$defs (recursive too), type lists, boolean and empty schemas), checked by the small validator
below (no jsonschema package here). Keywords the grammar engine cannot enforce must be refused by name; a table of
instances each keyword forbids must be rejected by the compiled grammar itself.

A wider run (400 seeds, ~60 s of answers) found no invalid answer; the grammar-level probes found llguidance 1.9
letting an excluded whole-number bound through when both bounds lie within one unit (refused now) and quoting
~10 kB regexes in its errors (bounded now)."""
from __future__ import annotations

import calendar
import json
import random
import re
from decimal import Decimal

import pytest

from conftest import needs_smollm2, smollm2_with_shipped_heads
from amphista_engine.errors import InputError
from amphista_engine.structured import Grammar, grammar_source


def _num(x):
    return isinstance(x, (int, float, Decimal)) and not isinstance(x, bool)


def _eq(a, b):
    if _num(a) and _num(b):
        return Decimal(str(a)) == Decimal(str(b))
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    return a == b


def _type_ok(x, t):
    return {"null": x is None, "boolean": isinstance(x, bool), "object": isinstance(x, dict),
            "array": isinstance(x, list), "string": isinstance(x, str), "number": _num(x),
            "integer": _num(x) and Decimal(str(x)) == Decimal(str(x)).to_integral_value()}[t]


def _format_ok(s, f):
    if f == "date":         # RFC 3339 full-date; year 0000 is a leap year
        m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)", s)
        return bool(m) and 1 <= int(m[2]) <= 12 and 1 <= int(m[3]) <= calendar.monthrange(int(m[1]) or 2000,
                                                                                           int(m[2]))[1]
    if f == "time":
        m = re.fullmatch(r"(\d\d):(\d\d):(\d\d)(\.\d+)?([zZ]|[+-]\d\d:\d\d)", s)
        return bool(m) and int(m[1]) < 24 and int(m[2]) < 60 and int(m[3]) < 61
    if f == "date-time":
        d, sep, t = s.partition("T") if "T" in s else s.partition("t")
        return bool(sep) and _format_ok(d, "date") and _format_ok(t, "time")
    octet = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    return bool(re.fullmatch({
        "email": r"[^@\s]+@[^@\s]+",
        "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
        "ipv4": rf"{octet}(\.{octet}){{3}}",
        "hostname": r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
    }.get(f, r"(?s).*"), s))


def _ref(root, ref):
    node = root
    for part in ref.lstrip("#").split("/")[1:]:
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def errors(x, s, root=None, path="$"):
    """The violations of JSON Schema s (2020-12, the keywords _schema draws) by instance x, read with
    json.loads(..., parse_float=Decimal) so numbers compare exactly."""
    root = s if root is None else root
    if s is True or s == {}:
        return []
    if s is False:
        return [f"{path}: false schema"]
    out = errors(x, _ref(root, s["$ref"]), root, path) if "$ref" in s else []
    t = s.get("type")
    if t is not None and not any(_type_ok(x, u) for u in (t if isinstance(t, list) else [t])):
        return out + [f"{path}: type {t}"]
    if "enum" in s and not any(_eq(x, e) for e in s["enum"]):
        out.append(f"{path}: enum")
    if "const" in s and not _eq(x, s["const"]):
        out.append(f"{path}: const")
    for sub in s.get("allOf", []):
        out += errors(x, sub, root, path)
    if "anyOf" in s and all(errors(x, sub, root, path) for sub in s["anyOf"]):
        out.append(f"{path}: anyOf")
    if isinstance(x, str):
        if not s.get("minLength", 0) <= len(x) <= s.get("maxLength", float("inf")):
            out.append(f"{path}: length {len(x)}")
        if "pattern" in s and not re.search(s["pattern"], x):
            out.append(f"{path}: pattern")
        if "format" in s and not _format_ok(x, s["format"]):
            out.append(f"{path}: format {s['format']}")
    if _num(x):
        d = Decimal(str(x))
        for key, bad in (("minimum", d.__lt__), ("maximum", d.__gt__), ("exclusiveMinimum", d.__le__),
                         ("exclusiveMaximum", d.__ge__)):
            if _num(s.get(key)) and bad(Decimal(str(s[key]))):
                out.append(f"{path}: {key}")
        if "multipleOf" in s and d % Decimal(str(s["multipleOf"])) != 0:
            out.append(f"{path}: multipleOf")
    if isinstance(x, list):
        if not s.get("minItems", 0) <= len(x) <= s.get("maxItems", float("inf")):
            out.append(f"{path}: {len(x)} items")
        prefix = s.get("prefixItems", [])
        for i, v in enumerate(x):
            sub = prefix[i] if i < len(prefix) else s.get("items")
            if sub is not None:
                out += errors(v, sub, root, f"{path}[{i}]")
        if s.get("uniqueItems") is True and any(_eq(x[i], x[j]) for i in range(len(x)) for j in range(i)):
            out.append(f"{path}: uniqueItems")
    if isinstance(x, dict):
        out += [f"{path}: required {k}" for k in s.get("required", []) if k not in x]
        if not s.get("minProperties", 0) <= len(x) <= s.get("maxProperties", float("inf")):
            out.append(f"{path}: {len(x)} properties")
        for k, v in x.items():
            pats = [sub for p, sub in s.get("patternProperties", {}).items() if re.search(p, k)]
            for sub in pats:
                out += errors(v, sub, root, f"{path}.{k}")
            if k in s.get("properties", {}):
                out += errors(v, s["properties"][k], root, f"{path}.{k}")
            elif "additionalProperties" in s and not pats:
                out += errors(v, s["additionalProperties"], root, f"{path}.{k}")
    return out


WORDS = ["name", "age", "id", "tags", "ok", "score", "kind", "info", "items", "note", "email", "date"]


def _schema(r: random.Random, depth: int, defs: dict):
    k = r.random()
    if depth < 3 and k < 0.22:
        keys = r.sample(WORDS, r.randint(1, 3))
        s = {"type": "object", "properties": {w: _schema(r, depth + 1, defs) for w in keys},
             "required": [w for w in keys if r.random() < 0.6]}
        s["additionalProperties"] = r.choice([False, False, True, {"type": r.choice(["integer", "string"])}])
        return s
    if depth < 3 and k < 0.36:
        a = {"type": "array"}
        if r.random() < 0.3:
            a["prefixItems"] = [_schema(r, depth + 1, defs) for _ in range(r.randint(1, 2))]
            if r.random() < 0.5:
                a["items"] = r.choice([False, _schema(r, depth + 1, defs)])
        else:
            a["items"] = _schema(r, depth + 1, defs)
        if r.random() < 0.5:
            a["minItems"] = r.randint(0, 2)
        if r.random() < 0.5:
            a["maxItems"] = a.get("minItems", len(a.get("prefixItems", []))) + r.randint(0, 3)
        return a
    if depth < 3 and k < 0.42:
        if r.random() < 0.3:
            return r.choice([{"allOf": [{"type": "string"}, {"maxLength": r.randint(1, 8)}]},
                             {"allOf": [{"type": "integer", "minimum": -5}, {"maximum": r.randint(0, 50)}]}])
        return {"anyOf": [_schema(r, depth + 1, defs) for _ in range(r.randint(2, 3))]}
    if k < 0.47:
        name = f"d{len(defs)}"
        defs[name] = None
        defs[name] = _schema(r, depth + 1, defs)
        return {"$ref": f"#/$defs/{name}"}
    if k < 0.5:
        return r.choice([{}, True, {"description": "anything"}])
    t = r.choice(["string", "string", "integer", "number", "boolean", "null", "enum", "const", "format", "nullable"])
    if t == "enum":
        return {"enum": r.sample(["red", "green", "blue", 1, 2.5, None, True, [1], {"a": 1}], r.randint(1, 3))}
    if t == "const":
        return {"const": r.choice(["x", 7, None, False, [1, "a"], {"k": "v"}])}
    if t == "format":
        return {"type": "string", "format": r.choice(["date", "email", "uuid", "date-time", "time", "ipv4"])}
    if t == "nullable":
        return {"type": [r.choice(["string", "integer", "number", "boolean", "array"]), "null"]}
    s = {"type": t}
    if t == "string" and r.random() < 0.5:
        s["minLength"] = r.randint(0, 3)
        s["maxLength"] = s["minLength"] + r.randint(0, 8)
    elif t == "string" and r.random() < 0.4:
        s["pattern"] = r.choice(["^[a-z]+$", "^[A-Z][a-z]*$", "^\\d{3}-\\d{4}$", "^(yes|no)$", "a"])
    if t in ("integer", "number"):
        if r.random() < 0.5:
            s["minimum"] = r.randint(-10, 10)
        if r.random() < 0.4:
            s["maximum"] = s.get("minimum", -10) + r.randint(1, 100)
        if r.random() < 0.2:
            s["exclusiveMinimum"] = s.pop("minimum", 0)
        if r.random() < 0.3:
            s["multipleOf"] = r.choice([2, 3, 5, 7] if t == "integer" else [0.5, 0.25, 2])
    return s


def random_schema(r: random.Random) -> dict:
    defs = {}
    keys = r.sample(WORDS, r.randint(1, 4))
    s = {"type": "object", "properties": {w: _schema(r, 1, defs) for w in keys},
         "required": [w for w in keys if r.random() < 0.7], "additionalProperties": r.random() < 0.3}
    if r.random() < 0.15:
        defs["node"] = {"type": "object", "properties": {"v": {"type": "integer"}, "next": {
            "anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["v", "next"],
            "additionalProperties": False}
        s["properties"]["list"] = {"$ref": "#/$defs/node"}
    if defs:
        s["$defs"] = defs
    return s


def test_validator_sees_violations():
    s = {"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 7}, "b": {"$ref": "#/$defs/b"}},
         "required": ["a"], "additionalProperties": False,
         "$defs": {"b": {"type": "array", "prefixItems": [{"const": 1}], "items": False}}}
    assert errors(json.loads('{"a": 14, "b": [1]}', parse_float=Decimal), s) == []
    for bad in ('{"a": 15}', '{"b": [1]}', '{"a": 7, "c": 1}', '{"a": 7, "b": [1, 2]}', '{"a": 7, "b": [2]}'):
        assert errors(json.loads(bad, parse_float=Decimal), s), bad
    assert not _format_ok("2023-02-29", "date") and _format_ok("2024-02-29", "date")


@pytest.fixture(scope="module")
def smol():
    return smollm2_with_shipped_heads(max_seq_len=1024)


def _accepts(engine, schema, text: str) -> bool:
    g = Grammar({"type": "json_schema", "json_schema": {"schema": schema}}, engine.tokenizer,
                engine.config.vocab_size)
    m, ids = g.matcher(), engine.tokenizer.encode(text, add_bos=False)
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


# Each keyword alone, with instances a model would naturally write that it forbids (and one it allows)
KEYWORD_TABLE = [
    ({"type": "string", "maxLength": 3}, ['"abcd"', '"éééé"'], '"abc"'),
    ({"type": "string", "minLength": 3}, ['"ab"'], '"abc"'),
    ({"type": "string", "pattern": "^a+$"}, ['"ab"'], '"aa"'),
    ({"type": "string", "format": "date"}, ['"2024-13-01"', '"2024-04-31"', '"01/02/2024"'], '"2024-02-29"'),
    ({"type": "string", "format": "email"}, ['"ab.com"', '"a b@c.com"'], '"a@b.com"'),
    ({"type": "string", "format": "uuid"}, ['"12345678123412341234123456789abc"'],
     '"12345678-1234-1234-1234-123456789abc"'),
    ({"type": "string", "format": "ipv4"}, ['"256.1.1.1"'], '"1.2.3.4"'),
    ({"type": "integer", "multipleOf": 7}, ["15", "1"], "14"),
    ({"type": "number", "multipleOf": 0.5}, ["1.25"], "1.5"),
    ({"type": "integer", "exclusiveMinimum": 5}, ["5", "4"], "6"),
    ({"type": "number", "exclusiveMaximum": 5}, ["5", "5.0"], "4.9"),
    ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, ["0", "1", "-0"], "0.5"),
    ({"type": "number", "minimum": 0, "maximum": 1}, ["1.5", "-0.1"], "1"),
    ({"type": "integer"}, ["1.5"], "2"),
    ({"type": "object", "minProperties": 2}, ['{"a": 1}'], '{"a": 1, "b": 2}'),
    ({"type": "object", "maxProperties": 1}, ['{"a": 1, "b": 2}'], '{"a": 1}'),
    ({"type": "object", "required": ["a"]}, ["{}"], '{"a": 1}'),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}, ['{"b": 1}'],
     '{"a": 1}'),
    ({"type": "object", "additionalProperties": {"type": "string"}}, ['{"b": 1}'], '{"b": "x"}'),
    ({"type": "object", "patternProperties": {"^a": {"type": "integer"}}}, ['{"ab": "x"}'], '{"ab": 1}'),
    ({"type": "array", "minItems": 2, "maxItems": 3}, ["[1]", "[1, 2, 3, 4]"], "[1, 2]"),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, ["[1, 2]", '["a"]'], "[1]"),
    ({"type": "array", "items": {"type": "integer"}}, ['[1, "a"]'], "[1, 2]"),
    ({"enum": ["a", 1, None]}, ['"b"', "2"], "null"),
    ({"const": {"a": [1, 2]}}, ['{"a": [1]}'], '{"a": [1, 2]}'),
    ({"anyOf": [{"type": "integer", "minimum": 5}, {"type": "string", "maxLength": 1}]}, ["3", '"ab"'], '"a"'),
    ({"allOf": [{"type": "string", "maxLength": 3}, {"minLength": 2}]}, ['"a"', '"abcd"'], '"ab"'),
    ({"type": ["string", "null"], "maxLength": 2}, ['"abc"', "1"], "null"),
    ({"type": "object", "properties": {"a": False}}, ['{"a": 1}'], "{}"),
    ({"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}, "v": {"type": "integer"}},
                      "additionalProperties": False}}, "$ref": "#/$defs/n"}, ['{"c": {"c": {"v": "x"}}}'],
     '{"c": {"c": {"v": 1}}}'),
]


@needs_smollm2
def test_each_keyword_is_enforced_by_the_grammar(smol):
    for schema, bad, good in KEYWORD_TABLE:
        assert _accepts(smol, schema, good), (schema, good)
        for text in bad:
            assert errors(json.loads(text, parse_float=Decimal), schema), (schema, text)
            assert not _accepts(smol, schema, text), f"{schema} let {text} through"


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"const": 1}}, "contains"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if"),
    ({"type": "object", "propertyNames": {"maxLength": 2}}, "propertyNames"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
    ({"type": "string", "format": "json-pointer"}, "json-pointer"),
    ({"$dynamicRef": "#x"}, "$dynamicRef"),
])
def test_keywords_the_grammar_cannot_enforce_are_refused_by_name(schema, keyword):
    with pytest.raises(InputError, match=re.escape(keyword)):
        grammar_source({"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {
            "x": schema}}}})


@needs_smollm2
def test_seeded_sweep_answers_that_end_validate(smol):
    tok = smol.tokenizer
    bias = [tok.encode(t, add_bos=False)[0] for t in ['"', "1", "a", "[", ",", "-", "{"]]
    prompts = ["Give me a JSON record of a user.", "Describe a cat as JSON.", "Write a long JSON document."]
    ended = 0
    # json_object, logit_bias, each tree and temperature; 5 answers end here. Of range(11) these are the seeds whose
    # answers end (3, 4, 6, 7, 8 ran to max_new_tokens, so they checked nothing), and 5, the only dynamic-4 run
    for seed in (0, 1, 2, 5, 9, 10):
        r = random.Random(seed)
        json_object = seed % 5 == 4
        schema = {"type": "object"} if json_object else random_schema(r)
        rf = {"type": "json_object"} if json_object else {"type": "json_schema", "json_schema": {"schema": schema}}
        opts = dict(max_new_tokens=r.randint(40, 100), temperature=r.choice([0, 0.7, 1.0, 1.3]), seed=seed)
        if r.random() < 0.5:
            opts["logit_bias"] = {t: r.uniform(-3, 5) for t in r.sample(bias, 3)}
        if seed % 2:
            opts.update(speculative="amphista", tree=r.choice(["dynamic-4", "dynamic-8", "chain-3"]))
        q = [{"role": "user", "content": f"{r.choice(prompts)} Schema: {json.dumps(schema)[:300]}"}]
        res = smol.generate(q, response_format=rf, **opts)
        if res.finish_reason == "length":
            continue
        ended += 1
        value = json.loads(res.text, parse_float=Decimal)
        assert not errors(value, schema), (seed, schema, res.text, errors(value, schema))
        assert not json_object or isinstance(value, dict)
    assert ended >= 3, ended


# --- regressions -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, keyword", [
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 0.5}, "exclusiveMinimum"),
    ({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1.5}, "exclusiveMinimum"),
    ({"exclusiveMinimum": 0, "exclusiveMaximum": 0.001}, "exclusiveMinimum"),
    ({"type": ["number", "null"], "minimum": -0.5, "exclusiveMaximum": 0}, "exclusiveMaximum"),
    ({"type": "number", "exclusiveMinimum": -3.5, "exclusiveMaximum": -3}, "exclusiveMaximum"),
])
def test_exclusive_whole_bound_within_one_unit_is_refused(schema, keyword):
    # llguidance 1.9 compiled these too wide: {"p": 0} under exclusiveMinimum 0, maximum 0.5 passed the grammar
    nested = {"type": "object", "properties": {"p": {"type": "array", "items": schema}}}
    with pytest.raises(InputError, match=f"{keyword}.*at properties.p.items"):
        grammar_source({"type": "json_schema", "json_schema": {"schema": nested}})


@needs_smollm2
def test_exclusive_bounds_llguidance_compiles_exactly_still_work(smol):
    for schema, bad, good in [({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, ["0"], "0.5"),
                              ({"type": "number", "exclusiveMinimum": 0.5, "maximum": 0.75}, ["0.5"], "0.6"),
                              ({"type": "number", "exclusiveMinimum": -3, "maximum": -2.5}, ["-3"], "-2.9"),
                              ({"type": "number", "exclusiveMaximum": 1, "minimum": 0.5}, ["1"], "0.9")]:
        assert _accepts(smol, schema, good) and not any(_accepts(smol, schema, b) for b in bad), schema


def test_grammar_engine_errors_are_bounded():
    # llguidance quoted the whole regex it could not build: a ~10 kB message for one tiny bound
    with pytest.raises(InputError, match="exclusiveMinimum|regex") as e:
        grammar_source({"type": "json_schema", "json_schema": {"schema": {
            "type": "number", "exclusiveMinimum": 1e-300, "maximum": 0.5}}})
    assert len(str(e.value)) < 1000
