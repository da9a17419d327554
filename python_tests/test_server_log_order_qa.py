"""A request's access-log line is written before its reply goes out. It was written after the reply's last byte, by
the handler thread, at any time later: a test whose server logged to stderr had finished (its output no longer
captured) when the line came, which landed among the suite's progress dots; and a user's script that stops the
server once it has its answer could lose the line or see it after the next request's."""
from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit

import pytest

from conftest import serving

pytestmark = pytest.mark.usefixtures("one_thread_module")

# The line's writer is slowed: logged after the reply, the client has it long before the line is in `lines`, so
# the test fails every time without the fix instead of only when the handler thread happens to lag.
SLOW_LOG_S = 0.3


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
