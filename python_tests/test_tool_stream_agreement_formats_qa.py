"""The non-streamed reply reads a Llama 3 or Mistral answer as its stream sent it, as test_tool_stream_agreement_qa
checks for Hermes blocks (ToolPlan.answer / tools._whole_reading against ToolCallFilter.stream / end; the server's
chat endpoint on top of them).

1. A call went out (its name, then its arguments), then the answer does not read as calls: text after the calls, a
   stray `[...]`, JSON that breaks, the arguments given twice, or the model's end inside the first call. The stream
   had sent the call(s) and no content, while the reply gave the whole JSON as content and no calls. Now the
   reply's calls are those that went out whole, its content what went out as content (Mistral's text before
   [TOOL_CALLS]), and the finish is not "tool_calls" where the stream's is not (the answer broke, or a call it
   began is not whole); parallel_tool_calls false reads only the first call, as the Hermes reading does.
2. Only whitespace before a Hermes block (" <tool_call>" then EOS, "\\n\\n" before whole calls): the stream sent it
   as content where the reply had None. Now the stream holds content that is only whitespace, as Llama 3's and
   Mistral's streams do, and both have none.
"""
from __future__ import annotations

import json
import random

import pytest

from amphista_engine.tools import ToolCallFilter

# the engines: fixtures, found here by name
from test_tool_stream_agreement_qa import (A, BROKEN, W, _both_ways, _cuts, finishes, hermes_engine,  # noqa: F401
                                           llama_engine, mistral_engine, plan)
from test_tool_streaming_formats import joined

