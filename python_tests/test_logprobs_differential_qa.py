"""A seeded differential sweep of the log-probabilities the engine reports (token_logprobs, top_logprobs, the EOS's
eos_logprob, prompt_logprobs; the server's chat and completions logprobs, echo; the CLI's --json) against a second
path: ONE teacher-forced forward of the same model over prompt + answer, log_softmax of its raw logits. The README
promises the model's own distribution (vLLM's default raw logprobs): before temperature, top-k/top-p/min_p, the
penalties, logit_bias, allowed_token_ids / bad words, min_tokens and a response_format's mask. Swept: plain and
speculative (random Amphista heads on static and dynamic trees, Medusa heads, typical acceptance), greedy and
sampled, batches of rows of different lengths, n > 1, joining rows, reuse_prefix, prefill groups, stop strings
cutting mid-token, EOS and stop_token_ids, max_new_tokens, CUDA-graph bookkeeping (graph_standin), bf16, tied
logits at the k-th place, -inf logits (written -9999 in JSON), and the 4-bit SmolLM2 against its own scorer."""
import json
import random
import urllib.request

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.generation import LOGPROB_FLOOR, sequence_scores
from amphista_engine.heads import random_heads
from conftest import needs_smollm2, serving, smollm2_with_shipped_heads
from model_helpers import forward_logits
from test_serve import call, sse

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPTS = ["The quick brown fox", "Hello, world! def f(x):", "a", "Once upon a time in a land far away there lived"]
EOS = 2             # conftest's tiny tokenizer's EOS
TOL = 1e-4


def _engine(path, dtype="fp32", kind="amphista", **options):
    eng = Engine.from_pretrained(str(path), device="cpu", dtype=dtype, max_seq_len=256, max_batch_size=4, **options)
    eng.load_heads(random_heads(kind, eng.model, num_heads=3, seed=1))
    return eng


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    return _engine(tiny_hf_dir)


def reference(engine, prompt_ids, ids) -> torch.Tensor:
    """[len(ids), V] fp64 log_softmax of one uncached forward over prompt + ids: row i scores ids[i]."""
    logits = forward_logits(engine.model, list(prompt_ids) + list(ids)).double()
    return torch.log_softmax(logits, -1)[len(prompt_ids) - 1:]


def _check_top(top_list, row: torch.Tensor, n: int, tol: float, what):
    """A top list: min(n, V) distinct ids, best first, the reference's top values, and each id's own reference
    logprob its listed value (which takes either token of a tie at the n-th place)."""
    assert top_list is not None and len(top_list) == min(n, row.shape[0]), what
    ids, values = [t for t, _ in top_list], [v for _, v in top_list]
    assert len(set(ids)) == len(ids) and values == sorted(values, reverse=True), what
    for v, w in zip(values, row.topk(len(ids)).values.tolist()):
        assert v == w or abs(v - w) < tol, (what, values, w)
    for t, v in top_list:
        assert v == row[t].item() or abs(v - row[t].item()) < tol, (what, t, v, row[t].item())


def check(engine, r, top: int = 0, tol: float = TOL, what=""):
    """r's logprobs (its ending EOS / stop id's too) are the reference's, one per token id, in order."""
    assert r.token_logprobs is not None and len(r.token_logprobs) == len(r.token_ids), what
    assert (r.top_logprobs is None) == (not top), what
    if top:
        assert len(r.top_logprobs) == len(r.token_ids), what
    ended = [r.eos_logprob[0]] if r.eos_logprob is not None else []
    assert (r.finish_reason in ("eos", "stop") and r.stop_reason in (None, *ended)) if ended else True, what
    ref = reference(engine, r.prompt_token_ids, r.token_ids + ended)
    lps = list(r.token_logprobs) + [r.eos_logprob[1] for _ in ended]
    tops = (list(r.top_logprobs) + [r.eos_logprob[2] for _ in ended]) if top else None
    for i, t in enumerate(r.token_ids + ended):
        want = ref[i, t].item()
        assert lps[i] == want or abs(lps[i] - want) < tol, (what, i, t, lps[i], want)
        if top:
            _check_top(tops[i], ref[i], top, tol, (what, i))


