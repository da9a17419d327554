"""The non-streamed reply reads a tool-calling answer as its stream sent it: the same whole calls, the same content
and the same finish reason (ToolPlan.answer / tools._read_answer / _hermes_reading against ToolCallFilter.stream /
end; generate_with_tools and the server's chat endpoint on top of them).

1. A Hermes block whose call went out by name (its JSON reached `{"name": ..., "arguments": {`) but whose JSON then
   breaks (`{"city": "Paris"</tool_call>`, garbage in or after the arguments, the arguments given twice): the stream
   sent the call begun and never the block's markup, while the non-streamed reply kept the whole block as content.
   Now the block is neither content nor a call both ways (no call with arguments that are not JSON), and the finish
   is not "tool_calls" either way (the stream's begun call is not whole).
2. An answer that ends (EOS) inside the next call after whole ones: the stream said "stop" where the reply said
   "tool_calls" (Llama 3 and Mistral always; Hermes where the cut call's name had gone out). Now both say
   "tool_calls" where the stream sent only whole calls, and both the run's "stop" where it had begun the cut one
   (its arguments are not whole: "tool_calls" would have the streaming client run them).
"""
from __future__ import annotations

import json
import random

import pytest

from amphista_engine.tools import ToolCallFilter, ToolPlan, openai_tool_calls

from test_tool_cut_answers import TOOLS
from test_tool_streaming_formats import joined

W = '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}'
T = '{"name": "get_time", "arguments": {"utc": true}}'
A = "<tool_call>\n" + W + "\n</tool_call>"
B = "<tool_call>\n" + T + "\n</tool_call>"
# closed blocks whose call goes out by name, then whose JSON breaks
BROKEN = [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", oops}}\n</tool_call>',
    '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}} x\n</tool_call>',
    '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}, "arguments": {"utc": false}}\n</tool_call>',
]
MARKUP = ("<tool_call", "</tool_call", '"name"')


def plan(fmt: str, parallel: bool = True, v11: bool = False, hidden: tuple = ()) -> ToolPlan:
    return ToolPlan(TOOLS, "auto", None, parallel, fmt, v11, hidden)


def finishes(p: ToolPlan, text: str, cuts) -> tuple[tuple, tuple]:
    """(the non-streamed reply's, the stream's) (content, whole calls [(name, arguments)], finish) for an answer
    that ended with EOS, the finish as the server gives it (_complete, _stream); and the stream's other calls."""
    content, calls, whole = p.answer(text)
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in openai_tool_calls(calls, p.fmt)]
    reply = (content or "", calls, "tool_calls" if calls and whole else "stop")
    f = ToolCallFilter(p.parallel, p.fmt, v11=p.v11, hidden=p.hidden)
    sent, streamed, done, _ = joined(text, cuts, p.fmt, p.parallel, f)
    ok = [(c["name"], c["arguments"]) for c in streamed if _json(c["arguments"])]
    others = [(c["name"], c["arguments"]) for c in streamed if not _json(c["arguments"])]
    return reply, (sent, ok, "tool_calls" if done and f.calls_sent else "stop"), others


def _json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _cuts(text: str, rnd: random.Random):
    yield []
    yield list(range(1, len(text)))
    for _ in range(6):
        yield sorted(rnd.sample(range(len(text) + 1), min(len(text), rnd.randint(2, 8))))


# ---- 1. a Hermes block that breaks after its name --------------------------------------------------------------

