"""QA of tool calls streamed as they decode (tools.py ToolCallFilter.stream / end, _Canon; the server's _stream), as
a client that joins `delta.tool_calls` the way OpenAI's SDK does: for scripted answers (a literal grammar makes the
tiny model write them), the joined stream is the non-streamed reply (content, names, arguments, finish reason), no
markup is content, and every chunk has OpenAI's shape."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")

from amphista_engine.tools import ToolCallFilter, parse_tool_calls    # noqa: E402

from conftest import serving                              # noqa: E402
from test_serve import call, sse                          # noqa: E402
from test_tool_calling import ASK, TOOLS, engine, long_dir  # noqa: E402,F401
from test_tool_streaming import CHAT, MARKUP                # noqa: E402


def scripted(server, monkeypatch, text: str):
    """As test_tool_streaming's, with tabs and carriage returns escaped in the Lark literal too."""
    app = server.app
    plan_of = type(app).tool_plan
    lark = 'start: "' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") \
        .replace("\t", "\\t").replace("\r", "\\r") + '"'
    monkeypatch.setattr(app, "tool_plan", lambda body: plan_of(app, body)._replace(
        response_format={"type": "grammar", "grammar": lark}))

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def server(engine):  # noqa: F811
    with serving(engine, model_id="tiny", defaults=dict(max_new_tokens=300, temperature=0.0)) as httpd:
        yield httpd


def assemble(events, n=1):
    """OpenAI SDK-style accumulation, per choice; strict shape checks."""
    assert events[-1] == "[DONE]"
    out = {}
    usage = None
    for e in events[:-1]:
        if not e["choices"]:
            usage = e["usage"]
            continue
        [ch] = e["choices"]
        i = ch["index"]
        st = out.setdefault(i, {"content": "", "calls": {}, "finish": None, "roles": 0, "logprobs": None})
        assert st["finish"] is None, ("chunk after finish", e)
        d = ch["delta"]
        st["roles"] += "role" in d
        if d.get("content"):
            assert not any(m in d["content"] for m in MARKUP), d
            st["content"] += d["content"]
        for tc in d.get("tool_calls", ()):
            assert "index" in tc
            k = tc["index"]
            if k not in st["calls"]:
                assert tc["type"] == "function" and tc["id"].startswith("call_"), tc
                st["calls"][k] = {"id": tc["id"], "name": tc["function"]["name"],
                                  "arguments": tc["function"]["arguments"]}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}, tc
                st["calls"][k]["arguments"] += tc["function"]["arguments"]
        if ch["finish_reason"] is not None:
            st["finish"] = ch["finish_reason"]
            st["logprobs"] = ch["logprobs"]
    for st in out.values():
        assert st["roles"] == 1 and st["finish"] is not None
        assert sorted(st["calls"]) == list(range(len(st["calls"])))
    return out, usage


def compare(server, body):
    status, reply = call(server.url, CHAT, body)
    assert status == 200, reply
    got, usage = assemble(sse(server.url, CHAT, body))
    for ch in reply["choices"]:
        st = got[ch["index"]]
        want = [(c["function"]["name"], c["function"]["arguments"]) for c in ch["message"].get("tool_calls") or []]
        have = [(c["name"], c["arguments"]) for c in (st["calls"][k] for k in sorted(st["calls"]))]
        assert (st["content"], have, st["finish"]) == (ch["message"]["content"] or "", want, ch["finish_reason"]), \
            (ch, st)
    return reply, got, usage


CALL = '<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>'
TEXTS = [
    CALL.format(args='{"a": {"b": [1, [2, {"c": null}], {}], "d": []}, "e": true, "f": false}'),
    CALL.format(args='{"s": "caf\\u00e9 \\ud83d\\ude00 \\"q\\" back\\\\slash \\/ tab\\t nl\\n", "u": "é😀"}'),
    CALL.format(args='{"p": "C:\\\\usr\\\\bin", "q": "\\\\uab\\n"}'),
    CALL.format(args='{"i": 12345678901234567890123456789, "f": 1.50, "e": 1e5, "E": -2.5E-3, "z": -0, "zf": -0.0}'),
    CALL.format(args='{}'),
    '<tool_call>\n{ "name" :  "get_weather" ,\n  "arguments" : {\n   "city" :\t"Oslo" ,\n "days" : 2\n }\n}'
    '\n</tool_call>',
    'Before. <tool_call>{"name": "get_time", "arguments": {"utc": true}}</tool_call> between '
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call> after.',
    CALL.format(args='{"a": 1}') + "\n" + CALL.format(args='{"b": 2}') + "\n" + CALL.format(args='{"c": 3}'),
    '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>',
    '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "parameters": {"city": "Oslo"}}\n</tool_call>',
    CALL.format(args='{"a": "x\\ud83dy"}'),
]


