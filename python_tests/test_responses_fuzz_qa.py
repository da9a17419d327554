"""Adversarial QA of `amphista serve`'s POST /v1/responses (serving/responses.py) on the tiny random model: a seeded
sweep of the request's fields and input items (wrong types, nulls, huge and non-finite numbers, nesting, lone
surrogates) where every refusal must be a 400 naming its field and no request may poison the next; scripted answers
(reasoning, text and tool calls, cut anywhere, with and without stops) whose stream must be well-formed, end with
the non-streamed response and agree with /v1/chat/completions; the openai SDK's round trips; a client that leaves
mid-stream; /metrics and usage against the chat route. The cases that found bugs are kept as regression tests."""
from __future__ import annotations

import copy
import http.client
import json
import os
import random
import re
import socket
import time
import urllib.request
from urllib.parse import urlsplit

import pytest

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")

from conftest import edited_copy, relay, serving           # noqa: E402
from test_responses_api import events_of                   # noqa: E402
from test_serve import call, error_of                      # noqa: E402
from test_tool_streaming import scripted                   # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

RESPONSES, CHAT = "/v1/responses", "/v1/chat/completions"
SEED = int(os.environ.get("AMPHISTA_FUZZ_SEED", "1729"))
CASES = int(os.environ.get("AMPHISTA_FUZZ_CASES", "100"))
TIMEOUT = 30                 # s: a reply that takes longer counts as a hang
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["city", "days"]}}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
TOOLS = [WEATHER, TIME]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
PLAIN = {"model": "tiny", "input": "The quick brown fox", "max_output_tokens": 5}


def CALL(city: str) -> str:
    return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s", "days": 2}}\n</tool_call>' % city


# a block whose call goes out by name, then breaks (a brace too many): no call of the reply's
BROKEN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": 5}}}\n</tool_call>'