def test_a_block_that_breaks_after_its_name_reads_as_its_stream_sent_it():
    rnd = random.Random(17)
    for x in BROKEN:
        name = "get_time" if "get_time" in x else "get_weather"
        # (the answer, its content, the reply's calls, the names of the calls before the broken block)
        for text, content, names, before in (
                (x, "", [], 0),
                ("Let me check. " + x, "Let me check. ", [], 0),
                ("Let me check. " + x + " Sorry.", "Let me check.  Sorry.", [], 0),
                (A + "\n" + x, "", ["get_weather"], 1),
                (x + "\n" + B, "", ["get_time"], 0),
                ("Hi " + A + "\n" + x + "\n" + B + " bye", "Hi  bye", ["get_weather", "get_time"], 1)):
            for hidden in ((), ("<tool_call>", "</tool_call>")):      # the tags special tokens (Hermes 3)
                for parallel in (True, False):
                    p = plan("hermes", parallel, hidden=hidden)
                    want = names if parallel else names[:1]
                    # the broken call went out (begun) unless parallel_tool_calls false began a call before it
                    begun = parallel or not before
                    for cuts in _cuts(text, rnd):
                        reply, stream, others = finishes(p, text, cuts)
                        assert reply[0] == content and not any(m in reply[0] for m in MARKUP), (text, reply)
                        assert [n for n, _ in reply[1]] == want and all(_json(a) for _, a in reply[1]), reply
                        assert stream == reply, (text, parallel, cuts, stream, reply)
                        assert reply[2] == ("stop" if begun or not want else "tool_calls"), (text, reply)
                        assert [n for n, _ in others] == ([name] if begun else []), (text, cuts, others)
    # as before: a block that cannot begin a call, or one after a block at which the stream stopped streaming
    # (nothing of it went out), is content as written, both ways; with stops (calls go out whole as their blocks
    # close) a broken block is content, both ways
    for text in ("Hm <tool_call>{oops}</tool_call>", "<tool_call>{oops}</tool_call>\n" + BROKEN[0]):
        reply, stream, others = finishes(plan("hermes"), text, list(range(1, len(text))))
        assert reply == stream == (text, [], "stop") and not others, (text, reply, stream)
    text = "Hi " + BROKEN[1]
    p = plan("hermes")
    assert p.read(text, stops=True) == (text, [])
    assert joined(text, [len(text) // 2], "hermes", True, ToolCallFilter(whole=True))[:3] == (text, [], True)


# ---- 2. the model's end inside the next call, after whole ones ------------------------------------------------

LW = '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}'
# (format, v11, the answer, whether the call it ends in went out by name)
ENDED = [
    ("hermes", False, A + "\n<tool_call>\n{\"na", False),
    ("hermes", False, A + "<tool_call>{\"name\": \"get_time\"", False),
    ("hermes", False, A + "\n<tool_c", False),
    ("hermes", False, A + "\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"utc\": tr", True),
    ("hermes", False, A + "\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"utc\": true}", True),
    ("llama3_json", False, LW + "; {\"na", False),
    ("llama3_json", False, "<|python_tag|>" + LW + ";", False),
    ("llama3_json", False, LW + "; {\"name\": \"get_time\", \"parameters\": {\"utc\": tr", True),
    ("mistral", False, "[TOOL_CALLS] [" + W + ", {\"na", False),
    ("mistral", False, "[TOOL_CALLS] [" + W, False),
    ("mistral", False, "Let me check. [TOOL_CALLS] [" + W + ",", False),
    ("mistral", False, "[" + W + ", {\"name\": \"get_time\", \"arguments\": {\"utc\"", True),
    ("mistral", True, '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 2}[TOOL_CALLS]get_ti', False),
    ("mistral", True, '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 2}[TOOL_CALLS]get_time[ARGS]{"u', True),
]


def test_an_answer_that_ends_in_its_next_call_finishes_alike_both_ways():
    rnd = random.Random(23)
    for fmt, v11, text, begun in ENDED:
        for parallel in (True, False):
            p = plan(fmt, parallel, v11)
            for cuts in _cuts(text, rnd):
                reply, stream, others = finishes(p, text, cuts)
                assert [n for n, _ in reply[1]] == ["get_weather"], (text, reply)
                assert reply[0] == ("Let me check. " if text.startswith("Let") else ""), (text, reply)
                assert stream == reply, (text, parallel, cuts, stream, reply)
                # whole calls delivered: "tool_calls", as OpenAI; but not where the stream had begun the cut call
                # (parallel_tool_calls false: it begins none after the first)
                assert reply[2] == ("stop" if begun and parallel else "tool_calls"), (text, parallel, reply)
                assert len(others) == (1 if begun and parallel else 0), (text, cuts, others)


# ---- generate_with_tools ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hermes_engine(tiny_hf_dir, tmp_path_factory):
    pytest.importorskip("llguidance")
    from test_chat_templates_qa import QWEN25
    from test_tool_calling import engine_with_template
    return engine_with_template(tiny_hf_dir, tmp_path_factory.mktemp("hermes_agree") / "m", QWEN25)


@pytest.mark.usefixtures("one_thread_module")
def test_generate_with_tools_reads_the_answer_as_its_stream_sent_it(hermes_engine, monkeypatch):
    from amphista_engine import tools
    from test_tool_calling import ASK, TOOLS as SERVER_TOOLS
    from test_tool_calling_mistral_v11 import script
    planned = tools.plan_for
    for answer, content, names in (
            ("Let me check. " + BROKEN[0] + "\n" + B, "Let me check. ", ["get_time"]),
            (A + "\n" + BROKEN[2], None, ["get_weather"]),
            (A + "\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"utc\": tr", None, ["get_weather"])):
        grammar = {"type": "grammar", "grammar": script(hermes_engine, [answer], special=())}
        monkeypatch.setattr(tools, "plan_for", lambda *a, **k: planned(*a, **k)._replace(response_format=grammar))
        result, got, calls = tools.generate_with_tools(hermes_engine, ASK, SERVER_TOOLS, max_new_tokens=300)
        assert result.text == answer and result.finish_reason == "eos", result.text
        assert got == content and [c["name"] for c in calls] == names, (answer, got, calls)
        sent, streamed, whole, _ = joined(answer, list(range(1, len(answer), 3)), "hermes")
        assert sent == (got or "") and not whole, (answer, sent)
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed if _json(c["arguments"])] == \
            [(c["name"], c["arguments"]) for c in calls], (streamed, calls)


# ---- the server, both ways -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_engine(tiny_hf_dir, tmp_path_factory):
    pytest.importorskip("llguidance")
    from test_tool_calling import engine_with_template
    from test_tool_calling_llama3 import LLAMA31
    return engine_with_template(tiny_hf_dir, tmp_path_factory.mktemp("llama31_agree") / "m", LLAMA31)


@pytest.fixture(scope="module")
def mistral_engine(tiny_hf_dir, tmp_path_factory):
    pytest.importorskip("llguidance")
    from test_tool_calling import engine_with_template
    from test_tool_calling_mistral import MISTRAL as TEMPLATE
    return engine_with_template(tiny_hf_dir, tmp_path_factory.mktemp("mistral_agree") / "m", TEMPLATE)


def _both_ways(server, engine, monkeypatch, answer: str):
    """The chat endpoint's answer `answer` (scripted, ended by EOS): (the reply's, the stream's) (content, whole
    calls, finish), and the stream's other calls."""
    from test_serve import call, sse
    from test_tool_calling import ASK, CHAT, TOOLS as SERVER_TOOLS
    from test_tool_calling_mistral_v11 import answer_with, script
    from test_tool_streaming import assembled
    answer_with(monkeypatch, server.app, script(engine, [answer], special=()))
    body = {"messages": ASK, "tools": SERVER_TOOLS, "logprobs": True}
    status, got = call(server.url, CHAT, body)
    assert status == 200, got
    [ch] = got["choices"]
    assert "".join(t["token"] for t in ch["logprobs"]["content"]) == answer, ch
    reply = (ch["message"]["content"] or "", [(c["function"]["name"], c["function"]["arguments"])
                                              for c in ch["message"].get("tool_calls") or []], ch["finish_reason"])
    assert all(_json(a) for _, a in reply[1]), reply
    content, streamed, finish, _ = assembled(sse(server.url, CHAT, {**body, "logprobs": False}))
    ok = [(c["name"], c["arguments"]) for c in streamed if _json(c["arguments"])]
    return reply, (content, ok, finish), [c["name"] for c in streamed if not _json(c["arguments"])]


@pytest.mark.usefixtures("one_thread_module")
def test_the_servers_hermes_replies_agree_both_ways(hermes_engine, monkeypatch):
    from conftest import serving
    weather, time = ("get_weather", '{"city": "Oslo", "days": 2}'), ("get_time", '{"utc": true}')
    with serving(hermes_engine, model_id="tiny-hermes-agree", defaults=dict(max_new_tokens=300,
                                                                           temperature=0.0)) as server:
        for answer, want, begun in (
                ("Let me check. " + BROKEN[0], ("Let me check. ", [], "stop"), ["get_weather"]),       # 1
                (A + "\n" + BROKEN[1] + "\n" + B, ("", [weather, time], "stop"), ["get_weather"]),       # 1
                (A + "\n<tool_call>\n{\"na", ("", [weather], "tool_calls"), []),                         # 2
                (A + "\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"utc\": tr",
                 ("", [weather], "stop"), ["get_time"])):                                                # 2
            reply, stream, others = _both_ways(server, hermes_engine, monkeypatch, answer)
            assert reply == stream == want and others == begun, (answer, reply, stream, others)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("fmt", ["llama3_json", "mistral"])
def test_the_servers_replies_to_an_answer_ended_in_its_next_call_agree(fmt, request, monkeypatch):
    from conftest import serving
    engine = request.getfixturevalue("llama_engine" if fmt == "llama3_json" else "mistral_engine")
    key = "parameters" if fmt == "llama3_json" else "arguments"
    first = ("" if fmt == "llama3_json" else "[TOOL_CALLS] [") + W.replace('"arguments"', f'"{key}"')
    sep = "; " if fmt == "llama3_json" else ", "
    weather = ("get_weather", '{"city": "Oslo", "days": 2}')
    with serving(engine, model_id="tiny-agree-" + fmt, defaults=dict(max_new_tokens=300, temperature=0.0)) as server:
        for answer, want, begun in (
                (first + sep + '{"na', ("", [weather], "tool_calls"), []),
                (first + sep + '{"name": "get_time", "%s": {"utc": tr' % key, ("", [weather], "stop"), ["get_time"])):
            reply, stream, others = _both_ways(server, engine, monkeypatch, answer)
            assert reply == stream == want and others == begun, (answer, reply, stream, others)
