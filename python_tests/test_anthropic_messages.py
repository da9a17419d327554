"""`amphista serve`'s POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API,
amphista_engine/serving/anthropic_messages.py) on the embedded SmolLM2 model, called with the anthropic SDK and
over raw HTTP. Each answer is checked against what /v1/chat/completions gives for the same conversation: the route
maps its request onto the chat machinery and must add a protocol, never other text."""
from __future__ import annotations

import json
import urllib.request

import pytest

from amphista_engine.errors import InputError
from conftest import needs_smollm2, serving
from test_responses_api import call, chat_reply, engine, events as streamed  # noqa: F401  (engine: the fixture)

anthropic = pytest.importorskip("anthropic")
pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
TERSE, QUESTION = "You are terse.", "Name three prime numbers."
PARTS = ["Name three", "prime numbers."]      # text blocks: joined by a newline, as the chat route joins text parts
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                             "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                            "required": ["city", "days"], "additionalProperties": False}}
# the same tool in /v1/chat/completions' shape
WEATHER_CHAT = {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                 "parameters": WEATHER["input_schema"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 2 days?"}]


@pytest.fixture(scope="module")
def server(engine):  # noqa: F811
    with serving(engine, model_id="smollm2", quiet=True) as httpd:
        yield httpd


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)


def events(url: str, body: dict) -> list[tuple[str, dict]]:
    """A streamed message's (event name, data) pairs, each data's type its event's name."""
    return [(event["type"], event) for event in streamed(url, body, MESSAGES)]


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_text_is_the_chat_answer(server, client):
    """system + a string message, and the same as text blocks: the greedy answer and token counts are the chat
    route's for [system, user]; the message carries Anthropic's fields; count_tokens is its input_tokens."""
    asked = "\n".join(PARTS)
    chat = chat_reply(server.url, [{"role": "system", "content": TERSE}, {"role": "user", "content": asked}],
                      max_tokens=60)
    want = chat["choices"][0]["message"]["content"]
    assert chat["choices"][0]["finish_reason"] == "stop"      # 60 tokens are enough: end_turn is not by chance
    one = client.messages.create(model="smollm2", max_tokens=60, system=TERSE, metadata={"user_id": "u1"},
                                 messages=[{"role": "user", "content": asked}])
    two = client.messages.create(model="smollm2", max_tokens=60, system=[{"type": "text", "text": TERSE}],
                                 messages=[{"role": "user", "content": [{"type": "text", "text": t} for t in PARTS]}],
                                 extra_body={"temperature": 0, "top_k": 0})
    assert want and text_of(one) == text_of(two) == want
    for m in (one, two):
        assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == "smollm2"
        assert [b.type for b in m.content] == ["text"]
        assert (m.stop_reason, m.stop_sequence) == ("end_turn", None)
        assert m.usage.input_tokens == chat["usage"]["prompt_tokens"]
        assert m.usage.output_tokens == chat["usage"]["completion_tokens"]
        assert m.usage.cache_read_input_tokens == 0
    counted = client.messages.count_tokens(model="smollm2", system=TERSE, messages=[{"role": "user", "content": asked}])
    assert counted.input_tokens == one.usage.input_tokens
    # Anthropic's prefill: a last assistant turn is continued, as the chat route's continue_final_message
    prefill = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "The first one is"}]
    cont = chat_reply(server.url, prefill, max_tokens=8, continue_final_message=True, add_generation_prompt=False)
    m = client.messages.create(model="smollm2", max_tokens=8, messages=prefill)
    assert text_of(m) == cont["choices"][0]["message"]["content"] and m.stop_reason == "max_tokens"
    assert client.messages.count_tokens(model="smollm2", messages=prefill).input_tokens == m.usage.input_tokens


