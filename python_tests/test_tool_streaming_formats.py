"""Llama 3's and Mistral's tool calls streamed as they decode (tools.py ToolCallFilter.stream / _advance_whole /
end, as vLLM's llama3_json and mistral parsers stream them): the answer is held back while it may still be calls and
goes out as content once it cannot be; a call's first `delta.tool_calls` entry (index, id, type, name, arguments
"") goes out once its object reads `{"name": "...", "parameters": {` ("arguments" too), then its arguments' text as
it decodes; joined per index, the fragments are the non-streamed reply's arguments (json.dumps' form), however the
answer is cut into deltas. A call that went out but that the whole answer's parse does not read (text after the
calls, JSON that breaks) is never claimed whole, as a Hermes block that breaks after its name."""
from __future__ import annotations

import json
import random
import re

import pytest

from amphista_engine.tools import ToolCallFilter, openai_tool_calls, parse_tool_calls
from tool_helpers import template_engine_fixture

LLAMA = [
    '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}',
    ' <|python_tag|> {"name":"f","arguments":{"a" : "q\\"z\\u00e9 \\ud83d\\ude00", "b": [1.0, 2e3, -0, true, null, '
    '{"c": {}}], "l": []}} ; {"name": "g", "parameters": {}};',
    '{"parameters": {"a": 1}, "name": "f"}; {"name": "g", "parameters": {"x": -0.5}}',    # name after arguments
    '{"name": "f", "parameters": "{\\"a\\": 1}"}; {"name": "g", "parameters": {"k": "v"}}',  # arguments a string
    '{"name": "f", "parameters": {"a": NaN}}',                      # only Python's json reads it: sent at the end
    '{"name": "f", "id": 3, "parameters": {"a": 1}}',
    '\u00a0{"name": "f", "parameters": {}}\n',                      # str.strip()'s whitespace around the answer
    '{"city": "Oslo"} is nice', '{"city": "Oslo"}', '{oops', 'It is sunny.', '  <|python_tag|>print(1)',
    '{"name": 3, "parameters": {}}', '{"name": "f", "parameters": [1]}', '<b>bold</b>', '{"a": 1}; {"name": "f"',
]
MISTRAL = [
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}, {"name": "get_time", '
    '"arguments": {"utc": true}}]',
    '[{"name": "f", "arguments": {"s": "C:\\\\usr\\\\bin", "n": 1E2}}]\n',            # the control token left out
    '[TOOL_CALLS] [{"arguments": {"a": 1}, "name": "f"}, {"name": "g", "arguments": {}}]',
    '[TOOL_CALLS][{"name": "f", "arguments": "{\\"a\\": 1}", "id": "abcdefghi"}]',
    '[TOOL_CALLS] []', '[Note] it is sunny', '[TOOL_CALLS] x', 'Sunny [x]', '[TOOL_CALLS] [{"name": "f"}]',
    '[TOOL_CALLS] [{"a": 1}, {"name": "f", "arguments": {}}]', '[1, 2]',
]
# Calls that go out, then the whole answer turns out not to be calls: (format, answer, the arguments streamed)
BROKEN = [
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}} and more', '{"a": 1}'),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}}{"name": "g", "parameters": {}}', '{"a": 1}'),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}}; oops', '{"a": 1}'),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1, "b": "cut her', '{"a": 1, "b": "cut her'),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, 1]', '{"a": 1}'),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}] and more', '{"a": 1}'),
]
# (an answer that ends after whole calls but before its array's "]", '[TOOL_CALLS] [{"name": "f", ...}}', is a cut
# one: the reply reads its whole calls, as the stream sent them, whole both ways: test_tool_stream_agreement_qa)


