"""Structured output: decoding held to a JSON schema, a regex, a grammar or a list of choices (OpenAI's
`response_format`; vLLM's guided_* fields and structured_outputs object map onto it: vllm_format).

Each row has a grammar matcher (llguidance, the library vLLM and SGLang use) that follows the tokens the row has
emitted; before a token is chosen, the logits of every token the grammar forbids there go to -inf. In a speculative
step the tree's nodes each get their own mask, from the matcher advanced along the node's path, so verification
chooses from the distribution constrained plain decoding would have: greedy output stays equal to constrained plain
output, and rejection sampling stays lossless (a draft the grammar forbids has probability 0 and is rejected). When
the grammar is complete only EOS is left, so a row ends by EOS. The first head's drafts are held to the grammar too
(first_head): the tokens right after the root are the only ones whose grammar state is known before the tree is built.

The masks are computed on the host each step (one per row, one per tree node): constrained runs are eager (no CUDA
graph can capture host work between the forward and the choice of tokens) and take no rows mid-run. Reported logprobs
stay the model's own distribution, before the mask (vLLM's default): top_logprobs may list tokens the grammar forbids.

JSON (json_object, json_schema) may hold whitespace between its tokens, but a bounded run of it (JSON_WHITESPACE): with
llguidance's default, any run of it, a model unsure how to go on padded the answer with blanks and newlines until
max_new_tokens ran out (a schema allowing only {} gave "{\n \n   \n   ..." to the limit, finish_reason "length").
A schema's own "x-guidance" whitespace_flexible or whitespace_pattern is kept.
"""
from __future__ import annotations

import bisect
import json
import math
import re
import sys
import urllib.parse
from decimal import Decimal

import torch

from .errors import ConfigError, InputError, int_digits, read_json, refuse_huge_ints

FORMATS = ("text", "json_object", "json_schema", "regex", "grammar", "choice")
# Blanks, one line break, an indentation: pretty-printed JSON fits (64 columns of indentation, 32 levels of 2), and a
# run of whitespace always ends
JSON_WHITESPACE = r"[\x20\x09]{0,16}(\r?\n[\x20\x09]{0,64})?"


def _llguidance():
    try:
        import llguidance     # not llguidance.torch: it imports torch._dynamo (~0.7 s) for a kernel not used here
    except ImportError:
        raise ConfigError("response_format needs the llguidance package: pip install llguidance") from None
    return llguidance


def grammar_source(response_format) -> str | None:
    """The checked llguidance grammar (a string) for an OpenAI-style response_format, or None for free text (see
    _grammar_text); a malformed one is an InputError naming what is wrong, before any model work."""
    if (where := _lone_surrogate(response_format)) is not None:
        # llguidance's bindings raised UnicodeEncodeError on it (a 500 from the server, a client's \\ud800 escape)
        raise InputError("response_format holds text that is not valid Unicode (a lone surrogate escape such as "
                         f"\\ud800){' at ' + where if where else ''}")
    source = _grammar_text(response_format)
    if source is not None:
        error = _llguidance().LLMatcher.validate_grammar(source)
        if error:
            raise InputError(f"response_format: {_said(error)}{_rounding_note(error, response_format)}")
    return source


def _rounding_note(error: str, response_format) -> str:
    """Why bounds that hold values as written can meet as an empty range: _with_bound_points rounds each bound of
    more than _EXACT_DIGITS significant digits inward on its own node, and bounds in different subschemas (allOf,
    anyOf, $ref) meet only in llguidance, whose message then quotes rounded numbers the request never wrote."""
    if "Unsatisfiable" not in error or "imum" not in error:
        return ""
    found, stack, seen = [], [response_format], 0
    while stack and seen < 100_000 and len(found) < 4:
        node, seen = stack.pop(), seen + 1
        if isinstance(node, dict):
            found += [f"{k} {v!r}" for k in _BOUNDS if isinstance(v := node.get(k), float) and math.isfinite(v)
                      and not _whole(v) and len(_decimal(v).as_tuple().digits) > _EXACT_DIGITS]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    if not found:
        return ""
    return (f" (the grammar engine reads a bound to {_EXACT_DIGITS} significant digits, so each bound with more is "
            f"rounded inward to them: {', '.join(found)}; use bounds of at most {_EXACT_DIGITS} significant digits)")


def _said(error: str, limit: int = 600) -> str:
    """llguidance's error text, bounded: for a regex it could not build it quotes the whole regex, which a numeric
    range such as exclusiveMinimum 1e-300 made thousands of nested groups (a 400 whose message ran to ~10 kB)."""
    error = error.strip()
    error = error if len(error) <= limit else f"{error[:limit]}... ({len(error) - limit} more characters)"
    if "Enable 'coerce_one_of'" in error:
        # llguidance's own words name an option of its API, not where a request sets it. It refuses only a oneOf
        # whose branches may overlap (a pydantic discriminated union's are told apart, and pass)
        error += (' (the branches of a oneOf may overlap here, which the grammar cannot hold to exactly one; '
                  '"x-guidance": {"coerce_one_of": true} at the top of the schema holds the answer to any of them)')
    return error


