"""A seeded differential sweep over `amphista serve`'s four routes on the 4-bit SmolLM2 with its shipped heads: each
greedy request (mixed-length and unicode/emoji prompts, max tokens 1..40, stop strings cut from the answer so that
they hit, logprobs and top_logprobs, n=2, penalties, logit_bias, seed, stop_token_ids, min_tokens, bad_words,
include_stop_str_in_output, a prefilled assistant turn, tools under auto / required / a named function, plain or
Amphista) is sent streamed and not, and the streamed deltas joined must be the non-streamed reply: text, content
blocks and output items, tool calls' arguments, finish_reason / stop_reason / status / stop_sequence, logprobs,
usage. The same chat through /v1/chat/completions, /v1/responses and /v1/messages must give the same text, calls
and token counts, equal to Engine.generate's, and the same answer plain as speculative. Then the regressions."""
from __future__ import annotations

import json
import random
import urllib.error
import urllib.request

import pytest

from conftest import needs_smollm2, smollm2_with_shipped_heads

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

TEXTS = ["The quick brown fox", "def fib(n):", "Write a haiku about the sea.", "List three colors.",
         "What is the capital of France?", "Q: What is 2+2?\nA:", "Écris un poème sur l'été 🌞",
         "日本の首都はどこですか？", "Tell me about emojis 🎉🐍🚀 and ünïcödé", "Say hi",
         "The history of the city goes back many centuries. " * 8 + "Summarize:"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}, "h24": {"type": "boolean"}}}}}
TOOL_PROMPTS = ["What's the weather in Paris?", "Weather in 東京 please 🌧", "Weather in Oslo and the time in UTC?"]
# ids/times differ between any two replies
VOLATILE = ("id", "call_id", "created", "created_at", "completed_at", "amphista", "system_fingerprint")


@pytest.fixture(scope="module")
def url():
    from conftest import serving
    eng = smollm2_with_shipped_heads(max_seq_len=1024)
    eng.reserve_batch(2)
    with serving(eng, model_id="smollm2", log=lambda line: None, max_batch=2) as httpd:
        yield httpd.url, eng


