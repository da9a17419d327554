"""POST /v1/messages (serving/anthropic_messages.py): a tool_use block its stream began, then cut by max_tokens or
broken, is in the non-streamed message too, so that the anthropic SDK's messages.create() and
messages.stream().get_final_message() hold the same blocks at the same indexes. A cut call keeps its id, name and
the input the SDK builds of the partial JSON, with stop_reason "max_tokens" (as Anthropic's API keeps it); one whose
JSON broke in an answer that ended otherwise is kept alike, with a stop_reason other than "tool_use"."""
from __future__ import annotations

import pytest

pytest.importorskip("llguidance")
anthropic = pytest.importorskip("anthropic")

from conftest import edited_copy, serving                  # noqa: E402
from test_tool_streaming import scripted                   # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

WEATHER = {"name": "get_weather", "description": "Weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                            "required": ["city", "days"]}}
ASK = [{"role": "user", "content": "Weather?"}]


@pytest.fixture(scope="module")
def server(tiny_hf_dir, tmp_path_factory):
    from amphista_engine import Engine
    path = edited_copy(tiny_hf_dir, tmp_path_factory.mktemp("anthropic_cut") / "m", {"max_position_embeddings": 2048})
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=2048)
    with serving(engine, model_id="tiny", quiet=True) as httpd:
        yield httpd


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=30)


def both(client, **body) -> tuple[dict, dict]:
    """create()'s message and stream().get_final_message()'s, less what differs between two answers alike (ids,
    the server's extras)."""
    created = client.messages.create(model="tiny", messages=ASK, tools=[WEATHER], **body)
    with client.messages.stream(model="tiny", messages=ASK, tools=[WEATHER], **body) as stream:
        final = stream.get_final_message()
    out = []
    for message in (created, final):
        m = message.model_dump(exclude={"id", "amphista"})
        for block in m["content"]:
            assert block["type"] != "tool_use" or block.pop("id").startswith("toolu_"), block
        out.append(m)
    return out[0], out[1]


def test_call_cut_by_max_tokens_is_kept(server, client, monkeypatch):
    """The answer cut at each token inside its call: create() holds the stream's tool_use block (its name, and
    the input the SDK built of the partial JSON), stop_reason max_tokens; whole, the call is a tool_use stop."""
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
    scripted(server, monkeypatch, text)
    tokenizer = server.app.engine.tokenizer
    ids = tokenizer.encode(text, add_bos=False)
    n = len(ids)

    def tokens_to(mark: str) -> int:
        """The fewest tokens of the answer that hold it up to the end of `mark`."""
        end = text.index(mark) + len(mark)
        return next(k for k in range(n + 1) if len(tokenizer.decode(ids[:k])) >= end)

    inputs = []
    cuts = [tokens_to(m) for m in ('"arguments": {', '"city": "Os', '"Oslo", ', '"days": 2', "2}}")]
    for cut in sorted({*cuts, n, n + 1}):
        created, final = both(client, max_tokens=cut)
        assert created == final, cut
        uses = [b for b in created["content"] if b["type"] == "tool_use"]
        assert [b["type"] for b in created["content"]] == ["text", "tool_use"], (cut, created)
        assert uses[0]["name"] == "get_weather"
        if cut > n:
            assert created["stop_reason"] == "tool_use" and uses[0]["input"] == {"city": "Oslo", "days": 2}
        else:
            assert created["stop_reason"] == "max_tokens", (cut, created)
            inputs.append(uses[0]["input"])
    # cut before the first argument, inside "Oslo" (a partial string is left out, with its key), after it
    assert {} in inputs and {"city": "Oslo"} in inputs, inputs


@pytest.mark.parametrize("broken", [
    '{"name": "get_weather", "arguments": {"city": Oslo, "days": 2}}',          # not JSON after its name
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}',       # a brace too many
])
def test_call_whose_json_broke_is_kept(server, client, monkeypatch, broken):
    """A call streamed by name whose JSON then broke, the answer ended by the model: create() holds the block the
    stream sent, and the stop_reason is not tool_use (the block is no call to run)."""
    scripted(server, monkeypatch, "<tool_call>\n" + broken + "\n</tool_call>")
    created, final = both(client, max_tokens=400)
    assert created == final
    assert [b["type"] for b in created["content"]] == ["tool_use"], created
    assert created["content"][0]["name"] == "get_weather"
    assert created["stop_reason"] == "end_turn", created
