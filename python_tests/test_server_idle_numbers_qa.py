"""Two `amphista serve` leftovers: a new connection that never sent a byte was held the handler's 300 s (a thread
each), like a keep-alive connection idle between requests; and a request body's numbers went through Python's json
as it reads them: NaN and Infinity (not JSON) taken, 1e400 read as inf (a field then said "got inf"), and a schema
bound with more digits than a float holds (0.30000000000000001, 9007199254740993.0) silently rounded."""
from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from test_server_leftovers_qa import TIMEOUT, connect, final_reply, head, read_all, server  # noqa: F401 -- a fixture

pytestmark = pytest.mark.usefixtures("one_thread_module")


def send(url: str, path: str, text: str) -> tuple[int, dict]:
    """POST the body text as written (json.dumps cannot write NaN's literal as a client may, or 1e400)."""
    req = urllib.request.Request(url + path, data=text.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def reply_on(s: socket.socket) -> bytes:
    """One Content-Length reply read off a kept-alive connection."""
    raw = b""
    while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < int(
            re.search(rb"(?i)content-length: (\d+)", raw).group(1)):
        chunk = s.recv(65536)
        assert chunk, raw       # closed
        raw += chunk
    return raw


COMPLETION = '"model": "tiny", "prompt": "hi", "max_tokens": 1'


# ---- 1. a new connection's wait for its first byte is short, and ends quietly ----------------------------------
def test_a_silent_new_connection_is_closed_quietly(server, monkeypatch):  # noqa: F811
    from amphista_engine.serving import server as server_module
    monkeypatch.setattr(server_module, "FIRST_BYTE_TIMEOUT_S", 0.3)
    httpd, lines = server
    before = len(lines)
    with connect(httpd.url) as s:
        s.settimeout(5)         # was held 300 s: the read below timed out with nothing
        assert read_all(s) == b""       # closed with no reply: no request came to answer (nginx, uvicorn alike)
    assert not lines[before:], lines[before:]       # nor a log line ("Request timed out")
    assert send(httpd.url, "/v1/completions", "{" + COMPLETION + "}")[0] == 200


def test_a_prompt_client_and_an_idle_keep_alive_one_are_served(server, monkeypatch):  # noqa: F811
    """The short wait is a new connection's only: one that sends its request at once is served, and once it has been
    served it may stay idle past that wait before its next request (IDLE_TIMEOUT_S's to judge)."""
    from amphista_engine.serving import server as server_module
    monkeypatch.setattr(server_module, "FIRST_BYTE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(server_module, "IDLE_TIMEOUT_S", 300.0)
    httpd, _ = server
    data = ("{" + COMPLETION + "}").encode()
    with connect(httpd.url) as s:
        time.sleep(0.1)
        for _ in range(2):
            s.sendall(head("/v1/completions", len(data), close=False) + data)
            assert final_reply(reply_on(s))[0] == 200
            time.sleep(0.8)     # past FIRST_BYTE_TIMEOUT_S: a kept-alive connection is not held to it


def test_an_idle_keep_alive_connection_is_closed_quietly_after_its_own_wait(server, monkeypatch):  # noqa: F811
    from amphista_engine.serving import server as server_module
    monkeypatch.setattr(server_module, "FIRST_BYTE_TIMEOUT_S", 60.0)
    monkeypatch.setattr(server_module, "IDLE_TIMEOUT_S", 0.3)
    httpd, lines = server
    data = ("{" + COMPLETION + "}").encode()
    with connect(httpd.url) as s:
        s.settimeout(5)
        s.sendall(head("/v1/completions", len(data), close=False) + data)
        assert final_reply(reply_on(s))[0] == 200
        before = len(lines)
        assert read_all(s) == b""       # closed, nothing more sent
    assert not lines[before:], lines[before:]


# ---- 2. a body's numbers as JSON has them ---------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("temperature", "NaN"), ("top_p", "Infinity"), ("seed", "-Infinity"),
    ("frequency_penalty", "NaN"), ("my_extension", "NaN"),     # a field the server ignores too: not JSON
])
def test_nan_and_infinity_literals_are_not_json(server, field, value):  # noqa: F811
    httpd, _ = server
    status, reply = send(httpd.url, "/v1/completions", "{" + COMPLETION + f', "{field}": {value}' + "}")
    assert status == 400, reply
    error = reply["error"]
    # was taken: "temperature must be finite ... got nan", and my_extension's NaN answered (200)
    assert error["message"] == f"{field} is {value}, which is not JSON (JSON has no NaN or Infinity): send a " \
                               "finite number", error
    assert error["param"] == field


