"""A Hermes answer cut (max_tokens) inside a `<tool_call>` block under tool_choice "auto": the stream holds a block
back and sends nothing for it but its call's name and arguments as they decode (ToolCallFilter.stream / end), so the
non-streamed reply (ToolPlan.read, tools._read_answer / _hermes_reading) gives the whole calls before the cut, content
what the stream sent as content, and drops the cut block. It kept that block's markup (`<tool_call>\\n{"name": ...`) as
content where the cut fell in a second block, and the call's partial JSON where it fell in the first, while the
stream sent neither. Both ways the finish is "length" (as test_tool_cut_answers has it for Llama 3 and Mistral). A
block that is no call and was not cut (its JSON ended, or cannot begin a call) stays content, as documented."""
from __future__ import annotations

import json
import random

import pytest

from amphista_engine.tools import TOOL_CALL_END, TOOL_CALL_START, ToolCallFilter

from test_tool_cut_answers import CHOICES, F, G, cuts_of, plan, reply
from test_tool_streaming_formats import joined
from tool_helpers import template_engine_fixture

A = TOOL_CALL_START + "\n" + F % "arguments" + "\n" + TOOL_CALL_END       # get_weather
B = TOOL_CALL_START + "\n" + G % "arguments" + "\n" + TOOL_CALL_END       # get_time
# (the answer before the block the cut falls in, that block, the content the reply and stream have, the whole calls)
ANSWERS = [
    ("Let me check. ", A, "Let me check. ", []),                            # cut in the first call
    ("", A, None, []),
    ("Let me check. " + A + "\n", B, "Let me check. ", ["get_weather"]),     # cut in the second call
    (A + " And the time: ", B, " And the time: ", ["get_weather"]),          # content between the calls
    (A, A, None, ["get_weather"]),
]
MARKUP = (TOOL_CALL_START[:2], '{"name"')


