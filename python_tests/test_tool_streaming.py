"""Tool calls streamed as they decode (tools.py ToolCallFilter.stream / end, the server's _stream): a call's first
`delta.tool_calls` entry carries its index, id, type and name (arguments ""), later ones its arguments' text as it
decodes, and the fragments joined per index are the non-streamed reply's arguments, for the same greedy request.
Model answers are real (the tool grammars of "required" and a named function on the tiny random model) or scripted:
a literal grammar in place of an "auto" plan's free answer makes the model write exactly the text a test needs."""
from __future__ import annotations

import json
import random
import re

import pytest

pytest.importorskip("llguidance")

from amphista_engine.tools import ToolCallFilter, parse_tool_calls    # noqa: E402

from conftest import serving                              # noqa: E402
from test_serve import call, sse                          # noqa: E402
from test_tool_calling import ASK, TOOLS, engine, long_dir  # noqa: E402,F401  (module fixtures)

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHAT = "/v1/chat/completions"
MARKUP = ("<tool_call", "</tool_call", "[TOOL_CALLS]")
TWO = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city":"Oslo" , "days":2}}\n</tool_call>\n'
       '<tool_call>\n{"name": "get_time", "arguments": {"utc": true, "note": "caf\\u00e9 \\"x\\"", "n": 1E2}}\n'
       '</tool_call>')


@pytest.fixture(scope="module")
def server(engine):  # noqa: F811
    with serving(engine, model_id="tiny", defaults=dict(max_new_tokens=200, temperature=0.0)) as httpd:
        yield httpd


def scripted(server, monkeypatch, text: str):
    """The server's "auto" plans hold the answer to `text` (a literal grammar): the model writes it."""
    app = server.app
    plan_of = type(app).tool_plan
    lark = 'start: "' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    monkeypatch.setattr(app, "tool_plan", lambda body: plan_of(app, body)._replace(
        response_format={"type": "grammar", "grammar": lark}))


def assembled(events, markup_ok=False) -> tuple[str, list[dict], str, list[list[dict]]]:
    """A stream's (content, calls as a client joins them, finish_reason, each call's entries); checks the chunks'
    shape: each call's first entry has its id, type and name, the later ones only arguments; and that no markup
    is content (markup_ok: an answer whose block is no call, which the non-streamed reply has as content too)."""
    assert events[-1] == "[DONE]"
    content, calls, entries, finish = "", {}, {}, None
    for e in events[:-1]:
        [choice] = e["choices"]
        d = choice["delta"]
        piece = d.get("content") or ""
        assert markup_ok or not any(m in piece for m in MARKUP), piece      # (b): markup is never content
        content += piece
        for tc in d.get("tool_calls", ()):
            k = tc["index"]
            entries.setdefault(k, []).append(tc)
            if k not in calls:
                assert tc["type"] == "function" and tc["id"] and isinstance(tc["function"]["name"], str), tc
                calls[k] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": tc["function"]["arguments"]}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}, tc
                calls[k]["arguments"] += tc["function"]["arguments"]
        if choice["finish_reason"] is not None:
            finish = choice["finish_reason"]
    assert sorted(calls) == list(range(len(calls)))
    return content, [calls[k] for k in sorted(calls)], finish, [entries[k] for k in sorted(entries)]


def same_answer(server, body, markup_ok=False) -> tuple[dict, list[list[dict]]]:
    """The non-streamed reply's choice, checked against the stream's (content, ids' form, names, arguments, finish);
    the stream's entries per call."""
    status, reply = call(server.url, CHAT, body)
    assert status == 200, reply
    choice = reply["choices"][0]
    content, calls, finish, entries = assembled(sse(server.url, CHAT, body), markup_ok)
    want = choice["message"].get("tool_calls") or []
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in want]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) for c in calls + want)
    assert content == (choice["message"]["content"] or "") and finish == choice["finish_reason"]
    return choice, entries


def test_required_and_named_stream_their_arguments_as_they_decode(server):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}},
                   {"type": "function", "function": {"name": "get_time"}}):
        body = {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "temperature": 0}
        reply, entries = same_answer(server, body)
        assert reply["finish_reason"] == "tool_calls" and reply["message"]["tool_calls"], reply
        for per_call in entries:
            # the name first, with no arguments yet; the arguments after it, in several fragments
            assert per_call[0]["function"]["arguments"] == "" and len(per_call) >= 3, per_call


