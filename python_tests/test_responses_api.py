"""`amphista serve`'s POST /v1/responses (OpenAI's Responses API, amphista_engine/serving/responses.py) on the
embedded SmolLM2 model, called with the openai SDK and over raw HTTP. Each answer is checked against what
/v1/chat/completions gives for the same messages: the Responses route maps its request onto the chat machinery and
must add a protocol, never other text."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from amphista_engine.errors import InputError
from conftest import needs_smollm2, serving

openai = pytest.importorskip("openai")
pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
TERSE, QUESTION = "You are terse.", "Name three prime numbers."
PARTS = ["Name three", "prime numbers."]      # joined by a newline, as the chat route joins text parts
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}
# the same tool in /v1/chat/completions' shape
WEATHER_CHAT = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
CITY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                         "population": {"type": "integer", "minimum": 0,
                                                        "maximum": 99999999}},
        "required": ["name", "population"], "additionalProperties": False}
STREAM_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                "response.content_part.done", "response.output_item.done", "response.completed"]


@pytest.fixture(scope="module")
def engine():
    from amphista_engine import Engine
    return Engine.from_pretrained("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine, model_id="smollm2", quiet=True) as httpd:
        yield httpd


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def call(url: str, path: str, body=None, method: str = "POST", headers: dict | None = None):
    """(status, parsed JSON reply) of one request, error statuses too."""
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        assert "Traceback" not in text, text
        return e.code, json.loads(text)


def events_of(text: str, numbered: bool = True) -> list[dict]:
    """A stream's named events (the Responses API's, Anthropic's), each checked: its SSE event name is its type;
    numbered: sequence numbers count up from 0 (the Responses API's)."""
    out = []
    assert text.endswith("\n\n"), text[-200:]
    for block in text.split("\n\n")[:-1]:
        head, data = block.split("\n")
        assert head.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data[len("data: "):])
        assert event["type"] == head[len("event: "):], block
        assert not numbered or event["sequence_number"] == len(out), event
        out.append(event)
    return out


def events(url: str, body: dict, path: str = RESPONSES) -> list[dict]:
    """The events of `body` streamed (events_of; numbered on /v1/responses)."""
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        return events_of(r.read().decode(), numbered=path == RESPONSES)


def chat_reply(url: str, messages: list, **options) -> dict:
    status, reply = call(url, CHAT, {"messages": messages, **options})
    assert status == 200, reply
    return reply


def test_text_is_the_chat_answer(server, client):
    """instructions + a string input, and the same as a developer message + input_text parts: the greedy answer
    and token counts are the chat route's for [system, user]; the response object carries OpenAI's fields."""
    asked = "\n".join(PARTS)
    chat = chat_reply(server.url, [{"role": "system", "content": TERSE}, {"role": "user", "content": asked}],
                      max_tokens=60)
    want = chat["choices"][0]["message"]["content"]
    one = client.responses.create(model="smollm2", instructions=TERSE, input=asked, max_output_tokens=60,
                                  metadata={"run": "a"}, user="u1", store=True, reasoning={"effort": "low"})
    two = client.responses.create(model="smollm2", max_output_tokens=60, input=[
        {"role": "developer", "content": TERSE},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": t}
                                                        for t in PARTS]}])
    assert want and one.output_text == two.output_text == want
    for r in (one, two):
        assert r.id.startswith("resp_") and r.object == "response" and r.model == "smollm2"
        assert r.usage.input_tokens == chat["usage"]["prompt_tokens"]
        assert r.usage.output_tokens == chat["usage"]["completion_tokens"]
        assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
        assert r.usage.output_tokens_details.reasoning_tokens == 0
        [item] = r.output
        assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
        assert [(c.type, c.text, c.annotations) for c in item.content] == [("output_text", want, [])]
        assert r.status == item.status == "completed" and r.incomplete_details is None
    finish = chat["choices"][0]["finish_reason"]
    assert finish == "stop", finish       # 60 tokens are enough: the status below is not "incomplete" by chance
    # the request's settings echoed; store=true is served with nothing stored, as vLLM without a store
    assert (one.instructions, one.metadata, one.user, one.max_output_tokens) == (TERSE, {"run": "a"}, "u1", 60)
    assert (one.store, one.temperature, one.top_p, one.reasoning.effort) == (False, 0.0, 1.0, "low")
    assert one.text.format.type == "text" and one.tools == [] and one.tool_choice == "auto"


