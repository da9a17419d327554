"""A seeded round-trip / differential sweep of the tool-call formats (tools.FORMATS: Hermes blocks, Llama 3's JSON,
Mistral's array and its v11 `[TOOL_CALLS]name[ARGS]{...}`), pure text, no model.

1. Round trip: random calls (names of letters, digits, "_", "-" and "."; arguments as random JSON: nested objects
   and arrays, emoji / CJK / ZWJ sequences, escapes, newlines, big ints, exponents, -0.0, true/false/null, empty
   objects, keys and strings holding the formats' markup: `</tool_call>`, `[TOOL_CALLS]`, `<|python_tag|>`, `}`,
   `]`), one to three of them, with text before (and after, Hermes) as each format writes them (json.dumps in
   several styles, and the chat templates' own rendering of an assistant turn with tool_calls), parse back to the
   same calls and content (parse_tool_calls), and the reply (ToolPlan.answer) gives them.
2. Streamed in random pieces (a character at a time, random cuts, cuts inside markup and escapes) through
   ToolCallFilter.stream / end, the joined content and the calls whose arguments are JSON equal the reply's;
   where the reply says whole, every streamed call is one of them.
3. Malformed answers (cut anywhere, a random piece of markup spliced in, arguments that are no object, names that
   are no string): no exception either way, and the stream agrees with the reply as in 2.

Bug found: a Hermes call whose JSON holds "</tool_call>" in a string (Qwen's template writes arguments with
tojson, which leaves it as it is) was cut at that tag: no call, and the block's tail came back as content (both
ways). Blocks now close at the first </tool_call> that is not a string's text (tools._Closer).
"""
from __future__ import annotations

import json
import random

import pytest

from amphista_engine.tools import CONTROLS, ToolCallFilter, ToolPlan, openai_tool_calls, parse_tool_calls

from test_tool_streaming_formats import joined

TOOLS = [{"type": "function", "function": {"name": "f"}}]
MARKUP = ["</tool_call>", "<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "[ARGS]", "[CALL_ID]", "}", "]", "{",
          "[", '"name": "x", "arguments": {', ";", ",", "\\", '"', "\n", "\\n", "\\u", "😀", "漢字", "👨‍👩‍👧", "\t",
          "</s>", "<|eot_id|>", "é"]
NAMECH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
NOT_JSON = object()


def _text(r: random.Random, n: int = 8) -> str:
    out = []
    for _ in range(r.randint(0, n)):
        k = r.random()
        if k < 0.3:
            out.append(r.choice(MARKUP))
        elif k < 0.4:
            out.append(chr(r.choice([r.randint(0x20, 0x7e), r.randint(0xa0, 0x2fff), r.randint(0x1f300, 0x1faff),
                                     r.randint(0x4e00, 0x9fff), r.randint(0, 0x1f)])))
        else:
            out.append(r.choice("abcxyz _-.0123456789 "))
    return "".join(out)


def _key(r: random.Random) -> str:
    return r.choice(["name", "arguments", "parameters", "type", "id", "", "a", "</tool_call>", "[TOOL_CALLS]",
                     "key " + _text(r, 3), _text(r, 4)])


def _value(r: random.Random, depth: int = 0):
    k = r.random()
    if depth < 3 and k < 0.2:
        return {_key(r): _value(r, depth + 1) for _ in range(r.randint(0, 3))}
    if depth < 3 and k < 0.35:
        return [_value(r, depth + 1) for _ in range(r.randint(0, 3))]
    if k < 0.65:
        return _text(r)
    if k < 0.85:
        return r.choice([0, -1, 10 ** 20, -(10 ** 19), 3.5, -2.25e-7, 1e300, 0.1, 12345678901234567890123, -0.0,
                         r.randint(-10 ** 6, 10 ** 6), r.uniform(-1e6, 1e6)])
    return r.choice([True, False, None])


