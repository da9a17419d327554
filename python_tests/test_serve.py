"""`amphista serve`: the OpenAI-compatible HTTP server (amphista_engine/serving/), called over real HTTP with
urllib on a tiny random model. Each answer is checked against engine.generate with the same settings: the server
adds a protocol, never other text."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from amphista_engine.errors import InputError
from conftest import relay

pytestmark = pytest.mark.usefixtures("one_thread_module")

SYSTEM_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def served(tiny_amphista_engine):
    """(engine, base URL, app, log lines): a server on a free port in a background thread, plain by default."""
    from conftest import serving
    lines: list[str] = []
    with serving(tiny_amphista_engine, model_id="tiny-llama", log=lines.append,
                 defaults=dict(max_new_tokens=512)) as httpd:
        yield tiny_amphista_engine, httpd.url, httpd.app, lines


def call(url: str, path: str, body=None, method=None, raw: bytes | None = None):
    """(status, parsed JSON reply) of one request; error statuses too."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        assert "Traceback" not in text and "File \"" not in text, text
        return e.code, json.loads(text)


def sse(url: str, path: str, body: dict) -> list:
    """A streamed reply's events: parsed chunks, and "[DONE]" as the string."""
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = r.read().decode()
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def error_of(status_reply, status: int, *words: str, param=None) -> dict:
    got, reply = status_reply
    assert got == status, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    for w in words:
        assert w in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_models_and_health(served):
    _, url, _, _ = served
    assert call(url, "/v1/models") == (200, {"object": "list", "data": [
        {"id": "tiny-llama", "object": "model", "created": pytest.approx(time.time(), abs=600),
         "owned_by": "amphista-engine", "max_model_len": 128}]})
    status, health = call(url, "/health")
    assert status == 200 and health["status"] == "ok" and health["busy"] is False
    assert call(url, "/v1/models/tiny-llama")[1]["id"] == "tiny-llama"
    error_of(call(url, "/v1/models/gpt-4"), 404, "gpt-4", "tiny-llama")


def test_chat_reply_is_generate_with_the_same_settings(served):
    engine, url, _, _ = served
    ref = engine.generate(SYSTEM_USER, 12)
    status, reply = call(url, "/v1/chat/completions", {"model": "whatever", "messages": SYSTEM_USER, "max_tokens": 12})
    assert status == 200
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["model"] == "tiny-llama"
    (choice,) = reply["choices"]
    assert choice["message"] == {"role": "assistant", "content": ref.text}
    assert choice["finish_reason"] == {"eos": "stop", "stop": "stop", "length": "length"}[ref.finish_reason]
    # usage counts the EOS an answer ended on (OpenAI's, vLLM's count); the engine's new_tokens leaves it out
    answer = len(ref.token_ids) + (ref.finish_reason == "eos")
    assert reply["usage"] == {"prompt_tokens": len(ref.prompt_token_ids), "completion_tokens": answer,
                              "total_tokens": len(ref.prompt_token_ids) + answer}
    assert reply["amphista"]["speculative"] is None and reply["amphista"]["new_tokens"] == len(ref.token_ids)
    # max_completion_tokens is the newer name; OpenAI's content parts are the same text
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in SYSTEM_USER]
    again = call(url, "/v1/chat/completions", {"messages": parts, "max_completion_tokens": 12})[1]
    assert again["choices"][0]["message"]["content"] == ref.text


def test_sampled_chat_reply_is_generate_with_the_same_seed(served):
    engine, url, _, _ = served
    settings = dict(temperature=0.9, top_p=0.95, top_k=40, repetition_penalty=1.1, seed=1234)
    ref = engine.generate(SYSTEM_USER, 16, **settings)
    greedy = engine.generate(SYSTEM_USER, 16)
    assert ref.token_ids != greedy.token_ids      # it does sample: the settings reach the engine
    reply = call(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 16, **settings})[1]
    assert reply["choices"][0]["message"]["content"] == ref.text
    assert reply["usage"]["completion_tokens"] == len(ref.token_ids) + (ref.finish_reason == "eos")


