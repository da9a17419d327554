"""Prompt lookup decoding (speculative="lookup") and OpenAI's predicted outputs (`prediction`) at the CLI and the
server, on the embedded SmolLM2. Before: `--speculative lookup` was an argparse error, a request's speculative
"lookup" a 400, and a request's prediction was checked and dropped (never drafted from). Now `generate` / `chat` /
`serve --speculative lookup` decode by lookup without loading or timing heads (--heads other than its default, or a
tree that is no chain, refused by name before the load); a request's prediction goes to the engine, a request with
one and no speculative of its own decodes by lookup, one naming a method that never reads it is a 400 naming
`prediction`, and requests with other predictions never share a run (the engine's prediction is batch-wide)."""
from __future__ import annotations

import io
import json
import sys

import pytest

from amphista_engine.cli import main
from conftest import needs_smollm2, serving, smollm2_with_shipped_heads
from test_serve import call, error_of
from test_serve_batching import Runs, run_queued

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "Copy this sentence twice: the cat sat on the mat and the dog sat on the log."}]
OTHER = [{"role": "user", "content": "List three colors, one per line."}]
PROMPT = "Repeat exactly: apples, bananas, cherries, dates, figs, grapes, apples, bananas"


# ---- the CLI --------------------------------------------------------------------------------------------------

def _generate(capsys, *flags):
    rc = main(["generate", PROMPT, "--device", "cpu", "--max-new-tokens", "20", "--json", *flags])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


_PLAIN = {}


def _plain(capsys):
    """The plain answer the lookup runs below compare with: one CLI run (an engine load) for both."""
    if not _PLAIN:
        _PLAIN.update(_generate(capsys, "--speculative", "none"))
    return _PLAIN


def test_generate_lookup_is_plain_greedy_text_without_heads(capsys, monkeypatch):
    plain = _plain(capsys)
    from amphista_engine import Engine

    def no_heads(self, *a, **k):
        raise AssertionError("--speculative lookup loaded heads")
    monkeypatch.setattr(Engine, "load_heads", no_heads)
    monkeypatch.setattr(Engine, "speculation_check", no_heads)      # nor timed any
    got = _generate(capsys, "--speculative", "lookup", "--tree", "chain-2")
    assert got["text"] == plain["text"] and got["token_ids"] == plain["token_ids"]
    assert got["speculative"] == "lookup" and got["stats"]["method"] == "lookup"
    assert got["stats"]["tree"] == "chain-2" and "speculation_check" not in got
    assert plain["speculative"] is None


def test_generate_heads_with_lookup(capsys, monkeypatch):
    """--speculative amphista+lookup: the shipped heads and a chain, no timing (the method is asked for)."""
    plain = _plain(capsys)
    from amphista_engine import Engine

    def no_check(self, *a, **k):
        raise AssertionError("--speculative amphista+lookup timed the heads")
    monkeypatch.setattr(Engine, "speculation_check", no_check)
    got = _generate(capsys, "--speculative", "amphista+lookup", "--tree", "mix-4+chain-3")
    assert got["token_ids"] == plain["token_ids"] and got["speculative"] == "amphista+lookup"
    assert got["stats"]["tree"] == "mix-4+chain-3"


def test_chat_lookup_names_the_method_on_its_stats_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Say hello.\n"))
    assert main(["chat", "--device", "cpu", "--max-new-tokens", "6", "--speculative", "lookup"]) == 0
    err = capsys.readouterr().err
    assert "[lookup chain-4]" in err, err      # the CPU's default chain


