"""QA of the control tokens a run with tools shows (tools.showing_controls) and of streamed calls against the
non-streamed reply, as a user serving Mistral v11 and Hermes models would meet them.

- Mistral's tokenizer-v11 template writes each call `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` (mistral-common's
  v11; v13 leaves the id out). [CALL_ID] is a control token: skipped in the text, the id ran into the name
  ("get_weather" + "a1B2c3D4e": a call of "get_weathera1B2c3D4e"); shown, the call was no call at all.
- A stop string that cuts a Hermes <tool_call> block after its arguments began to stream left a half call in the
  stream (finish "stop") while the non-streamed reply had the cut text as content: with stops, calls go out whole
  as their blocks close (Llama 3's and Mistral's at the end), and both replies agree at every cut."""
from __future__ import annotations

import json
import random
import re

import pytest

from amphista_engine.tools import ToolCallFilter, parse_tool_calls
from test_tool_calling import ASK, CHAT, TOOLS, engine_with_template, long_dir  # noqa: F401  (module fixture)
from test_tool_calling_mistral_v11 import SPECIAL, V11, answer_with, mistral_engine, script
from test_tool_streaming_formats import joined as formats_joined

HIDDEN = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")
W = '{"city": "Paris", "days": 2}'
WITH_IDS = [
    f"[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{W}",
    f'Let me check. [TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{W}[TOOL_CALLS]get_time[CALL_ID] Z9y8X7w6V '
    f'[ARGS] {{"utc": true}}',
]


def _joined(f: ToolCallFilter, text: str, cuts) -> tuple[str, list[tuple[str, str]], bool]:
    """The stream of `text` through f, cut at `cuts`, then its end, joined as a client joins it
    (test_tool_streaming_formats.joined)."""
    content, calls, whole, _ = formats_joined(text, cuts, f.fmt, f.parallel, f)
    return content, [(c["name"], c["arguments"]) for c in calls], whole


def _reply(text: str, fmt: str, parallel: bool = True, **kw) -> tuple[str, list[tuple[str, str]]]:
    content, calls = parse_tool_calls(text, fmt, **kw)
    calls = calls if parallel else calls[:1]
    return content or "", [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]


# ---- Mistral v11's [CALL_ID] ------------------------------------------------------------------------------------

def test_a_v11_calls_id_is_no_part_of_its_name_both_ways():
    want = [("get_weather", W), ("get_time", '{"utc": true}')]
    assert _reply(WITH_IDS[0], "mistral", v11=True, hidden=HIDDEN) == ("", want[:1])
    assert _reply(WITH_IDS[1], "mistral", v11=True, hidden=HIDDEN) == ("Let me check. ", want)
    for text in WITH_IDS:
        expected = _reply(text, "mistral", v11=True, hidden=HIDDEN)
        for cut in range(len(text) + 1):
            f = ToolCallFilter(fmt="mistral", v11=True, hidden=HIDDEN)
            content, calls, whole = _joined(f, text, [cut])
            assert whole and (content, calls) == expected, (text, cut, content, calls)


@pytest.fixture(scope="module")
def call_id_engine(tiny_hf_dir, tmp_path_factory):
    """The tiny model, Mistral's markers special tokens ([CALL_ID] too), and the v11 template writing call ids."""
    template = V11.replace("tc['function']['name'] + '[ARGS]'", "tc['function']['name'] + '[CALL_ID]' + tc['id'] + "
                           "'[ARGS]'")
    assert template != V11
    return mistral_engine(tiny_hf_dir, tmp_path_factory.mktemp("mistral_call_id") / "m", SPECIAL + ["[CALL_ID]"],
                          template, seed=7)


