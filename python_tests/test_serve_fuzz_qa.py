"""A seeded randomized robustness sweep of `amphista serve` (serving/server.py, batching.py) on the tiny model:
random valid requests combining the request fields (sampling, penalties, stops, logprobs, echo, n, the vLLM extras,
structured outputs, tools, reasoning, continue_final_message, streaming), the same bodies with one field mutated to a
wrong type, a bad range, null, a huge or a nested value, malformed JSON, wrong content types and paths, on
/v1/chat/completions, /v1/completions, /tokenize and /detokenize. Every reply must be a 200 or one of OpenAI's error
objects naming the field it is about (never a 500 nor a traceback for client input, never a hang); a streamed greedy
reply must join to the same request's non-streamed one; usage must add up; and after each refused request a plain
one must still get its usual answer (no state poisoned). The cases that found bugs are kept as regression tests at
the end."""
from __future__ import annotations

import http.client
import json
import os
import random
import threading
from urllib.parse import urlsplit

import pytest

pytest.importorskip("llguidance")

from conftest import serving                              # noqa: E402
from test_serve import call, error_of                     # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

# fixed, so that CI runs the same cases each time (the environment variables: a longer or other sweep by hand)
SEED = int(os.environ.get("AMPHISTA_FUZZ_SEED", "1729"))
# 200 in CI (the suite's time); AMPHISTA_FUZZ_CASES=2000 and other AMPHISTA_FUZZ_SEEDs sweep further
CASES = int(os.environ.get("AMPHISTA_FUZZ_CASES", "200"))
TIMEOUT = 30                 # s: a reply that takes longer counts as a hang
OK = {200, 400, 401, 404, 405, 413, 422}
SYSTEM_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The quick brown fox"}]
PLAIN_CHAT = {"model": "tiny", "messages": SYSTEM_USER, "max_tokens": 5}
PLAIN_TEXT = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 5}
TOOLS = [{"type": "function", "function": {"name": "now", "description": "the time",
                                           "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
USER_TEXTS = ["The quick brown fox", "def f(x):", "Hello", "jumps over the lazy dog", "ünï €", "a\u2028b"]
PROMPTS = ["The quick brown fox", "def f(x):", "Speculative decoding", " ", "x"]


def send(url, method, path, raw=None, ctype="application/json", headers=None):
    """(status, content type, text) of one request over a fresh connection, with a timeout."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=raw, headers={**({"Content-Type": ctype} if ctype else {}), **(headers or {})})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read().decode("utf-8")
    except TimeoutError:
        raise AssertionError(f"no reply in {TIMEOUT} s (a hang) to {method} {path} {(raw or b'')[:400]!r}") from None
    except ConnectionError as e:        # the server dropped the connection without a reply
        raise AssertionError(f"no reply ({e!r}) to {method} {path} {(raw or b'')[:400]!r}") from None
    finally:
        conn.close()


def post(url, path, body, stream=False):
    return send(url, "POST", path, json.dumps({**body, "stream": True} if stream else body).encode())


def events_of(text):
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class Sweep:
    """The replies' properties, checked as they come; each broken one is a line in .problems."""

    def __init__(self, url, baseline):
        self.url, self.baseline, self.problems, self.counts = url, baseline, [], {}

    def fail(self, where, what):
        self.problems.append(f"{what} <- {json.dumps(where, default=str)[:300]}")

    def reply(self, where, status, ctype, text, field=None, stream=False):
        """The parsed reply (a dict, a list of SSE events, or the error object), or None where it broke a rule."""
        self.counts[status] = self.counts.get(status, 0) + 1
        if "Traceback" in text or 'File "' in text:
            self.fail(where, f"traceback in a {status} reply")
            return None
        if status not in OK:
            self.fail(where, f"status {status}: {text[:300]}")
            return None
        if status != 200:
            try:
                err = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                self.fail(where, f"{status} without OpenAI's error object: {text[:200]}")
                return None
            if set(err) != {"message", "type", "param", "code"} or not isinstance(err["message"], str) or \
                    not err["message"]:
                self.fail(where, f"{status} error object malformed: {err}")
            elif field is not None and err["param"] is not None and err["param"] != field and \
                    not err["param"].startswith((field + ".", field + "[")) and \
                    err["code"] != "context_length_exceeded":       # OpenAI's param for it: the prompt's
                self.fail(where, f"{status} names param {err['param']!r}, not the mutated {field!r}: {err['message']}")
            return err
        if stream:
            if not ctype.startswith("text/event-stream"):
                self.fail(where, f"a stream answered as {ctype}")
                return None
            events = events_of(text)
            errors = [i for i, e in enumerate(events) if isinstance(e, dict) and "error" in e]
            if errors:
                # what only decoding finds (no token left to choose, say) ends the stream: OpenAI's error object as
                # its last event before [DONE], about the request (a 400's), never a bug's
                err = events[errors[0]]["error"]
                if errors != [len(events) - 2] or events[-1] != "[DONE]" or \
                        err.get("type") != "invalid_request_error" or not err["message"]:
                    self.fail(where, f"an error event mid-stream: {text[-300:]}")
                return None
            if not events or events[-1] != "[DONE]":
                self.fail(where, f"a stream not ended by [DONE]: {text[-300:]}")
                return None
            return events
        try:
            return json.loads(text)
        except ValueError:
            self.fail(where, f"200 whose body is not JSON: {text[:200]}")
            return None

    def probe(self, after):
        """A plain chat and a plain completion still get the answers they got before anything else ran."""
        for path, body in (("/v1/chat/completions", PLAIN_CHAT), ("/v1/completions", PLAIN_TEXT)):
            status, _, text = post(self.url, path, body)
            got = json.loads(text) if status == 200 else text
            if status != 200 or answer(got) != self.baseline[path]:
                self.fail(after, f"the plain request after it got {status}: {str(got)[:200]}")


def answer(reply) -> list:
    """(content or text, reasoning, finish_reason) per choice of a non-streamed reply."""
    out = []
    for c in reply["choices"]:
        if "message" in c:
            out.append((c["message"].get("content") or "", c["message"].get("reasoning_content") or "",
                        c["finish_reason"]))
        else:
            out.append((c["text"], "", c["finish_reason"]))
    return out


def streamed_answer(events, chat) -> list:
    """answer() of a stream: each choice's deltas joined."""
    by: dict[int, list] = {}
    for e in events:
        if e == "[DONE]" or not e["choices"]:
            continue
        c = e["choices"][0]
        one = by.setdefault(c["index"], ["", "", None])
        if chat:
            one[0] += c["delta"].get("content") or ""
            one[1] += c["delta"].get("reasoning_content") or ""
        else:
            one[0] += c["text"]
        if c["finish_reason"] is not None:
            one[2] = c["finish_reason"]
    return [tuple(by[i]) for i in sorted(by)]


# ---- generators ----------------------------------------------------------------------------------------------
def _constraint(rng):
    return rng.choice([
        ("guided_choice", ["red", "blue", "green light"]), ("guided_regex", "[a-c]{1,3}"),
        ("guided_json", SCHEMA), ("guided_json", json.dumps(SCHEMA)), ("guided_grammar", 'root ::= "a" | "bb"'),
        ("structured_outputs", {"choice": ["yes", "no"]}), ("structured_outputs", {"json_object": True}),
        ("structured_outputs", {"regex": "[0-9]+", "disable_fallback": True}),
        ("response_format", {"type": "json_object"}), ("response_format", {"type": "text"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}),
        ("response_format", {"type": "choice", "choices": ["up", "down"]}),
    ])


def _options(rng, chat: bool) -> dict:
    """A random set of valid request fields."""
    pool = {
        "temperature": lambda: rng.choice([0, 0.0, 0.7, 1.3]),
        "top_k": lambda: rng.choice([0, 1, 5, 40]),
        "top_p": lambda: rng.choice([1.0, 0.9, 0.3]),
        "min_p": lambda: rng.choice([0.0, 0.05, 0.3]),
        "repetition_penalty": lambda: rng.choice([1.0, 1.2]),
        "presence_penalty": lambda: rng.choice([-1.5, 0, 0.5, 2]),
        "frequency_penalty": lambda: rng.choice([-2, 0, 1.0]),
        "seed": lambda: rng.choice([0, 7, 2 ** 31]),
        "stop": lambda: rng.choice(["\n", ["e", "the"], [], "fox"]),
        "stop_token_ids": lambda: rng.sample(range(3, 299), rng.randint(1, 3)),
        "min_tokens": lambda: rng.choice([0, 1, 3]),
        "ignore_eos": lambda: rng.random() < 0.5,
        "logit_bias": lambda: {str(rng.randrange(3, 299)): rng.choice([-100, -5, 3, 100])},
        "n": lambda: rng.choice([1, 2, 3]),
        "include_stop_str_in_output": lambda: rng.random() < 0.5,
        "truncate_prompt_tokens": lambda: rng.choice([2, 5, 64]),
        "allowed_token_ids": lambda: rng.sample(range(3, 299), rng.randint(2, 40)),
        "bad_words": lambda: rng.choice([["the"], ["fox jumps", "e"], ["x y z"]]),
        "speculative": lambda: rng.choice(["none", "amphista", "auto"]),
        "cache_prompt": lambda: rng.random() < 0.5,
        "constraint": lambda: None,
        "stream_options": lambda: {"include_usage": rng.random() < 0.7},
    }
    if chat:
        pool["logprobs"] = lambda: True
        pool["top_logprobs"] = lambda: rng.randint(0, 3)
        pool["chat_template_kwargs"] = lambda: {"enable_thinking": rng.random() < 0.5}
        pool["tools"] = lambda: TOOLS
    else:
        pool["logprobs"] = lambda: rng.randint(0, 3)
        pool["echo"] = lambda: rng.random() < 0.5
    out = {}
    for name in rng.sample(sorted(pool), rng.randint(0, 5)):
        if name == "constraint":
            key, value = _constraint(rng)
            out[key] = value
        elif name == "tools":
            out["tools"] = TOOLS
            out["tool_choice"] = rng.choice(["auto", "none", "required",
                                             {"type": "function", "function": {"name": "now"}}])
        else:
            out[name] = pool[name]()
    if out.get("top_logprobs"):
        out["logprobs"] = True
    if out.get("speculative") == "amphista" and rng.random() < 0.5:
        out["tree"] = "tree-16"
    if out.get("echo") and "truncate_prompt_tokens" in out:
        del out["truncate_prompt_tokens"]
    return out


def valid_request(rng) -> tuple[str, dict]:
    chat = rng.random() < 0.6
    body = {"model": "tiny", rng.choice(["max_tokens", "max_completion_tokens"] if chat else ["max_tokens"]):
            rng.randint(1, 6)}
    if chat:
        user = rng.choice(USER_TEXTS)
        content = user if rng.random() < 0.7 else [{"type": "text", "text": user}, {"type": "text", "text": "ok"}]
        body["messages"] = [{"role": rng.choice(["system", "developer"]), "content": "You are terse."},
                            {"role": "user", "content": content}]
        if rng.random() < 0.2:      # a prefilled reply, continued (the reasoning parser primed with its <think>)
            prefill = rng.choice(["<think>hm", "Sure", "<think>a</think>"])
            body["messages"].append({"role": "assistant", "content": prefill})
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
    else:
        body["prompt"] = rng.choice([rng.choice(PROMPTS), [rng.choice(PROMPTS), rng.choice(PROMPTS)],
                                     rng.sample(range(3, 299), 4), [[5, 6, 7], [8, 9]]])
    body.update(_options(rng, chat))
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


FIELDS_COMMON = ["max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "stop", "stop_token_ids", "min_tokens", "ignore_eos", "logit_bias", "n",
                 "include_stop_str_in_output", "truncate_prompt_tokens", "allowed_token_ids", "bad_words",
                 "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
                 "response_format", "speculative", "tree", "stream", "stream_options", "cache_prompt", "logprobs",
                 "model", "guided_decoding_backend", "guided_whitespace_pattern", "best_of", "suffix"]
FIELDS_CHAT = FIELDS_COMMON + ["messages", "top_logprobs", "tools", "tool_choice", "chat_template_kwargs",
                               "continue_final_message", "add_generation_prompt", "max_completion_tokens",
                               "parallel_tool_calls"]
FIELDS_TEXT = FIELDS_COMMON + ["prompt", "echo"]


def bad_value(rng):
    return rng.choice([
        "x", "", "\ud800", 1, -1, 0, 2.5, -7.25, 10 ** 30, -10 ** 30, 1e308, float("nan"), float("inf"), True, False,
        None, [], [1], [-1], ["x"], [None], [[1, 2]], {}, {"a": 1}, {"type": 3}, {"choice": None},
        [[[[[[[[[[[]]]]]]]]]]], {"a": {"b": {"c": {"d": {}}}}}, "a" * 5000, list(range(300)), [10 ** 20],
        {"include_usage": "yes"}, ["\ud800"], {"\ud800": 1}, {"regex": "\ud800"}, {"choice": ["\udfff"]},
        {"type": "regex", "regex": "\ud800"}, {"type": "json_schema", "json_schema": {"schema": {"enum": ["\ud800"]}}},
        {"regex": 5}, {"json": "{"}, {"type": "json_schema", "json_schema": {"schema": 3}},
        "[", "((((", "root ::= ", {"enable_thinking": [1]}, [{"type": "function"}], {"type": "function"},
    ])


def mutated_request(rng) -> tuple[str, dict, str]:
    chat = rng.random() < 0.6
    field = rng.choice(FIELDS_CHAT if chat else FIELDS_TEXT)
    base = dict(PLAIN_CHAT if chat else PLAIN_TEXT)
    base[field] = bad_value(rng)
    return ("/v1/chat/completions" if chat else "/v1/completions"), base, field


def malformed(rng) -> tuple[str, str, bytes | None, str | None, dict]:
    """(method, path, raw body, content type, headers) of a request that is not a JSON object body on a known path
    (or whose Content-Length claims more than the server takes)."""
    path = rng.choice(["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
    raw, ctype = rng.choice([
        (b"{", "application/json"), (b'{"messages": [', "application/json"), (b"\xff\xfe{}", "application/json"),
        (b"null", "application/json"), (b'"text"', "application/json"), (b"[1, 2]", "application/json"),
        (b"", "application/json"), (None, None), (b"a=b&c=d", "application/x-www-form-urlencoded"),
        (json.dumps(PLAIN_CHAT).encode(), "text/plain"), (b"[" * 50000, "application/json"),
        (b'{"messages": NaN}', "application/json"), (b'{"prompt": "x", "max_tokens": 1e999}', "application/json"),
        (b'{"a": 1, "a": 2}', "application/json"), (b"\x00\x01", "application/octet-stream"),
    ])
    method = rng.choice(["POST", "POST", "POST", "GET", "PUT", "DELETE"])
    if rng.random() < 0.05:         # a 413, its body never sent (the server does not wait for it)
        return "POST", path, None, ctype, {"Content-Length": str(64 << 20)}
    return method, path, raw, ctype, {}


def tokenize_request(rng) -> tuple[str, dict, str | None]:
    """A /tokenize or /detokenize body, valid or with one field mutated (its name, or None)."""
    if rng.random() < 0.5:
        body = {"tokens": rng.sample(range(0, 300), rng.randint(0, 8))}
        path = "/detokenize"
    else:
        path = "/tokenize"
        if rng.random() < 0.5:
            body = {"prompt": rng.choice(USER_TEXTS)}
        else:
            body = {"messages": SYSTEM_USER}
            if rng.random() < 0.3:
                body["add_generation_prompt"] = rng.random() < 0.5
            if rng.random() < 0.3:
                body["chat_template_kwargs"] = {"enable_thinking": False}
        for name in ("add_special_tokens", "return_token_strs"):
            if rng.random() < 0.4:
                body[name] = rng.random() < 0.5
    if rng.random() < 0.5:
        return path, body, None
    field = rng.choice(list(body) + ["add_special_tokens", "tools", "continue_final_message"])
    body[field] = bad_value(rng)
    return path, body, field


# ---- the sweep -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_amphista_engine):
    with serving(tiny_amphista_engine, model_id="tiny", reasoning_parser="qwen3", max_batch=4, quiet=True) as httpd:
        baseline = {}
        for path, body in (("/v1/chat/completions", PLAIN_CHAT), ("/v1/completions", PLAIN_TEXT)):
            status, reply = call(httpd.url, path, body)
            assert status == 200, reply
            baseline[path] = answer(reply)
        yield httpd, baseline


def _greedy(body) -> bool:
    return body.get("temperature") in (None, 0, 0.0)


def _check_valid(sweep: Sweep, path: str, body: dict, rng):
    chat = path == "/v1/chat/completions"
    status, ctype, text = post(sweep.url, path, body)
    reply = sweep.reply(body, status, ctype, text)
    if reply is None or status != 200:
        return status
    usage = reply.get("usage") or {}
    if usage.get("total_tokens") != usage.get("prompt_tokens", -1) + usage.get("completion_tokens", -1):
        sweep.fail(body, f"usage does not add up: {usage}")
    prompts = len(body["prompt"]) if not chat and isinstance(body["prompt"], list) and \
        isinstance(body["prompt"][0], (str, list)) else 1
    n = body.get("n", 1)
    if len(reply["choices"]) != n * prompts or [c["index"] for c in reply["choices"]] != list(range(n * prompts)):
        sweep.fail(body, f"{len(reply['choices'])} choices for n={n} x {prompts} prompts")
    limit = body.get("max_tokens", body.get("max_completion_tokens"))
    if usage.get("completion_tokens", 0) > n * prompts * limit:
        sweep.fail(body, f"completion_tokens {usage} past n * max_tokens")
    for c in reply["choices"]:
        if c["finish_reason"] not in ("stop", "length", "tool_calls"):
            sweep.fail(body, f"finish_reason {c['finish_reason']!r}")
    # a greedy request streamed: the same choices, joined from its deltas (a seeded sampled one runs alone: too)
    if prompts == 1 and (_greedy(body) or body.get("seed") is not None) and rng.random() < 0.5 and \
            "tools" not in body:
        status, ctype, text = post(sweep.url, path, body, stream=True)
        events = sweep.reply({**body, "stream": True}, status, ctype, text, stream=True)
        if events is None:
            return 200
        if status != 200:
            sweep.fail(body, f"streamed: {status} where the same request got 200: {events}")
            return 200
        got, want = streamed_answer(events, chat), answer(reply)
        if got != want:
            sweep.fail(body, f"streamed {got} != non-streamed {want}")
        if (body.get("stream_options") or {}).get("include_usage"):
            last = events[-2]
            if last.get("choices") != [] or last.get("usage") != usage:
                sweep.fail(body, f"stream's usage chunk {last} != {usage}")
    return 200


def test_randomized_sweep(server, capfd):
    httpd, baseline = server
    sweep = Sweep(httpd.url, baseline)
    rng = random.Random(SEED)
    valid_ok = valid_n = 0
    for case in range(CASES):
        kind = rng.random()
        if kind < 0.4:
            path, body = valid_request(rng)
            valid_n += 1
            status = _check_valid(sweep, path, body, rng)
            valid_ok += status == 200
            if status != 200:
                sweep.probe(body)
        elif kind < 0.75:
            path, body, field = mutated_request(rng)
            stream = rng.random() < 0.2 or body.get("stream") is True
            status, ctype, text = post(httpd.url, path, body, stream=stream)
            sweep.reply({"case": case, "field": field, **body}, status, ctype, text, field=field,
                        stream=stream and status == 200)
            sweep.probe({"after": case, "field": field})
        elif kind < 0.88:
            method, path, raw, ctype, headers = malformed(rng)
            status, got_type, text = send(httpd.url, method, path, raw, ctype, headers)
            sweep.reply({"case": case, "method": method, "path": path, "raw": (raw or b"")[:40]}, status, got_type,
                        text)
            sweep.probe({"after": case, "raw": (raw or b"")[:40]})
        else:
            path, body, field = tokenize_request(rng)
            status, ctype, text = post(httpd.url, path, body)
            # a null prompt or messages is one left out: the refusal may name the other (send one of them)
            named = None if field is None or body[field] is None else field
            reply = sweep.reply({"case": case, "path": path, **body}, status, ctype, text, field=named)
            if status == 200 and reply is not None and path == "/tokenize":
                if reply["count"] != len(reply["tokens"]):
                    sweep.fail(body, f"count {reply['count']} != {len(reply['tokens'])} tokens")
    # the server's own stderr: a bug's traceback (a 500's, or an error raised past the handler, which socketserver
    # prints) is a problem even where the client got some reply
    if "Traceback" in capfd.readouterr().err:
        sweep.problems.append("a traceback on the server's stderr")
    print(f"\nfuzz: {CASES} cases, statuses {sorted(sweep.counts.items())}, valid {valid_ok}/{valid_n} answered")
    assert not sweep.problems, f"{len(sweep.problems)} problems:\n" + "\n".join(sweep.problems[:400])
    assert valid_ok >= valid_n // 2          # the sweep exercises decoding, not only refusals


def test_concurrent_mixed_requests_share_runs_and_answer_as_alone(server):
    """Threads sending random valid (some streamed) and refused requests at once, many of them with the same new
    fields (min_p, bad_words, allowed_token_ids, include_stop_str_in_output, a guided_choice), which the batch key
    lets share runs: each greedy answer is the one the same request gets alone, and nothing hangs or fails."""
    httpd, baseline = server
    sweep = Sweep(httpd.url, baseline)
    rng = random.Random(SEED + 1)
    shared = [{"min_p": 0.05, "bad_words": ["the"], "include_stop_str_in_output": True, "stop": ["e"]},
              {"allowed_token_ids": list(range(40, 140)), "truncate_prompt_tokens": 30},
              {"guided_choice": ["red", "blue", "green light"], "speculative": "amphista"}]
    bodies = []
    for _ in range(30):
        kind = rng.random()
        if kind < 0.4:
            chat = rng.random() < 0.5
            path, body = ("/v1/chat/completions", {**PLAIN_CHAT, "messages": [
                SYSTEM_USER[0], {"role": "user", "content": rng.choice(USER_TEXTS)}]}) if chat else \
                ("/v1/completions", {**PLAIN_TEXT, "prompt": rng.choice(PROMPTS[:3])})
            body.update(rng.choice(shared), max_tokens=rng.randint(1, 8))
        elif kind < 0.8:
            path, body = valid_request(rng)
        else:
            bodies.append(mutated_request(rng))
            continue
        if rng.random() < 0.3 and not isinstance(body.get("prompt"), list):
            body["stream"] = True
        bodies.append((path, body, None))
    got: dict[int, tuple] = {}

    def worker(k):
        for i in range(k, len(bodies), 6):
            path, body, _ = bodies[i]
            try:
                got[i] = post(httpd.url, path, body)
            except AssertionError as e:         # no reply, or none in time
                got[i] = (0, "", str(e))

    before = sum(httpd.app.batch_sizes.values())
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 6)
    assert not any(t.is_alive() for t in threads), "a concurrent request hung"
    for i, (path, body, field) in enumerate(bodies):
        status, ctype, text = got[i]
        if status == 0:
            sweep.fail(body, text)
            continue
        streamed = bool(body.get("stream")) and status == 200
        reply = sweep.reply(body, status, ctype, text, field=field, stream=streamed)
        if status != 200 or reply is None or not _greedy(body) or field is not None:
            continue
        mine = streamed_answer(reply, path == "/v1/chat/completions") if streamed else answer(reply)
        status, _, text = post(httpd.url, path, {**body, "stream": False})
        if status != 200 or answer(json.loads(text)) != mine:
            sweep.fail(body, f"batched {mine} != alone {text[:300]}")
    sweep.probe("the concurrent requests")
    assert not sweep.problems, f"{len(sweep.problems)} problems:\n" + "\n".join(sweep.problems[:40])
    assert sum(httpd.app.batch_sizes.values()) > before


# ---- the cases the sweep found, as regression tests ----------------------------------------------------------
@pytest.mark.parametrize("path, fields, param", [
    # a lone surrogate quoted in the error message: the reply's encoding raised past the error handling, and the
    # client got no reply at all (the connection closed)
    ("/v1/chat/completions", {"structured_outputs": {"\ud800": 1}}, "structured_outputs.\ud800"),
    # llguidance's bindings raised UnicodeEncodeError: a 500
    ("/v1/chat/completions", {"guided_regex": "\ud800"}, "guided_regex"),
    ("/v1/completions", {"response_format": {"type": "regex", "regex": "a\ud800"}}, "response_format"),
    ("/v1/completions", {"guided_grammar": 'root ::= "\ud800"'}, "guided_grammar"),
    ("/v1/completions", {"guided_json": {"type": "object"}, "guided_whitespace_pattern": "\ud800"},
     "guided_whitespace_pattern"),
])
def test_lone_surrogates_in_constraints_are_400s_naming_the_field(server, path, fields, param):
    httpd, baseline = server
    body = {**(PLAIN_CHAT if path == "/v1/chat/completions" else PLAIN_TEXT), **fields}
    status, ctype, text = post(httpd.url, path, body)
    error_of((status, json.loads(text)), 400, "no key" if "structured_outputs" in fields else "not valid Unicode",
             param=param)
    Sweep(httpd.url, baseline).probe(body)


def test_lone_surrogate_response_format_is_an_input_error_in_the_python_api(tiny_amphista_engine):
    from amphista_engine.errors import InputError
    for rf in ({"type": "regex", "regex": "\ud800"}, {"type": "choice", "choices": ["a", "\udfff"]}):
        with pytest.raises(InputError, match="response_format holds text that is not valid Unicode"):
            tiny_amphista_engine.generate("hi", max_new_tokens=2, response_format=rf)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_405_on_a_route_and_404_elsewhere(server, method):
    """http.server answered them 501 (a method the server does not implement), as no OpenAI server does."""
    httpd, baseline = server
    for path, status in (("/v1/chat/completions", 405), ("/tokenize", 405), ("/v1/models", 405), ("/nowhere", 404)):
        got, _, text = send(httpd.url, method, path, json.dumps(PLAIN_CHAT).encode())
        error_of((got, json.loads(text)), status, method if status == 405 else "unknown path")
    Sweep(httpd.url, baseline).probe(method)


@pytest.mark.parametrize("path, field, value, words", [
    # `value in (None, False, True)` and `value == 0` take 1, 0 and false for booleans and numbers: served as if
    # the field were right (or left out), where the field's other wrong types are refused
    ("/v1/completions", "cache_prompt", 1, "true or false"),
    ("/v1/completions", "echo", 1, "true or false"),
    ("/v1/completions", "ignore_eos", 0, "true or false"),
    ("/v1/chat/completions", "presence_penalty", False, "a number"),
    ("/v1/completions", "min_tokens", False, "min_tokens"),
    ("/v1/completions", "best_of", True, "best_of"),
    # the engine takes an empty value of any type for "no stops"
    ("/v1/completions", "stop", {}, "a string or a list of strings"),
    ("/v1/chat/completions", "stop", False, "a string or a list of strings"),
    # ignored whatever it held: a client's {"include_usage": "true"} lost its usage chunk without a word
    ("/v1/completions", "stream_options", "x", "an object"),
    ("/v1/chat/completions", "stream_options", {"include_usage": "yes"}, "true or false"),
])
def test_wrong_types_that_passed_for_right_ones_are_refused(server, path, field, value, words):
    httpd, _ = server
    body = {**(PLAIN_CHAT if path == "/v1/chat/completions" else PLAIN_TEXT), field: value}
    error_of(call(httpd.url, path, body), 400, words, param=field if field != "stream_options" or
             isinstance(value, str) else "stream_options.include_usage")


def test_engine_refusals_name_the_field_they_are_about(server):
    """The engine's "prompt is empty" and "ignore_eos does not mix with response_format" (the grammar of
    tool_choice "required") came with param null."""
    httpd, _ = server
    error_of(call(httpd.url, "/v1/completions", {**PLAIN_TEXT, "prompt": "  "}), 400, "prompt is empty",
             param="prompt")
    error_of(call(httpd.url, "/v1/chat/completions", {**PLAIN_CHAT, "ignore_eos": True, "tools": TOOLS,
                                                      "tool_choice": "required"}), 400, "ignore_eos",
             param="ignore_eos")


def test_a_logit_bias_key_of_unicode_digits_is_a_400(server):
    """"²" passes str.isdigit() but int() refuses it: a 500 before; now a 400 naming logit_bias."""
    url = server[0].url
    error_of(call(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {"\u00b2": 1}}), 400,
             "logit_bias", param="logit_bias")


@pytest.mark.parametrize("function, where", [
    ({"name": "now", "description": "the \ud800 time"}, "tools[0].function.description"),
    ({"name": "now", "parameters": {"type": "object", "properties": {"tz": {"description": "\udfff"}}}},
     "tools[0].function.parameters.properties.tz.description"),
])
def test_a_lone_surrogate_in_a_tool_is_a_400_naming_where(server, function, where):
    """The chat route refused it as "the prompt's text is not valid Unicode" with param null (the template wrote the
    tool into the prompt, where the tokenizer found it); /v1/responses named tools[i].description."""
    httpd, baseline = server
    body = {**PLAIN_CHAT, "tools": [{"type": "function", "function": function}]}
    error_of(call(httpd.url, "/v1/chat/completions", body), 400, f"{where} is not valid Unicode", param="tools")
    Sweep(httpd.url, baseline).probe(body)