@pytest.mark.parametrize("fields, where, param", [
    ('"seed": 1e400', "seed", "seed"),
    ('"temperature": -1E+400', "temperature", "temperature"),
    ('"max_tokens": 1e400', "max_tokens", "max_tokens"),
    ('"logit_bias": {"5": 1e400}', "logit_bias['5']", "logit_bias"),
    ('"guided_json": {"type": "number", "const": 1e400}', "guided_json.const", "guided_json"),
])
def test_a_number_past_a_floats_range_is_named_not_inf(server, fields, where, param):  # noqa: F811
    httpd, _ = server
    status, reply = send(httpd.url, "/v1/completions", "{" + COMPLETION + ", " + fields + "}")
    assert status == 400, reply
    error = reply["error"]
    written = fields.rpartition(": ")[2].rstrip("}")
    # was "seed must be an integer in [0, 2**64) or None, got inf" (a number the client never wrote), and the
    # const's "Unsatisfiable schema: incompatible types"
    assert error["message"].startswith(f"{where} is {written}, past the largest number a 64-bit float holds"), error
    assert error["param"] == param


@pytest.mark.parametrize("schema, where", [
    ('{"type": "number", "maximum": 0.30000000000000001}', "guided_json.maximum"),
    ('{"type": "number", "minimum": 9007199254740993.0}', "guided_json.minimum"),   # was 2^53: past the refusal
    ('{"type": "number", "multipleOf": 1e-400}', "guided_json.multipleOf"),         # was 0: "invalid multiple of"
    ('{"type": "object", "properties": {"p": {"enum": [0.5, 0.10000000000000001]}}}',
     "guided_json.properties.p.enum[1]"),
])
def test_a_schema_number_a_float_cannot_hold_is_refused(server, schema, where):  # noqa: F811
    httpd, _ = server
    status, reply = send(httpd.url, "/v1/completions", "{" + COMPLETION + f', "guided_json": {schema}' + "}")
    assert status == 400, reply
    error = reply["error"]
    assert error["message"].startswith(f"{where} is "), error
    assert "which the grammar engine (llguidance) cannot hold as written" in error["message"], error
    assert error["param"] == "guided_json"
    # the same schema on /v1/chat/completions' response_format, named where it stands
    body = ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "response_format": '
            f'{{"type": "json_schema", "json_schema": {{"name": "x", "schema": {schema}}}}}}}')
    status, reply = send(httpd.url, "/v1/chat/completions", body)
    assert status == 400 and reply["error"]["param"] == "response_format", reply
    assert reply["error"]["message"].startswith(where.replace("guided_json", "response_format.json_schema.schema"))


def test_numbers_a_float_holds_and_sampling_fields_are_read_as_before(server):  # noqa: F811
    """A schema's numbers a float writes back as given (0.3, 1e-5, 17 digits, a trailing zero) are taken; a sampling
    field with more digits than a float holds is rounded, as any OpenAI server reads it, not refused."""
    httpd, _ = server
    schema = ('{"type": "object", "properties": {"p": {"type": "number", "minimum": 0.1, "maximum": 0.30, '
              '"multipleOf": 1e-5}, "q": {"enum": [1.7976931348623157e308, 0.30000000000000004]}, '
              '"const": {"type": "number", "default": 0.30000000000000001}}}')
    status, reply = send(httpd.url, "/v1/completions", "{" + COMPLETION + f', "guided_json": {schema}' + "}")
    assert status == 200, reply
    fields = '"temperature": 0.70000000000000001, "top_p": 0.99999999999999999999, "presence_penalty": 1e-400'
    status, reply = send(httpd.url, "/v1/completions", "{" + COMPLETION + ", " + fields + "}")
    assert status == 200, reply
    # a body with both: the refusal names the number past a float's range (was "got inf"), not the rounded one
    status, reply = send(httpd.url, "/v1/completions", "{" + COMPLETION + ", " + fields + ', "seed": 1e400}')
    assert status == 400 and reply["error"]["param"] == "seed", reply
    assert reply["error"]["message"].startswith("seed is 1e400, past the largest number"), reply


def test_only_schema_fields_numbers_are_held_to_a_float(server):  # noqa: F811
    """The review's find: a long number under a key named like a schema keyword but outside any schema (a template
    variable), or a schema's data (default, examples), got the grammar engine's 400."""
    httpd, _ = server
    long = "0.30000000000000001"
    for extra in (f'"chat_template_kwargs": {{"maximum": {long}}}', f'"chat_template_kwargs": {{"x": {{"enum": [{long}]}}}}',
                  f'"response_format": {{"type": "json_schema", "json_schema": {{"name": "x", "schema": '
                  f'{{"type": "number", "default": {{"const": {long}}}, "examples": [{{"minimum": {long}}}]}}}}}}'):
        body = ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, ' + extra + "}")
        status, reply = send(httpd.url, "/v1/chat/completions", body)
        # (the tiny model's cache is shorter than its chat template's prompt: that 400 comes after the body's read)
        assert status == 200 or "cannot hold as written" not in reply["error"]["message"], (extra, reply)
        assert status == 200 or reply["error"]["code"] == "context_length_exceeded", (extra, reply)
