"""QA of gaps left in `amphista serve`'s /v1/responses and /v1/messages/count_tokens, on the tiny random model with
scripted answers (test_responses_fuzz_qa's server):

- a function call that went out by name and then broke (or was cut) was left out of response.completed although
  the stream had announced it at an output_index, so later items' indexes disagreed with the stream's;
- text.format json_schema's name (required, [a-zA-Z0-9_-]{1,64}) and metadata's limits (16 pairs, keys <= 64
  characters, values <= 512) were not enforced;
- /v1/messages/count_tokens took sampling fields (max_tokens, temperature, ...) it never reads."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from test_responses_api import events_of                   # noqa: E402
import test_responses_fuzz_qa as fuzz                      # noqa: E402
from test_responses_fuzz_qa import BROKEN, CALL, TIME, TOOLS, WEATHER, send   # noqa: E402
from test_tool_streaming import scripted                   # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

RESPONSES, COUNT = "/v1/responses", "/v1/messages/count_tokens"
STRICT = {**WEATHER, "strict": True}
server, client = fuzz.server, fuzz.client       # its fixtures: the tiny model, served


def streamed(url: str, body: dict) -> list[dict]:
    status, ctype, text = send(url, {**body, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream"), text
    return events_of(text)


def assert_indexes_agree(events: list[dict]):
    """Each item the stream announced is at its output_index in response.completed's output, the item done."""
    final = events[-1]
    assert final["type"] in ("response.completed", "response.incomplete"), final
    output = final["response"]["output"]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    done = {e["output_index"]: e["item"] for e in events if e["type"] == "response.output_item.done"}
    assert [e["output_index"] for e in added] == list(range(len(output))), (added, output)
    for e in added:
        assert output[e["output_index"]]["id"] == e["item"]["id"], (e, output)
        assert output[e["output_index"]] == done[e["output_index"]], (output, done)
    for e in events:
        if "output_index" in e and "item_id" in e:
            assert output[e["output_index"]]["id"] == e["item_id"], e


def without_ids(response: dict) -> list:
    return [{k: v for k, v in o.items() if k not in ("id", "call_id")} for o in response["output"]]


# ---- 1. a broken call's item: where the stream put it --------------------------------------------------------
def test_a_broken_call_keeps_its_index(server, client, monkeypatch):
    """Non-strict tools: a call that broke, then a whole one, then text. The broken call went out by name at
    output_index 0, and response.completed left it out: the whole call (announced at 1) was at 0, the message (2) at
    1. Now it stays, status incomplete; the SDK's stream accumulator ends with the server's response."""
    scripted(server, monkeypatch, BROKEN + "\n" + CALL("Paris") + "\nDone.")
    body = {"model": "tiny", "input": "Weather?", "tools": TOOLS, "max_output_tokens": 400}
    events = streamed(server.url, body)
    assert_indexes_agree(events)
    final = events[-1]["response"]
    assert [(o["type"], o["status"]) for o in final["output"]] == [
        ("function_call", "incomplete"), ("message", "completed"), ("function_call", "completed")]
    assert [o.get("arguments") for o in final["output"]] == ['{"city": 5', None, '{"city": "Paris", "days": 2}']
    status, _, text = send(server.url, body)
    assert status == 200 and without_ids(json.loads(text)) == without_ids(final), text
    with client.responses.stream(**body) as stream:
        seen = [e for e in stream if e.type in ("response.output_item.added", "response.output_item.done")]
        got = stream.get_final_response()
    assert [(o.type, o.status) for o in got.output] == [(o["type"], o["status"]) for o in final["output"]]
    for e in seen:
        assert got.output[e.output_index].id == e.item.id, (e, got.output)