def joined(text: str, cuts, fmt: str, parallel: bool = True, f: ToolCallFilter | None = None):
    """The filter's stream of `text` cut at `cuts`, then its end, as a client joins it: (content, calls with their
    ids, whole, what only the end sent: its content and entries). f: a filter made otherwise (ToolCallFilter(fmt,
    parallel) by default)."""
    f = f or ToolCallFilter(parallel, fmt)
    content, calls, prev = "", {}, 0

    def take(deltas):
        for d in deltas:
            k = d["index"]
            json.dumps(d, ensure_ascii=False).encode("utf-8")         # what the server's _event sends
            if k not in calls:
                assert d["type"] == "function" and isinstance(d["function"]["name"], str), d
                assert re.fullmatch(r"[A-Za-z0-9]{9}" if fmt == "mistral" else r"call_[0-9a-f]{24}", d["id"]), d
                calls[k] = {"id": d["id"], "name": d["function"]["name"], "arguments": d["function"]["arguments"]}
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}, d
                calls[k]["arguments"] += d["function"]["arguments"]

    for cut in [*cuts, len(text)]:
        piece, deltas = f.stream(text[prev:cut])
        prev = cut
        content += piece
        take(deltas)
    rest, deltas, whole = f.end(text)
    take(deltas)
    assert sorted(calls) == list(range(len(calls)))
    return content + rest, [calls[k] for k in sorted(calls)], whole, (rest, deltas)


def reply(text: str, fmt: str, parallel: bool = True):
    """The non-streamed reply's (content, [(name, arguments)]) of the answer (ToolPlan.read, openai_tool_calls)."""
    content, calls = parse_tool_calls(text, fmt)
    calls = calls if parallel else calls[:1]
    return content or "", [(c["function"]["name"], c["function"]["arguments"]) for c in openai_tool_calls(calls, fmt)]


def splits(text: str, rnd: random.Random):
    yield from ([i] for i in range(len(text) + 1))                  # every single split point
    yield [i for i in range(1, len(text))]                          # a character at a time
    for _ in range(20):
        yield sorted(rnd.sample(range(len(text) + 1), min(len(text) + 1, rnd.randint(2, 8))))


@pytest.mark.parametrize("fmt", ["llama3_json", "mistral"])
def test_any_split_joins_to_the_non_streamed_reply(fmt):
    rnd = random.Random(7)
    for text in LLAMA if fmt == "llama3_json" else MISTRAL:
        for parallel in (True, False):
            want = reply(text, fmt, parallel)
            for cuts in splits(text, rnd):
                content, calls, whole, late = joined(text, cuts, fmt, parallel)
                assert whole and (content, [(c["name"], c["arguments"]) for c in calls]) == want, (text, cuts)
                # all of it went out before the end (each answer here says what it is by its last character),
                # but for arguments only Python's json reads
                if "NaN" not in text:
                    assert late == ("", []), (text, cuts, late)
                ids = r"[A-Za-z0-9]{9}" if fmt == "mistral" else r"call_[0-9a-f]{24}"
                assert all(re.fullmatch(ids, c["id"]) for c in calls), calls


@pytest.mark.parametrize("fmt", ["llama3_json", "mistral"])
def test_a_call_streams_its_arguments_before_the_answer_ends(fmt):
    head = "<|python_tag|>" if fmt == "llama3_json" else "[TOOL_CALLS] ["
    key = "parameters" if fmt == "llama3_json" else "arguments"
    f = ToolCallFilter(fmt=fmt)
    assert f.stream(head + '{"name": "get_weather"') == ("", [])        # the name waits for its arguments' "{"
    _, first = f.stream(f', "{key}": {{"city": "Os')
    ids = r"[A-Za-z0-9]{9}" if fmt == "mistral" else r"call_[0-9a-f]{24}"
    assert re.fullmatch(ids, first[0]["id"]), first
    assert first == [{"index": 0, "id": first[0]["id"], "type": "function",
                      "function": {"name": "get_weather", "arguments": ""}},
                     {"index": 0, "function": {"arguments": '{"city": "Os'}}]
    assert f.stream('lo" ,"days":2') == ("", [{"index": 0, "function": {"arguments": 'lo", "days": '}}])
    # the arguments' "}" waits for the call's object to close (it may still name them twice)
    assert f.stream("}") == ("", [{"index": 0, "function": {"arguments": "2"}}])
    assert f.stream("}") == ("", [{"index": 0, "function": {"arguments": "}"}}])
    sep = "; " if fmt == "llama3_json" else ", "
    _, second = f.stream(f'{sep}{{"name": "get_time", "{key}": {{"utc": tr')
    assert [d["index"] for d in second] == [1, 1] and second[0]["function"] == {"name": "get_time", "arguments": ""}
    assert second[1]["function"] == {"arguments": '{"utc": '}
    tail = "ue}}" + ("]" if fmt == "mistral" else "")
    assert f.stream(tail) == ("", [{"index": 1, "function": {"arguments": "true}"}}])
    assert f.end() == ("", [], True) and f.calls_sent == 2


