"""Mistral's tokenizer-v11 tool calls (Mistral Small 3.1/3.2, Devstral, Magistral): `[TOOL_CALLS]name[ARGS]{...}`,
one [TOOL_CALLS] per call, both markers control (special) tokens. The answer's text shows them only in a run with
tools (Tokenizer.showing, tools.showing_controls), so the parser sees where calls and their arguments begin; content
never holds them, and the text before the first [TOOL_CALLS] is content (as vLLM's mistral parser splits it)."""
from __future__ import annotations

import json
import random
import re

import pytest

from amphista_engine.tools import ToolCallFilter, openai_tool_calls, parse_tool_calls

HIDDEN = ("[TOOL_CALLS]", "[ARGS]")
W = '{"city": "Paris", "days": 2}'
ANSWERS = [
    f"[TOOL_CALLS]get_weather[ARGS]{W}",
    f"Let me check. [TOOL_CALLS]get_weather[ARGS]{W}[TOOL_CALLS]get_time[ARGS]{{\"utc\": true}}",
    '[TOOL_CALLS]f[ARGS]{"s": "a}]\\"[TOOL_CALLS]", "n": [1.0, -0]} \n[TOOL_CALLS] g {"x": {}}\n',
    'Sure [x]: [TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}]',         # v3's array after content
    "[TOOL_CALLS]get_time[ARGS]{}",
    '[Note] [TOOL_CALLS]f[ARGS]{"a": 1}',                         # "[": maybe v3's bare array, then content
    # no calls: content (less the control tokens)
    "It is sunny.", "[TOOL_CALLS]get weather[ARGS]{}", "[TOOL_CALLS]f[ARGS][1]",
    "A [ARGS] b", "[TOOL_CALLS][ARGS]{}",
]

# A call goes out, then the answer turns out not to be calls: nothing more goes out, and the stream is not whole
BROKEN = ["[TOOL_CALLS]f[ARGS]{} and more", '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{', "[TOOL_CALLS]f[ARGS]{}!",
          "[TOOL_CALLS]f[ARGS]{oops"]


def joined(text: str, cuts, parallel: bool = True, hidden=HIDDEN):
    """The stream of `text` cut at `cuts`, then its end, joined as a client joins it (test_tool_streaming_formats
    .joined): (content, calls, whole), no shown token in the content."""
    from test_tool_streaming_formats import joined as formats_joined
    f = ToolCallFilter(parallel, "mistral", v11=True, hidden=hidden)
    content, calls, whole, _ = formats_joined(text, cuts, "mistral", parallel, f)
    assert not any(h in content for h in hidden), (text, cuts, content)
    return content, [(c["name"], c["arguments"]) for c in calls], whole


def reply(text: str, parallel: bool = True, hidden=HIDDEN):
    content, calls = parse_tool_calls(text, "mistral", v11=True, hidden=hidden)
    calls = calls if parallel else calls[:1]
    return content or "", [(c["function"]["name"], c["function"]["arguments"]) for c in openai_tool_calls(calls)]


def test_parse_v11_calls():
    weather = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
    assert parse_tool_calls(ANSWERS[0], "mistral", v11=True) == (None, [weather])
    content, calls = parse_tool_calls(ANSWERS[1], "mistral", v11=True, hidden=HIDDEN)
    assert content == "Let me check. " and calls == [weather, {"name": "get_time", "arguments": {"utc": True}}]
    # [ARGS] left out of the text (a tokenizer where it is no control token is not one that skips it, but vLLM
    # reads the name up to the "{" too)
    assert parse_tool_calls("[TOOL_CALLS]get_time{}", "mistral", v11=True)[1] == [{"name": "get_time",
                                                                                   "arguments": {}}]
    # v3's array after content: content before the token, for the old form too
    assert parse_tool_calls('Ok. [TOOL_CALLS] [{"name": "f", "arguments": {}}]', "mistral") == (
        "Ok. ", [{"name": "f", "arguments": {}}])
    for text in ANSWERS[6:]:
        content, calls = parse_tool_calls(text, "mistral", v11=True, hidden=HIDDEN)
        assert calls == [] and content == text.replace("[TOOL_CALLS]", "").replace("[ARGS]", ""), text
    # not hidden (a tokenizer where the markers are plain text): content as written
    assert parse_tool_calls("A [ARGS] b", "mistral", v11=True) == ("A [ARGS] b", [])


