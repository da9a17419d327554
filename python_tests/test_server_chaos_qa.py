"""A seeded chaos sweep of `amphista serve` on the real 4-bit SmolLM2 with its shipped heads: 4-12 concurrent clients,
each request's behaviour drawn from a seeded RNG (a normal request on chat, completions, responses or messages,
streamed or not, n 1-2, plain or Amphista; a stream dropped after k events or before anything is read; a malformed,
wrong-typed or truncated body; a slow reader; options the server refuses; unknown paths; GET/HEAD on POST routes;
/metrics and /health scrapes). Checked: every well-behaved request's answer (text, finish reason, usage) equals the
same request's alone on the idle server (greedy); no reply is a 500 or a traceback, a refusal is a 4xx naming its
field; nothing hangs; afterwards /metrics counts each request once under its status (499 for clients that left), its
gauges are back at 0, the scheduler holds no job, no thread is left over and the server shuts down."""
from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import needs_smollm2, serving, smollm2_with_shipped_heads

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

TIMEOUT = 60.0          # s per socket operation: a request that hangs fails the sweep instead of holding it
TEXTS = ["The quick brown fox", "def fib(n):", "Write a haiku about the sea.", "List three colors.",
         "What is the capital of France?", "1, 2, 3, 4,"]
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses",
          "messages": "/v1/messages"}
VOLATILE = {"id", "created", "created_at", "completed_at", "amphista", "system_fingerprint", "item_id",
            "response_id"}
# what a refused option is answered with: (route, body change, the param the error names)
BAD_OPTIONS = [("chat", {"temperature": -1}, "temperature"), ("chat", {"n": 0}, "n"),
               ("chat", {"max_tokens": "ten"}, "max_tokens"), ("completions", {"top_p": 2}, "top_p"),
               ("chat", {"speculative": "bogus"}, "speculative"), ("completions", {"stop": 5}, "stop"),
               ("chat", {"messages": 5}, "messages"), ("completions", {"n": 9}, "n"),
               ("responses", {"max_output_tokens": -3}, "max_output_tokens"),
               ("messages", {"max_tokens": "x"}, "max_tokens")]


# ---- one HTTP exchange over a raw socket (so that a client can misbehave at any byte) ------------------------------
def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=TIMEOUT)


def _request_bytes(method: str, path: str, body: bytes | None = None, length: int | None = None,
                   close: bool = True) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n" + ("Connection: close\r\n" if close else "")
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body) if length is None else length}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def _read_all(s: socket.socket, slow: float = 0.0) -> bytes:
    out = b""
    while chunk := s.recv(64 if slow else 65536):
        out += chunk
        if slow:
            time.sleep(slow)
    return out