def test_stream_joins_to_the_answer(server, client):
    """Streamed (SDK's responses.stream and raw SSE): the events in OpenAI's order, the deltas joined are the
    non-streamed text, and response.completed carries the same response."""
    body = {"model": "smollm2", "input": QUESTION, "max_output_tokens": 20}      # its answer ends at 16
    whole = client.responses.create(**body)
    with client.responses.stream(**body) as stream:
        seen = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in seen if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text == final.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens and final.status == "completed"
    raw = events(server.url, body)
    kinds = [e["type"] for e in raw]
    assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == STREAM_ORDER
    done = raw[-1]["response"]
    assert done["output"][0]["content"][0]["text"] == whole.output_text
    assert raw[0]["response"]["status"] == "in_progress" and raw[0]["response"]["id"] == done["id"]
    # each item's id is the same in its events and in the final output
    assert {e["item"]["id"] for e in raw if e["type"].startswith("response.output_item")} == {done["output"][0]["id"]}
    # create(stream=True) is the same stream, as the SDK's typed events
    typed = list(client.responses.create(**body, stream=True))
    assert "".join(e.delta for e in typed if e.type == "response.output_text.delta") == whole.output_text


def test_cut_by_max_output_tokens_is_incomplete(server, client):
    r = client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"
    chat = chat_reply(server.url, [{"role": "user", "content": QUESTION}], max_tokens=3)
    assert r.output_text == chat["choices"][0]["message"]["content"]
    done = events(server.url, {"input": QUESTION, "max_output_tokens": 3})[-1]
    assert done["type"] == "response.incomplete" and done["response"]["status"] == "incomplete"
    assert done["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_json_schema_answer_validates(server, client):
    """text.format json_schema holds the answer to the schema (the chat route's response_format), and the SDK's
    responses.parse reads it into its pydantic model."""
    from pydantic import BaseModel, Field

    fmt = {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}
    r = client.responses.create(model="smollm2", input="Describe Paris.", text={"format": fmt},
                                max_output_tokens=60)
    assert r.status == "completed"
    answer = json.loads(r.output_text)
    assert set(answer) == {"name", "population"} and isinstance(answer["name"], str)
    assert len(answer["name"]) <= 20 and isinstance(answer["population"], int)
    assert 0 <= answer["population"] <= 99999999
    chat = chat_reply(server.url, [{"role": "user", "content": "Describe Paris."}], max_tokens=60,
                      response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY,
                                                                              "strict": True}})
    assert r.output_text == chat["choices"][0]["message"]["content"]
    assert r.text.format.type == "json_schema" and r.text.format.name == "city"

    class City(BaseModel):      # bounded as CITY is: unbounded, SmolLM2 writes digits until max_output_tokens
        name: str = Field(max_length=20)
        population: int = Field(ge=0, le=99999999)

    parsed = client.responses.parse(model="smollm2", input="Describe Paris.", text_format=City,
                                    max_output_tokens=60)
    assert isinstance(parsed.output_parsed, City) and parsed.output_parsed.name
    # json_object: any JSON object
    r = client.responses.create(model="smollm2", input="Describe Paris as JSON.", max_output_tokens=40,
                                text={"format": {"type": "json_object"}})
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)
    else:
        assert r.output_text.lstrip().startswith("{")


