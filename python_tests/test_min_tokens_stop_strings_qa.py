"""min_tokens holds stop strings back as vLLM does since vllm#22014: a stop string that completes in a row's first
min_tokens tokens does not end it; one that completes in a later token does, though it starts in them (the
detokenizer's window: the new text plus len(stop) - 1 characters before it). Per token, also inside a speculative
step of several tokens; the stream never shows text past the stop."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.generation import GenerationStats, run

# vLLM's tests/detokenizer/test_min_tokens.py: facebook/opt-125m's tokens for this answer
WORDS = [" is", " Lee", ",", " and", " I", "'m", " a", " student", " in", " the", " college", " of", " engineering"]


class Words:
    """Token t spells pieces[t]: a stop string's place among the tokens is known exactly."""
    def __init__(self, pieces):
        self.pieces = pieces

    def stream_decoder(self, **_):
        pieces = self.pieces

        class S:
            pending = ""

            def push(self, tok):
                return pieces[tok]

            def flush(self):
                return ""
        return S()


class Scripted:
    """A decoder that gives each row its script: the first token from prefill, then `width` tokens a step (a
    speculative step's accepted run), so a stop may complete anywhere inside a step."""
    device = torch.device("cpu")

    def __init__(self, scripts, width):
        self.scripts, self.width = scripts, width
        self.at = [1] * len(scripts)

    def prefill(self, prompts):
        return torch.tensor([s[0] for s in self.scripts])

    def step(self, *_):
        out = torch.zeros(len(self.scripts), self.width, dtype=torch.long)
        count = torch.zeros(len(self.scripts), dtype=torch.long)
        for b, s in enumerate(self.scripts):
            got = s[self.at[b]:self.at[b] + self.width]
            out[b, :len(got)], count[b] = torch.tensor(got, dtype=torch.long), len(got)
            self.at[b] += len(got)
        return out, count


def scripted_run(scripts, stop, min_tokens, width, limits=None, keep_stop=False):
    """(rows, each row's streamed text): run() over the scripted decoder, checking as it streams that every row's
    text so far is a prefix of its final text (nothing shown that a stop later cuts)."""
    dec = Scripted(scripts, width)
    streamed = [""] * len(scripts)
    limits = limits or [len(s) for s in scripts]
    steps = run(dec, [[0]] * len(scripts), Words(WORDS), limits, [], stop, [GenerationStats() for _ in scripts],
                keep_stop=keep_stop, min_tokens=min_tokens)
    for b, delta in steps:
        streamed[b] += delta
    for b, row in enumerate(dec.rows):
        assert streamed[b] == row.text, (b, streamed[b], row.text)
    return dec.rows, streamed


ANSWER = list(range(len(WORDS)))


@pytest.mark.parametrize("width", [1, 3, len(WORDS)])
def test_vllm_min_tokens_example(width):
    rows, _ = scripted_run([ANSWER], ["e"], 0, width)
    assert (rows[0].text, rows[0].finish_reason, rows[0].stop_reason, len(rows[0].ids)) == (" is L", "stop", "e", 2)
    rows, _ = scripted_run([ANSWER], ["e"], 5, width)
    # " Lee"'s e's are in the first 5 tokens; " student" is the 8th
    assert (rows[0].text, rows[0].finish_reason, rows[0].stop_reason, len(rows[0].ids)) == \
        (" is Lee, and I'm a stud", "stop", "e", 8)


@pytest.mark.parametrize("width", [1, 2, 4, len(WORDS)])
def test_a_stop_may_start_inside_the_first_min_tokens_tokens(width):
    # " I" is token 5, "'m" token 6: "I'm" completes in token 6
    rows, _ = scripted_run([ANSWER], ["I'm"], 5, width)
    assert (rows[0].text, rows[0].finish_reason, len(rows[0].ids)) == (" is Lee, and ", "stop", 6)
    rows, _ = scripted_run([ANSWER], ["I'm"], 5, width, keep_stop=True)
    assert rows[0].text == " is Lee, and I'm"
    # completing in token 6 with min_tokens 6: no later "I'm", so only max_new_tokens ends it
    rows, _ = scripted_run([ANSWER], ["I'm"], 6, width)
    assert (rows[0].text, rows[0].finish_reason, len(rows[0].ids)) == ("".join(WORDS), "length", len(WORDS))
    # a stop the first tokens hold wholly, met again later: the later one ends the row
    rows, _ = scripted_run([ANSWER], [" the", ","], 3, width)
    assert (rows[0].text, rows[0].stop_reason, len(rows[0].ids)) == (" is Lee, and I'm a student in", " the", 10)