def test_a_call_cut_by_max_output_tokens_keeps_its_index(server, client, monkeypatch):
    """Text, then a call cut by max_output_tokens: the cut call is the response's last item, status incomplete,
    where the stream announced it (it was left out of the final output)."""
    scripted(server, monkeypatch, "Checking.\n" + CALL("Oslo"))
    body = {"model": "tiny", "input": "Weather?", "tools": TOOLS, "max_output_tokens": 75}
    events = streamed(server.url, body)
    assert_indexes_agree(events)
    final = events[-1]["response"]
    assert final["status"] == "incomplete", final
    assert [(o["type"], o["status"]) for o in final["output"]] == [("message", "completed"),
                                                                    ("function_call", "incomplete")]
    with client.responses.stream(**body) as stream:
        got = list(stream)[-1].response     # response.incomplete's (get_final_response() keeps response.completed's)
    assert [(o.type, o.status) for o in got.output] == [("message", "completed"), ("function_call", "incomplete")]


def test_a_strict_tools_broken_call_is_not_announced(server, client, monkeypatch):
    """Strict tools: the SDK parses every call of the final response (json.loads of its arguments), so a broken one
    cannot be kept; it is not announced either (a strict tool's call goes out once it is whole), so the indexes
    agree, and the SDK's stream and parse() read the whole call."""
    scripted(server, monkeypatch, BROKEN + "\n" + CALL("Paris") + "\nDone.")
    body = {"model": "tiny", "input": "Weather?", "tools": [STRICT, TIME], "max_output_tokens": 400}
    events = streamed(server.url, body)
    assert_indexes_agree(events)
    final = events[-1]["response"]
    assert [(o["type"], o["status"]) for o in final["output"]] == [("message", "completed"),
                                                                    ("function_call", "completed")]
    assert json.loads(final["output"][1]["arguments"]) == {"city": "Paris", "days": 2}
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(deltas) == final["output"][1]["arguments"], deltas
    status, _, text = send(server.url, body)
    assert status == 200 and without_ids(json.loads(text)) == without_ids(final), text
    with client.responses.stream(**body) as stream:
        seen = [e for e in stream if e.type == "response.output_item.added"]
        got = stream.get_final_response()
    assert [getattr(o, "parsed_arguments", None) for o in got.output] == [None, {"city": "Paris", "days": 2}]
    assert [e.output_index for e in seen] == [0, 1]
    parsed = client.responses.parse(**body)
    assert [getattr(o, "parsed_arguments", None) for o in parsed.output] == [None, {"city": "Paris", "days": 2}]


def test_a_strict_tools_cut_call_does_not_break_the_sdk(server, client, monkeypatch):
    """A strict tool's call cut by max_output_tokens: the SDK's stream raised JSONDecodeError had it been kept, and
    its indexes disagreed had it been announced and dropped; it is neither."""
    scripted(server, monkeypatch, "Checking.\n" + CALL("Oslo"))
    body = {"model": "tiny", "input": "Weather?", "tools": [STRICT], "max_output_tokens": 75}
    events = streamed(server.url, body)
    assert_indexes_agree(events)
    assert [o["type"] for o in events[-1]["response"]["output"]] == ["message"]
    with client.responses.stream(**body) as stream:
        got = list(stream)[-1].response     # response.incomplete's (get_final_response() keeps response.completed's)
    assert got.status == "incomplete" and [o.type for o in got.output] == ["message"]


def test_strict_whole_calls_go_out_whole(server, client, monkeypatch):
    """Strict tools, two whole calls: each goes out whole (its arguments in one delta), in order, where the final
    response has it."""
    scripted(server, monkeypatch, CALL("Oslo") + "\n" + CALL("Paris"))
    body = {"model": "tiny", "input": "Weather?", "tools": [STRICT], "max_output_tokens": 400}
    events = streamed(server.url, body)
    assert_indexes_agree(events)
    assert [json.loads(o["arguments"])["city"] for o in events[-1]["response"]["output"]] == ["Oslo", "Paris"]
    with client.responses.stream(**body) as stream:
        list(stream)
        got = stream.get_final_response()
    assert [o.parsed_arguments["city"] for o in got.output] == ["Oslo", "Paris"]


