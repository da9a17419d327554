"""Structured output, numbers under bounds (minimum, maximum, exclusive*): what llguidance 1.9 refused inside the bounds
and what it let through outside them, and what structured.py (_with_bound_points) now holds.

Before: under maximum 0.25 the value 0.2 was refused (0.20 and 0.21 passed: a fractional bound's digits cut short
were dropped), under minimum -0.25 so was -0.2, -0 never passed, and past an exclusive bound a fraction had to end in
a nonzero digit (0.50 refused under exclusiveMinimum 0, -0.50 under minimum -1); a fractional bound of 16 or 17
significant digits was misread (minimum 9696370110.795141 let 9696370110.79514 through).

The oracle is exact: Decimal comparison with the bounds as the schema's JSON writes them (jsonschema is not
installed here). No model: each grammar runs on llguidance's byte tokenizer. AMPHISTA_BOUNDS_SWEEP=<n> runs n seeds
instead of the default 6 (500 seeds, 20000 bounds, found nothing)."""
from __future__ import annotations

import os
import random
import re
from decimal import Decimal

import pytest

from test_structured_leftovers_qa import accepts, source
from amphista_engine.errors import InputError
from amphista_engine.structured import _EXACT_DIGITS, _LADDER

# the unbounded JSON number (RFC 8259): the strings a bound can hold or refuse
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def exact(value) -> Decimal:
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def valid(text: str, bounds: dict) -> bool:
    v = Decimal(text)
    b = {k: exact(x) for k, x in bounds.items()}
    return v >= b.get("minimum", v) and v <= b.get("maximum", v) and \
        ("exclusiveMinimum" not in b or v > b["exclusiveMinimum"]) and \
        ("exclusiveMaximum" not in b or v < b["exclusiveMaximum"])


def number(bounds: dict) -> str:
    return source({"type": "number", **bounds})


# --- what a user hits --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bounds, good, bad", [
    # the note's case: the bound's digits cut short, the bound, digits past it, 0 written every way, integers
    ({"maximum": 0.25}, ["0.2", "0.25", "0.249999", "0.20", "0.21", "0", "0.0", "-0", "-5", "-0.5"],
     ["0.26", "0.2500001", "0.3", "1"]),
    ({"minimum": 0, "maximum": 0.25}, ["0.2", "0.25", "0", "-0", "0.0", "0.1", "0.05"], ["-0.1", "0.251", "1"]),
    ({"maximum": 0.205}, ["0.2", "0.205", "0.200", "0.2049"], ["0.21", "0.2051"]),
    ({"minimum": -0.25}, ["-0.2", "-0.25", "-0.249", "-0", "0", "3"], ["-0.26", "-0.2501", "-1"]),
    ({"exclusiveMinimum": 0}, ["0.5", "0.50", "0.05", "0.050", "19.90", "1"], ["0", "-0", "0.0", "-0.5"]),
    ({"minimum": -1}, ["-0.50", "-0.5", "-1", "-1.0", "-0", "0"], ["-1.01", "-2"]),
    ({"maximum": 1.5}, ["1", "1.0", "1.5", "1.49", "-3"], ["1.51", "2"]),
    ({"minimum": -3.75, "maximum": -1.25}, ["-3.7", "-3.75", "-3", "-2", "-1.3", "-1.25"],
     ["-1.2", "-1", "-3.8", "-0", "0"]),
    ({"exclusiveMinimum": -0.5, "exclusiveMaximum": 0.5}, ["-0", "0", "-0.4", "0.4", "0.49"], ["-0.5", "0.5"]),
    ({"exclusiveMinimum": 2.5, "maximum": 7}, ["2.6", "2.51", "2.510", "3", "7", "7.0"], ["2.5", "2.50", "7.01"]),
    ({"minimum": 0.1, "maximum": 0.1}, ["0.1"], ["0.11", "0.09", "0"]),
])
def test_values_inside_fractional_bounds_are_written(bounds, good, bad):
    src = number(bounds)
    for text in good:
        assert valid(text, bounds) and accepts(src, text), (bounds, text)
    for text in bad:
        assert not valid(text, bounds) and not accepts(src, text), (bounds, text)