@pytest.mark.parametrize("command, flags, words", [
    ("generate", ["--heads", "none"], ["--heads none", "--speculative lookup", "--speculative none"]),
    ("generate", ["--heads", "smollm2-135m-medusa"], ["--heads smollm2-135m-medusa", "loads no heads"]),
    ("chat", ["--heads", "smollm2-135m-amphista"], ["--heads smollm2-135m-amphista", "loads no heads"]),
    ("generate", ["--tree", "mix-4"], ["--tree mix-4", "chain-K", "1..16"]),
    ("serve", ["--port", "0", "--tree", "dynamic-8"], ["--tree dynamic-8", "chain-K"]),
    ("serve", ["--port", "0", "--heads", "none"], ["--heads none", "loads no heads"]),
])
def test_bad_lookup_combinations_are_refused_before_the_load(capsys, command, flags, words):
    argv = [command, *(["hi"] if command == "generate" else []), "--device", "cpu", "--speculative", "lookup", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("amphista: error: ") and "loading" not in err, err
    for w in words:
        assert w in err, err


# ---- the server -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served():
    """(engine, base URL, app): SmolLM2 with its Amphista heads, served with speculative amphista by default,
    batches of up to 4 (requests arriving mid-run wait: which runs hold which requests is what is checked)."""
    engine = smollm2_with_shipped_heads(max_seq_len=512)
    with serving(engine, model_id="smol", speculative="amphista", max_batch=4, continuous=False,
                 log=lambda line: None) as httpd:
        yield engine, httpd.url, httpd.app


def _chat(url, **fields):
    status, reply = call(url, CHAT, {"messages": ASK, "max_tokens": 24, **fields})
    assert status == 200, reply
    return reply["choices"][0]["message"]["content"], reply["amphista"]


def test_a_prediction_decodes_by_lookup_to_the_same_answer(served, monkeypatch):
    _, url, _ = served
    from amphista_engine import Engine
    from amphista_engine.speculation_check import SpeculationCheck
    pays = [True]           # the heads' timing verdict, stubbed (a timed one depends on the machine)
    monkeypatch.setattr(Engine, "speculation_check",
                        lambda self, tree=None, *a, **k: SpeculationCheck(pays[0], tree or "mix-4", "stubbed"))
    plain, extra = _chat(url, speculative="none")
    assert extra["speculative"] is None
    own, extra = _chat(url)
    assert (own, extra["speculative"]) == (plain, "amphista")        # the server's default without a prediction
    looked, lookup = _chat(url, speculative="lookup")
    assert (looked, lookup["speculative"]) == (plain, "lookup")      # named by the run, though heads are loaded
    # no speculative of its own: lookup beside the server's heads; the prediction drafted (more accepted)
    text, extra = _chat(url, prediction={"type": "content", "content": plain})
    assert (text, extra["speculative"]) == (plain, "amphista+lookup")
    assert extra["tau"] > lookup["tau"], (extra, lookup)
    text, extra = _chat(url, speculative="auto", prediction={"type": "content", "content": plain})
    assert (text, extra["speculative"]) == (plain, "amphista+lookup")
    pays[0] = False         # heads that lose to plain steps here: under "auto" the prediction drafts alone
    text, extra = _chat(url, speculative="auto", prediction={"type": "content", "content": plain})
    assert (text, extra["speculative"]) == (plain, "lookup")
    pays[0] = True
    text, extra = _chat(url, speculative="lookup", prediction={"type": "content", "content": plain})
    assert (text, extra["speculative"]) == (plain, "lookup")
    wrong, extra = _chat(url, prediction={"type": "content", "content": "Mountains are tall. " * 4})
    assert (wrong, extra["speculative"]) == (plain, "amphista+lookup")


def test_a_completion_takes_a_prediction_in_text_parts(served):
    _, url, _ = served
    body = {"prompt": PROMPT, "max_tokens": 20, "speculative": "none"}
    status, ref = call(url, "/v1/completions", body)
    assert status == 200, ref
    text = ref["choices"][0]["text"]
    parts = [{"type": "text", "text": text[:7]}, {"type": "text", "text": text[7:]}]
    status, reply = call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 20,
                                                  "prediction": {"type": "content", "content": parts}})
    assert status == 200, reply
    assert reply["choices"][0]["text"] == text and reply["amphista"]["speculative"] == "amphista+lookup"
    assert reply["amphista"]["tau"] > 1
    # the prediction is the answer itself, split in parts: every token of it is accepted
    details = reply["usage"]["completion_tokens_details"]
    assert details["rejected_prediction_tokens"] == 0
    assert details["accepted_prediction_tokens"] == reply["usage"]["completion_tokens"]