def test_streamed_chat_deltas_join_to_the_text(served):
    engine, url, _, _ = served
    ref = engine.generate(SYSTEM_USER, 20)
    events = sse(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 20,
                                               "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk, final = chunks[-1], chunks[-2]
    answer = len(ref.token_ids) + (ref.finish_reason == "eos")      # the EOS it ended on counted
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == {
        "prompt_tokens": len(ref.prompt_token_ids), "completion_tokens": answer,
        "total_tokens": len(ref.prompt_token_ids) + answer}
    assert final["choices"][0]["finish_reason"] == {"eos": "stop", "stop": "stop", "length": "length"}[
        ref.finish_reason] and final["choices"][0]["delta"] == {}
    assert all(c["usage"] is None for c in chunks[:-1])
    middle = chunks[1:-2]
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == ref.text
    assert len(middle) > 1                     # streamed, not sent in one piece
    # without stream_options: no usage chunk, no usage keys
    plain = sse(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 20})
    assert plain[-1] == "[DONE]" and plain[-2]["choices"][0]["finish_reason"] is not None
    assert all("usage" not in c for c in plain[:-1])


def test_completions_are_generate_without_the_template(served, monkeypatch):
    engine, url, _, _ = served
    # a model with a template of its own (the tiny one has none), which a string prompt would get by default
    monkeypatch.setattr(engine.tokenizer, "chat_template",
                        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    prompt = "def f(x):\n    return"
    ref = engine.generate(prompt, 10, chat=False)
    assert len(engine.encode_prompt(prompt)) > len(ref.prompt_token_ids)      # the template is on by default
    status, reply = call(url, "/v1/completions", {"prompt": prompt, "max_tokens": 10})
    assert status == 200 and reply["object"] == "text_completion" and reply["id"].startswith("cmpl-")
    assert reply["choices"][0]["text"] == ref.text
    assert reply["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
    events = sse(url, "/v1/completions", {"prompt": [prompt], "max_tokens": 10})
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == ref.text
    assert all(e["object"] == "text_completion" for e in events[:-1])


def test_stop_strings_cut_the_reply_as_generate_does(served):
    engine, url, _, _ = served
    full = engine.generate(SYSTEM_USER, 30).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    ref = engine.generate(SYSTEM_USER, 30, stop=[stop, "zzzq"])
    assert ref.finish_reason == "stop" and len(ref.text) < len(full)
    for given in ([stop, "zzzq"], stop):
        reply = call(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 30, "stop": given})[1]
        assert reply["choices"][0]["message"]["content"] == ref.text
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["amphista"]["engine_finish_reason"] == "stop"
    events = sse(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 30, "stop": stop})
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == ref.text
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_speculative_request_gives_the_plain_greedy_text(served):
    engine, url, _, _ = served
    ref = engine.generate(SYSTEM_USER, 24)
    reply = call(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 24,
                                               "speculative": "amphista", "tree": "tree-16"})[1]
    assert reply["choices"][0]["message"]["content"] == ref.text
    extra = reply["amphista"]
    assert extra["speculative"] == "amphista" and extra["tree"] == "tree-16" and extra["tau"] >= 1
    events = sse(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 24, "speculative": "amphista"})
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == ref.text
    assert events[-2]["amphista"]["speculative"] == "amphista"
    # the engine's own refusals, in the request's words
    error_of(call(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "speculative": "medusa"}), 400,
             "amphista heads", param="speculative")
    error_of(call(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "tree": "mix-4"}), 400,
             "tree", "speculative='none' decodes plainly", param="tree")
    error_of(call(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "speculative": "amphista",
                                                "tree": "tree-8"}), 400, "unknown tree", param="tree")
    error_of(call(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "speculative": "fast"}), 400,
             "speculative must be one of", param="speculative")
    # a request does not get to make the server open files
    error_of(call(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "speculative": "amphista",
                                                "tree": "/etc/passwd.json"}), 400, "names a file", param="tree")


