"""`amphista serve` as clients met it in four leftovers: /v1/messages/count_tokens refused vLLM's
truncate_prompt_tokens (which /v1/messages honours in its input_tokens); a client that half-closes its connection
once its request is out (curl, some proxies) got no reply; a body shorter than its Content-Length held a handler
thread for the handler's 300 s socket timeout; and a misspelt field on /v1/chat/completions or /v1/completions
(max_token, temprature) went unnoticed, where vLLM names the fields it ignored in a warning."""
from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import serving

pytestmark = pytest.mark.usefixtures("one_thread_module")

TIMEOUT = 20.0      # s per socket operation: a server that never answers fails the test instead of holding it
# short: the tiny model's character tokenizer and default chat template fill its 128-token cache fast
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there."}]
ANTHROPIC = {"model": "tiny", "system": "Be terse.", "messages": MESSAGES[1:]}      # the same prompt, Anthropic's way


@pytest.fixture(scope="module")
def server(tiny_amphista_engine):
    lines: list[str] = []
    with serving(tiny_amphista_engine, model_id="tiny", log=lines.append) as httpd:
        yield httpd, lines


def call(url: str, path: str, body) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=TIMEOUT)


def head(path: str, length: int, close: bool = True, chunked: bool = False) -> bytes:
    framing = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length}\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode()


def read_all(s: socket.socket) -> bytes:
    """What the server sent until it closed (a reset after it, where it closed with bytes of ours unread, ends it
    too: what came before is still read first)."""
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def final_reply(raw: bytes) -> tuple[int, bytes]:
    """(status, body) of the final response, past any interim 1xx ones (which an HTTP/1.1 client skips)."""
    while True:
        top, _, rest = raw.partition(b"\r\n\r\n")
        status = int(top.split(b"\r\n")[0].split()[1])
        if status >= 200:
            return status, rest
        raw = rest


# ---- 1. count_tokens takes truncate_prompt_tokens as /v1/messages counts it -----------------------------------------
def test_count_tokens_counts_what_truncate_prompt_tokens_keeps(server):
    httpd, _ = server
    status, _, whole = call(httpd.url, "/v1/messages/count_tokens", ANTHROPIC)
    assert status == 200 and whole["input_tokens"] > 6, whole
    for keep in (5, whole["input_tokens"], whole["input_tokens"] + 50):
        body = {**ANTHROPIC, "truncate_prompt_tokens": keep}
        status, _, counted = call(httpd.url, "/v1/messages/count_tokens", body)
        # was a 400: "'truncate_prompt_tokens' is not a field of /v1/messages/count_tokens"
        assert status == 200, counted
        assert counted["input_tokens"] == min(whole["input_tokens"], keep)
        status, _, message = call(httpd.url, "/v1/messages", {**body, "max_tokens": 1})
        assert status == 200, message
        assert counted["input_tokens"] == message["usage"]["input_tokens"]      # what /v1/messages reports
    for bad in (0, -1, True, 2.5, "5"):
        body = {**ANTHROPIC, "truncate_prompt_tokens": bad}
        status, _, error = call(httpd.url, "/v1/messages/count_tokens", body)
        assert status == 400 and error["type"] == "error", error
        assert error["error"]["message"].startswith("truncate_prompt_tokens must be an integer >= 1"), error
        assert call(httpd.url, "/v1/messages", {**body, "max_tokens": 1})[0] == 400


# ---- 2. a half-closed client gets its reply ---------------------------------------------------------------------
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 6}),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 6}),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "stream": True}),
    ("/v1/messages", {**ANTHROPIC, "max_tokens": 6}),
])
def test_a_half_closed_client_gets_its_reply(server, path, body):
    httpd, lines = server
    status, _, alone = call(httpd.url, path, {**body, "stream": False})
    assert status == 200, alone
    data = json.dumps(body).encode()
    with connect(httpd.url) as s:
        s.sendall(head(path, len(data), close=False) + data)
        s.shutdown(socket.SHUT_WR)          # the request is out; the client still reads (curl does this)
        raw = read_all(s)
    assert raw, lines[-2:]          # was nothing: its EOF was taken for its leaving (a 499 in the log)
    status, reply = final_reply(raw)
    assert status == 200, raw[:300]
    if body.get("stream"):
        assert reply.rstrip().endswith(b"data: [DONE]")
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in reply.decode().splitlines() if line.startswith("data: {"))
        assert text == alone["choices"][0]["message"]["content"]
    else:
        length = int(re.search(rb"(?i)content-length: (\d+)", raw).group(1))
        got = json.loads(reply[:length])
        key = "content" if path == "/v1/messages" else "choices"
        assert got[key] == alone[key]


def test_a_client_that_closes_is_still_found_gone(server, monkeypatch):
    """The other side of the half-close: a client that closes (not half) while its non-streamed answer decodes is
    still dropped (a 499), not decoded to its end for nobody."""
    httpd, lines = server
    engine = httpd.app.engine
    real = engine.stream_batch
    steps: list = []

    def slow(*args, **kwargs):
        for item in real(*args, **kwargs):
            steps.append(1)
            time.sleep(0.05)
            yield item

    monkeypatch.setattr(engine, "stream_batch", slow)
    data = json.dumps({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 60, "ignore_eos": True}).encode()
    s = connect(httpd.url)
    s.sendall(head("/v1/completions", len(data)) + data)
    deadline = time.time() + TIMEOUT
    while len(steps) < 2 and time.time() < deadline:
        time.sleep(0.01)
    s.close()
    deadline = time.time() + TIMEOUT
    while not any('" 499 ' in line for line in lines[-3:]) and time.time() < deadline:
        time.sleep(0.05)
    assert any('" 499 ' in line for line in lines[-3:]), lines[-3:]
    assert len(steps) < 40, len(steps)


