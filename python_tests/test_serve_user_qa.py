"""`amphista serve` as real clients meet it: curl -I and uptime checks (HEAD), a browser frontend on another origin
(CORS preflight), httpx's keep-alive pool (Nagle), httpx-sse's line splitting (U+2028 in a delta), a busy server with
a thousand descriptors open, and malformed requests that must be 400s, not 500s with a traceback."""
from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import time

import pytest

from conftest import relay
from test_serve import SYSTEM_USER, call, served  # noqa: F401 -- the module's server fixture and helpers

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHAT = "/v1/chat/completions"


def _conn(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


def _raw(url: str, data: bytes) -> bytes:
    """What the server answers to these bytes, read until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_head_and_a_browsers_cors_preflight(served):  # noqa: F811
    engine, url, _, _ = served
    conn = _conn(url)
    # HEAD (curl -I, load balancers): GET's status and headers, no body; the connection goes on
    conn.request("HEAD", "/health")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"" and int(r.getheader("Content-Length")) > 0
    conn.request("HEAD", "/v1/models")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b""
    conn.request("GET", "/v1/models")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["data"][0]["id"] == "tiny-llama"
    # the preflight a page on http://localhost:3000 sends before POSTing JSON with an API key
    conn.request("OPTIONS", CHAT, headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "authorization,content-type"})
    r = conn.getresponse()
    assert r.status in (200, 204) and r.read() == b""
    assert r.getheader("Access-Control-Allow-Origin") in ("*", "http://localhost:3000")
    assert "POST" in r.getheader("Access-Control-Allow-Methods")
    allowed = r.getheader("Access-Control-Allow-Headers").lower()
    assert "authorization" in allowed and "content-type" in allowed
    # ... and the replies themselves, JSON and SSE alike, are readable by that page
    body = json.dumps({"messages": SYSTEM_USER, "max_tokens": 3})
    conn.request("POST", CHAT, body=body, headers={"Content-Type": "application/json", "Origin": "http://x"})
    r = conn.getresponse()
    assert r.getheader("Access-Control-Allow-Origin") == "*"
    assert json.loads(r.read())["choices"][0]["message"]["content"] == engine.generate(SYSTEM_USER, 3).text
    conn.request("POST", CHAT, body=json.dumps({"messages": SYSTEM_USER, "max_tokens": 3, "stream": True}),
                 headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    r = conn.getresponse()
    assert r.getheader("Access-Control-Allow-Origin") == "*" and r.read().endswith(b"data: [DONE]\n\n")
    conn.close()


def test_keep_alive_requests_are_not_held_back_by_nagle(served):  # noqa: F811
    _, url, _, _ = served
    conn = _conn(url)      # one connection, as httpx's pool keeps it: headers and body were two small writes
    times = []
    for _ in range(8):
        t = time.perf_counter()
        conn.request("GET", "/v1/models", headers={"Connection": "keep-alive"})
        r = conn.getresponse()
        r.read()
        times.append(time.perf_counter() - t)
        assert r.status == 200
    conn.close()
    # a delayed ACK holds the body back >= 40 ms on Linux; the answer itself takes well under a millisecond
    assert statistics.median(times[1:]) < 0.025, times


def test_unicode_line_separators_in_a_stream_do_not_cut_its_events(served, monkeypatch):  # noqa: F811
    engine, url, _, _ = served
    ref = engine.generate(SYSTEM_USER, 8)
    odd = "\u2028x\u2029y\x85"
    real = engine.stream_batch

    def with_separators(*args, **kwargs):       # a model that writes the separators in its first delta
        first = [True]

        def mark(item):
            row, delta = item
            if first[0] and delta:
                delta, first[0] = odd + delta, False
            return row, delta
        return relay(real(*args, **kwargs), each=mark)
    monkeypatch.setattr(engine, "stream_batch", with_separators)
    conn = _conn(url)
    conn.request("POST", CHAT, body=json.dumps({"messages": SYSTEM_USER, "max_tokens": 8, "stream": True}),
                 headers={"Content-Type": "application/json"})
    text = conn.getresponse().read().decode("utf-8")
    conn.close()
    # httpx's Response.iter_lines (httpx-sse, and what is built on it) splits as str.splitlines does
    events = [line[len("data: "):] for line in text.splitlines() if line]
    assert all(line.startswith("data: ") for line in text.splitlines() if line), text
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
    assert "".join(deltas) == odd + ref.text


def test_a_server_with_a_thousand_descriptors_open_still_answers(served):  # noqa: F811
    engine, url, _, _ = served
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the descriptor limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    held = []
    try:
        # fill every descriptor below 1030 (others' idle keep-alive connections): the server's next socket is above
        # select()'s FD_SETSIZE
        while not held or held[-1] < 1030:
            held.append(os.open(os.devnull, os.O_RDONLY))
        ref = engine.generate(SYSTEM_USER, 6)
        status, reply = call(url, CHAT, {"messages": SYSTEM_USER, "max_tokens": 6})
        assert status == 200 and reply["choices"][0]["message"]["content"] == ref.text
    finally:
        for fd in held:
            os.close(fd)
        if soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_malformed_requests_are_400s_without_a_traceback(served, capsys):  # noqa: F811
    engine, url, _, _ = served
    # a negative chunk size: a 500 "read length must be non-negative" before
    out = _raw(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"-5\r\nabc\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"malformed chunked" in out, out
    # an absolute-form target (a proxy's) whose host does not parse: a 500 (urlsplit's ValueError) before
    out = _raw(url, b"GET http://[::1/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"malformed request target" in out, out
    assert "Traceback" not in capsys.readouterr().err
    # a well-formed chunked body in many small chunks (curl --data-binary @- sends one) is served
    body = json.dumps({"messages": SYSTEM_USER, "max_tokens": 4}).encode()
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    out = _raw(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                    b"Expect: 100-continue\r\nConnection: close\r\n\r\n" + chunks + b"0\r\nX-Trailer: 1\r\n\r\n")
    reply = json.loads(out[out.index(b"\r\n\r\n{") + 4:])
    assert reply["choices"][0]["message"]["content"] == engine.generate(SYSTEM_USER, 4).text


def test_a_percent_encoded_model_id_is_found(served):  # noqa: F811
    _, url, _, _ = served
    # openai-python and others percent-encode the id in /models/{id} (an id with a "/": a --model path)
    status, model = call(url, "/v1/models/tiny%2Dllama")
    assert status == 200 and model["id"] == "tiny-llama"


def test_clients_that_connect_while_the_model_loads_are_queued():
    from amphista_engine.serving.server import bind
    # `amphista serve` binds first and loads the model after: nothing accepts meanwhile, as here
    srv = bind("127.0.0.1", 0)
    socks = []
    try:
        for _ in range(20):      # a burst of clients (a UI's model list, a benchmark's workers)
            socks.append(socket.create_connection(srv.server_address[:2], timeout=0.5))
    finally:
        for s in socks:
            s.close()
        srv.server_close()
    assert len(socks) == 20