@pytest.mark.parametrize("width", [1, 3])
def test_max_new_tokens_still_ends_a_row_and_rows_keep_their_own_counts(width):
    rows, _ = scripted_run([ANSWER], ["e"], 4, width, limits=[4])
    assert (rows[0].text, rows[0].finish_reason) == (" is Lee, and", "length")
    # rows of different lengths in one batch: each row's first min_tokens tokens are its own
    short = [2, 3, 4, 5, 7, 0, 1]            # ", and I'm student is Lee"
    rows, _ = scripted_run([ANSWER, short], ["e", "is"], 5, width, limits=[13, 7])
    assert (rows[0].text, rows[0].stop_reason, len(rows[0].ids)) == (" is Lee, and I'm a stud", "e", 8)
    assert (rows[1].text, rows[1].stop_reason, len(rows[1].ids)) == (", and I'm student ", "is", 6)
    rows, _ = scripted_run([ANSWER, short], ["e", "is"], 0, width, limits=[13, 7])
    assert [r.text for r in rows] == [" ", ", and I'm stud"]


# ---------------------------------------------------------------- the engine, on the tiny test model

PROMPT = "Once upon a time"


def vllm_cut(tok, ids, stop, m):
    """vLLM's detokenizer, token by token: (text, tokens kept) where `stop` ends the answer `ids`."""
    text = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    for k in range(m + 1, len(ids) + 1):
        at = text[k].find(stop, max(0, len(text[k - 1]) - len(stop) + 1))
        if at >= 0:
            return text[k][:at], k
    return text[-1], len(ids)


def streamed(eng, prompts, **opts):
    out = [""] * len(prompts)
    for b, delta in eng.stream_batch(prompts, **opts):
        out[b] += delta
    return out, eng.last_results


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_engine_stop_strings_wait_for_min_tokens(tiny_amphista_engine, speculative):
    eng = tiny_amphista_engine
    base = eng.generate(PROMPT, chat=False, max_new_tokens=20, speculative=None)
    assert base.finish_reason == "length" and base.text.count("as") >= 2, base.text
    ids, tok = base.token_ids, eng.tokenizer
    first = vllm_cut(tok, ids, "as", 0)[1]          # the token completing the first "as"
    tried = set()
    for stop in ("as", "|as"):
        for m in (0, first - 2, first - 1, first, first + 1, 20):
            want = vllm_cut(tok, ids, stop, m)
            tried.add(want)
            r = eng.generate(PROMPT, chat=False, max_new_tokens=20, min_tokens=m, stop=[stop],
                             speculative=speculative)
            assert (r.text, len(r.token_ids)) == want, (stop, m)
            assert r.finish_reason == ("length" if want[1] == 20 else "stop") and r.token_ids == ids[:want[1]]
            texts, results = streamed(eng, [PROMPT], chat=False, max_new_tokens=20, min_tokens=m, stop=[stop],
                                      speculative=speculative)
            assert texts == [r.text] and results[0].text == r.text
    assert len(tried) >= 4          # the cases end at different places: min_tokens moved the stop


def test_engine_batch_rows_of_different_lengths(tiny_amphista_engine):
    eng = tiny_amphista_engine
    prompts, limits = ["Hello", PROMPT], [12, 20]
    bases = eng.generate_batch(prompts, chat=False, max_new_tokens=limits, speculative=None)
    for m in (0, 3, 8, 12):
        want = [vllm_cut(eng.tokenizer, r.token_ids, "as", m) for r in bases]
        for speculative in (None, "amphista"):
            texts, results = streamed(eng, prompts, chat=False, max_new_tokens=limits, min_tokens=m, stop=["as"],
                                      speculative=speculative)
            assert [(r.text, len(r.token_ids)) for r in results] == want, (m, speculative)
            assert texts == [r.text for r in results]


def test_engine_turn_stops_wait_for_min_tokens(tiny_amphista_engine, monkeypatch):
    """A chat template's end-of-turn text ends rows as a stop string: min_tokens holds it back alike."""
    eng = tiny_amphista_engine
    chat = [{"role": "user", "content": PROMPT}]
    opts = dict(max_new_tokens=20, speculative=None, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    base = eng.generate(chat, **opts)
    assert base.finish_reason == "length"
    stop = next(base.text[i:i + 2] for i in range(len(base.text) - 2)
                if base.text[i:i + 2].isalnum() and base.text.count(base.text[i:i + 2]) >= 2)
    monkeypatch.setattr(type(eng), "_turn_stops", lambda self, template: [stop])
    first = vllm_cut(eng.tokenizer, base.token_ids, stop, 0)
    r = eng.generate(chat, **opts)
    assert (r.text, len(r.token_ids), r.finish_reason, r.stop_reason) == (*first, "stop", None)
    later = vllm_cut(eng.tokenizer, base.token_ids, stop, first[1])
    assert later != first
    r = eng.generate(chat, min_tokens=first[1], **opts)
    assert (r.text, len(r.token_ids)) == later
