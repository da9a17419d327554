"""stream_batch(logprobs=True): each result's token_logprobs are the target's log-probabilities of its tokens (its own
distribution, before temperature and top-p), plain and speculative, greedy and sampled, batched, through the CUDA-graph
bookkeeping; checked against transformers' log_softmax at the same positions."""
import pytest
import torch

from amphista_engine.errors import InputError
from model_helpers import tiny_engine_and_hf

transformers = pytest.importorskip("transformers")

PROMPTS = ["The quick brown fox", "Hello, world! def f(x):"]


@pytest.fixture(scope="module")
def setup(tiny_hf_dir):
    return tiny_engine_and_hf(tiny_hf_dir)


def reference(hf, result) -> list[float]:
    ids = result.prompt_token_ids + result.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    start = len(result.prompt_token_ids) - 1
    return [lp[start + i, t].item() for i, t in enumerate(result.token_ids)]


@pytest.mark.parametrize("speculative", [None, "amphista"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_token_logprobs_are_the_targets(setup, speculative, temperature):
    engine, hf = setup
    answers = [engine.generate(p, 24, chat=False).text for p in PROMPTS]
    stop = next(answers[0][i:i + 2] for i in range(2, len(answers[0]) - 2) if answers[0][i:i + 2] not in answers[1])
    results = engine.generate_batch(PROMPTS, 24, chat=False, speculative=speculative, temperature=temperature,
                                    seed=5 if temperature else None, stop=[stop], logprobs=True)
    for r in results:
        assert r.token_logprobs is not None and len(r.token_logprobs) == len(r.token_ids) > 0
        assert max(abs(a - b) for a, b in zip(r.token_logprobs, reference(hf, r))) < 1e-4
        assert all(lp <= 0 for lp in r.token_logprobs)
        assert r.to_dict()["token_logprobs"] == r.token_logprobs
    if temperature == 0:
        assert results[0].finish_reason == "stop"
        # asking for them changes nothing else
        plain = engine.generate_batch(PROMPTS, 24, chat=False, stop=[stop])
        assert [r.token_ids for r in results] == [r.token_ids for r in plain]
        assert all(r.token_logprobs is None for r in plain)


def test_row_results_carry_them_and_bad_values_are_named(setup):
    engine, hf = setup
    items = list(engine.stream_batch(PROMPTS, 12, chat=False, logprobs=True, row_results=True,
                                     speculative="amphista"))
    ends = [x for _, x in items if not isinstance(x, str)]
    assert len(ends) == 2 and all(len(r.token_logprobs) == len(r.token_ids) for r in ends)
    assert max(abs(a - b) for a, b in zip(ends[0].token_logprobs, reference(hf, ends[0]))) < 1e-4
    with pytest.raises(InputError, match="logprobs must be True or False, got int 1"):
        engine.generate(PROMPTS[0], 4, logprobs=1)


@pytest.mark.parametrize("kind", [None, "amphista"])
def test_logprobs_through_the_graph_bookkeeping(kind, one_thread):
    """The steps rebind step_logprobs; a replayed graph re-points it at the tensor its capture wrote (the CPU
    stand-in for CUDA graphs of graph_standin.py): the same values as eager steps."""
    from graph_standin import CPUGraphs as _CPUGraphs
    from graph_standin import decoder_runs
    steps = decoder_runs(kind)

    def run(graphs=None, logprobs=True):
        def prepare(dec):
            dec.logprobs = logprobs
        return steps(12, prepare, lambda dec, out, count: (out.tolist(), count.tolist(),
                                                           logprobs and dec.step_logprobs.tolist()), graphs)
    eager = run()
    graphs = _CPUGraphs()
    run(graphs, logprobs=False)        # graphs of steps without them: a key of their own, not replayed here
    assert run(graphs) == eager and graphs.stats.replays >= 1
    assert run(graphs) == eager                    # a new decoder on the same graphs


def test_the_server_returns_them_as_openai_does(setup):
    """/v1/chat/completions with "logprobs": true: choices[0].logprobs.content, one entry per token (its text,
    bytes and log-probability; top_logprobs empty), the engine's values; streamed, with the final chunk."""
    import threading

    from amphista_engine.serving import make_server
    from test_serve import call, sse
    engine, _ = setup
    messages = [{"role": "user", "content": PROMPTS[0]}]
    want = engine.generate(messages, 16, logprobs=True, speculative="amphista")
    httpd = make_server(engine, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        body = {"messages": messages, "max_tokens": 16, "logprobs": True, "speculative": "amphista"}
        status, reply = call(httpd.url, "/v1/chat/completions", body)
        assert status == 200
        content = reply["choices"][0]["logprobs"]["content"]
        assert [c["logprob"] for c in content] == pytest.approx(want.token_logprobs, abs=1e-6)
        assert "".join(c["token"] for c in content).startswith(reply["choices"][0]["message"]["content"][:8])
        # a token holding part of a character has that part's bytes, not U+FFFD's (test_logprobs_user_qa.py)
        assert all(c["top_logprobs"] == [] for c in content)
        assert all(bytes(c["bytes"]).decode() == c["token"] for c in content if "\ufffd" not in c["token"])
        # one entry per token of the answer: not the EOS it ended on, which usage counts (chat's content is the
        # answer's tokens, whose texts join to its text; completions' legacy logprobs list the EOS too)
        assert len(content) + (want.finish_reason == "eos") == reply["usage"]["completion_tokens"]
        events = sse(httpd.url, "/v1/chat/completions", body)
        last = [e for e in events if isinstance(e, dict) and e["choices"]][-1]["choices"][0]
        assert last["finish_reason"] and [c["logprob"] for c in last["logprobs"]["content"]] == \
            pytest.approx(want.token_logprobs, abs=1e-6)
        status, reply = call(httpd.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 4})
        assert status == 200 and reply["choices"][0]["logprobs"] is None
        # top_logprobs up to 20 and completion logprobs are served now (test_top_logprobs.py)
        for bad, param in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"logprobs": "yes"}, "logprobs")):
            status, reply = call(httpd.url, "/v1/chat/completions", {"messages": messages, **bad})
            assert status == 400 and reply["error"]["param"] == param
        status, reply = call(httpd.url, "/v1/completions", {"prompt": PROMPTS[0], "logprobs": True})
        assert status == 400 and "must be an integer from 0 to 20" in reply["error"]["message"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_cli_writes_them_with_json(tiny_hf_dir, capsys):
    import json

    from amphista_engine.cli import main
    args = ["generate", PROMPTS[0], "--model", str(tiny_hf_dir), "--max-new-tokens", "6", "--no-chat",
            "--dtype", "fp32", "--max-seq-len", "64"]
    assert main(args + ["--json", "--logprobs"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_logprobs"]) == len(out["token_ids"]) == 6
    assert main(args + ["--logprobs"]) == 2
    assert "--logprobs goes with --json" in capsys.readouterr().err