def _args(r: random.Random) -> dict:
    return {_key(r): _value(r) for _ in range(r.randint(0, 4))}


def _name(r: random.Random, strict: bool) -> str:
    # "." is no name a request can offer (check_tools), but the JSON formats read whatever name is written
    return "".join(r.choice(NAMECH if strict else NAMECH + ".") for _ in range(r.randint(1, 20)))


def _dumps(r: random.Random, obj) -> str:
    style = r.random()
    if style < 0.6:
        return json.dumps(obj, ensure_ascii=False)
    if style < 0.75:
        return json.dumps(obj)                      # escaped surrogate pairs for emoji
    if style < 0.9:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(obj, ensure_ascii=False, indent=r.choice([1, 2]))


def _prose(r: random.Random) -> str:
    return "".join(r.choice(["Let me check. ", "ok", " ", "\n", "漢字", "😀", "é", "x", "<", "tool", "[", "]", "{",
                             "}", "call", "a"]) for _ in range(r.randint(0, 6)))


def _lead(r: random.Random, p: float) -> str:
    """Mistral's content before its calls (not a "[" or "{" an answer of calls begins with)."""
    return _prose(r).lstrip("[{").replace("[TOOL_CALLS]", "") if r.random() < p else ""


def wire(r: random.Random, fmt: str, v11: bool, calls: list[dict]) -> tuple[str, str | None]:
    """(the answer a model in fmt writes for calls, its content)."""
    if fmt == "hermes":
        before = _prose(r).replace("<tool_call", "") if r.random() < 0.5 else ""
        after = _prose(r).replace("<tool_call", "") if r.random() < 0.3 else ""
        blocks = "\n".join("<tool_call>\n" + _dumps(r, {"name": c["name"], "arguments": c["arguments"]})
                           + "\n</tool_call>" for c in calls)
        sep = "\n" if before else ""
        content = before + sep + after
        return before + sep + blocks + after, (content if content.strip() else None)
    if fmt == "llama3_json":
        key = r.choice(["parameters", "arguments"])
        body = "; ".join(_dumps(r, {"name": c["name"], key: c["arguments"]}) for c in calls)
        return r.choice(["", " ", "\n"]) + r.choice(["", "<|python_tag|>"]) + body + r.choice(["", " ", "\n"]), None
    before = _lead(r, 0.4)
    if not v11:
        arr = "[" + ", ".join(_dumps(r, {"name": c["name"], "arguments": c["arguments"],
                                         **({"id": c["id"]} if r.random() < 0.5 else {})}) for c in calls) + "]"
        tag = "[TOOL_CALLS]" + r.choice(["", " "]) if before or r.random() < 0.7 else ""
        return before + tag + arr, (before if before.strip() else None)
    text = before + "".join(
        "[TOOL_CALLS]" + c["name"] + ("[CALL_ID]" + c["id"] if r.random() < 0.3 else "") + "[ARGS]"
        + _dumps(r, c["arguments"]) for c in calls)
    return text, (before if before.strip() else None)


def _cuts(r: random.Random, text: str) -> list[int]:
    k = r.random()
    if k < 0.2:
        return list(range(1, len(text)))
    if k < 0.3:
        return []
    return sorted(r.sample(range(len(text) + 1), min(r.randint(1, 12), len(text) + 1)))


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return NOT_JSON


def check_stream(p: ToolPlan, text: str, cuts: list[int]) -> tuple:
    """The reply's (content, [(name, arguments)]) and whole, checked against the stream of text cut at cuts."""
    content, calls, whole = p.answer(text)
    reply = (content or "", [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                             for c in openai_tool_calls(calls, p.fmt)])
    f = ToolCallFilter(p.parallel, p.fmt, v11=p.v11, hidden=p.hidden)
    sent, streamed, _, _ = joined(text, cuts, p.fmt, p.parallel, f)
    ok = [(c["name"], _json(c["arguments"])) for c in streamed if _json(c["arguments"]) is not NOT_JSON]
    assert (sent, ok) == reply, (text, cuts, p.parallel, sent, streamed, reply)
    assert not whole or len(ok) == len(streamed), (text, cuts, streamed, reply)
    return reply, whole


