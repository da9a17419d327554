"""vLLM's structured_outputs.disable_additional_properties: object schemas that list their properties take no others
(structured.closed_objects), as vLLM's guidance backend reads the flag."""
from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("llguidance")

from amphista_engine.structured import closed_objects    # noqa: E402

from conftest import serving                              # noqa: E402
from test_serve import call                               # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

OPEN = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def _schema(rf):
    return rf["json_schema"]["schema"]


def test_every_object_listing_properties_is_closed_and_nothing_else_changes():
    schema = {
        "type": "object",
        "properties": {
            # a property named like keywords: the names map is no schema, so it gains no key of its own
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "additionalProperties": {"type": "string"},
            "open": {"type": "object", "properties": {"y": {}}, "additionalProperties": True},
            "typed": {"type": "object", "patternProperties": {"^z": {"type": "number"}}},
            "any": {"type": "object"},          # lists no properties: stays open, as vLLM leaves it
            "list": {"type": "array", "items": {"properties": {"w": {}}}},
            "data": {"enum": [{"properties": {}}], "default": {"properties": {}}},
        },
        "$defs": {"node": {"properties": {"next": {"$ref": "#/$defs/node"}}}},
        "anyOf": [{"properties": {"a": {}}}, {"type": "object"}],
    }
    before = copy.deepcopy(schema)
    got = _schema(closed_objects({"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}))
    assert schema == before                                  # the request's own schema is not written into
    props = got["properties"]
    assert got["additionalProperties"] is False
    assert set(props) == set(schema["properties"])           # no property named additionalProperties was added
    assert props["properties"]["additionalProperties"] is False
    assert props["additionalProperties"] == {"type": "string"}
    assert props["open"]["additionalProperties"] is True       # a schema's own word stays
    assert props["typed"]["additionalProperties"] is False
    assert "additionalProperties" not in props["any"]
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["data"] == schema["properties"]["data"]       # data, not schemas
    assert got["$defs"]["node"]["additionalProperties"] is False
    assert set(got["$defs"]) == {"node"}
    assert got["anyOf"][0]["additionalProperties"] is False and got["anyOf"][1] == {"type": "object"}
    # a schema sent as a JSON string is read, then closed
    assert _schema(closed_objects({"type": "json_schema", "json_schema": {"schema": json.dumps(OPEN)}})) == \
        {**OPEN, "additionalProperties": False}
    for other in (None, {"type": "json_object"}, {"type": "regex", "regex": "a+"}):
        assert closed_objects(other) == other


@pytest.fixture(scope="module")
def server(tiny_amphista_engine):
    with serving(tiny_amphista_engine, model_id="tiny") as httpd:
        yield httpd


def _answer(url, seed, **options):
    # no whitespace: an answer is its tokens, {"ok":true} or {"ok":true,"<another key>...
    status, reply = call(url, "/v1/completions", {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 24,
                                                  "temperature": 1.5, "seed": seed, "structured_outputs": {
                                                      "json": OPEN, "disable_any_whitespace": True, **options}})
    assert status == 200, reply
    return reply["choices"][0]["text"], reply["choices"][0]["finish_reason"]


def test_the_flag_keeps_answers_to_the_listed_properties(server):
    seeds = range(10)
    opened = [_answer(server.url, s) for s in seeds]
    # the same seeds without the flag wander into keys of their own: the sweep can tell the flag's work
    assert any(text.startswith(('{"ok":true,"', '{"ok":false,"')) for text, _ in opened), opened
    closed = [_answer(server.url, s, disable_additional_properties=True) for s in seeds]
    assert all(a in (('{"ok":true}', "stop"), ('{"ok":false}', "stop")) for a in closed), closed
    # false asks for nothing: the answers without the flag
    assert [_answer(server.url, s, disable_additional_properties=False) for s in seeds] == opened
