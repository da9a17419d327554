"""QA of the anthropic SDK's newer messages.create / count_tokens fields against `amphista serve`'s
/v1/messages and /v1/messages/count_tokens (serving/anthropic_messages.py), on the tiny random model:
user_profile_id and workspace_id (account attribution: the SDK sends them as its anthropic-user-profile-id and
anthropic-workspace-id headers; a body that carries them is taken alike, a string or null, and ignored) and
diagnostics (a prompt-cache miss diagnosis: a well-formed one is taken and the answer has none, which the SDK's
Message reads as None; a malformed one is a 400 naming it)."""
from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

anthropic = pytest.importorskip("anthropic")

from conftest import edited_copy, serving                  # noqa: E402
from amphista_engine.serving.anthropic_messages import COUNTED, HINTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

MESSAGES, COUNT = "/v1/messages", "/v1/messages/count_tokens"
TIMEOUT = 60
ASK = [{"role": "user", "content": "The quick brown fox"}]
PLAIN = {"model": "tiny", "max_tokens": 4, "messages": ASK}
ACCOUNT = ("user_profile_id", "workspace_id")


@pytest.fixture(scope="module")
def server(tiny_hf_dir, tmp_path_factory):
    from amphista_engine import Engine
    path = edited_copy(tiny_hf_dir, tmp_path_factory.mktemp("anthropic_sdk_fields") / "m",
                       {"max_position_embeddings": 1024})
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=1024)
    with serving(engine, model_id="tiny", quiet=True) as httpd:
        yield httpd


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=TIMEOUT)


def send(url, body: dict, path=MESSAGES) -> tuple[int, dict | str]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode("utf-8")
    finally:
        conn.close()
    return r.status, json.loads(text) if r.getheader("Content-Type", "").startswith("application/json") else text


def refused(reply: tuple[int, dict | str], *words: str) -> str:
    """A 400 in Anthropic's error shape (invalid_request_error) whose message holds `words`."""
    status, body = reply
    assert status == 400, reply
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    for w in words:
        assert w in body["error"]["message"], body
    return body["error"]["message"]


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_the_module_takes_the_sdk_fields():
    """The module's field tuples are the one home of what is taken: the new names are there."""
    assert {"diagnostics", *ACCOUNT} <= set(HINTS)
    assert set(ACCOUNT) <= set(COUNTED) and "diagnostics" not in COUNTED


def test_sdk_account_attribution_is_taken(client):
    """messages.create / stream / count_tokens with user_profile_id and workspace_id (sent as headers): answered
    as without them."""
    want = client.messages.create(model="tiny", max_tokens=4, messages=ASK)
    got = client.messages.create(model="tiny", max_tokens=4, messages=ASK, user_profile_id="uprof_1",
                                 workspace_id="wrkspc_011CZkZaBF1tNoB5wlCeusgy")
    assert text_of(got) == text_of(want) and got.usage.input_tokens == want.usage.input_tokens
    with client.messages.stream(model="tiny", max_tokens=4, messages=ASK, user_profile_id="uprof_1",
                                workspace_id="wrkspc_1") as stream:
        assert text_of(stream.get_final_message()) == text_of(want)
    count = client.messages.count_tokens(model="tiny", messages=ASK, user_profile_id="uprof_1",
                                         workspace_id="wrkspc_1")
    assert count.input_tokens == want.usage.input_tokens


@pytest.mark.parametrize("path", [MESSAGES, COUNT])
@pytest.mark.parametrize("name", ACCOUNT)
def test_account_fields_in_the_body(server, client, path, name):
    """In the body (extra_body, or a hand-written request): a string or null is taken and ignored, on both routes;
    anything else is a 400 naming the field."""
    body = PLAIN if path == MESSAGES else {"model": "tiny", "messages": ASK}
    status, plain = send(server.url, body, path)
    assert status == 200, plain
    for value in ("wrkspc_1", None, ""):
        status, got = send(server.url, {**body, name: value}, path)
        assert status == 200, got
        key = "content" if path == MESSAGES else "input_tokens"
        assert got[key] == plain[key]
    for value in (5, True, ["wrkspc_1"], {"id": "x"}, "\ud800"):
        refused(send(server.url, {**body, name: value}, path), name)
    # as the SDK raises it
    with pytest.raises(anthropic.BadRequestError, match=name):
        if path == MESSAGES:
            client.messages.create(model="tiny", max_tokens=4, messages=ASK, extra_body={name: 7})
        else:
            client.messages.count_tokens(model="tiny", messages=ASK, extra_body={name: 7})


@pytest.mark.parametrize("diagnostics", [None, {}, {"previous_message_id": None},
                                         {"previous_message_id": "msg_0123"}])
def test_sdk_diagnostics_is_taken_and_answered_without(client, diagnostics):
    """messages.create / stream with diagnostics: the same answer, and no diagnostics in it (the SDK's Message has
    diagnostics None: this server diagnoses no prompt-cache miss)."""
    want = client.messages.create(model="tiny", max_tokens=4, messages=ASK)
    got = client.messages.create(model="tiny", max_tokens=4, messages=ASK, diagnostics=diagnostics)
    assert text_of(got) == text_of(want) and got.diagnostics is None
    assert "diagnostics" not in got.model_dump(exclude_none=True)
    with client.messages.stream(model="tiny", max_tokens=4, messages=ASK, diagnostics=diagnostics) as stream:
        final = stream.get_final_message()
    assert text_of(final) == text_of(want) and final.diagnostics is None


def test_sdk_diagnostics_chained(client):
    """The SDK's intended use: the previous message's id in the next turn's diagnostics."""
    first = client.messages.create(model="tiny", max_tokens=4, messages=ASK, diagnostics={"previous_message_id": None})
    turn = [*ASK, {"role": "assistant", "content": text_of(first) or "ok"}, {"role": "user", "content": "More."}]
    second = client.messages.create(model="tiny", max_tokens=4, messages=turn,
                                    diagnostics={"previous_message_id": first.id})
    assert second.stop_reason in ("end_turn", "max_tokens") and second.diagnostics is None


@pytest.mark.parametrize("diagnostics, words", [
    ("msg_0123", ["diagnostics must be an object"]),
    ([], ["diagnostics must be an object"]),
    (True, ["diagnostics must be an object"]),
    ({"previous_message_id": 5}, ["diagnostics.previous_message_id must be a string"]),
    ({"previous_message_id": ["msg_1"]}, ["diagnostics.previous_message_id must be a string"]),
    ({"previous_message_id": "\ud800"}, ["diagnostics.previous_message_id is not valid Unicode"]),
    ({"previous_id": "msg_1"}, ["diagnostics has no key", "previous_message_id"]),
])
def test_malformed_diagnostics_is_400(server, client, diagnostics, words):
    refused(send(server.url, {**PLAIN, "diagnostics": diagnostics}), *words)
    refused(send(server.url, {**PLAIN, "stream": True, "diagnostics": diagnostics}), *words)
    # (a string is no DiagnosticsParam; a lone surrogate the SDK cannot encode)
    if not isinstance(diagnostics, str) and "\\ud800" not in json.dumps(diagnostics):
        with pytest.raises(anthropic.BadRequestError, match="diagnostics"):
            client.messages.create(model="tiny", max_tokens=4, messages=ASK, diagnostics=diagnostics)


def test_count_tokens_refuses_diagnostics(server):
    """count_tokens has no diagnostics (the SDK's count_tokens sends none): named, as other /v1/messages fields."""
    refused(send(server.url, {"model": "tiny", "messages": ASK, "diagnostics": None}, COUNT),
            "'diagnostics' is not a field of /v1/messages/count_tokens")
