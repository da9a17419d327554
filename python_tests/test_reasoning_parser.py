"""--reasoning-parser (amphista_engine/reasoning.py, wired into `amphista serve`): a thinking model's <think> block
as message.reasoning_content / delta.reasoning_content, the rest as content, which alone is read for tool calls.
The splitter is checked on randomized cuts against the whole-text reading; the server on the tiny random model,
made to write exactly the text a test needs by a literal grammar (response_format), one token per character or so,
so that the tags are cut across tokens as a real stream cuts them."""
from __future__ import annotations

import json
import random

import pytest

from amphista_engine.errors import InputError
from amphista_engine.reasoning import ReasoningSplitter, check_reasoning_parser, split_reasoning

CHAT = "/v1/chat/completions"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
# Qwen3-style, DeepSeek-R1-style (the template opened <think>), and tags split or missing
TEXTS = [
    "<think>\nLet me see.\n</think>\n\nThe answer is 4.",
    "  \n<think>a < b </thin k></think>done",
    "Nothing to think about. <think>not a block</think> still content",
    "I weigh it.</think>\n\nIt is 4.",
    "<think>cut before the end <", "<think>cut inside the tag </thi", "<thi", "", " \n ",
    f"<think>maybe {CALL}</think>\nCalling.\n{CALL}", "</think>", "<think></think>", "<think>x</think></think>y",
]


def pieces(text: str, rnd: random.Random) -> list[str]:
    cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(0, 6)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def streamed(text: str, parser: str, thinking: bool, rnd: random.Random) -> tuple[str, str, list]:
    s = ReasoningSplitter(parser, thinking)
    out = [s.feed(p) for p in pieces(text, rnd)]
    out.append(s.end(text))
    assert (s.reasoning, s.content) == ("".join(r for r, _ in out), "".join(c for _, c in out))
    return s.reasoning, s.content, out


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1", "none"])
@pytest.mark.parametrize("thinking", [True, False])
def test_streamed_pieces_join_to_the_whole_reading_however_the_text_is_cut(parser, thinking):
    rnd = random.Random(f"{parser}{thinking}")
    for text in TEXTS:
        whole = split_reasoning(text, parser, thinking)
        for _ in range(40):
            reasoning, content, out = streamed(text, parser, thinking, rnd)
            # (a tag cut across pieces is never sent in part: the pieces join to the reading without it)
            assert (reasoning or None, content or None) == whole, (text, out)


def test_what_each_parser_reads_as_reasoning():
    assert split_reasoning(TEXTS[0], "qwen3") == ("\nLet me see.\n", "\n\nThe answer is 4.")
    # qwen3: a block only where the answer opens with one; enable_thinking false: none at all
    assert split_reasoning(TEXTS[2], "qwen3") == (None, TEXTS[2])
    assert split_reasoning(TEXTS[3], "qwen3") == (None, TEXTS[3])
    assert split_reasoning(TEXTS[0], "qwen3", thinking=False) == (None, TEXTS[0])
    # deepseek_r1: all before </think>, with or without the opening tag
    assert split_reasoning(TEXTS[3], "deepseek_r1") == ("I weigh it.", "\n\nIt is 4.")
    assert split_reasoning(TEXTS[0], "deepseek_r1") == ("\nLet me see.\n", "\n\nThe answer is 4.")
    # cut before </think>: all reasoning, a tag's beginning too
    for parser in ("qwen3", "deepseek_r1"):
        assert split_reasoning("<think>cut inside the tag </thi", parser) == ("cut inside the tag </thi", None)
    assert split_reasoning("no tags, cut", "deepseek_r1") == ("no tags, cut", None)
    assert split_reasoning("<think></think>", "qwen3") == (None, None)
    assert split_reasoning("x", None) == (None, "x")


def test_a_bad_parser_name_is_refused_by_name():
    assert check_reasoning_parser("none") is None and check_reasoning_parser("deepseek_r1") == "deepseek_r1"
    with pytest.raises(InputError, match="reasoning parser must be one of qwen3, deepseek_r1, none, got 'r1'"):
        ReasoningSplitter("r1")
    from amphista_engine.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["serve", "--model", "m"]).reasoning_parser == "none"
    assert parse(["serve", "--model", "m", "--reasoning-parser", "deepseek_r1"]).reasoning_parser == "deepseek_r1"
    with pytest.raises(SystemExit):
        parse(["serve", "--model", "m", "--reasoning-parser", "r1"])


# ---- through the server ----------------------------------------------------------------------------------------

pytest.importorskip("llguidance")