FORMS = [("hermes", False), ("llama3_json", False), ("mistral", False), ("mistral", True)]


def test_seeded_sweep_round_trip_stream_and_malformed():
    r = random.Random(20240611)
    counts: dict = {}
    for _ in range(1800):
        fmt, v11 = r.choice(FORMS)
        hidden = CONTROLS[fmt] if r.random() < 0.3 else ()
        mode = r.choice(["valid", "valid", "cut", "splice"])
        counts[fmt, v11, mode] = counts.get((fmt, v11, mode), 0) + 1
        calls = [{"name": _name(r, v11), "arguments": _args(r), "id": "abcdefghi"} for _ in range(r.randint(1, 3))]
        text, content = wire(r, fmt, v11, calls)
        if mode == "cut":
            text = text[:r.randint(0, len(text))]
        elif mode == "splice":
            i = r.randint(0, len(text))
            text = text[:i] + r.choice(MARKUP + ["x", "", "{}", "null", "NaN"]) + text[i + r.randint(0, 3):]
        got_content, got = parse_tool_calls(text, fmt, v11=v11, hidden=hidden)
        want = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
        if mode == "valid":
            assert got == want, (fmt, v11, text, got)
            assert hidden or got_content == content, (fmt, v11, text, got_content, content)
        for parallel in (True, False) if r.random() < 0.3 else (True,):
            reply, whole = check_stream(ToolPlan(TOOLS, "auto", None, parallel, fmt, v11, hidden), text,
                                        _cuts(r, text))
            if mode == "valid" and parallel:
                assert reply[1] == [(c["name"], c["arguments"]) for c in want] and whole, (text, reply)
    assert all(counts.get((f, v, m), 0) > 50 for f, v in FORMS for m in ("valid", "cut", "splice")), counts


ENDS = {"hermes": "<|im_end|>\n", "llama3_json": "<|eot_id|>", "mistral": "", "mistral_v11": ""}


def test_seeded_sweep_of_what_the_templates_write():
    pytest.importorskip("llguidance")       # the template modules skip themselves without it
    from amphista_engine.chat import render_chat
    from test_chat_templates_qa import QWEN25
    from test_tool_calling_llama3 import LLAMA31
    from test_tool_calling_mistral import MISTRAL
    from test_tool_calling_mistral_v11 import V11
    templates = {"hermes": QWEN25, "llama3_json": LLAMA31, "mistral": MISTRAL, "mistral_v11": V11}
    user = [{"role": "user", "content": "hi"}]
    r = random.Random(7)
    for _ in range(300):
        key = r.choice(list(templates))
        fmt, v11 = ("mistral", True) if key == "mistral_v11" else (key, False)
        calls = [{"name": _name(r, True), "arguments": _args(r), "id": "".join(r.choice(NAMECH[:62]) for _ in
                                                                               range(9))}
                 for _ in range(1 if key == "llama3_json" else r.randint(1, 3))]     # Llama 3.1: one call a turn
        content = "" if key in ("llama3_json", "mistral") else _lead(r, 0.5).replace("<tool_call", "")
        variables = {"tools": TOOLS}
        head = render_chat(None, user, template=templates[key], add_generation_prompt=True, variables=variables)
        turn = {"role": "assistant", "content": content, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]}
        full = render_chat(None, user + [turn], template=templates[key], add_generation_prompt=False,
                           variables=variables)
        assert full.startswith(head) and full.endswith(ENDS[key]), (key, head, full)
        text = full[len(head):len(full) - len(ENDS[key])]
        got_content, got = parse_tool_calls(text, fmt, v11=v11)
        assert got == [{"name": c["name"], "arguments": c["arguments"]} for c in calls], (key, text, got)
        assert got_content == ((content + ("\n" if key == "hermes" else "")) if content.strip() else None), text
        reply, whole = check_stream(ToolPlan(TOOLS, "auto", None, True, fmt, v11, ()), text, _cuts(r, text))
        assert whole and reply[1] == [(c["name"], c["arguments"]) for c in calls], (text, reply)


