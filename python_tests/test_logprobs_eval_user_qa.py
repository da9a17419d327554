"""`amphista serve`'s logprobs as evaluation tools read them: lm-evaluation-harness's local-completions (echo,
max_tokens 1, "logprobs": 1, the continuation read as token_logprobs[ctxlen:-1]), OpenAI's legacy completions format
(text_offset in characters of the returned text, the given token always among top_logprobs, a token holding part of
a character named "bytes:\\x.."), and JSON that a strict parser takes (no -Infinity)."""
import json
import urllib.request

import pytest
import torch

from amphista_engine import Engine
from conftest import needs_smollm2

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"invalid JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def post(url: str, body: dict):
    """(status, reply parsed as strict JSON: NaN / Infinity / -Infinity refused, as JSON.parse and Go refuse them)."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, _strict(r.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, _strict(e.read().decode())


@pytest.fixture(scope="module")
def smol():
    from conftest import serving
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=256)
    with serving(engine, quiet=True, max_batch=2) as httpd:
        yield engine, httpd.url


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    from conftest import serving
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    with serving(engine, quiet=True) as httpd:
        yield engine, httpd.url


def full_forward(engine, ids) -> torch.Tensor:
    """[len(ids), V] log_softmax of one plain forward of the engine's model (no cache: causal within ids)."""
    # Why padded: on the CPU a position's logits depend on the forward's length mod SCORE_ALIGN (PyTorch's SDPA
    # vector tail), so sequence_scores pads to a multiple of it; causal, the filler cannot reach the real positions
    # A 4-bit model on the cpu backend scores in its prefill chunks through a cache (generation._score_cache: SDPA's
    # causal path was not length-invariant on every CPU), so the reference does too.
    from amphista_engine.generation import SCORE_ALIGN, _chunked_hidden, _score_cache
    padded = -(-len(ids) // SCORE_ALIGN) * SCORE_ALIGN
    with torch.inference_mode():
        cache = _score_cache(engine.model, len(ids))
        if cache is not None:
            logits = engine.model.logits(_chunked_hidden(engine.model, torch.tensor([ids]), cache)[0])
        else:
            logits = engine.model(torch.tensor([ids + [ids[-1]] * (padded - len(ids))]), torch.arange(padded)[None])[0]
    return torch.log_softmax(logits[:len(ids)].double(), -1)


def lm_eval_parse(choice: dict, ctxlen: int):
    """lm_eval/models/openai_completions.py LocalCompletionsAPI.parse_logprobs, for one choice."""
    lp = choice["logprobs"]
    tokens_logprobs, top_logprobs = lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]
    return sum(tokens_logprobs), all(t == max(top.values()) for t, top in zip(tokens_logprobs, top_logprobs))