def test_parallel_tool_calls_false_streams_only_the_first():
    text = '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b": 2}}'
    f = ToolCallFilter(False, "llama3_json")
    _, deltas = f.stream(text)
    assert [d["index"] for d in deltas] == [0, 0] and f.end() == ("", [], True)


def test_content_goes_out_once_the_answer_cannot_be_calls():
    """Held while it may still be calls, then all of it at once, and content from then on (not at the end)."""
    for fmt, held, released, after in (
            ("llama3_json", " {", "o", "ops"),                              # not JSON
            ("llama3_json", '{"city": "Oslo"', "}", " is nice"),            # JSON, no call: known once it closes
            ("llama3_json", "<|python_tag|>", "p", "rint(1)"),
            ("llama3_json", '{"name": "f", "parameters": {}}', ' a', "nd"),    # text after: only before a call
            ("mistral", "[TOOL_CALLS] ", "x", "yz"),
            ("mistral", "[", "N", "ote]"),
            ("mistral", "[TOOL_CALLS] [", "]", " []"),                     # no calls in the array
            ("mistral", '[{"arguments": {}', "}", "]!")):
        f = ToolCallFilter(fmt=fmt)
        got = f.stream(held)
        if fmt == "llama3_json" and held.startswith('{"name"'):
            assert got[1], got                          # a call went out: the answer is no longer content
            assert f.stream(released) == ("", []) and f.end(held + released + after) == ("", [], False)
            continue
        assert got == ("", []), (held, got)
        assert f.stream(released) == (held + released, []), (held, released)
        assert f.stream(after) == (after, []) and f.end() == ("", [], True)


def test_calls_not_written_name_first_go_out_whole_once_read():
    text = '{"parameters": {"a": 1}, "name": "f"}; {"name": "g", "parameters": "{\\"b\\": 2}"}'
    f = ToolCallFilter(fmt="llama3_json")
    cut = text.index(";")
    assert f.stream(text[:cut - 1]) == ("", [])
    _, deltas = f.stream(text[cut - 1:cut + 2])
    assert [(d["index"], d["function"]) for d in deltas] == [(0, {"name": "f", "arguments": '{"a": 1}'})]
    _, deltas = f.stream(text[cut + 2:])
    assert [(d["index"], d["function"]) for d in deltas] == [(1, {"name": "g", "arguments": '{"b": 2}'})]
    assert f.end() == ("", [], True)


def test_calls_that_went_out_but_are_not_the_replys_are_not_whole():
    """As a Hermes block that breaks after its name (test_tool_streaming): what went out stays, nothing more goes
    out (no content: the answer's JSON never is), and end() says not whole, so the finish is not "tool_calls". The
    whole answer's parse has no calls, but the non-streamed reply reads it as its stream sent it: the calls that
    went out whole, no content (test_tool_stream_agreement_formats_qa)."""
    rnd = random.Random(3)
    for fmt, text, args in BROKEN:
        assert parse_tool_calls(text, fmt) == (text, [])
        for cuts in splits(text, rnd):
            content, calls, whole, _ = joined(text, cuts, fmt)
            assert not whole and content == "", (text, cuts, content)
            # the calls that went out are a prefix of what the text held
            assert [c["name"] for c in calls] in (["f"], []) and args.startswith(calls[0]["arguments"] if calls
                                                                                 else ""), (text, cuts, calls)
    # cut before any call went out: the reply's content (the whole answer), as the reply has it
    assert joined('{"name": "f", "param', [5], "llama3_json")[:3] == ('{"name": "f", "param', [], True)


