"""Three small leftovers: `amphista serve` read a request's line and headers under the handler's 300 s socket
timeout per recv (a client trickling its headers held a handler thread for hours); a Qwen2/Qwen3 config without
max_window_layers slid every layer where transformers slides none of the first 28; and heads made for a draft
vocabulary started their LM heads from the target's rows of tokens 0..n-1, not of that vocabulary's tokens."""
from __future__ import annotations

import json
import re
import socket
import time

import pytest
import torch

from test_server_leftovers_qa import call, connect, final_reply, head, read_all, server  # noqa: F401 -- a fixture

pytestmark = pytest.mark.usefixtures("one_thread_module")


def trickle(s: socket.socket, data: bytes, pause: float = 0.05) -> None:
    """data a byte at a time, until the server closes (after its 408)."""
    for byte in data:
        try:
            s.sendall(bytes([byte]))
        except OSError:
            return
        time.sleep(pause)


# ---- 1. a request's line and headers have a deadline -----------------------------------------------------------
@pytest.mark.parametrize("sent, trickled", [
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 200),      # headers, a byte at a time
    (b"", b"POST /v1/completions" + b"/x" * 100),                                       # the request line, alike
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a", b""),                             # a header that never ends
])
def test_a_slow_head_is_a_408_within_its_deadline(server, monkeypatch, sent, trickled):  # noqa: F811
    from amphista_engine.serving import server as server_module
    monkeypatch.setattr(server_module, "HEADER_TIMEOUT_S", 0.3)
    httpd, lines = server
    with connect(httpd.url) as s:
        s.settimeout(5)         # was held 300 s per byte: the read below timed out with nothing
        s.sendall(sent)
        trickle(s, trickled)
        raw = read_all(s)       # the server closed: its handler thread is free
    status, reply = final_reply(raw)
    assert status == 408, raw[:300]
    assert b"connection: close" in raw.lower()
    error = json.loads(reply)["error"]
    assert error["message"] == "the request line and headers did not all come within 0.3 s", error
    assert error["code"] == "request_timeout"
    assert '" 408 ' in lines[-1], lines[-2:]
    assert call(httpd.url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1})[0] == 200


def test_the_head_deadline_spares_idle_keep_alive_connections(server, monkeypatch):  # noqa: F811
    """The wait for a request line's first byte is not the head's deadline: a connection idle past it before its
    first request, and between requests, is served; its body and reply are not held to it either."""
    from amphista_engine.serving import server as server_module
    monkeypatch.setattr(server_module, "HEADER_TIMEOUT_S", 0.2)
    httpd, _ = server
    data = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1}).encode()
    with connect(httpd.url) as s:
        for _ in range(2):
            time.sleep(0.5)
            s.sendall(head("/v1/completions", len(data), close=False))
            time.sleep(0.4)     # the body, past the head's deadline: BODY_TIMEOUT_S's to judge
            s.sendall(data)
            raw = b""
            while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < int(
                    re.search(rb"(?i)content-length: (\d+)", raw).group(1)):
                chunk = s.recv(65536)
                assert chunk, raw       # closed
                raw += chunk
            assert final_reply(raw)[0] == 200, raw[:300]


