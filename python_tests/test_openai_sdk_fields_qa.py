"""QA of what the installed openai SDK's create / parse / stream methods can put in a request body, against
`amphista serve` on the tiny random model (and Anthropic's top-level cache_control on /v1/messages):

- /v1/responses refused fields and values the SDK sends that ask for nothing a local server lacks:
  prompt_cache_options (a caching hint), a top-level verbosity (responses.parse sends it there), reasoning's context
  and mode keys, reasoning.effort "max", service_tier "fast" / "ultrafast";
- /v1/chat/completions took web_search_options and moderation silently (a search, a moderation pass the answer
  lacked): now refused by name, as /v1/responses refuses moderation;
- the hints both routes take and ignore (user, prompt_cache_key, safety_identifier, service_tier, reasoning_effort,
  verbosity, prompt_cache_retention, prompt_cache_options, store, metadata, prediction) were not checked on the chat
  routes (a wrong type got a 200), nor prompt_cache_retention's value on /v1/responses: now 400s naming the field;
- /v1/messages took any top-level cache_control ("aaa" got a 200): now Anthropic's {"type": "ephemeral", "ttl"?}."""
from __future__ import annotations

import pytest

from conftest import serving
from test_serve import call, error_of

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread_module")

ASK = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def server(tiny_hf_dir):
    from amphista_engine import Engine
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    with serving(engine, model_id="tiny", quiet=True) as httpd:
        yield httpd


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def refused(fn, param: str, *words: str, **kw):
    with pytest.raises(openai.BadRequestError) as e:
        fn(**kw)
    assert e.value.status_code == 400 and e.value.param == param, (e.value.param, e.value.message)
    for w in (param.split(".")[0], *words):
        assert w in e.value.message, e.value.message
    return e.value


# ---- /v1/responses: what the SDK sends that asks for nothing ---------------------------------------------------
def test_responses_take_the_sdks_hints(client):
    """Each was a 400 ('not a field', 'has no key', 'must be one of')."""
    base = dict(model="tiny", input="The quick brown fox", max_output_tokens=2)
    for options in ({"ttl": "30m"}, {"ttl": "12h", "mode": "explicit", "comparison_response_id": "resp_1"},
                    {"prewarm": False}, None):
        assert client.responses.create(**base, prompt_cache_options=options).status in ("completed", "incomplete")
    parsed = client.responses.parse(**base, verbosity="low")
    assert parsed.text.verbosity == "low"
    reply = client.responses.create(**base, reasoning={"effort": "max", "context": "auto", "mode": "standard"})
    assert reply.reasoning.effort == "max"
    for tier in ("fast", "ultrafast"):
        assert client.responses.create(**base, service_tier=tier).service_tier == tier
    with client.responses.stream(**base, prompt_cache_options={"mode": "implicit"}) as stream:
        last = list(stream)[-1]     # cut: response.incomplete, which get_final_response() does not keep
    assert (last.type, last.response.status) in (("response.completed", "completed"),
                                                 ("response.incomplete", "incomplete"))


@pytest.mark.parametrize("name, value, param, word", [
    ("prompt_cache_retention", "forever", "prompt_cache_retention", "24h"),      # was a 200
    ("prompt_cache_options", "aaa", "prompt_cache_options", "object"),
    ("prompt_cache_options", {"ttl": "5m"}, "prompt_cache_options.ttl", "30m"),
    ("prompt_cache_options", {"prewarm": True}, "prompt_cache_options.prewarm", "answers every request"),
    ("prompt_cache_options", {"size": 1}, "prompt_cache_options.size", "ttl"),
    ("reasoning", {"context": "everything"}, "reasoning.context", "all_turns"),
    ("reasoning", {"mode": 5}, "reasoning.mode", "string"),
])
def test_responses_refuse_malformed_hints_by_name(client, name, value, param, word):
    refused(client.responses.create, param, word, model="tiny", input="Hi", max_output_tokens=2, **{name: value})


def test_responses_parse_names_a_bad_verbosity(client):
    refused(client.responses.parse, "verbosity", "'low'", model="tiny", input="Hi", max_output_tokens=2,
            verbosity="loud")


