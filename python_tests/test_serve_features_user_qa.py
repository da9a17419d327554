"""`amphista serve` with this week's features together, as a user migrating from vLLM/OpenAI sees them: structured
output, tool calls, sampling defaults, continuous batching, n, stream, speculative requests and /metrics on one
server (tiny random model, random Amphista heads)."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest

pytest.importorskip("llguidance")

from amphista_engine.tools import parse_tool_calls      # noqa: E402

from conftest import edited_copy, serving               # noqa: E402
from test_serve import call, sse                        # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

C, CH = "/v1/completions", "/v1/chat/completions"
CODE = {"type": "regex", "regex": r"[a-e]{2,4}-[0-9]{2}\."}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}
# sampled with a seed: runs alone, the same answer each time (a Hermes block the grammar holds it to)
TOOL = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, CLOCK], "tool_choice": "required",
        "temperature": 1.0, "seed": 1}


@pytest.fixture(scope="module")
def engine(tiny_hf_dir, tmp_path_factory):
    """The tiny model with room for the tools' prompt (~700 tokens), with random Amphista heads."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    path = edited_copy(tiny_hf_dir, tmp_path_factory.mktemp("qa_feat") / "m", {"max_position_embeddings": 2048})
    eng = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=1024)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    return eng


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine, model_id="tiny", max_batch=4, quiet=True) as httpd:
        yield httpd


@pytest.fixture(scope="module")
def tool_tokens(server) -> int:
    """The tokens of the whole (uncut) tool answer: one call, then EOS."""
    status, reply = call(server.url, CH, {**TOOL, "max_tokens": 200})
    assert status == 200 and reply["choices"][0]["finish_reason"] == "tool_calls", reply
    assert reply["amphista"]["engine_finish_reason"] == "eos", reply
    return reply["usage"]["completion_tokens"] - 1      # usage counts the EOS too: the answer's own tokens


def test_a_cut_inside_the_closing_tag_still_reads_the_complete_call():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_c'
    assert parse_tool_calls(text) == (None, [{"name": "f", "arguments": {"a": 1}}])
    # an unfinished JSON is no call: the text stays content
    assert parse_tool_calls('<tool_call>\n{"name": "f", "argu') == ('<tool_call>\n{"name": "f", "argu', [])