def test_the_head_reader_keeps_http_servers_framing(server):  # noqa: F811
    """Read through the deadline, a request's head is framed as http.server framed it: pipelined requests (the
    next one already buffered), Expect: 100-continue, a request line past 64 KiB (414)."""
    httpd, _ = server
    data = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1}).encode()
    with connect(httpd.url) as s:
        s.sendall(head("/v1/completions", len(data), close=False) + data + head("/v1/completions", len(data)) + data)
        raw = read_all(s)
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 2, raw[:600]
    with connect(httpd.url) as s:
        s.sendall(head("/v1/completions", len(data))[:-2] + b"Expect: 100-continue\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n")
        s.sendall(data)
        assert final_reply(read_all(s))[0] == 200
    with connect(httpd.url) as s:
        s.sendall(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert final_reply(read_all(s))[0] == 414


# ---- 2. a Qwen2/Qwen3 config without max_window_layers takes transformers' default ------------------------------
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_left_out_max_window_layers_is_transformers_default(family, tmp_path):
    """use_sliding_window true and no max_window_layers (nor layer_types): transformers slides the layers from 28 on,
    none of a 2-layer model's. It was read as 0: the cache capped at the window, a longer one refused."""
    transformers = pytest.importorskip("transformers")
    from amphista_engine import Engine
    from conftest import prefill_then_decode
    from model_helpers import rel_err
    from test_model_config_differential_qa import _CLASSES, _TINY, VOCAB, write_case
    write_case(family, {**_TINY, "sliding_window": 5, "use_sliding_window": True}, tmp_path, seed=3)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("max_window_layers", "layer_types"):
        saved.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    Model = getattr(transformers, _CLASSES[family] + "ForCausalLM")
    hf = Model.from_pretrained(tmp_path, dtype=torch.float32).eval()      # as transformers reads the same file
    assert hf.config.max_window_layers == 28 and "sliding_attention" not in hf.config.layer_types
    ids = torch.randint(3, VOCAB, (16,), generator=torch.Generator().manual_seed(4)).tolist()
    engine = Engine.from_pretrained(str(tmp_path), device="cpu", dtype="fp32", backend="torch", max_seq_len=16)
    assert engine.config.sliding_window is None
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    got, _ = prefill_then_decode(engine.model, ids, 6, max_len=16)
    assert rel_err(got, want) < 1e-4       # past the window too (positions 5..15)


# ---- 3. heads made for a draft vocabulary start from that vocabulary's rows -----------------------------------
@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_own_lm_heads_start_from_their_draft_vocabularys_rows(target, kind):
    """new_heads(..., draft_vocab=ids) sets the vocabulary before each head's LM head is copied from the target:
    slot i starts as the target's row of token ids[i]. Set after (set_draft_vocab), slot i kept token i's row."""
    from amphista_engine.heads import new_heads, random_heads
    from amphista_engine.heads.checkpoint import lm_head_rows
    V = target.config.vocab_size
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(5))[:24]
    assert not torch.equal(lm_head_rows(target, ids), lm_head_rows(target, torch.arange(24)))
    heads = new_heads(kind, target, num_heads=2, per_head_lm_head=True, draft_vocab=ids)
    assert heads.config.draft_vocab_size == 24 and torch.equal(heads.draft_vocab.cpu(), ids)
    for k in range(2):
        torch.testing.assert_close(heads.lm_heads[k].float(), lm_head_rows(target, ids).float())
    # so slot i scores token ids[i] as the target's LM head does
    x = torch.randn(3, 2, target.config.dim, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(heads.logits(x).float(), x @ lm_head_rows(target, ids).float().T)
    # random_heads passes it on (its LM heads are not randomised); a size that disagrees is refused by name
    r = random_heads(kind, target, num_heads=2, per_head_lm_head=True, draft_vocab=ids.tolist(), seed=2)
    torch.testing.assert_close(r.lm_heads[1].float(), lm_head_rows(target, ids).float())
    from amphista_engine.errors import ConfigError
    with pytest.raises(ConfigError, match="draft vocabulary must be 30 distinct token ids"):
        new_heads(kind, target, num_heads=2, per_head_lm_head=True, draft_vocab=ids, draft_vocab_size=30)


def test_train_draft_vocab_heads_score_the_vocabularys_rows(target, shard, tmp_path):
    """`amphista train --draft-vocab` makes heads sharing the target's LM head (set_draft_vocab after new_heads is
    right there: the rows are gathered by the vocabulary at each draft, none copied at init)."""
    from amphista_engine.heads import load_heads
    from amphista_engine.heads.checkpoint import lm_head_rows
    from amphista_engine.training.trainer import train_heads
    from conftest import train_cfg
    train_heads(train_cfg(shard, tmp_path / "h", kind="medusa", draft_vocab=16), target=target)
    heads = load_heads(tmp_path / "h", target, dtype=torch.float32)
    assert not heads.config.per_head_lm_head and heads.config.draft_vocab_size == 16
    x = torch.randn(3, heads.num_heads, target.config.dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = x @ lm_head_rows(target, heads.draft_vocab).float().T
        torch.testing.assert_close(heads.logits(x), want, rtol=1e-4, atol=1e-4)
