"""oneOf under structured outputs: a pydantic discriminated union (oneOf + discriminator over $refs) is held to its
branches; a oneOf whose branches may overlap is refused with where a request turns on llguidance's coerce_one_of
(its own message named an option of its API only)."""
from __future__ import annotations

import json

import pytest

from amphista_engine import InputError
from amphista_engine.structured import Grammar
from amphista_engine.tokenizer import load_tokenizer
from conftest import SMOLLM2_GGUF, needs_smollm2_gguf

pytest.importorskip("llguidance")
pytestmark = needs_smollm2_gguf

PET = {"$defs": {n: {"type": "object", "additionalProperties": False, "required": ["kind", f],
                     "properties": {"kind": {"const": n.lower(), "type": "string"}, f: {"type": t}}}
                 for n, f, t in (("Cat", "meows", "integer"), ("Dog", "barks", "number"))},
       "type": "object", "required": ["pet"], "additionalProperties": False,
       "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                              "discriminator": {"propertyName": "kind",
                                                "mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"}}}}}
OVERLAP = {"type": "object", "properties": {"a": {"oneOf": [{"type": "integer", "minimum": 0},
                                                           {"type": "integer", "maximum": 5}]}}}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(SMOLLM2_GGUF))


def _grammar(tok, schema):
    return Grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, tok, 49152)


def _accepts(tok, schema, text: str) -> bool:
    m, ids = _grammar(tok, schema).matcher(), tok.encode(text, add_bos=False)
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def test_a_discriminated_union_is_held_to_its_branches(tok):
    assert _accepts(tok, PET, json.dumps({"pet": {"kind": "cat", "meows": 3}}))
    assert not _accepts(tok, PET, json.dumps({"pet": {"kind": "cat", "barks": 3}}))


def test_an_overlapping_one_of_says_where_coerce_one_of_is_set(tok):
    with pytest.raises(InputError, match=r'"x-guidance": \{"coerce_one_of": true\} at the top of the schema'):
        _grammar(tok, OVERLAP)
    _grammar(tok, {**OVERLAP, "x-guidance": {"coerce_one_of": True}})      # taken once the schema asks for it
