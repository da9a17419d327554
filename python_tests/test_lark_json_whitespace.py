"""A Lark grammar's `%json {schema}` blocks take the bounded JSON whitespace a json_schema response_format takes
(structured._bounded_json_blocks): with llguidance's default any run of blanks, a model leaning to whitespace padded
the JSON until max_new_tokens ran out."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")

from amphista_engine.structured import JSON_WHITESPACE, _bounded_json_blocks    # noqa: E402

from test_structured_output_user_qa2 import _blank_ids                          # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

EMPTY = {"type": "object", "additionalProperties": False}


def test_blocks_are_bounded_and_the_rest_of_the_grammar_is_kept():
    lark = ('start: "answer: " obj | "%json" OTHER\n// a comment: %json is llguidance\'s\n'
            f'obj: %json{json.dumps(EMPTY)}\nOTHER: /x+/\n'
            'own: %json {"type": "object", "x-guidance": {"whitespace_flexible": false}}\n'
            'tidy: %json {"type": "array", "uniqueItems": false}')
    got = _bounded_json_blocks(lark)
    lines = got.splitlines()
    assert lines[0] == 'start: "answer: " obj | "%json" OTHER' and lines[1].startswith("// a comment")
    assert lines[3] == "OTHER: /x+/"
    schema = json.loads(lines[2][len("obj: %json"):])
    assert schema == {**EMPTY, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
    assert json.loads(lines[4][len("own: %json"):]) == {"type": "object", "x-guidance": {"whitespace_flexible": False}}
    assert json.loads(lines[5][len("tidy: %json"):])["type"] == "array"          # the no-op keyword dropped
    assert "uniqueItems" not in lines[5]
    assert _bounded_json_blocks('start: "a" | "b"') == 'start: "a" | "b"'


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_a_lark_json_block_ends_under_a_pull_to_whitespace(tiny_amphista_engine, speculative):
    eng = tiny_amphista_engine
    bias = {i: 100.0 for i in _blank_ids(eng.tokenizer)}
    rf = {"type": "grammar", "grammar": f'start: "ok " %json {json.dumps(EMPTY)}'}
    r = eng.generate("The quick brown fox", max_new_tokens=90, response_format=rf, logit_bias=bias,
                     speculative=speculative)
    assert r.finish_reason == "eos" and r.text.startswith("ok "), r.text
    assert json.loads(r.text[3:]) == {}, r.text