def test_every_split_agrees_with_the_non_streamed_reply():
    rnd = random.Random(11)
    for text in ANSWERS:
        for parallel in (True, False):
            want = reply(text, parallel)
            cut_sets = [[i] for i in range(len(text) + 1)] + [list(range(1, len(text)))] + \
                [sorted(rnd.sample(range(len(text) + 1), 4)) for _ in range(10)]
            for cuts in cut_sets:
                content, calls, whole = joined(text, cuts, parallel)
                assert whole and (content, calls) == want, (text, cuts, parallel, content, calls, want)


def test_calls_that_went_out_but_are_not_the_replys_are_not_whole():
    for text in BROKEN:
        assert parse_tool_calls(text, "mistral", v11=True, hidden=HIDDEN)[1] == []
        for cut in range(len(text) + 1):
            content, calls, whole = joined(text, [cut])
            assert content == "" and [c[0] for c in calls] in (["f"], ["f", "g"]) and not whole, (text, cut)


def test_v11_arguments_stream_as_they_decode_and_content_goes_out_before_the_token():
    f = ToolCallFilter(fmt="mistral", v11=True, hidden=HIDDEN)
    assert f.stream("Let me ") == ("Let me ", [])
    assert f.stream("check. [") == ("check. ", [])                # "[" may begin a [TOOL_CALLS]
    assert f.stream("TOOL_CALLS]get_wea") == ("", [])
    assert f.stream("ther[ARGS]") == ("", [])                       # the name goes out with its arguments' "{"
    _, first = f.stream('{"city": "Pa')
    assert first[0]["function"] == {"name": "get_weather", "arguments": ""} and first[0]["index"] == 0
    assert re.fullmatch(r"[A-Za-z0-9]{9}", first[0]["id"]) and first[1:] == [
        {"index": 0, "function": {"arguments": '{"city": "Pa'}}]
    assert f.stream('ris", "days": 2') == ("", [{"index": 0, "function": {"arguments": 'ris", "days": '}}])
    assert f.stream("}") == ("", [{"index": 0, "function": {"arguments": "2}"}}])
    _, second = f.stream('[TOOL_CALLS]get_time[ARGS]{"utc": tr')
    assert second[0]["index"] == 1 and second[0]["function"] == {"name": "get_time", "arguments": ""}
    assert f.stream("ue}") == ("", [{"index": 1, "function": {"arguments": "true}"}}])
    assert f.end() == ("", [], True) and f.calls_sent == 2


def test_tokenizer_shows_special_tokens_only_within_showing(v11_engine):
    tok = v11_engine.tokenizer
    tc, args = tok.token_to_id("[TOOL_CALLS]"), tok.token_to_id("[ARGS]")
    ids = [tc, *tok.encode("get_time", add_bos=False), args, *tok.encode("{}", add_bos=False)]
    assert tok.decode(ids, skip_special_tokens=True) == "get_time{}"
    with tok.showing([tc, args]):
        assert tok.decode(ids, skip_special_tokens=True) == "[TOOL_CALLS]get_time[ARGS]{}"
        stream = tok.stream_decoder(skip_special_tokens=True)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == "[TOOL_CALLS]get_time[ARGS]{}"
    assert tok.decode(ids, skip_special_tokens=True) == "get_time{}"


# ---- the server, end to end --------------------------------------------------------------------------------------

# Mistral Small 3.2's template in short: tools in [AVAILABLE_TOOLS] before the last user message, an assistant's
# calls as [TOOL_CALLS]name[ARGS]{json}, results in [TOOL_RESULTS]
V11 = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}"
    "{%- if tools and loop.index0 == ns.last %}{{- '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}"
    "{%- endif %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message['tool_calls'] %}{%- for tc in message['tool_calls'] %}"
    "{%- set arguments = tc['function']['arguments'] %}"
    "{%- if arguments is not string %}{%- set arguments = arguments | tojson %}{%- endif %}"
    "{{- '[TOOL_CALLS]' + tc['function']['name'] + '[ARGS]' + arguments }}{%- endfor %}{%- endif %}"
    "{{- eos_token }}"
    "{%- elif message['role'] == 'tool' %}{{- '[TOOL_RESULTS]' + message['content'] | string + '[/TOOL_RESULTS]' }}"
    "{%- endif %}{%- endfor %}")
