"""Tool calling (amphista_engine/tools.py) through `amphista serve`: Hermes <tool_call> blocks parsed into OpenAI's
tool_calls, the grammar tool_choice "required" / a named function holds the answer to (on a random tiny model only
the grammar makes its calls valid), tool turns rendered by a template that reads tools and by the Hermes fallback
for one that does not, and streamed calls."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance")

from amphista_engine.chat import render_chat              # noqa: E402
from amphista_engine.tools import ToolCallFilter, parse_tool_calls    # noqa: E402

from conftest import edited_copy, needs_smollm2, serving  # noqa: E402
from test_chat_templates_qa import QWEN25                 # noqa: E402
from test_serve import call, error_of, sse                # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHAT = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                       "required": ["utc"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
ASK = [{"role": "user", "content": "The quick brown fox"}]
# a finished exchange: the assistant called a tool (OpenAI's format: arguments a JSON string), the tool answered
HISTORY = [{"role": "system", "content": "Be terse."},
           {"role": "user", "content": "Weather in Oslo?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"days\": 2}"}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3}"},
           {"role": "tool", "tool_call_id": "call_2", "content": "{\"wind\": 9}"}]


@pytest.fixture(scope="module")
def long_dir(tiny_hf_dir, tmp_path_factory):
    """The tiny random model with room for the tools' prompts (its vocabulary spends ~1 token per JSON character)."""
    return edited_copy(tiny_hf_dir, tmp_path_factory.mktemp("tools_tiny") / "m", {"max_position_embeddings": 2048})


@pytest.fixture(scope="module")
def engine(long_dir):
    """The tiny random model (no chat template of its own: the built-in vicuna_v1.1, which never mentions tools)."""
    from amphista_engine import Engine
    return Engine.from_pretrained(str(long_dir), device="cpu", dtype="fp32", max_seq_len=2048)


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine, model_id="tiny", defaults=dict(max_new_tokens=200)) as httpd:
        yield httpd


def engine_with_template(src, dst, template: str):
    """An fp32 engine on a copy of the tiny model at src (room for 2048 tokens) whose chat template is `template`."""
    from amphista_engine import Engine
    path = edited_copy(src, dst, {"max_position_embeddings": 2048})
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=2048)


@pytest.fixture(scope="module")
def qwen_engine(long_dir, tmp_path_factory):
    """The tiny model with Qwen2.5's template, which reads tools."""
    return engine_with_template(long_dir, tmp_path_factory.mktemp("qwen_tpl") / "m", QWEN25)


def _valid(call: dict, tools=TOOLS) -> dict:
    """An OpenAI tool call checked against the tools' schemas (by hand: names, required keys, types, ranges)."""
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function", call
    name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
    assert name in [t["function"]["name"] for t in tools], call
    if name == "get_weather":
        assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Oslo", "Lima"), args
        assert isinstance(args["days"], int) and not isinstance(args["days"], bool) and 1 <= args["days"] <= 7, args
    else:
        assert set(args) == {"utc"} and isinstance(args["utc"], bool), args
    return {"name": name, "arguments": args}


def test_parse_tool_calls():
    one = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert parse_tool_calls(one) == (None, [{"name": "f", "arguments": {"a": 1}}])
    # text before, several calls, loose whitespace, arguments written as a JSON string
    text = 'Let me look.\n<tool_call>  {"name": "f", "arguments": {}}</tool_call>\n\n<tool_call>\n' \
           '{"name": "g", "arguments": "{\\"x\\": [1, 2]}"}\n</tool_call>\n'
    assert parse_tool_calls(text) == ("Let me look.\n", [{"name": "f", "arguments": {}},
                                                         {"name": "g", "arguments": {"x": [1, 2]}}])
    # a block whose JSON does not parse stays content; the good one is still a call
    bad = '<tool_call>\n{"name": "f", "arguments": {"a": 1\n</tool_call>'
    assert parse_tool_calls(bad) == (bad, [])
    content, calls = parse_tool_calls(bad + "\n" + one)
    assert content == bad + "\n" and calls == [{"name": "f", "arguments": {"a": 1}}]
    # no name, arguments not an object: content
    for junk in ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
                 '<tool_call>[1]</tool_call>', "plain text", ""):
        assert parse_tool_calls(junk) == (junk, [])
    # an unclosed last block (cut by a stop string) whose JSON is whole is a call
    assert parse_tool_calls('x<tool_call>\n{"name": "f", "arguments": {}}\n') == ("x", [{"name": "f",
                                                                                         "arguments": {}}])
    from amphista_engine import parse_tool_calls as exported
    assert exported is parse_tool_calls


def test_stream_filter_holds_back_from_the_first_tool_call():
    f = ToolCallFilter()
    assert [f.feed(d) for d in ("Hi <", "b> <tool", "_c")] == ["Hi ", "<b> ", ""]
    assert f.feed('all>{"name": "f", "arguments": {}}') == "" and f.feed("</tool_call> more") == ""
    # text after the calls is content too (parse_tool_calls), sent before them
    assert f.finish() == (" more", [{"name": "f", "arguments": {}}])
    f = ToolCallFilter()       # a prefix that did not become a call, and a bad block: sent at the end as content
    assert f.feed("a <tool") == "a " and f.feed("box> <tool_call>{oops}") == "<toolbox> "
    assert f.finish() == ("<tool_call>{oops}", [])


