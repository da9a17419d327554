"""Tool calling as an agent framework drives `amphista serve` (the openai client's request shapes, LangChain-style
tool loops): pydantic-made parameter schemas ($defs / $ref), parallel_tool_calls false, a SmolLM3-style template
that reads `xml_tools` (not `tools`), full user -> calls -> results -> answer loops through real templates, content
parts in the Python API, and speculative decoding under a tool grammar."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance")

from amphista_engine.chat import render_chat              # noqa: E402
from amphista_engine.tools import (ToolCallFilter, check_tool_calls, generate_with_tools, plan_tools,  # noqa: E402
                                   prepare_messages, template_supports_tools)

from conftest import edited_copy, engine_with_random_heads, serving  # noqa: E402
from test_chat_templates_qa import QWEN25                 # noqa: E402
from test_serve import call, error_of, sse                # noqa: E402
from test_tool_calling import ASK, TOOLS                  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHAT = "/v1/chat/completions"
# What the openai client's pydantic_function_tool (and LangChain's convert_to_openai_tool) send for a model with a
# nested model and an enum: "$defs" at the parameters' root, "$ref"s into it, strict mode
ORDER = {"type": "function", "function": {
    "name": "place-order", "strict": True, "description": "Order items.",
    "parameters": {
        "$defs": {"Item": {"type": "object", "title": "Item", "additionalProperties": False,
                           "properties": {"sku": {"enum": ["A-1", "Zürich"]},
                                          "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                           "required": ["sku", "qty"]},
                  "Speed": {"enum": ["slow", "fast"], "title": "Speed", "type": "string"}},
        "type": "object", "title": "Order", "additionalProperties": False,
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1, "maxItems": 2},
                       "speed": {"$ref": "#/$defs/Speed"}},
        "required": ["items", "speed"]}}}
PING = {"type": "function", "function": {"name": "ping"}}          # no parameters at all
AGENT_TOOLS = [ORDER, PING, *TOOLS]


@pytest.fixture(scope="module")
def long_dir(tiny_hf_dir, tmp_path_factory):
    return edited_copy(tiny_hf_dir, tmp_path_factory.mktemp("tools_qa") / "m", {"max_position_embeddings": 4096})


@pytest.fixture(scope="module")
def engine(long_dir):
    """The tiny random model (built-in vicuna template: no tools) with random Amphista heads."""
    return engine_with_random_heads(long_dir, 3, dtype="fp32", max_seq_len=4096)


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine, model_id="tiny", defaults=dict(max_new_tokens=150)) as httpd:
        yield httpd


def _with_template(long_dir, tmp_path_factory, template: str, tag: str):
    from amphista_engine import Engine
    path = edited_copy(long_dir, tmp_path_factory.mktemp(tag) / "m")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=4096)


def _order_ok(args: dict):
    assert set(args) == {"items", "speed"} and args["speed"] in ("slow", "fast"), args
    assert 1 <= len(args["items"]) <= 2, args
    for item in args["items"]:
        assert set(item) == {"sku", "qty"} and item["sku"] in ("A-1", "Zürich"), args
        assert type(item["qty"]) is int and 1 <= item["qty"] <= 9, args


def _calls(reply) -> list[list[dict]]:
    out = []
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        out.append([{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                    for c in choice["message"]["tool_calls"]])
    return out


def test_pydantic_schemas_with_defs_are_served_and_held(server):
    """A "$ref": "#/$defs/..." schema was nested under the grammar's wrapper object, where the pointer named
    nothing: every such request was a 400. Named, required, streamed, and with speculative decoding (its answer
    the plain greedy one)."""
    named = {"type": "function", "function": {"name": "place-order"}}
    body = {"messages": ASK, "tools": AGENT_TOOLS, "tool_choice": named, "max_tokens": 150}
    status, reply = call(server.url, CHAT, body)
    assert status == 200, reply
    [[one]] = _calls(reply)
    assert one["name"] == "place-order"
    _order_ok(one["arguments"])
    status, spec = call(server.url, CHAT, {**body, "speculative": "amphista"})
    assert status == 200 and spec["amphista"]["speculative"] == "amphista", spec
    assert _calls(spec) == _calls(reply)
    # streamed: the same call, its name first, then its arguments in fragments (joined here)
    events = sse(server.url, CHAT, {**body, "speculative": "amphista"})
    streamed = [tc for e in events[:-1] for tc in e["choices"][0]["delta"].get("tool_calls", ())]
    assert {tc["index"] for tc in streamed} == {0} and streamed[0]["function"]["name"] == one["name"]
    assert json.loads("".join(tc["function"]["arguments"] for tc in streamed)) == one["arguments"]
    # "required" with sampling and n: every call of a listed tool, valid for it; ids unique across the choices
    status, reply = call(server.url, CHAT, {**body, "tool_choice": "required", "n": 3, "temperature": 1.0,
                                            "seed": 4, "max_tokens": 300})
    assert status == 200, reply
    ids = [c["id"] for ch in reply["choices"] for c in ch["message"]["tool_calls"]]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    for calls in _calls(reply):
        for c in calls:
            if c["name"] == "place-order":
                _order_ok(c["arguments"])
            elif c["name"] == "ping":
                assert isinstance(c["arguments"], dict)
            else:
                assert c["name"] in ("get_weather", "get_time"), c
    # the engine's new_tokens leave out the EOS each choice ended on; usage counts it
    assert reply["usage"]["completion_tokens"] == sum(x["new_tokens"] + (x["engine_finish_reason"] == "eos")
                                                      for x in reply["amphista"]["choices"])


def test_parallel_tool_calls_false_gives_at_most_one_call(server):
    """OpenAI's parallel_tool_calls: false was ignored: "required" answered with several calls."""
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "n": 4, "temperature": 1.0, "seed": 2,
            "max_tokens": 300}
    status, free = call(server.url, CHAT, body)
    assert status == 200 and max(len(c) for c in _calls(free)) > 1, free      # what the test guards against
    status, one = call(server.url, CHAT, {**body, "parallel_tool_calls": False})
    assert status == 200, one
    assert [len(c) for c in _calls(one)] == [1] * 4, one
    events = sse(server.url, CHAT, {**body, "parallel_tool_calls": False, "n": 1})
    assert {tc["index"] for e in events[:-1] for tc in e["choices"][0]["delta"].get("tool_calls", [])} == {0}
    error_of(call(server.url, CHAT, {**body, "parallel_tool_calls": "no"}), 400, "parallel_tool_calls",
             param="parallel_tool_calls")
    # "auto": the model may still write two calls; only the first is answered (as vLLM does)
    two = ('<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_time", "arguments": {"utc": false}}\n</tool_call>')
    plan = plan_tools(TOOLS, "auto", False)
    assert plan.read(two) == (None, [{"name": "get_time", "arguments": {"utc": True}}])
    assert len(plan_tools(TOOLS, "auto").read(two)[1]) == 2
    f = ToolCallFilter(plan.parallel)
    f.feed(two)
    assert f.finish() == ("", [{"name": "get_time", "arguments": {"utc": True}}])