TOPS = (0, 1, 5, 20)
OPTIONS = [
    {},
    # -1e6 and -100: banned (vLLM's raw logprobs still report the model's value); +50 all but forces token 7
    {"presence_penalty": 1.5, "frequency_penalty": 0.7, "logit_bias": {5: -100, 7: 50, 9: -1e6}},
    {"repetition_penalty": 1.3, "min_tokens": 4, "logit_bias": {EOS: 2.5}},
    {"allowed_token_ids": list(range(30, 90)), "bad_words": ["e", "th"], "ignore_eos": True},
]


@pytest.mark.parametrize("speculative,tree", [(None, None), ("amphista", "tree-16"), ("amphista", "dynamic-8")])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batches_under_every_option_are_the_raw_forward(engine, speculative, tree, temperature):
    """Four rows of different lengths and limits; each option set with another top_logprobs (0, 1, 5, 20); sampled
    runs add top-k / top-p / min_p, which change the tokens, never their reported logprobs."""
    kw = {"speculative": speculative} if speculative is None else {"speculative": speculative, "tree": tree}
    if temperature:
        kw.update(temperature=temperature, seed=3, top_k=40, top_p=0.95, min_p=0.01)
    for k, options in enumerate(OPTIONS):
        top = TOPS[(k + (temperature > 0)) % len(TOPS)]
        results = engine.generate_batch(PROMPTS, [5, 17, 9, 12], chat=False, logprobs=True, top_logprobs=top,
                                        **kw, **options)
        for j, r in enumerate(results):
            check(engine, r, top, what=(options, j))
            if "allowed_token_ids" in options:
                assert set(r.token_ids) <= set(options["allowed_token_ids"])


def test_stops_ending_ids_and_limits_keep_one_logprob_per_token(engine):
    """A stop string cutting mid-token (text cut, the token kept), kept or not; stop_token_ids and EOS (left out of
    token_ids, their logprob in eos_logprob); max_new_tokens 1 and 2 (the prefill's token is the last)."""
    answer = engine.generate(PROMPTS[1], 30, chat=False)
    for speculative in (None, "amphista"):
        for cut in (2, 5, 11):
            stop = answer.text[cut:cut + 2]
            for keep in (False, True):
                r = engine.generate(PROMPTS[1], 30, chat=False, logprobs=True, top_logprobs=3, stop=[stop],
                                    include_stop_str_in_output=keep, speculative=speculative)
                assert r.finish_reason == "stop" and r.text.endswith(stop) == keep
                check(engine, r, 3, what=(stop, keep))
        r = engine.generate(PROMPTS[1], 30, chat=False, logprobs=True, top_logprobs=2,
                            stop_token_ids=[answer.token_ids[5]], speculative=speculative)
        assert r.stop_reason == answer.token_ids[5] and r.eos_logprob[0] == answer.token_ids[5]
        check(engine, r, 2)
        for seed in range(2):
            for limit in (1, 2, 9):
                results = engine.generate_batch(PROMPTS, limit, chat=False, logprobs=True, top_logprobs=1,
                                                temperature=1.2, seed=seed, logit_bias={EOS: 2.5},
                                                speculative=speculative)
                for r in results:
                    assert r.finish_reason in ("eos", "length") and (r.eos_logprob is not None) == (
                        r.finish_reason == "eos")
                    check(engine, r, 1, what=(seed, limit))