def test_bad_requests_are_openai_errors_and_the_server_goes_on(served):
    engine, url, _, _ = served
    chat = "/v1/chat/completions"
    error_of(call(url, chat, raw=b"{not json"), 400, "not valid JSON")
    error_of(call(url, chat, raw=b"[1, 2]"), 400, "must be a JSON object")
    error_of(call(url, chat, raw=b"", method="POST"), 400, "no body")
    error_of(call(url, chat, {"model": "x"}), 400, "'messages' is a required field", param="messages")
    error_of(call(url, chat, {"messages": []}), 400, "non-empty", param="messages")
    error_of(call(url, chat, {"messages": [{"role": "wizard", "content": "hi"}]}), 400, "wizard",
             param="messages[0].role")
    error_of(call(url, chat, {"messages": [{"role": "function", "content": "hi"}]}), 400, "not supported")
    error_of(call(url, chat, {"messages": [{"role": "user", "content": 5}]}), 400, "must be a string",
             param="messages[0].content")
    error_of(call(url, chat, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}), 400, "'image_url' parts")
    error_of(call(url, chat, {"messages": [{"role": "user", "content": "\ud800"}]}), 400, "not valid Unicode")
    good = {"messages": SYSTEM_USER, "max_tokens": 4}
    # sampling values: the engine's own messages, which name the value
    error_of(call(url, chat, {**good, "temperature": -1}), 400, "temperature must be finite and >= 0",
             param="temperature")
    error_of(call(url, chat, {**good, "temperature": "hot"}), 400, "temperature must be a number", param="temperature")
    error_of(call(url, chat, {**good, "temperature": [0.5]}), 400, "temperature must be a number")
    error_of(call(url, chat, {**good, "top_p": 0}), 400, "top_p must be in (0, 1]", param="top_p")
    error_of(call(url, chat, {**good, "seed": -3}), 400, "seed must be an integer", param="seed")
    error_of(call(url, chat, {**good, "stop": [""]}), 400, "stop strings must be non-empty", param="stop")
    error_of(call(url, chat, {**good, "stop": 7}), 400, "stop must be a string or a list", param="stop")
    error_of(call(url, chat, {**good, "max_tokens": 0}), 400, "max_tokens must be a positive integer",
             param="max_tokens")
    error_of(call(url, chat, {**good, "max_tokens": True}), 400, "max_tokens must be a positive integer")
    # n > 1 is served now (test_serve_n_choices.py); a bad n is named
    error_of(call(url, chat, {**good, "n": 0}), 400, "n must be an integer >= 1", param="n")
    error_of(call(url, chat, {**good, "stream": "yes"}), 400, "stream must be true or false")
    # penalties and logit_bias are served now (test_serve_logit_options.py); out of OpenAI's range they are named
    error_of(call(url, chat, {**good, "presence_penalty": 2.5}), 400, "presence_penalty must be a number in [-2, 2]",
             param="presence_penalty")
    error_of(call(url, chat, {**good, "tools": [{"type": "function"}]}), 400, "tools")
    # several prompts (and token ids) are served now (test_top_logprobs.py); a mixed list is not
    error_of(call(url, "/v1/completions", {"prompt": ["a", 5]}), 400, "a list of strings", param="prompt")
    error_of(call(url, "/v1/completions", {"prompt": "   "}), 400, "prompt is empty")
    # a prompt longer than the cache (max_seq_len 128): OpenAI's status and code, the engine's message
    err = error_of(call(url, chat, {"messages": [{"role": "user", "content": "fox " * 300}], "max_tokens": 4}), 400,
                   "longer than the cache", "--max-seq-len")
    assert err["code"] == "context_length_exceeded"
    err = error_of(call(url, chat, {**good, "max_tokens": 500}), 400, "exceeds the cache", "max_tokens")
    assert err["code"] == "context_length_exceeded" and "max_new_tokens" not in err["message"]
    # paths and methods
    error_of(call(url, "/v1/embeddings", {"input": "x"}), 404, "unknown path")
    error_of(call(url, "/nowhere"), 404, "unknown path")
    error_of(call(url, chat), 405, "takes POST")
    # n=1 and the defaults OpenAI clients send are served; so is the request after all those errors
    ref = engine.generate(SYSTEM_USER, 4)
    status, reply = call(url, chat, {**good, "n": 1, "presence_penalty": 0, "frequency_penalty": 0,
                                     "logprobs": False, "tool_choice": "none", "user": "me"})
    assert status == 200 and reply["choices"][0]["message"]["content"] == ref.text


def test_a_bug_is_a_500_without_a_traceback_and_the_server_goes_on(served, monkeypatch, capsys):
    engine, url, _, _ = served
    real = engine.stream_batch

    def broken(*args, **kwargs):
        steps = real(*args, **kwargs)

        def failing():          # a bug mid-run: the run has started (its first chunk came) when it strikes
            try:
                yield next(steps)
                raise ZeroDivisionError("boom")
            finally:
                steps.close()
        return failing()
    monkeypatch.setattr(engine, "stream_batch", broken)
    err = error_of(call(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 4}), 500, "boom")
    assert err["type"] == "server_error"
    assert "Traceback" in capsys.readouterr().err         # the operator gets it, on the server's stderr
    # streamed: the headers went out, so the error is an SSE event (OpenAI's clients raise it), then [DONE] (vLLM's
    # end of every stream)
    events = sse(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 4})
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error" and "boom" in events[-2]["error"]["message"]
    assert "Traceback" not in json.dumps(events)
    monkeypatch.setattr(engine, "stream_batch", real)
    ref = engine.generate(SYSTEM_USER, 6)
    assert call(url, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 6})[1][
        "choices"][0]["message"]["content"] == ref.text