def test_bad_tools_and_tool_choice_are_named_400s(server):
    url = server.url
    good = {"messages": ASK, "max_tokens": 4}
    cases = [
        ({"tools": {"type": "function"}}, "tools must be an array", "tools"),
        ({"tools": [{"type": "function"}]}, "tools[0] must be", "tools"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "only functions", "tools"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "tools"),
        ({"tools": [WEATHER, WEATHER]}, "given twice", "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "parameters must be",
         "tools"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice must be", "tool_choice"),
        ({"tool_choice": "required"}, "needs tools", "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'",
         "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice must be", "tool_choice"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "does not mix with tools", "response_format"),
        ({"functions": [{"name": "f"}]}, "send tools=", "functions"),
        ({"function_call": {"name": "f"}}, "deprecated", "function_call"),
        ({"messages": [{"role": "function", "name": "f", "content": "1"}]}, "tool messages", "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "1"}]}, "tool_call_id", "messages[0].tool_call_id"),
        ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{nope"}}]}, *ASK]},
         "messages[1].tool_calls[0].function.arguments is not valid JSON", "messages[1].tool_calls"),
        ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "x"}]}, *ASK]}, "tool_calls[0] must be",
         "messages[1].tool_calls"),
    ]
    for extra, words, param in cases:
        error_of(call(url, CHAT, {**good, **extra}), 400, words, param=param)
    error_of(call(url, "/v1/completions", {"prompt": "x", "tools": TOOLS}), 400, "/v1/chat/completions",
             param="tools")
    # a schema llguidance cannot compile is named before the request waits
    broken = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "minProperties": "x"}}}
    error_of(call(url, CHAT, {**good, "tools": [broken], "tool_choice": "required"}), 400, "tools", param="tools")
    # tool_choice "none" with a response_format of the client's is served; so is the server after those errors
    status, reply = call(url, CHAT, {**good, "tools": TOOLS, "tool_choice": "none",
                                     "response_format": {"type": "regex", "regex": "[ab]{3}"}})
    assert status == 200 and re.fullmatch("[ab]{3}", reply["choices"][0]["message"]["content"]), reply


def test_required_choice_answers_with_valid_calls(server):
    for seed, n in ((None, 1), (3, 2)):
        body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "n": n}
        if seed is not None:
            body.update(temperature=1.0, seed=seed)
        status, reply = call(server.url, CHAT, body)
        assert status == 200, reply
        assert len(reply["choices"]) == n
        for choice in reply["choices"]:       # each choice parsed on its own
            m = choice["message"]
            assert choice["finish_reason"] == "tool_calls" and m["content"] is None and m["tool_calls"], choice
            for c in m["tool_calls"]:
                _valid(c)
        assert reply["usage"]["completion_tokens"] > 0


def test_named_choice_answers_with_one_call_of_that_function(server):
    for name in ("get_time", "get_weather"):
        status, reply = call(server.url, CHAT, {"messages": ASK, "tools": TOOLS, "temperature": 0.8, "seed": 1,
                                                "tool_choice": {"type": "function", "function": {"name": name}}})
        assert status == 200, reply
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1, choice
        assert _valid(choice["message"]["tool_calls"][0])["name"] == name


def test_python_api_answers_as_the_server(server, engine):
    from amphista_engine.tools import ToolError, generate_with_tools
    named = {"type": "function", "function": {"name": "get_weather"}}
    for messages in (ASK, HISTORY):
        result, content, calls = generate_with_tools(engine, messages, TOOLS, named, max_new_tokens=150)
        status, reply = call(server.url, CHAT, {"messages": messages, "tools": TOOLS, "tool_choice": named,
                                                "max_tokens": 150})
        assert status == 200 and content is None and result.finish_reason == "eos", reply
        got = [_valid(c) for c in reply["choices"][0]["message"]["tool_calls"]]
        assert calls == got and calls[0]["name"] == "get_weather"
    with pytest.raises(ToolError, match="tool_choice"):
        generate_with_tools(engine, ASK, TOOLS, "sometimes")


def test_auto_on_the_tiny_model_is_plain_text_where_it_writes_no_call(server, engine):
    """"auto" holds nothing: the random model writes no call, so the reply is its text as without tools (the tools
    in the system prompt), finish_reason as today."""
    status, reply = call(server.url, CHAT, {"messages": ASK, "tools": TOOLS, "max_tokens": 8})
    assert status == 200 and "tool_calls" not in reply["choices"][0]["message"], reply
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    from amphista_engine.tools import prepare_messages
    ref = engine.generate(prepare_messages(ASK, TOOLS, native=False), 8)
    assert reply["choices"][0]["message"]["content"] == ref.text