def test_auto_and_parallel_calls_stream_as_the_reply_reads_them(server, monkeypatch):
    """Two calls after some text, written loosely (spaces, an escape, 1E2): the fragments are the reply's
    arguments as json.dumps writes them, the text before the calls streams as content at once."""
    scripted(server, monkeypatch, TWO)
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 400}
    reply, entries = same_answer(server, body)
    calls = reply["message"]["tool_calls"]
    assert reply["finish_reason"] == "tool_calls" and reply["message"]["content"] == "Let me check.\n", reply
    assert [c["function"]["arguments"] for c in calls] == ['{"city": "Oslo", "days": 2}',
                                                           '{"utc": true, "note": "café \\"x\\"", "n": 100.0}']
    assert all(len(e) >= 3 for e in entries), entries
    # parallel_tool_calls false: only the first call, both ways
    reply, entries = same_answer(server, {**body, "parallel_tool_calls": False})
    assert len(reply["message"]["tool_calls"]) == 1 and len(entries) == 1


def test_a_call_cut_by_max_tokens_streams_what_it_had_and_says_length(server, monkeypatch):
    """(c): cut inside its arguments, the call's fragments so far are a prefix of the whole call's, no markup is
    content, and the finish is "length" (never "tool_calls": the arguments are not claimed whole)."""
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 3}}\n</tool_call>'
    scripted(server, monkeypatch, one)
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 400}
    status, reply = call(server.url, CHAT, body)
    # the answer's own tokens: usage counts the EOS it ended on too
    total = reply["usage"]["completion_tokens"] - (reply["amphista"]["engine_finish_reason"] == "eos")
    full = '{"city": "Lima", "days": 3}'
    seen = set()
    for mt in range(total - 32, total, 3):
        content, calls, finish, _ = assembled(sse(server.url, CHAT, {**body, "max_tokens": mt}))
        assert finish == "length" and content == "", (mt, content, finish)
        whole = call(server.url, CHAT, {**body, "max_tokens": mt})[1]["choices"][0]["message"].get("tool_calls")
        if whole:       # cut after the call's JSON closed: the reply reads the call, and the stream sent it all
            assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", full)], calls
        elif calls:
            [c] = calls
            assert c["name"] == "get_weather" and full.startswith(c["arguments"]) and c["arguments"] != full, c
            seen.add(c["arguments"])
    assert len(seen) >= 3, seen          # the cut fell at several places inside the arguments


def test_an_invalid_block_answers_as_the_non_streamed_reply(server, monkeypatch):
    """(e): a block that is not a call (no JSON) is content both ways, markup included, as the reply has it."""
    for text in ("<tool_call>{oops}</tool_call>", 'Hm <tool_call>\n{"arguments": 1}\n</tool_call> ok'):
        scripted(server, monkeypatch, text)
        reply, entries = same_answer(server, {"messages": ASK, "tools": TOOLS, "max_tokens": 200}, markup_ok=True)
        assert reply["message"]["content"] == text and not entries and reply["finish_reason"] == "stop", reply
    # JSON that breaks after the arguments: its name went out, but its arguments never read as whole JSON and
    # the finish is not "tool_calls" (the reply, read as its stream sent it, drops the block: neither a call nor
    # content, and its finish is "stop" too: test_tool_stream_agreement_qa)
    scripted(server, monkeypatch, '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}} x\n</tool_call>')
    content, calls, finish, _ = assembled(sse(server.url, CHAT, {"messages": ASK, "tools": TOOLS}))
    assert finish == "stop" and content == "" and [c["name"] for c in calls] == ["get_time"], calls
    assert calls[0]["arguments"] == '{"utc": true'


TRICKY = [
    '<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": [1.0, 2e3, -0, true, null, {"c": "x\\u00e9\\n'
    '\\ud83d\\ude00 \\/y"}], "e": {}, "l": []}}\n</tool_call>',
    'Hi <tool_call>{"name":"f","arguments":{"a" : 1 ,"s":"q\\"z"}}</tool_call>\n<tool_call>\n{"name": "g", '
    '"arguments": {}}\n</tool_call> bye',
    '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',        # arguments as a string
    '<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call><tool_call>{"name": "g", "arguments": '
    '{"x": -0.5}}</tool_call>',                                                       # name after the arguments
    '<tool_call>\n{"name": "f", "arguments": {"a": NaN}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_c',                    # cut in the closing tag
    '<tool_call>{oops}</tool_call>\n<tool_call>{"name": "f", "parameters": {"k": "v"}}</tool_call>',
    'no call at all <tool_ca',
]