def _lone_surrogate(value, where: str = "") -> str | None:
    """Where in a JSON value ("" for itself, ".regex", ".json_schema.schema.enum[0]") a string or key holds a
    character UTF-8 cannot encode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        at = f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]"
        if isinstance(key, str) and _lone_surrogate(key) is not None:
            return where
        if (found := _lone_surrogate(item, at)) is not None:
            return found
    return None


def _grammar_text(response_format) -> str | None:
    """The llguidance grammar (a string) for an OpenAI-style response_format, or None for free text.

    {"type": "text"} or None: free text; {"type": "json_object"}: any JSON object; {"type": "json_schema",
    "json_schema": {"schema": {...}, "name": ..., "strict": ...}}: JSON valid under the schema (OpenAI's form; a bare
    {"schema": ...} too); ours, as SGLang/vLLM offer them: {"type": "regex", "regex": "..."}, {"type": "grammar",
    "grammar": "<Lark grammar>"} and {"type": "choice", "choices": ["...", ...]} (the answer is exactly one of them:
    vLLM's guided_choice)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise InputError(f"response_format must be an object with a 'type' ({', '.join(FORMATS)}), got "
                         f"{response_format!r:.80}")
    kind = response_format["type"]
    if kind == "text":
        return None
    llg = _llguidance()
    if kind == "json_object":
        return _json_grammar(llg, {"type": "object"})
    if kind == "json_schema":
        schema = _schema_of(response_format)
        try:
            return _json_grammar(llg, schema)
        except InputError:
            raise           # ours already name the schema (a second "response_format json_schema.schema:" stuttered)
        except (ValueError, TypeError) as e:
            raise InputError(f"response_format json_schema.schema: {e}") from None
    if kind == "regex":
        regex = response_format.get("regex")
        if not isinstance(regex, str) or not regex:
            raise InputError("response_format type 'regex' needs a non-empty 'regex' string")
        return llg.LLMatcher.grammar_from_regex(regex)
    if kind == "grammar":
        lark = response_format.get("grammar")
        if not isinstance(lark, str) or not lark.strip():
            raise InputError("response_format type 'grammar' needs a non-empty 'grammar' string (Lark syntax, as "
                             "llguidance reads it)")
        return llg.LLMatcher.grammar_from_lark(_bounded_json_blocks(lark))
    if kind == "choice":
        choices = response_format.get("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise InputError(f"response_format type 'choice' needs a non-empty 'choices' list of strings, got "
                             f"{choices!r:.80}")
        # One terminal (one lexeme, as vLLM's regex alternation of the choices): the answer is one choice whole, and
        # EOS is allowed only once it is; json.dumps writes each as a Lark string literal (llguidance reads its
        # escapes), so no character of a choice is read as syntax
        return llg.LLMatcher.grammar_from_lark("start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c) for c in choices))
    raise InputError(f"response_format type {kind!r} is not supported (supported: {', '.join(FORMATS)})")


def _schema_of(response_format: dict) -> dict:
    """The JSON schema of a response_format of type json_schema (OpenAI's {"json_schema": {"schema": ...}}, a bare
    {"json_schema": {...schema...}}, or the schema as a JSON string), checked to be an object."""
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise InputError("response_format type 'json_schema' needs a 'json_schema' object holding the 'schema'")
    schema = spec.get("schema", spec if "type" in spec or "properties" in spec or "$ref" in spec else None)
    if schema is None and "schema" not in spec:   # not "got None": the client gave no None, but no 'schema' either
        raise InputError(f"response_format type 'json_schema' needs its schema under 'schema' "
                         f"({{'name': ..., 'schema': {{...}}}}), got the keys {sorted(spec)!r:.80}")
    return schema_object(schema, "response_format json_schema.schema")


def schema_object(value, field: str) -> dict:
    """A JSON schema given as an object or as a JSON string of one (both forms that OpenAI's and vLLM's clients
    send), checked to be an object; an InputError naming `field` otherwise."""
    schema = value
    if isinstance(value, str):
        try:
            schema = read_json(value)
        except ValueError as e:
            raise InputError(f"{field} is not valid JSON (a JSON schema, or a JSON string of one): {e}") from None
    if not isinstance(schema, dict):
        raise InputError(f"{field} must be a JSON schema object (or a JSON string of one), got "
                         f"{json.dumps(value, default=str)[:80]}")
    # a bound of hundreds of digits (a string's, or the CLI's, which no request walk saw) reached llguidance, whose
    # "Value is not JSON serializable" quoted it whole
    refuse_huge_ints({field: schema})
    return schema


# vLLM's constraints: its structured_outputs object's keys (vLLM >= 0.10), and its older guided_json, guided_regex,
# guided_choice and guided_grammar request fields, which mean the same
VLLM_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def vllm_format(kind: str, value, field: str) -> dict:
    """The response_format that vLLM's constraint `kind` (VLLM_KINDS) with this value means, so that it takes the one
    path response_format takes. field: the request's name for it (guided_regex, structured_outputs.regex, ...), which
    a malformed value's InputError names.

    json: a JSON schema object, or a JSON string of one; regex: a string; choice: a list of strings (the answer is
    exactly one); json_object: true; grammar: as vLLM's guidance backend (llguidance) reads it, Lark (llguidance's,
    with a `start:` rule) or GBNF/EBNF (llama.cpp's, `root ::= ...`, which vLLM's xgrammar backend takes), the latter
    turned into Lark by llguidance's own converter."""
    def refuse(what: str):
        raise InputError(f"{field} must be {what}, got {json.dumps(value, default=str)[:80]}")

    if kind == "json":
        return {"type": "json_schema", "json_schema": {"schema": schema_object(value, field)}}
    if kind == "json_object":
        if value is not True:
            refuse("true or false")
        return {"type": "json_object"}
    if kind == "regex":
        if not isinstance(value, str) or not value:
            refuse("a non-empty regex string")
        return {"type": "regex", "regex": value}
    if kind == "choice":
        if not isinstance(value, list) or not value:
            refuse("a non-empty list of strings (the answer is exactly one of them)")
        for i, c in enumerate(value):
            if not isinstance(c, str):
                raise InputError(f"{field}[{i}] must be a string, got {json.dumps(c, default=str)[:80]}")
        return {"type": "choice", "choices": list(value)}
    if kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            refuse("a non-empty grammar string (Lark, as llguidance reads it, or GBNF/EBNF)")
        _llguidance()
        from llguidance.gbnf_to_lark import any_to_lark
        try:
            lark = any_to_lark(value)
        except Exception as e:      # the converter's own error types
            # only text without a `start:` rule is converted: a Lark grammar goes through unread
            raise InputError(f"{field}, read as GBNF/EBNF (llama.cpp's 'root ::= ...' syntax; Lark, llguidance's, "
                             f"is taken too, with a 'start:' rule): {e}") from None
        return {"type": "grammar", "grammar": lark}
    raise InputError(f"{field}: no such constraint (vLLM's are {', '.join(VLLM_KINDS)})")


# keywords whose value maps names to schemas, and those whose value is data, not a schema (closed_objects)
_NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_DATA_KEYS = ("enum", "const", "default", "examples")


def closed_objects(response_format):
    """A json_schema response_format whose object schemas that list properties (or patternProperties) and say nothing
    of others take no others ("additionalProperties": false), as vLLM's structured_outputs.disable_additional_properties
    asks (its guidance backend walks the schema the same way: every nested object, definitions included). A schema's
    own additionalProperties stays; other response_formats come back as they are (json_object lists no properties)."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return response_format

    def close(node):
        if isinstance(node, list):
            return [close(value) for value in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key in _NAMED_SCHEMAS and isinstance(value, dict):
                # names -> schemas: the map is no schema (a property called "properties" must not be closed)
                out[key] = {name: close(schema) for name, schema in value.items()}
            else:
                out[key] = value if key in _DATA_KEYS else close(value)
        if "additionalProperties" not in out and ("properties" in out or "patternProperties" in out):
            out["additionalProperties"] = False
        return out

    return {"type": "json_schema", "json_schema": {"schema": close(_schema_of(response_format))}}


def json_whitespace(response_format, field: str, pattern: str | None = None, compact: bool = False):
    """A JSON response_format (json_object, json_schema) with the whitespace between its tokens set as vLLM's options
    set it: `pattern` (guided_whitespace_pattern, structured_outputs.whitespace_pattern: a regex of the whitespace
    allowed), or `compact` (structured_outputs.disable_any_whitespace: none), written into the schema's own
    "x-guidance" settings, which _json_grammar keeps. None for a response_format that is not JSON. field: the
    pattern's name, which a pattern that is no regex is an InputError naming."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in ("json_object", "json_schema"):
        return None
    schema = {"type": "object"} if kind == "json_object" else _schema_of(response_format)
    own = schema.get("x-guidance")
    own = dict(own) if isinstance(own, dict) else {}
    if pattern is not None:
        if not isinstance(pattern, str):
            raise InputError(f"{field} must be a regex string, got {json.dumps(pattern, default=str)[:80]}")
        if _lone_surrogate(pattern) is not None:
            raise InputError(f"{field} is not valid Unicode (a lone surrogate escape such as \\ud800)")
        llg = _llguidance()
        error = llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_regex(pattern))
        if error:
            raise InputError(f"{field}: {_said(error)}")
        own["whitespace_pattern"] = pattern         # llguidance: a pattern overrides whitespace_flexible
    elif compact:
        own.pop("whitespace_pattern", None)
        own["whitespace_flexible"] = False          # no whitespace at all between JSON's tokens
    else:
        return response_format
    return {"type": "json_schema", "json_schema": {"schema": {**schema, "x-guidance": own}}}