LW = W.replace('"arguments"', '"parameters"')
LT = '{"name": "get_time", "parameters": {"utc": true}}'
WEATHER = ("get_weather", '{"city": "Oslo", "days": 2}')
TIME = ("get_time", '{"utc": true}')
MARKUP = ("[TOOL_CALLS]", "<|python_tag|>", '"name"', "[ARGS]", "{")
# (format, v11, the answer, its content, the whole calls that went out, whether parallel_tool_calls false reads
# them whole: the break comes after the first call)
BROKE = [
    ("llama3_json", False, LW + " and more", "", [WEATHER], True),
    ("llama3_json", False, "<|python_tag|>" + LW + " oops", "", [WEATHER], True),
    ("llama3_json", False, LW + "; " + LT + " trailing", "", [WEATHER, TIME], True),
    ("llama3_json", False, LW + "; [1]", "", [WEATHER], True),
    ("llama3_json", False, LW + LT, "", [WEATHER], True),
    ("llama3_json", False, '{"name": "get_weather", "parameters": {"city": "Oslo"}, x}', "", [], False),
    ("llama3_json", False, LW.replace("}}", '}, "parameters": {"city": "Rome"}}'), "", [], False),
    ("mistral", False, "[TOOL_CALLS] [" + W + "] oops", "", [WEATHER], True),
    ("mistral", False, "[TOOL_CALLS] [" + W + "] [1]", "", [WEATHER], True),
    ("mistral", False, "[" + W + "] oops", "", [WEATHER], True),
    ("mistral", False, "[TOOL_CALLS] [" + W + ", oops]", "", [WEATHER], True),
    ("mistral", False, "Let me check. [TOOL_CALLS] [" + W + ", 1]", "Let me check. ", [WEATHER], True),
    ("mistral", False, "[TOOL_CALLS] [" + W.replace("}}", '}, "arguments": {"city": "Rome"}}') + "]", "", [],
     False),
    ("mistral", True, '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 2} oops', "", [WEATHER], True),
    ("mistral", True, '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 2}[TOOL_CALLS]get_time[ARGS]'
     '{"utc": true} x', "", [WEATHER, TIME], True),
    ("mistral", True, 'Hi [TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 2}[TOOL_CALLS] [1]', "Hi ",
     [WEATHER], True),
]
# the model's end inside the first call, after its name went out: (format, v11, the answer, its content)
ENDED_IN_FIRST = [
    ("llama3_json", False, '{"name": "get_weather", "parameters": {"city": "Os', ""),
    ("llama3_json", False, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}', ""),
    ("mistral", False, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Os', ""),
    ("mistral", False, 'Let me check. [TOOL_CALLS] [{"name": "get_weather", "arguments": {', "Let me check. "),
    ("mistral", True, '[TOOL_CALLS]get_weather[ARGS]{"city": "Os', ""),
    ("mistral", True, 'Hi [TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"', "Hi "),
]


def test_an_answer_that_breaks_after_its_calls_went_out_reads_as_its_stream_sent_it():
    rnd = random.Random(29)
    for fmt, v11, text, content, calls, first_whole in BROKE:
        for parallel in (True, False):
            p = plan(fmt, parallel, v11)
            want = calls if parallel else calls[:1]
            for cuts in _cuts(text, rnd):
                reply, stream, _ = finishes(p, text, cuts)
                assert stream == reply, (text, parallel, cuts, stream, reply)
                assert reply[0] == content and reply[1] == want, (text, parallel, reply)
                # the answer broke after the calls: not "tool_calls"; parallel_tool_calls false reads (and streams)
                # only the first call, so a break after it is dropped with the calls after it
                assert reply[2] == ("tool_calls" if not parallel and first_whole else "stop"), (text, reply)
            # the JSON the stream never sent is no content, whoever reads it (generate_with_tools too)
            got, read = p.read(text)
            assert (got or "") == content and not any(m in (got or "") for m in MARKUP), (text, got)
            assert [(c["name"], json.dumps(c["arguments"])) for c in read] == want, (text, read)
        # a request with stops sends these formats' calls only at the end, as the whole answer's parse reads them:
        # nothing went out before, so a broken answer is content (arguments given twice: the parse's call), both
        # ways, as before
        p = plan(fmt, True, v11)
        content, calls = p.read(text, stops=True)
        assert calls or content == text, (text, content)
        got = joined(text, [len(text) // 2], fmt, True, ToolCallFilter(True, fmt, v11=v11, whole=True))
        assert got[0] == (content or "") and [(c["name"], json.loads(c["arguments"])) for c in got[1]] == \
            [(c["name"], c["arguments"]) for c in calls], (text, got)


def test_an_answer_that_ends_inside_its_first_call_reads_as_its_stream_sent_it():
    rnd = random.Random(31)
    for fmt, v11, text, content in ENDED_IN_FIRST:
        for parallel in (True, False):
            p = plan(fmt, parallel, v11)
            for cuts in _cuts(text, rnd):
                reply, stream, others = finishes(p, text, cuts)
                assert stream == reply == (content, [], "stop"), (text, parallel, cuts, stream, reply)
                assert [n for n, _ in others] == ["get_weather"], (text, cuts, others)
            # "required": no content, no calls, both ways (its stream sent the begun call only)
            required = p._replace(choice="required")
            assert required.answer(text) == (None, [], False), text


# ---- 2. only whitespace before a Hermes block -------------------------------------------------------------------

def test_whitespace_before_a_hermes_block_is_content_neither_way():
    rnd = random.Random(37)
    for text, calls, finish in (
            (" <tool_call>", [], "stop"),
            (" \n<tool_call>\n{\"na", [], "stop"),
            ("\n " + BROKEN[0], [], "stop"),
            (" " + A, [WEATHER], "tool_calls"),
            ("\n\n" + A + "\n", [WEATHER], "tool_calls"),
            (A + "\n<tool_c", [WEATHER], "tool_calls")):
        for hidden in ((), ("<tool_call>", "</tool_call>")):
            p = plan("hermes", hidden=hidden)
            for cuts in _cuts(text, rnd):
                reply, stream, _ = finishes(p, text, cuts)
                assert stream == reply == ("", calls, finish), (text, hidden, cuts, stream, reply)
            assert p.read(text)[0] is None, text
        # with stops (calls go out whole as their blocks close) too
        got = joined(text, list(range(1, len(text))), "hermes", True, ToolCallFilter(whole=True))
        assert got[0] == (plan("hermes").read(text, stops=True)[0] or ""), (text, got)
    # whitespace is content where the answer is nothing else, or once other content follows it: both ways, and
    # the text that follows goes out as it comes
    for text, content in (("  ", "  "), ("\n Hi <tool_call>", "\n Hi "), ("\n" + A + " bye", "\n bye")):
        reply, stream, _ = finishes(plan("hermes"), text, list(range(1, len(text))))
        assert reply[0] == stream[0] == content, (text, reply, stream)
    f = ToolCallFilter()
    assert [f.stream(d)[0] for d in (" ", "\n", "Hi", " there")] == ["", "", " \nHi", " there"]


# ---- the server, both ways -------------------------------------------------------------------------------------

@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("fmt", ["llama3_json", "mistral"])
def test_the_servers_replies_to_a_broken_answer_agree(fmt, request, monkeypatch):
    from conftest import serving
    engine = request.getfixturevalue("llama_engine" if fmt == "llama3_json" else "mistral_engine")
    key = "parameters" if fmt == "llama3_json" else "arguments"
    first = ("" if fmt == "llama3_json" else "[TOOL_CALLS] [") + W.replace('"arguments"', f'"{key}"')
    with serving(engine, model_id="tiny-broke-" + fmt, defaults=dict(max_new_tokens=300, temperature=0.0)) as server:
        for answer, want, begun in (
                (first + (" and more" if fmt == "llama3_json" else "] and more"), ("", [WEATHER], "stop"), []),
                (first[:first.index('"Oslo"') + 3], ("", [], "stop"), ["get_weather"])):
            reply, stream, others = _both_ways(server, engine, monkeypatch, answer)
            assert reply == stream == want and others == begun, (answer, reply, stream, others)


@pytest.mark.usefixtures("one_thread_module")
def test_the_servers_replies_to_whitespace_before_a_hermes_block_agree(request, monkeypatch):
    from conftest import serving
    engine = request.getfixturevalue("hermes_engine")
    with serving(engine, model_id="tiny-hermes-space", defaults=dict(max_new_tokens=300, temperature=0.0)) as server:
        for answer, want in ((" <tool_call>", ("", [], "stop")), ("\n" + A, ("", [WEATHER], "tool_calls"))):
            reply, stream, others = _both_ways(server, engine, monkeypatch, answer)
            assert reply == stream == want and not others, (answer, reply, stream, others)