# A SmolLM3-style template (condensed): its tools section reads `xml_tools`, an assistant turn renders only its
# content and a tool result is a user turn of its content; "tools" is in its text but never read as a variable
SMOL3 = """<|im_start|>system
{%- if messages[0].role == "system" %}
{{ messages[0].content }}
{%- endif %}
{%- if xml_tools %}
### Tools
You may call one or more functions. Function signatures within <tools></tools> XML tags:
<tools>
{% for tool in xml_tools[:] %}{{ tool | string }}
{% endfor %}</tools>
{%- endif %}<|im_end|>
{% for message in messages %}
{%- set content = message.content if message.content is string else "" %}
{%- if message.role == "user" or message.role == "tool" %}<|im_start|>user
{{ content }}<|im_end|>
{% elif message.role == "assistant" %}{% generation %}<|im_start|>assistant
{{ content }}<|im_end|>
{% endgeneration %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LOOP = [{"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Weather in Oslo and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"days\": 2}"}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{\"utc\": true}"}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": [{"type": "text", "text": "{\"temp\": 3}"}]},
        {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
        {"role": "assistant", "content": [{"type": "text", "text": "3 degrees at 12:00."}]},
        {"role": "user", "content": "And order two A-1 fast."}]


def test_a_template_reading_xml_tools_gets_the_hermes_fallback(long_dir, tmp_path_factory):
    """SmolLM3's template says "tools" but reads xml_tools: taken for a tools template, the offered tools were
    never in its prompt and the assistant's past calls were dropped from it."""
    eng = _with_template(long_dir, tmp_path_factory, SMOL3, "smol3")
    assert not template_supports_tools(eng.tokenizer)
    with serving(eng, model_id="smol3") as server:
        body = {"messages": LOOP, "tools": AGENT_TOOLS, "tool_choice": "required", "max_tokens": 200}
        messages = server.app.chat_messages(body, server.app.tool_plan(body))
        text = render_chat(eng.tokenizer, messages)
        assert "Be terse.\n\n# Tools\n" in text and json.dumps(ORDER, ensure_ascii=False) in text
        assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
                '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n'
                '</tool_call><|im_end|>') in text
        assert ("<|im_start|>user\n<tool_response>\n{\"temp\": 3}\n</tool_response>\n<tool_response>\n12:00\n"
                "</tool_response><|im_end|>\n<|im_start|>assistant\n3 degrees at 12:00.<|im_end|>") in text
        status, reply = call(server.url, CHAT, body)
        assert status == 200 and reply["usage"]["prompt_tokens"] == len(eng.tokenizer.encode(text)), reply
        for c in _calls(reply)[0]:
            assert c["name"] in [t["function"]["name"] for t in AGENT_TOOLS]


