"""Adversarial QA of `amphista serve`'s POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API,
serving/anthropic_messages.py) on the tiny random model served with --reasoning-parser qwen3: a seeded sweep of the
request's fields and content blocks (wrong types, nulls, huge and non-finite numbers, nesting, lone surrogates)
where every refusal must be a 400 in Anthropic's error shape naming its field and no request may poison the next;
scripted answers (thinking, text and tool_use, cut anywhere, with and without stop sequences) whose stream must be
well-formed and build the non-streamed message; the anthropic SDK's round trips (an agent loop) and count_tokens
against input_tokens; /metrics. The cases that found bugs are kept as regression tests."""
from __future__ import annotations

import copy
import http.client
import json
import os
import random
import urllib.request
from urllib.parse import urlsplit

import pytest

pytest.importorskip("llguidance")
anthropic = pytest.importorskip("anthropic")

from conftest import edited_copy, serving                  # noqa: E402
from amphista_engine.serving.anthropic_messages import COUNTED  # noqa: E402
from jiter import from_json                                # noqa: E402  (the SDK's partial JSON reader)
from test_responses_api import events_of                   # noqa: E402
from test_tool_streaming import scripted                   # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

MESSAGES, COUNT, CHAT = "/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions"
SEED = int(os.environ.get("AMPHISTA_FUZZ_SEED", "4242"))
CASES = int(os.environ.get("AMPHISTA_FUZZ_CASES", "80"))
TIMEOUT = 30                 # s: a reply that takes longer counts as a hang
WEATHER = {"name": "get_weather", "description": "Weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                            "required": ["city", "days"]}}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
TOOLS = [WEATHER, TIME]
CHAT_TOOLS = [{"type": "function", "function": {"name": t["name"], **({"description": t["description"]}
                                                                      if "description" in t else {}),
                                                "parameters": t["input_schema"]}} for t in TOOLS]
ASK = [{"role": "user", "content": "Weather?"}]
PLAIN = {"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "The quick brown fox"}]}


def CALL(city: str) -> str:
    return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s", "days": 2}}\n</tool_call>' % city


@pytest.fixture(scope="module")
def server(tiny_hf_dir, tmp_path_factory):
    """The tiny model (room for the tools' prompts: ~1 token per character) served with --reasoning-parser qwen3."""
    from amphista_engine import Engine
    path = edited_copy(tiny_hf_dir, tmp_path_factory.mktemp("anthropic_tiny") / "m", {"max_position_embeddings": 2048})
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=2048)
    with serving(engine, model_id="tiny", reasoning_parser="qwen3", quiet=True) as httpd:
        yield httpd


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=TIMEOUT)


def send(url, body: dict | bytes, path=MESSAGES) -> tuple[int, str, str]:
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


def anthropic_error(status: int, text: str, *words: str) -> str:
    """A 400 in Anthropic's shape, its message holding `words`; the message."""
    assert status == 400, (status, text)
    reply = json.loads(text)
    assert set(reply) == {"type", "error"} and reply["type"] == "error", reply
    assert set(reply["error"]) == {"type", "message"} and reply["error"]["type"] == "invalid_request_error", reply
    for w in words:
        assert w in reply["error"]["message"], reply
    return reply["error"]["message"]


# ---- the stream, built into a message ---------------------------------------------------------------------------
_DELTA_OF = {"text": ("text_delta", "text"), "thinking": ("thinking_delta", "thinking"),
             "tool_use": ("input_json_delta", "partial_json")}


