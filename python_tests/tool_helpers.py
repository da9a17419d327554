"""What the tool-calling test files share: the tiny model behind a chat template that reads tools (Llama 3.1's,
Mistral's, Qwen 2.5's Hermes), and the server checks of a scripted answer with calls (test_tool_calling.py holds the
requests, ASK / TOOLS, and engine_with_template; test_serve.py the HTTP calls). Imports of test modules stay inside
the functions: those modules skip themselves without llguidance."""
from __future__ import annotations

import pytest


def _template(name: str) -> str:
    if name == "llama31":
        from test_tool_calling_llama3 import LLAMA31
        return LLAMA31
    if name == "mistral":
        from test_tool_calling_mistral import MISTRAL
        return MISTRAL
    if name == "qwen25":
        from test_chat_templates_qa import QWEN25
        return QWEN25
    raise ValueError(f"no template {name!r} here")


def template_engine(tiny_hf_dir, tmp_path_factory, folder: str, template: str):
    """test_tool_calling.engine_with_template on a copy of the tiny checkpoint in a fresh folder named `folder`, its
    chat template "llama31" (test_tool_calling_llama3.LLAMA31), "mistral" (test_tool_calling_mistral.MISTRAL) or
    "qwen25" (test_chat_templates_qa.QWEN25). Skips without llguidance."""
    pytest.importorskip("llguidance")
    from test_tool_calling import engine_with_template
    return engine_with_template(tiny_hf_dir, tmp_path_factory.mktemp(folder) / "m", _template(template))


def template_engine_fixture(folder: str, template: str):
    """A module-scoped fixture of template_engine(..., folder, template): one such engine per test module, named by
    the module attribute it is assigned to (llama_engine = template_engine_fixture("llama31_x", "llama31"))."""
    @pytest.fixture(scope="module")
    def engine(tiny_hf_dir, tmp_path_factory):
        return template_engine(tiny_hf_dir, tmp_path_factory, folder, template)
    return engine


def tool_calls_reply(url: str, body: dict, content: str) -> list[dict]:
    """The server's (at url) non-streamed reply to the chat request `body`, which must be 200 with `content` and then
    calls (finish_reason "tool_calls"): its message's tool_calls."""
    from test_serve import call
    from test_tool_calling import CHAT
    status, whole = call(url, CHAT, body)
    assert status == 200, whole
    choice = whole["choices"][0]
    assert choice["message"]["content"] == content and choice["finish_reason"] == "tool_calls", choice
    return choice["message"]["tool_calls"]


def next_turn(url: str, calls: list[dict]):
    """(status, reply) of the turn after test_tool_calling.ASK: the assistant's `calls` (a reply's tool_calls) and a
    result for each sent back, then the user's "Thanks", with the tools offered again (3 tokens at most)."""
    from test_serve import call
    from test_tool_calling import ASK, CHAT, TOOLS
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": calls}] + [
        {"role": "tool", "tool_call_id": c["id"], "content": '{"ok": true}'} for c in calls]
    return call(url, CHAT, {"messages": history + [{"role": "user", "content": "Thanks"}],
                            "tools": TOOLS, "max_tokens": 3})


def check_no_calls_both_ways(url: str, plain: str):
    """test_tool_calling.ASK with tool_choice "none" and with no tools: `plain` as content and no calls (finish
    "stop"), in the reply and in the stream."""
    from test_serve import call, sse
    from test_tool_calling import ASK, CHAT, TOOLS
    from test_tool_streaming import assembled
    for extra in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        choice = call(url, CHAT, {"messages": ASK, **extra})[1]["choices"][0]
        assert choice["message"]["content"] == plain and "tool_calls" not in choice["message"], (extra, choice)
        content, calls, finish, _ = assembled(sse(url, CHAT, {"messages": ASK, **extra}))
        assert content == plain and not calls and finish == "stop", extra