SPECIAL = ["[TOOL_CALLS]", "[ARGS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
           "[INST]", "[/INST]"]


def mistral_engine(tiny_hf_dir, path, special: list[str], template: str, seed: int):
    """An Engine on a copy of the tiny model at `path` whose tokenizer has `special` as special tokens (embedding and
    LM head rows added for them) and whose chat template is `template`."""
    torch = pytest.importorskip("torch")
    from tokenizers import AddedToken, Tokenizer

    from amphista_engine import Engine
    from conftest import edited_copy
    tok = Tokenizer.from_file(str(tiny_hf_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    n = tok.get_vocab_size()
    g = torch.Generator().manual_seed(seed)

    def grow(t):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            t[k] = torch.cat([t[k], torch.randn(n - t[k].shape[0], t[k].shape[1], generator=g) * 0.1])
    path = edited_copy(tiny_hf_dir, path, {"vocab_size": n, "max_position_embeddings": 2048}, grow)
    tok.save(str(path / "tokenizer.json"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=2048)


@pytest.fixture(scope="module")
def v11_engine(tiny_hf_dir, tmp_path_factory):
    """The tiny model, its tokenizer with Mistral's markers as special tokens, and the v11 template."""
    return mistral_engine(tiny_hf_dir, tmp_path_factory.mktemp("mistral_v11") / "m", SPECIAL, V11, seed=5)


def script(engine, parts, special=SPECIAL) -> str:
    """A Lark grammar that makes the model write `parts`: text, or a special token's text (one of `special`) as
    that token."""
    out = []
    for p in parts:
        if p in special:
            out.append(f"<[{engine.tokenizer.token_to_id(p)}]>")
        else:
            out.append('"' + p.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"')
    return "start: " + " ".join(out)


def answer_with(monkeypatch, app, grammar: str | None):
    """The server's tool requests answered through `grammar` (a scripted answer: script()), or as planned
    (None)."""
    plan_of = type(app).tool_plan
    monkeypatch.setattr(app, "tool_plan", lambda body: plan_of(app, body) if grammar is None else
                        plan_of(app, body)._replace(response_format={"type": "grammar", "grammar": grammar}))


@pytest.mark.usefixtures("one_thread_module")
def test_the_server_reads_v11_calls_both_ways(v11_engine, monkeypatch):
    pytest.importorskip("llguidance")
    from conftest import serving
    from test_serve import call, sse
    from test_tool_calling import ASK, CHAT, TOOLS
    from test_tool_streaming import assembled
    from amphista_engine.tools import mistral_v11, tool_call_format
    from tool_helpers import check_no_calls_both_ways, next_turn, tool_calls_reply
    assert tool_call_format(v11_engine.tokenizer) == "mistral" and mistral_v11(v11_engine.tokenizer)
    answer = ["Let me check. ", "[TOOL_CALLS]", "get_weather", "[ARGS]", '{"city": "Paris", "days": 2}',
              "[TOOL_CALLS]", "get_time", "[ARGS]", '{"utc": true}']
    with serving(v11_engine, model_id="mistral-v11", defaults=dict(max_new_tokens=200)) as server:
        app = server.app
        grammar = script(v11_engine, answer)
        answer_with(monkeypatch, app, grammar)
        body = {"messages": ASK, "tools": TOOLS}
        got = tool_calls_reply(server.url, body, "Let me check. ")
        want = [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"utc": true}')]
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in got] == want
        assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c["id"]) for c in got)
        content, calls, finish, entries = assembled(sse(server.url, CHAT, body))
        assert content == "Let me check. " and finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls] == want
        assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c["id"]) for c in calls)
        assert all(len(per_call) >= 2 and per_call[0]["function"]["arguments"] == "" for per_call in entries)
        # parallel_tool_calls false: the first call, both ways
        one = {**body, "parallel_tool_calls": False}
        choice = call(server.url, CHAT, one)[1]["choices"][0]
        content, calls, finish, _ = assembled(sse(server.url, CHAT, one))
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == \
            [(c["name"], c["arguments"]) for c in calls] == want[:1]
        assert finish == choice["finish_reason"] == "tool_calls"
        # the calls and their results as the next turn: the template writes them back in its own form
        answer_with(monkeypatch, app, None)
        status, reply_ = next_turn(server.url, got)
        assert status == 200, reply_
        # tool_choice "none" (its run shows the tokens): content, less them; no tools: the text decoded as ever
        answer_with(monkeypatch, app, grammar)
        plain = "Let me check. get_weather" + '{"city": "Paris", "days": 2}get_time{"utc": true}'
        check_no_calls_both_ways(server.url, plain)