def built(events: list[dict]) -> dict:
    """The message Anthropic's events build, as a client builds it; checks their order and shape: message_start
    (no content, no stop_reason), each block started once at the next index, its deltas of its type, stopped once,
    none open at message_delta; message_delta (stop_reason, usage) then message_stop, last."""
    assert events[0]["type"] == "message_start", events[:1]
    assert [e["type"] for e in events[-2:]] == ["message_delta", "message_stop"], events[-2:]
    message = copy.deepcopy(events[0]["message"])
    assert message["content"] == [] and message["stop_reason"] is None and message["stop_sequence"] is None, message
    blocks, open_, partial = [], set(), {}
    for e in events[1:-2]:
        kind, index = e["type"], e.get("index")
        if kind == "content_block_start":
            assert index == len(blocks), e
            block = copy.deepcopy(e["content_block"])
            assert block["type"] in _DELTA_OF, e
            assert block.get(_DELTA_OF[block["type"]][1], "") in ("", None) and block.get("input", {}) == {}, e
            blocks.append(block)
            open_.add(index)
            partial[index] = ""
        elif kind == "content_block_delta":
            assert index in open_, e
            name, key = _DELTA_OF[blocks[index]["type"]]
            assert e["delta"]["type"] == name and set(e["delta"]) == {"type", key}, e
            if key == "partial_json":
                partial[index] += e["delta"][key]
            else:
                blocks[index][key] += e["delta"][key]
        elif kind == "content_block_stop":
            assert index in open_, e
            open_.discard(index)
            if blocks[index]["type"] == "tool_use" and partial[index]:
                # as the SDK builds it: a call cut by max_tokens (or whose JSON broke) is its partial JSON's object
                blocks[index]["input"] = from_json(partial[index].encode("utf-8"), partial_mode=True)
        else:
            raise AssertionError(f"unexpected event {e}")
    assert not open_, open_
    end = events[-2]
    assert set(end["delta"]) == {"stop_reason", "stop_sequence"}, end
    message.update(end["delta"])
    message["usage"] = {**message["usage"], **end["usage"]}
    message["content"] = blocks
    return message


def stripped(message: dict) -> dict:
    """A message less what differs between two answers alike: ids, the server's extras."""
    m = copy.deepcopy(message)
    m.pop("id", None)
    m.pop("amphista", None)
    for block in m["content"]:
        if block["type"] == "tool_use":
            block.pop("id")
    return m


def agree(url: str, body: dict) -> tuple[dict, list[dict]]:
    """The non-streamed message and the stream's events, checked against each other: the stream builds the same
    message (but for ids)."""
    status, _, text = send(url, body)
    assert status == 200, text
    reply = json.loads(text)
    status, ctype, text = send(url, {**body, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream"), text
    events = events_of(text, numbered=False)
    assert stripped(built(events)) == stripped(reply), (built(events), reply)
    return reply, events


def counted(url: str, body: dict) -> int:
    # count_tokens takes the prompt's fields only (Anthropic's API refuses the rest by name)
    status, _, text = send(url, {k: v for k, v in body.items() if k in COUNTED}, COUNT)
    assert status == 200, text
    return json.loads(text)["input_tokens"]


# ---- the sweep ------------------------------------------------------------------------------------------------
def bad_value(rng):
    return rng.choice([
        "x", "", "\ud800", 1, -1, 0, 2.5, 10 ** 30, 1e308, float("nan"), float("inf"), True, False, None, [], [1],
        [None], ["x"], [""], {}, {"a": 1}, {"type": 3}, {"type": "text"}, [{"type": "text"}], {"\ud800": "x"},
        {"k": "\ud800"}, ["\ud800"], [[[[[[[[[[[]]]]]]]]]]], {"a": {"b": {"c": {}}}}, "a" * 3000, ["x"] * 300,
        ["a" * 5000], [{"type": "text", "text": 5}], [{"type": "bogus"}], [{"type": "image", "source": {}}],
        [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}],
        [{"type": "text", "text": "\ud800"}], {"type": "enabled", "budget_tokens": "many"},
        {"type": "enabled", "budget_tokens": 0}, {"type": "adaptive"}, {"type": "disabled", "budget_tokens": 5},
        {"type": "tool"}, {"type": "tool", "name": 5}, {"type": "auto", "disable_parallel_tool_use": "yes"},
        {"type": "any", "disable_parallel_tool_use": True}, {"user_id": "\ud800"}, {"user_id": 5},
        [{**WEATHER, "description": "\ud800"}], [{"name": 5, "input_schema": {}}], [{**WEATHER, "strict": "yes"}],
    ])


FIELDS = ["messages", "system", "model", "max_tokens", "temperature", "top_p", "top_k", "stream", "tools",
          "tool_choice", "metadata", "thinking", "stop_sequences", "service_tier", "inference_geo", "cache_control",
          "container", "mcp_servers", "context_management", "output_config", "output_format", "seed", "speculative",
          "min_tokens", "stop", "n", "max_completion_tokens", "input", "diagnostics", "user_profile_id", "workspace_id"]
BLOCKS = {
    "text": ("user", {"type": "text", "text": "hi"}),
    "tool_result": ("user", {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}),
    "tool_use": ("assistant", {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                               "input": {"city": "Oslo", "days": 1}}),
    "thinking": ("assistant", {"type": "thinking", "thinking": "hm", "signature": "s"}),
    "redacted": ("assistant", {"type": "redacted_thinking", "data": "abc"}),
}
# the fields whose value is echoed or read as text: a lone surrogate in them must be refused, not served
TEXT_FIELDS = {"messages", "system", "model", "tools", "tool_choice", "metadata", "stop_sequences", "service_tier",
               "inference_geo", "diagnostics", "user_profile_id", "workspace_id"}


def _has_surrogate(value) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return isinstance(value, list) and any(_has_surrogate(v) for v in value)


def valid_request(rng) -> dict:
    body = {"model": "tiny", "max_tokens": rng.randint(1, 6)}
    form = rng.random()
    if form < 0.3:
        body["messages"] = [{"role": "user", "content": rng.choice(["The quick brown fox", "Hello", "ünï €",
                                                                    "a\u2028b"])}]
    elif form < 0.6:
        body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                         {"type": "text", "text": "there"}]}]
    else:
        body["messages"] = [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [BLOCKS["thinking"][1], {"type": "text", "text": "Let me see."},
                                              BLOCKS["tool_use"][1]]},
            {"role": "user", "content": [BLOCKS["tool_result"][1], {"type": "text", "text": "and?"}]}]
    pool = {
        "system": lambda: rng.choice(["Be terse.", [{"type": "text", "text": "Be terse.",
                                                     "cache_control": {"type": "ephemeral"}}]]),
        "temperature": lambda: rng.choice([0, 0.7]), "top_p": lambda: rng.choice([1.0, 0.5]),
        "top_k": lambda: 5, "metadata": lambda: {"user_id": "u1"}, "stop_sequences": lambda: ["e"],
        "seed": lambda: 7, "service_tier": lambda: "auto", "workspace_id": lambda: "wrkspc_1",
        "diagnostics": lambda: {"previous_message_id": rng.choice([None, "msg_1"])},
        "thinking": lambda: rng.choice([{"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"},
                                        {"type": "adaptive"}]),
        "tools": lambda: TOOLS,
    }
    for name in rng.sample(sorted(pool), rng.randint(0, 4)):
        body[name] = pool[name]()
    if "tools" in body:
        body["tool_choice"] = rng.choice([{"type": "auto"}, {"type": "none"}, {"type": "any"},
                                          {"type": "tool", "name": "get_time"},
                                          {"type": "auto", "disable_parallel_tool_use": True}])
    return body


