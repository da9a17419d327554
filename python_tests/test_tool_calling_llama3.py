"""Tool calls in Llama 3.1/3.2/3.3's format (vLLM's `llama3_json` parser): the answer is `{"name": ...,
"parameters": {...}}` (after an optional <|python_tag|>, several calls separated by ";"), read off a chat template
that reads tools and writes calls that way (tools.tool_call_format). Parsing, streaming hold-back, and required /
named choices held to a grammar in that format, on the tiny random model with a Llama-3.1-style template."""
from __future__ import annotations

import pytest

pytest.importorskip("llguidance")

from amphista_engine.chat import render_chat                       # noqa: E402
from amphista_engine.tools import (ToolCallFilter, parse_tool_calls, tool_call_format,   # noqa: E402
                                   tool_format)

from conftest import serving                                        # noqa: E402
from test_chat_templates_qa import QWEN25                          # noqa: E402
from test_serve import call, sse                                   # noqa: E402
from test_tool_calling import engine_with_template, ASK, CHAT, HISTORY, TOOLS, WEATHER, _valid     # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

# Llama 3.1's template in short, its tool parts as Meta wrote them: the tools as JSON in the first user turn with the
# instruction to answer {"name": ..., "parameters": ...}, a past call written that way, results in ipython turns
LLAMA31 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- if tools is not none and messages|length > 0 %}"
    "{%- set first_user_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}"
    "{{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments '"
    " 'that best answers the given prompt.\\n\\n' }}"
    "{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}"
    "{{- 'Do not use variables.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first_user_message + '<|eot_id|>'}}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}"
    "{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}"
    "{{- '}' }}{{- '<|eot_id|>' }}"
    "{%- elif message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}{{- message.content }}{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def llama_engine(tiny_hf_dir, tmp_path_factory):
    return engine_with_template(tiny_hf_dir, tmp_path_factory.mktemp("llama31_tpl") / "m", LLAMA31)


def test_parse_llama3_calls():
    call = {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}
    assert parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}', "llama3_json") == \
        (None, [call])
    assert parse_tool_calls(' <|python_tag|>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n',
                            "llama3_json") == (None, [call])
    two = '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}; {"name": "get_time", "parameters": {}}'
    assert parse_tool_calls(two, "llama3_json") == (None, [call, {"name": "get_time", "arguments": {}}])
    for text in ("It is sunny.", 'Sure: {"name": "get_time", "parameters": {}}',
                 '{"name": "get_time", "parameters": {}} and more', '{"name": "get_time", "parameters": ',
                 '{"city": "Oslo"}'):
        assert parse_tool_calls(text, "llama3_json") == (text, []), text
    # the Hermes reading of a Llama answer finds nothing, and the other way round
    assert parse_tool_calls(two)[1] == [] and parse_tool_calls(f"<tool_call>\n{two[:62]}\n</tool_call>",
                                                               "llama3_json")[1] == []


def test_llama3_stream_filter():
    f = ToolCallFilter(fmt="llama3_json")
    assert f.feed("  ") == "" and f.feed("<|py") == "" and f.feed("thon_tag|>{\"name\"") == ""
    assert f.finish('<|python_tag|>{"name": "get_time", "parameters": {"utc": true}}') == (
        "", [{"name": "get_time", "arguments": {"utc": True}}])
    f = ToolCallFilter(fmt="llama3_json")
    assert f.feed("  ") == "" and f.feed("It is") == "  It is" and f.feed(" {sunny}") == " {sunny}"
    assert f.finish() == ("", [])
    f = ToolCallFilter(fmt="llama3_json")            # held as a call, turned out not to be one: all of it at the end
    assert f.feed("{oops") == "" and f.finish() == ("{oops", [])


def test_the_format_is_read_off_the_template(llama_engine, tiny_hf_dir):
    from amphista_engine.tokenizer import load_tokenizer
    assert tool_call_format(llama_engine.tokenizer) == "llama3_json"
    assert tool_call_format(None, QWEN25) == "hermes"
    assert tool_call_format(load_tokenizer(str(tiny_hf_dir))) == "hermes"       # no tools: Hermes' fallback
    g = tool_format(TOOLS, {"name": "get_time"}, fmt="llama3_json")["grammar"]
    assert '\\"parameters\\": ' in g and "<tool_call>" not in g


def test_required_and_named_answer_in_llama3_format(llama_engine):
    with serving(llama_engine, model_id="llama-tiny", defaults=dict(max_new_tokens=200)) as server:
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            status, reply = call(server.url, CHAT, {"messages": ASK, "tools": TOOLS, "tool_choice": choice})
            assert status == 200, reply
            c = reply["choices"][0]
            assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None, c
            calls = [_valid(tc) for tc in c["message"]["tool_calls"]]
            assert calls and (choice == "required" or [x["name"] for x in calls] == ["get_weather"])
        # streamed: nothing of the call as content, each call's arguments in fragments after its name
        events = sse(server.url, CHAT, {"messages": ASK, "tools": TOOLS, "tool_choice": "required"})
        chunks = [e for e in events if e != "[DONE]"]
        assert not "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
        deltas = [tc for ch in chunks if ch["choices"] for tc in ch["choices"][0]["delta"].get("tool_calls") or []]
        joined: dict = {}
        for tc in deltas:
            one = joined.setdefault(tc["index"], {**tc, "function": {**tc["function"], "arguments": ""}})
            one["function"]["arguments"] += tc["function"]["arguments"]
        assert joined and all(_valid(tc) for tc in joined.values()) and len(deltas) > len(joined)
        # the model wrote the calls Llama's way, not as Hermes blocks (the Python API shows the raw answer)
        from amphista_engine.tools import generate_with_tools
        result, content, calls = generate_with_tools(llama_engine, ASK, TOOLS, "required", max_new_tokens=200)
        assert result.text.startswith('{"name": "') and "<tool_call>" not in result.text and calls, result.text
        assert '"parameters": ' in result.text and content is None
        # ... and the server answered with that same text (greedy): its tokens, its calls
        status, reply = call(server.url, CHAT, {"messages": ASK, "tools": TOOLS, "tool_choice": "required"})
        # its tokens and the EOS it ended on (usage counts it, as OpenAI's and vLLM's do)
        assert reply["usage"]["completion_tokens"] == len(result.token_ids) + (result.finish_reason == "eos")
        assert [_valid(tc) for tc in reply["choices"][0]["message"]["tool_calls"]] == calls
        # a past call and its result, as the template writes them
        body = {"messages": [m for m in HISTORY if m.get("tool_call_id") != "call_2"], "tools": [WEATHER]}
        messages = server.app.chat_messages(body, server.app.tool_plan(body))
        text = render_chat(llama_engine.tokenizer, messages, variables={"tools": [WEATHER]})
        assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
                '{"city": "Oslo", "days": 2}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 3}'
                ) in text
