"""A request's access-log line is written before its reply goes out. It was written after the reply's last byte, by
the handler thread, at any time later: a test whose server logged to stderr had finished (its output no longer
captured) when the line came, which landed among the suite's progress dots; and a user's script that stops the
server once it has its answer could lose the line or see it after the next request's. A stream's line (and its
/metrics count) is written before its last event ([DONE], response.completed, message_stop; for a stream an error
cut, its error event, on which the SDKs raise): a client that stops reading there found nothing logged yet."""
from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit

import pytest

from amphista_engine.serving.metrics import endpoint
from conftest import relay, serving

pytestmark = pytest.mark.usefixtures("one_thread_module")

# The line's writer is slowed: logged after the reply, the client has it long before the line is in `lines`, so
# the test fails every time without the fix instead of only when the handler thread happens to lag.
SLOW_LOG_S = 0.3
# a system message: without one the template adds its own, longer than the tiny model's 128-token cache
HI = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def logged(tiny_amphista_engine):
    lines: list[str] = []

    def slow_log(line: str):
        time.sleep(SLOW_LOG_S)
        lines.append(line)

    with serving(tiny_amphista_engine, model_id="tiny-llama", log=slow_log) as httpd:
        yield httpd, lines


REQUESTS = {
    "bad request 400": ("POST", "/v1/chat/completions", {"messages": "not a list"}, 400, "| request_id: "),
    "completions 200": ("POST", "/v1/completions", {"prompt": "The fox", "max_tokens": 2}, 200, "| finish: "),
    "health": ("GET", "/health", None, 200, "| request_id: "),
    "head": ("HEAD", "/v1/models", None, 200, "| request_id: "),
    "metrics": ("GET", "/metrics", None, 200, "| request_id: "),
    "preflight": ("OPTIONS", "/v1/chat/completions", None, 204, "| request_id: "),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_the_log_line_is_written_once_the_client_has_its_reply(logged, name):
    httpd, lines = logged
    method, path, body, status, tail = REQUESTS[name]
    url = urlsplit(httpd.url)
    # one keep-alive connection, as openai-python's pool keeps: the reply ends with its Content-Length, not a close
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        before = len(lines)
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        assert reply.status == status, data
        rid = reply.getheader("x-request-id")
        # no wait: the client has its whole reply, so its line is written already
        assert len(lines) == before + 1, f"{name}: the log line was not written before the reply went out"
        line = lines[-1]
        assert f'"{method} {path}" {status}' in line and tail in line and line.endswith(f"request_id: {rid}")
    finally:
        conn.close()


# route, body, the stream's last event (an SSE event's name, else its data)
STREAMS = {
    "chat": ("/chat/completions", {"messages": HI, "max_tokens": 3, "stream": True}, "[DONE]"),
    "completions": ("/completions", {"prompt": "The fox", "max_tokens": 3, "stream": True,
                                     "stream_options": {"include_usage": True}}, "[DONE]"),
    "responses": ("/responses", {"instructions": "Be terse.", "input": "Hi", "max_output_tokens": 3, "stream": True},
                  "response.incomplete"),     # cut by max_output_tokens: OpenAI's last event then
    "messages": ("/messages", {"model": "tiny-llama", "system": "Be terse.", "messages": HI[1:], "max_tokens": 3,
                               "stream": True}, "message_stop"),
}
# read up to the error event: the openai and anthropic SDKs raise on it, reading no further ([DONE], the chat
# routes' last event, follows it)
CUT = "error"


def _stream_up_to_its_last_event(httpd, route: str, body: dict, last: str):
    """POSTs a streamed request and reads its events up to `last` (and no further: the connection stays open, as
    a client that stops there leaves it); (the events' names, the request id)."""
    url = urlsplit(httpd.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1" + route, body=json.dumps(body), headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200, reply.read()
    names, name, data = [], None, None
    while True:
        line = reply.readline()
        assert line, f"the stream ended before {last!r}: {names}"
        line = line.decode("utf-8").rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data = line[len("data: "):]
        elif line == "" and data is not None:
            obj = None if data == "[DONE]" else json.loads(data)
            kind = data if obj is None else obj.get("type") or ("error" if "error" in obj else "chunk")
            names.append(name or kind)
            name, data = None, None
            if names[-1] == last:
                return conn, names, reply.getheader("x-request-id")


@pytest.mark.parametrize("name", list(STREAMS))
def test_a_streams_line_is_written_once_the_client_has_its_last_event(logged, name):
    httpd, lines = logged
    route, body, last = STREAMS[name]
    requests = httpd.app.metrics.requests
    before, counted = len(lines), requests[endpoint(route)]
    conn, names, rid = _stream_up_to_its_last_event(httpd, route, body, last)
    try:
        # no wait: the client has the stream's last event, so its line is written already, and counted
        assert len(lines) == before + 1, f"{name}: the log line was not written before the stream's last event"
        assert requests[endpoint(route)] == counted + 1
        line = lines[-1]
        assert f'"POST /v1{route}" 200 | ' in line and "| finish: " in line, line
        assert line.endswith(f"request_id: {rid}")
    finally:
        conn.close()


@pytest.mark.parametrize("name", list(STREAMS))
def test_a_stream_cut_by_an_error_is_logged_once_before_its_error_event(logged, tiny_amphista_engine, monkeypatch,
                                                                       name):
    httpd, lines = logged
    route, body, _ = STREAMS[name]
    real = tiny_amphista_engine.stream_batch

    def boom(_):
        raise ZeroDivisionError("boom mid-stream")
    # after the run's first step: the headers are out, so the error can only be an event
    monkeypatch.setattr(tiny_amphista_engine, "stream_batch",
                        lambda *args, **kwargs: relay(real(*args, **kwargs), after=boom))
    errors = httpd.app.metrics.errors
    before, failed = len(lines), errors[endpoint(route), "500"]
    conn, names, rid = _stream_up_to_its_last_event(httpd, route, body, CUT)
    try:
        assert len(lines) == before + 1, f"{name}: the log line was not written before the error event"
        assert errors[endpoint(route), "500"] == failed + 1
        line = lines[-1]
        assert f'"POST /v1{route}" 500 (mid-stream: ' in line and "boom mid-stream" in line, line
        assert line.endswith(f"request_id: {rid}")
    finally:
        conn.close()
    # the handler ends the request after its error event ([DONE] too, on the chat routes): still its one line
    time.sleep(2 * SLOW_LOG_S)
    assert len(lines) == before + 1, lines[before:]