# ---- the server's stream ---------------------------------------------------------------------------------------

def _server_pieces():
    pytest.importorskip("llguidance")
    from conftest import serving
    from test_serve import call, sse
    from test_tool_calling import ASK, TOOLS
    from test_tool_streaming import assembled, scripted
    return serving, call, sse, ASK, TOOLS, assembled, scripted


llama_engine = template_engine_fixture("llama31_stream", "llama31")
mistral_engine = template_engine_fixture("mistral_stream", "mistral")


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("fmt", ["llama3_json", "mistral"])
def test_the_servers_stream_sends_arguments_as_they_decode(fmt, request, monkeypatch):
    """End to end, for a scripted answer (a literal grammar makes the tiny model write it): the stream joined is
    the non-streamed reply (names, arguments, ids' form, finish "tool_calls", no content), each call's arguments in
    several fragments after its name."""
    serving, call, sse, ASK, TOOLS, assembled, scripted = _server_pieces()
    engine = request.getfixturevalue("llama_engine" if fmt == "llama3_json" else "mistral_engine")
    if fmt == "llama3_json":
        text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}; '
                '{"name": "get_time", "parameters": {"utc": true}}')
    else:
        text = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}, '
                '{"name": "get_time", "arguments": {"utc": true}}]')
    with serving(engine, model_id="tiny-" + fmt, defaults=dict(max_new_tokens=300, temperature=0.0)) as server:
        assert server.app.tool_plan({"messages": ASK, "tools": TOOLS}).fmt == fmt
        scripted(server, monkeypatch, text)
        body = {"messages": ASK, "tools": TOOLS}
        status, whole = call(server.url, "/v1/chat/completions", body)
        assert status == 200, whole
        choice = whole["choices"][0]
        want = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]]
        assert want == [("get_weather", '{"city": "Oslo", "days": 2}'), ("get_time", '{"utc": true}')], choice
        content, calls, finish, entries = assembled(sse(server.url, "/v1/chat/completions", body))
        assert [(c["name"], c["arguments"]) for c in calls] == want and content == ""
        assert finish == choice["finish_reason"] == "tool_calls"
        ids = r"[A-Za-z0-9]{9}" if fmt == "mistral" else r"call_[0-9a-f]{24}"
        assert all(re.fullmatch(ids, c["id"]) for c in calls + [{"id": c["id"]} for c in
                                                                choice["message"]["tool_calls"]])
        for per_call in entries:
            assert per_call[0]["function"]["arguments"] == "" and len(per_call) >= 3, per_call
        # parallel_tool_calls false: only the first, both ways
        body["parallel_tool_calls"] = False
        choice = call(server.url, "/v1/chat/completions", body)[1]["choices"][0]
        content, calls, finish, _ = assembled(sse(server.url, "/v1/chat/completions", body))
        assert [(c["name"], c["arguments"]) for c in calls] == want[:1] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]]
        assert finish == choice["finish_reason"] == "tool_calls"
        # an answer that is no call: content both ways, as soon as it cannot be one
        scripted(server, monkeypatch, '{"city": "Oslo"} is what I found')
        body.pop("parallel_tool_calls")
        choice = call(server.url, "/v1/chat/completions", body)[1]["choices"][0]
        content, calls, finish, _ = assembled(sse(server.url, "/v1/chat/completions", body))
        assert content == choice["message"]["content"] == '{"city": "Oslo"} is what I found' and not calls
        assert finish == choice["finish_reason"] == "stop"