@pytest.fixture(scope="module")
def server(tiny_hf_dir, tmp_path_factory):
    """The tiny model (room for the tools' prompts: ~1 token per character) served with --reasoning-parser qwen3."""
    from amphista_engine import Engine
    path = edited_copy(tiny_hf_dir, tmp_path_factory.mktemp("responses_tiny") / "m", {"max_position_embeddings": 2048})
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=2048)
    with serving(engine, model_id="tiny", reasoning_parser="qwen3", quiet=True) as httpd:
        yield httpd


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def send(url, body: dict | bytes, path=RESPONSES) -> tuple[int, str, str]:
    """(status, content type, text) over a fresh connection, with a timeout."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read().decode("utf-8")
    except TimeoutError:
        raise AssertionError(f"no reply in {TIMEOUT} s (a hang) to {raw[:300]!r}") from None
    except ConnectionError as e:
        raise AssertionError(f"no reply ({e!r}) to {raw[:300]!r}") from None
    finally:
        conn.close()


def check_events(events: list[dict]):
    """The stream's shape: created, in_progress, each item added once and done once, its events naming it by
    output_index and item_id, its deltas joined its done text; response.completed last, its output the done items
    in the order added (less calls done as incomplete: no calls of the reply's)."""
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"], events[:2]
    assert events[-1]["type"] == ("response.incomplete" if events[-1]["response"]["status"] == "incomplete"
                                  else "response.completed"), events[-1]
    rid = events[0]["response"]["id"]
    assert all(e["response"]["id"] == rid for e in events if "response" in e)
    added, done, text = {}, {}, {}
    for e in events[2:-1]:
        kind, index = e["type"], e.get("output_index")
        if kind == "response.output_item.added":
            assert index == len(added) and e["item"]["status"] == "in_progress", e
            added[index] = e["item"]
            continue
        assert index in added and index not in done, e
        item_id = e["item"]["id"] if "item" in e else e["item_id"]
        assert item_id == added[index]["id"], e
        if "content_index" in e:
            assert e["content_index"] == 0, e
        if kind.endswith(".delta"):
            text[index] = text.get(index, "") + e["delta"]
        elif kind in ("response.output_text.done", "response.reasoning_text.done"):
            assert e["text"] == text.get(index, ""), e
        elif kind == "response.function_call_arguments.done":
            assert e["arguments"] == text.get(index, ""), e
        elif kind == "response.output_item.done":
            done[index] = e["item"]
        else:
            assert kind in ("response.content_part.added", "response.content_part.done"), e
    assert set(done) == set(added), (added, done)
    final = events[-1]["response"]
    # every item the stream announced, at the index it announced (a cut or broken call too, as incomplete)
    kept = [done[i] for i in sorted(done)]
    assert final["output"] == kept, (final["output"], kept)


def stripped(response: dict) -> dict:
    """A response less what differs between two answers alike: ids, timestamps, call ids."""
    r = copy.deepcopy(response)
    for key in ("id", "created_at", "completed_at", "amphista"):
        r.pop(key, None)
    for item in r["output"]:
        item.pop("id")
        item.pop("call_id", None)
    return r


def agree(url: str, body: dict) -> tuple[dict, list[dict]]:
    """The non-streamed response and the stream's events, checked against each other: the stream ends with the same
    response (but for ids and timestamps)."""
    status, _, text = send(url, body)
    assert status == 200, text
    reply = json.loads(text)
    status, ctype, text = send(url, {**body, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream"), text
    events = events_of(text)
    check_events(events)
    assert stripped(events[-1]["response"]) == stripped(reply), (events[-1]["response"]["output"], reply["output"])
    return reply, events


def as_chat(reply: dict) -> tuple:
    """A response's (content, reasoning, calls) as /v1/chat/completions' message has them."""
    def texts(kind):
        return "".join(c["text"] for o in reply["output"] if o["type"] == kind for c in o["content"])
    # the chat route's calls are the whole ones: a cut or broken call stays in a response as incomplete
    calls = [(o["name"], o["arguments"]) for o in reply["output"]
             if o["type"] == "function_call" and o["status"] != "incomplete"]
    return texts("message"), texts("reasoning"), calls


def chat_answer(url: str, messages: list, **fields) -> tuple[tuple, dict]:
    status, reply = call(url, CHAT, {"messages": messages, **fields})
    assert status == 200, reply
    m = reply["choices"][0]["message"]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls") or []]
    return (m["content"] or "", m.get("reasoning_content") or "", calls), reply


# ---- the sweep ------------------------------------------------------------------------------------------------
def bad_value(rng):
    return rng.choice([
        "x", "", "\ud800", 1, -1, 0, 2.5, 10 ** 30, 1e308, float("nan"), float("inf"), True, False, None, [], [1],
        [None], ["x"], {}, {"a": 1}, {"type": 3}, {"type": "function"}, [{"type": "function"}], {"\ud800": "x"},
        {"k": "\ud800"}, ["\ud800"], [[[[[[[[[[[]]]]]]]]]]], {"a": {"b": {"c": {}}}}, "a" * 3000,
        [{"type": "input_text", "text": 5}], [{"type": "bogus"}], {"format": {"type": "json_schema", "name": "x",
                                                                              "schema": {"enum": ["\ud800"]}}},
        {"effort": "loud"}, {"effort": "\ud800"}, {"verbosity": 3}, [{**WEATHER, "description": "\ud800"}],
        {"type": "function", "name": 5}, {"format": {"type": "text"}, "extra": 1},
    ])


FIELDS = ["input", "instructions", "model", "max_output_tokens", "temperature", "top_p", "stream", "tools",
          "tool_choice", "parallel_tool_calls", "text", "metadata", "user", "store", "reasoning",
          "previous_response_id", "prompt_cache_key", "safety_identifier", "service_tier", "stream_options",
          "background", "conversation", "include", "truncation", "max_tool_calls", "top_logprobs", "prompt", "top_k",
          "seed", "stop", "speculative", "min_tokens", "logit_bias", "messages", "max_tokens", "n"]
# the Responses API's own text-bearing fields: a lone surrogate anywhere in them is refused (it reached the
# tokenizer, naming no field, or went back to the client in the reply)
TEXT_FIELDS = {"input", "instructions", "model", "tools", "tool_choice", "text", "metadata", "user", "reasoning",
               "prompt_cache_key", "safety_identifier", "service_tier"}
ITEMS = {
    "message": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
    "assistant": {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
    "function_call": {"type": "function_call", "call_id": "c1", "name": "get_weather",
                      "arguments": '{"city": "Oslo", "days": 1}'},
    "function_call_output": {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    "reasoning": {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
}


def _has_surrogate(value) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return isinstance(value, list) and any(_has_surrogate(v) for v in value)


def valid_request(rng) -> dict:
    body = {"model": "tiny", "max_output_tokens": rng.randint(1, 6)}
    form = rng.random()
    if form < 0.3:
        body["input"] = rng.choice(["The quick brown fox", "Hello", "ünï €", "a\u2028b"])
    else:
        items = [dict(ITEMS["message"])]
        if form > 0.6:
            items += [ITEMS["assistant"], ITEMS["reasoning"], ITEMS["function_call"], ITEMS["function_call_output"]]
        if rng.random() < 0.3:
            items.insert(0, {"role": rng.choice(["system", "developer"]), "content": "Be terse."})
        body["input"] = items
    pool = {
        "instructions": lambda: "You are terse.", "temperature": lambda: rng.choice([0, 0.7]),
        "top_p": lambda: rng.choice([1.0, 0.5]), "metadata": lambda: {"run": "a"}, "user": lambda: "u1",
        "store": lambda: rng.random() < 0.5, "reasoning": lambda: {"effort": "low", "summary": None},
        "stop": lambda: ["e"], "seed": lambda: 7, "top_k": lambda: 5, "service_tier": lambda: "auto",
        "text": lambda: rng.choice([{"format": {"type": "json_object"}}, {"format": {"type": "text"}},
                                    {"format": {"type": "json_schema", "name": "ok", "schema": {
                                        "type": "object", "properties": {"ok": {"type": "boolean"}}}}}]),
        "tools": lambda: TOOLS,
    }
    for name in rng.sample(sorted(pool), rng.randint(0, 4)):
        body[name] = pool[name]()
    if "tools" in body:
        body.pop("text", None)
        body["tool_choice"] = rng.choice(["auto", "none", "required", {"type": "function", "name": "get_time"}])
        body["parallel_tool_calls"] = rng.random() < 0.5
    return body


def mutated_request(rng) -> tuple[dict, str]:
    """PLAIN with one field set to a bad value, or an input item's field: (the body, the field it is about)."""
    body = dict(PLAIN)
    if rng.random() < 0.35:
        kind = rng.choice(sorted(ITEMS))
        item = copy.deepcopy(ITEMS[kind])
        item[rng.choice(sorted(item))] = bad_value(rng)
        body["input"] = [ITEMS["message"], item]
        return body, "input"
    field = rng.choice(FIELDS)
    body[field] = bad_value(rng)
    return body, field


class Sweep:
    def __init__(self, url, baseline):
        self.url, self.baseline, self.problems, self.counts = url, baseline, [], {}

    def fail(self, where, what):
        self.problems.append(f"{what} <- {json.dumps(where, default=str)[:300]}")

    def reply(self, body, status, ctype, text, field=None):
        self.counts[status] = self.counts.get(status, 0) + 1
        if "Traceback" in text or 'File "' in text:
            return self.fail(body, f"traceback in a {status} reply")
        if status not in (200, 400):
            return self.fail(body, f"status {status}: {text[:300]}")
        if status == 200:
            if field in TEXT_FIELDS and _has_surrogate(body.get(field)):
                self.fail(body, "a lone surrogate served")
            if body.get("stream"):
                try:
                    events = events_of(text)
                    check_events(events)
                except AssertionError as e:
                    return self.fail(body, f"a malformed stream: {str(e)[:300]}")
                return events[-1]["response"]
            return json.loads(text)
        err = json.loads(text).get("error") or {}
        param = err.get("param")
        if set(err) != {"message", "type", "param", "code"} or not err["message"]:
            self.fail(body, f"400 error object malformed: {err}")
        elif field is not None and not (param == field or isinstance(param, str) and param.startswith(
                (field + ".", field + "["))) and err["code"] != "context_length_exceeded":
            self.fail(body, f"400 names param {param!r}, not {field!r}: {err['message'][:200]}")

    def probe(self, after):
        status, _, text = send(self.url, PLAIN)
        if status != 200 or as_chat(json.loads(text)) != self.baseline:
            self.fail(after, f"the plain request after it got {status}: {text[:200]}")


def test_randomized_sweep(server, capfd):
    """Random valid requests (some streamed: well-formed, ending with the non-streamed response) and requests with
    one field or input item field mutated: 200s or 400s naming the field, a lone surrogate in the Responses API's
    own fields never served, and the server answers a plain request as before after each."""
    status, _, text = send(server.url, PLAIN)
    assert status == 200, text
    sweep = Sweep(server.url, as_chat(json.loads(text)))
    rng = random.Random(SEED)
    valid_ok = valid_n = 0
    for case in range(CASES):
        if rng.random() < 0.35:
            body = valid_request(rng)
            valid_n += 1
            status, ctype, text = send(server.url, body)
            reply = sweep.reply(body, status, ctype, text)
            valid_ok += status == 200
            if status == 200 and reply is not None and body.get("temperature", 0) == 0 and rng.random() < 0.4:
                status, ctype, text = send(server.url, {**body, "stream": True})
                final = sweep.reply({**body, "stream": True}, status, ctype, text)
                if final is not None and stripped(final) != stripped(reply):
                    sweep.fail(body, f"streamed {final['output']} != non-streamed {reply['output']}")
            else:
                sweep.probe(case)
        else:
            body, field = mutated_request(rng)
            if rng.random() < 0.2:
                body["stream"] = True
            try:
                raw = json.dumps(body).encode()
            except ValueError:
                continue
            status, ctype, text = send(server.url, raw)
            sweep.reply(body, status, ctype, text, field)
            sweep.probe(case)
    if "Traceback" in capfd.readouterr().err:
        sweep.problems.append("a traceback on the server's stderr")
    print(f"\nresponses fuzz: {CASES} cases, statuses {sorted(sweep.counts.items())}, valid {valid_ok}/{valid_n}")
    assert not sweep.problems, f"{len(sweep.problems)} problems:\n" + "\n".join(sweep.problems[:60])
    assert valid_ok >= valid_n * 3 // 4


@pytest.mark.parametrize("raw, param", [
    (b'{"input": "hi", "max_output_tokens": 1' + b"0" * 5000 + b"}", "max_output_tokens"),
    (b'{"input": [{"role": "user", "content": 1' + b"0" * 5000 + b"}]}", "input"),
    (b'{"input": "hi", "temperature": NaN}', "temperature"),
    (b'{"input": "hi", "top_p": Infinity}', "top_p"),
    (b'{"input": "hi", "max_output_tokens": 1e999}', "max_output_tokens"),
    (b'{"input": ' + b"[" * 50000 + b"]" * 50000 + b"}", None),
    (b'{"input": "\\ud800"}', "input"),
    (b'{"input": "hi", "instructions": "\\udfff"}', "instructions"),
])
def test_raw_bodies_are_400s(server, raw, param):
    status, _, text = send(server.url, raw)
    assert "Traceback" not in text
    error_of((status, json.loads(text)), 400, param=param)


# ---- regressions ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, param, words", [
    # echoed into the reply unchecked: a client's typo served as if it were a setting, and a lone surrogate went back
    ({"reasoning": {"effort": "loud"}}, "reasoning.effort", "'minimal'"),
    ({"reasoning": {"effort": "\ud800"}}, "reasoning.effort", "must be one of"),
    ({"reasoning": {"summary": 3}}, "reasoning.summary", "'concise'"),
    ({"reasoning": {"efort": "low"}}, "reasoning.efort", "its keys"),
    ({"text": {"verbosity": "\ud800"}}, "text.verbosity", "'medium'"),
    ({"service_tier": "fastest"}, "service_tier", "'priority'"),
    ({"metadata": {"k": "\ud800"}}, "metadata.k", "not valid Unicode"),
    ({"metadata": {"\ud800": "v"}}, "metadata", "a key"),
    ({"stream_options": {"include_obfuscation": "no"}}, "stream_options.include_obfuscation", "true or false"),
    # the tokenizer refused the rendered prompt, naming no field (param null)
    ({"tools": [{**WEATHER, "description": "caf\ud800"}]}, "tools", "tools[0].description is not valid Unicode"),
    ({"tools": [TIME, {**WEATHER, "parameters": {"type": "object", "properties": {"c": {"description": "\udfff"}}}}]},
     "tools", "tools[1].parameters.properties.c.description"),
    # a reasoning item's parts of another type (or none) were dropped without a word; encrypted content ignored
    ({"input": [{"type": "reasoning", "content": [{"type": "input_text", "text": "x"}]}]}, "input[0].content[0]",
     "reasoning_text"),
    ({"input": [{"type": "reasoning", "content": ["x"]}]}, "input[0].content[0]", "reasoning_text"),
    ({"input": [{"type": "reasoning", "content": [{"type": "reasoning_text", "text": "\ud800"}]}]},
     "input[0].content[0].text", "not valid Unicode"),
    ({"input": [{"type": "reasoning", "summary": 5}]}, "input[0].summary", "summary_text"),
    ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": None}]}]},
     "input[0].summary[0].text", "must be a string"),
    ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"}]}, "input[0].encrypted_content",
     "encrypted"),
    # the chat template's refusal of the conversation (this one takes one system message) named no field
    ({"instructions": "Be terse.", "input": [{"role": "developer", "content": "Use Celsius."},
                                             {"role": "user", "content": "hi"}]}, "input", "chat template"),
    # the tool grammar's refusal said to be about text.format, which the request did not send
    ({"tools": TOOLS, "tool_choice": "required", "ignore_eos": True}, "ignore_eos", "does not mix with tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "get_time"}, "ignore_eos": True}, "ignore_eos",
     "does not mix with tool_choice"),
])
def test_fields_served_unchecked_are_400s(server, fields, param, words):
    status, _, text = send(server.url, {**PLAIN, **fields})
    error_of((status, json.loads(text)), 400, words, param=param)


def test_a_schema_error_names_the_responses_field(server):
    """A lone surrogate in text.format's schema was said to be at `.json_schema.schema...`, the chat route's path."""
    err = error_of(call(server.url, RESPONSES, {**PLAIN, "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"enum": ["\ud800"]}}}}), 400, "at .schema.enum[0]")
    assert "json_schema" not in err["message"] and err["param"] == "text.format", err


def test_text_after_a_call_is_where_the_stream_has_it(server, monkeypatch):
    """An answer that writes its text after its call: the stream adds the call, then the message (its text comes
    later); the non-streamed response listed the message first, so the SDK's create() and stream() disagreed."""
    scripted(server, monkeypatch, CALL("Oslo") + "\nDone.")
    for extra in ({}, {"stop": ["zzz"]}):
        reply, events = agree(server.url, {"input": "Weather?", "tools": TOOLS, "max_output_tokens": 200, **extra})
        assert [o["type"] for o in reply["output"]] == ["function_call", "message"], reply["output"]
        assert reply["output"][1]["content"][0]["text"] == "\nDone."


def test_a_call_after_a_broken_one_is_the_final_responses(server, client, monkeypatch):
    """A call that went out by name and broke, then a whole one. Once, response.completed kept the broken call (its
    arguments '{"city": 5') and dropped the whole one, so the SDK's stream parsed broken JSON for a strict tool. Now a
    non-strict tool's broken call stays where the stream announced it, as incomplete, before the whole one; a strict
    tool's calls go out whole only, so the broken one never appears and the SDK parses the whole one."""
    scripted(server, monkeypatch, BROKEN + "\n" + CALL("Paris"))
    body = {"input": "Weather?", "tools": TOOLS, "max_output_tokens": 400}
    reply, events = agree(server.url, body)
    assert [(o["name"], o["arguments"], o["status"]) for o in reply["output"]] == [
        ("get_weather", '{"city": 5', "incomplete"), ("get_weather", '{"city": "Paris", "days": 2}', "completed")]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == reply["output"] or [(d["arguments"], d["status"]) for d in done] == [
        (o["arguments"], o["status"]) for o in reply["output"]]
    assert reply["status"] == "completed"
    assert as_chat(reply) == chat_answer(server.url, [{"role": "user", "content": "Weather?"}], tools=CHAT_TOOLS,
                                         max_tokens=400)[0]
    with client.responses.stream(model="tiny", input="Weather?", max_output_tokens=400,
                                 tools=[{**WEATHER, "strict": True}, TIME]) as stream:
        list(stream)
        final = stream.get_final_response()
    assert [o.parsed_arguments for o in final.output] == [{"city": "Paris", "days": 2}]
    # and between whole calls
    scripted(server, monkeypatch, CALL("Oslo") + "\n" + BROKEN + "\n" + CALL("Paris"))
    reply, _ = agree(server.url, body)
    assert [(json.loads(o["arguments"])["city"] if o["status"] == "completed" else None) for o in reply["output"]] \
        == ["Oslo", None, "Paris"]


# ---- agreement --------------------------------------------------------------------------------------------------
SCRIPTS = {
    "reasoning, text, two calls": "<think>Let me check.</think>Checking.\n" + CALL("Oslo") + "\n" + CALL("Paris"),
    "reasoning, a call, text": "<think>hm</think>" + CALL("Oslo") + " ok",
    "a broken call, a whole one": BROKEN + "\n" + CALL("Paris"),
    "whitespace, a call": "\n " + CALL("Oslo"),
    "reasoning unclosed": "<think>a b c d e f",
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_stream_agrees_wherever_the_answer_is_cut(server, monkeypatch, name):
    """Each scripted answer, cut by max_output_tokens at several points (inside its reasoning, text, a call's name
    and arguments) and whole, with and without stop strings: the stream is well-formed and ends with the non-streamed
    response, whose text, reasoning and calls are the chat route's; status incomplete exactly when cut."""
    text = SCRIPTS[name]
    scripted(server, monkeypatch, text)
    n = len(server.app.engine.tokenizer.encode(text, add_bos=False))
    for cut in sorted({1, n // 4, n // 2, 3 * n // 4, n + 8}):
        # with stops a call goes out whole as its block closes: a cut anywhere inside a block is one case
        for extra in ({}, {"stop": ["zzz"]}) if cut in (1, n // 2, n + 8) else ({},):
            body = {"input": "Weather?", "tools": TOOLS, "max_output_tokens": cut, **extra}
            reply, _ = agree(server.url, body)
            want, chat = chat_answer(server.url, [{"role": "user", "content": "Weather?"}], tools=CHAT_TOOLS,
                                     max_tokens=cut, **extra)
            assert as_chat(reply) == want, (cut, extra)
            length = chat["choices"][0]["finish_reason"] == "length"
            assert (reply["status"] == "incomplete") == length, (cut, reply["status"])
            assert reply["incomplete_details"] == ({"reason": "max_output_tokens"} if length else None)
            assert reply["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
def test_required_and_named_calls_agree(server, tool_choice):
    """The tool grammars (the tiny model writes its own arguments), parallel or not, whole and cut."""
    for parallel in (True, False):
        for cut in (8, 30, 300):
            body = {"input": "Weather?", "tools": TOOLS, "tool_choice": tool_choice, "max_output_tokens": cut,
                    "parallel_tool_calls": parallel}
            reply, _ = agree(server.url, body)
            want, _ = chat_answer(server.url, [{"role": "user", "content": "Weather?"}], tools=CHAT_TOOLS,
                                  tool_choice=tool_choice if isinstance(tool_choice, str) else
                                  {"type": "function", "function": {"name": "get_weather"}},
                                  max_tokens=cut, parallel_tool_calls=parallel)
            assert as_chat(reply) == want
            assert len(reply["output"]) == 1 or parallel


def test_json_schema_and_stop_strings_agree(server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"],
              "additionalProperties": False}
    for cut in (3, 200):
        reply, _ = agree(server.url, {"input": "Describe Paris.", "max_output_tokens": cut,
                                      "text": {"format": {"type": "json_schema", "name": "c", "schema": schema}}})
        if cut == 200:
            assert set(json.loads(reply["output"][0]["content"][0]["text"])) == {"name"}
    reply, _ = agree(server.url, {"input": "The quick brown fox", "max_output_tokens": 40, "stop": ["e", "a"]})
    want, _ = chat_answer(server.url, [{"role": "user", "content": "The quick brown fox"}], max_tokens=40,
                          stop=["e", "a"])
    assert as_chat(reply) == want


# ---- round trips --------------------------------------------------------------------------------------------------
def test_sdk_round_trip_of_reasoning_calls_and_results(server, client, monkeypatch):
    """response.output fed back as input (a reasoning item, a function call), with instructions and a tool result
    given as input_text parts; a developer message: the prompt and the answer are the chat route's for the same
    conversation. (Instructions and a developer message are two system messages, which this model's template
    refuses, as it refuses them on the chat route.)"""
    scripted(server, monkeypatch, "<think>I should look.</think>" + CALL("Oslo"))
    r1 = client.responses.create(model="tiny", input="Weather in Oslo?", tools=TOOLS, max_output_tokens=200)
    assert [o.type for o in r1.output] == ["reasoning", "function_call"], r1.output
    call_id = r1.output[1].call_id
    monkeypatch.undo()
    r2 = client.responses.create(
        model="tiny", instructions="Be terse.", tools=TOOLS, tool_choice="none", max_output_tokens=12,
        input=[{"role": "user", "content": "Weather in Oslo?"},
               *r1.output, {"type": "function_call_output", "call_id": call_id, "output": [
                   {"type": "input_text", "text": "Sunny,"}, {"type": "input_text", "text": "8 C"}]},
               {"role": "user", "content": [{"type": "input_text", "text": "And tomorrow?"}]}])
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "reasoning_content": "I should look.", "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": r1.output[1].arguments}}]},
                {"role": "tool", "tool_call_id": call_id, "content": "Sunny,\n8 C"},
                {"role": "user", "content": "And tomorrow?"}]
    want, chat = chat_answer(server.url, messages, tools=CHAT_TOOLS, tool_choice="none", max_tokens=12)
    assert r2.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert as_chat(r2.model_dump()) == want
    # a multi-turn conversation of messages, the assistant's turn sent back as the SDK has it
    first = client.responses.create(model="tiny", input="Hi", max_output_tokens=4)
    r3 = client.responses.create(model="tiny", max_output_tokens=6, input=[
        {"role": "developer", "content": "Use Celsius."}, {"role": "user", "content": "Hi"}, *first.output,
        {"type": "message", "role": "user", "content": "Again"}])
    want, chat = chat_answer(server.url, [{"role": "system", "content": "Use Celsius."},
                                          {"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": first.output_text},
                                          {"role": "user", "content": "Again"}], max_tokens=6)
    assert r3.usage.input_tokens == chat["usage"]["prompt_tokens"] and as_chat(r3.model_dump()) == want


# ---- a client that leaves, /metrics ------------------------------------------------------------------------------
def metrics(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_a_client_leaving_mid_stream_stops_its_decoding(server, monkeypatch):
    """The stream's socket closed after a few deltas: the request is a 499, its run stops (the engine's steps
    pulled, paced so that the tiny model cannot finish first, are far fewer than max_output_tokens), and the next
    request is answered."""
    engine, app = server.app.engine, server.app
    real, pulled = engine.stream_batch, []

    def paced(item):
        pulled.append(item)
        time.sleep(0.01)
        return item
    monkeypatch.setattr(engine, "stream_batch", lambda *a, **k: relay(real(*a, **k), each=paced))
    before = metrics(server.url)
    u = urlsplit(server.url)
    body = json.dumps({"input": "Tell a story.", "max_output_tokens": 400, "ignore_eos": True,
                       "stream": True}).encode()
    with socket.create_connection((u.hostname, u.port), timeout=TIMEOUT) as s:
        s.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        seen = b""
        while seen.count(b"response.output_text.delta") < 3:
            chunk = s.recv(4096)
            assert chunk, seen
            seen += chunk
    for _ in range(500):
        if not app.lock.locked() and engine._decoding is None:
            break
        time.sleep(0.01)
    assert len(pulled) < 200, len(pulled)
    key = 'amphista_request_errors_total{endpoint="/v1/responses",status="499"}'
    assert metrics(server.url).get(key, 0) == before.get(key, 0) + 1
    monkeypatch.undo()
    status, _, text = send(server.url, PLAIN)
    assert status == 200, text


@pytest.mark.parametrize("stream", [False, True])
def test_metrics_and_usage_are_the_chat_routes(server, monkeypatch, stream):
    """The same answers (text, cut, tool calls) through both routes: /metrics moves alike (but for the endpoint's
    request counter), and usage is the chat route's."""
    def delta(fn):
        a = metrics(server.url)
        got = fn()
        b = metrics(server.url)
        # times differ from run to run: of them, only how many were observed
        moved = {k: b[k] - a.get(k, 0) for k in b if b[k] != a.get(k, 0) and
                 ("seconds" not in k or k.endswith("_count")) and
                 not k.startswith(("amphista_requests_running", "amphista_requests_waiting"))}
        return moved, got

    def responses():
        status, _, text = send(server.url, {**body, "stream": stream})
        assert status == 200, text
        return (events_of(text)[-1]["response"] if stream else json.loads(text))["usage"]

    def chat():
        chat_body = {"messages": [{"role": "user", "content": body["input"]}], "max_tokens": body["max_output_tokens"],
                     "stream": stream, **({"tools": CHAT_TOOLS} if "tools" in body else {})}
        if stream:
            chat_body["stream_options"] = {"include_usage": True}
        status, _, text = send(server.url, chat_body, CHAT)
        assert status == 200, text
        return json.loads(re.findall(r"^data: (\{.*)$", text, re.M)[-1])["usage"] if stream else \
            json.loads(text)["usage"]

    scripted(server, monkeypatch, "<think>x</think>" + CALL("Oslo"))
    for body in ({"input": "Hello", "max_output_tokens": 6}, {"input": "Weather?", "max_output_tokens": 400,
                                                             "tools": TOOLS},
                 {"input": "Weather?", "max_output_tokens": 30, "tools": TOOLS}):
        moved_r, usage_r = delta(responses)
        moved_c, usage_c = delta(chat)
        ep = 'amphista_requests_total{endpoint="%s"}'
        assert moved_r.pop(ep % RESPONSES) == 1 and moved_c.pop(ep % CHAT) == 1
        assert moved_r == moved_c, body
        assert (usage_r["input_tokens"], usage_r["output_tokens"], usage_r["total_tokens"]) == \
            (usage_c["prompt_tokens"], usage_c["completion_tokens"], usage_c["total_tokens"])
    # the tool-call answer counted as "tool_calls", the cut one as "length", in both routes
    assert any('finish_reason="tool_calls"' in k for k in metrics(server.url))
