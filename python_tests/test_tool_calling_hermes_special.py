"""Hermes calls where <tool_call> and </tool_call> are special tokens (NousResearch's Hermes 3 and Hermes-2-Pro
Llama 3 tokenizers; Qwen's mark them non-special). An answer's text skips special tokens, so the blocks' tags were
lost and the calls' JSON came back as content; a run with tools now shows them (tools.CONTROLS, showing_controls),
content leaves them out, and the grammar of tool_choice "required" or a named function writes them as the tokens."""
from __future__ import annotations

import random
import re

import pytest

from amphista_engine.tools import ToolCallFilter, control_tokens, parse_tool_calls, tool_format

HIDDEN = ("<tool_call>", "</tool_call>")
W = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
T = '{"name": "get_time", "arguments": {"utc": true}}'
ANSWERS = [
    f"<tool_call>\n{W}\n</tool_call>",
    f"Let me check. <tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call>",
    f"<tool_call>\n{W}\n</tool_call> and then <tool_call>{T}</tool_call>",
    f"Mind the </tool_call> here. <tool_call>{T}</tool_call>",           # a stray closing tag: never content
    f"<tool_call>oops</tool_call> <tool_call>{T}</tool_call>",          # a block that is no call: content
    "It is sunny.", "<tool_call>not json</tool_call>", "a </tool_call> b",
]


def joined(text: str, cuts, hidden=HIDDEN, whole=False):
    """The stream of `text` cut at `cuts`, then its end, joined as a client joins it (test_tool_streaming_formats
    .joined): (content, calls, whole), no shown tag in the content; whole: a request with stops (calls go out
    whole)."""
    from test_tool_streaming_formats import joined as formats_joined
    content, calls, whole, _ = formats_joined(text, cuts, "hermes", f=ToolCallFilter(hidden=hidden, whole=whole))
    assert not any(h in content for h in hidden), (text, cuts, content)
    return content, [(c["name"], c["arguments"]) for c in calls], whole


def reply(text: str, hidden=HIDDEN):
    import json
    content, calls = parse_tool_calls(text, hidden=hidden)
    return content or "", [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]


def test_content_leaves_out_the_shown_tags():
    weather = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
    assert parse_tool_calls(ANSWERS[0], hidden=HIDDEN) == (None, [weather])
    assert parse_tool_calls(ANSWERS[3], hidden=HIDDEN) == ("Mind the  here. ",
                                                           [{"name": "get_time", "arguments": {"utc": True}}])
    assert parse_tool_calls(ANSWERS[4], hidden=HIDDEN)[0] == "oops "
    assert parse_tool_calls("<tool_call>not json</tool_call>", hidden=HIDDEN) == ("not json", [])
    # not hidden (a tokenizer where the tags are plain text, Qwen's): content as written, as before
    assert parse_tool_calls("a </tool_call> b") == ("a </tool_call> b", [])
    assert parse_tool_calls(ANSWERS[4])[0] == "<tool_call>oops</tool_call> "


def test_every_split_agrees_with_the_non_streamed_reply():
    rnd = random.Random(3)
    for text in ANSWERS:
        want = reply(text)
        assert not any(h in want[0] for h in HIDDEN), text
        cut_sets = [[i] for i in range(len(text) + 1)] + [list(range(1, len(text)))] + \
            [sorted(rnd.sample(range(len(text) + 1), 4)) for _ in range(10)]
        for cuts in cut_sets:
            for stops in (False, True):
                content, calls, whole = joined(text, cuts, whole=stops)
                assert whole and (content, calls) == want, (text, cuts, stops, content, calls, want)


def test_the_grammar_writes_special_tags_as_tokens():
    pytest.importorskip("llguidance")
    from test_tool_calling import TOOLS
    plain = tool_format(TOOLS, "required")["grammar"]
    assert 'tool_call: "<tool_call>\\n" call "\\n</tool_call>"' in plain      # as before where they are text
    marked = tool_format(TOOLS, "required", controls={"<tool_call>": 300, "</tool_call>": 301})["grammar"]
    assert 'tool_call: <[300]> "\\n" call "\\n" <[301]>' in marked and "<tool_call>" not in marked


# ---- an engine whose tokenizer has the tags as special tokens -----------------------------------------------------

