"""A Llama 3 or Mistral answer of tool calls cut (by max_tokens) after one or more whole calls: the stream has sent
the whole calls as they decoded (ToolCallFilter.stream), so the non-streamed reply (ToolPlan.read) gives the same
calls, with the same arguments, no content but what the stream sent (Mistral's text before [TOOL_CALLS]), and the
same finish. It gave no content and no calls under "required" (the cut answer's JSON as content under "auto"),
while its stream had sent the calls. As a Hermes answer cut after a whole block reads (parse_tool_calls)."""
from __future__ import annotations

import json
import random

import pytest

from amphista_engine.tools import ToolCallFilter, ToolPlan, openai_tool_calls

from test_tool_streaming_formats import joined
from tool_helpers import template_engine_fixture

F = '{"name": "get_weather", "%s": {"city": "Oslo", "days": 2}}'
G = '{"name": "get_time", "%s": {"utc": true, "zone": "Europe/Oslo"}}'
# (format, v11, the answer's whole calls written out, the text of the call the cut falls in, names of the whole)
ANSWERS = [
    ("llama3_json", False, "<|python_tag|>" + F % "parameters" + "; ", G % "parameters", ["get_weather"]),
    ("llama3_json", False, F % "parameters" + "; " + G % "parameters" + "; ", F % "parameters",
     ["get_weather", "get_time"]),
    ("mistral", False, "[TOOL_CALLS] [" + F % "arguments" + ", ", G % "arguments", ["get_weather"]),
    ("mistral", False, "[" + F % "arguments" + ", ", G % "arguments", ["get_weather"]),        # no control token
    ("mistral", False, "Let me check. [TOOL_CALLS] [" + F % "arguments" + ", ", G % "arguments", ["get_weather"]),
    ("mistral", True, '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 2}', '[TOOL_CALLS]get_time[ARGS]{"utc"',
     ["get_weather"]),
]
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "get_time")]
CHOICES = ["required", {"name": "get_weather"}, "auto"]


def plan(fmt, v11, choice, parallel) -> ToolPlan:
    return ToolPlan(TOOLS, choice, None, parallel, fmt, v11)


def cuts_of(head: str, tail: str):
    """The answer cut anywhere in its next call (after its first character, before its last)."""
    return [head + tail[:k] for k in range(1, len(tail))]


def reply(p: ToolPlan, text: str):
    content, calls = p.read(text)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                     for c in openai_tool_calls(calls, p.fmt)]


