"""vLLM's prompt_logprobs request field on /v1/completions and /v1/chat/completions. It was logged as an unknown field
and ignored: a client scoring prompts with it (vLLM's way, beside echo) got replies with no prompt_logprobs. Now a
completion's choices carry it (each prompt's own, alike for its n choices) and a chat completion's top level does
(its rendered template's tokens): one entry per prompt token, null for the first, else {token id: {"logprob", "rank",
"decoded_token"}} of the prompt's token (its rank among the whole vocabulary) and the N most likely there, the values
Engine.prompt_logprobs gives. Bad values, -1 (the whole vocabulary) and N > 0 with stream are 400s naming it."""
import json

import pytest

from amphista_engine.generation import sequence_scores
from model_helpers import tiny_engine_and_hf
from test_serve import call, error_of, sse

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def served(tiny_hf_dir):
    """(engine, base URL, log lines): an fp32 engine of 256 positions (a chat's template fits), batches of 2."""
    from conftest import serving
    engine, _ = tiny_engine_and_hf(tiny_hf_dir)
    lines: list[str] = []
    with serving(engine, model_id="tiny", log=lines.append) as httpd:
        yield engine, httpd.url, lines


def ranks_of(engine, ids) -> list:
    """Each prompt token's rank among the whole vocabulary from the same forward's full sorted list: the tokens at
    least as likely as it (vLLM's count), None for the first."""
    vocab = engine.config.vocab_size
    lp, values, _ = sequence_scores(engine.model, ids, 1, vocab)
    return [None] + [int((row >= v).sum()) for row, v in zip(values, lp.float())]


def check_entries(engine, ids, got, n):
    """got (a reply's prompt_logprobs) against Engine.prompt_logprobs of ids, bit for bit, and the ranks."""
    tok = engine.tokenizer
    lps, tops = engine.prompt_logprobs(ids, n)
    ranks = ranks_of(engine, ids)
    assert len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        entry = got[i]
        keys = list(entry)
        assert keys[0] == str(ids[i])               # the prompt's own token first, its key the id as a string
        own = entry[str(ids[i])]
        assert own["logprob"] == lps[i]
        want = {str(ids[i])} | {str(t) for t, _ in (tops[i] if n else [])}
        assert set(keys) == want and len(keys) in (n, n + 1)
        for rank, (t, v) in enumerate(tops[i] if n else [], 1):
            assert entry[str(t)]["logprob"] == v and entry[str(t)]["rank"] == rank
        if str(ids[i]) not in {str(t) for t, _ in (tops[i] if n else [])}:
            assert own["rank"] == ranks[i] and own["rank"] > n
        else:
            assert own["rank"] <= n
        assert isinstance(own["decoded_token"], str)
        assert own["decoded_token"] == tok.decode([ids[i]]) or "\ufffd" not in own["decoded_token"]


@pytest.mark.parametrize("n", [0, 3])
def test_completion_choices_carry_the_prompts_scores(served, n):
    engine, url, _ = served
    status, reply = call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "prompt_logprobs": n,
                                                  "n": 2, "temperature": 0})
    assert status == 200, reply
    ids = engine.encode_prompt(PROMPT, chat=False)
    assert reply["usage"]["prompt_tokens"] == len(ids)
    first, second = reply["choices"]
    assert first["prompt_logprobs"] == second["prompt_logprobs"]       # n choices: the one prompt's scores
    assert "prompt_logprobs" not in reply and first["logprobs"] is None
    check_entries(engine, ids, first["prompt_logprobs"], n)


def test_each_prompt_of_a_batch_gets_its_own(served):
    engine, url, _ = served
    prompts = [PROMPT, "Hello, world! def f(x):"]
    status, reply = call(url, "/v1/completions", {"prompt": prompts, "max_tokens": 2, "prompt_logprobs": 2})
    assert status == 200, reply
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    for p, choice in zip(prompts, reply["choices"]):
        check_entries(engine, engine.encode_prompt(p, chat=False), choice["prompt_logprobs"], 2)


def test_chat_scores_the_rendered_template_on_the_top_level(served):
    engine, url, _ = served
    messages = [{"role": "user", "content": "hi"}]
    status, reply = call(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 2,
                                                       "prompt_logprobs": 2, "n": 2})
    assert status == 200, reply
    ids = engine.encode_prompt(messages)
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert all("prompt_logprobs" not in c for c in reply["choices"])
    check_entries(engine, ids, reply["prompt_logprobs"], 2)
    # not asked for: no such key (replies as before)
    status, plain = call(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert status == 200 and "prompt_logprobs" not in plain


def test_with_echo_and_truncation(served):
    engine, url, _ = served
    ids = engine.encode_prompt(PROMPT, chat=False)
    status, reply = call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1,
                                                  "prompt_logprobs": 1})
    assert status == 200, reply
    choice = reply["choices"][0]
    check_entries(engine, ids, choice["prompt_logprobs"], 1)
    assert choice["logprobs"]["token_logprobs"][1:] == [e[str(t)]["logprob"] for e, t in
                                                        zip(choice["prompt_logprobs"][1:], ids[1:])]
    # the prompt as the run keeps it: its last 5 tokens
    status, reply = call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "truncate_prompt_tokens": 5,
                                                  "prompt_logprobs": 1})
    assert status == 200, reply
    assert reply["usage"]["prompt_tokens"] == 5
    check_entries(engine, ids[-5:], reply["choices"][0]["prompt_logprobs"], 1)


def test_the_field_is_read_not_warned_about(served):
    _, url, lines = served
    lines.clear()
    assert call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 0})[0] == 200
    assert not any("prompt_logprobs" in line for line in lines), lines


@pytest.mark.parametrize("value,words", [
    (-1, ["-1", "vocabulary", "0 to 20"]), (-2, ["0 to 20"]), (21, ["0 to 20"]), (10 ** 30, ["0 to 20"]),
    (True, ["boolean"]), (1.5, ["0 to 20"]), (2.0, ["0 to 20"]), ("2", ["string"]), ([1], ["array"]),
    ({"n": 1}, ["object"])])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_values_are_400s_naming_it(served, path, value, words):
    _, url, _ = served
    body = {"max_tokens": 1, "prompt_logprobs": value}
    body.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    error_of(call(url, path, body), 400, "prompt_logprobs", *words, param="prompt_logprobs")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_refuses_a_count_and_takes_zero(served, path):
    _, url, _ = served
    body = {"max_tokens": 2}
    body.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    error_of(call(url, path, {**body, "stream": True, "prompt_logprobs": 2}), 400, "prompt_logprobs", "stream",
             param="prompt_logprobs")
    events = sse(url, path, {**body, "prompt_logprobs": 0})      # vLLM's rule: 0 asks for nothing there
    assert events[-1] == "[DONE]"
    assert not any("prompt_logprobs" in json.dumps(e) for e in events[:-1])


def test_responses_and_messages_refuse_it_by_name(served):
    _, url, _ = served
    error_of(call(url, "/v1/responses", {"input": "hi", "max_output_tokens": 2, "prompt_logprobs": 1}), 400,
             "prompt_logprobs", param="prompt_logprobs")
    status, reply = call(url, "/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                               "prompt_logprobs": 1})
    assert status == 400 and "prompt_logprobs" in json.dumps(reply), reply


def test_a_one_token_prompt_has_its_null_only(served):
    _, url, _ = served
    status, reply = call(url, "/v1/completions", {"prompt": [5], "max_tokens": 1, "prompt_logprobs": 3})
    assert status == 200, reply
    assert reply["choices"][0]["prompt_logprobs"] == [None]