# Hermes 3's template in short: the tools in a system message inside <tools></tools>, an assistant's calls as
# <tool_call>\n{json}\n</tool_call>, results in <tool_response>
HERMES = (
    "{{- bos_token }}"
    "{%- if tools %}{{- '<|im_start|>system\\nYou are a function calling AI model. You are provided with function "
    "signatures within <tools></tools> XML tags: <tools> ' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}"
    "{{- ' </tools> For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role in ('user', 'system') or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- for tc in message.tool_calls %}{%- set arguments = tc.function.arguments %}"
    "{%- if arguments is not string %}{%- set arguments = arguments | tojson %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' + arguments }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>tool\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SPECIAL = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def hermes_engine(tiny_hf_dir, tmp_path_factory):
    from test_tool_calling_mistral_v11 import mistral_engine
    return mistral_engine(tiny_hf_dir, tmp_path_factory.mktemp("hermes_special") / "m", SPECIAL, HERMES, seed=7)


def test_the_tags_are_this_tokenizers_controls(hermes_engine):
    from amphista_engine.tools import tool_call_format
    tok = hermes_engine.tokenizer
    assert tool_call_format(tok) == "hermes"
    assert control_tokens(tok, "hermes") == {t: tok.token_to_id(t) for t in HIDDEN}
    ids = [tok.token_to_id("<tool_call>"), *tok.encode("{}", add_bos=False), tok.token_to_id("</tool_call>")]
    assert tok.decode(ids, skip_special_tokens=True) == "{}"


@pytest.mark.usefixtures("one_thread_module")
def test_the_server_reads_special_tag_calls_both_ways(hermes_engine, monkeypatch):
    pytest.importorskip("llguidance")
    from conftest import serving
    from test_serve import sse
    from test_tool_calling_mistral_v11 import answer_with, script
    from test_tool_calling import ASK, CHAT, TOOLS
    from test_tool_streaming import assembled
    from tool_helpers import check_no_calls_both_ways, next_turn, tool_calls_reply
    answer = ["Let me check. ", "<tool_call>", f"\n{W}\n", "</tool_call>", "\n", "<tool_call>", f"\n{T}\n",
              "</tool_call>"]
    want = [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"utc": true}')]
    with serving(hermes_engine, model_id="hermes-3", defaults=dict(max_new_tokens=200)) as server:
        app = server.app
        grammar = script(hermes_engine, answer, SPECIAL)
        answer_with(monkeypatch, app, grammar)
        body = {"messages": ASK, "tools": TOOLS}
        got = tool_calls_reply(server.url, body, "Let me check. ")
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in got] == want
        content, calls, finish, entries = assembled(sse(server.url, CHAT, body))
        assert content == "Let me check. " and finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls] == want
        assert all(len(per_call) >= 2 and per_call[0]["function"]["arguments"] == "" for per_call in entries)
        # a request with a stop string: the calls go out whole, the same
        stopped = {**body, "stop": ["never written"]}
        content, calls, finish, _ = assembled(sse(server.url, CHAT, stopped))
        assert (content, [(c["name"], c["arguments"]) for c in calls], finish) == ("Let me check. ", want,
                                                                                   "tool_calls")
        # the calls and their results as the next turn: the template writes them back with the tags
        answer_with(monkeypatch, app, None)
        status, reply_ = next_turn(server.url, got)
        assert status == 200, reply_
        # tool_choice "none" (its run shows the tags): content, less them; no tools: the text decoded as ever
        answer_with(monkeypatch, app, grammar)
        plain = f"Let me check. \n{W}\n\n\n{T}\n"
        check_no_calls_both_ways(server.url, plain)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_holds_the_answer_to_special_tag_calls(hermes_engine, choice):
    pytest.importorskip("llguidance")
    from amphista_engine.tools import generate_with_tools
    from test_tool_calling import ASK, TOOLS
    result, content, calls = generate_with_tools(hermes_engine, ASK, TOOLS, choice, parallel_tool_calls=False,
                                                 max_new_tokens=200)
    assert re.match(r'<tool_call>\n\{"name": "get_(time|weather)", "arguments": \{', result.text), result.text
    assert content is None and len(calls) == 1, (result.text, content, calls)
    if isinstance(choice, dict):
        assert calls[0]["name"] == "get_time" and set(calls[0]["arguments"]) == {"utc"}
