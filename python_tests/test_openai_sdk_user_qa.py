"""`amphista serve` driven as most users drive it: with the official OpenAI Python SDK (`openai`), on the embedded
SmolLM2 served in-process with an API key. Each answer the SDK parses is checked against engine.generate with the
same settings (or, for tool calls and structured outputs, parsed and validated as the SDK's helpers do); errors are
checked as the SDK's typed exceptions, with our message, param and code on them."""
from __future__ import annotations

import asyncio
import json
import warnings

import pytest

from conftest import needs_smollm2, relay, serving

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

KEY = "sk-amphista-sdk-test"
MODEL = "smollm2-135m"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class City(pydantic.BaseModel):
    name: str
    country: str


class Place(pydantic.BaseModel):     # the SDK's strict schema of it has $defs, a $ref and additionalProperties: false
    city: City
    capital: bool


@pytest.fixture(scope="module")
def served():
    """(engine, server, log lines): the embedded model behind an API key, on a free port."""
    from amphista_engine import Engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = Engine.from_pretrained(MODEL, device="cpu", max_seq_len=512)
        engine.load_heads("default")
    lines: list[str] = []
    with serving(engine, model_id=MODEL, api_key=KEY, log=lines.append, defaults=dict(max_new_tokens=32)) as httpd:
        yield engine, httpd, lines


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_list_and_retrieve(served, client):
    engine = served[0]
    assert [m.id for m in client.models.list()] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.owned_by == "amphista-engine" and model.max_model_len == engine.max_seq_len
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert "gpt-4o" in e.value.message and MODEL in e.value.message
    assert e.value.code == "model_not_found" and e.value.param == "model"


def test_chat_create_is_generate_and_max_completion_tokens_is_max_tokens(served, client):
    engine = served[0]
    ref = engine.generate(ASK, 12)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12)
    assert isinstance(reply, openai.types.chat.ChatCompletion)
    assert reply.choices[0].message.content == ref.text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length" and reply.model == MODEL
    assert reply.usage.prompt_tokens == len(ref.prompt_token_ids) and reply.usage.completion_tokens == 12
    again = client.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=12)
    assert again.choices[0].message.content == ref.text


def test_chat_stream_chunks_join_to_the_text_and_end_with_usage(served, client):
    engine = served[0]
    ref = engine.generate(ASK, 12)
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"
    # the SDK's stream helper: its events and the completion it assembles
    with client.chat.completions.stream(model=MODEL, messages=ASK, max_tokens=12, logprobs=True) as stream:
        kinds = {event.type for event in stream}
        snapshot = stream.current_completion_snapshot
    assert {"content.delta", "content.done", "logprobs.content.delta"} <= kinds
    assert snapshot.choices[0].message.content == ref.text
    assert "".join(t.token for t in snapshot.choices[0].logprobs.content) == ref.text


def test_n_seed_stop_and_logprobs(served, client):
    engine = served[0]
    settings = dict(temperature=0.9, seed=7)
    one = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, n=2, **settings)
    two = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, n=2, **settings)
    assert [c.index for c in one.choices] == [0, 1]
    assert [c.message.content for c in one.choices] == [c.message.content for c in two.choices]   # seeded
    assert one.usage.completion_tokens == 16
    greedy = engine.generate(ASK, 16).text
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    cut = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == greedy[:greedy.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].stop_reason == stop     # vLLM's extra field
    lp = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert "".join(t.token for t in content) == lp.choices[0].message.content == engine.generate(ASK, 6).text
    for t in content:       # greedy: each token is its position's most likely one
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.logprob >= t.top_logprobs[1].logprob
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8") == lp.choices[0].message.content


def test_extra_body_sampling_and_speculative_options_reach_the_engine(served, client):
    engine = served[0]
    settings = dict(temperature=0.8, top_k=5, min_p=0.05, repetition_penalty=1.3, seed=11)
    ref = engine.generate(ASK, 10, **settings)
    assert ref.token_ids != engine.generate(ASK, 10).token_ids      # it samples: the settings do something
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0.8, seed=11,
                                           extra_body=dict(top_k=5, min_p=0.05, repetition_penalty=1.3))
    assert reply.choices[0].message.content == ref.text
    spec = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10,
                                          extra_body={"speculative": "amphista"})
    assert spec.choices[0].message.content == engine.generate(ASK, 10).text      # greedy: the plain text
    assert spec.model_extra["amphista"]["speculative"] == "amphista"