def mutated_request(rng) -> tuple[dict, str]:
    """PLAIN with one field set to a bad value, or a content block's field: (the body, the field it is about)."""
    body = copy.deepcopy(PLAIN)
    if rng.random() < 0.35:
        role, block = copy.deepcopy(BLOCKS[rng.choice(sorted(BLOCKS))])
        block[rng.choice(sorted(block))] = bad_value(rng)
        body["messages"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                            {"role": role, "content": [block]}]
        if role == "assistant":
            body["messages"].append({"role": "user", "content": "go on"})
        return body, "messages"
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
            if body.get("stream") is True:
                try:
                    return built(events_of(text, numbered=False))
                except (AssertionError, ValueError, KeyError) as e:
                    return self.fail(body, f"a malformed stream: {str(e)[:300]}")
            return json.loads(text)
        try:
            message = anthropic_error(status, text)
        except AssertionError as e:
            return self.fail(body, f"400 not in Anthropic's shape: {str(e)[:300]}")
        if field is not None and field not in message and "longer than the cache" not in message:
            self.fail(body, f"400 does not name {field!r}: {message[:200]}")

    def probe(self, after):
        status, _, text = send(self.url, PLAIN)
        if status != 200 or json.loads(text)["content"] != self.baseline:
            self.fail(after, f"the plain request after it got {status}: {text[:200]}")