def test_stream_joins_to_the_answer(server, client):
    """Streamed (the SDK's messages.stream and raw SSE): Anthropic's events in order, the text deltas joined are the
    non-streamed text, and get_final_message() is the non-streamed message but for its id."""
    body = dict(model="smollm2", max_tokens=30, system=TERSE, messages=[{"role": "user", "content": QUESTION}])
    whole = client.messages.create(**body)
    with client.messages.stream(**body) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(deltas) > 1 and "".join(deltas) == text_of(whole)
    assert final.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id", "amphista"})
    raw = events(server.url, body)
    kinds = [k for k, _ in raw]
    assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop"]
    start = raw[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == whole.usage.input_tokens
    assert raw[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert "".join(e["delta"]["text"] for k, e in raw if k == "content_block_delta") == text_of(whole)
    end = raw[-2][1]
    assert end["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert end["usage"]["output_tokens"] == whole.usage.output_tokens
    # create(stream=True) is the same stream, as the SDK's typed events
    typed = list(client.messages.create(**body, stream=True))
    assert "".join(e.delta.text for e in typed if e.type == "content_block_delta") == text_of(whole)


def test_stop_sequences_and_max_tokens(server, client):
    """A stop sequence that ends the greedy answer: stop_reason "stop_sequence" with the string (streamed too), the
    text the chat route's with that stop; cut by max_tokens: "max_tokens"."""
    body = dict(model="smollm2", max_tokens=30, system=TERSE, messages=[{"role": "user", "content": QUESTION}])
    whole = text_of(client.messages.create(**body))
    stop = next(c for c in whole[8:] if c.isdigit())     # one the answer holds: it ends there
    m = client.messages.create(**body, stop_sequences=["zebra", stop])
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop)
    assert text_of(m) == whole[:whole.index(stop, 8)]
    chat = chat_reply(server.url, [{"role": "system", "content": TERSE}, {"role": "user", "content": QUESTION}],
                      max_tokens=30, stop=["zebra", stop])
    assert text_of(m) == chat["choices"][0]["message"]["content"]
    with client.messages.stream(**body, stop_sequences=["zebra", stop]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, text_of(final)) == ("stop_sequence", stop, text_of(m))
    cut = client.messages.create(**{**body, "max_tokens": 3})
    assert (cut.stop_reason, cut.stop_sequence, cut.usage.output_tokens) == ("max_tokens", None, 3)


def test_tool_use_round_trip(server, client):
    """A named tool: a tool_use block (toolu_ id, name, input an object valid under the schema), streamed as
    input_json deltas; sent back with its tool_result, the prompt is the chat route's [user, assistant tool_calls,
    tool] and the answer the same; count_tokens counts that prompt."""
    r1 = client.messages.create(model="smollm2", max_tokens=60, messages=ASK, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"})
    [use] = r1.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    assert r1.stop_reason == "tool_use"
    assert use.input["city"] in ("Paris", "Oslo") and 1 <= use.input["days"] <= 7 and set(use.input) == {"city",
                                                                                                           "days"}
    raw = events(server.url, {"messages": ASK, "tools": [WEATHER], "max_tokens": 60,
                              "tool_choice": {"type": "tool", "name": "get_weather"}})
    start = raw[1][1]["content_block"]
    assert (start["type"], start["name"], start["input"]) == ("tool_use", "get_weather", {})
    partial = "".join(e["delta"]["partial_json"] for k, e in raw if k == "content_block_delta")
    assert json.loads(partial) == use.input and raw[-2][1]["delta"]["stop_reason"] == "tool_use"

    result = "Sunny, 21 C."
    turns = [*ASK, {"role": "assistant", "content": r1.content},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result}]}]
    r2 = client.messages.create(model="smollm2", max_tokens=30, messages=turns, tools=[WEATHER],
                                tool_choice={"type": "none"})
    call_id = use.id.removeprefix("toolu_")
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": result}]
    chat = chat_reply(server.url, messages, tools=[WEATHER_CHAT], tool_choice="none", max_tokens=30)
    status, tokens = call(server.url, "/tokenize", {"messages": messages, "tools": [WEATHER_CHAT]})
    assert status == 200 and r2.usage.input_tokens == chat["usage"]["prompt_tokens"] == tokens["count"]
    assert text_of(r2) == chat["choices"][0]["message"]["content"] and text_of(r2)
    assert client.messages.count_tokens(model="smollm2", messages=turns, tools=[WEATHER],
                                        tool_choice={"type": "none"}).input_tokens == r2.usage.input_tokens
    # a result as text blocks reads as the same tool message; an error result says so in its text
    blocks = [*turns[:2], {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                        "content": [{"type": "text", "text": result}]}]}]
    assert client.messages.count_tokens(model="smollm2", messages=blocks, tools=[WEATHER],
                                        tool_choice={"type": "none"}).input_tokens == r2.usage.input_tokens
    failed = [*turns[:2], {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                        "content": "no such city", "is_error": True}]}]
    errored = [*messages[:2], {"role": "tool", "tool_call_id": call_id, "content": "Error: no such city"}]
    status, tokens = call(server.url, "/tokenize", {"messages": errored, "tools": [WEATHER_CHAT]})
    assert client.messages.count_tokens(model="smollm2", messages=failed, tools=[WEATHER]).input_tokens == \
        tokens["count"]


