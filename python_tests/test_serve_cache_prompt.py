"""`amphista serve --cache-prompt` (and a request's llama.cpp-style "cache_prompt" field): a request decoded alone
starts from the K/V the cache still holds of the previous such request's prompt + answer (Engine's reuse_prefix), so
a chat's next turn prefills only its new messages. Checked over real HTTP on a tiny random model."""
from __future__ import annotations

import contextlib

import pytest

from test_serve import call, error_of

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    """The tiny model with room for a second chat turn (its byte-level vocabulary spells text out long)."""
    from amphista_engine import Engine
    return Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=512)


@pytest.fixture(scope="module")
def server_factory(engine):
    from conftest import serving
    with contextlib.ExitStack() as servers:
        yield lambda **options: servers.enter_context(serving(
            engine, model_id="tiny-llama", quiet=True, defaults=dict(max_new_tokens=24), **options)).url


def chat(url, messages, **fields):
    status, reply = call(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 12, **fields})
    assert status == 200, reply
    return reply["choices"][0]["message"]["content"], reply["amphista"]


def two_turns(url, **fields):
    first = [{"role": "user", "content": "Tell me about the quick brown fox"}]
    answer, stats1 = chat(url, first, **fields)
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the lazy dog?"}]
    answer2, stats2 = chat(url, second, **fields)
    return stats1, stats2, second, answer2


def reused(extra) -> int:
    """The prompt tokens the engine took from the cache (the reply's "amphista" stats)."""
    return extra.get("prompt_tokens_reused", 0)


def test_the_next_turn_prefills_only_what_is_new(server_factory, engine):
    url = server_factory(cache_prompt=True)
    first = [{"role": "user", "content": "Tell me about the quick brown fox"}]
    # What the engine gives by itself, from a cache that keeps nothing of these turns (a run without reuse_prefix
    # forgets the kept prefix), turn after turn with reuse_prefix: the server must give the same, bit for bit
    engine.generate("x", max_new_tokens=1)
    want1 = engine.generate(first, max_new_tokens=12, reuse_prefix=True)
    second = first + [{"role": "assistant", "content": want1.text}, {"role": "user", "content": "And the lazy dog?"}]
    want2 = engine.generate(second, max_new_tokens=12, reuse_prefix=True)
    assert want2.stats.extra.get("prompt_tokens_reused", 0) > len(engine.encode_prompt(second)) // 2

    engine.generate("x", max_new_tokens=1)
    answer1, extra1 = chat(url, first)
    assert answer1 == want1.text and reused(extra1) == 0
    answer2, extra2 = chat(url, second)
    # the second turn's prompt starts with the first's prompt + answer: most of it came from the cache
    assert reused(extra2) == want2.stats.extra["prompt_tokens_reused"], extra2
    assert answer2 == want2.text


def test_off_by_default_and_per_request(server_factory):
    url = server_factory()
    _, stats2, _, _ = two_turns(url)
    assert reused(stats2) == 0                       # the server's default: every prompt prefilled in full
    _, stats2, _, _ = two_turns(url, cache_prompt=True)
    assert reused(stats2) > 0                        # a request may ask for it (llama.cpp's field)
    url_on = server_factory(cache_prompt=True)
    _, stats2, _, _ = two_turns(url_on, cache_prompt=False)
    assert reused(stats2) == 0                       # ... or decline it on a server that has it on


def test_a_bad_cache_prompt_is_named(server_factory):
    url = server_factory()
    error_of(call(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                 "cache_prompt": "yes"}),
             400, "cache_prompt must be true or false", param="cache_prompt")


def test_cli_flag(monkeypatch):
    from amphista_engine.cli import build_parser
    args = build_parser().parse_args(["serve", "--cache-prompt"])
    assert args.cache_prompt is True
    assert build_parser().parse_args(["serve"]).cache_prompt is False