def test_randomized_sweep(server, capfd):
    """Random valid requests (some streamed: well-formed, building the non-streamed message; count_tokens their
    input_tokens) and requests with one field or content block field mutated: 200s or 400s in Anthropic's shape
    naming the field, a lone surrogate never served, and a plain request answered as before after each."""
    status, _, text = send(server.url, PLAIN)
    assert status == 200, text
    sweep = Sweep(server.url, json.loads(text)["content"])
    rng = random.Random(SEED)
    valid_ok = valid_n = 0
    for case in range(CASES):
        if rng.random() < 0.3:
            body = valid_request(rng)
            valid_n += 1
            status, ctype, text = send(server.url, body)
            reply = sweep.reply(body, status, ctype, text)
            valid_ok += status == 200
            if status == 200 and reply is not None:
                if counted(server.url, body) != reply["usage"]["input_tokens"]:
                    sweep.fail(body, f"count_tokens != input_tokens {reply['usage']['input_tokens']}")
                if body.get("temperature", 0) == 0 and rng.random() < 0.5:
                    status, ctype, text = send(server.url, {**body, "stream": True})
                    final = sweep.reply({**body, "stream": True}, status, ctype, text)
                    if final is not None and stripped(final) != stripped(reply):
                        sweep.fail(body, f"streamed {final} != non-streamed {reply}")
        else:
            body, field = mutated_request(rng)
            if rng.random() < 0.2:
                body["stream"] = True
            try:
                raw = json.dumps(body).encode()
            except ValueError:
                continue
            path = COUNT if rng.random() < 0.2 else MESSAGES
            status, ctype, text = send(server.url, raw, path)
            sweep.reply(body if path == MESSAGES else {**body, "stream": None}, status, ctype, text, field)
            sweep.probe(case)
    if "Traceback" in capfd.readouterr().err:
        sweep.problems.append("a traceback on the server's stderr")
    print(f"\nmessages fuzz: {CASES} cases, statuses {sorted(sweep.counts.items())}, valid {valid_ok}/{valid_n}")
    assert not sweep.problems, f"{len(sweep.problems)} problems:\n" + "\n".join(sweep.problems[:60])
    assert valid_ok >= valid_n * 3 // 4


@pytest.mark.parametrize("raw, words", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}", "max_tokens"),
    (b'{"messages": [{"role": "user", "content": 1' + b"0" * 5000 + b'}], "max_tokens": 5}', "messages[0]"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": NaN}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "top_p": Infinity}', "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}', "max_tokens"),
    (b'{"messages": ' + b"[" * 50000 + b"]" * 50000 + b', "max_tokens": 5}', ""),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 5}', "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "system": "\\udfff"}', "system"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stop_sequences": ["\\ud800"]}',
     "stop_sequences[0]"),
    (b'[1, 2]', "JSON object"),
])
def test_raw_bodies_are_400s(server, raw, words):
    # NaN and Infinity are not JSON: refused by name before any route reads the body, count_tokens' too
    for path in (MESSAGES, COUNT):
        status, _, text = send(server.url, raw, path)
        assert "Traceback" not in text
        anthropic_error(status, text, words)


# ---- agreement --------------------------------------------------------------------------------------------------
def chat_answer(url: str, messages: list, **fields) -> dict:
    status, _, text = send(url, {"messages": messages, **fields}, CHAT)
    assert status == 200, text
    return json.loads(text)


def as_chat(message: dict) -> tuple:
    """A message's (text, thinking, calls) as /v1/chat/completions' message has them."""
    def texts(kind):
        return "".join(b[kind] for b in message["content"] if b["type"] == kind)
    return texts("text"), texts("thinking"), [(b["name"], b["input"]) for b in message["content"]
                                              if b["type"] == "tool_use"]


def chat_as_tuple(reply: dict) -> tuple:
    m = reply["choices"][0]["message"]
    return (m["content"] or "", m.get("reasoning_content") or "",
            [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m.get("tool_calls") or []])


def same_as_chat(message: dict, chat: dict) -> bool:
    """A message holds the chat route's text, thinking and calls; and, cut by max_tokens inside a call, that call's
    tool_use block last (the chat route leaves a cut call out)."""
    text, thinking, calls = as_chat(message)
    want = chat_as_tuple(chat)
    cut = message["stop_reason"] == "max_tokens" and calls and calls[:-1] == want[2]
    return (text, thinking) == want[:2] and (calls == want[2] or bool(cut))