# ---- /v1/chat/completions and /v1/completions --------------------------------------------------------------------
def test_chat_refuses_web_search_and_moderation(client):
    """Both got a 200 with an answer no search or moderation had touched; null (the SDK's None) asks for nothing."""
    create = client.chat.completions.create
    refused(create, "web_search_options", "web search", model="tiny", messages=ASK, max_tokens=2,
            web_search_options={})
    refused(create, "moderation", "moderation is not supported", model="tiny", messages=ASK, max_tokens=2,
            moderation={"model": "omni-moderation-latest"})
    reply = create(model="tiny", messages=ASK, max_tokens=2, web_search_options=None, moderation=None)
    assert reply.choices[0].finish_reason in ("length", "stop")
    refused(client.completions.create, "moderation", model="tiny", prompt="Hi", max_tokens=2,
            extra_body={"moderation": {"model": "omni-moderation-latest"}})


def test_chat_takes_every_hint_the_sdk_sends(client):
    """Served as before (ignored): the answer is the one without them."""
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3)
    hinted = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=3, user="u1", prompt_cache_key="k", safety_identifier="s",
        service_tier="fast", reasoning_effort="max", verbosity="low", prompt_cache_retention="24h",
        prompt_cache_options={"ttl": "30m", "mode": "implicit"}, store=True, metadata={"run": "qa"},
        prediction={"type": "content", "content": [{"type": "text", "text": "jumps"}]}, parallel_tool_calls=True)
    assert hinted.choices[0].message.content == plain.choices[0].message.content
    with client.chat.completions.stream(model="tiny", messages=ASK, max_tokens=3, store=False,
                                        prediction={"type": "content", "content": "jumps"}) as stream:
        # (get_final_completion raises LengthFinishReasonError on an answer cut by max_tokens)
        text = "".join(event.delta for event in stream if event.type == "content.delta")
    assert text == plain.choices[0].message.content


@pytest.mark.parametrize("name, value, word", [
    ("user", 5, "string"), ("prompt_cache_key", ["k"], "string"), ("safety_identifier", {}, "string"),
    ("service_tier", "cheapest", "'flex'"), ("reasoning_effort", "extreme", "'xhigh'"), ("verbosity", 5, "'low'"),
    ("prompt_cache_retention", "forever", "'24h'"), ("store", "yes", "true or false"),
    ("metadata", "aaa", "string values"), ("metadata", {"a": 5}, "string values"),
    ("prompt_cache_options", "aaa", "object"), ("prediction", "jumps", "content"),
    ("prediction", {"type": "content", "content": 5}, "content"),
])
def test_chat_names_a_malformed_hint(client, name, value, word):
    """Each was a 200 (the field never read)."""
    refused(client.chat.completions.create, name, word, model="tiny", messages=ASK, max_tokens=2, **{name: value})


def test_completions_names_a_malformed_user(client):
    refused(client.completions.create, "user", "string", model="tiny", prompt="Hi", max_tokens=2, user=5)
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=2, user="u1").choices[0].text is not None


# ---- /v1/messages: top-level cache_control -----------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_anthropic_cache_control_is_checked(server, path):
    body = {"model": "tiny", "max_tokens": 2, "messages": ASK}
    if path.endswith("count_tokens"):
        del body["max_tokens"]
    for bad in ("aaa", {"type": "persistent"}, {"type": "ephemeral", "ttl": "2h"}, {"type": "ephemeral", "x": 1},
                {"ttl": "5m"}):
        status, reply = call(server.url, path, {**body, "cache_control": bad})
        assert status == 400 and reply["error"]["type"] == "invalid_request_error", reply
        assert "cache_control" in reply["error"]["message"] and "ephemeral" in reply["error"]["message"], reply
    for good in (None, {"type": "ephemeral"}, {"type": "ephemeral", "ttl": "1h"}):
        status, reply = call(server.url, path, {**body, "cache_control": good})
        assert status == 200, reply


def test_chat_null_fields_of_the_sdk_are_served(client):
    """Every chat.completions.create parameter as None (the SDK sends each as null): nothing refused."""
    import inspect
    from openai.resources.chat.completions import Completions
    given = {"model": "tiny", "messages": ASK, "max_tokens": 2}
    skip = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}
    nulls = {p: None for p in inspect.signature(Completions.create).parameters if p not in skip and p not in given}
    assert client.chat.completions.create(**given, **nulls).choices[0].finish_reason in ("length", "stop")


def test_error_of_is_the_servers_shape(server):
    """The refusals are OpenAI's error object (test_serve.error_of's shape), not a traceback."""
    error_of(call(server.url, "/v1/chat/completions", {"model": "tiny", "messages": ASK, "store": 1}), 400,
             "store", param="store")