@pytest.mark.parametrize("method", ["amphista", "medusa", "none"])
def test_a_prediction_with_a_method_that_never_reads_it_is_a_400(served, method):
    _, url, _ = served
    error_of(call(url, CHAT, {"messages": ASK, "max_tokens": 4, "speculative": method,
                              "prediction": {"type": "content", "content": "the cat"}}),
             400, "prediction", repr(method), "'lookup'", param="prediction")


def test_lookup_requests_name_their_tree(served):
    _, url, _ = served
    text, extra = _chat(url, speculative="lookup", tree="chain-3", max_tokens=8)
    assert extra["tree"] == "chain-3"
    error_of(call(url, CHAT, {"messages": ASK, "max_tokens": 4, "speculative": "lookup", "tree": "mix-4"}),
             400, "chain-K", param="tree")
    error_of(call(url, CHAT, {"messages": ASK, "max_tokens": 4, "speculative": "fast"}), 400, "'lookup'",
             param="speculative")


@pytest.mark.parametrize("path, body", [
    ("/v1/responses", {"input": "Say hi.", "max_output_tokens": 4}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}),
])
def test_the_other_apis_take_speculative_lookup(served, path, body):
    _, url, _ = served
    status, reply = call(url, path, {"model": "smol", **body, "speculative": "lookup"})
    assert status == 200, reply


class _Predictions(Runs):
    """Runs that also records each run's prediction."""

    def __init__(self, engine, monkeypatch):
        super().__init__(engine, monkeypatch)
        self.predictions = []

    def __call__(self, prompts, *args, **kwargs):
        self.predictions.append(kwargs.get("prediction"))
        return super().__call__(prompts, *args, **kwargs)


def test_requests_with_other_predictions_never_share_a_run(served, monkeypatch):
    engine, url, app = served
    refs = [_chat(url, messages=m, speculative="none")[0] for m in (ASK, OTHER)]
    runs = _Predictions(engine, monkeypatch)
    first = len(runs.sizes)
    # queued behind a run, in this order: A's prediction, B's, A's again (that one may share A's run)
    bodies = [{"messages": m, "max_tokens": 24, "prediction": {"type": "content", "content": p}}
              for m, p in ((ASK, refs[0]), (OTHER, refs[1]), (ASK, refs[0]))]
    replies = run_queued(app, runs, url, bodies)
    assert runs.sizes[first:] == [2, 1], runs.sizes
    assert runs.predictions[-2:] == [refs[0], refs[1]]
    for (status, reply), want in zip(replies, (refs[0], refs[1], refs[0])):
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == want
        assert reply["amphista"]["speculative"] == "amphista+lookup"     # beside the server's heads


def test_lookup_as_the_servers_own_method(served):
    engine, _, _ = served
    with serving(engine, model_id="smol", speculative="lookup", tree="chain-3", log=lambda line: None) as httpd:
        assert httpd.app.default_method() == "lookup"
        plain = call(httpd.url, CHAT, {"messages": ASK, "max_tokens": 12, "speculative": "none"})[1]
        status, reply = call(httpd.url, CHAT, {"messages": ASK, "max_tokens": 12})
        assert status == 200, reply
        assert reply["amphista"]["speculative"] == "lookup" and reply["amphista"]["tree"] == "chain-3"
        assert reply["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
        # a prediction keeps the server's own chain; another method drops it for its own default
        status, reply = call(httpd.url, CHAT, {"messages": ASK, "max_tokens": 12,
                                               "prediction": {"type": "content", "content": "the cat"}})
        assert status == 200 and reply["amphista"]["tree"] == "chain-3", reply
        status, reply = call(httpd.url, CHAT, {"messages": ASK, "max_tokens": 12, "speculative": "amphista"})
        assert status == 200 and reply["amphista"]["speculative"] == "amphista", reply