def post(url: str, path: str, body: dict):
    """(status, JSON reply) or, streamed, (status, [(event name or None, parsed data or "[DONE]")])."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw, kind, status = r.read().decode(), r.headers["Content-Type"], r.status
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())
    if not kind.startswith("text/event-stream"):
        return status, json.loads(raw)
    events = []
    for block in raw.split("\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        data = fields["data"]
        events.append((fields.get("event"), data if data == "[DONE]" else json.loads(data)))
    return status, events


def ok(reply):
    assert reply[0] == 200, reply
    return reply[1]


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    return [strip(v) for v in obj] if isinstance(obj, list) else obj


def options(rng: random.Random) -> dict:
    o = {"temperature": 0}
    if rng.random() < 0.5:
        o["speculative"] = rng.choice(["amphista", "none"])
    for name, values in (("presence_penalty", [0.5, 1.0]), ("frequency_penalty", [0.3, 1.0]),
                         ("repetition_penalty", [1.1, 1.3])):
        if rng.random() < 0.15:
            o[name] = rng.choice(values)
    if rng.random() < 0.2:
        o["logit_bias"] = {str(rng.randint(0, 49151)): rng.choice([-100, -5, 3, 8]) for _ in range(3)}
    if rng.random() < 0.3:
        o["seed"] = rng.randint(0, 1000)
    if rng.random() < 0.25:
        o["include_stop_str_in_output"] = True
    if rng.random() < 0.15:
        o["stop_token_ids"] = [rng.choice([30, 28, 11, 13, 216, 198, 17, 288])]
    if rng.random() < 0.15:
        o["min_tokens"] = rng.randint(0, 5)
    if rng.random() < 0.1:
        o["bad_words"] = rng.sample(["the", " is", "Paris", "a"], 2)
    return o


def chat_body(rng: random.Random, tools_ok: bool = True) -> dict:
    msgs = [{"role": "system", "content": "Réponds en français 🇫🇷."}] if rng.random() < 0.3 else []
    msgs.append({"role": "user", "content": rng.choice(TEXTS)})
    body = {"messages": msgs, "max_tokens": rng.randint(1, 40), **options(rng)}
    if rng.random() < 0.15:      # a prefilled assistant turn, continued
        body["messages"].append({"role": "assistant", "content": rng.choice(["The answer is", "Sure! 🎉"])})
        body.update(continue_final_message=True, add_generation_prompt=False)
    elif tools_ok and rng.random() < 0.3:
        body["messages"] = [{"role": "user", "content": rng.choice(TOOL_PROMPTS)}]
        body["tools"] = [WEATHER] + ([TIME] if rng.random() < 0.5 else [])
        body["tool_choice"] = rng.choice(["auto", "required",
                                          {"type": "function", "function": {"name": "get_weather"}}])
    return body


def cut_stops(rng: random.Random, text: str) -> list[str]:
    if len(text) < 3:
        return []
    out = []
    for _ in range(rng.randint(1, 2)):
        i = rng.randint(1, len(text) - 2)
        out.append(text[i:i + rng.randint(1, 4)])
    return out


# ---- /v1/chat/completions -------------------------------------------------------------------------------------------
def chat_streamed(events: list, n: int) -> dict:
    assert events[-1][1] == "[DONE]"
    got, usage = {}, None
    for _, e in events[:-1]:
        assert "error" not in e, e
        usage = e.get("usage") or usage
        for c in e["choices"]:
            m = got.setdefault(c["index"], {"content": "", "calls": {}, "finish": None, "lp": None, "stop": "unset"})
            d = c["delta"]
            m["content"] += d.get("content") or ""
            for tc in d.get("tool_calls") or []:
                t = m["calls"].setdefault(tc["index"], {"name": "", "arguments": ""})
                t["name"] += (tc.get("function") or {}).get("name") or ""
                t["arguments"] += (tc.get("function") or {}).get("arguments") or ""
            if c.get("finish_reason"):
                m["finish"], m["stop"] = c["finish_reason"], c.get("stop_reason")
            if c.get("logprobs") is not None:
                assert m["lp"] is None      # a choice's logprobs come once, with its final chunk
                m["lp"] = c["logprobs"]
    assert sorted(got) == list(range(n))
    return {i: (m["content"], m["calls"], m["finish"], m["lp"], m["stop"]) for i, m in got.items()}, usage


def chat_whole(reply: dict) -> dict:
    out = {}
    for c in reply["choices"]:
        m = c["message"]
        calls = {k: {"name": t["function"]["name"], "arguments": t["function"]["arguments"]}
                 for k, t in enumerate(m.get("tool_calls") or [])}
        out[c["index"]] = (m.get("content") or "", calls, c["finish_reason"], c["logprobs"], c.get("stop_reason"))
    return out


def check_chat(url: str, seed: int):
    rng = random.Random(f"chat-{seed}")
    body = chat_body(rng)
    if rng.random() < 0.4:
        body["logprobs"] = True
        if rng.random() < 0.7:
            body["top_logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.3:
        body["n"] = 2
    if rng.random() < 0.5:
        body["stop"] = cut_stops(rng, ok(post(url, "/v1/chat/completions", body))["choices"][0]["message"]["content"]
                                 or "") or None
    whole = ok(post(url, "/v1/chat/completions", body))
    usage = rng.random() < 0.6
    streamed, su = chat_streamed(ok(post(url, "/v1/chat/completions", {
        **body, "stream": True, "stream_options": {"include_usage": usage}})), body.get("n", 1))
    w = chat_whole(whole)
    for i, s in streamed.items():
        if w[i][2] == "length" and s[1] and not w[i][1]:
            continue    # by design: a call cut by max_tokens streams in part, and is no call of the reply's
        assert s == w[i], (seed, i, body)
    assert su == (whole["usage"] if usage else None), (seed, body)


# ---- /v1/completions ------------------------------------------------------------------------------------------------
def check_completion(url: str, seed: int):
    rng = random.Random(f"comp-{seed}")
    body = {"prompt": rng.choice(TEXTS), "max_tokens": rng.randint(1, 40), **options(rng)}
    if rng.random() < 0.4:
        body["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.3:
        body["n"] = 2
    if rng.random() < 0.3:
        body["echo"] = True
    if rng.random() < 0.5:
        body["stop"] = cut_stops(rng, ok(post(url, "/v1/completions", {**body, "echo": False}))["choices"][0][
            "text"]) or None
    whole = ok(post(url, "/v1/completions", body))
    events = ok(post(url, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[-1][1] == "[DONE]"
    got, usage = {}, None
    for _, e in events[:-1]:
        usage = e.get("usage") or usage
        for c in e["choices"]:
            m = got.setdefault(c["index"], {"text": "", "finish_reason": None, "logprobs": None, "stop_reason": 0})
            m["text"] += c["text"]
            if c["finish_reason"]:
                m.update(finish_reason=c["finish_reason"], stop_reason=c["stop_reason"], logprobs=c["logprobs"])
    for c in whole["choices"]:
        assert got[c["index"]] == {k: c[k] for k in ("text", "finish_reason", "logprobs", "stop_reason")}, (seed, body)
    assert usage == whole["usage"], (seed, body)


# ---- /v1/responses, /v1/messages --------------------------------------------------------------------------------
def responses_body(body: dict) -> dict:
    out = {k: v for k, v in body.items() if k not in ("messages", "max_tokens", "tool_choice", "tools")}
    out.update(input=body["messages"], max_output_tokens=body["max_tokens"])
    if "tools" in body:
        out["tools"] = [{"type": "function", **t["function"]} for t in body["tools"]]
        tc = body["tool_choice"]
        out["tool_choice"] = tc if isinstance(tc, str) else {"type": "function", "name": tc["function"]["name"]}
    return out


def messages_body(body: dict) -> dict:
    msgs = body["messages"]
    out = {k: v for k, v in body.items() if k not in ("messages", "stop", "tools", "tool_choice")}
    if msgs[0]["role"] == "system":
        out["system"], msgs = msgs[0]["content"], msgs[1:]
    out["messages"] = msgs
    if body.get("stop"):
        out["stop_sequences"] = body["stop"]
    if "tools" in body:
        out["tools"] = [{"name": t["function"]["name"], "description": t["function"]["description"],
                         "input_schema": t["function"]["parameters"]} for t in body["tools"]]
        tc = body["tool_choice"]
        out["tool_choice"] = {"type": {"auto": "auto", "required": "any"}[tc]} if isinstance(tc, str) else \
            {"type": "tool", "name": tc["function"]["name"]}
    return out


def check_responses(url: str, body: dict, seed) -> dict:
    rb = responses_body(body)
    whole = ok(post(url, "/v1/responses", rb))
    items, final = {}, None
    for kind, e in ok(post(url, "/v1/responses", {**rb, "stream": True})):
        assert kind != "error", e
        if kind == "response.output_item.added":
            items[e["output_index"]] = {"type": e["item"]["type"], "text": "", "name": e["item"].get("name")}
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta",
                      "response.function_call_arguments.delta"):
            items[e["output_index"]]["text"] += e["delta"]
        elif kind == "response.output_item.done":
            items[e["output_index"]]["status"] = e["item"]["status"]
        elif kind in ("response.completed", "response.incomplete"):
            final = e["response"]
    want = {i: {"type": it["type"], "status": it["status"], "name": it.get("name"),
                "text": it["arguments"] if it["type"] == "function_call" else it["content"][0]["text"]}
            for i, it in enumerate(whole["output"])}
    assert items == want, (seed, rb)
    assert strip(final) == strip(whole), (seed, rb)
    return whole


def check_messages(url: str, body: dict, seed) -> dict:
    from amphista_engine.serving.anthropic_messages import _input
    mb = messages_body(body)
    whole = ok(post(url, "/v1/messages", mb))
    blocks, start, delta = {}, None, None
    for kind, e in ok(post(url, "/v1/messages", {**mb, "stream": True})):
        assert kind != "error", e
        if kind == "message_start":
            start = e["message"]
        elif kind == "content_block_start":
            b = e["content_block"]
            blocks[e["index"]] = {"type": b["type"], "name": b.get("name"), "text": ""}
        elif kind == "content_block_delta":
            d = e["delta"]
            blocks[e["index"]]["text"] += d.get("text") or d.get("thinking") or d.get("partial_json") or ""
        elif kind == "message_delta":
            delta = e
    got = {i: (b["type"], b["name"], _input(b["text"]) if b["type"] == "tool_use" else b["text"])
           for i, b in blocks.items()}
    want = {i: (b["type"], b.get("name"), b["input"] if b["type"] == "tool_use" else b.get("text", b.get("thinking")))
            for i, b in enumerate(whole["content"])}
    assert got == want, (seed, mb)
    assert delta["delta"] == {"stop_reason": whole["stop_reason"], "stop_sequence": whole["stop_sequence"]}, (seed, mb)
    assert delta["usage"] == whole["usage"], (seed, mb)
    assert start["usage"]["input_tokens"] == whole["usage"]["input_tokens"], (seed, mb)
    return whole


def check_across(url: str, eng, seed: int):
    """One chat through the three chat routes (each also streamed, above), Engine.generate, and the other method."""
    rng = random.Random(f"cross-{seed}")
    body = chat_body(rng)
    tools = "tools" in body
    if not tools and rng.random() < 0.6:
        body["stop"] = cut_stops(rng, ok(post(url, "/v1/chat/completions", body))["choices"][0]["message"][
            "content"] or "") or None
    chat = ok(post(url, "/v1/chat/completions", body))
    resp, msg = check_responses(url, body, seed), check_messages(url, body, seed)
    m, choice = chat["choices"][0]["message"], chat["choices"][0]
    texts = (m["content"] or "", "".join(it["content"][0]["text"] for it in resp["output"] if it["type"] == "message"),
             "".join(b["text"] for b in msg["content"] if b["type"] == "text"))
    assert texts[0] == texts[1] == texts[2], (seed, body, texts)
    cu, ru, mu = chat["usage"], resp["usage"], msg["usage"]
    assert (cu["prompt_tokens"], cu["completion_tokens"]) == (ru["input_tokens"], ru["output_tokens"]) == \
        (mu["input_tokens"], mu["output_tokens"]), (seed, body)
    assert (choice["finish_reason"] == "length") == (msg["stop_reason"] == "max_tokens"), (seed, body)
    if tools:
        calls = [(t["function"]["name"], json.loads(t["function"]["arguments"])) for t in m.get("tool_calls") or []]
        assert calls == [(it["name"], json.loads(it["arguments"])) for it in resp["output"]
                         if it["type"] == "function_call" and it["status"] == "completed"], (seed, body)
        uses = [(b["name"], b["input"]) for b in msg["content"] if b["type"] == "tool_use"]
        assert calls == (uses[:len(calls)] if msg["stop_reason"] == "max_tokens" else uses), (seed, body)
        assert (choice["finish_reason"] == "tool_calls") == (msg["stop_reason"] == "tool_use"), (seed, body)
        return
    assert resp["status"] == ("incomplete" if choice["finish_reason"] == "length" else "completed"), (seed, body)
    if choice["finish_reason"] == "stop" and isinstance(choice["stop_reason"], str):
        assert msg["stop_sequence"] == choice["stop_reason"], (seed, body)
    kw = {k: v for k, v in body.items() if k not in ("messages", "max_tokens")}
    kw["logit_bias"] = {int(t): v for t, v in kw.get("logit_bias", {}).items()} or None
    kw["speculative"] = None if kw.get("speculative") in (None, "none") else kw["speculative"]
    assert eng.generate(body["messages"], max_new_tokens=body["max_tokens"], **kw).text == texts[0], (seed, body)
    other = "none" if body.get("speculative") == "amphista" else "amphista"
    scored = {**body, "logprobs": True, "top_logprobs": 3}
    a, b = ok(post(url, "/v1/chat/completions", scored)), ok(post(url, "/v1/chat/completions",
                                                                  {**scored, "speculative": other}))
    assert strip(a["choices"]) == strip(b["choices"]) and a["usage"] == b["usage"], (seed, body)


@pytest.mark.parametrize("seed", range(2))
def test_streamed_equals_whole_and_routes_agree(url, seed):
    base, eng = url
    check_chat(base, seed)
    check_completion(base, seed)
    rng = random.Random(f"routes-{seed}")
    body = chat_body(rng)
    check_responses(base, body, seed)
    check_messages(base, body, seed)
    check_across(base, eng, seed)


# ---- regressions ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_tool_choice_grammar_error_names_tool_choice_on_every_route(url, choice):
    """tool_choice "required" or a named function holds the answer to a grammar the engine calls response_format:
    before, /v1/chat/completions and /v1/messages refused ignore_eos with it as "ignore_eos does not mix with
    response_format", a field the client never sent (/v1/responses said tool_choice)."""
    base, _ = url
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 5, "ignore_eos": True,
            "tools": [WEATHER],
            "tool_choice": "required" if choice == "required" else {"type": "function",
                                                                    "function": {"name": "get_weather"}}}
    for path, sent in (("/v1/chat/completions", body), ("/v1/chat/completions", {**body, "stream": True}),
                       ("/v1/responses", responses_body(body)), ("/v1/messages", messages_body(body))):
        status, reply = post(base, path, sent)
        assert status == 400, (path, reply)
        message = reply["error"]["message"]
        assert message.startswith("ignore_eos does not mix with tool_choice"), (path, message)
        assert "response_format" not in message and "text.format" not in message, (path, message)