# Keywords llguidance refuses ("Unimplemented keys") though these values of them constrain nothing, as pydantic,
# zod and other generators may write them: dropped before compiling (other values stay, and stay refused)
_NO_OP = {"uniqueItems": (False,), "minContains": (0,), "unevaluatedProperties": (True, {}),
          "unevaluatedItems": (True, {}), "propertyNames": (True, {}), "dependentRequired": ({},),
          "dependentSchemas": ({},), "dependencies": ({},)}
_SUBSCHEMA = ("items", "additionalProperties", "additionalItems", "contains", "not", "if", "then", "else",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _no_op(key: str, value) -> bool:
    # `is`/type checks: 0 == False and 1 == True in Python, but minContains: false is no count
    return any(value is v if isinstance(v, bool) else type(value) is type(v) and value == v
               for v in _NO_OP.get(key, ()))


def without_no_ops(schema):
    """A copy of a JSON schema less the keywords whose values constrain nothing but that llguidance refuses (_NO_OP),
    at every level a subschema sits (properties, items, $defs, anyOf, ...); the caller's schema is not changed.
    Property names and values (enum, const, default) are data, never read as keywords."""
    if not isinstance(schema, dict):
        return schema
    return _subschemas_mapped(schema, without_no_ops, skip=_no_op)


def _subschemas_mapped(schema: dict, fn, skip=lambda key, value: False) -> dict:
    """A copy of a schema object with fn applied to every subschema it holds directly (each property's, items,
    anyOf's members, ...), the keys skip(key, value) names left out."""
    out = {}
    for key, value in schema.items():
        if skip(key, value):
            continue
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            value = {k: fn(v) for k, v in value.items()}
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            value = [fn(v) for v in value]
        elif key in _SUBSCHEMA:
            value = fn(value)
        out[key] = value
    return out


def _whole(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value == int(value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# llguidance reads number bounds as 64-bit floats, which hold whole numbers exactly only up to 2^53 in magnitude
EXACT_BOUND = 2 ** 53
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# branches (anyOf/oneOf under allOf and $ref) past which the bounds a schema meets are checked all together, and
# the work (branches formed) past which a schema is refused rather than checked
_MAX_BRANCHES = 64
_MAX_WORK = 1_000_000


def _resolve(root, ref):
    """The subschema a local $ref ("#", "#/$defs/x", any JSON pointer into the root schema) names, or None (an
    anchor, another document, a pointer to nothing)."""
    if not isinstance(ref, str) or not ref.startswith("#") or (len(ref) > 1 and ref[1] != "/"):
        return None
    node = root
    for part in ref[2:].split("/") if len(ref) > 1 else ():
        part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


class _Coarse(list):
    """Every schema of more branches than _MAX_BRANCHES, checked as one: any exclusive bound against any other bound
    (which may refuse bounds that never meet, never misses ones that do)."""


class _Merges:
    """The schemas llguidance intersects at each place of one schema, one list per branch: it merges allOf's members
    and a $ref's target with the schema beside them, and distributes the merge over anyOf and oneOf, so a branch's
    bounds are the tightest of every schema on its way. Each subschema's branches are worked out once (a $ref's
    target is shared by every place naming it), and the work in all is bounded: a request's schema is user input."""

    def __init__(self, root):
        self.root, self.ways, self.work, self.checked = root, {}, 0, set()

    def spend(self, n: int = 1):
        self.work += n
        if self.work > _MAX_WORK:
            raise InputError(f"response_format json_schema.schema combines allOf, anyOf, oneOf and $ref in more "
                             f"ways than its number bounds can be checked in (over {_MAX_WORK}); simplify it")

    def product(self, ways: list, more: list) -> list:
        self.spend(len(ways) * len(more) + sum(map(len, ways)) * len(more) + sum(map(len, more)) * len(ways))
        out = [_Coarse(a + b) if isinstance(a, _Coarse) or isinstance(b, _Coarse) else a + b
               for a in ways for b in more]
        if len(out) > _MAX_BRANCHES:
            out = [_Coarse({id(n): n for way in out for n in way}.values())]
        return out

    def of(self, node) -> list[list[dict]]:
        if node is False:
            return []
        if not isinstance(node, dict):
            return [[]]
        if id(node) in self.ways:       # None: a cycle of allOf and $ref, which llguidance refuses itself
            return [[]] if self.ways[id(node)] is None else self.ways[id(node)]
        self.ways[id(node)] = None
        own = [[node]]
        if isinstance(node.get("allOf"), list):
            own = self.product(own, self.all(node["allOf"]))
        if (target := _resolve(self.root, node.get("$ref"))) is not None:
            own = self.product(own, self.of(target))
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                own = self.product(own, [way for sub in node[key] for way in self.of(sub)])
        self.ways[id(node)] = own
        return own

    def all(self, nodes) -> list[list[dict]]:
        ways = [[]]
        for node in nodes:
            ways = self.product(ways, self.of(node))
        return ways


def _bound(node: dict, key: str):
    value = node.get(key)
    if value is True and key.startswith("exclusive"):    # draft 4's: the inclusive bound beside it, excluded
        value = node.get(key[9].lower() + key[10:])
    return value if _number(value) else None


def _refuse_inexact_range(way: list[dict], where: str) -> None:
    """An InputError for bounds that, merged as llguidance merges them, its number regex would hold too wide: an
    exclusive whole-number bound with the other bound inside the same unit (see refuse_inexact_bounds)."""
    at = f" at {where.lstrip('.')}" if where else ""
    met = " (the bounds meet through allOf, $ref or anyOf)" if len(way) > 1 else ""
    if isinstance(way, _Coarse):
        def each(keys, pick):
            return sorted(v for node in way
                          if (v := pick((u for k in keys if (u := _bound(node, k)) is not None), default=None))
                          is not None)
        uppers, lowers = each(("maximum", "exclusiveMaximum"), min), each(("minimum", "exclusiveMinimum"), max)
        for node in way:
            lo, hi = _bound(node, "exclusiveMinimum"), _bound(node, "exclusiveMaximum")
            if _whole(lo) and lo >= 0 and (i := bisect.bisect_right(uppers, lo)) < len(uppers) and uppers[i] < lo + 1:
                _refuse_one_unit("exclusiveMinimum", lo, f"an upper bound of {uppers[i]!r}{at}{met}",
                                 "minimum with the least")
            if _whole(hi) and hi <= 0 and (i := bisect.bisect_left(lowers, hi)) > 0 and lowers[i - 1] > hi - 1:
                _refuse_one_unit("exclusiveMaximum", hi, f"a lower bound of {lowers[i - 1]!r}{at}{met}",
                                 "maximum with the greatest")
        return
    numeric = True
    for node in way:
        kind = node.get("type")
        if isinstance(kind, str) and kind not in ("number", "integer") or \
                isinstance(kind, list) and not {"number", "integer"} & {t for t in kind if isinstance(t, str)}:
            numeric = False
    if not numeric or any(node.get("type") == "integer" for node in way):
        return      # no number here, or an integer range (llguidance names an empty one itself)
    bounds = {key: [v for node in way if (v := _bound(node, key)) is not None] for key in _BOUNDS}
    lo, hi = max(bounds["exclusiveMinimum"], default=None), min(bounds["exclusiveMaximum"], default=None)
    upper, lower = min(bounds["maximum"] + bounds["exclusiveMaximum"], default=None), \
        max(bounds["minimum"] + bounds["exclusiveMinimum"], default=None)
    # the range must be the exclusive bound's (an inclusive one past it is exact) and hold a value (llguidance
    # names an empty one)
    if _whole(lo) and lo >= 0 and upper is not None and lo < upper < lo + 1 and \
            max(bounds["minimum"], default=lo) <= lo:
        _refuse_one_unit("exclusiveMinimum", lo, f"an upper bound of {upper!r}{at}{met}", "minimum with the least")
    if _whole(hi) and hi <= 0 and lower is not None and hi - 1 < lower < hi and \
            min(bounds["maximum"], default=hi) >= hi:
        _refuse_one_unit("exclusiveMaximum", hi, f"a lower bound of {lower!r}{at}{met}", "maximum with the greatest")


def _refuse_one_unit(keyword: str, bound, other: str, instead: str):
    raise InputError(f"response_format json_schema.schema: {keyword} {bound!r} with {other} is not supported: the "
                     f"grammar engine (llguidance) cannot exclude a whole-number bound when both bounds lie within one "
                     f"unit (it would let {int(bound)} through); use {instead} value to allow, or bounds a unit apart "
                     f"or more")


def _shared_children(way: list[dict], where: str):
    """The subschemas that the schemas of one branch each give for the same place (a property, the items, an array
    position), which llguidance merges in turn: (list of them, path), for places two or more of them give."""
    names = {name: None for node in way if isinstance(node.get("properties"), dict) for name in node["properties"]}
    for name in names:
        subs = [node["properties"][name] if name in node.get("properties", {}) else node.get("additionalProperties")
                for node in way if isinstance(node.get("properties", {}), dict)]
        yield [s for s in subs if isinstance(s, (dict, bool))], f"{where}.properties.{name}"
    yield [node["additionalProperties"] for node in way if isinstance(node.get("additionalProperties"), dict)], \
        f"{where}.additionalProperties"
    yield [node["items"] for node in way if isinstance(node.get("items"), dict)], f"{where}.items"
    prefixes = [node["prefixItems"] for node in way if isinstance(node.get("prefixItems"), list)]
    for i in range(max(map(len, prefixes), default=0)):
        subs = [node["prefixItems"][i] if i < len(node.get("prefixItems", ())) else node.get("items")
                for node in way if isinstance(node.get("prefixItems", []), list)]
        yield [s for s in subs if isinstance(s, (dict, bool))], f"{where}.prefixItems[{i}]"


def _refuse_merged(nodes: list, merges: _Merges, where: str) -> None:
    for way in merges.all(nodes):
        if isinstance(way, _Coarse):
            if id(way) in merges.checked:
                continue
            merges.checked.add(id(way))
        _refuse_inexact_range(way, where)
        if len(way) > 1:
            for subs, at in _shared_children(way, where):
                if len(subs) > 1 and (ids := tuple(sorted(map(id, subs)))) not in merges.checked:
                    merges.checked.add(ids)
                    _refuse_merged(subs, merges, at)


def _shown(number) -> str:
    """A bound as an error quotes it: an integer of more than 20 digits by its digit count (10**400 was quoted whole;
    str() refuses one past 4300 digits)."""
    if isinstance(number, int) and (digits := int_digits(number)) > 20:
        return f"{'-' if number < 0 else ''}(an integer of {digits} digits)"
    return repr(number)


def _past_exact(value):
    """The first integer past 2^53 in magnitude in a JSON value (a const or enum), or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if abs(value) > EXACT_BOUND else None
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        if (found := _past_exact(item)) is not None:
            return found
    return None


def refuse_inexact_bounds(schema) -> None:
    """An InputError for a number range llguidance (1.9) compiles inexactly, at any level a subschema sits.

    An exclusive bound that is a whole number, with the other bound inside the same unit (exclusiveMinimum 0 with
    maximum 0.5, exclusiveMaximum -3 with minimum -3.5): its regex lets the excluded bound itself through, written as
    an integer ("0", "-3", "-0"): a sampled answer {"p": 0} under {"exclusiveMinimum": 0, "maximum": 0.5}, valid JSON
    that breaks the schema. The bounds are seen as llguidance merges them: through allOf, a $ref and the schema
    beside it, anyOf/oneOf branches, and the properties and items such merged objects and arrays share
    ({"allOf": [{"exclusiveMinimum": 0}, {"maximum": 0.5}]} let 0 through as well). Bounds a unit apart or more,
    and inclusive ones, compile exactly.

    A bound past 2^53 in magnitude (EXACT_BOUND): llguidance reads bounds as 64-bit floats, so minimum
    9007199254740993 let 9007199254740992 through (and 10**17 + 1 let 10**17), and integer bounds past 2^63 were
    clamped to it; a const or enum integer past it too (const 9007199254740993 took 9007199254740992 only). Refused,
    naming the keyword and where it is, rather than ignored."""
    if not isinstance(schema, dict):
        return
    nodes = list(_nodes(schema))
    # every bound past 2^53 first: the merged checks' arithmetic on one (10**400 as a float) raised OverflowError
    for node, where in nodes:
        _refuse_past_exact(node, where)
    merges = _Merges(schema)
    for node, where in nodes:
        _refuse_merged([node], merges, where)


def _nodes(schema, where: str = ""):
    """Every schema object a schema holds, itself first, with where it sits (as the refusals name it)."""
    if not isinstance(schema, dict):
        return
    yield schema, where
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from _nodes(sub, f"{where}.{key}.{name}")
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                yield from _nodes(sub, f"{where}.{key}[{i}]")
        elif key in _SUBSCHEMA:
            yield from _nodes(value, f"{where}.{key}")


def _refuse_past_exact(schema: dict, where: str) -> None:
    at = f" at {where.lstrip('.')}" if where else ""
    for key in _BOUNDS:
        if _number(value := schema.get(key)) and abs(value) > EXACT_BOUND:
            raise InputError(f"response_format json_schema.schema: {key} {_shown(value)}{at} is not supported: bounds "
                             f"are held exactly only up to 2^53 = {EXACT_BOUND} in magnitude (the grammar engine, "
                             f"llguidance, reads them as 64-bit floats: {EXACT_BOUND + 1} becomes {EXACT_BOUND}); "
                             f"use a bound within -{EXACT_BOUND}..{EXACT_BOUND}")
    for key in ("const", "enum"):
        if key in schema and (value := _past_exact(schema[key])) is not None:
            raise InputError(f"response_format json_schema.schema: {key}{at} holds the integer {_shown(value)}, "
                             f"which is not supported: the grammar engine (llguidance) reads numbers as 64-bit "
                             f"floats, exact only up to 2^53 = {EXACT_BOUND} in magnitude ({EXACT_BOUND + 1} would "
                             f"be held as {EXACT_BOUND})")


# RFC 3339's full-date, leap years exact (Gregorian: every 4th year, not centuries but every 4th of them; year 0000
# is one). llguidance's own "date" regex takes 02-29 in every year (2023-02-29 passed): a node with format "date" or
# "date-time" is held to this as a pattern too (llguidance intersects a pattern with the format's regex)
_DATE = (r"(?:[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         r"|02-(?:0[1-9]|1[0-9]|2[0-8]))|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
         r"-02-29)")
_EXACT_DATES = {"date": f"^{_DATE}$", "date-time": f"^{_DATE}[tT]"}


def _with_exact_dates(schema):
    """A copy of a JSON schema whose "date" and "date-time" formats are also held to _DATE (as a pattern, or an
    allOf member beside a pattern of its own), at every level a subschema sits; the caller's schema is not changed."""
    if not isinstance(schema, dict):
        return schema
    out = _subschemas_mapped(schema, _with_exact_dates)
    fmt = out.get("format")
    pattern = _EXACT_DATES.get(fmt) if isinstance(fmt, str) else None
    if pattern is not None and "pattern" not in out:
        out["pattern"] = pattern
    elif pattern is not None and isinstance(out.get("allOf", []), list):
        out["allOf"] = [*out.get("allOf", []), {"pattern": pattern}]
    return out


# keys that name where a schema sits or how it is read, kept on the outside when a number is wrapped in an anyOf
_KEPT_OUTSIDE = ("$defs", "definitions", "x-guidance", "$schema", "$id", "$anchor")
# significant digits of a fractional bound llguidance (1.9) reads exactly: past them it misplaced the bound (minimum
# 9696370110.795141 let 9696370110.79514 through, maximum 63195626.871465564 took 63195626.871465565)
_EXACT_DIGITS = 15
# trailing-zero steps past an exclusive bound taken back (_with_bound_points)
_LADDER = 4


def _decimal(value) -> Decimal:
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def _with_bound_points(schema):
    """A copy of a JSON schema whose number bounds llguidance (1.9) reads exactly, and whose bounded numbers take
    back the writings llguidance refuses inside the bounds, at every level a subschema sits; the caller's schema is
    not changed.

    A fractional bound of more than 15 significant digits is rounded inward to 15 (it was misread: see
    _EXACT_DIGITS): a value within 1e-15 of it (relative) is refused, none outside let through; bounds that hold
    no value once rounded are an InputError. A whole bound written as a float (3752768928017238.0) is passed as an
    integer, which llguidance reads exactly up to 2^53.

    llguidance writes a fractional bound's range digit by digit and drops the bound's digits cut short: under
    maximum 0.25 it refused 0.2 (0.20, 0.21 and 0.25 passed), under minimum -0.25 it refused -0.2; and it never took
    -0. Past an exclusive bound (and on the negative side of a range holding 0) its fraction had to end in a nonzero
    digit: 0.50 was refused under exclusiveMinimum 0, -0.50 under minimum -1. Each is added back as an anyOf branch
    llguidance writes exactly: a point (minimum = maximum, written as its shortest digits) for every truncation of a
    bound's digits inside the bounds, the bound itself and -0 where they are inside; and the ranges of one digit
    more past the exclusive bound ([0.1, 1), [0.01, 0.1), ... _LADDER of them), whose writings all pass.

    So every value the bounds hold is taken in its shortest writing (no exponent, no trailing zero), and most
    trailing zeros too. Still refused: an exponent (2e-1; llguidance writes none under bounds), and trailing zeros
    right after a point or an inclusive fractional bound (0.250 under maximum 0.25, 0.10 under maximum 0.105),
    after _LADDER zeros or more past an exclusive bound, and on -0 (-0.0). Only a number schema standing alone gets
    branches: its bounds, type and annotations, no allOf, anyOf, oneOf, $ref, const, enum or multipleOf beside them
    (whose values a branch might break)."""
    if not isinstance(schema, dict):
        return schema
    out = _subschemas_mapped(schema, _with_bound_points)
    rounded = {}
    for key in _BOUNDS:
        value = out.get(key)
        if isinstance(value, float) and _whole(value) and abs(value) <= EXACT_BOUND:
            # as an integer: exclusiveMaximum 3752768928017238.0 took 3752768928017238 (3752768928017238 did not)
            out[key] = int(value)
        elif isinstance(value, float) and math.isfinite(value) and \
                len(_decimal(value).as_tuple().digits) > _EXACT_DIGITS:
            rounding = "ROUND_CEILING" if key.endswith("inimum") else "ROUND_FLOOR"
            exact = _decimal(value)
            places = _EXACT_DIGITS - exact.adjusted() - 1
            out[key] = float(exact.quantize(Decimal(1).scaleb(-places), rounding=rounding))
            rounded[key] = value
    if rounded and _empty_range({**out, **rounded}):
        out.update(rounded)         # empty as written: llguidance names it with the request's own numbers
    elif rounded and _empty_range(out):
        said = ", ".join(f"{k} {v!r}" for k, v in rounded.items())
        raise InputError(f"response_format json_schema.schema: {said} {'are' if len(rounded) > 1 else 'is'} not "
                         f"supported: the grammar engine "
                         f"(llguidance) reads a bound to {_EXACT_DIGITS} significant digits (with more it let a value "
                         f"just past the bound through), and rounded inward to them these bounds hold no value; use "
                         f"bounds of at most {_EXACT_DIGITS} significant digits")
    branches = _bound_branches(out)
    if not branches:
        return out
    inner = {k: v for k, v in out.items() if k not in _KEPT_OUTSIDE}
    return {**{k: v for k, v in out.items() if k in _KEPT_OUTSIDE}, "anyOf": [inner, *branches]}


def _empty_range(node: dict) -> bool | None:
    """Whether a schema's bounds hold no number (None where it has no lower and upper bound)."""
    lows = [v for k in ("minimum", "exclusiveMinimum") if (v := _bound(node, k)) is not None]
    highs = [v for k in ("maximum", "exclusiveMaximum") if (v := _bound(node, k)) is not None]
    if not lows or not highs:
        return None
    return max(lows) > min(highs) or max(lows) == min(highs) and \
        (_bound(node, "exclusiveMinimum") is not None or _bound(node, "exclusiveMaximum") is not None)


def _read_exactly(value: Decimal) -> int | float | None:
    """value as llguidance reads it exactly, or None: a whole number as an integer (up to 2^53: minimum = maximum =
    -9006453926417580.0 took -9006453926417581), else a float of at most _EXACT_DIGITS significant digits."""
    if value == value.to_integral_value():
        return int(value) if abs(value) <= EXACT_BOUND else None
    f = float(value)
    return f if _decimal(f) == value and len(value.normalize().as_tuple().digits) <= _EXACT_DIGITS else None


def _bound_branches(node: dict) -> list[dict]:
    kind = node.get("type")
    if not (kind == "number" or isinstance(kind, list) and "number" in kind) or \
            any(k in node for k in ("allOf", "anyOf", "oneOf", "$ref", "const", "enum", "multipleOf", "not")):
        return []
    bounds = {k: _decimal(v) for k in _BOUNDS if (v := _bound(node, k)) is not None}
    if not bounds or any(not v.is_finite() or abs(v) > EXACT_BOUND for v in bounds.values()):
        return []
    lows = [(v, k == "exclusiveMinimum") for k, v in bounds.items() if k.endswith("inimum")]
    highs = [(v, k == "exclusiveMaximum") for k, v in bounds.items() if k.endswith("aximum")]
    low = max(lows, default=None)                       # (value, exclusive): a tie is the exclusive one
    high = min(highs, key=lambda h: (h[0], not h[1]), default=None)

    def above(t: Decimal) -> bool:
        return low is None or t > low[0] or t == low[0] and not low[1]

    def below(t: Decimal) -> bool:
        return high is None or t < high[0] or t == high[0] and not high[1]

    def inside(t: Decimal) -> bool:
        return above(t) and below(t)

    values = set()
    for bound in bounds.values():
        places = -bound.as_tuple().exponent
        values |= {bound.quantize(Decimal(1).scaleb(-p), rounding="ROUND_DOWN") for p in range(max(places, 0))}
        values.add(bound)
    branches = [{"type": "number", "minimum": f, "maximum": f} for t in sorted(values)
                if inside(t) and (f := _read_exactly(t)) is not None]
    if inside(Decimal(0)):
        branches.append({"type": "number", "minimum": -0.0, "maximum": -0.0})       # written "-0"
    # past an exclusive lower bound >= 0 (positive values), and an exclusive upper bound <= 0 or the 0 a range
    # crosses (negative values, by magnitude)
    ladders = []
    if low is not None and low[1] and low[0] >= 0:
        ladders.append((low[0], 1))
    if high is not None and high[1] and high[0] <= 0:
        ladders.append((-high[0], -1))
    elif (low is None or low[0] < 0) and (high is None or high[0] >= 0):
        ladders.append((Decimal(0), -1))
    for base, sign in ladders:
        places = max(-base.normalize().as_tuple().exponent, 0)       # 0.0 and 0 both start at 0.1
        for k in range(1, _LADDER + 1):
            a, b = base + Decimal(1).scaleb(-places - k), base + Decimal(1).scaleb(-places - k + 1)
            if (fa := _read_exactly(a)) is None or (fb := _read_exactly(b)) is None:
                break
            if sign > 0 and above(a) and (high is None or b <= high[0]):          # [a, b)
                branches.append({"type": "number", "minimum": fa, "exclusiveMaximum": fb})
            elif sign < 0 and below(-a) and (low is None or -b >= low[0]):         # (-b, -a]
                branches.append({"type": "number", "exclusiveMinimum": -fb, "maximum": -fa})
    return branches


def _held(schema: dict) -> dict:
    """The schema llguidance compiles for a JSON schema: refused where it would compile it too wide, less the no-op
    keywords it refuses, its dates held exact, its bounded numbers' refused values added (_with_bound_points)."""
    refuse_inexact_bounds(schema)
    return _with_bound_points(_with_exact_dates(without_no_ops(schema)))


def _bounded_json_blocks(lark: str) -> str:
    """A Lark grammar whose `%json {schema}` blocks take the bounded whitespace a json_schema response_format takes
    (JSON_WHITESPACE, unless the schema sets its own "x-guidance" whitespace) and drop the no-op keywords it drops:
    with llguidance's default, a model unsure how to go on padded the JSON with blanks until max_new_tokens ran out.
    A `%json` not followed by a JSON object (inside a string or comment, say) is left as it is."""
    decoder, out, at = json.JSONDecoder(), [], 0
    for m in re.finditer(r"%json\b\s*", lark):
        if m.start() < at:
            continue
        try:
            schema, end = decoder.raw_decode(lark, m.end())
        except ValueError:
            continue
        if not isinstance(schema, dict):
            continue
        try:
            schema = _held(schema)
        except InputError as e:     # said of a json_schema, which this request (a grammar, tools) did not send
            raise InputError(f"response_format: a %json block's schema"
                             f"{str(e).removeprefix('response_format json_schema.schema')}") from None
        own = schema.get("x-guidance")
        if not (isinstance(own, dict) and ("whitespace_flexible" in own or "whitespace_pattern" in own)):
            schema["x-guidance"] = {**(own if isinstance(own, dict) else {}), "whitespace_pattern": JSON_WHITESPACE}
        out += [lark[at:m.end()], json.dumps(schema, ensure_ascii=False)]
        at = end
    return "".join(out) + lark[at:]


def _json_grammar(llg, schema: dict) -> str:
    schema = _held(schema)
    own = schema.get("x-guidance")
    if isinstance(own, dict) and ("whitespace_flexible" in own or "whitespace_pattern" in own):
        defaults = None         # the client's own whitespace (a default pattern would override whitespace_flexible)
    else:
        defaults = {"whitespace_pattern": JSON_WHITESPACE}
    return llg.LLMatcher.grammar_from_json_schema(schema, defaults=defaults)


def format_key(response_format) -> str | None:
    """A canonical text of a response_format: requests whose keys are equal may share a run."""
    return None if response_format is None else json.dumps(response_format, sort_keys=True, default=str)


class _PieceTokenizer:
    """llguidance's TokenizerWrapper protocol for a sentencepiece vocabulary: a `tokenizer.model`, or a GGUF
    'llama' one (its rebuilt tokenizers JSON has no decoder llguidance can read: "can't determine decoder type").
    tokenizer.json files and GGUF byte-level vocabularies are handed to llguidance as tokenizers JSON.

    llguidance tokenizes the bytes a grammar forces with __call__ and allows only that tokenization's first token:
    it must be the text's own tokens, without the dummy-prefix `▁` sentencepiece puts in front of a text (with it,
    "-" forced after "abc" came out as `▁`, the grammar's matcher broke, and the answer went on unconstrained)."""

    def __init__(self, tok, backend, n_vocab: int):
        from .tokenizer import _byte_piece
        decoder = backend.decode                  # the _PieceDecoder: the pieces as the engine decodes them
        self.eos_token_id = tok.eos_ids[0] if tok.eos_ids else None
        self.bos_token_id = tok.bos_id
        self.special_token_ids = sorted(backend.special_ids)
        self.tokens, self._bytes = [], {}
        for i, piece in enumerate(decoder.pieces):
            byte = _byte_piece(piece)
            if byte is not None:
                self._bytes.setdefault(byte, i)
            self.tokens.append(bytes([byte]) if byte is not None else piece.replace("\u2581", " ").encode("utf-8"))
        # ids past the tokenizer's, up to the model's logits: never allowed (llguidance ignores n_vocab for a
        # TokenizerWrapper, and a shorter mask than the logits was "ValueError: Invalid buffer size")
        self.tokens += [b""] * (n_vocab - len(self.tokens))
        self._pieces = decoder.pieces
        self._ids = {}
        for i, piece in enumerate(decoder.pieces):
            self._ids.setdefault(piece, i)
        if hasattr(backend, "sp"):                # tokenizer.model: one stretch, its dummy prefix taken off
            self._encode = self._unprefixed(backend.sp.encode) if decoder.dummy_prefix else backend.sp.encode
        else:                                     # GGUF: the BPE itself adds no prefix (the backend's encode does)
            self._encode = lambda text: backend.tok.encode(text, add_special_tokens=False).ids

    def _unprefixed(self, encode):
        def tokens(text: str) -> list[int]:
            ids = list(encode(text))
            if not ids or not self._pieces[ids[0]].startswith("\u2581"):
                return ids
            rest = self._pieces[ids[0]][1:]       # the first piece less the prefix: a piece, else its bytes
            if not rest:
                return ids[1:]
            if rest in self._ids:
                return [self._ids[rest]] + ids[1:]
            raw = rest.replace("\u2581", " ").encode("utf-8")
            if all(b in self._bytes for b in raw):
                return [self._bytes[b] for b in raw] + ids[1:]
            return ids
        return tokens

    def __call__(self, text):
        return list(self._encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text))


def ll_tokenizer(tokenizer, vocab_size: int, eos_ids=None):
    """The llguidance tokenizer for an engine's tokenizer (built once: ~0.2 s for a 49k vocabulary), masks
    `vocab_size` wide (the model's logits; ids past the tokenizer's are never allowed). eos_ids: the ids that end
    an answer (the engine's), the only ones a complete grammar allows."""
    from .tokenizer import _PieceDecoder
    eos = list(eos_ids if eos_ids is not None else tokenizer.eos_ids) or None
    key = (vocab_size, tuple(eos or ()))
    cached = getattr(tokenizer, "_llguidance", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    llg = _llguidance()
    backend = tokenizer._backend
    n_vocab = max(vocab_size, tokenizer.vocab_size)
    if isinstance(getattr(backend, "decode", None), _PieceDecoder):
        source = llg.TokenizerWrapper(_PieceTokenizer(tokenizer, backend, n_vocab))
    elif hasattr(backend, "tok"):
        source = backend.tok.to_str()
    else:
        raise ConfigError(f"response_format: no grammar support for this tokenizer ({type(backend).__name__})")
    try:
        lt = llg.LLTokenizer(source, n_vocab=n_vocab, eos_token=eos)
    except Exception as e:      # llguidance's own error types
        raise ConfigError(f"response_format: llguidance cannot read this tokenizer ({tokenizer.source}): {e}") from None
    tokenizer._llguidance = (key, lt)
    return lt


class Grammar:
    """A compiled response_format for one engine's tokenizer: makes each run's per-row matchers."""

    def __init__(self, response_format, tokenizer, vocab_size: int, eos_ids=None):
        self.source = grammar_source(response_format)
        if self.source is None:
            raise InputError("Grammar needs a constraining response_format (not None or {'type': 'text'})")
        llg = _llguidance()
        self.tokenizer = ll_tokenizer(tokenizer, vocab_size, eos_ids)
        self.vocab_size = vocab_size
        error = llg.LLMatcher.validate_grammar(self.source, self.tokenizer)
        if error:
            raise InputError(f"response_format: {_said(error)}")
        self._check_some_text()

    def _check_some_text(self):
        """A grammar that matches no text at all (a regex like [^\\s\\S], a schema whose $refs only cycle, a rule
        that only recurses) is valid to llguidance, whose mask then allows EOS alone: the answer was "" with
        finish_reason "eos", valid under nothing the client asked for. Named here, before any model work."""
        m = self.matcher()
        if m.is_accepting():
            return                  # the empty answer is one the grammar takes
        eos = set(self.tokenizer.eos_tokens)
        bits = torch.empty((self.tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
        m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
        ids = torch.arange(self.tokenizer.vocab_size)
        allowed = ((bits[ids // 32] >> (ids % 32).to(torch.int32)) & 1).nonzero().flatten().tolist()
        if all(i in eos for i in allowed):
            raise InputError("response_format matches no text at all (its regex, schema or grammar allows no "
                             "answer, not even an empty one): check it for a contradiction or a rule that only "
                             "refers to itself")

    def matcher(self):
        llg = _llguidance()
        m = llg.LLMatcher(self.tokenizer, self.source, log_level=0)
        if m.is_error():
            raise InputError(f"response_format: {_said(m.get_error())}")
        return m


class Constraint:
    """The matchers of one run's rows and the masks they give. consume() advances rows by the tokens they emitted;
    apply() and apply_tree() mask logits [B, V] / [B, N, V] on their device."""

    def __init__(self, grammar: Grammar, rows: int, device):
        self.grammar, self.device = grammar, device
        self.matchers = [grammar.matcher() for _ in range(rows)]
        self._V = grammar.vocab_size
        # llguidance writes a mask of its own vocabulary's width (the tokenizer's where it is the larger): the
        # logits' V bits are read from the front of it
        self._words = (max(self._V, grammar.tokenizer.vocab_size) + 31) // 32
        # bits -> bools by bytes: byte k of the little-endian words holds tokens 8k..8k+7 (one lookup per byte; the
        # shift-and-mask per token it replaces took ~0.3 ms of a ~4 ms 4-bit SmolLM2 step)
        self._lut = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool().to(device)
        self._root_bits = None      # first_head's masks of the rows' current states, reused by apply_tree's node 0

    def consume(self, tokens: torch.Tensor, counts: torch.Tensor):
        """tokens [B, n], counts [B]: row b emitted its first counts[b] tokens."""
        toks, cnt = tokens.tolist(), counts.tolist()
        for m, row, c in zip(self.matchers, toks, cnt):
            if not m.is_error():
                m.consume_tokens([int(t) for t in row[:c]])   # past the grammar's end (an ended row): error, no mask

    def keep(self, keep: list[int]):
        self.matchers = [self.matchers[i] for i in keep]

    def _row_mask(self, m, out: torch.Tensor, i: int):
        if m.is_error():
            out[i] = -1            # an ended row (or a broken one): nothing left to hold it to
        else:                      # the mask's bits straight into row i (a contiguous CPU int32 tensor)
            m.unsafe_compute_mask_ptr(out[i].data_ptr(), out.shape[1] * 4)

    def _allowed(self, bits: torch.Tensor, device) -> torch.Tensor:
        """bits [..., words] int32 (llguidance's layout: token t is bit t % 32 of word t // 32) -> bool [..., V]."""
        if sys.byteorder != "little":
            ids = torch.arange(self._V)
            return (((bits[..., ids // 32] >> (ids % 32).to(torch.int32)) & 1) == 1).to(device)
        by = bits.view(torch.uint8).to(device)
        return self._lut[by.long()].flatten(-2)[..., :self._V]

    def _masked(self, logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return logits.float().masked_fill(~self._allowed(bits, logits.device), float("-inf"))

    def _state_bits(self) -> torch.Tensor:
        bits = torch.empty(len(self.matchers), self._words, dtype=torch.int32)
        for i, m in enumerate(self.matchers):
            self._row_mask(m, bits, i)
        return bits

    def first_head(self, draft: torch.Tensor, token_ids=None) -> torch.Tensor:
        """A speculative step's drafts [B, K, V or draft vocabulary] with the first head's guesses (the tokens right
        after the root, whose grammar state is the row's own) held to the grammar: a tree then spends no node on a
        token verification must reject. Drafts only: what is accepted is decided by apply_tree's masks. token_ids:
        the heads' map of draft slots to token ids, None where the drafts score token ids. A row whose allowed tokens
        are all outside the draft vocabulary keeps its drafts."""
        self._root_bits = bits = self._state_bits()
        allowed = self._allowed(bits, draft.device)
        if token_ids is not None:          # draft slots -> token ids (the heads' draft vocabulary)
            allowed = allowed[:, token_ids(torch.arange(draft.shape[-1], device=draft.device))]
        allowed |= ~allowed.any(-1, keepdim=True)
        draft = draft.clone()
        draft[:, 0] = draft[:, 0].masked_fill(~allowed, float("-inf"))
        return draft

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V]: each row masked by its matcher's state."""
        return self._masked(logits, self._state_bits())

    def apply_tree(self, logits: torch.Tensor, tokens: torch.Tensor, ancestors: torch.Tensor,
                   depth: torch.Tensor) -> torch.Tensor:
        """logits [B, N, V] of a tree's nodes (node 0 the root, its token already consumed); tokens [B, N];
        ancestors [B or 1, N, N] bool (ancestor-or-self); depth [B or 1, N]. Node i is masked by its row's matcher
        advanced along i's path below the root; a node whose path the grammar forbids cannot be accepted (its
        parent's mask forbids its token) and gets no mask of its own."""
        B, N = tokens.shape
        toks, anc, dep = tokens.tolist(), ancestors.expand(B, N, N).tolist(), depth.expand(B, N).tolist()
        bits = torch.full((B * N, self._words), -1, dtype=torch.int32)
        root, self._root_bits = self._root_bits, None
        for b, m in enumerate(self.matchers):
            for i in range(N):
                if m.is_error():
                    break
                if i == 0 and root is not None:      # node 0's path is empty: the row's state, masked already
                    bits[b * N] = root[b]
                    continue
                path = sorted((j for j in range(1, N) if anc[b][i][j]), key=lambda j: dep[b][j])
                path_toks = [toks[b][j] for j in path]
                took = m.try_consume_tokens(path_toks) if path_toks else 0
                if took == len(path_toks):
                    self._row_mask(m, bits, b * N + i)
                if took:
                    m.rollback(took)
        return self._masked(logits, bits.view(B, N, -1))
