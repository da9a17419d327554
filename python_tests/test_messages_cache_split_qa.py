"""A streamed POST /v1/messages under --cache-prompt (or a request's "cache_prompt"): message_start's usage splits
the prompt as the final message_delta does (input_tokens less the tokens read from the cache,
cache_read_input_tokens those), as Anthropic's API splits it from the start. It said the whole prompt there, with
cache_read_input_tokens 0, on a turn whose answer then reported most of it as read from the cache."""
from __future__ import annotations

import json
import urllib.request

import pytest

from test_serve_cache_prompt import engine, server_factory  # noqa: F401 -- its fixtures: the tiny model, servers

pytestmark = pytest.mark.usefixtures("one_thread_module")

SPLIT = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def streamed(url: str, body: dict) -> list[dict]:
    """A streamed message's events, in order."""
    req = urllib.request.Request(url + "/v1/messages", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read().decode()
    out = []
    for block in text.split("\n\n")[:-1]:
        head, data = block.split("\n")
        event = json.loads(data[len("data: "):])
        assert event["type"] == head[len("event: "):], block
        out.append(event)
    return out


def turn(url: str, messages: list, **fields) -> tuple[str, dict, dict]:
    """(the answer's text, message_start's usage, message_delta's usage)."""
    events = streamed(url, {"model": "tiny-llama", "max_tokens": 12, "messages": messages, **fields})
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    return text, events[0]["message"]["usage"], events[-2]["usage"]


def two_turns(url: str, **fields) -> list[tuple[dict, dict]]:
    first = [{"role": "user", "content": "Tell me about the quick brown fox"}]
    answer, start1, end1 = turn(url, first, **fields)
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the lazy dog?"}]
    _, start2, end2 = turn(url, second, **fields)
    return [(start1, end1), (start2, end2)]


def split(usage: dict) -> dict:
    return {k: usage[k] for k in SPLIT}


@pytest.mark.parametrize("how", ["flag", "field"])
def test_message_start_splits_the_cached_prompt(server_factory, engine, how):  # noqa: F811
    url = server_factory(cache_prompt=True) if how == "flag" else server_factory()
    fields = {} if how == "flag" else {"cache_prompt": True}
    engine.generate("x", max_new_tokens=1)      # a cache that keeps nothing of these turns
    (start1, end1), (start2, end2) = two_turns(url, **fields)
    assert end1["cache_read_input_tokens"] == 0 and split(start1) == split(end1), (start1, end1)
    # the second turn starts with the first's prompt + answer: read from the cache, said so from message_start on
    assert end2["cache_read_input_tokens"] > end2["input_tokens"], end2
    assert split(start2) == split(end2), (start2, end2)
    assert start2["output_tokens"] == 0


def test_without_the_cache_message_start_says_the_whole_prompt(server_factory):  # noqa: F811
    url = server_factory()
    for start, end in two_turns(url):
        assert start["cache_read_input_tokens"] == end["cache_read_input_tokens"] == 0
        assert split(start) == split(end), (start, end)
    # a server with it on, a request declining it: the same
    for start, end in two_turns(server_factory(cache_prompt=True), cache_prompt=False):
        assert start["cache_read_input_tokens"] == end["cache_read_input_tokens"] == 0
        assert split(start) == split(end), (start, end)