# ---- 2. text.format's name, metadata's limits -------------------------------------------------------------------
PLAIN = {"model": "tiny", "input": "hi", "max_output_tokens": 2}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "schema": SCHEMA}, "'name' is required"),
    ({"type": "json_schema", "name": "a b", "schema": SCHEMA}, "letters, digits, underscores and dashes"),
    ({"type": "json_schema", "name": "", "schema": SCHEMA}, "letters, digits, underscores and dashes"),
    ({"type": "json_schema", "name": "x" * 65, "schema": SCHEMA}, "at most 64"),
    ({"type": "json_schema", "name": "caf\u00e9", "schema": SCHEMA}, "letters, digits, underscores and dashes"),
])
def test_json_schema_name_is_checked(server, fmt, words):
    status, _, text = send(server.url, {**PLAIN, "text": {"format": fmt}})
    err = json.loads(text)["error"]
    assert status == 400 and words in err["message"] and err["param"] == "text.format.name", text


@pytest.mark.parametrize("metadata, param, words", [
    ({f"k{i}": "v" for i in range(17)}, "metadata", "at most 16"),
    ({"k" * 65: "v"}, "metadata", "at most 64 characters"),
    ({"k": "v" * 513}, "metadata.k", "at most 512 characters"),
])
def test_metadata_limits(server, metadata, param, words):
    status, _, text = send(server.url, {**PLAIN, "metadata": metadata})
    err = json.loads(text)["error"]
    assert status == 400 and words in err["message"] and err["param"] == param, text


def test_limits_themselves_are_served(server, client):
    """16 pairs, a 64-character key, a 512-character value, a 64-character name of every allowed character."""
    metadata = {"k" * 64: "v" * 512, **{f"k{i}": "v" for i in range(15)}}
    name = ("aZ09_-" * 11)[:64]
    r = client.responses.create(**PLAIN, metadata=metadata,
                                text={"format": {"type": "json_schema", "name": name, "schema": SCHEMA}})
    assert r.metadata == metadata and r.text.format.name == name


# ---- 3. count_tokens' fields -------------------------------------------------------------------------------------
HI = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 5), ("temperature", 0.5), ("temperature", float("nan")), ("top_p", 0.9), ("top_k", 5),
    ("stop_sequences", ["x"]), ("stream", True), ("metadata", {"user_id": "u"}), ("service_tier", "auto"),
    ("seed", 7), ("min_p", 0.1), ("speculative", "none"), ("guided_json", {"type": "object"}),
])
def test_count_tokens_refuses_what_it_does_not_read(server, field, value):
    status, _, text = send(server.url, {**HI, field: value}, COUNT)
    reply = json.loads(text)
    assert status == 400 and reply["type"] == "error", text
    if value != value:          # NaN's literal is not JSON: refused as such before any route reads the body
        assert reply["error"]["message"].startswith(f"{field} is NaN, which is not JSON"), text
        return
    assert f"'{field}'" in reply["error"]["message"] and "count_tokens" in reply["error"]["message"], text
    # /v1/messages takes it (but for the NaN, which it refuses as a bad value)
    if value == value:
        status, _, text = send(server.url, {**HI, "max_tokens": 2, field: value}, "/v1/messages")
        assert status == 200, text


def test_count_tokens_takes_what_the_sdk_sends(server):
    """Every field of the anthropic SDK's messages.count_tokens this server implements, and those it takes as
    hints: counted as before."""
    sdk = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=30)
    tools = [{"name": "get_time", "description": "The time.", "input_schema": {"type": "object", "properties": {}}}]
    n = sdk.messages.count_tokens(model="tiny", system="Be terse.", messages=HI["messages"], tools=tools,
                                  tool_choice={"type": "auto"}, thinking={"type": "disabled"},
                                  extra_body={"cache_control": {"type": "ephemeral"},
                                              "chat_template_kwargs": {}}).input_tokens
    assert n > 0
    # a bad value of a field it reads is still named before the field refusal
    status, _, text = send(server.url, {**HI, "system": 5, "temperature": 1}, COUNT)
    assert status == 400 and "system" in json.loads(text)["error"]["message"], text
