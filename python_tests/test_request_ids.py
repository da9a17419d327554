"""`amphista serve`'s request ids: every reply carries an x-request-id header (the client's own X-Request-Id where
it sent a sane one, else a fresh one), which the OpenAI SDK reads as `_request_id` / an error's `request_id`, and
which the server's log line for the request carries, so a client-side failure can be matched to it."""
from __future__ import annotations

import http.client
import re
import socket
import time

import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread_module")

KEY = "sk-request-ids"
HEX32 = re.compile(r"[0-9a-f]{32}")
# a system message: without one the template adds its own, longer than the tiny model's 128-token cache
CHAT = dict(model="tiny", messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
            max_tokens=3)


@pytest.fixture(scope="module")
def served(tiny_amphista_engine):
    """(server, its log lines), with an API key so that a 401 can be asked for too."""
    from conftest import serving
    lines: list[str] = []
    with serving(tiny_amphista_engine, model_id="tiny", api_key=KEY, log=lines.append,
                 defaults=dict(max_new_tokens=3)) as httpd:
        yield httpd, lines


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def logged(lines: list[str], rid: str) -> list[str]:
    """The log lines of the request with this id: the server writes one once its reply went out, so a client may
    read its reply before it is there."""
    deadline = time.monotonic() + 10
    while not (found := [ln for ln in lines if ln.endswith(f" | request_id: {rid}")]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers) of one request sent with http.client (headers as bytes, which the SDKs would refuse)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest(method, path)
        for name, value in {"Authorization": f"Bearer {KEY}", **(headers or {})}.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body)
        reply = conn.getresponse()
        reply.read()
        return reply.status, reply.headers
    finally:
        conn.close()


def test_a_fresh_id_per_reply_matches_the_sdk_and_the_log(served, client):
    httpd, lines = served
    response = client.chat.completions.with_raw_response.create(**CHAT)
    rid = response.headers["x-request-id"]
    completion = response.parse()
    assert HEX32.fullmatch(rid) and response.request_id == rid and completion._request_id == rid
    assert completion.id.startswith("chatcmpl-") and rid not in completion.id      # the body's own id is its own
    [line] = logged(lines, rid)
    assert '"POST /v1/chat/completions" 200 | ' in line and "finish: " in line, line
    again = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=2)
    assert HEX32.fullmatch(again._request_id) and again._request_id != rid and again.id.startswith("cmpl-")
    assert logged(lines, again._request_id)


def test_the_clients_own_id_is_echoed_streamed_too(served, client):
    httpd, lines = served
    completion = client.chat.completions.create(**CHAT, extra_headers={"X-Request-Id": "trace-42.abc_DEF"})
    assert completion._request_id == "trace-42.abc_DEF" and logged(lines, "trace-42.abc_DEF")
    with client.chat.completions.with_streaming_response.create(
            **CHAT, stream=True, extra_headers={"X-Request-Id": "stream-7"}) as response:
        assert response.headers["x-request-id"] == "stream-7"
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    assert chunks and all(c.id.startswith("chatcmpl-") for c in chunks)
    [line] = logged(lines, "stream-7")
    assert '" 200 | ' in line, line


@pytest.mark.parametrize("sent", ["has a space", "x" * 129, "caf\xe9", "tab\there", ""])
def test_an_insane_client_id_is_replaced(served, sent):
    httpd, lines = served
    status, headers = raw(httpd.url, "GET", "/v1/models", headers={"X-Request-Id": sent.encode("latin-1")})
    assert status == 200 and HEX32.fullmatch(headers["x-request-id"]), headers["x-request-id"]
    assert logged(lines, headers["x-request-id"]) and not any(sent and sent in ln for ln in lines[-2:])


def test_errors_carry_it(served, client):
    httpd, lines = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**CHAT, "temperature": -1})
    assert HEX32.fullmatch(e.value.request_id)
    assert '" 400 | request_id: ' in logged(lines, e.value.request_id)[0]
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=httpd.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert HEX32.fullmatch(e.value.request_id) and logged(lines, e.value.request_id)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**CHAT, "temperature": -1}, extra_headers={"X-Request-Id": "mine"})
    assert e.value.request_id == "mine"
    for method, path, status in (("GET", "/v1/nowhere", 404), ("DELETE", "/v1/chat/completions", 405),
                                 ("POST", "/v1/models", 405), ("OPTIONS", "/v1/chat/completions", 204),
                                 ("BREW", "/v1/models", 501)):
        got, headers = raw(httpd.url, method, path, headers={"X-Request-Id": f"probe-{status}"})
        assert got == status and headers["x-request-id"] == f"probe-{status}", (method, path, got)
        assert logged(lines, f"probe-{status}"), (method, path)
    got, headers = raw(httpd.url, "POST", "/v1/messages", b"{}")      # Anthropic's SDK reads request-id
    assert got == 400 and headers["request-id"] == headers["x-request-id"]
    assert HEX32.fullmatch(headers["x-request-id"])


def test_a_keep_alive_connection_never_reuses_an_id(served):
    """The handler serves a connection's requests in turn: a later request (one refused before its headers are read
    included) must not get the previous request's id."""
    httpd, lines = served
    host, port = httpd.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        reader = sock.makefile("rb")
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "X-Request-Id: first-one\r\n\r\n".encode())
        first = reply_of(reader)
        # more headers than http.server reads (100): a 431 before this request's headers are parsed
        sock.sendall(b"GET /v1/models HTTP/1.1\r\n" + b"X-Filler: 1\r\n" * 101 + b"\r\n")
        second = reply_of(reader)
    assert first[0] == 200 and first[1]["x-request-id"] == "first-one", first
    assert second[0] == 431 and HEX32.fullmatch(second[1]["x-request-id"]), second
    assert logged(lines, second[1]["x-request-id"])


def reply_of(reader) -> tuple[int, dict]:
    """(status, headers with lower-case names) of the next reply on a connection, its body read past."""
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline().decode("latin-1").strip()):
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    reader.read(int(headers["content-length"]))
    return status, headers