@pytest.mark.parametrize("fmt,v11,head,tail,names", ANSWERS)
def test_a_cut_answer_reads_as_the_whole_calls_its_stream_sent(fmt, v11, head, tail, names):
    rnd = random.Random(11)
    for text in cuts_of(head, tail):
        for choice in CHOICES:
            for parallel in (True, False):
                p = plan(fmt, v11, choice, parallel)
                content, calls = reply(p, text)
                want = names if parallel else names[:1]
                assert [n for n, _ in calls] == want, (text, choice, parallel, content, calls)
                lead = "Let me check. " if text.startswith("Let") and not p.calls_only else None
                assert content == lead, (text, choice, content)
                # in one delta, a character at a time, and at a few random points
                for cut in ([], list(range(1, len(text))),
                            sorted(rnd.sample(range(len(text) + 1), rnd.randint(2, 8)))):
                    f = ToolCallFilter(parallel, fmt, v11=v11, calls_only=p.calls_only)
                    sent, streamed, whole, _ = joined(text, cut, fmt, parallel, f)
                    # the whole calls the stream sent are the reply's, arguments as the reply writes them; a call
                    # cut in its arguments went out only begun: not whole (the server's finish is the run's, here
                    # "length"); cut before the next call went out, the calls sent are whole, as the reply's
                    # (an answer that ended there, EOS, finishes "tool_calls" both ways: ToolPlan.answer)
                    done = [(c["name"], json.loads(c["arguments"])) for c in streamed[:len(want)]]
                    assert done == calls and whole == (len(streamed) == len(want)), (text, cut, streamed, calls)
                    assert whole == p.answer(text)[2], (text, cut, streamed)
                    assert sent == (content or ""), (text, cut, sent, content)
                # a request with stops: these formats' calls go out at the end, only a whole answer's (as the
                # answer cut by a stop is content, test_tool_controls_user_qa): the reply reads it so too
                f = ToolCallFilter(parallel, fmt, v11=v11, whole=True, calls_only=p.calls_only)
                sent, streamed, whole, _ = joined(text, [len(text) // 2], fmt, parallel, f)
                assert p.read(text, stops=True) == (None if p.calls_only else text, []) and not streamed, text
                assert whole and sent == ("" if p.calls_only else text), (text, sent)
    # not cut: text after whole calls (the answer is no calls), the model's end inside the first call, content. The
    # reply reads them as its stream sent them (test_tool_stream_agreement_formats_qa): the whole calls that went
    # out, no content but what went out as content, never the answer's JSON; an answer that is not calls from its
    # first character is content
    whole = head.rstrip("; ,")
    lead = "Let me check. " if head.startswith("Let") else None
    begun = fmt == "llama3_json" or v11         # the tail alone begins a call (Mistral's array needs its "[")
    for text, content, called in ((whole + " and more", lead, names),
                                  (whole + ("" if fmt == "llama3_json" or v11 else "]") + "!", lead, names),
                                  (tail[:-3], None if begun else tail[:-3], []),
                                  ("It is [sunny].", "It is [sunny].", [])):
        got, calls = reply(plan(fmt, v11, "auto", True), text)
        assert (got, [n for n, _ in calls]) == (content, called), text
        assert reply(plan(fmt, v11, "required", True), text) == (None, calls), text
        sent, streamed, _, _ = joined(text, list(range(1, len(text))), fmt, True, ToolCallFilter(fmt=fmt, v11=v11))
        assert sent == (content or "") and [c["name"] for c in streamed][:len(called)] == called, (text, streamed)


# ---- the server, end to end --------------------------------------------------------------------------------------

@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("fmt", ["llama3_json", "mistral"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}, "auto"])
def test_the_servers_reply_to_a_cut_answer_has_the_calls_its_stream_sent(fmt, choice, request, monkeypatch):
    pytest.importorskip("llguidance")
    from conftest import serving
    from test_serve import call, sse
    from test_tool_calling import ASK, CHAT, TOOLS as SERVER_TOOLS
    from test_tool_calling_mistral_v11 import answer_with, script
    from test_tool_streaming import assembled
    engine = request.getfixturevalue("llama_cut_engine" if fmt == "llama3_json" else "mistral_cut_engine")
    key = "parameters" if fmt == "llama3_json" else "arguments"
    first = ("" if fmt == "llama3_json" else "[TOOL_CALLS] [") + F % key
    rest = ("; " if fmt == "llama3_json" else ", ") + \
        '{"name": "get_weather", "%s": {"city": "Bergen", "days": 3, "note": "%s"}}' % (key, "z" * 80)
    # a cut a few tokens into the next call (the random vocabulary spends about a token per character)
    cut = len(engine.tokenizer.encode(first, add_bos=False)) + 8
    body = {"messages": ASK, "tools": SERVER_TOOLS, "tool_choice": choice, "max_tokens": cut}
    with serving(engine, model_id="tiny-cut-" + fmt, defaults=dict(max_new_tokens=300, temperature=0.0)) as server:
        answer_with(monkeypatch, server.app, script(engine, [first, rest], special=()))
        status, reply = call(server.url, CHAT, body)
        assert status == 200, reply
        [ch] = reply["choices"]
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                 for c in ch["message"].get("tool_calls") or []]
        assert calls == [("get_weather", {"city": "Oslo", "days": 2})], ch
        assert ch["message"]["content"] is None and ch["finish_reason"] == "length", ch
        content, got, finish, _ = assembled(sse(server.url, CHAT, body))
        whole = [(c["name"], json.loads(c["arguments"])) for c in got[:1]]
        assert whole == calls and content == "" and finish == "length", (content, got, finish)
        # parallel_tool_calls false: the same first call
        one = {**body, "parallel_tool_calls": False}
        ch = call(server.url, CHAT, one)[1]["choices"][0]
        assert [c["function"]["name"] for c in ch["message"].get("tool_calls") or []] == ["get_weather"], ch
        # a stop (never met): calls go out whole, at the end, only a whole answer's; the reply reads it so too
        stopped = {**body, "stop": ["qqqq"]}
        ch = call(server.url, CHAT, stopped)[1]["choices"][0]
        content, got, finish, _ = assembled(sse(server.url, CHAT, stopped), markup_ok=True)
        assert not got and not ch["message"].get("tool_calls") and finish == ch["finish_reason"] == "length", ch
        assert content == (ch["message"]["content"] or "") and (content == "") == (choice != "auto"), content


llama_cut_engine = template_engine_fixture("llama31_cut", "llama31")
mistral_cut_engine = template_engine_fixture("mistral_cut", "mistral")