def test_n_joiners_reuse_prefix_groups_and_grammars(engine):
    for speculative in (None, "amphista"):
        results = engine.generate_batch(PROMPTS[:2], 12, n=2, chat=False, logprobs=True, top_logprobs=2,
                                        temperature=1.0, seed=4, speculative=speculative)
        assert len(results) == 4 and results[0].token_ids != results[1].token_ids
        for r in results:
            check(engine, r, 2)
        # rows joining mid-run (a server's requests): their first token from their own prefill
        queue = [(engine.tokenizer.encode(PROMPTS[3]), 10), (engine.tokenizer.encode(PROMPTS[2]), 7)]

        def admit(free, queue=queue):
            out = queue[:free]
            del queue[:free]
            return out
        ends = {b: x for b, x in engine.stream_batch(PROMPTS[:2], [3, 14], chat=False, logprobs=True, top_logprobs=3,
                                                     row_results=True, admit=admit, speculative=speculative)
                if not isinstance(x, str)}
        assert sorted(ends) == [0, 1, 2, 3]
        for r in ends.values():
            check(engine, r, 3)
        # the cache's kept prefix: the first token's logprob from the prefill of the rest alone
        engine.generate(PROMPTS[3], 5, chat=False, reuse_prefix=True, speculative=speculative)
        r = engine.generate(PROMPTS[3] + " a king", 8, chat=False, logprobs=True, top_logprobs=2, reuse_prefix=True,
                            speculative=speculative)
        assert r.stats.extra["prompt_tokens_reused"] > 0
        check(engine, r, 2)
        # a long prompt beside short ones prefills in groups (greedy, on the CPU)
        long = [PROMPTS[2], "b c", PROMPTS[3] * 3, "Hi"]
        for r in engine.generate_batch(long, 6, chat=False, logprobs=True, top_logprobs=2, speculative=speculative):
            check(engine, r, 2)
        for rf in ({"type": "regex", "regex": "[a-e ]{3,12}"}, {"type": "choice", "choices": ["hello", "world wide"]}):
            r = engine.generate(PROMPTS[0], 20, chat=False, logprobs=True, top_logprobs=3, response_format=rf,
                                speculative=speculative)
            assert r.finish_reason == "eos"
            check(engine, r, 3, what=rf)


def test_medusa_heads_and_typical_acceptance(tiny_hf_dir):
    eng = _engine(tiny_hf_dir, kind="medusa")
    for kw in ({}, {"temperature": 1.0, "seed": 1}, {"temperature": 0.8, "seed": 2, "acceptance": "typical"}):
        for r in eng.generate_batch(PROMPTS, 12, chat=False, logprobs=True, top_logprobs=2, speculative="medusa",
                                    tree="tree-16", **kw):
            check(eng, r, 2, what=kw)


def test_graph_bookkeeping_across_top_logprobs(tiny_hf_dir):
    """Replayed graphs (graph_standin's CPU stand-in) keep a batch's ended rows and rebind the top tensors: runs
    that differ only in top_logprobs each get their own graphs' values, the reference's."""
    from graph_standin import CPUGraphs
    eng = _engine(tiny_hf_dir, cuda_graphs=True)
    eng.graphs = CPUGraphs()
    for speculative in (None, "amphista"):
        for top in (5, 3, 0, 20):
            for r in eng.generate_batch(PROMPTS, [5, 17, 9, 12], chat=False, logprobs=True, top_logprobs=top,
                                        speculative=speculative, temperature=0.9, seed=3):
                check(eng, r, top, what=(speculative, top))
    assert eng.graphs.stats.replays > 0 and eng.graphs.stats.failed_captures == 0


def test_bf16_on_the_cpu_backend(tiny_hf_dir):
    """bf16 steps and one bf16 forward round apart (a tree's rows too): close, aligned, the greedy token on top."""
    eng = _engine(tiny_hf_dir, dtype="bf16")
    for speculative in (None, "amphista"):
        for r in eng.generate_batch(PROMPTS, 12, chat=False, logprobs=True, top_logprobs=5, speculative=speculative):
            check(eng, r, 5, tol=0.02)
            assert all(top[0][1] == lp for top, lp in zip(r.top_logprobs, r.token_logprobs))


class _Logits(torch.nn.Module):
    """The LM head's logits with column `src[i]` in column i (ties) plus `add` (-inf: tokens the model rules out)."""

    def __init__(self, head, src, add):
        super().__init__()
        self.head, self.weight = head, head.weight
        self.register_buffer("src", src)
        self.register_buffer("add", add)

    def forward(self, h):
        return self.head(h)[..., self.src] + self.add


