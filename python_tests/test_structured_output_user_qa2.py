"""Structured output as a demanding user meets it, second round (amphista_engine/structured.py): JSON answers whose
grammar allowed endless whitespace."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance")

from amphista_engine.structured import Constraint, Grammar     # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

EMPTY_ONLY = {"type": "json_schema", "json_schema": {"name": "e", "schema": {"type": "object",
                                                                            "additionalProperties": False}}}


def _blank_ids(tok) -> list[int]:
    """The ids of tokens that decode to whitespace alone."""
    ids = [i for i in range(tok.vocab_size) if (t := tok.decode([i])) and not t.strip() and t.isascii()]
    assert ids
    return ids


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_json_whitespace_runs_end(tiny_amphista_engine, speculative):
    """llguidance's default JSON whitespace is any run of blanks and newlines: a model leaning to whitespace (here a
    logit_bias; smollm2-135m asked for "an empty JSON object" under a schema allowing only {} did it by itself) wrote
    "{\\n \\n   \\n ..." until max_new_tokens ran out, finish_reason "length", no JSON at all."""
    eng = tiny_amphista_engine
    bias = {i: 100.0 for i in _blank_ids(eng.tokenizer)}
    for rf in (EMPTY_ONLY, {"type": "json_object"}):
        r = eng.generate("The quick brown fox", max_new_tokens=90, response_format=rf, logit_bias=bias,
                         speculative=speculative)
        assert r.finish_reason == "eos", r.text
        assert json.loads(r.text) == {}, r.text
    # a schema's own x-guidance whitespace setting is kept: none at all
    own = {"type": "json_schema", "json_schema": {"schema": {**EMPTY_ONLY["json_schema"]["schema"],
                                                             "x-guidance": {"whitespace_flexible": False}}}}
    r = eng.generate("The quick brown fox", max_new_tokens=20, response_format=own, logit_bias=bias)
    assert r.text == "{}" and r.finish_reason == "eos", r.text


def test_pretty_printed_json_still_fits(tiny_amphista_engine):
    """The bounded whitespace still takes JSON as models print it: indented, one item a line, nested."""
    eng = tiny_amphista_engine
    value = {"name": "Ann", "tags": ["a", "b"], "inner": {"deep": {"n": 1, "xs": [1, 2, {"k": None}]}}}
    grammar = Grammar({"type": "json_object"}, eng.tokenizer, eng.config.vocab_size, eng.eos_ids)
    for indent in (None, 2, 4, "\t"):
        text = json.dumps(value, indent=indent)
        ids = eng.tokenizer.encode(text, add_bos=False)
        c = Constraint(grammar, 1, "cpu")
        c.consume(torch.tensor([ids]), torch.tensor([len(ids)]))
        assert not c.matchers[0].is_error() and c.matchers[0].is_accepting(), repr(text)


def test_a_json_schema_without_its_schema_key_is_named(tiny_amphista_engine):
    """A schema placed straight under json_schema (one starting with anyOf, not the bare forms taken) was "schema
    must be a JSON schema object, got None": a None the client never sent."""
    from amphista_engine.errors import InputError
    rf = {"type": "json_schema", "json_schema": {"name": "x", "anyOf": [{"type": "integer"}]}}
    with pytest.raises(InputError, match=r"needs its schema under 'schema'.*'anyOf', 'name'"):
        tiny_amphista_engine.generate("hi", max_new_tokens=4, response_format=rf)
