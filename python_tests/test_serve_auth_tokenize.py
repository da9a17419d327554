"""`amphista serve --api-key` (Bearer auth on every path but /health and /metrics, as vLLM's --api-key), vLLM's
POST /tokenize and /detokenize, and /v1/models' max_model_len: over real HTTP on the tiny random model."""
from __future__ import annotations

import http.client
import json
import re
import signal
import urllib.error
import urllib.request

import pytest

from amphista_engine.errors import InputError
from test_serve import SYSTEM_USER, call, error_of
from test_serve_metrics import scrape, value

pytestmark = pytest.mark.usefixtures("one_thread_module")

KEY = "sk-test-0123456789abcdef"
# a small tool: the Hermes system text that carries it into a template without tools takes ~450 tokens already
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


def req(url: str, path: str, body=None, method=None, authorization: str | None = None):
    """(status, parsed JSON reply, headers) of one request with an optional Authorization header."""
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    data = None if body is None else json.dumps(body).encode()
    r = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(r, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        assert "Traceback" not in text, text
        return e.code, json.loads(text), e.headers


def refused(reply, status: int = 401) -> dict:
    got, body, headers = reply
    assert got == status, body
    err = body["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error", err
    assert KEY not in json.dumps(body)
    assert headers["WWW-Authenticate"].startswith("Bearer")
    return err


@pytest.fixture(scope="module")
def keyed(tiny_amphista_engine):
    """(engine, URL, log lines): a server that asks for KEY."""
    from conftest import serving
    lines: list[str] = []
    with serving(tiny_amphista_engine, model_id="tiny-llama", log=lines.append, api_key=KEY,
                 defaults=dict(max_new_tokens=8)) as httpd:
        yield tiny_amphista_engine, httpd.url, lines


@pytest.fixture(scope="module")
def open_server(tiny_fp32_amphista4_engine):
    """(engine, URL): a server without a key, its cache long enough for a prompt with tools (512 tokens)."""
    from conftest import serving
    with serving(tiny_fp32_amphista4_engine, model_id="tiny-llama", log=lambda line: None,
                 defaults=dict(max_new_tokens=8)) as httpd:
        yield tiny_fp32_amphista4_engine, httpd.url


# ---- --api-key ------------------------------------------------------------------------------------------------
def test_a_keyed_server_answers_only_requests_with_its_key(keyed):
    _, url, lines = keyed
    chat = {"messages": SYSTEM_USER, "max_tokens": 4}
    assert "requires an API key" in refused(req(url, "/v1/models"))["message"]
    assert "invalid API key" in refused(req(url, "/v1/models", authorization="Bearer wrong"))["message"]
    refused(req(url, "/v1/models", authorization=KEY))                        # no scheme
    refused(req(url, "/v1/models", authorization=f"Basic {KEY}"))
    refused(req(url, "/v1/models", authorization=f"Bearer {KEY}x"))           # a longer key is not a match
    refused(req(url, "/v1/chat/completions", chat))
    refused(req(url, "/chat/completions", chat))         # the alias without /v1 is no way round the key
    refused(req(url, "/models"))
    refused(req(url, "/tokenize", {"prompt": "hi"}))
    refused(req(url, "/detokenize", {"tokens": [1]}))
    refused(req(url, "/v1/health"))                      # under /v1/ every path asks, as vLLM's
    refused(req(url, "/v1/no-such-path"))
    assert req(url, "/v1/models", authorization=f"Bearer {KEY}")[0] == 200
    assert req(url, "/v1/models", authorization=f"bearer {KEY}")[0] == 200   # the scheme in any case
    status, reply, _ = req(url, "/v1/chat/completions", chat, authorization=f"Bearer {KEY}")
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"
    assert req(url, "/tokenize", {"prompt": "hi"}, authorization=f"Bearer {KEY}")[0] == 200
    # a load balancer's probe and a scrape carry no key
    assert req(url, "/health")[0] == 200
    m = scrape(url)[1]
    assert value(m, "amphista_request_errors_total", endpoint="/v1/models", status="401") >= 5
    assert value(m, "amphista_request_errors_total", endpoint="/tokenize", status="401") == 1
    assert KEY not in "\n".join(lines) and any(" 401" in ln for ln in lines)


def test_head_and_options_do_not_get_round_the_key(keyed):
    _, url, _ = keyed
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("HEAD", "/v1/models")
    r = conn.getresponse()
    assert r.status == 401 and r.read() == b""
    conn.request("HEAD", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b""
    # a CORS preflight (browsers send it without credentials) answers the allowed methods only, no content
    conn.request("OPTIONS", "/v1/models", headers={"Access-Control-Request-Headers": "authorization"})
    r = conn.getresponse()
    assert r.status == 204 and r.read() == b"" and "authorization" in r.getheader("Access-Control-Allow-Headers")
    conn.request("GET", "/v1/models")        # the same connection, after the preflight: still refused
    r = conn.getresponse()
    assert r.status == 401 and json.loads(r.read())["error"]["code"] == "invalid_api_key"
    conn.close()


def test_api_key_comes_from_the_flag_else_the_environment_and_is_never_quoted(monkeypatch):
    from amphista_engine.cli import build_parser
    from amphista_engine.serving.commands import API_KEY_ENV, api_key
    from amphista_engine.serving.server import OpenAIApp
    parse = build_parser().parse_args
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key(parse(["serve"])) is None
    assert api_key(parse(["serve", "--api-key", KEY])) == KEY
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key(parse(["serve"])) == "from-env"
    assert api_key(parse(["serve", "--api-key", KEY])) == KEY        # the flag wins
    monkeypatch.setenv(API_KEY_ENV, "")
    assert api_key(parse(["serve"])) is None                         # an empty variable: no key
    for bad in ("", "two words", "caf\u00e9"):
        with pytest.raises(InputError, match="--api-key: the API key") as e:
            api_key(parse(["serve", "--api-key", bad]))
        assert not bad or bad not in str(e.value)
    monkeypatch.setenv(API_KEY_ENV, "a\tb")
    with pytest.raises(InputError, match=f"{API_KEY_ENV}: the API key holds a space") as e:
        api_key(parse(["serve"]))
    assert "a\tb" not in str(e.value)
    with pytest.raises(InputError, match="api_key must be a string"):
        OpenAIApp(object(), api_key=123)


def test_amphista_serve_takes_the_key_from_the_environment_and_never_prints_it(tiny_hf_dir):
    from test_serve import serve_process
    with serve_process(tiny_hf_dir, "--max-new-tokens", "4", env={"AMPHISTA_API_KEY": KEY}) as (url, line, lines,
                                                                                                proc):
        assert "API key required" in line
        refused(req(url, "/v1/models", authorization="Bearer nope"))
        status, reply, _ = req(url, "/v1/chat/completions", {"messages": SYSTEM_USER},
                               authorization=f"Bearer {KEY}")
        assert status == 200 and reply["usage"]["completion_tokens"] <= 4
        assert req(url, "/health")[0] == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    err = "".join(lines) + err
    assert KEY not in err and KEY not in out and "Traceback" not in err
    assert re.search(r'"GET /v1/models" 401', err) and re.search(r'"POST /v1/chat/completions" 200', err)


# ---- /v1/models, /tokenize, /detokenize -----------------------------------------------------------------------
def test_models_report_max_model_len(open_server):
    engine, url = open_server
    (model,) = call(url, "/v1/models")[1]["data"]
    assert model["max_model_len"] == engine.max_seq_len == 512
    assert call(url, "/v1/models/tiny-llama")[1]["max_model_len"] == 512


def test_tokenize_counts_what_a_completion_prefills_and_detokenize_reverses_it(open_server):
    engine, url = open_server
    text = "The quick brown fox jumps over the lazy dog."
    status, tok = call(url, "/tokenize", {"prompt": text})
    assert status == 200 and set(tok) == {"count", "max_model_len", "tokens"}
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    assert all(isinstance(t, int) for t in tok["tokens"])
    reply = call(url, "/v1/completions", {"prompt": text, "max_tokens": 2})[1]
    assert tok["count"] == reply["usage"]["prompt_tokens"]
    bare = call(url, "/tokenize", {"prompt": text, "add_special_tokens": False})[1]
    assert tok["tokens"] == [engine.tokenizer.bos_id] + bare["tokens"]     # the tiny tokenizer adds a BOS
    assert call(url, "/detokenize", {"tokens": bare["tokens"]}) == (200, {"prompt": text})
    assert call(url, "/v1/detokenize", {"tokens": tok["tokens"]})[1]["prompt"].endswith(text)
    assert call(url, "/detokenize", {"tokens": []}) == (200, {"prompt": ""})
    strs = call(url, "/tokenize", {"prompt": text, "return_token_strs": True})[1]
    assert len(strs["token_strs"]) == tok["count"] and all(isinstance(s, str) for s in strs["token_strs"])


def test_tokenize_messages_counts_what_a_chat_completion_prefills(open_server):
    _, url = open_server
    cases = [{"messages": SYSTEM_USER},
             {"messages": SYSTEM_USER, "chat_template_kwargs": {"unused_flag": True}},
             # tools in the prompt (tool_choice none: the answer is text), as a chat request renders them
             {"messages": SYSTEM_USER[1:], "tools": TOOLS, "tool_choice": "none"}]
    counts = []
    for body in cases:
        status, tok = call(url, "/tokenize", body)
        assert status == 200, tok
        reply = call(url, "/v1/chat/completions", {**body, "max_tokens": 2})[1]
        assert tok["count"] == reply["usage"]["prompt_tokens"] == len(tok["tokens"]), (body, reply)
        counts.append(tok["count"])
    assert counts[2] > counts[0] + 100      # the tools are in the prompt
    # without the assistant turn's opening, the prompt ends with the last message
    without = call(url, "/tokenize", {"messages": SYSTEM_USER, "add_generation_prompt": False})[1]
    assert 0 < without["count"] < counts[0]


def test_bad_tokenize_and_detokenize_requests_are_400s_naming_the_field(open_server):
    engine, url = open_server
    vocab = engine.config.vocab_size
    error_of(call(url, "/tokenize", {}), 400, "prompt", "messages", param="prompt")
    error_of(call(url, "/tokenize", {"prompt": "a", "messages": SYSTEM_USER}), 400, "not both", param="messages")
    error_of(call(url, "/tokenize", {"prompt": 5}), 400, "prompt must be a string", param="prompt")
    error_of(call(url, "/tokenize", {"prompt": "a", "add_special_tokens": "yes"}), 400, "add_special_tokens",
             param="add_special_tokens")
    error_of(call(url, "/tokenize", {"prompt": "a", "add_generation_prompt": True}), 400, "applies to messages",
             param="add_generation_prompt")
    error_of(call(url, "/tokenize", {"messages": SYSTEM_USER, "add_generation_prompt": 1}), 400,
             "add_generation_prompt must be true or false", param="add_generation_prompt")
    error_of(call(url, "/tokenize", {"messages": "hello"}), 400, "messages must be", param="messages")
    error_of(call(url, "/tokenize", {"messages": [{"role": "robot", "content": "x"}]}), 400, "role",
             param="messages[0].role")
    error_of(call(url, "/tokenize", {"messages": SYSTEM_USER, "chat_template_kwargs": {"messages": 1}}), 400,
             "may not set messages", param="chat_template_kwargs")
    error_of(call(url, "/tokenize", raw=b"[1, 2]"), 400, "JSON object")
    error_of(call(url, "/detokenize", {}), 400, "'tokens' is a required field", param="tokens")
    error_of(call(url, "/detokenize", {"tokens": "abc"}), 400, "tokens must be a list", param="tokens")
    for bad, words in (([1, "2"], ("tokens[1]", "integer")), ([1, 2.5], ("tokens[1]", "integer")),
                       ([True], ("tokens[0]", "integer")), ([3, -1], ("tokens[1] is -1", "vocabulary")),
                       ([vocab], (f"tokens[0] is {vocab}", f"0 to {vocab - 1}"))):
        error_of(call(url, "/detokenize", {"tokens": bad}), 400, *words, param="tokens")
    error_of(call(url, "/tokenize"), 405, "takes POST")
    assert call(url, "/health")[0] == 200       # the server goes on