SCRIPTS = {
    "thinking, text, two calls": "<think>Let me check.</think>Checking.\n" + CALL("Oslo") + "\n" + CALL("Paris"),
    "thinking, a call, text": "<think>hm</think>" + CALL("Oslo") + " ok",
    "text, a stop string inside": "<think>a</think>The end is near. More text follows here.",
    "thinking unclosed": "<think>a b c d e f",
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_stream_agrees_wherever_the_answer_is_cut(server, monkeypatch, name):
    """Each scripted answer, cut by max_tokens at several points (inside its thinking, text, a call) and whole,
    with and without stop sequences: the stream builds the non-streamed message, whose text, thinking and calls are
    the chat route's; stop_reason max_tokens exactly where the chat route's finish is length, stop_sequence (with
    the string) where a stop sequence ended it; count_tokens is input_tokens."""
    text = SCRIPTS[name]
    scripted(server, monkeypatch, text)
    n = len(server.app.engine.tokenizer.encode(text, add_bos=False))
    for cut in sorted({1, n // 3, 2 * n // 3, n + 8}):
        # without a "near" in the answer ["near", "zzz"] is an unmatched list as ["zzz"] is (and holds more back)
        for stops in ([], ["zzz"], ["near", "zzz"]) if "near" in text else ([], ["near", "zzz"]):
            body = {"messages": ASK, "tools": TOOLS, "max_tokens": cut, "stop_sequences": stops}
            reply, _ = agree(server.url, body)
            chat = chat_answer(server.url, ASK, tools=CHAT_TOOLS, max_tokens=cut, stop=stops or None)
            assert same_as_chat(reply, chat), (cut, stops, reply, chat)
            finish = chat["choices"][0]["finish_reason"]
            want = {"length": "max_tokens", "tool_calls": "tool_use"}.get(finish)
            if want is None:
                want = "stop_sequence" if reply["stop_sequence"] is not None else "end_turn"
            assert reply["stop_reason"] == want, (cut, stops, reply["stop_reason"], finish)
            if reply["stop_reason"] == "stop_sequence":
                assert reply["stop_sequence"] in stops and "near" not in text[:text.index("near")].replace(
                    "<think>a</think>", ""), reply
            assert reply["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
            assert reply["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"] == counted(server.url, body)


@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"},
                                         {"type": "auto", "disable_parallel_tool_use": True}])
def test_tool_choices_agree(server, tool_choice):
    """The tool grammars (the tiny model writes its own arguments), parallel or not, whole and cut."""
    for parallel in (True, False):
        choice = {**tool_choice, "disable_parallel_tool_use": not parallel}
        # 100: past the 57 tokens of "any"'s whole call; the others' arguments run on to the limit (300 alike)
        for cut in (8, 100):
            body = {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": cut}
            reply, _ = agree(server.url, body)
            chat_choice = {"any": "required", "auto": "auto"}.get(choice["type"]) or \
                {"type": "function", "function": {"name": "get_weather"}}
            chat = chat_answer(server.url, ASK, tools=CHAT_TOOLS, tool_choice=chat_choice, max_tokens=cut,
                               parallel_tool_calls=parallel)
            assert same_as_chat(reply, chat), (reply, chat)
            assert reply["usage"]["input_tokens"] == counted(server.url, body)
            if not parallel:
                assert sum(b["type"] == "tool_use" for b in reply["content"]) <= 1, reply


# ---- regressions ------------------------------------------------------------------------------------------------
def _turns(*blocks, role="assistant") -> list:
    """A conversation whose last assistant turn (or user turn) holds `blocks`."""
    out = [{"role": "user", "content": "hi"}, {"role": role, "content": list(blocks)}]
    return out + [{"role": "user", "content": "go on"}] if role == "assistant" else out


@pytest.mark.parametrize("fields, words", [
    # the tokenizer refused the rendered prompt, naming no field
    ({"messages": _turns({**BLOCKS["tool_use"][1], "input": {"city": "\ud800"}})},
     "messages[1].content[0].input.city is not valid Unicode"),
    ({"messages": _turns({**BLOCKS["tool_use"][1], "input": {"\udfff": 1}})}, "messages[1].content[0].input"),
    ({"tools": [{**WEATHER, "description": "caf\ud800"}]}, "tools[0].description is not valid Unicode"),
    ({"tools": [TIME, {**WEATHER, "input_schema": {"type": "object", "properties": {"c": {"description": "\udfff"}}}}]},
     "tools[1].input_schema.properties.c.description"),
    # served without a word: Anthropic's metadata has user_id only, a string
    ({"metadata": {"user_id": "\ud800"}}, "metadata.user_id is not valid Unicode"),
    ({"metadata": {"user": "u1"}}, 'metadata has no key "user"'),
    ({"metadata": {"\ud800": "x"}}, "metadata has no key"),
    # opaque, but of a type: a thinking block's signature and a redacted_thinking block's data are strings
    ({"messages": _turns({**BLOCKS["thinking"][1], "signature": {"k": 1}})},
     "messages[1].content[0].signature must be a string"),
    ({"messages": _turns({"type": "redacted_thinking", "data": ["\ud800"]})},
     "messages[1].content[0].data must be a string"),
    ({"messages": _turns({"type": "redacted_thinking"})}, "messages[1].content[0].data must be a string"),
])
def test_fields_served_unchecked_are_400s(server, fields, words):
    for path in (MESSAGES, COUNT):
        status, _, text = send(server.url, {**PLAIN, **fields}, path)
        anthropic_error(status, text, words)


# ---- the SDK's round trips ----------------------------------------------------------------------------------------
def test_sdk_agent_loop(server, client, monkeypatch):
    """An agent loop as Anthropic clients run it: a message of thinking, text and two tool_use blocks (stream()'s
    final message is create()'s), sent back as the assistant turn, then one user turn of both tool_results (one an
    error) and text: the prompt is the chat route's for the same conversation, and count_tokens counts it; an image
    in a tool_result is refused naming it."""
    scripted(server, monkeypatch, "<think>Check both.</think>On it.\n" + CALL("Oslo") + "\n" + CALL("Paris"))
    body = dict(model="tiny", max_tokens=400, messages=ASK, tools=TOOLS,
                thinking={"type": "enabled", "budget_tokens": 1024})
    r1 = client.messages.create(**body)
    assert [b.type for b in r1.content] == ["thinking", "text", "tool_use", "tool_use"], r1.content
    assert r1.stop_reason == "tool_use" and r1.content[0].thinking == "Check both."
    with client.messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert stripped(final.model_dump()) == stripped(r1.model_dump(exclude={"amphista"}))
    assert client.messages.count_tokens(**{k: v for k, v in body.items() if k != "max_tokens"}).input_tokens == \
        r1.usage.input_tokens
    monkeypatch.undo()
    uses = [b for b in r1.content if b.type == "tool_use"]
    turns = [*ASK, {"role": "assistant", "content": r1.content},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": uses[0].id, "content": [{"type": "text", "text": "8 C"}]},
                 {"type": "tool_result", "tool_use_id": uses[1].id, "content": "no such city", "is_error": True},
                 {"type": "text", "text": "Summarize."}]}]
    r2 = client.messages.create(model="tiny", max_tokens=6, messages=turns, tools=TOOLS)
    ids = [u.id.removeprefix("toolu_") for u in uses]
    messages = [*ASK, {"role": "assistant", "content": r1.content[1].text, "reasoning_content": "Check both.",
                       "tool_calls": [
        {"id": i, "type": "function", "function": {"name": u.name, "arguments": json.dumps(u.input)}}
        for i, u in zip(ids, uses)]},
        {"role": "tool", "tool_call_id": ids[0], "content": "8 C"},
        {"role": "tool", "tool_call_id": ids[1], "content": "Error: no such city"},
        {"role": "user", "content": "Summarize."}]
    chat = chat_answer(server.url, messages, tools=CHAT_TOOLS, max_tokens=6)
    assert r2.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert as_chat(r2.model_dump()) == chat_as_tuple(chat)
    assert client.messages.count_tokens(model="tiny", messages=turns, tools=TOOLS).input_tokens == \
        r2.usage.input_tokens
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[2\]\.content\[0\]\.content\[0\]"):
        client.messages.create(model="tiny", max_tokens=6, tools=TOOLS, messages=[*turns[:2], {
            "role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": [image]}]}])


def test_metrics_count_the_route(server):
    def metrics() -> dict:
        with urllib.request.urlopen(server.url + "/metrics", timeout=TIMEOUT) as r:
            text = r.read().decode()
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                           if line and not line.startswith("#"))}
    key = 'amphista_requests_total{endpoint="%s"}'
    before = metrics()
    assert send(server.url, PLAIN)[0] == 200 and send(server.url, {**PLAIN, "stream": True})[0] == 200
    assert send(server.url, {"messages": PLAIN["messages"]}, COUNT)[0] == 200
    after = metrics()
    assert after[key % MESSAGES] == before.get(key % MESSAGES, 0) + 2
    assert after[key % COUNT] == before.get(key % COUNT, 0) + 1