@pytest.mark.usefixtures("one_thread_module")
def test_required_holds_the_answer_to_v11_calls(v11_engine):
    pytest.importorskip("llguidance")
    from amphista_engine.tools import generate_with_tools
    from test_tool_calling import ASK, TOOLS
    result, content, calls = generate_with_tools(v11_engine, ASK, TOOLS, {"type": "function",
                                                                          "function": {"name": "get_time"}},
                                                 max_new_tokens=60)
    assert result.text.startswith("[TOOL_CALLS]get_time[ARGS]{") and content is None, result.text
    assert [c["name"] for c in calls] == ["get_time"] and set(calls[0]["arguments"]) == {"utc"}


@pytest.mark.usefixtures("one_thread_module")
def test_a_stop_string_meets_a_shown_token_once(v11_engine):
    """A shown control token is in the answer's text already: the stop-string matcher, which also sees skipped
    special tokens' text, met it twice, so a stop "[ARGS]{" left "...get_time[ARGS]" in the answer."""
    pytest.importorskip("llguidance")
    tok = v11_engine.tokenizer
    parts = ["Let me check. ", "[TOOL_CALLS]", "get_time", "[ARGS]", '{"tz": "UTC"}']
    rf = {"type": "grammar", "grammar": script(v11_engine, parts)}
    with tok.showing([tok.token_to_id("[TOOL_CALLS]"), tok.token_to_id("[ARGS]")]):
        whole = v11_engine.generate("hi", chat=False, max_new_tokens=40, response_format=rf)
        cut = v11_engine.generate("hi", chat=False, max_new_tokens=40, response_format=rf, stop=["[ARGS]{"])
    assert whole.text == "".join(parts)
    assert cut.text == "Let me check. [TOOL_CALLS]get_time" and cut.finish_reason == "stop"


@pytest.mark.usefixtures("one_thread_module")
def test_a_named_v11_call_may_carry_its_call_id(tiny_hf_dir, tmp_path):
    """Where [CALL_ID] is a special token (templates that write name[CALL_ID]id[ARGS]{...}), the grammar of a
    required or named call lets the model write the id it was trained to write; it held the call to name[ARGS]."""
    pytest.importorskip("llguidance")
    from amphista_engine.structured import Grammar
    from amphista_engine.tools import plan_for
    from test_tool_calling import TOOLS
    engine = mistral_engine(tiny_hf_dir, tmp_path / "m", SPECIAL + ["[CALL_ID]"], V11, seed=7)
    tok = engine.tokenizer
    plan = plan_for(tok, TOOLS, {"type": "function", "function": {"name": "get_time"}})
    grammar = Grammar(plan.response_format, tok, engine.config.vocab_size, engine.eos_ids)

    def takes(parts) -> bool:
        m = grammar.matcher()
        ids = [i for p in parts for i in ([tok.token_to_id(p)] if p in SPECIAL + ["[CALL_ID]"]
                                          else tok.encode(p, add_bos=False))]
        return all(m.consume_token(i) for i in ids) and m.is_accepting()
    args = ["[ARGS]", '{"utc": true}']
    assert takes(["[TOOL_CALLS]", "get_time", *args])
    assert takes(["[TOOL_CALLS]", "get_time", "[CALL_ID]", "a1B2c3D4e", *args])
    assert not takes(["[TOOL_CALLS]", "get_time", "[CALL_ID]", "a1B2", *args])          # ids are 9 long
    assert not takes(["[TOOL_CALLS]", "get_weather", "[CALL_ID]", "a1B2c3D4e", *args])  # the named one only