def test_arguments_that_are_no_object_are_content_both_ways():
    r = random.Random(3)
    for _ in range(300):
        fmt, v11 = r.choice(FORMS)
        bad = r.choice([[1, 2], "x", 3, None, True, '"[1]"', "[TOOL_CALLS]", "{oops"])
        name = r.choice([_name(r, True), 5, None, ["f"]])
        if fmt == "hermes":
            text = (_prose(r).replace("<tool_call", "") + "<tool_call>\n" + json.dumps({"name": name, "arguments": bad})
                    + "\n</tool_call>" + _prose(r))
        elif fmt == "llama3_json":
            text = json.dumps({"name": name, "parameters": bad})
        elif not v11:
            text = "[TOOL_CALLS] " + json.dumps([{"name": name, "arguments": bad}])
        else:
            text = "[TOOL_CALLS]" + str(name) + "[ARGS]" + json.dumps(bad)
        assert parse_tool_calls(text, fmt, v11=v11)[1] == [], text
        for parallel in (True, False):
            reply, _ = check_stream(ToolPlan(TOOLS, "auto", None, parallel, fmt, v11, ()), text, _cuts(r, text))
            assert reply[1] == [], (text, reply)


# ---- the bug: "</tool_call>" in a string of a Hermes call ---------------------------------------------------

CALL = {"name": "write_file", "arguments": {"path": "notes.md", "text": "Close it with </tool_call>.\nDone"}}
TAGGED = "<tool_call>\n" + json.dumps(CALL, ensure_ascii=False) + "\n</tool_call>"
LATER = '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'


@pytest.mark.parametrize("hidden", [(), CONTROLS["hermes"]])
def test_a_tool_call_tag_in_a_string_of_the_arguments_does_not_end_the_block(hidden):
    text = "Saving. " + TAGGED + "\n" + LATER
    want = [CALL, {"name": "get_time", "arguments": {"utc": True}}]
    assert parse_tool_calls(text, hidden=hidden) == ("Saving. ", want)
    p = ToolPlan(TOOLS, "auto", None, True, "hermes", False, hidden)
    assert p.answer(text) == ("Saving. ", want, True)
    r = random.Random(1)
    for cuts in ([], list(range(1, len(text))), *(sorted(r.sample(range(len(text)), 6)) for _ in range(20))):
        reply, whole = check_stream(p, text, cuts)
        assert whole and reply == ("Saving. ", [(c["name"], c["arguments"]) for c in want]), cuts
    # a request with stops: calls go out whole as their blocks close
    f = ToolCallFilter(whole=True)
    sent, streamed, whole, _ = joined(text, list(range(1, len(text))), "hermes", True, f)
    assert sent == "Saving. " and [json.loads(c["arguments"]) for c in streamed] == [CALL["arguments"], {"utc": True}]


def test_a_string_that_breaks_after_the_tag_still_ends_the_block_there():
    # an unclosed string before the tag (a broken call): the tag ends the block, as before, so the next block's
    # call is still read (a raw newline cannot be a string's text; a string that never closes neither)
    for broken in ('<tool_call>\n{"name": "f", "arguments": {"a": "x</tool_call>\n' + LATER,
                   '<tool_call>{"name": "f", "arguments": {"a": "x</tool_call>'):
        content, calls = parse_tool_calls(broken)
        assert calls == ([{"name": "get_time", "arguments": {"utc": True}}] if LATER in broken else []), broken
        for cuts in ([], list(range(1, len(broken)))):
            check_stream(ToolPlan(TOOLS, "auto", None, True, "hermes", False, ()), broken, cuts)