@pytest.mark.usefixtures("one_thread_module")
def test_the_server_reads_v11_calls_with_ids(call_id_engine, monkeypatch):
    pytest.importorskip("llguidance")
    from conftest import serving
    from test_serve import call, sse
    from test_tool_streaming import assembled
    engine = call_id_engine
    answer = ["Let me check. ", "[TOOL_CALLS]", "get_weather", "[CALL_ID]", "a1B2c3D4e", "[ARGS]", W,
              "[TOOL_CALLS]", "get_time", "[CALL_ID]", "Z9y8X7w6V", "[ARGS]", '{"utc": true}']
    lark = script(engine, answer, SPECIAL + ["[CALL_ID]"])
    want = [("get_weather", W), ("get_time", '{"utc": true}')]
    with serving(engine, model_id="mistral-call-id", defaults=dict(max_new_tokens=200)) as server:
        app = server.app
        answer_with(monkeypatch, app, lark)
        body = {"messages": ASK, "tools": TOOLS}
        status, reply = call(server.url, CHAT, body)
        assert status == 200, reply
        choice = reply["choices"][0]
        got = choice["message"].get("tool_calls") or []
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in got] == want, choice
        assert choice["message"]["content"] == "Let me check. " and choice["finish_reason"] == "tool_calls"
        content, calls, finish, _ = assembled(sse(server.url, CHAT, body))
        assert [(c["name"], c["arguments"]) for c in calls] == want and content == "Let me check. "
        assert finish == "tool_calls" and all(re.fullmatch(r"[A-Za-z0-9]{9}", c["id"]) for c in calls)
        # tool_choice "none" in a run that shows [CALL_ID]: content leaves it out, as a run without tools does
        for extra in ({"tools": TOOLS, "tool_choice": "none"}, {}):
            text = call(server.url, CHAT, {"messages": ASK, **extra})[1]["choices"][0]["message"]["content"]
            assert not any(h in text for h in HIDDEN) and "a1B2c3D4e" in text, (extra, text)


# ---- Hermes: a stop string inside a streamed block ----------------------------------------------------------------

HERMES = ('Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>')


def test_with_stops_a_stream_agrees_with_the_reply_wherever_the_answer_is_cut():
    """A stop may cut the answer anywhere: the stream of what is left, joined, is the non-streamed reply of it (the
    formats whose answer is all calls or none too)."""
    rnd = random.Random(5)
    answers = [
        ("hermes", {}, HERMES),
        ("hermes", {}, '<tool_call>{"name": "f", "arguments": {"a": "x</tool_call>"}}</tool_call> b '
                       '<tool_call>{"no"}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'),
        ("mistral", {"v11": True, "hidden": HIDDEN}, WITH_IDS[1]),
        ("mistral", {}, '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]'),
        ("llama3_json", {"hidden": ("<|python_tag|>",)},
         '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}'),
    ]
    for fmt, kw, full in answers:
        for end in range(len(full) + 1):
            text = full[:end]
            for parallel in (True, False):
                want = _reply(text, fmt, parallel, **kw)
                for cuts in [[k] for k in range(0, len(text) + 1, 4)] + \
                        [sorted(rnd.sample(range(len(text) + 1), min(5, len(text) + 1)))]:
                    content, calls, whole = _joined(ToolCallFilter(parallel, fmt, whole=True, **kw), text, cuts)
                    assert whole and (content, calls) == want, (fmt, text, cuts, parallel, content, calls)


@pytest.mark.usefixtures("one_thread_module")
def test_the_server_agrees_both_ways_when_a_stop_cuts_a_hermes_call(
        long_dir, tmp_path_factory, monkeypatch):  # noqa: F811
    pytest.importorskip("llguidance")
    from conftest import serving
    from test_chat_templates_qa import QWEN25
    from test_serve import call, sse
    from test_tool_streaming import assembled, scripted
    engine = engine_with_template(long_dir, tmp_path_factory.mktemp("qwen_stop") / "m", QWEN25)
    with serving(engine, model_id="qwen-stop", defaults=dict(max_new_tokens=300)) as server:
        assert server.app.tool_plan({"messages": ASK, "tools": TOOLS}).fmt == "hermes"
        scripted(server, monkeypatch, HERMES)
        # inside the first call's arguments; inside the second's; between them
        for stop, n_calls in (("Paris", 0), ('"utc"', 1), ("\n<tool_call>\n{\"name\": \"get_t", 1)):
            body = {"messages": ASK, "tools": TOOLS, "stop": [stop]}
            status, reply = call(server.url, CHAT, body)
            assert status == 200, reply
            choice = reply["choices"][0]
            want = [(c["function"]["name"], c["function"]["arguments"]) for c in
                    choice["message"].get("tool_calls") or []]
            assert len(want) == n_calls and choice["finish_reason"] == ("tool_calls" if n_calls else "stop"), choice
            content, calls, finish, _ = assembled(sse(server.url, CHAT, body), markup_ok=True)
            assert [(c["name"], c["arguments"]) for c in calls] == want, (stop, calls, choice)
            assert content == (choice["message"]["content"] or "") and finish == choice["finish_reason"], stop