from conftest import serving                              # noqa: E402
from test_serve import call, error_of, sse                # noqa: E402
from test_tool_calling import ASK, TOOLS, engine, long_dir  # noqa: E402,F401  (module fixtures)


@pytest.fixture(scope="module")
def server(engine):  # noqa: F811
    with serving(engine, model_id="tiny", defaults=dict(max_new_tokens=300, temperature=0.0),
                 reasoning_parser="qwen3") as httpd:
        yield httpd


def grammar(text: str) -> dict:
    """A response_format that makes the model write `text`."""
    lark = 'start: "' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return {"type": "grammar", "grammar": lark}


def both(url: str, body: dict) -> tuple[dict, dict, str, str, list]:
    """The non-streamed reply, its choice's message, and the stream's reasoning and content joined, and its deltas
    (each one field: no delta carries both, nor a tag)."""
    status, reply = call(url, CHAT, body)
    assert status == 200, reply
    events = sse(url, CHAT, body)
    assert events[-1] == "[DONE]"
    reasoning, content, deltas, finish = "", "", [], None
    for e in events[:-1]:
        [choice] = e["choices"]
        d = choice["delta"]
        if d.get("role"):
            continue
        if d:
            assert len(d) == 1, d
            deltas.append(d)
        reasoning += d.get("reasoning_content") or ""
        content += d.get("content") or ""
        finish = choice["finish_reason"] or finish
    assert finish == reply["choices"][0]["finish_reason"]
    return reply, reply["choices"][0]["message"], reasoning, content, deltas


def test_a_think_block_is_reasoning_content_streamed_or_not(server, monkeypatch):
    text = "<think>\nTwo and two.\n</think>\n\nFour."
    body = {"messages": ASK, "response_format": grammar(text), "max_tokens": 200}
    reply, message, reasoning, content, deltas = both(server.url, body)
    assert message == {"role": "assistant", "content": "\n\nFour.", "reasoning_content": "\nTwo and two.\n"}
    assert (reasoning, content) == ("\nTwo and two.\n", "\n\nFour.")
    assert all("think>" not in (d.get("reasoning_content") or d.get("content") or "") for d in deltas), deltas
    assert len([d for d in deltas if "reasoning_content" in d]) > 3        # it streams as it decodes
    # usage as without the parser, which leaves the answer as written
    monkeypatch.setattr(server.app, "reasoning_parser", None)
    plain = call(server.url, CHAT, body)[1]
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert plain["usage"] == reply["usage"]


def test_deepseek_r1_reads_reasoning_without_an_opening_tag(server, monkeypatch):
    monkeypatch.setattr(server.app, "reasoning_parser", "deepseek_r1")
    body = {"messages": ASK, "response_format": grammar("Hmm, four.</think>Four."), "max_tokens": 200}
    _, message, reasoning, content, _ = both(server.url, body)
    assert (message["reasoning_content"], message["content"]) == ("Hmm, four.", "Four.") == (reasoning, content)
    # qwen3 takes it as content (no <think>), </think> and all
    monkeypatch.setattr(server.app, "reasoning_parser", "qwen3")
    _, message, reasoning, content, _ = both(server.url, body)
    assert message["reasoning_content"] is None and message["content"] == "Hmm, four.</think>Four." == content
    assert reasoning == ""


def test_an_answer_cut_before_the_end_tag_is_all_reasoning(server, monkeypatch):
    text = "<think>\nA long thought that never ends before the cut.\n</think>\n\nFour."
    for parser in ("qwen3", "deepseek_r1"):
        monkeypatch.setattr(server.app, "reasoning_parser", parser)
        body = {"messages": ASK, "response_format": grammar(text), "max_tokens": 30}
        reply, message, reasoning, content, _ = both(server.url, body)
        assert reply["choices"][0]["finish_reason"] == "length"
        assert message["content"] is None and content == ""
        assert message["reasoning_content"] == reasoning and reasoning
        assert text[len("<think>"):].startswith(reasoning), reasoning


def test_enable_thinking_false_leaves_qwen3_answers_content(server):
    text = "<think>x</think>y"
    body = {"messages": ASK, "response_format": grammar(text), "chat_template_kwargs": {"enable_thinking": False}}
    _, message, reasoning, content, _ = both(server.url, body)
    assert message == {"role": "assistant", "content": text, "reasoning_content": None}
    assert (reasoning, content) == ("", text)