@pytest.mark.parametrize("body, words", [
    ({"frobnicate": 1}, "'frobnicate' is not a field"),
    ({"stop": ["x"]}, "send stop_sequences"),
    ({"max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"stop_sequences": "x"}, "stop_sequences must be a list"),
    ({"temperature": "hot"}, "temperature"),
    ({"speculative": "fast"}, "speculative"),
    ({"container": "c1"}, "container"),
    ({"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "mcp_servers"),
    ({"output_config": {"effort": "low"}}, "output_config"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "--reasoning-parser"),
    ({"messages": []}, "non-empty"),
    ({"messages": [{"role": "system", "content": "x"}]}, "top-level system field"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type":
                                                                             "image/png", "data": "AA=="}}]}]},
     "messages[0].content[0]: 'image' blocks are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "'document' blocks"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "belong in an assistant message"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}]},
                   {"role": "user", "content": "hi"}]}, "messages[0].content[0].input must be an object"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
     "messages[0].content[0].tool_use_id must be a string"),
    ({"system": [{"type": "image"}]}, "system[0] must be a text block"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
    ({"tools": [WEATHER_CHAT]}, "OpenAI's shape"),
    ({"tools": [{**WEATHER, "name": "bad name"}]}, "tools[0].name must be"),
    ({"tools": [{"name": "f"}]}, "tools[0].input_schema must be"),
    ({"tool_choice": {"type": "any"}}, "tool_choice {\"type\": \"any\"} needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "names the tool 'nope'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "required"}}, "tool_choice must be"),
    ({"metadata": {"user_id": 5}}, "metadata must be an object"),
    ({"messages": [{"role": "user", "content": "seven " * 4000}]}, "longer than the cache"),
])
def test_bad_fields_are_bad_requests_naming_them(client, body, words):
    """The SDK raises BadRequestError on Anthropic's error object, whose message names the field, in the Messages
    API's names (not the chat route's it maps onto)."""
    request = {"model": "smollm2", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    known = {k: body[k] for k in body if k in ("messages", "max_tokens", "system", "tools", "tool_choice",
                                               "metadata", "stop_sequences", "thinking", "container",
                                               "output_config")}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(**{**request, **known}, extra_body={k: v for k, v in body.items() if k not in known})
    err = info.value.body
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", err
    message = err["error"]["message"]
    assert words in message, message
    assert "function." not in message and "'required'" not in message and "messages[" not in message.replace(
        "messages[0]", ""), message


def test_max_tokens_is_required_on_messages_only(server):
    status, reply = call(server.url, MESSAGES, {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and reply["type"] == "error", reply
    assert "'max_tokens' is a required field" in reply["error"]["message"]
    status, reply = call(server.url, MESSAGES + "/count_tokens", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and reply["input_tokens"] > 0, reply


def test_api_key_as_x_api_key(server, client, monkeypatch):
    """With an API key, the SDK's x-api-key header carries it (a Bearer token still does); a wrong or missing one is
    an AuthenticationError in Anthropic's shape."""
    monkeypatch.setattr(server.app, "_api_key", b"sk-ant-test")     # as `amphista serve --api-key sk-ant-test`
    body = dict(model="smollm2", messages=[{"role": "user", "content": "hi"}])
    good = anthropic.Anthropic(base_url=server.url, api_key="sk-ant-test", max_retries=0)
    assert good.messages.count_tokens(**body).input_tokens > 0
    assert call(server.url, MESSAGES + "/count_tokens", body, headers={"x-api-key": "sk-ant-test"})[0] == 200
    assert call(server.url, MESSAGES + "/count_tokens", body,
                headers={"Authorization": "Bearer sk-ant-test"})[0] == 200
    with pytest.raises(anthropic.AuthenticationError) as info:
        anthropic.Anthropic(base_url=server.url, api_key="sk-ant-wrong", max_retries=0).messages.count_tokens(**body)
    err = info.value.body
    assert err["type"] == "error" and err["error"]["type"] == "authentication_error", err
    # (anthropic 1.x sends the key as x-api-key, 2.x as a Bearer token: the message names the header it came in)
    assert "is not this server's key" in err["error"]["message"]
    assert "sk-ant-wrong" not in json.dumps(err)
    status, reply = call(server.url, MESSAGES + "/count_tokens", body, headers={"x-api-key": "sk-ant-wrong"})
    assert status == 401 and "x-api-key header is not this server's key" in reply["error"]["message"], reply
    status, reply = call(server.url, MESSAGES, {**body, "max_tokens": 5})
    assert status == 401 and reply["error"]["type"] == "authentication_error", reply
    assert "requires an API key" in reply["error"]["message"] and "x-api-key" in reply["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(max_tokens=5, **body)


def test_routes_metrics_and_not_found(server, client):
    """GET is a 405 and an unknown path under /v1/messages/ a 404, both in Anthropic's shape (NotFoundError);
    /metrics counts the endpoints."""
    status, reply = call(server.url, MESSAGES, method="GET")
    assert status == 405 and reply["type"] == "error" and "takes POST" in reply["error"]["message"], reply
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.batches.list()
    assert info.value.body["error"]["type"] == "not_found_error"
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    assert 'amphista_requests_total{endpoint="/v1/messages"}' in text
    assert 'amphista_requests_total{endpoint="/v1/messages/count_tokens"}' in text


def test_error_mid_stream_is_an_error_event(server, client, monkeypatch):
    """An error once events went out: Anthropic's error event, on which the SDK raises, and the stream ends."""
    class Failing:
        def feed(self, piece):
            raise InputError("the answer could not be read (test)")

    monkeypatch.setattr(server.app, "reasoning_splitter", lambda job, plan=None: Failing())
    raw = events(server.url, {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8})
    assert raw[0][0] == "message_start" and raw[-1][0] == "error", raw
    assert raw[-1][1]["error"]["type"] == "invalid_request_error"
    assert "could not be read" in raw[-1][1]["error"]["message"]
    with pytest.raises(anthropic.APIStatusError, match="could not be read"):
        with client.messages.stream(model="smollm2", max_tokens=8,
                                    messages=[{"role": "user", "content": QUESTION}]) as stream:
            list(stream.text_stream)


def test_thinking_with_a_reasoning_parser(server, client, monkeypatch):
    """With --reasoning-parser deepseek_r1 (all before </think> is reasoning: SmolLM2 writes none, so all of it),
    thinking enabled gives a thinking block, its text the chat route's reasoning_content, streamed as thinking
    deltas; a thinking block sent back is the assistant turn's reasoning_content."""
    monkeypatch.setattr(server.app, "reasoning_parser", "deepseek_r1")
    chat = chat_reply(server.url, [{"role": "user", "content": QUESTION}], max_tokens=12)
    thought = chat["choices"][0]["message"]["reasoning_content"]
    body = dict(model="smollm2", max_tokens=12, messages=[{"role": "user", "content": QUESTION}],
                thinking={"type": "enabled", "budget_tokens": 1024})
    m = client.messages.create(**body)
    assert [(b.type, b.thinking) for b in m.content] == [("thinking", thought)] and thought
    with client.messages.stream(**body) as stream:
        seen = [e.thinking for e in stream if e.type == "thinking"]
        final = stream.get_final_message()
    assert "".join(seen) == thought and final.content[0].thinking == thought
    back = [{"role": "user", "content": QUESTION},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "Primes.", "signature": "s"},
                                              {"type": "text", "text": "2, 3, 5."}]},
            {"role": "user", "content": "More?"}]
    status, tokens = call(server.url, "/tokenize", {"messages": [
        back[0], {"role": "assistant", "content": "2, 3, 5.", "reasoning_content": "Primes."}, back[2]]})
    assert client.messages.count_tokens(model="smollm2", messages=back).input_tokens == tokens["count"]