def test_tool_call_round_trip(server, client):
    """A named function: a function_call item (call_id, name, JSON arguments valid under the schema), streamed as
    its arguments' deltas; sent back with its function_call_output (the SDK's output items as input), the prompt
    is the chat route's [user, assistant tool_calls, tool] and the answer the same."""
    ask = [{"role": "user", "content": "What is the weather in Paris for the next 2 days?"}]
    r1 = client.responses.create(model="smollm2", input=ask, tools=[WEATHER], max_output_tokens=60,
                                 tool_choice={"type": "function", "name": "get_weather"})
    [fc] = r1.output
    assert fc.type == "function_call" and fc.name == "get_weather" and fc.status == "completed"
    assert fc.call_id.startswith("call_") and fc.id.startswith("fc_") and r1.output_text == ""
    args = json.loads(fc.arguments)
    assert args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7 and set(args) == {"city", "days"}
    # streamed: the call's argument deltas join to the same arguments
    raw = events(server.url, {"input": ask, "tools": [WEATHER], "max_output_tokens": 60,
                              "tool_choice": {"type": "function", "name": "get_weather"}})
    kinds = [e["type"] for e in raw]
    assert "response.output_text.delta" not in kinds and "response.function_call_arguments.done" in kinds
    added = next(e["item"] for e in raw if e["type"] == "response.output_item.added")
    assert added["type"] == "function_call" and added["name"] == "get_weather"
    streamed = "".join(e["delta"] for e in raw if e["type"] == "response.function_call_arguments.delta")
    assert streamed == fc.arguments == raw[-1]["response"]["output"][0]["arguments"]
    assert raw[-1]["response"]["output"][0]["call_id"] == added["call_id"]

    result = "Sunny, 21 C."
    r2 = client.responses.create(model="smollm2", tools=[WEATHER], tool_choice="none", max_output_tokens=30,
                                 input=[*ask, *r1.output, {"type": "function_call_output", "call_id": fc.call_id,
                                                           "output": result}])
    messages = [*ask, {"role": "assistant", "content": None, "tool_calls": [
        {"id": fc.call_id, "type": "function", "function": {"name": fc.name, "arguments": fc.arguments}}]},
        {"role": "tool", "tool_call_id": fc.call_id, "content": result}]
    chat = chat_reply(server.url, messages, tools=[WEATHER_CHAT], tool_choice="none", max_tokens=30)
    status, tokens = call(server.url, "/tokenize", {"messages": messages, "tools": [WEATHER_CHAT]})
    assert status == 200 and r2.usage.input_tokens == chat["usage"]["prompt_tokens"] == tokens["count"]
    assert r2.output_text == chat["choices"][0]["message"]["content"] and r2.output_text
    # a result as input_text parts reads as the same tool message
    r3 = client.responses.create(model="smollm2", tools=[WEATHER], tool_choice="none", max_output_tokens=30,
                                 input=[*ask, {"type": "function_call", "call_id": fc.call_id, "name": fc.name,
                                               "arguments": fc.arguments},
                                        {"type": "function_call_output", "call_id": fc.call_id,
                                         "output": [{"type": "input_text", "text": result}]}])
    assert r3.output_text == r2.output_text and r3.usage.input_tokens == r2.usage.input_tokens


def test_parallel_calls_cut_by_max_output_tokens(server, client):
    """"required", cut inside the second call: the non-streamed response holds the whole call (the SDK's parse()
    reads every strict call a response holds: a cut one is left out). Under the calls' grammar a strict tool's calls
    stream as they decode: the stream announces the cut one too, and its response.incomplete (which the SDK does not
    parse) keeps it where it was announced, as incomplete, after the whole one."""
    body = dict(model="smollm2", input="Weather in Paris and Oslo?", max_output_tokens=60, tool_choice="required",
                tools=[{**WEATHER, "strict": True}])
    whole = client.responses.create(**body)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    calls = [(o.name, json.loads(o.arguments)) for o in whole.output]
    assert len(calls) == 1 and all(o.type == "function_call" and o.status == "completed" for o in whole.output)
    with client.responses.stream(**body) as stream:
        seen = list(stream)
    # an incomplete stream ends with response.incomplete, whose response the SDK's get_final_response() does not keep
    done = [e.item for e in seen if e.type == "response.output_item.done"]
    final = seen[-1].response
    assert seen[-1].type == "response.incomplete" and final.status == "incomplete"
    assert [o.status for o in final.output] == ["completed", "incomplete"], final.output
    assert [(o.name, json.loads(o.arguments)) for o in final.output[:1]] == calls
    assert [d.id for d in done] == [o.id for o in final.output], done
    assert [e.output_index for e in seen if e.type == "response.output_item.added"] == [0, 1]


def stream_events(client, body: dict, kind: str) -> list:
    with client.responses.stream(**body) as stream:
        return [e for e in stream if e.type == kind]