def _split(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def read_reply(s: socket.socket, buf: bytearray, head_only: bool = False) -> tuple[int, dict, bytes]:
    """One Content-Length reply off a kept-alive connection (buf: what was read past the previous one)."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, bytes(buf)
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    status, headers, _ = _split(bytes(buf[:end]))
    length = 0 if head_only else int(headers["content-length"])
    while len(buf) < end + length:
        chunk = s.recv(65536)
        assert chunk, bytes(buf)
        buf += chunk
    body = bytes(buf[end:end + length])
    del buf[:end + length]
    return status, headers, body


def exchange(url: str, method: str, path: str, body=None, slow: float = 0.0) -> tuple[int, dict, bytes]:
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    with _connect(url) as s:
        s.sendall(_request_bytes(method, path, data))
        return _split(_read_all(s, slow))


def sse_events(body: bytes) -> list:
    text = body.decode("utf-8")
    events = []
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def scrub(obj):
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def answer_of(kind: str, stream: bool, status: int, body: bytes):
    """What must not depend on the other requests: the reply without its ids and timings; a stream's text per
    (choice, event type) and its other events (chunk boundaries may differ)."""
    if not stream:
        return status, scrub(json.loads(body))
    texts: dict = {}
    rest = []
    for e in sse_events(body):
        if e == "[DONE]":
            rest.append(e)
            continue
        e = scrub(e)
        if kind in ("chat", "completions") and e.get("choices"):
            ch = e["choices"][0]
            delta = ch.get("delta", {}).get("content") if kind == "chat" else ch.get("text")
            if delta and ch.get("finish_reason") is None:
                texts[ch["index"]] = texts.get(ch["index"], "") + delta
                continue
        elif isinstance(e.get("delta"), str):           # responses: response.output_text.delta
            texts[e.get("type")] = texts.get(e.get("type"), "") + e["delta"]
            continue
        elif e.get("type") == "content_block_delta" and e["delta"].get("type") == "text_delta":
            texts["text"] = texts.get("text", "") + e["delta"]["text"]
            continue
        if e.get("type") == "response.output_text.delta":
            continue
        rest.append(e)
    return status, texts, rest


# ---- the clients -------------------------------------------------------------------------------------------------
def normal_body(rng: random.Random) -> tuple[str, dict]:
    kind = rng.choice(list(ROUTES))
    text = rng.choice(TEXTS)
    max_tokens = rng.randint(1, 24)
    body: dict = {"model": "smollm2"}
    if kind == "chat":
        body.update(messages=[{"role": "user", "content": text}], max_tokens=max_tokens, n=rng.randint(1, 2))
    elif kind == "completions":
        body.update(prompt=text, max_tokens=max_tokens, n=rng.randint(1, 2))
    elif kind == "responses":
        body.update(input=text, max_output_tokens=max(max_tokens, 16))     # OpenAI's minimum is 16
    else:
        body.update(messages=[{"role": "user", "content": text}], max_tokens=max_tokens)
    if rng.random() < 0.5:
        body["stream"] = True
        if kind in ("chat", "completions") and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.4:
        body["speculative"] = rng.choice(["amphista", "none"])
    if rng.random() < 0.15:
        body["stop_sequences" if kind == "messages" else "stop"] = [rng.choice(["\n", ".", " the", ","])]
    if rng.random() < 0.1:
        # sampled with a seed: runs alone, the same answer each time
        body.update(temperature=0.8, seed=rng.randint(0, 99))
    if kind in ("chat", "completions") and rng.random() < 0.15:
        body.update(logprobs=True, top_logprobs=2) if kind == "chat" else body.update(logprobs=2)
    if kind == "completions" and not body.get("stream") and rng.random() < 0.2:
        body["prompt"] = [body["prompt"], rng.choice(TEXTS)]
    return kind, body


def first_of_two(rng: random.Random) -> tuple[str, str, bytes | None, int]:
    """A request that leaves its connection open for the next: (method, path, body, status)."""
    kind = rng.choice(list(ROUTES))
    return rng.choice([("POST", ROUTES[kind], b'{"model": "smollm2", "messages": [', 400),
                       ("POST", ROUTES[kind], json.dumps({"model": "smollm2", "max_tokens": -1}).encode(), 400),
                       ("POST", "/v1/nope", b"{}", 404), ("HEAD", ROUTES[kind], None, 405),
                       ("GET", "/v1/models", None, 200), ("GET", "/health", None, 200)])


def draw(rng: random.Random, i: int) -> dict:
    """Request i's plan: what its client does."""
    if rng.random() < 0.12:
        kind, body = normal_body(rng)
        body.pop("stream", None)
        body.pop("stream_options", None)
        return {"i": i, "what": "keepalive", "kind": kind, "body": body, "first": first_of_two(rng),
                "pipelined": rng.random() < 0.5}
    r = rng.random()
    if r < 0.45:
        kind, body = normal_body(rng)
        return {"i": i, "what": "normal", "kind": kind, "body": body, "slow": rng.random() < 0.15}
    if r < 0.58:
        kind, body = normal_body(rng)
        body["stream"] = True
        if isinstance(body.get("prompt"), list):
            body["prompt"] = body["prompt"][0]      # a stream takes one prompt
        return {"i": i, "what": "drop", "kind": kind, "body": body, "after": rng.choice([0, 0, 1, 2, 3, 5]),
                "reset": rng.random() < 0.5}
    if r < 0.63:
        kind, body = normal_body(rng)
        body.pop("stream", None)
        body.pop("stream_options", None)
        return {"i": i, "what": "drop", "kind": kind, "body": body, "after": 0, "reset": rng.random() < 0.5}
    if r < 0.73:
        kind = rng.choice(list(ROUTES))
        mode = rng.choice(["json", "type", "truncated", "empty"])
        return {"i": i, "what": "malformed", "kind": kind, "mode": mode}
    if r < 0.82:
        kind, change, param = rng.choice(BAD_OPTIONS)
        _, body = normal_body(random.Random(rng.random()))
        while _ != kind:
            _, body = normal_body(random.Random(rng.random()))
        return {"i": i, "what": "refused", "kind": kind, "body": {**body, **change}, "param": param}
    if r < 0.88:
        return {"i": i, "what": "path", "path": rng.choice(["/v1/nope", "/v2/chat/completions", "/", "/v1/models/x"]),
                "method": rng.choice(["GET", "POST", "HEAD"])}
    if r < 0.93:
        return {"i": i, "what": "method", "kind": rng.choice(list(ROUTES)), "method": rng.choice(["GET", "HEAD"])}
    return {"i": i, "what": "scrape", "path": rng.choice(["/metrics", "/health"]),
            "method": rng.choice(["GET", "HEAD"])}


def assert_clean(status: int, body: bytes, plan):
    assert status != 500 and status < 600, (plan, body[:500])
    text = body.decode("utf-8", "replace")
    assert "Traceback" not in text and 'File "' not in text, (plan, text[:500])


def run_plan(url: str, plan: dict) -> dict:
    """Runs one client; returns its outcome: the statuses its request may be counted under, its answer."""
    what = plan["what"]
    if what == "normal":
        status, _, body = exchange(url, "POST", ROUTES[plan["kind"]], plan["body"], 0.002 if plan["slow"] else 0.0)
        assert_clean(status, body, plan)
        assert status == 200, (plan, body[:500])
        return {"ep": ROUTES[plan["kind"]], "statuses": {200},
                "answer": answer_of(plan["kind"], bool(plan["body"].get("stream")), status, body)}
    if what == "keepalive":
        method, path, first, first_status = plan["first"]
        body = json.dumps(plan["body"]).encode()
        s = _connect(url)
        try:
            one = _request_bytes(method, path, first, close=False)
            two = _request_bytes("POST", ROUTES[plan["kind"]], body, close=False)
            buf = bytearray()
            if plan["pipelined"]:
                s.sendall(one + two)
            else:
                s.sendall(one)
            status, headers, reply = read_reply(s, buf, head_only=method == "HEAD")
            assert_clean(status, reply, plan)
            assert status == first_status, (plan, reply[:300])
            if headers.get("connection", "").lower() == "close":
                # a refusal before its body was read (an unknown path) closes: the second goes on a new connection
                s.close()
                s, buf = _connect(url), bytearray()
                s.sendall(two)
            elif not plan["pipelined"]:
                s.sendall(two)
            status, _, reply = read_reply(s, buf)
        finally:
            s.close()
        assert_clean(status, reply, plan)
        assert status == 200, (plan, reply[:300])
        first_ep = "/health" if path == "/health" else "/v1/models" if path == "/v1/models" else \
            "other" if path == "/v1/nope" else path
        return {"ep": ROUTES[plan["kind"]], "statuses": {200}, "answer": answer_of(plan["kind"], False, status, reply),
                "also": (first_ep, first_status)}
    if what == "drop":
        s = _connect(url)
        try:
            s.sendall(_request_bytes("POST", ROUTES[plan["kind"]], json.dumps(plan["body"]).encode()))
            got = b""
            while plan["after"] and got.count(b"\n\n") < plan["after"] + 1:    # the headers' blank line is one
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            if plan["reset"]:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        finally:
            s.close()
        if got:
            assert_clean(_split(got)[0], got, plan)
        # it may have had its whole answer before it left
        return {"ep": ROUTES[plan["kind"]], "statuses": {200, 499}}
    if what == "malformed":
        path, mode = ROUTES[plan["kind"]], plan["mode"]
        if mode == "truncated":
            data = b'{"model": "smollm2", "messages": [{"role": "user", "con'
            with _connect(url) as s:
                s.sendall(_request_bytes("POST", path, data, length=len(data) + 100))
                s.shutdown(socket.SHUT_WR)
                raw = _read_all(s)
            if raw:
                status, _, body = _split(raw)
                assert_clean(status, body, plan)
                assert status == 400, (plan, raw[:300])
            return {"ep": path, "statuses": {400}}
        body = {"json": b'{"model": "smollm2", "messages": [', "empty": b"",
                "type": json.dumps({"model": "smollm2", "messages": "hi", "prompt": 7, "input": 3}).encode()}[mode]
        status, _, reply = exchange(url, "POST", path, body)
        assert_clean(status, reply, plan)
        assert status == 400, (plan, reply[:300])
        return {"ep": path, "statuses": {400}}
    if what == "refused":
        status, _, reply = exchange(url, "POST", ROUTES[plan["kind"]], plan["body"])
        assert_clean(status, reply, plan)
        assert 400 <= status < 500, (plan, reply[:300])
        err = json.loads(reply)["error"]
        assert plan["param"] in (str(err.get("param")) + err["message"]), (plan, err)
        return {"ep": ROUTES[plan["kind"]], "statuses": {status}}
    if what == "path":
        status, _, reply = exchange(url, plan["method"], plan["path"], b"{}" if plan["method"] == "POST" else None)
        assert_clean(status, reply, plan)
        assert status in (404, 405), (plan, reply[:300])
        if plan["method"] == "HEAD":
            assert reply == b"", plan
        ep = "/v1/models" if plan["path"].startswith("/v1/models") else "other"
        return {"ep": ep, "statuses": {status}}
    if what == "method":
        status, _, reply = exchange(url, plan["method"], ROUTES[plan["kind"]])
        assert_clean(status, reply, plan)
        assert status == 405, (plan, reply[:300])
        if plan["method"] == "HEAD":
            assert reply == b"", plan
        return {"ep": ROUTES[plan["kind"]], "statuses": {405}}
    status, _, reply = exchange(url, plan["method"], plan["path"])
    assert status == 200, (plan, reply[:300])
    if plan["method"] == "GET" and plan["path"] == "/metrics":     # mid-load: the gauges are counts of requests
        gauges = dict(re.findall(r"^amphista_requests_(waiting|running) (\S+)$", reply.decode(), re.M))
        assert set(gauges) == {"waiting", "running"}, reply[-500:]
        assert all(float(v) >= 0 and float(v).is_integer() for v in gauges.values()), gauges
    return {"ep": plan["path"], "statuses": {200}}


def metrics_of(url: str) -> tuple[dict, dict, dict]:
    status, _, body = exchange(url, "GET", "/metrics")
    assert status == 200
    requests, errors, gauges = {}, {}, {}
    for line in body.decode().splitlines():
        if m := re.fullmatch(r'amphista_requests_total\{endpoint="([^"]*)"\} (\d+)', line):
            requests[m[1]] = int(m[2])
        elif m := re.fullmatch(r'amphista_request_errors_total\{endpoint="([^"]*)",status="(\d+)"\} (\d+)', line):
            errors[m[1], int(m[2])] = int(m[3])
        elif m := re.fullmatch(r"amphista_requests_(waiting|running) (\S+)", line):
            gauges[m[1]] = float(m[2])
    return requests, errors, gauges


def check_counts(outcomes, requests, errors):
    """Each request counted once, under one of the statuses it may have had (the final scrape itself not yet)."""
    outcomes = outcomes + [{"ep": o["also"][0], "statuses": {o["also"][1]}} for o in outcomes if "also" in o]
    sent: dict = {}
    for o in outcomes:
        sent[o["ep"]] = sent.get(o["ep"], 0) + 1
    assert requests == sent, (requests, sent)
    known: dict = {}
    loose: dict = {}                # endpoint -> statuses a request whose status is not known may have
    for o in outcomes:
        if len(o["statuses"]) == 1:
            (st,) = o["statuses"]
            if st >= 400:
                known[o["ep"], st] = known.get((o["ep"], st), 0) + 1
        else:
            loose.setdefault(o["ep"], []).append(o["statuses"])
    for (ep, st), n in errors.items():
        extra = n - known.get((ep, st), 0)
        assert extra >= 0, (ep, st, errors, known)
        if extra:
            assert sum(st in s for s in loose.get(ep, [])) >= extra, (ep, st, errors, known)
    for key, n in known.items():
        assert errors.get(key, 0) >= n, (key, errors, known)


def sweep(engine, seed: int, count: int, clients: int | None = None, max_batch: int = 4, **app_options) -> dict:
    """Runs `count` chaotic requests from `clients` threads, then each well-behaved one again alone; checks it all."""
    rng = random.Random(seed)
    clients = clients or rng.randint(4, 12)
    plans = [draw(rng, i) for i in range(count)]
    before = {t.ident for t in threading.enumerate()}
    done = threading.Event()
    with serving(engine, model_id="smollm2", quiet=True, max_batch=max_batch, **app_options) as httpd:
        url, app = httpd.url, httpd.app
        with ThreadPoolExecutor(clients) as pool:
            outcomes = list(pool.map(lambda p: run_plan(url, p), plans, timeout=TIMEOUT * 4))
        # quiesced: the handlers of clients that left see it within a poll; every request answered
        deadline, scrapes = time.time() + 30, 0
        while True:
            requests, errors, gauges = metrics_of(url)
            requests["/metrics"] = requests.get("/metrics", 0) - scrapes    # a scrape renders, then counts itself
            if not requests["/metrics"]:
                del requests["/metrics"]
            scrapes += 1
            try:
                check_counts(outcomes, requests, errors)
                assert gauges == {"waiting": 0, "running": 0}, gauges
                break
            except AssertionError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        stats = {"batch_sizes": dict(app.batch_sizes), "errors": errors}
        # the scheduler's thread ends its run a moment after the last answer went out (the held last row)
        sched, deadline = app.scheduler, time.time() + 10
        while sched._pending or sched._current or sched.lock.locked() or engine._decoding is not None:
            assert time.time() < deadline, (sched._pending, sched._current, engine._decoding)
            time.sleep(0.01)
        # each well-behaved request again, alone on the idle server: the same answer
        for plan, out in zip(plans, outcomes):
            if plan["what"] in ("normal", "keepalive"):
                status, _, body = exchange(url, "POST", ROUTES[plan["kind"]], plan["body"])
                alone = answer_of(plan["kind"], bool(plan["body"].get("stream")), status, body)
                assert out["answer"] == alone, (plan, out["answer"], alone)
        closer = threading.Thread(target=lambda: (httpd.shutdown(), httpd.server_close(), done.set()), daemon=True)
        closer.start()
        closer.join(10)
        assert done.is_set(), "shutdown hung"
    deadline = time.time() + 10
    while (left := [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]):
        assert time.time() < deadline, left
        time.sleep(0.05)
    return {"plans": plans, "outcomes": outcomes, **stats}


@pytest.fixture(scope="module")
def eng():
    return smollm2_with_shipped_heads(max_seq_len=1024)


@pytest.mark.parametrize("seed", [1, 2])
def test_chaos_sweep(eng, seed):
    sweep(eng, seed, 20)


# ---- regressions -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["chat", "responses", "messages"])
def test_stream_reset_as_headers_go_out_is_counted_499(eng, kind, monkeypatch):
    """A streamed request whose client resets its connection once its run started, before the handler polled for
    it: the write of the SSE headers raised ConnectionResetError past every route's own handling, so the request
    was in neither /metrics nor the log (the chaos sweep's requests_total came out one short)."""
    from amphista_engine.serving import server
    real, holding, closed = server._Handler._next_event, threading.Event(), threading.Event()

    def after_reset(self, job):      # the run's "start" handed over only once the client is gone
        event = real(self, job)
        holding.set()
        closed.wait(10)
        time.sleep(0.05)
        return event
    monkeypatch.setattr(server._Handler, "_next_event", after_reset)
    body = {"chat": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            "responses": {"input": "hi", "max_output_tokens": 16},
            "messages": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}[kind]
    with serving(eng, model_id="smollm2", quiet=True) as httpd:
        s = _connect(httpd.url)
        s.sendall(_request_bytes("POST", ROUTES[kind], json.dumps({**body, "stream": True}).encode()))
        assert holding.wait(30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")    # RST
        s.close()
        closed.set()
        deadline = time.time() + 10
        while (got := metrics_of(httpd.url)[:2])[0].get(ROUTES[kind]) != 1 or got[1] != {(ROUTES[kind], 499): 1}:
            assert time.time() < deadline, got
            time.sleep(0.05)