def _rendered_tokens(engine, server, body) -> int:
    status, reply = call(server.url, CHAT, {**body, "max_tokens": 1})
    assert status == 200, reply
    return reply["usage"]["prompt_tokens"]


def test_a_template_that_reads_tools_renders_them_and_the_tool_turns(qwen_engine):
    app_messages = None
    with serving(qwen_engine, model_id="qwen-tiny") as server:
        body = {"messages": HISTORY, "tools": TOOLS}
        app_messages = server.app.chat_messages(body, server.app.tool_plan(body))
        text = render_chat(qwen_engine.tokenizer, app_messages, variables={"tools": TOOLS})
        # what the server prompted with is this text (the template got `tools` as its variable)
        assert _rendered_tokens(qwen_engine, server, body) == len(qwen_engine.tokenizer.encode(text))
        assert _rendered_tokens(qwen_engine, server, {"messages": HISTORY}) != len(qwen_engine.tokenizer.encode(text))
    # the messages reach the template as given, the call's arguments as a dict (rendered by the template's tojson)
    assert app_messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo", "days": 2}
    assert app_messages[3] == {"role": "tool", "content": "{\"temp\": 3}", "tool_call_id": "call_1"}
    assert text.startswith("<|im_start|>system\nBe terse.\n\n# Tools\n") and json.dumps(WEATHER) in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}'
            '\n</tool_call><|im_end|>\n') in text
    assert ("<|im_start|>user\n<tool_response>\n{\"temp\": 3}\n</tool_response>\n<tool_response>\n{\"wind\": 9}\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in text


def test_a_template_without_tools_gets_them_in_hermes_words(server, engine):
    body = {"messages": HISTORY, "tools": TOOLS}
    messages = server.app.chat_messages(body, server.app.tool_plan(body))
    system = messages[0]["content"]
    assert system.startswith("Be terse.\n\n# Tools\n\nYou may call one or more functions")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n" + json.dumps(CLOCK) + "\n</tools>" in system
    assert "within <tool_call></tool_call> XML tags" in system
    assert messages[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                           '{"city": "Oslo", "days": 2}}\n</tool_call>'}
    assert messages[3] == {"role": "user", "content": "<tool_response>\n{\"temp\": 3}\n</tool_response>\n"
                                                      "<tool_response>\n{\"wind\": 9}\n</tool_response>"}
    assert len(messages) == 4
    text = render_chat(engine.tokenizer, messages)            # vicuna_v1.1: it raised on a tool message before
    assert text.startswith("Be terse.\n\n# Tools") and "USER: <tool_response>" in text
    assert _rendered_tokens(engine, server, body) == len(engine.tokenizer.encode(text))
    # no system message: the tools' becomes the first; no tools, only tool turns: no tools prompt
    assert server.app.chat_messages({"messages": ASK}, server.app.tool_plan({"tools": TOOLS}))[0]["content"] \
        .startswith("# Tools\n")
    plain = server.app.chat_messages({"messages": HISTORY}, server.app.tool_plan({}))
    assert plain[0] == {"role": "system", "content": "Be terse."} and plain[3]["role"] == "user"


def test_streamed_tool_calls(server):
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "temperature": 0.9, "seed": 5}
    status, reply = call(server.url, CHAT, body)
    assert status == 200, reply
    want = [_valid(c) for c in reply["choices"][0]["message"]["tool_calls"]]
    events = sse(server.url, CHAT, body)
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["delta"].get("content") or "" for c in chunks)
    assert "<tool_call" not in content and not content.strip()      # the calls' text is never sent as content
    # each call streams as its first entry (id, type, name) and its arguments' fragments (test_tool_streaming.py)
    entries = [tc for c in chunks for tc in c["delta"].get("tool_calls", ())]
    calls = {}
    for tc in entries:
        if tc["index"] not in calls:
            calls[tc["index"]] = {**tc, "function": dict(tc["function"])}
        else:
            calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    assert sorted(calls) == list(range(len(want)))
    assert [_valid(calls[k]) for k in sorted(calls)] == want          # the streamed calls are the reply's
    assert chunks[-1]["finish_reason"] == "tool_calls" and all(c["finish_reason"] is None for c in chunks[:-1])
    # "auto" with no call: the text streams as content, as without tools
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 8}
    events = sse(server.url, CHAT, body)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == call(server.url, CHAT, body)[1]["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


@needs_smollm2
def test_auto_on_smollm2():
    """The real model, tools offered ("auto"): a reply comes, as text or as calls of a listed tool."""
    from amphista_engine import Engine
    eng = Engine.from_pretrained("smollm2-135m", device="cpu")
    with serving(eng, model_id="smollm2") as server:
        status, reply = call(server.url, CHAT, {"messages": [{"role": "user", "content": "What is the weather in "
                                                              "Paris for the next 2 days?"}],
                                                "tools": TOOLS, "max_tokens": 60})
    assert status == 200, reply
    choice = reply["choices"][0]
    if choice["finish_reason"] == "tool_calls":
        assert all(c["function"]["name"] in ("get_weather", "get_time") for c in choice["message"]["tool_calls"])
    else:
        assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