# ---- 3. a request body has its own deadline ---------------------------------------------------------------------
def test_a_body_that_never_comes_is_a_408_within_its_deadline(server, monkeypatch):
    from amphista_engine.serving import server as server_module
    monkeypatch.setattr(server_module, "BODY_TIMEOUT_S", 0.3)
    httpd, lines = server
    # fewer bytes than its Content-Length, from a client that keeps the connection open: was held 300 s
    with connect(httpd.url) as s:
        s.sendall(head("/v1/completions", 100, close=False) + b'{"prompt": "hi"')
        raw = read_all(s)           # the server closes after its 408 (the rest may still come)
    status, reply = final_reply(raw)
    assert status == 408, raw[:300]
    assert json.loads(reply)["error"]["message"].startswith("the request body did not all come within 0.3 s")
    # a client that trickles its body a byte at a time is held to the same deadline (not per read)
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1}).encode()
    with connect(httpd.url) as s:
        s.sendall(head("/v1/completions", len(body)))
        for byte in body:
            try:
                s.sendall(bytes([byte]))
            except OSError:         # closed after its 408
                break
            time.sleep(0.05)
        raw = read_all(s)
    assert final_reply(raw)[0] == 408, raw[:300]
    # a chunked body whose chunk never ends, alike
    with connect(httpd.url) as s:
        s.sendall(head("/v1/completions", 0, chunked=True) + b"20\r\n{\"prompt\": ")
        raw = read_all(s)
    assert final_reply(raw)[0] == 408, raw[:300]
    # the 408s are counted and logged as such; the server goes on serving
    assert sum('" 408 ' in line for line in lines[-6:]) == 3, lines[-6:]
    assert call(httpd.url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1})[0] == 200


def test_the_body_deadline_is_the_bodys_only(server, monkeypatch):
    """Past the body, the handler's own timeout is back: a keep-alive connection idle longer than the body's
    deadline still serves its next request."""
    from amphista_engine.serving import server as server_module
    monkeypatch.setattr(server_module, "BODY_TIMEOUT_S", 0.2)
    httpd, _ = server
    data = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1}).encode()
    with connect(httpd.url) as s:
        for _ in range(2):
            s.sendall(head("/v1/completions", len(data), close=False) + data)
            raw = b""
            while not re.search(rb"\r\n\r\n", raw) or len(raw.partition(b"\r\n\r\n")[2]) < int(
                    re.search(rb"(?i)content-length: (\d+)", raw).group(1)):
                chunk = s.recv(65536)
                assert chunk, raw       # closed: the idle wait took the body's deadline
                raw += chunk
            assert final_reply(raw)[0] == 200, raw[:300]
            time.sleep(0.6)


# ---- 4. unknown fields on chat and completions: answered, and named in a warning ---------------------------------
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}),
])
def test_unknown_fields_are_answered_and_named_in_a_warning(server, path, body):
    httpd, lines = server
    before = len(lines)
    status, headers, reply = call(httpd.url, path, {**body, "max_token": 5, "temprature": 0.7})
    assert status == 200, reply
    rid = {k.lower(): v for k, v in headers.items()}["x-request-id"]
    warnings = [line for line in lines[before:] if "warning" in line]
    assert len(warnings) == 1, lines[before:]        # once per request, naming each field
    assert "'max_token'" in warnings[0] and "'temprature'" in warnings[0] and rid in warnings[0], warnings
    assert path in warnings[0]
    # the fields a client sends that this server reads (OpenAI's, vLLM's, its own): no warning
    before = len(lines)
    known = {**body, "temperature": 0, "top_p": 1, "seed": 1, "n": 1, "user": "u", "stop": None, "stream": False,
             "logit_bias": {}, "presence_penalty": 0, "speculative": "none", "top_k": 0, "metadata": {"a": "b"}}
    assert call(httpd.url, path, known)[0] == 200
    assert not any("warning" in line for line in lines[before:]), lines[before:]


def test_a_client_key_cannot_break_the_warning_line(server):
    httpd, lines = server
    before = len(lines)
    names = {f"x{i}\n\x1b[31m" + "y" * 500: i for i in range(15)}
    assert call(httpd.url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1, **names})[0] == 200
    (warning,) = [line for line in lines[before:] if "warning" in line]
    assert "\n" not in warning and "\x1b" not in warning and "and 5 more" in warning and len(warning) < 1500


def test_every_field_the_routes_read_is_known():
    """The known fields (no warning) hold every name server.py reads off a request body: a field served later and
    not added there would be warned about as ignored."""
    from amphista_engine.serving import server as server_module
    source = Path(server_module.__file__).read_text()
    read = set(re.findall(r"body\.get\(\"(\w+)\"", source)) | set(re.findall(r"body\[\"(\w+)\"\]", source))
    read -= {"tokens", "add_special_tokens", "return_token_strs"}      # /detokenize's and /tokenize's own
    assert read, "no body reads found"
    assert read <= server_module.CHAT_FIELDS | server_module.COMPLETION_FIELDS, \
        read - server_module.CHAT_FIELDS - server_module.COMPLETION_FIELDS
