"""vLLM's request extras: include_stop_str_in_output, truncate_prompt_tokens, allowed_token_ids and bad_words, in the
decoders (plain and speculative: greedy output equal to plain decoding's, sampled answers within the mask), the
Python API (named errors) and the server (both endpoints, streaming, 400s naming the field, batch keys)."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.errors import InputError
from amphista_engine.sampling import SamplingParams

from conftest import random_tiny_model
from test_logit_bias_penalties import _plain
from test_serve import call, error_of, sse
from test_speculative import OracleHeads, PROMPTS, plain_ids, spec_ids

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT = "The quick brown fox"


def _reference(model, prompt, n, allowed=None, bad=()):
    """Greedy decoding by full forwards, vLLM's masks applied by hand: only `allowed`; a bad word's last token
    banned where the answer (not the prompt) ends in the rest of it."""
    seq, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([seq]), torch.arange(len(seq))[None],
                           logits_at=torch.tensor([[len(seq) - 1]]))[0, -1].float()
        if allowed is not None:
            keep = torch.full_like(logits, float("-inf"))
            keep[list(allowed)] = 0
            logits = logits + keep
        for w in bad:
            if len(out) >= len(w) - 1 and out[len(out) - len(w) + 1:] == list(w[:-1]):
                logits[w[-1]] = float("-inf")
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


def _has(ids, word) -> bool:
    return any(tuple(ids[i:i + len(word)]) == tuple(word) for i in range(len(ids) - len(word) + 1))


def test_allowed_token_ids_plain_equals_reference_and_speculative_equals_plain():
    model = random_tiny_model(seed=11)
    prompt = PROMPTS[0]
    free, _ = plain_ids(model, prompt, 40, eos=[])
    allowed = sorted(set(range(0, 64, 3)) - set(free[:2]))
    params = SamplingParams(allowed_token_ids=allowed)
    plain = _plain(model, prompt, 40, params)
    assert plain == _reference(model, prompt, 40, allowed=allowed) and set(plain) <= set(allowed)
    # oracles drafting the free text (tokens outside the list, rejected) and the masked text (long accepted runs)
    for ref in (free, plain):
        for tree in ("tree-16", "dynamic-16"):
            got, why, stats = spec_ids(model, OracleHeads(prompt + ref, 64, 3), tree, prompt, 40, eos=[],
                                       params=params)
            assert got == plain and why == "length", (tree, ref is free)
    assert stats.tau > 1.5, stats.tau


@pytest.mark.parametrize("lengths", [(2,), (3,), (1, 2, 3)])
def test_bad_words_plain_equals_reference_and_speculative_equals_plain(lengths):
    from amphista_engine.heads import random_heads
    model = random_tiny_model(seed=11)
    prompt = PROMPTS[0]
    free, _ = plain_ids(model, prompt, 40, eos=[])
    bad = tuple(tuple(free[4 * k + 3:4 * k + 3 + n]) for k, n in enumerate(lengths))
    params = SamplingParams(bad_words_ids=bad)
    plain = _plain(model, prompt, 40, params)
    assert plain == _reference(model, prompt, 40, bad=bad)
    assert plain != free and not any(_has(plain, w) for w in bad)
    if len(lengths) == 1:      # the free text until the word's last token, which the ban moves
        n = 3 + lengths[0] - 1
        assert plain[:n] == free[:n] and plain[n] != free[n]
    # the oracle drafting the free text drafts the word: the node that ends it must be banned on its own path
    for ref in (free, plain):
        for tree in ("tree-16", "dynamic-16"):
            got, why, _ = spec_ids(model, OracleHeads(prompt + ref, 64, 3), tree, prompt, 40, eos=[], params=params)
            assert got == plain and why == "length", (tree, ref is free)
    heads = random_heads("amphista", model, num_heads=3, seed=1)
    assert spec_ids(model, heads, "dynamic-8", prompt, 40, eos=[], params=params)[0] == plain


def test_sampled_speculative_keeps_to_the_masks():
    model = random_tiny_model(seed=3)
    prompt = PROMPTS[2]
    free, _ = plain_ids(model, prompt, 30, eos=[])
    allowed = sorted(set(free))[:8]
    # no token twice in a row: one two-token word per allowed token
    params = SamplingParams(temperature=1.0, seed=5, allowed_token_ids=allowed,
                            bad_words_ids=[(t, t) for t in allowed])
    for heads in (OracleHeads(prompt + free, 64, 3, hit=0.9), OracleHeads(prompt + [allowed[0]] * 80, 64, 3)):
        got, _, _ = spec_ids(model, heads, "tree-16", prompt, 60, eos=[], params=params)
        assert len(got) == 60 and set(got) <= set(allowed)
        assert all(a != b for a, b in zip(got, got[1:])), got


def test_sampling_params_refuse_bad_ids():
    for kw, what in (({"allowed_token_ids": []}, "allowed_token_ids is an empty list"),
                     ({"allowed_token_ids": [1, -2]}, "allowed_token_ids: -2 is not a token id"),
                     ({"allowed_token_ids": "12"}, "allowed_token_ids must be a list"),
                     ({"allowed_token_ids": [True]}, "allowed_token_ids: True"),
                     ({"bad_words_ids": [[]]}, r"bad_words_ids\[0\] is an empty list")):
        with pytest.raises(InputError, match=what):
            SamplingParams(**kw)
    with pytest.raises(InputError, match="allowed_token_ids: token id 64 is not in the model's vocabulary"):
        _plain(random_tiny_model(), [1, 2], 3, SamplingParams(allowed_token_ids=[3, 64]))
    with pytest.raises(InputError, match="every allowed token is one of the bad_words"):
        SamplingParams(allowed_token_ids=[3], bad_words_ids=[[3]]).bias_tensor(64, "cpu")


def _bad_pair(engine, ids):
    """A word of the answer whose tokenization (a variant of it) is two of its tokens in a row: (word, tokens)."""
    for i in range(len(ids) - 1):
        word = engine.tokenizer.decode(ids[i:i + 2])
        if tuple(ids[i:i + 2]) in engine._bad_words_ids([word]):
            return word, tuple(ids[i:i + 2])
    pytest.skip("no two-token word in the answer")


def test_engine_options(tiny_amphista_engine):
    eng = tiny_amphista_engine
    base = eng.generate(PROMPT, chat=False, max_new_tokens=20, min_tokens=20, speculative=None)
    # include_stop_str_in_output: the text up to the stop's end, in generate and in the stream, plain and speculative
    stop = base.text[6:9]
    at = base.text.find(stop)
    for keep, want in ((True, base.text[:at + len(stop)]), (False, base.text[:at])):
        for speculative in (None, "amphista"):
            opts = dict(chat=False, max_new_tokens=20, stop=[stop], speculative=speculative,
                        include_stop_str_in_output=keep)
            r = eng.generate(PROMPT, **opts)
            assert r.text == want and r.finish_reason == "stop", (keep, speculative)
            assert "".join(eng.stream(PROMPT, **opts)) == want
    # truncate_prompt_tokens: the prompt's last N tokens, as if sent alone
    ids = eng.encode_prompt(PROMPT, chat=False)
    cut = eng.generate(PROMPT, chat=False, max_new_tokens=8, truncate_prompt_tokens=3, speculative="amphista")
    alone = eng.generate(ids[-3:], max_new_tokens=8, speculative=None)
    assert cut.prompt_token_ids == ids[-3:] and cut.token_ids == alone.token_ids and len(ids) > 3
    assert eng.generate(PROMPT, chat=False, max_new_tokens=2, truncate_prompt_tokens=99).prompt_token_ids == ids
    joins = [[(PROMPT, 4)]]          # a prompt joining the run (a server's request arriving mid-run) is cut too
    list(eng.stream_batch([PROMPT], 4, chat=False, truncate_prompt_tokens=3,
                          admit=lambda free: joins.pop() if joins else []))
    assert [r.prompt_token_ids for r in eng.last_results] == [ids[-3:]] * 2
    # allowed_token_ids and bad_words: speculative equals plain, within the masks
    allowed = sorted(set(range(3, 300, 7)) - set(base.token_ids[:3]))
    word, pair = _bad_pair(eng, base.token_ids)
    for opts, ok in ((dict(allowed_token_ids=allowed), lambda ids: set(ids) <= set(allowed)),
                     (dict(bad_words=[word]), lambda ids: not _has(ids, pair))):
        got = [eng.generate(PROMPT, chat=False, max_new_tokens=20, min_tokens=20, speculative=s, **opts).token_ids
               for s in (None, "amphista")]
        assert got[0] == got[1] and got[0] != base.token_ids and ok(got[0]), opts


@pytest.mark.parametrize("kw,what", [
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens must be an integer >= 1"),
    (dict(truncate_prompt_tokens=2.0), "truncate_prompt_tokens must be"),
    (dict(truncate_prompt_tokens=True), "truncate_prompt_tokens must be"),
    (dict(include_stop_str_in_output="yes"), "include_stop_str_in_output must be True or False"),
    (dict(allowed_token_ids=[]), "allowed_token_ids is an empty list"),
    (dict(allowed_token_ids=[10**6]), "allowed_token_ids: token id 1000000 is not in the model's vocabulary"),
    (dict(bad_words=[" "]), "bad_words: ' ' is empty"),
    (dict(bad_words=[3]), "bad_words must be a list of strings"),
    (dict(allowed_token_ids=[2], min_tokens=2), "allowed_token_ids holds only ending tokens"),
])
def test_engine_names_bad_values(tiny_amphista_engine, kw, what):
    with pytest.raises(InputError, match=what):
        tiny_amphista_engine.generate(PROMPT, chat=False, max_new_tokens=4, **kw)


@pytest.fixture(scope="module")
def served(tiny_amphista_engine):
    from conftest import serving
    with serving(tiny_amphista_engine, model_id="tiny", log=lambda line: None, max_batch=4) as httpd:
        yield tiny_amphista_engine, httpd.url


def test_server_fields(served):
    engine, url = served
    base = engine.generate(PROMPT, chat=False, max_new_tokens=12, min_tokens=12, speculative=None)
    stop = base.text[6:9]
    want = engine.generate(PROMPT, chat=False, max_new_tokens=12, stop=[stop], include_stop_str_in_output=True)
    body = {"prompt": PROMPT, "max_tokens": 12, "stop": [stop], "include_stop_str_in_output": True}
    status, reply = call(url, "/v1/completions", body)
    assert status == 200 and reply["choices"][0]["text"] == want.text and want.text.endswith(stop), reply
    events = sse(url, "/v1/completions", body)
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == want.text
    allowed = sorted(set(range(3, 300, 7)))
    want = engine.generate(PROMPT, chat=False, max_new_tokens=8, truncate_prompt_tokens=3, allowed_token_ids=allowed,
                           bad_words=["ab"])
    for speculative in ("none", "amphista"):
        status, reply = call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "truncate_prompt_tokens": 3,
                                                      "allowed_token_ids": allowed, "bad_words": ["ab"],
                                                      "speculative": speculative})
        assert status == 200 and reply["choices"][0]["text"] == want.text, reply
        assert reply["usage"]["prompt_tokens"] == 3
    messages = [{"role": "user", "content": PROMPT}]
    want = engine.generate(messages, max_new_tokens=6, truncate_prompt_tokens=4, allowed_token_ids=allowed)
    status, reply = call(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 6,
                                                       "truncate_prompt_tokens": 4, "allowed_token_ids": allowed})
    assert status == 200 and reply["choices"][0]["message"]["content"] == want.text, reply
    assert reply["usage"]["prompt_tokens"] == 4
    for field, value, words in (("truncate_prompt_tokens", 0, ">= 1"), ("truncate_prompt_tokens", "3", "integer"),
                                ("allowed_token_ids", [], "empty"), ("allowed_token_ids", [10**6], "vocabulary"),
                                ("bad_words", [""], "empty"), ("bad_words", "x y", None),
                                ("include_stop_str_in_output", 1, "true or false")):
        for path, key, prompt in (("/v1/completions", "prompt", PROMPT), ("/v1/chat/completions", "messages",
                                                                           messages)):
            got = call(url, path, {key: prompt, "max_tokens": 4, field: value})
            if words is None:       # one string: one word, as a stop string is taken
                assert key != "prompt" or got[0] == 200, got
                continue
            error_of(got, 400, words, param=field)
    error_of(call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "echo": True,
                                           "truncate_prompt_tokens": 2}), 400, "echo", param="truncate_prompt_tokens")


def test_requests_with_other_values_do_not_share_a_run():
    from amphista_engine.serving.batching import batch_key
    base = {"temperature": 0.0, "max_new_tokens": 8}
    keys = {batch_key({**base, **extra}, {}) for extra in (
        {}, {"allowed_token_ids": [1, 2]}, {"allowed_token_ids": [1, 3]}, {"bad_words": ["a"]}, {"bad_words": ["b"]},
        {"truncate_prompt_tokens": 3}, {"truncate_prompt_tokens": 4}, {"include_stop_str_in_output": True})}
    assert len(keys) == 8 and None not in keys