def test_a_json_answer_is_content_under_deepseek_r1(server, monkeypatch):
    """A grammar that holds the answer to JSON from its first character leaves no room for reasoning: content."""
    monkeypatch.setattr(server.app, "reasoning_parser", "deepseek_r1")
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": ["yes", "no"]}}}
    body = {"messages": ASK, "response_format": rf, "max_tokens": 20}
    _, message, reasoning, content, _ = both(server.url, body)
    assert message["reasoning_content"] is None and reasoning == ""
    assert json.loads(message["content"]) in ("yes", "no") and content == message["content"]


def test_tool_calls_are_read_in_the_content_only(server, monkeypatch):
    """A call written inside the reasoning is no call (streamed or not); the one after </think> is."""
    app = server.app
    plan_of = type(app).tool_plan
    text = f"<think>Maybe {CALL} no.</think>\nCalling.\n" + CALL.replace("Oslo", "Lima")
    monkeypatch.setattr(app, "tool_plan", lambda body: plan_of(app, body)._replace(response_format=grammar(text)))
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 400}
    reply, message, reasoning, content, deltas = both(server.url, body)
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    assert message["reasoning_content"] == f"Maybe {CALL} no." == reasoning
    assert message["content"] == "\nCalling.\n" == content
    [tc] = message["tool_calls"]
    assert json.loads(tc["function"]["arguments"]) == {"city": "Lima", "days": 2}
    streamed_args = "".join(c["function"]["arguments"] for d in deltas for c in d.get("tool_calls", ()))
    assert [c["index"] for d in deltas for c in d.get("tool_calls", ())][0] == 0
    assert streamed_args == tc["function"]["arguments"]
    assert not any("tool_call>" in (d.get("content") or "") for d in deltas)


def test_completions_are_untouched(server):
    body = {"prompt": "The quick brown fox", "response_format": grammar("<think>x</think>y"), "max_tokens": 50}
    status, reply = call(server.url, "/v1/completions", body)
    assert status == 200 and reply["choices"][0]["text"] == "<think>x</think>y"
    assert "reasoning_content" not in reply["choices"][0]


# a template that reads an assistant turn's reasoning_content, as Qwen3's does in a tool-calling turn
READS_REASONING = ("{% for m in messages %}{{ m['role'] }}: {% if m.reasoning_content is string %}"
                   "<think>{{ m.reasoning_content }}</think>{% endif %}{{ m['content'] }}\n{% endfor %}")


def test_reasoning_content_sent_back_reaches_the_template(server):
    from amphista_engine.chat import render_chat
    turns = [*ASK, {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."},
             {"role": "user", "content": "Sure?"}]
    messages = server.app.chat_messages({"messages": turns})
    assert messages[1] == {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."}
    assert "assistant: <think>Two and two.</think>Four.\n" in render_chat(None, messages, template=READS_REASONING)
    # a template that does not read it (the tiny model's built-in): accepted, the prompt the same as without it
    with_it = call(server.url, CHAT, {"messages": turns, "max_tokens": 2})
    assert with_it[0] == 200, with_it
    without = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in turns]
    plain = call(server.url, CHAT, {"messages": without, "max_tokens": 2})[1]
    assert with_it[1]["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    bad = [*turns[:1], {**turns[1], "reasoning_content": 3}, turns[2]]
    error_of(call(server.url, CHAT, {"messages": bad}), 400, "reasoning_content must be a string",
             param="messages[1].reasoning_content")


@pytest.mark.parametrize("prefill, answer, want", [
    ("<think>\nTwo", " and two.\n</think>\n\nFour.", (" and two.\n", "\n\nFour.")),
    ("<think>Done.</think>", "Four.", (None, "Four.")),
    ("Sure:", " four.", (None, " four.")),
    ("  ", "<think>x</think>y", ("x", "y")),
    ("<think>a</th", "ink>b", (None, "b")),
])
def test_a_prefilled_answer_is_read_from_where_the_prefill_left_it(server, prefill, answer, want):
    """continue_final_message: the answer goes on from the assistant's prefilled text, so a <think> opened there
    makes the continuation reasoning; none of the prefill is given back."""
    from amphista_engine.reasoning import ReasoningSplitter
    from amphista_engine.serving.batching import Job
    turns = [*ASK, {"role": "assistant", "content": prefill}]
    job = Job(turns, {"continue_final_message": True}, {}, False)
    whole = server.app.reasoning_splitter(job)
    whole.end(answer)
    assert (whole.reasoning or None, whole.content or None) == want
    rnd = random.Random(1)
    for _ in range(10):          # streamed in pieces, the same
        s = ReasoningSplitter("qwen3")
        s.prime(prefill)
        got = [s.feed(p) for p in pieces(answer, rnd)] + [s.end()]
        assert ("".join(r for r, _ in got) or None, "".join(c for _, c in got) or None) == want