@pytest.mark.parametrize("bounds, past", [
    ({"minimum": 9696370110.795141}, "9696370110.79514"),
    ({"minimum": 0.10298325628473141}, "0.1029832562847314"),
    ({"maximum": 95716779769.26607}, "95716779769.26608"),
    ({"maximum": 63195626.871465564}, "63195626.871465565"),
    ({"minimum": 2228.3686843072514, "maximum": 3000}, "2228.368684307251"),
    ({"exclusiveMaximum": 3752768928017238.0}, "3752768928017238"),
    ({"minimum": -9006453926417580.0, "maximum": -5}, "-9006453926417581"),
])
def test_bounds_llguidance_misread_let_nothing_outside_through(bounds, past):
    """Regression: llguidance misread a fractional bound of 16-17 significant digits, and a whole one of 16 written
    as a float (3752768928017238.0), and took a value just past it. Such a fractional bound is now rounded inward to
    15 digits (a value within 1e-15 of it, relative, is refused), a whole one passed as an integer."""
    assert not valid(past, bounds) and not accepts(number(bounds), past)


def test_bounds_that_hold_nothing_once_rounded_are_refused_by_name():
    """A point or sliver of 16-17 digit bounds holds no 15-digit value: refused naming the bounds, not llguidance's
    "Unsatisfiable schema" about numbers the request never wrote (it took 9696370110.79514 for 9696370110.795141)."""
    with pytest.raises(InputError, match=r"minimum 9696370110\.795141, maximum 9696370110\.795141 are not supported.*"
                                         r"15 significant digits"):
        number({"minimum": 9696370110.795141, "maximum": 9696370110.795141})


def test_bounded_numbers_keep_their_place():
    """The widened number is an anyOf around the schema: $defs, x-guidance and the like stay at the top, so a $ref and
    the schema's own whitespace settings still read them."""
    schema = {"type": "number", "maximum": 0.25, "$defs": {"n": {"type": "number", "minimum": -0.25}},
              "x-guidance": {"whitespace_flexible": False}}
    assert accepts(source(schema), "0.2")
    obj = {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "#/$defs/m"}},
           "required": ["a", "b"], "additionalProperties": False,
           "$defs": {"n": {"type": "number", "minimum": -0.25}, "m": {"type": ["number", "null"], "maximum": 0.25}}}
    src = source(obj)
    assert accepts(src, '{"a": -0.2, "b": 0.2}') and accepts(src, '{"a": -0, "b": null}')
    assert not accepts(src, '{"a": -0.3, "b": 0.2}') and not accepts(src, '{"a": 0, "b": 0.3}')


# --- a seeded differential sweep ---------------------------------------------------------------------------------

def _value(r: random.Random):
    scale = r.choice([1, 1, 1, 10, 1000, 1e-3, 1e-6, 1e6, 1e12, 2 ** 52])
    if r.random() < 0.3:
        v = r.randint(-5, 5) * scale
        return int(v) if scale >= 1 and v == int(v) else v
    if r.random() < 0.1:
        return r.choice([0.0, -0.0, 0.5, -0.5, 0.25, -0.25])
    return float(Decimal(repr(r.uniform(-3, 3) * scale)).quantize(
        Decimal(1).scaleb(-r.randint(0, 7)) if scale >= 1 else Decimal(repr(scale)).scaleb(-r.randint(0, 5))))


def _bounds(r: random.Random) -> dict:
    values = sorted(_value(r) for _ in range(r.choice([1, 2, 2, 2])))
    if len(values) == 1:
        return {r.choice(KEYS): values[0]}
    lo, hi = values
    if lo == hi:
        return {"minimum": lo, "maximum": hi}
    return {r.choice(["minimum", "exclusiveMinimum"]): lo, r.choice(["maximum", "exclusiveMaximum"]): hi}