def _strict(raw: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(raw, parse_constant=refuse)


def test_ties_and_ruled_out_tokens_as_json(tiny_hf_dir):
    """Tied logits at the first and the 5th place: the greedy token among the first, plain == speculative; tokens at
    -inf (the model rules them out) listed as -9999 in every JSON the project writes, never -Infinity."""
    eng = _engine(tiny_hf_dir)
    first = eng.generate(PROMPTS[0], 1, chat=False, logprobs=True)
    order = reference(eng, first.prompt_token_ids, first.token_ids)[0].argsort(descending=True).tolist()
    V = eng.config.vocab_size
    src = torch.arange(V)
    src[order[1]] = order[0]
    for t in order[5:8]:
        src[t] = order[4]
    add = torch.zeros(V)
    add[order[12:]] = float("-inf")          # 12 tokens left: a top 20 lists 8 ruled out
    eng.model.output = _Logits(eng.model.output, src, add)
    got = {}
    for speculative in (None, "amphista"):
        r = eng.generate(PROMPTS[0], 6, chat=False, logprobs=True, top_logprobs=20, speculative=speculative)
        check(eng, r, 20)
        # argmax takes the first of a tie; the top list may name either first, at the same value
        assert r.token_ids[0] == min(order[:2]) and {t for t, _ in r.top_logprobs[0][:2]} == set(order[:2])
        assert r.top_logprobs[0][0][1] == r.top_logprobs[0][1][1] == r.token_logprobs[0]
        assert r.top_logprobs[0][-1][1] == float("-inf")
        got[speculative] = r.top_logprobs
        assert _strict(json.dumps(r.to_dict()))["top_logprobs"][0][-1] == [r.top_logprobs[0][-1][0], LOGPROB_FLOOR]
    assert got[None] == got["amphista"]
    ids = [order[0], order[30], order[1]]          # the prompt's second token is ruled out
    lps, _ = eng.prompt_logprobs(ids, top_logprobs=3)
    assert lps[1] == float("-inf")
    with serving(eng, quiet=True) as httpd:
        for path, body in (("/v1/completions", {"prompt": [ids], "max_tokens": 3, "logprobs": 20, "echo": True,
                                                "temperature": 0}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                                     "logprobs": True, "top_logprobs": 20})):
            for stream in (False, True):
                req = urllib.request.Request(httpd.url + path, data=json.dumps({**body, "stream": stream}).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as reply:
                    raw = reply.read().decode()
                assert "Infinity" not in raw and "NaN" not in raw and "-9999" in raw
                blocks = [b[len("data: "):] for b in raw.split("\n\n")[:-1]] if stream else [raw]
                parsed = [_strict(b) for b in blocks if b != "[DONE]"]
                if path == "/v1/completions" and not stream:
                    assert parsed[0]["choices"][0]["logprobs"]["token_logprobs"][:2] == [None, LOGPROB_FLOOR]


def test_the_server_reports_the_engines_values(engine):
    """Chat (whole and streamed), completions (whole, streamed, echo): greedy values equal to the engine's, which
    check() held to the reference; n = 2 sampled choices: one entry per token usage counts."""
    prompt, messages = PROMPTS[0], [{"role": "user", "content": PROMPTS[1]}]
    rng = random.Random(0)
    with serving(engine, quiet=True) as httpd:
        for speculative in (None, "amphista"):
            spec = {"speculative": speculative or "none"}
            for top in TOPS:
                extra = rng.choice([{}, {"stop": ["as"]}, {"logit_bias": {str(EOS): 8}}, {"presence_penalty": 1.0}])
                kw = {**extra, "logit_bias": {EOS: 8}} if "logit_bias" in extra else extra
                want = engine.generate(prompt, 16, chat=False, logprobs=True, top_logprobs=top,
                                       speculative=speculative, **kw)
                check(engine, want, top)
                lps = want.token_logprobs + ([want.eos_logprob[1]] if want.eos_logprob else [])
                body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": top, **spec, **extra}
                status, reply = call(httpd.url, "/v1/completions", body)
                legacy = reply["choices"][0]["logprobs"]
                assert status == 200 and legacy["token_logprobs"] == pytest.approx(lps, abs=1e-6)
                assert len(legacy["tokens"]) == len(legacy["top_logprobs"]) == len(legacy["text_offset"]) == len(lps)
                assert all(top <= len(d) <= top + 1 for d in legacy["top_logprobs"])
                chunks = [e["choices"][0] for e in sse(httpd.url, "/v1/completions", body)
                          if isinstance(e, dict) and e["choices"]]
                assert [x for c in chunks if c["logprobs"] for x in c["logprobs"]["token_logprobs"]] == \
                    pytest.approx(lps, abs=1e-6)
                want = engine.generate(messages, 12, logprobs=True, top_logprobs=top, speculative=speculative, **kw)
                check(engine, want, top)
                body = {"messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True,
                        "top_logprobs": top, **spec, **extra}
                status, reply = call(httpd.url, "/v1/chat/completions", body)
                content = reply["choices"][0]["logprobs"]["content"]
                assert [c["logprob"] for c in content] == pytest.approx(want.token_logprobs, abs=1e-6)
                for c, alts in zip(content, want.top_logprobs or [[]] * len(content)):
                    assert [a["logprob"] for a in c["top_logprobs"]] == pytest.approx([v for _, v in alts], abs=1e-6)
                chunks = [e["choices"][0] for e in sse(httpd.url, "/v1/chat/completions", body)
                          if isinstance(e, dict) and e["choices"]]
                assert [x["logprob"] for c in chunks if c.get("logprobs") for x in c["logprobs"]["content"]] == \
                    pytest.approx(want.token_logprobs, abs=1e-6)
            status, reply = call(httpd.url, "/v1/completions", {"prompt": prompt, "max_tokens": 10, "logprobs": 2,
                                                                "n": 2, "temperature": 1.0, "seed": 3, **spec})
            assert status == 200 and sum(len(c["logprobs"]["tokens"]) for c in reply["choices"]) == \
                reply["usage"]["completion_tokens"]
        ids = engine.tokenizer.encode(prompt)
        status, reply = call(httpd.url, "/v1/completions", {"prompt": [ids], "max_tokens": 3, "temperature": 0,
                                                            "logprobs": 3, "echo": True})
        answer = engine.generate(ids, 3, chat=False)
        ref = reference(engine, ids[:1], ids[1:] + answer.token_ids)
        want = [None] + [ref[i, t].item() for i, t in enumerate(ids[1:] + answer.token_ids)]
        assert reply["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(want, abs=TOL)


def test_the_cli_json_is_the_forwards(tiny_hf_dir, engine, capsys):
    from amphista_engine.cli import main
    args = ["generate", PROMPTS[1], "--model", str(tiny_hf_dir), "--max-new-tokens", "7", "--no-chat",
            "--dtype", "fp32", "--max-seq-len", "64", "--json", "--logprobs", "--top-logprobs", "4",
            "--presence-penalty", "1.0"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    ref = reference(engine, engine.tokenizer.encode(PROMPTS[1]), out["token_ids"])
    assert len(out["token_logprobs"]) == len(out["top_logprobs"]) == len(out["token_ids"]) == 7
    for i, t in enumerate(out["token_ids"]):
        assert abs(out["token_logprobs"][i] - ref[i, t].item()) < TOL
        _check_top([tuple(p) for p in out["top_logprobs"][i]], ref[i], 4, TOL, i)


@needs_smollm2
def test_smollm2_4bit_plain_and_speculative_are_its_own_scorer():
    """The 4-bit SmolLM2 with its shipped heads: a batch's logprobs, plain and speculative, a stop string cutting a
    multi-byte character's tokens, bit-equal to sequence_scores (prompt_logprobs' chunked forward over prompt +
    answer), and the first token's top 5 those of the scorer."""
    eng = smollm2_with_shipped_heads(max_seq_len=256, max_batch_size=2)
    prompts = ["The capital of France is", "Translate to Japanese: I like sushi. Answer: 私は"]
    for speculative in (None, "amphista"):
        for stop in (None, ["では"]):
            for r in eng.generate_batch(prompts, 20, chat=False, logprobs=True, top_logprobs=5, stop=stop,
                                        speculative=speculative):
                assert len(r.token_logprobs) == len(r.token_ids) > 0
                ids = r.prompt_token_ids + r.token_ids
                want, values, tops = sequence_scores(eng.model, ids, len(r.prompt_token_ids), top=5)
                assert r.token_logprobs == want.tolist()
                assert [t for t, _ in r.top_logprobs[0]] == tops[0].tolist()
                assert [v for _, v in r.top_logprobs[0]] == values[0].tolist()