def test_a_hermes_answer_cut_in_a_block_reads_as_its_stream_sent_it():
    rnd = random.Random(5)
    # The filter reads no tool_choice but calls_only ("required" and a named function alike): its stream of the same
    # text, cuts and flags is run once and checked against each choice's reply (its ids aside, it is deterministic).
    streams = {}

    def stream_of(text, cut, parallel, hidden, calls_only):
        key = (text, tuple(cut), parallel, hidden, calls_only)
        if key not in streams:
            f = ToolCallFilter(parallel, "hermes", hidden=hidden, calls_only=calls_only)
            streams[key] = joined(text, cut, "hermes", parallel, f)
        return streams[key]
    for head, block, lead, names in ANSWERS:
        name = json.loads(block[len(TOOL_CALL_START):-len(TOOL_CALL_END)])["name"]
        json_end = block.index("\n" + TOOL_CALL_END)
        # from 2 characters of the tag on (a lone "<" after the calls is the answer's own text); a cut in the
        # closing tag leaves the block's JSON whole: it is a call
        for text in cuts_of(head, block)[1:]:
            k = len(text) - len(head)
            # a partial first tag, no block before it: the answer's text, both ways (as vLLM reads it)
            own = TOOL_CALL_START not in head and k < len(TOOL_CALL_START)
            for hidden in ((), (TOOL_CALL_START, TOOL_CALL_END)):    # the tags special tokens (Hermes 3)
                for choice in CHOICES:
                    for parallel in (True, False):
                        p = plan("hermes", False, choice, parallel)._replace(hidden=hidden)
                        content, calls = reply(p, text)
                        want = names + [name] if k >= json_end else names
                        want = want if parallel else want[:1]
                        assert [n for n, _ in calls] == want, (text, choice, parallel, content, calls)
                        assert content == (None if p.calls_only else text if own else lead), (text, choice, content)
                        for cut in ([], list(range(1, len(text))),
                                    sorted(rnd.sample(range(len(text) + 1), min(len(text), rnd.randint(2, 6))))):
                            sent, streamed, whole, _ = stream_of(text, cut, parallel, hidden, p.calls_only)
                            done = [(c["name"], json.loads(c["arguments"])) for c in streamed[:len(want)]]
                            assert done == calls and sent == (content or ""), (text, cut, sent, streamed, calls)
                            # a call that went out begun (the cut block's) is not the reply's: never claimed whole
                            assert whole == (len(streamed) == len(want)), (text, cut, streamed, whole)
                            assert own or not any(m in sent for m in MARKUP), (text, cut, sent)
                # a request with stops (calls go out whole as their blocks close): a cut block stays content, its
                # markup too, both ways, as before
                p = plan("hermes", False, "auto", True)._replace(hidden=hidden)
                content, _ = p.read(text, stops=True)
                f = ToolCallFilter(True, "hermes", hidden=hidden, whole=True)
                assert joined(text, [len(text) // 2], "hermes", True, f)[0] == (content or ""), text
    # an answer that ended (EOS) with a block that is no call keeps it as content, as written, and the stream agrees
    # where it sent no call for it: JSON that ended, a block that cannot begin a call, one not closed
    auto = plan("hermes", False, "auto", True)
    for text, calls in (('Sure. <tool_call>\n{"city": "Oslo"}\n</tool_call>', []),
                        ('Sure. <tool_call>\n{"city": "Oslo"}', []),
                        ('Hi <tool_call>\n{"nom', []),
                        (A + "\n<tool_call>\n{oops}\n</tool_call>", ["get_weather"]),
                        (A + "\n<tool_call>\nplain words", ["get_weather"])):
        content, got = reply(auto, text)
        assert [n for n, _ in got] == calls and content == (text if not calls else text[len(A):]), (text, content)
        sent, streamed, whole, _ = joined(text, list(range(1, len(text))), "hermes")
        assert sent == content and [c["name"] for c in streamed] == calls and whole, (text, sent)
    # JSON that breaks after its name went out (text after the arguments): the stream sent the call begun, never
    # the markup; the reply (which kept the block as content) reads it as the stream sent it: no content but the
    # text before it, no call, not whole (test_tool_stream_agreement_qa)
    text = 'Sure. <tool_call>\n{"name": "get_time", "arguments": {"utc": true}} x\n</tool_call>'
    assert reply(auto, text) == ("Sure. ", []) and auto.answer(text)[2] is False
    sent, streamed, whole, _ = joined(text, list(range(1, len(text))), "hermes")
    assert sent == "Sure. " and [c["name"] for c in streamed] == ["get_time"] and not whole, (sent, streamed)


# ---- the server, end to end --------------------------------------------------------------------------------------

hermes_engine = template_engine_fixture("hermes_cut", "qwen25")


@pytest.mark.usefixtures("one_thread_module")
def test_the_servers_reply_to_a_cut_hermes_answer_is_what_its_stream_sent(hermes_engine, monkeypatch):
    from conftest import serving
    from test_serve import call, sse
    from test_tool_calling import ASK, CHAT, TOOLS as SERVER_TOOLS
    from test_tool_calling_mistral_v11 import answer_with, script
    from test_tool_streaming import assembled
    head = "Let me check. "
    answer = head + A + "\n" + B
    second = len(head + A + "\n")
    # (where the cut should fall, the whole calls before it): in the first call's name, in its arguments, in the
    # second block's <tool_call> tag, in its name, in its arguments
    spots = [(len(head) + 16, []), (len(head) + 50, []), (second + 4, ["get_weather"]),
             (second + 16, ["get_weather"]), (second + 45, ["get_weather"])]
    with serving(hermes_engine, model_id="tiny-hermes-cut", defaults=dict(max_new_tokens=300,
                                                                         temperature=0.0)) as server:
        answer_with(monkeypatch, server.app, script(hermes_engine, [answer], special=()))
        body = {"messages": ASK, "tools": SERVER_TOOLS, "logprobs": True}
        status, full = call(server.url, CHAT, body)
        assert status == 200, full
        tokens = [t["token"] for t in full["choices"][0]["logprobs"]["content"]]
        assert "".join(tokens).startswith(answer), tokens
        ends = [len("".join(tokens[:i])) for i in range(len(tokens) + 1)]
        for spot, names in spots:
            mt = next(i for i, n in enumerate(ends) if n >= spot)
            json_end = second + B.index("\n" + TOOL_CALL_END) if names else len(head) + A.index("\n" + TOOL_CALL_END)
            assert ends[mt] < json_end, (spot, ends[mt])       # the cut fell inside the block meant, before its end
            for parallel in (True, False):
                one = {**body, "max_tokens": mt, "parallel_tool_calls": parallel, "logprobs": False}
                status, got = call(server.url, CHAT, one)
                assert status == 200, got
                [ch] = got["choices"]
                calls = [(c["function"]["name"], c["function"]["arguments"])
                         for c in ch["message"].get("tool_calls") or []]
                assert [n for n, _ in calls] == names and ch["message"]["content"] == head, (ends[mt], ch)
                assert ch["finish_reason"] == "length", ch
                content, streamed, finish, _ = assembled(sse(server.url, CHAT, one))
                assert content == head and finish == "length", (ends[mt], content, finish)
                assert [(c["name"], c["arguments"]) for c in streamed[:len(names)]] == calls, (streamed, calls)
