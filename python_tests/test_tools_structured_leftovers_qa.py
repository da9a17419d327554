"""QA leftovers of tool calling and structured output: an answer under tool_choice "required" (or a named function)
cut by max_tokens after a whole call has no content (the unfinished next block is dropped, streamed or not); a
response_format error that needs the tokenizer names its param; JSON-schema keywords that constrain nothing but
that llguidance refuses ("uniqueItems": false) are dropped before compiling."""
from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("llguidance")

from amphista_engine.errors import InputError                     # noqa: E402
from amphista_engine.structured import grammar_source, without_no_ops    # noqa: E402
from amphista_engine.tools import ToolCallFilter, ToolError, plan_tools  # noqa: E402

from test_serve import call, error_of, sse                         # noqa: E402
from test_tool_calling import ASK, CHAT, WEATHER, engine, long_dir, server   # noqa: E402,F401
from test_tool_calling_mistral_v11 import answer_with, script      # noqa: E402
from test_tool_streaming import assembled                          # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
# the next block, long enough that a cut a few tokens past the first block falls inside it
NEXT = '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3, "note": "' + "z" * 80


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_cut_after_a_call_has_no_content_streamed_or_not(server, engine, monkeypatch, choice):  # noqa: F811
    answer_with(monkeypatch, server.app, script(engine, [CALL, NEXT]))
    # a cut a few tokens into the next block (the random vocabulary spends about a token per character)
    cut = len(engine.tokenizer.encode(CALL, add_bos=False)) + 8
    body = {"messages": ASK, "tools": [WEATHER], "tool_choice": choice, "max_tokens": cut}
    status, reply = call(server.url, CHAT, body)
    assert status == 200, reply
    [ch] = reply["choices"]
    assert ch["finish_reason"] == "length", ch
    # content was the unfinished block ('\n<tool_call>\n{"name": ...'): the grammar's answer is calls only
    assert ch["message"]["content"] is None, ch
    calls = ch["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris", "days": 2})]
    # streamed: no content either (it sent the blank between the blocks), the same call, the same finish
    content, got, finish, _ = assembled(sse(server.url, CHAT, body))
    assert content == "" and finish == "length", (content, finish)
    assert [(c["name"], json.loads(c["arguments"])) for c in got] == [("get_weather", {"city": "Paris", "days": 2})]
    # a stop string (calls go out whole): the same
    stopped = {**body, "stop": ["zzzz"]}
    status, reply = call(server.url, CHAT, stopped)
    assert status == 200 and reply["choices"][0]["message"]["content"] is None, reply
    content, got, finish, _ = assembled(sse(server.url, CHAT, stopped))
    assert content == "" and len(got) == 1, (content, got)


def test_filter_and_plan_under_required_read_no_content():
    plan = plan_tools([WEATHER], "required")
    for cut in ('\n<tool_call', '\n<tool_call>\n{"name":', '\n<tool_call>\n{"name": "get_weather", "argu'):
        text = CALL + cut
        content, calls = plan.read(text)
        assert content is None and [c["name"] for c in calls] == ["get_weather"], (cut, content)
        for whole in (False, True):
            f = ToolCallFilter(calls_only=True, whole=whole)
            sent = "".join(f.stream(text[i:i + 3])[0] for i in range(0, len(text), 3))
            rest, _, _ = f.end(text)
            assert sent + rest == "", (cut, whole, sent, rest)
    # "auto" too drops a last block that could still have become a call, as its stream drops it (a block that can be
    # no call stays content: test_tool_cut_hermes_qa.py)
    assert plan_tools([WEATHER], "auto").read(CALL + '\n<tool_call>\n{"name":')[0] is None


def test_a_grammar_error_found_with_the_tokenizer_names_response_format(server):  # noqa: F811
    rf = {"type": "grammar", "grammar": 'start: <[128000]> "x"'}
    grammar_source(rf)          # valid without a tokenizer: the error comes when the run's Grammar is built
    err = error_of(call(server.url, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "response_format": rf}),
                   400, "Token range", param="response_format")
    assert err["message"].startswith("response_format"), err
    error_of(call(server.url, CHAT, {"messages": ASK, "max_tokens": 4, "response_format": rf}), 400,
             param="response_format")
    assert call(server.url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


LIST = {"type": "array", "items": {"type": "integer"}, "uniqueItems": False}


def test_no_op_keywords_llguidance_refuses_are_dropped_everywhere():
    schema = {"type": "object", "uniqueItems": False, "propertyNames": True, "unevaluatedProperties": True,
              "dependentRequired": {},
              "properties": {"tags": LIST, "uniqueItems": {"type": "boolean"},       # a property so named stays
                             "pair": {"type": "array", "prefixItems": [LIST, {"$ref": "#/$defs/d"}],
                                      "minContains": 0, "unevaluatedItems": True},
                             "either": {"anyOf": [LIST, {"allOf": [LIST]}]}},
              "additionalProperties": LIST, "$defs": {"d": {**LIST, "enum": [[1, 1]]}},
              "required": ["tags", "uniqueItems"]}
    before = copy.deepcopy(schema)
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    assert grammar_source(rf)           # was "Unimplemented keys: [\"uniqueItems\"]"
    assert schema == before             # the caller's schema is untouched
    cleaned = without_no_ops(schema)
    assert "uniqueItems" not in json.dumps({k: v for k, v in cleaned.items() if k not in ("properties", "required")})
    assert cleaned["properties"]["uniqueItems"] == {"type": "boolean"} and cleaned["required"] == before["required"]
    assert cleaned["$defs"]["d"] == {"type": "array", "items": {"type": "integer"}, "enum": [[1, 1]]}
    assert cleaned["properties"]["pair"] == {"type": "array", "prefixItems": [
        {"type": "array", "items": {"type": "integer"}}, {"$ref": "#/$defs/d"}]}
    assert without_no_ops({"oneOf": [LIST, {"not": LIST}], "items": [LIST]}) == {"oneOf": [
        {"type": "array", "items": {"type": "integer"}}, {"not": {"type": "array", "items": {"type": "integer"}}}],
        "items": [{"type": "array", "items": {"type": "integer"}}]}
    # keywords that do constrain are still refused, by name (0 is no false: minContains 1 neither)
    for bad, key in (({**LIST, "uniqueItems": True}, "uniqueItems"),
                     ({"type": "object", "properties": {"x": {**LIST, "uniqueItems": True}}}, "uniqueItems"),
                     ({**LIST, "contains": {"type": "integer"}, "minContains": 1}, "Contains")):
        with pytest.raises(InputError, match=key):
            grammar_source({"type": "json_schema", "json_schema": {"schema": bad}})
    # tools' parameters schemas too (a pydantic-made function under "required")
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": LIST}, "required": ["xs"]}}}
    assert plan_tools([tool], "required").response_format is not None
    unique = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": {**LIST, "uniqueItems": True}}}}}
    with pytest.raises(ToolError, match="uniqueItems"):
        plan_tools([unique], "required")