@pytest.mark.parametrize("field, value", [("guided_choice", ["yes", "no"]),
                                          ("structured_outputs", {"regex": "[a-z]+"})])
def test_a_vllm_constraint_error_names_the_field_sent(url, field, value):
    """A vLLM constraint's error named response_format where the engine's message had it past its start."""
    base, _ = url
    status, reply = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 5, "ignore_eos": True, field: value})
    assert status == 400, reply
    name = field if field == "guided_choice" else "structured_outputs.regex"
    assert reply["error"]["message"].startswith(f"ignore_eos does not mix with {name}:"), reply
    assert "response_format" not in reply["error"]["message"], reply


def test_message_start_counts_the_prompt_truncate_prompt_tokens_keeps(url):
    """A streamed /v1/messages with truncate_prompt_tokens: message_start's usage said the whole prompt's tokens (71),
    message_delta and the non-streamed reply the 20 the run kept (a client reading input_tokens at message_start, as
    LangChain's does, counted 71)."""
    base, _ = url
    body = {"messages": [{"role": "user", "content": "Tell me a story " * 10}], "max_tokens": 3,
            "truncate_prompt_tokens": 20}
    whole = ok(post(base, "/v1/messages", body))
    events = dict(ok(post(base, "/v1/messages", {**body, "stream": True})))
    assert whole["usage"]["input_tokens"] == 20
    assert events["message_start"]["message"]["usage"]["input_tokens"] == 20
    assert events["message_delta"]["usage"] == whole["usage"]
    assert ok(post(base, "/v1/chat/completions", body))["usage"]["prompt_tokens"] == 20
    # a prompt shorter than the cut keeps its own count
    short = {**body, "truncate_prompt_tokens": 500}
    events = dict(ok(post(base, "/v1/messages", {**short, "stream": True})))
    assert events["message_start"]["message"]["usage"]["input_tokens"] == \
        ok(post(base, "/v1/messages", short))["usage"]["input_tokens"] > 20