def test_max_tokens_cutting_a_tool_call_says_length(server, tool_tokens):
    """Wherever max_tokens cuts the answer, finish_reason is "length" (as OpenAI): before the call's JSON closes there
    are no tool_calls and, under tool_choice "required", no content either (the answer is calls by construction, and
    the stream sends no unfinished block as content); after it (inside the closing tag too) the call is read.
    Before the fix a call was "tool_calls" where the cut fell just after the JSON (hiding the cut) and content
    again where it fell inside </tool_call>."""
    seen_calls = False
    for mt in range(tool_tokens - 14, tool_tokens):
        status, reply = call(server.url, CH, {**TOOL, "max_tokens": mt})
        choice = reply["choices"][0]
        assert status == 200 and choice["finish_reason"] == "length", (mt, choice)
        calls = choice["message"].get("tool_calls")
        if calls:
            seen_calls = True
            assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}], calls
            assert choice["message"]["content"] is None
        else:
            assert not seen_calls, (mt, choice)     # once the JSON closed, every later cut reads the call
            assert choice["message"]["content"] is None, (mt, choice)
    assert seen_calls
    # streamed: the same finish, and the call sent as it is in the reply
    events = [e for e in sse(server.url, CH, {**TOOL, "max_tokens": tool_tokens - 1}) if e != "[DONE]"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    deltas = [e["choices"][0]["delta"] for e in events]
    assert any("tool_calls" in d for d in deltas), deltas


def test_speculative_request_takes_a_default_repetition_penalty(engine):
    """--generation-config auto may set a repetition_penalty (Qwen2.5's 1.05). It once needed plain decoding (a
    request asking for speculative decoding was refused); now the server's default penalty applies to speculative
    requests as to plain ones, with the same greedy answer."""
    with serving(engine, model_id="tiny", quiet=True, defaults=dict(repetition_penalty=1.4)) as h:
        want = engine.generate("Hi", chat=False, max_new_tokens=24, repetition_penalty=1.4, speculative=None)
        status, reply = call(h.url, C, {"prompt": "Hi", "max_tokens": 24, "speculative": "amphista"})
        assert status == 200 and reply["amphista"]["speculative"] == "amphista", reply
        assert reply["choices"][0]["text"] == want.text
        status, reply = call(h.url, C, {"prompt": "Hi", "max_tokens": 24, "speculative": "amphista",
                                        "repetition_penalty": 1})
        unpenalised = engine.generate("Hi", chat=False, max_new_tokens=24, speculative=None).text
        assert status == 200 and reply["choices"][0]["text"] == unpenalised != want.text


def _norm(reply: dict) -> list:
    """A reply's choices without the fresh tool call ids."""
    out = []
    for c in reply["choices"]:
        c = json.loads(json.dumps(c))
        for tc in (c.get("message") or {}).get("tool_calls") or ():
            tc.pop("id")
        out.append(c)
    return out


def test_mixed_traffic_on_one_server_each_answer_as_alone(server, tool_tokens):
    """Constrained, tool, free, sampled, speculative and n>1 requests at once (max_batch 4, continuous batching),
    a long free run decoding as constrained ones arrive: every answer equals the same request sent alone and
    keeps its format; a bad schema among them fails alone; /metrics counts it all."""
    reqs = {
        "long": (C, {"prompt": "jumps over", "max_tokens": 300}),
        "rx": (C, {"prompt": "The quick brown fox", "max_tokens": 16, "response_format": CODE}),
        "rx_n": (C, {"prompt": "Hi", "max_tokens": 16, "response_format": CODE, "n": 2, "logprobs": 2}),
        "json": (C, {"prompt": "Hi", "max_tokens": 60, "response_format": {"type": "json_object"}}),
        "free": (C, {"prompt": "the lazy dog", "max_tokens": 25}),
        "spec": (C, {"prompt": "the lazy dog", "max_tokens": 25, "speculative": "amphista"}),
        "tool_cut": (CH, {**TOOL, "max_tokens": tool_tokens - 3}),
        "bad": (C, {"prompt": "Hi", "max_tokens": 8, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/defs/nope"}}}}),
    }
    alone = {k: call(server.url, path, body) for k, (path, body) in reqs.items()}
    assert alone["bad"][0] == 400 and alone["bad"][1]["error"]["param"] == "response_format", alone["bad"]
    before = urllib.request.urlopen(server.url + "/metrics").read().decode()
    together: dict = {}

    def go(k):
        together[k] = call(server.url, *reqs[k])

    threads = [threading.Thread(target=go, args=(k,)) for k in reqs]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(60)
    for k in reqs:
        assert together[k][0] == alone[k][0], (k, together[k])
        if k != "bad":
            assert _norm(together[k][1]) == _norm(alone[k][1]), k
    for c in together["rx"][1]["choices"] + together["rx_n"][1]["choices"]:
        assert re.fullmatch(CODE["regex"], c["text"]) and c["finish_reason"] == "stop", c
    json_choice = together["json"][1]["choices"][0]
    if json_choice["finish_reason"] == "stop":
        assert isinstance(json.loads(json_choice["text"]), dict)
    tool = together["tool_cut"][1]["choices"][0]
    assert tool["finish_reason"] == "length" and tool["message"]["tool_calls"], tool
    after = urllib.request.urlopen(server.url + "/metrics").read().decode()

    def metric(text, name):
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0
    done = 'amphista_requests_total{endpoint="/v1/completions"}'
    assert metric(after, done) - metric(before, done) == 7
    bad = 'amphista_request_errors_total{endpoint="/v1/completions",status="400"}'
    assert metric(after, bad) - metric(before, bad) == 1
    assert metric(after, "amphista_requests_running") == 0 and metric(after, "amphista_requests_waiting") == 0
