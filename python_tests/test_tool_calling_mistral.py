"""Tool calls in Mistral's format (vLLM's `mistral` parser): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`
(the marker a control token, which the answer's text may leave out), read off a chat template that writes
[TOOL_CALLS]; call ids of 9 letters and digits, which Mistral's template wants back in later turns."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance")

from amphista_engine.tools import ToolCallFilter, parse_tool_calls, tool_call_format    # noqa: E402

from conftest import serving                                        # noqa: E402
from test_serve import call, sse                                   # noqa: E402
from test_tool_calling import engine_with_template, ASK, CHAT, TOOLS                     # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

# Mistral-7B-Instruct-v0.3's template in short, its tool parts as Mistral wrote them (the 9-character id check too)
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if tools is not none and (message == user_messages[-1]) %}"
    "{{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}"
    "{%- elif message.tool_calls is defined and message.tool_calls is not none %}"
    "{{- '[TOOL_CALLS] [' }}"
    "{%- for tool_call in message.tool_calls %}{%- set out = tool_call.function | tojson %}{{- out[:-1] }}"
    "{%- if not tool_call.id is defined or tool_call.id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    "{{- ', \"id\": \"' + tool_call.id + '\"}' }}"
    "{%- if not loop.last %}{{- ', ' }}{%- else %}{{- ']' + eos_token }}{%- endif %}{%- endfor %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '[TOOL_RESULTS] {\"content\": ' + message.content | string + ', \"call_id\": \"' + message.tool_call_id"
    " + '\"}[/TOOL_RESULTS]' }}"
    "{%- endif %}{%- endfor %}")


@pytest.fixture(scope="module")
def mistral_engine(tiny_hf_dir, tmp_path_factory):
    return engine_with_template(tiny_hf_dir, tmp_path_factory.mktemp("mistral_tpl") / "m", MISTRAL)


def test_parse_mistral_calls():
    want = [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}, {"name": "get_time", "arguments": {}}]
    body = '[{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}, {"name": "get_time", "arguments": {}}]'
    assert parse_tool_calls("[TOOL_CALLS] " + body, "mistral") == (None, want)
    assert parse_tool_calls(" " + body + "\n", "mistral") == (None, want)           # the control token left out
    for text in ("Sunny.", "[Note] it is sunny", "[]", '[{"name": "x"}] and more', '[{"arguments": {}}]'):
        assert parse_tool_calls(text, "mistral") == (text, []), text


def test_mistral_stream_filter():
    f = ToolCallFilter(fmt="mistral")
    assert f.feed(" [TOOL") == "" and f.feed("_CALLS] [{") == ""
    assert f.finish('[TOOL_CALLS] [{"name": "get_time", "arguments": {"utc": true}}]')[1] == [
        {"name": "get_time", "arguments": {"utc": True}}]
    f = ToolCallFilter(fmt="mistral")
    assert f.feed("Sun") == "Sun" and f.feed("ny [x]") == "ny [x]" and f.finish() == ("", [])


def test_required_calls_in_mistral_format_and_their_ids_come_back(mistral_engine):
    assert tool_call_format(mistral_engine.tokenizer) == "mistral"
    from amphista_engine.tools import generate_with_tools
    result, content, calls = generate_with_tools(mistral_engine, ASK, TOOLS, "required", max_new_tokens=200)
    assert result.text.startswith("[TOOL_CALLS] [{") and content is None and calls, result.text
    with serving(mistral_engine, model_id="mistral-tiny", defaults=dict(max_new_tokens=200)) as server:
        status, reply = call(server.url, CHAT, {"messages": ASK, "tools": TOOLS, "tool_choice": "required"})
        assert status == 200 and reply["choices"][0]["finish_reason"] == "tool_calls", reply
        got = reply["choices"][0]["message"]["tool_calls"]
        # the same answer as above: its tokens and the EOS it ended on (usage counts it)
        assert reply["usage"]["completion_tokens"] == len(result.token_ids) + (result.finish_reason == "eos")
        assert [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                for c in got] == calls
        assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c["id"]) for c in got)
        # the calls and their results as the next turn: the template takes the ids it wants
        history = ASK + [{"role": "assistant", "content": None, "tool_calls": got}] + [
            {"role": "tool", "tool_call_id": c["id"], "content": "{\"ok\": true}"} for c in got]
        status, reply = call(server.url, CHAT, {"messages": history + [{"role": "user", "content": "Thanks"}],
                                                "tools": TOOLS, "max_tokens": 4})
        assert status == 200, reply
        events = sse(server.url, CHAT, {"messages": ASK, "tools": TOOLS,
                                        "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
        chunks = [e for e in events if e != "[DONE]" and e["choices"]]
        assert not "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
        deltas = [tc for ch in chunks for tc in ch["choices"][0]["delta"].get("tool_calls") or []]
        assert [d["function"]["name"] for d in deltas if "id" in d] == ["get_time"]     # then its arguments