@needs_smollm2
def test_lm_eval_loglikelihood_where_the_model_would_end_there(smol):
    """A continuation after which the model's next token is EOS (an instruct model's whole answer): the answer's
    max_tokens=1 token is that EOS. It was left out of the logprobs, so lm-eval's [ctxlen:-1] cut the
    continuation's last token instead: a wrong loglikelihood, silently. Two prompts in one body, as lm-eval batches
    them; each choice is what its prompt gets."""
    engine, url = smol
    answer = engine.generate([{"role": "user", "content": "Say hi"}], 60)
    assert answer.finish_reason == "eos"
    ids = answer.prompt_token_ids + answer.token_ids
    cut = ids[:-2]       # a second request whose next token is no EOS
    body = {"model": "smollm2", "prompt": [ids, cut], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    status, reply = post(url, body)
    assert status == 200, reply
    for choice, prompt in zip(sorted(reply["choices"], key=lambda c: c["index"]), (ids, cut)):
        ctxlen = len(prompt) - 3
        assert len(choice["logprobs"]["token_logprobs"]) == len(prompt) + 1
        got, greedy = lm_eval_parse(choice, ctxlen)
        ref = full_forward(engine, prompt)
        want = [ref[i - 1, prompt[i]].item() for i in range(ctxlen, len(prompt))]
        assert got == pytest.approx(sum(want), abs=1e-3)
        assert greedy == all(ref[i - 1].argmax().item() == prompt[i] for i in range(ctxlen, len(prompt)))
    eos = reply["choices"][0]["logprobs"]
    assert reply["choices"][0]["finish_reason"] == "stop" and eos["tokens"][-1] == "<|im_end|>"
    # the EOS's text is no part of the choice's: it stands at the text's end
    assert eos["text_offset"][-1] == len(reply["choices"][0]["text"])


@needs_smollm2
def test_text_offset_counts_the_characters_of_the_text(smol):
    """OpenAI's text_offset: where each token starts in the choice's text, in characters. The tokens of one CJK
    character or emoji (byte-level BPE pieces) each counted as one U+FFFD, so every offset after them ran past the
    text (" ok" at 24 in a 21-character prompt, the answer's first token back at 21). Such tokens are named by their
    bytes, as OpenAI names them, so that distinct ones no longer merge in top_logprobs."""
    _, url = smol
    prompt = "Héllo wörld, 日本語 🎉 ok"
    status, reply = post(url, {"prompt": prompt, "max_tokens": 2, "temperature": 0, "logprobs": 2, "echo": True})
    assert status == 200, reply
    choice = reply["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert text.startswith(prompt)
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] < len(text)
    assert offsets[lp["tokens"].index(" ok")] == prompt.index(" ok")
    assert offsets[len(lp["tokens"]) - 2] == len(prompt)        # the answer starts where the prompt ends
    data = b""
    for token, at in zip(lp["tokens"], offsets):
        if token.startswith("bytes:"):
            piece = bytes.fromhex(token[len("bytes:"):].replace("\\x", ""))
        else:
            piece = token.encode()
            assert text[at:].startswith(token)
        # every token starts within the character its first byte belongs to
        assert len(data.decode("utf-8", "ignore")) == at
        data += piece
    assert data.decode() == text
    assert sum(t.startswith("bytes:") for t in lp["tokens"]) >= 6     # the pieces of 日, 語 and 🎉
    for token, top in zip(lp["tokens"][1:], lp["top_logprobs"][1:]):
        assert token in top and 2 <= len(top) <= 3      # the given token too, as OpenAI lists it
    # special tokens written out in a string prompt are part of its text (they were counted as a BOS is, as none)
    prompt = "<|im_start|>user\nHi there<|im_end|>\n"
    status, reply = post(url, {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True})
    assert status == 200, reply
    lp = reply["choices"][0]["logprobs"]
    assert lp["tokens"][:3] == ["<|im_start|>", "user", "\n"]
    assert [prompt[at:].startswith(t) for t, at in zip(lp["tokens"][:-1], lp["text_offset"])] == [True] * 7


def test_logprobs_0_lists_the_given_token(tiny):
    """OpenAI: "logprobs": N returns up to N + 1 entries, the given token always among them; with 0 each dict was
    empty, where a client's max(top.values()) raises."""
    _, url = tiny
    status, reply = post(url, {"prompt": "The quick brown fox", "max_tokens": 3, "logprobs": 0, "echo": True})
    assert status == 200, reply
    lp = reply["choices"][0]["logprobs"]
    assert lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1:] == [{t: v} for t, v in zip(lp["tokens"][1:], lp["token_logprobs"][1:])]


def test_a_token_of_probability_zero_is_valid_json(tiny):
    """Logits of -inf (tokens a model rules out: no fault for the decoder) give logprobs of -inf. json.dumps wrote
    them as -Infinity, which is no JSON (JavaScript's, Go's and strict Python parsers refuse the reply), and an echoed
    prompt holding such a token was refused as an overflow. They come as -9999.0, as vLLM gives them."""
    engine, url = tiny
    def rule_out(module, args, out):
        out = out.clone()
        out[..., 12:] = float("-inf")       # every token from 12 on
        out[..., 2] = float("-inf")         # and EOS: the answers have tokens
        return out
    hook = engine.model.output.register_forward_hook(rule_out)
    try:
        status, reply = post(url, {"prompt": "The quick brown fox", "max_tokens": 2, "logprobs": 20})
        assert status == 200, reply
        assert min(reply["choices"][0]["logprobs"]["top_logprobs"][0].values()) == -9999.0
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True,
             "top_logprobs": 20}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            content = _strict(r.read().decode())["choices"][0]["logprobs"]["content"]
        assert content[0]["top_logprobs"][-1]["logprob"] == -9999.0
        prompt = [5, 7, 40, 9]       # 40: ruled out
        status, reply = post(url, {"prompt": prompt, "max_tokens": 2, "temperature": 0, "logprobs": 20,
                                   "echo": True})
        assert status == 200, reply
        lp = reply["choices"][0]["logprobs"]
        assert lp["token_logprobs"][2] == -9999.0 and lp["token_logprobs"][1] > -9999.0
        assert min(min(top.values()) for top in lp["top_logprobs"][1:]) == -9999.0
        assert all(-9999.0 <= v <= 0 for top in lp["top_logprobs"][1:] for v in top.values())
    finally:
        hook.remove()