TWO = ('Before. <tool_call>{"name": "get_time", "arguments": {"utc": true, "s": "a\\\\uab\\n"}}</tool_call> mid '
       '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call> after.')


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_calls_join_to_the_non_streamed_reply(server, monkeypatch, text):
    """Nested values, escapes, emoji as surrogate pairs, numbers, {}, loose whitespace, text around and between
    calls, three calls, arguments as a JSON string, the name after the arguments, "parameters". Two answers broke:
    "C:\\\\usr\\\\bin" (an escaped backslash, "u", two characters, an escape) raised ValueError in the stream's
    JSON reader (the stream stopped without its calls or [DONE]); a lone "\\ud83d" was a 500 (UnicodeEncodeError)."""
    scripted(server, monkeypatch, text)
    compare(server, {"messages": ASK, "tools": TOOLS, "max_tokens": 600})


def test_n_choices_logprobs_and_usage_stream_each_choices_calls(server, monkeypatch):
    """n=2, logprobs and include_usage with two calls, text around them and a backslash-u argument: each choice's
    chunks carry its own index and calls, its logprobs come whole with its finish chunk, usage as the reply's."""
    scripted(server, monkeypatch, TWO)
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 600, "n": 2, "logprobs": True, "top_logprobs": 2,
            "stream_options": {"include_usage": True}}
    reply, got, usage = compare(server, body)
    assert usage == reply["usage"] and sorted(got) == [0, 1]
    for ch in reply["choices"]:
        assert ch["finish_reason"] == "tool_calls" and len(got[ch["index"]]["calls"]) == 2
        assert got[ch["index"]]["logprobs"] == ch["logprobs"] and ch["logprobs"]["content"]


def _run(f: ToolCallFilter, pieces, text):
    content, calls = "", {}
    for piece in pieces:
        c, deltas = f.stream(piece)
        content += c
        for d in deltas:
            calls.setdefault(d["index"], [d["function"].get("name"), ""])[1] += d["function"]["arguments"]
    rest, deltas, whole = f.end(text)
    for d in deltas:
        calls.setdefault(d["index"], [d["function"].get("name"), ""])[1] += d["function"]["arguments"]
    return content, rest, [tuple(calls[k]) for k in sorted(calls)], whole


def test_filter_backslash_u_and_lone_surrogates_at_every_split():
    """The filter alone, the answer cut into two deltas at every place: the joined calls are the parsed ones."""
    for text in ('<tool_call>{"name": "f", "arguments": {"p": "C:\\\\usr\\\\bin", "q": "\\\\uab\\n"}}</tool_call>',
                 '<tool_call>{"name": "f", "arguments": {"x\\udc00": "a\\ud83db\\ud83d\\ude00"}}</tool_call>'):
        want_content, want = parse_tool_calls(text)
        want = [(c["name"], json.dumps(c["arguments"], ensure_ascii=True)) for c in want]
        for i in range(len(text) + 1):
            content, rest, calls, whole = _run(ToolCallFilter(), (text[:i], text[i:]), text)
            assert whole and content + rest == "" and want_content is None, (i, content, rest)
            # each call's arguments: valid UTF-8, and JSON that reads as the parsed arguments
            assert [(n, json.dumps(json.loads(a), ensure_ascii=True)) for n, a in calls] == want, (i, calls)
            assert all(a.encode("utf-8") for _, a in calls)


def test_filter_a_huge_int_does_not_break_the_stream():
    """An int of more digits than Python converts (json.loads refuses it, so the reply has no call): the stream's
    reader gave up with ValueError, uncaught; now the call that went out is not claimed whole."""
    text = '<tool_call>{"name": "f", "arguments": {"n": ' + "1" * 5000 + '}}</tool_call>'
    content, rest, calls, whole = _run(ToolCallFilter(), [text[i:i + 7] for i in range(0, len(text), 7)], text)
    assert not whole and content + rest == "" and calls == [("f", '{"n": ')], calls


def test_filter_an_answer_cut_in_the_next_tag_after_a_call_sends_no_markup():
    """max_tokens cutting "... </tool_call> mid <tool_call": the partial tag went out as delta.content."""
    one = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call> mid '
    for tail in ("<tool_call", "<tool_", "<t"):
        text = one + tail
        content, rest, calls, whole = _run(ToolCallFilter(), list(text), text)
        assert content + rest == " mid " and calls == [("f", '{"a": 1}')] and whole, (tail, content, rest)
    # a lone "<" after the calls is the answer's own text, as the reply has it
    text = one + "<"
    assert _run(ToolCallFilter(), list(text), text)[:2] == ("", " mid <")