def _send(url: str, body: dict) -> socket.socket:
    """A raw connection that sent a chat request."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return s


def _start_stream(url: str, body: dict) -> socket.socket:
    """A raw connection that sent a streamed request and read its headers and first event."""
    s = _send(url, {**body, "stream": True})
    got = b""
    while b"\r\n\r\n" not in got or not got.split(b"\r\n\r\n", 1)[1].count(b"\n\n") >= 2:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    return s


def _wait_idle(app, engine):
    for _ in range(500):
        if not app.lock.locked() and engine._decoding is None:
            return
        time.sleep(0.01)
    raise AssertionError("the server still holds the engine after its client left")


def test_a_client_leaving_mid_stream_stops_the_run_and_the_next_request_is_served(served, monkeypatch):
    engine, url, app, lines = served
    long_body = {"messages": SYSTEM_USER, "max_tokens": 60}
    ref = engine.generate(SYSTEM_USER, 60)
    assert ref.finish_reason == "length"       # 60 tokens to stream, if nobody stopped it
    deltas = sum(1 for _ in engine.stream(SYSTEM_USER, 60))
    # Slowed down (the tiny model would finish before the close is seen), counting the chunks the server asked for
    real, pulled = engine.stream_batch, []

    def paced(item):
        pulled.append(item)
        time.sleep(0.02)
        return item

    def slow(*args, **kwargs):
        return relay(real(*args, **kwargs), each=paced)
    monkeypatch.setattr(engine, "stream_batch", slow)
    s = _start_stream(url, long_body)
    s.close()
    _wait_idle(app, engine)
    assert len(pulled) < deltas // 2, (len(pulled), deltas)      # it stopped decoding for nobody
    assert any('" 499 ' in ln for ln in lines[-3:]), lines[-3:]
    # a client that gives up waiting for a non-streamed answer: nothing is written to find it gone by
    pulled.clear()
    s = _send(url, long_body)
    deadline = time.time() + 30
    while len(pulled) < 2 and time.time() < deadline:
        time.sleep(0.005)
    s.close()
    _wait_idle(app, engine)
    assert len(pulled) < deltas // 2, (len(pulled), deltas)
    assert any('" 499 ' in ln for ln in lines[-3:]), lines[-3:]
    monkeypatch.setattr(engine, "stream_batch", real)
    # the real engine, closed mid-stream: its run must not outlive the request (the next one comes from another
    # thread, which the engine would refuse as overlapping a run)
    s = _start_stream(url, long_body)
    s.close()
    _wait_idle(app, engine)
    status, reply = call(url, "/v1/chat/completions", long_body)
    assert status == 200 and reply["choices"][0]["message"]["content"] == ref.text
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in sse(url, "/v1/chat/completions", long_body)
                   if e != "[DONE]") == ref.text


def test_concurrent_requests_wait_their_turn(served):
    engine, url, _, _ = served
    prompts = [[SYSTEM_USER[0], {"role": "user", "content": f"count to {i}"}] for i in range(4)]
    refs = [engine.generate(p, 24).text for p in prompts]
    got: dict[int, object] = {}

    def one(i):
        body = {"messages": prompts[i], "max_tokens": 24}
        if i % 2:
            got[i] = "".join(e["choices"][0]["delta"].get("content", "")
                             for e in sse(url, "/v1/chat/completions", body) if e != "[DONE]")
        else:
            got[i] = call(url, "/v1/chat/completions", body)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(4):
        text = got[i] if i % 2 else got[i][1]["choices"][0]["message"]["content"]
        assert text == refs[i], (i, got[i])


def test_left_out_max_tokens_fits_the_cache_instead_of_failing(served):
    engine, url, _, _ = served
    messages = [SYSTEM_USER[0], {"role": "user", "content": "fox " * 20}]
    n = len(engine.encode_prompt(messages))
    assert 0 < 128 - n < 512                  # the server's default (512) would not fit the 128-slot cache
    status, reply = call(url, "/v1/chat/completions", {"messages": messages})
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] <= 128 - n
    assert reply["choices"][0]["message"]["content"] == engine.generate(messages, 128 - n).text
    # an explicit speculative method's tree needs room too: the default is cut for it as well, not refused
    status, reply = call(url, "/v1/chat/completions", {"messages": messages, "speculative": "amphista"})
    assert status == 200, reply
    got = reply["usage"]["completion_tokens"]
    assert 1 <= got < 128 - n and reply["amphista"]["speculative"] == "amphista"
    assert reply["choices"][0]["message"]["content"] == engine.generate(messages, got).text


def test_an_error_before_the_body_is_read_does_not_poison_the_connection(served):
    engine, url, _, _ = served
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/nowhere", body=json.dumps({"messages": SYSTEM_USER}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 404 and "unknown path" in json.loads(r.read())["error"]["message"]
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": SYSTEM_USER, "max_tokens": 5}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    assert json.loads(r.read())["choices"][0]["message"]["content"] == engine.generate(SYSTEM_USER, 5).text
    conn.close()


def test_serve_subcommand_parses_its_flags():
    from amphista_engine.cli import build_parser
    from amphista_engine.serving.commands import cmd_serve
    args = build_parser().parse_args(["serve", "--model", "some/dir", "--host", "0.0.0.0", "--port", "0",
                                      "--speculative", "none", "--temperature", "0.7", "--top-p", "0.9", "--seed",
                                      "3", "--stop", "###", "--max-new-tokens", "64", "--max-seq-len", "1024",
                                      "--heads", "none", "--quiet", "--device", "cpu"])
    assert args.func is cmd_serve and args.command == "serve"
    assert (args.model, args.host, args.port, args.speculative, args.temperature, args.top_p, args.seed, args.stop,
            args.max_new_tokens, args.max_seq_len, args.heads, args.quiet) == (
        "some/dir", "0.0.0.0", 0, "none", 0.7, 0.9, 3, ["###"], 64, 1024, "none", True)
    d = build_parser().parse_args(["serve"])
    # temperature unset: filled at start from the model's generation_config.json, else greedy (sampling_defaults)
    assert (d.model, d.host, d.port, d.speculative, d.heads, d.temperature, d.generation_config) == (
        "smollm2-135m", "127.0.0.1", 8000, "auto", "default", None, "auto")
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "serve" in a.choices)
    assert "one request at a time" in sub.choices["serve"].format_help().replace("\n", " ")


def test_a_port_in_use_is_named():
    from amphista_engine.serving.server import bind
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(InputError, match=r"cannot listen on 127\.0\.0\.1:\d+: .*another server"):
            bind("127.0.0.1", taken.server_address[1])
    finally:
        taken.server_close()


@contextlib.contextmanager
def serve_process(tiny_hf_dir, *flags, env=None):
    """`amphista serve` on the tiny model in a child process, up to its URL line: yields (url, that line, the
    stderr lines so far, the process), which the block stops (Ctrl-C) and reads out with proc.communicate()."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AMPHISTA_CACHE_DIR": "off", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "amphista_engine.cli", "serve", "--model", str(tiny_hf_dir),
                             "--port", "0", "--heads", "none", "--max-seq-len", "128", *flags],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1],
                            # a shell's background job ignores SIGINT; Ctrl-C at a terminal is what is tested
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = proc.stderr.readline()
            assert line, f"the server exited: {''.join(lines)}"
            lines.append(line)
            if m := re.search(r"(http://\S+)/v1\b", line):
                break
        else:
            pytest.fail(f"no URL line: {''.join(lines)}")
        yield m.group(1), line, lines, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_amphista_serve_process_answers_and_stops_on_ctrl_c(tiny_hf_dir):
    with serve_process(tiny_hf_dir, "--max-new-tokens", "8") as (url, line, lines, proc):
        # the default --max-batch 8 batches concurrent requests (test_serve_batching.py), and says so
        assert sum("http://" in ln for ln in lines) == 1 and "batched, up to 8 rows, joining runs" in line
        assert call(url, "/v1/models")[1]["data"][0]["id"] == str(tiny_hf_dir)
        status, reply = call(url, "/v1/chat/completions", {"messages": SYSTEM_USER})
        assert status == 200 and reply["usage"]["completion_tokens"] <= 8      # --max-new-tokens: the default
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
    assert "Traceback" not in err and out == ""
