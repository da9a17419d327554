"""Llama 3 ("llama3_json") and Mistral tool calls streamed as an OpenAI client joins them (tools.py ToolCallFilter
.stream / end), checked against the non-streamed reply for answers real models write: whitespace and newlines
between tokens, <|python_tag|> and [TOOL_CALLS] with and without a space, strings holding `}`, `]`, `;`, escaped
quotes and escaped surrogate pairs cut between deltas, empty arguments, "type": "function" in the call object,
JSON-mode answers while tools are offered, several calls, parallel_tool_calls false, and one character or the
whole answer per delta."""
from __future__ import annotations

import json
import random

import pytest

from amphista_engine.tools import ToolCallFilter, openai_tool_calls, parse_tool_calls
from test_tool_streaming_formats import joined as formats_joined
from tool_helpers import template_engine_fixture

LLAMA_CALLS = [
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    '<|python_tag|> {"name": "get_weather", "parameters": {"city": "Oslo"}}\n',
    '\n\n{"name": "run",\n  "parameters": {\n    "code": "if x: {print(\\"a]};\\")}",\n    "n": [1, [2, {"x": "}"}]]\n'
    '  }\n}',
    '{"name": "f", "parameters": {}} ; {"name": "g", "parameters": {"s": "\\ud83d\\ude00 caf\\u00e9 \\\\u0041"}};',
    '{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}',
    '{"name": "get_weather", "type": "function", "parameters": {"city": "Oslo"}}',
    '{"name": "get_weather", "parameters": {"city": "Oslo"}, "type": "function"}',
    '{"name": "f", "arguments": {"a": 1}}; {"type": "function", "name": "g", "arguments": {"b": [true, null]}}',
    '{"name": "get_time", "parameters": "{\\"utc\\": true}"}',
]
MISTRAL_CALLS = [
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "abc123XYZ"}]',
    '[TOOL_CALLS]\n[\n  {\n    "name": "f",\n    "arguments": {"q": "a ] } , \\" x"}\n  },\n  {"name": "g", '
    '"arguments": {}}\n]\n',
    '[{"type": "function", "name": "f", "arguments": {"s": "\\ud83d\\ude00"}}, {"name": "g", "type": "function", '
    '"arguments": {"x": [1, {"y": "]"}]}}]',
]
# JSON a model writes as its answer (asked for JSON, tools offered): no call, as vLLM's parsers read it
JSON_ANSWERS = [
    ("llama3_json", '{"name": "Alice", "age": 30}'),
    ("llama3_json", '{"name": "Alice", "age": 30}; {"name": "Bob", "age": 25}'),
    ("llama3_json", '{\n  "name": "Oslo",\n  "population": 709000\n}'),
    ("mistral", '[{"name": "Alice", "age": 30}, {"name": "Bob", "age": 25}]'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_time"}]'),
]


def joined(text: str, cuts, fmt: str, parallel: bool = True):
    """The stream of `text` cut at `cuts`, then its end, joined per index as the openai client joins
    delta.tool_calls (test_tool_streaming_formats.joined, which checks the entries' shape, the ids' form and that
    each encodes as UTF-8): (content, [(name, arguments)], whole)."""
    content, calls, whole, _ = formats_joined(text, cuts, fmt, parallel)
    return content, [(c["name"], c["arguments"]) for c in calls], whole


def reply(text: str, fmt: str, parallel: bool = True):
    content, calls = parse_tool_calls(text, fmt)
    calls = calls if parallel else calls[:1]
    out = [(c["function"]["name"], c["function"]["arguments"]) for c in openai_tool_calls(calls, fmt)]
    json.dumps(out, ensure_ascii=False).encode("utf-8")             # what the server's _json sends
    return content or "", out


def splits(text: str, rnd: random.Random):
    yield from ([i] for i in range(len(text) + 1))
    yield list(range(1, len(text)))                                 # a character per delta
    for _ in range(15):
        yield sorted(rnd.sample(range(len(text) + 1), min(len(text) + 1, rnd.randint(2, 10))))


@pytest.mark.parametrize("fmt", ["llama3_json", "mistral"])
def test_real_answers_join_to_the_non_streamed_reply_however_cut(fmt):
    rnd = random.Random(11)
    texts = LLAMA_CALLS if fmt == "llama3_json" else MISTRAL_CALLS
    texts = texts + [t for f, t in JSON_ANSWERS if f == fmt]
    for text in texts:
        for parallel in (True, False):
            want = reply(text, fmt, parallel)
            for cuts in splits(text, rnd):
                content, calls, whole = joined(text, cuts, fmt, parallel)
                assert whole and (content, calls) == want, (text, parallel, cuts, content, calls)


@pytest.mark.parametrize("fmt,text", JSON_ANSWERS)
def test_a_json_answer_without_arguments_is_content_not_a_call(fmt, text):
    """A JSON-mode answer whose object has a "name" was read as a call to a function of that name ("Alice"), which
    no request offered; vLLM's llama3_json and mistral parsers need "arguments" or "parameters" to call."""
    assert parse_tool_calls(text, fmt) == (text, [])
    f = ToolCallFilter(fmt=fmt)
    content, deltas = f.stream(text)
    assert content == text and deltas == [] and f.end() == ("", [], True) and f.calls_sent == 0
    # a call with its (empty) arguments given is still one
    key = "parameters" if fmt == "llama3_json" else "arguments"
    call = f'{{"name": "get_time", "{key}": {{}}}}'
    _, calls = parse_tool_calls(call if fmt == "llama3_json" else f"[{call}]", fmt)
    assert calls == [{"name": "get_time", "arguments": {}}]


@pytest.mark.parametrize("fmt", ["llama3_json", "mistral", "hermes"])
def test_a_name_with_a_lone_surrogate_is_no_call_and_nothing_unencodable_goes_out(fmt):
    """`"name": "f\\ud83d"` decodes to a lone surrogate, which no UTF-8 reply can carry: the name went out in the
    stream's first entry (UnicodeEncodeError in the server's _event: the stream cut off) and in the reply (a 500)."""
    key = "parameters" if fmt == "llama3_json" else "arguments"
    call = f'{{"name": "get_weather\\ud83d", "{key}": {{"city": "Oslo"}}}}'
    text = {"llama3_json": call, "mistral": f"[{call}]", "hermes": f"<tool_call>\n{call}\n</tool_call>"}[fmt]
    assert parse_tool_calls(text, fmt) == (text, [])
    rnd = random.Random(5)
    for cuts in splits(text, rnd):
        assert joined(text, cuts, fmt) == (text, [], True), cuts


@pytest.mark.parametrize("fmt", ["llama3_json", "mistral"])
def test_a_call_with_type_function_streams_its_arguments_before_it_ends(fmt):
    """{"type": "function", "name": ..., "parameters": {...}} (what Llama 3 models write after the tools' JSON in
    their prompt) went out only whole, once its object had been read: its arguments now stream as they decode."""
    key = "parameters" if fmt == "llama3_json" else "arguments"
    for head in ('{"type": "function", "name": "get_weather", ', '{"name": "get_weather", "type": "function", '):
        f = ToolCallFilter(fmt=fmt)
        _, first = f.stream(("[" if fmt == "mistral" else "") + head + f'"{key}": {{"city": "Os')
        assert [d["function"] for d in first] == [{"name": "get_weather", "arguments": ""},
                                                  {"arguments": '{"city": "Os'}], first
        assert f.stream('lo"}') == ("", [{"index": 0, "function": {"arguments": 'lo"'}}])
        assert f.stream("}" + ("]" if fmt == "mistral" else "")) == \
            ("", [{"index": 0, "function": {"arguments": "}"}}])
        assert f.end() == ("", [], True)


# ---- the server's stream ---------------------------------------------------------------------------------------

llama_engine = template_engine_fixture("llama31_user_qa", "llama31")


@pytest.mark.usefixtures("one_thread_module")
def test_the_server_answers_json_and_odd_names_as_content_both_ways(llama_engine, monkeypatch):
    """A JSON answer while tools are offered, and a call named with a lone surrogate: content (no tool_calls),
    finish "stop", streamed and not; the latter was a 500 (and a stream cut off before [DONE])."""
    from conftest import serving
    from test_serve import call, sse
    from test_tool_calling import ASK, TOOLS
    from test_tool_streaming import assembled, scripted
    with serving(llama_engine, model_id="tiny-llama-qa", defaults=dict(max_new_tokens=300, temperature=0.0)) as server:
        body = {"messages": ASK, "tools": TOOLS}
        for text in ('{"name": "Alice", "age": 30}', '{"name": "get_weather\\ud83d", "parameters": {}}'):
            scripted(server, monkeypatch, text)
            status, whole = call(server.url, "/v1/chat/completions", body)
            assert status == 200, whole
            choice = whole["choices"][0]
            assert choice["message"]["content"] == text and not choice["message"].get("tool_calls"), choice
            content, calls, finish, _ = assembled(sse(server.url, "/v1/chat/completions", body), markup_ok=True)
            assert (content, calls, finish) == (text, [], choice["finish_reason"]) and finish == "stop"
