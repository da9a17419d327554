"""top_logprobs and prompt logprobs: stream_batch(logprobs=True, top_logprobs=N) lists, per token, the N most likely
tokens at its position (the target's own distribution, as token_logprobs); Engine.prompt_logprobs scores a prompt in
one forward; `amphista serve` returns them as OpenAI does (chat's top_logprobs, the completions endpoint's legacy
"logprobs": N, and echo, which lm-evaluation-harness's local-completions sends for loglikelihood tasks). Checked
against transformers' log_softmax over the whole sequence."""
import json

import pytest
import torch

from amphista_engine.errors import CacheFullError, InputError
from model_helpers import tiny_engine_and_hf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPTS = ["The quick brown fox", "Hello, world! def f(x):"]
N = 5


@pytest.fixture(scope="module")
def setup(tiny_hf_dir):
    return tiny_engine_and_hf(tiny_hf_dir)


@pytest.fixture(scope="module")
def served(setup):
    from conftest import serving
    engine, hf = setup
    with serving(engine, quiet=True) as httpd:
        yield engine, hf, httpd.url


def full_forward(hf, ids) -> torch.Tensor:
    """[len(ids), V] fp64 log_softmax of a plain full forward: row i scores the token at i + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)


def check_tops(hf, result, n=N):
    lp = full_forward(hf, result.prompt_token_ids + result.token_ids)
    start = len(result.prompt_token_ids) - 1
    assert len(result.top_logprobs) == len(result.token_ids) > 0
    for i, top in enumerate(result.top_logprobs):
        values, ids = lp[start + i].topk(n)
        assert [t for t, _ in top] == ids.tolist()
        assert max(abs(v - w) for (_, v), w in zip(top, values.tolist())) < 1e-4
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def call(url, path, body):
    from test_serve import call as _call
    return _call(url, path, body)


@pytest.mark.parametrize("speculative,temperature", [(None, 0.0), ("amphista", 0.0), ("amphista", 0.9)])
def test_engine_top_logprobs_are_the_full_forwards_topk(setup, speculative, temperature):
    """Plain and speculative greedy, in a batch whose first row ends early (a stop string: the row is dropped from
    the batch, and its entries with it); sampled, the same distribution (before temperature)."""
    engine, hf = setup
    if temperature:
        results = engine.generate_batch(PROMPTS, 16, chat=False, speculative=speculative, temperature=temperature,
                                        seed=3, logprobs=True, top_logprobs=N)
        for r in results:
            check_tops(hf, r)
        return
    answers = [engine.generate(p, 24, chat=False).text for p in PROMPTS]
    stop = next(answers[0][i:i + 2] for i in range(2, len(answers[0]) - 2) if answers[0][i:i + 2] not in answers[1])
    results = engine.generate_batch(PROMPTS, 24, chat=False, speculative=speculative, stop=[stop], logprobs=True,
                                    top_logprobs=N)
    assert results[0].finish_reason == "stop" and len(results[0].token_ids) < len(results[1].token_ids)
    for r in results:
        check_tops(hf, r)
        # greedy: the chosen token is the first of its list, with the very same logprob
        assert all(top[0] == (t, lp) for top, t, lp in zip(r.top_logprobs, r.token_ids, r.token_logprobs))
        d = json.loads(json.dumps(r.to_dict()))
        assert d["top_logprobs"] == [[list(p) for p in top] for top in r.top_logprobs]
    plain = engine.generate_batch(PROMPTS, 24, chat=False, stop=[stop], logprobs=True)
    assert [r.token_ids for r in plain] == [r.token_ids for r in results]
    assert all(r.top_logprobs is None and "top_logprobs" not in r.to_dict() for r in plain)


def test_bad_top_logprobs_are_named(setup):
    engine, _ = setup
    with pytest.raises(InputError, match="top_logprobs must be an integer from 0 to 20, got int 21"):
        engine.generate(PROMPTS[0], 2, logprobs=True, top_logprobs=21)
    with pytest.raises(InputError, match="top_logprobs must be an integer"):
        engine.generate(PROMPTS[0], 2, logprobs=True, top_logprobs=True)
    with pytest.raises(InputError, match="top_logprobs=3 needs logprobs=True"):
        engine.generate(PROMPTS[0], 2, top_logprobs=3)


@pytest.mark.parametrize("kind", [None, "amphista"])
def test_top_logprobs_through_the_graph_bookkeeping(kind):
    """The CPU stand-in for CUDA graphs (graph_standin.py): N is part of the graph key and the top tensors are
    rebound each step, re-pointed after a replay; after a run with another N on the same graphs, equal to eager."""
    from graph_standin import CPUGraphs as _CPUGraphs
    from graph_standin import decoder_runs
    steps = decoder_runs(kind)

    def run(top, graphs=None):
        def prepare(dec):
            dec.logprobs, dec.top_logprobs = True, top
        return steps(10, prepare, lambda dec, out, count: (out.tolist(), count.tolist(), dec.step_logprobs.tolist(),
                                                           dec.step_top_values.tolist(), dec.step_top_ids.tolist()),
                     graphs)
    eager = run(3)
    graphs = _CPUGraphs()
    other = run(5, graphs)
    assert len(other[-1][3][0][0]) == 5
    assert run(3, graphs) == eager and graphs.stats.replays >= 2


def test_prompt_logprobs_are_one_forwards(setup):
    engine, hf = setup
    ids = engine.encode_prompt(PROMPTS[1], chat=False)
    lps, tops = engine.prompt_logprobs(PROMPTS[1], top_logprobs=3)
    ref = full_forward(hf, ids)
    assert lps[0] is None and tops[0] is None and len(lps) == len(tops) == len(ids)
    assert max(abs(lps[i] - ref[i - 1, ids[i]].item()) for i in range(1, len(ids))) < 1e-4
    assert all([t for t, _ in tops[i]] == ref[i - 1].topk(3).indices.tolist() for i in range(1, len(ids)))
    assert engine.prompt_logprobs(ids)[0] == lps and engine.prompt_logprobs(ids)[1] is None     # ids as given
    assert engine.prompt_logprobs([ids[0]]) == ([None], None)
    with pytest.raises(CacheFullError, match="longer than the cache"):
        engine.prompt_logprobs([5] * 257)
    with pytest.raises(InputError, match="token id 300 .* outside the model's vocabulary"):
        engine.prompt_logprobs([5, 300])


def test_the_cli_writes_them(tiny_hf_dir, capsys):
    from amphista_engine.cli import main
    args = ["generate", PROMPTS[0], "--model", str(tiny_hf_dir), "--max-new-tokens", "4", "--no-chat",
            "--dtype", "fp32", "--max-seq-len", "64"]
    assert main(args + ["--json", "--logprobs", "--top-logprobs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["top_logprobs"]) == 4 and all(len(t) == 2 for t in out["top_logprobs"])
    assert out["top_logprobs"][0][0] == [out["token_ids"][0], out["token_logprobs"][0]]
    assert main(args + ["--json", "--top-logprobs", "2"]) == 2
    assert "--top-logprobs goes with --logprobs and --json" in capsys.readouterr().err


def test_chat_top_logprobs(served):
    from amphista_engine.serving.server import _token_text
    engine, _, url = served
    messages = [{"role": "user", "content": PROMPTS[0]}]
    want = engine.generate(messages, 8, logprobs=True, top_logprobs=3)
    status, reply = call(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "logprobs": True,
                                                       "top_logprobs": 3})
    assert status == 200
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == len(want.token_ids)
    tok = engine.tokenizer
    for i, (c, top) in enumerate(zip(content, want.top_logprobs)):
        assert [a["logprob"] for a in c["top_logprobs"]] == pytest.approx([lp for _, lp in top], abs=1e-6)
        # each alternative's text and bytes as the chosen token's are read, with the same tokens before it
        for a, (alt, _) in zip(c["top_logprobs"], top):
            text, data = _token_text(tok, want.token_ids[:i] + [alt], i)
            assert (a["token"], a["bytes"]) == (text, list(data))
        assert {k: c["top_logprobs"][0][k] for k in ("token", "logprob", "bytes")} == \
            {k: c[k] for k in ("token", "logprob", "bytes")}        # greedy: the chosen one first


def test_completion_logprobs_and_echo(served):
    engine, hf, url = served
    prompt = PROMPTS[0]
    ids = engine.encode_prompt(prompt, chat=False)
    want = engine.generate(prompt, 6, chat=False, logprobs=True, top_logprobs=2)
    status, reply = call(url, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "logprobs": 2})
    assert status == 200
    choice = reply["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == want.text and len(lp["tokens"]) == len(want.token_ids)
    assert lp["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-6)
    assert all(len(d) <= 2 and max(d.values()) == pytest.approx(top[0][1], abs=1e-6)
               for d, top in zip(lp["top_logprobs"], want.top_logprobs))
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    ref = full_forward(hf, ids)
    prompt_ref = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    # echo, max_tokens 0: the prompt's own logprobs only
    status, reply = call(url, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "logprobs": 1, "echo": True})
    assert status == 200
    choice = reply["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][1:] == pytest.approx(prompt_ref, abs=1e-4)
    # the string prompt's BOS is no part of the text: the first word starts at 0
    assert lp["text_offset"][:2] == [0, 0] and prompt.startswith(lp["tokens"][1])
    # echo, max_tokens 1, the prompt as token ids: the prompt's entries, then the answer's one
    status, reply = call(url, "/v1/completions", {"prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True})
    assert status == 200
    lp = reply["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and reply["usage"]["completion_tokens"] == 1
    assert lp["token_logprobs"][1:-1] == pytest.approx(prompt_ref, abs=1e-4)
    assert lp["token_logprobs"][-1] == pytest.approx(want.token_logprobs[0], abs=1e-6)
    # (the answer's one token alone: a token holding part of a character is named "bytes:\\x.." in tokens now)
    assert reply["choices"][0]["text"] == engine.tokenizer.decode(ids) + engine.generate(ids, 1, chat=False).text


def test_an_lm_eval_loglikelihood_request(served):
    """What lm-evaluation-harness's local-completions sends with a tokenizer (two requests batched in one body), read
    as its parse_logprobs reads it: the sum of the continuation's logprobs (token_logprobs[ctxlen:-1]) and whether
    each was the greedy one (its logprob the max of its top_logprobs dict)."""
    engine, hf, url = served
    contexts = [engine.encode_prompt(p, chat=False) for p in PROMPTS]
    continuations = [[81, 82, 83], [90, 91]]
    body = {"model": "tiny", "prompt": [c + k for c, k in zip(contexts, continuations)], "temperature": 0,
            "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    status, reply = call(url, "/v1/completions", body)
    assert status == 200
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for choice, ctx, cont in zip(choices, contexts, continuations):
        lp = choice["logprobs"]
        got = sum(lp["token_logprobs"][len(ctx):-1])
        ref = full_forward(hf, ctx + cont)
        assert got == pytest.approx(sum(ref[len(ctx) + j - 1, t].item() for j, t in enumerate(cont)), abs=1e-4)
        greedy = all(t == max(top.values()) for t, top in
                     zip(lp["token_logprobs"][len(ctx):-1], lp["top_logprobs"][len(ctx):-1]))
        assert greedy == all(ref[len(ctx) + j - 1].argmax().item() == t for j, t in enumerate(cont))
    # the same as strings (lm-eval without a tokenizer): one choice per prompt
    status, reply = call(url, "/v1/completions", {**body, "prompt": PROMPTS, "max_tokens": 0})
    assert status == 200 and [c["text"] for c in reply["choices"]] == PROMPTS


def test_bad_logprob_requests_are_400s(served):
    engine, _, url = served
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for body, param, words in (
            ({**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20"),
            ({**chat, "top_logprobs": 2}, "top_logprobs", "needs \"logprobs\": true"),
            ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "0 only with \"echo\": true"),
            ({"prompt": "hi", "logprobs": 21}, "logprobs", "from 0 to 20"),
            ({"prompt": "hi", "echo": "yes"}, "echo", "echo must be true or false"),
            ({"prompt": [5, 99999], "max_tokens": 0, "echo": True}, "prompt", "token id 99999"),
            ({"prompt": [[5, 6], [7, -1]], "max_tokens": 1}, "prompt", "prompt[1]: token id -1"),
            ({"prompt": ["a", "b"], "stream": True}, "stream", "stream takes one prompt")):
        status, reply = call(url, "/v1/completions" if "prompt" in body else "/v1/chat/completions", body)
        assert status == 400 and reply["error"]["param"] == param and words in reply["error"]["message"], reply
    status, reply = call(url, "/v1/completions", {"prompt": [5] * 257, "max_tokens": 0, "logprobs": 1, "echo": True})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    status, reply = call(url, "/v1/completions", {"prompt": "hi", "max_tokens": 1})       # and it goes on serving
    assert status == 200


def test_to_dict_writes_a_ruled_out_token_as_json_can_carry_it():
    """A -inf logprob (a token the model rules out: a -inf logit) in `amphista generate --json --logprobs`:
    json.dumps wrote -Infinity, which strict JSON parsers (jq, JavaScript) refuse; -9999.0 as the server writes it."""
    from amphista_engine.engine import GenerationResult
    from amphista_engine.generation import GenerationStats
    r = GenerationResult("ab", [5, 6], [1], "length", GenerationStats(), [-0.5, float("-inf")],
                         [[(5, -0.5), (7, float("-inf"))], [(8, -1.0), (6, float("-inf"))]])
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["token_logprobs"] == [-0.5, -9999.0]
    assert d["top_logprobs"] == [[[5, -0.5], [7, -9999.0]], [[8, -1.0], [6, -9999.0]]]
    assert r.token_logprobs[1] == float("-inf")       # the result itself keeps the value