def test_full_loop_through_qwen25(long_dir, tmp_path_factory):
    """user -> two parallel calls -> two results (one as content parts) -> answer -> user, through Qwen2.5's own
    template, then a call of the pydantic-schema tool held to its grammar."""
    eng = _with_template(long_dir, tmp_path_factory, QWEN25, "qwen")
    assert template_supports_tools(eng.tokenizer)
    named = {"type": "function", "function": {"name": "place-order"}}
    with serving(eng, model_id="qwen") as server:
        body = {"messages": LOOP, "tools": AGENT_TOOLS, "tool_choice": named, "max_tokens": 150,
                "parallel_tool_calls": False}
        messages = server.app.chat_messages(body, server.app.tool_plan(body))
        text = render_chat(eng.tokenizer, messages, variables={"tools": AGENT_TOOLS})
        assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
                '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n'
                '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 3}\n</tool_response>\n'
                '<tool_response>\n12:00\n</tool_response><|im_end|>\n<|im_start|>assistant\n3 degrees at 12:00.'
                '<|im_end|>\n<|im_start|>user\nAnd order two A-1 fast.<|im_end|>\n<|im_start|>assistant\n') in text
        status, reply = call(server.url, CHAT, body)
        assert status == 200 and reply["usage"]["prompt_tokens"] == len(eng.tokenizer.encode(text)), reply
        [[one]] = _calls(reply)
        assert one["name"] == "place-order"
        _order_ok(one["arguments"])


def test_python_api_takes_content_parts_and_parallel_false(engine):
    """generate_with_tools on a template without tools wrote a tool result's list of parts into the prompt as a
    Python repr; parts are joined as the server joins them."""
    as_text = [{**m, "content": "\n".join(p["text"] for p in m["content"])} if isinstance(m["content"], list)
               else m for m in LOOP]
    kw = dict(max_new_tokens=150)
    got = generate_with_tools(engine, LOOP, AGENT_TOOLS, "required", parallel_tool_calls=False, **kw)
    want = generate_with_tools(engine, as_text, AGENT_TOOLS, "required", parallel_tool_calls=False, **kw)
    assert got[0].prompt_token_ids == want[0].prompt_token_ids and got[1:] == want[1:]
    assert "'type': 'text'" not in engine.tokenizer.decode(got[0].prompt_token_ids)
    assert len(got[2]) == 1 and got[2][0]["name"] in [t["function"]["name"] for t in AGENT_TOOLS]
    # the same prompt the server's Hermes fallback builds
    checked = [{**m, "tool_calls": check_tool_calls(m["tool_calls"], i)} if m.get("tool_calls") else m
               for i, m in enumerate(as_text)]
    prompt = render_chat(engine.tokenizer, prepare_messages(checked, plan_tools(AGENT_TOOLS, "auto").tools,
                                                            native=False))
    assert got[0].prompt_token_ids == engine.tokenizer.encode(prompt)