def _writings(v: Decimal) -> set[str]:
    """v written shortest, both signs, with one or two trailing zeros, and with an exponent."""
    text = format(v, "f")
    text = text.rstrip("0").rstrip(".") if "." in text else text
    text = text.lstrip("-")
    out = set()
    for t in (text, "-" + text):
        out |= {t, t + ("0" if "." in t else ".0"), t + ("00" if "." in t else ".00")}
    m = v.normalize()
    out.add(f"{m.as_tuple().digits[0]}e{m.adjusted()}" if len(m.as_tuple().digits) == 1 else f"{m:E}")
    return {t for t in out if NUMBER.fullmatch(t)}


def _candidates(bounds: dict, r: random.Random) -> list[str]:
    values = set()
    for x in [*bounds.values(), 0]:
        d = exact(x)
        for k in range(8):
            step = Decimal(1).scaleb(-k)
            values |= {d, d + step * r.randint(1, 9), d - step * r.randint(1, 9)}
            if d.as_tuple().exponent < -k:
                values.add(d.quantize(step, rounding="ROUND_DOWN"))
    return sorted(t for v in values for t in _writings(v))


def _digits(value) -> int:
    return len(format(exact(value), "f").lstrip("-").replace(".", "").lstrip("0").rstrip("0") or "0") if \
        isinstance(value, float) else len(str(abs(value)))


def _cut_points(bounds: dict) -> set[Decimal]:
    """Every bound and each truncation of its digits toward zero."""
    out = set()
    for x in bounds.values():
        d = exact(x)
        out |= {d} | {d.quantize(Decimal(1).scaleb(-p), rounding="ROUND_DOWN")
                      for p in range(max(-d.as_tuple().exponent, 0))}
    return out


def _must_pass(text: str, bounds: dict) -> bool:
    """A valid writing the grammar must take: no exponent, bounds it reads exactly (15 significant digits), and
    either its shortest writing (no trailing zero) or a trailing zero outside the documented limits."""
    if "e" in text.lower() or any(_digits(v) > _EXACT_DIGITS and isinstance(v, float) for v in bounds.values()):
        return False
    fraction = text.partition(".")[2]
    if not fraction.endswith("0"):
        return True
    return Decimal(text) != 0 and Decimal(text) not in _cut_points(bounds) and "0" * _LADDER not in fraction \
        and all(_digits(v) <= _EXACT_DIGITS - _LADDER for v in bounds.values())


@pytest.mark.parametrize("seed", range(int(os.environ.get("AMPHISTA_BOUNDS_SWEEP", "6"))))
def test_seeded_sweep_bounded_numbers_match_the_schema(seed):
    """Random bounds (inclusive, exclusive, whole, fractional, negative, 1e-6 to 2^52) against strings drawn at and
    near them: none outside is accepted (exponents and trailing zeros included), every writing _must_pass names
    inside is. Before: every seed found valid shortest writings refused (-0, a bound's digits cut short), and bounds
    of 16-17 digits let values past them through."""
    r = random.Random(seed)
    compiled = accepted = 0
    for _ in range(40):
        bounds = _bounds(r)
        try:
            src = number(bounds)
        except InputError:
            continue        # an exclusive whole bound within a unit of the other (refused by name elsewhere)
        compiled += 1
        # the same bounds met through allOf (llguidance merges each branch added with the other member's bounds):
        # held to nothing let outside
        keys = list(bounds)
        merged = source({"allOf": [{"type": "number", keys[0]: bounds[keys[0]]}, {k: bounds[k] for k in keys[1:]}]}) \
            if len(keys) > 1 else None
        for text in _candidates(bounds, r):
            ok, good = accepts(src, text), valid(text, bounds)
            accepted += ok
            assert good or not ok, (bounds, text)
            assert ok or not good or not _must_pass(text, bounds), (bounds, text)
            assert good or merged is None or not accepts(merged, text), ("allOf", bounds, text)
    assert compiled > 20 and accepted > 1000, (compiled, accepted)