def _joined(f: ToolCallFilter, text: str, rnd: random.Random):
    content, calls, i = "", {}, 0
    while i < len(text):
        n = rnd.randint(1, 5)
        piece, deltas = f.stream(text[i:i + n])
        i += n
        content += piece
        for d in deltas:
            calls.setdefault(d["index"], {"name": d["function"].get("name"), "arguments": ""})
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    rest, deltas, whole = f.end(text)
    for d in deltas:
        calls.setdefault(d["index"], {"name": d["function"].get("name"), "arguments": ""})
        calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content + rest, [calls[k] for k in sorted(calls)], whole


def test_fragments_join_to_the_parsed_arguments_however_the_text_is_cut():
    """The filter on its own: any split of the answer into deltas gives the calls and content parse_tool_calls
    gives the whole text (arguments as json.dumps writes them), whether they stream or wait for the end."""
    rnd = random.Random(0)
    for text in TRICKY:
        want_content, want = parse_tool_calls(text)
        want = [{"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)} for c in want]
        for _ in range(25):
            content, calls, whole = _joined(ToolCallFilter(), text, rnd)
            assert whole and calls == want and content == (want_content or ""), (text, calls, content)
    # the first call streams before the answer ends: name first, then its arguments in pieces
    f = ToolCallFilter()
    _, first = f.stream('<tool_call>\n{"name": "f", "arguments": {"a": "long')
    assert first == [{"index": 0, "id": first[0]["id"], "type": "function",
                      "function": {"name": "f", "arguments": ""}},
                     {"index": 0, "function": {"arguments": '{"a": "long'}}]
    assert f.stream(' text", "b": 12')[1] == [{"index": 0, "function": {"arguments": ' text", "b": '}}]
    # cut before the call's name was read: the block is dropped, as a call cut in its arguments (the reply keeps
    # it as content); a block known not to be a call stays content, as in the reply
    for text, content in (('Hi <tool_call>\n{"name": "f", "argu', "Hi "),
                          ('Hi <tool_call>\n{"nom', "Hi <tool_call>\n{\"nom")):
        assert _joined(ToolCallFilter(), text, rnd) == (content, [], True)
    # Llama 3's and Mistral's calls stream too (test_tool_streaming_formats.py): the whole answer at once sends its
    # call, arguments and their "}" from stream(), and end() has nothing left
    for fmt, text in (("llama3_json", '{"name": "f", "parameters": {"a": 1}}'),
                      ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}]')):
        f = ToolCallFilter(fmt=fmt)
        content, deltas = f.stream(text)
        assert content == "" and [d["function"] for d in deltas] == [{"name": "f", "arguments": ""},
                                                                      {"arguments": '{"a": 1}'}]
        assert f.end() == ("", [], True)


def test_metrics_count_answers_of_tool_calls_as_tool_calls(server, monkeypatch):
    """/metrics counted a tool-call answer under the engine's "eos"; it counts as "tool_calls", its finish_reason,
    streamed or not; a cut call stays "length" and a plain answer its engine reason."""
    from test_serve_metrics import scrape, value

    def count(reason):
        return value(scrape(server.url)[1], "amphista_request_success_total", finish_reason=reason)

    scripted(server, monkeypatch, TWO)
    before = {r: count(r) for r in ("tool_calls", "eos", "length")}
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 400}
    assert call(server.url, CHAT, body)[1]["choices"][0]["finish_reason"] == "tool_calls"
    assert assembled(sse(server.url, CHAT, body))[2] == "tool_calls"
    assert assembled(sse(server.url, CHAT, {**body, "max_tokens": 30}))[2] == "length"
    scripted(server, monkeypatch, "no call")
    assert call(server.url, CHAT, body)[1]["choices"][0]["finish_reason"] == "stop"
    assert {r: count(r) - before[r] for r in before} == {"tool_calls": 2, "eos": 1, "length": 1}