def test_completions_strings_lists_echo_logprobs_and_stream(served, client):
    engine = served[0]
    prompts = ["The capital of France is", "One, two,"]
    refs = [engine.generate(p, 6, chat=False) for p in prompts]
    one = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=6)
    assert one.object == "text_completion" and one.choices[0].text == refs[0].text
    both = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6)
    assert [c.text for c in both.choices] == [r.text for r in refs] and [c.index for c in both.choices] == [0, 1]
    echo = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=6, echo=True, logprobs=2)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text == prompts[1] + refs[1].text == "".join(lp.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert all(len(top) in (2, 3) for top in lp.top_logprobs[1:])
    streamed = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == refs[1].text


def test_tool_calls_named_required_streamed_and_the_result_sent_back(served, client):
    reply = client.chat.completions.create(model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice=NAMED,
                                           max_tokens=40)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)
    required = client.chat.completions.create(model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, max_tokens=40)
    assert [(c.function.name, c.function.arguments) for c in required.choices[0].message.tool_calls] == \
        [(call.function.name, call.function.arguments)]
    # the stream's tool-call deltas, assembled as the SDK's docs show
    calls: dict = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice=NAMED,
                                                max_tokens=40, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.index not in calls:
                calls[delta.index] = delta
            else:
                calls[delta.index].function.arguments += delta.function.arguments
        finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls" and list(calls) == [0]
    assert (calls[0].function.name, calls[0].function.arguments) == (call.function.name, call.function.arguments)
    # the assistant's message object as the SDK gave it, then the tool's result
    follow = WEATHER + [choice.message, {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    answer = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, max_tokens=8)
    as_json = [WEATHER[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}
    ]}, follow[-1]]
    ref = client.chat.completions.create(model=MODEL, messages=as_json, tools=TOOLS, max_tokens=8)
    assert answer.choices[0].message.content == ref.choices[0].message.content
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
    # the result is in the prompt: the same turn without it is shorter by the result's tokens at least
    without = client.chat.completions.create(model=MODEL, messages=as_json[:2], tools=TOOLS, max_tokens=1)
    assert answer.usage.prompt_tokens > without.usage.prompt_tokens + 5
    # the SDK's strict pydantic tool, parsed by the SDK
    tool = openai.pydantic_function_tool(City, name="lookup_city")
    parsed = client.chat.completions.parse(model=MODEL, messages=WEATHER, tools=[tool], max_tokens=40,
                                           tool_choice={"type": "function", "function": {"name": "lookup_city"}})
    city = parsed.choices[0].message.tool_calls[0].function.parsed_arguments
    assert isinstance(city, City) and city.name and city.country


def test_structured_outputs_json_schema_and_the_sdks_parse(served, client):
    ask = [{"role": "user", "content": "Name a capital city as JSON."}]
    schema = {"name": "city", "strict": True, "schema": {**City.model_json_schema(), "additionalProperties": False}}
    raw = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=40,
                                         response_format={"type": "json_schema", "json_schema": schema})
    assert set(json.loads(raw.choices[0].message.content)) == {"name", "country"}
    assert City.model_validate_json(raw.choices[0].message.content).name
    parsed = client.chat.completions.parse(model=MODEL, messages=ask, max_tokens=60, response_format=Place)
    message = parsed.choices[0].message
    assert isinstance(message.parsed, Place) and message.parsed == Place.model_validate_json(message.content)
    with client.chat.completions.stream(model=MODEL, messages=ask, max_tokens=60, response_format=Place) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == message.parsed         # greedy: the same object streamed


def test_bad_requests_are_the_sdks_typed_errors_with_our_message(served, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=-1)
    assert e.value.status_code == 400 and e.value.param == "temperature" and "temperature" in e.value.message
    assert e.value.body == {"message": e.value.body["message"], "type": "invalid_request_error",
                            "param": "temperature", "code": None}
    long = [{"role": "user", "content": "hi " * 1000}]
    for stream in (False, True):       # a stream refused before its first chunk: a status too, raised by create
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=long, max_tokens=3, stream=stream)
        assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
        assert "longer than the cache" in e.value.message
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=served[1].url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert e.value.code == "invalid_api_key" and "sk-wrong" not in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=MODEL, input="hi")


def test_audio_output_is_refused_not_answered_without_it(client):
    # it was served as a text reply with message.audio None, as if the model had chosen not to speak
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, modalities=["text", "audio"],
                                       audio={"voice": "alloy", "format": "wav"})
    assert e.value.param in ("audio", "modalities") and "text only" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, modalities=["audio"])
    assert e.value.param == "modalities"
    text_only = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, modalities=["text"])
    assert text_only.choices[0].message.content


def test_a_server_bug_is_not_retried_by_the_sdk_and_mid_stream_errors_raise(served, monkeypatch):
    engine, httpd, _ = served
    real, runs = engine.stream_batch, []

    def broken(*args, **kwargs):
        runs.append(1)
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(engine, "stream_batch", broken)
    retrying = openai.OpenAI(base_url=httpd.url + "/v1", api_key=KEY, max_retries=2, timeout=60)
    with pytest.raises(openai.InternalServerError) as e:
        retrying.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3)
    assert len(runs) == 1          # the SDK retried every 5xx twice: the failing run was decoded three times
    assert "boom" in e.value.message and e.value.type == "server_error"
    assert e.value.response.headers["x-should-retry"] == "false"

    def boom(_):
        raise ZeroDivisionError("boom mid-stream")
    # after the run's first chunk: the headers are out, so the error can only be an event, which the SDK raises
    monkeypatch.setattr(engine, "stream_batch", lambda *args, **kwargs: relay(real(*args, **kwargs), after=boom))
    stream = retrying.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, stream=True)
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert "boom mid-stream" in e.value.message and e.value.body["type"] == "server_error"


def test_raw_response_timeouts_and_async_client(served, client):
    engine, httpd, lines = served
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=4)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("application/json")
    assert raw.parse().choices[0].message.content == engine.generate(ASK, 4).text
    hasty = openai.OpenAI(base_url=httpd.url + "/v1", api_key=KEY, max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        hasty.chat.completions.create(model=MODEL, messages=ASK, max_tokens=400, extra_body={"ignore_eos": True})
    # the server noticed the client leave, stopped decoding, and serves the next request
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4).choices[0].message.content == \
        engine.generate(ASK, 4).text
    assert any(" 499 " in line for line in lines)
    questions = ["Hi", "Name a color."]

    async def both():
        async with openai.AsyncOpenAI(base_url=httpd.url + "/v1", api_key=KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=6) for q in questions))
    replies = asyncio.run(both())
    assert [r.choices[0].message.content for r in replies] == \
        [engine.generate([{"role": "user", "content": q}], 6).text for q in questions]