@pytest.mark.parametrize("body, param, words", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "input"),
    ({"input": "hi", "max_tokens": 5}, "max_tokens", "max_output_tokens"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "stores no responses"),
    ({"input": "hi", "frobnicate": 1}, "frobnicate", "not a field"),
    ({"input": "hi", "background": True}, "background", "background"),
    ({"input": "hi", "background": 0}, "background", "background"),
    ({"input": "hi", "include": ["message.output_text.logprobs"]}, "include", "include"),
    ({"input": "hi", "top_logprobs": 3}, "top_logprobs", "top_logprobs"),
    ({"input": "hi", "truncation": "auto"}, "truncation", "truncation"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools", "'web_search'"),
    ({"input": "hi", "tools": [WEATHER_CHAT]}, "tools", "flat"),
    ({"input": "hi", "tools": [{**WEATHER, "name": "bad name"}]}, "tools", "tools[0].name must be"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice", "file_search"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format", "text.format must be"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "schema"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
     "text.format", "text.format"),
    ({"input": "hi", "tools": [WEATHER], "text": {"format": {"type": "json_object"}}}, "text.format",
     "text.format does not mix with tools"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "positive integer"),
    ({"input": "hi", "temperature": "hot"}, "temperature", "temperature"),
    ({"input": "hi", "speculative": "fast"}, "speculative", "speculative"),
    ({}, "input", "required"),
    ({"input": []}, "input", "non-empty"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:"}]}]},
     "input[0].content", "'input_image' parts are not supported"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "'developer'"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "item references"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]}, "input[0].arguments",
     "not valid JSON"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id", "must be a string"),
    ({"input": "hi", "metadata": {"n": 1}}, "metadata", "string values"),
])
def test_bad_fields_are_400s_naming_them(server, body, param, words):
    status, reply = call(server.url, RESPONSES, body)
    assert status == 400, reply
    err = reply["error"]
    assert err["param"] == param and words in err["message"], err
    # said in the Responses API's names, not the chat route's it maps onto
    assert "response_format" not in err["message"] and "messages[" not in err["message"], err


def test_prompt_past_the_context_names_input(server):
    status, reply = call(server.url, RESPONSES, {"input": "seven " * 4000, "max_output_tokens": 4})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
    assert reply["error"]["param"] == "input"


def test_routes_and_metrics(server):
    """/responses without /v1 too, as the other routes; GET is a 405; /metrics counts the endpoint."""
    status, reply = call(server.url, "/responses", {"input": "Hi", "max_output_tokens": 2})
    assert status == 200 and reply["object"] == "response", reply
    status, reply = call(server.url, RESPONSES, method="GET")
    assert status == 405 and "takes POST" in reply["error"]["message"]
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    assert 'amphista_requests_total{endpoint="/v1/responses"}' in text


def test_error_mid_stream_is_an_error_event(server, client, monkeypatch):
    """An error once events went out: the Responses API's error event (type "error", its sequence number, the
    message), on which the SDK raises, and the stream ends."""
    class Failing:
        def feed(self, piece):
            raise InputError("the answer could not be read (test)")

    monkeypatch.setattr(server.app, "reasoning_splitter", lambda job, plan=None: Failing())
    raw = events(server.url, {"input": QUESTION, "max_output_tokens": 8})
    assert [e["type"] for e in raw][:2] == ["response.created", "response.in_progress"]
    error = raw[-1]
    assert error["type"] == "error" and "could not be read" in error["message"], error
    with pytest.raises(openai.APIError, match="could not be read"):
        list(client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=8, stream=True))


def test_reasoning_parser_gives_a_reasoning_item(server, monkeypatch):
    """With --reasoning-parser deepseek_r1 (all before </think> is reasoning: SmolLM2 writes none, so all of it),
    the answer is a reasoning item, its text the chat route's reasoning_content, streamed as reasoning_text
    deltas; without a message, output_text is empty."""
    # the server's parser, as `amphista serve --reasoning-parser deepseek_r1` sets it (one engine: one server at a time)
    monkeypatch.setattr(server.app, "reasoning_parser", "deepseek_r1")
    chat = chat_reply(server.url, [{"role": "user", "content": QUESTION}], max_tokens=12)
    status, r = call(server.url, RESPONSES, {"input": QUESTION, "max_output_tokens": 12})
    raw = events(server.url, {"input": QUESTION, "max_output_tokens": 12})
    assert status == 200, r
    thought = chat["choices"][0]["message"]["reasoning_content"]
    [item] = r["output"]
    assert item["type"] == "reasoning" and item["id"].startswith("rs_")
    assert item["content"] == [{"type": "reasoning_text", "text": thought}] and thought
    assert r["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    assert "".join(e["delta"] for e in raw if e["type"] == "response.reasoning_text.delta") == thought
    assert raw[-1]["response"]["output"][0]["content"][0]["text"] == thought
    assert openai.types.responses.Response.model_validate(r).output_text == ""
