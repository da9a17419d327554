"""Per-prompt max_new_tokens in one batch (`generate_batch(prompts, [3, 9, 5])`), and `amphista serve` batching
requests whose max_tokens differ. Each row ends at its own limit; its result is the prompt's decoded alone."""
from __future__ import annotations

import numpy as np
import pytest

from amphista_engine import Engine
from amphista_engine.errors import CacheFullError, InputError
from amphista_engine.generation import PlainDecoder
from test_serve_batching import PROMPTS, Runs, run_queued, text_of

pytestmark = pytest.mark.usefixtures("one_thread_module")

TEXTS = ["The quick brown fox", "def f(x):", "Hello, world! Speculative decoding drafts several tokens"]
LIMITS = [3, 9, 5]
SPECS = [{}, {"speculative": "amphista"}]


def _same(got, want):
    assert (got.token_ids, got.text, got.finish_reason, got.prompt_token_ids) == \
        (want.token_ids, want.text, want.finish_reason, want.prompt_token_ids)


@pytest.mark.parametrize("spec", SPECS, ids=["plain", "amphista"])
def test_each_row_ends_at_its_own_limit_as_alone(tiny_amphista_engine, spec):
    eng = tiny_amphista_engine
    alone = [eng.generate(t, n, chat=False, **spec) for t, n in zip(TEXTS, LIMITS)]
    # numpy ints and a tuple are taken as the list is
    for limits in (LIMITS, (np.int64(3), 9, np.int32(5)), np.array(LIMITS)):
        got = eng.generate_batch(TEXTS, limits, chat=False, **spec)
        for g, a, n in zip(got, alone, LIMITS):
            _same(g, a)
            assert g.finish_reason == "length" and len(g.token_ids) == n and g.stats.new_tokens == n
            assert g.stats.prompt_tokens == len(g.prompt_token_ids)
            assert g.stats.decode_steps <= n - 1     # its own steps, not the longest row's
    if spec:
        assert [g.token_ids for g in got] == [a.token_ids for a in
                                              (eng.generate(t, n, chat=False) for t, n in zip(TEXTS, LIMITS))]
    # one int for all, and a one-element list for generate / stream, as before
    assert eng.generate(TEXTS[0], [4], chat=False, **spec).token_ids == eng.generate(TEXTS[0], 4, chat=False,
                                                                                      **spec).token_ids
    assert "".join(eng.stream(TEXTS[1], [9], chat=False, **spec)) == alone[1].text


@pytest.mark.parametrize("spec", SPECS, ids=["plain", "amphista"])
def test_row_results_come_in_limit_order(tiny_amphista_engine, spec):
    eng = tiny_amphista_engine
    order, texts = [], ["", "", ""]
    for row, item in eng.stream_batch(TEXTS, LIMITS, chat=False, row_results=True, **spec):
        if isinstance(item, str):
            assert row not in order, "a delta after the row's result"
            texts[row] += item
        else:
            order.append(row)
            assert item.finish_reason == "length" and len(item.token_ids) == LIMITS[row]
            assert item.stats.new_tokens == LIMITS[row] and item.text == texts[row]
    assert order == [0, 2, 1]
    assert [r.text for r in eng.last_results] == texts


@pytest.mark.parametrize("spec", SPECS, ids=["plain", "amphista"])
def test_a_row_ending_at_eos_or_a_stop_before_its_limit(tiny_amphista_engine, monkeypatch, spec):
    eng = tiny_amphista_engine
    long = eng.generate(TEXTS[1], 9, chat=False, **spec)
    # EOS: the row's 4th token made an EOS (the tiny random model never gives its own within 9 tokens)
    eos = long.token_ids[3]
    monkeypatch.setattr(Engine, "eos_ids", property(lambda self: [eos]))
    alone = [eng.generate(t, n, chat=False, **spec) for t, n in zip(TEXTS, LIMITS)]
    got = eng.generate_batch(TEXTS, LIMITS, chat=False, **spec)
    for g, a in zip(got, alone):
        _same(g, a)
    assert got[1].finish_reason == "eos" and got[1].token_ids == long.token_ids[:long.token_ids.index(eos)]
    monkeypatch.undo()
    # a stop string: the text from the long row's 5th token on
    stop = eng.tokenizer.decode(long.token_ids[4:6])
    assert stop.strip() and stop in long.text
    alone = [eng.generate(t, n, chat=False, stop=stop, **spec) for t, n in zip(TEXTS, LIMITS)]
    got = eng.generate_batch(TEXTS, LIMITS, chat=False, stop=stop, **spec)
    for g, a in zip(got, alone):
        _same(g, a)
    assert got[1].finish_reason == "stop" and len(got[1].token_ids) < 9


@pytest.mark.parametrize("spec", SPECS, ids=["plain", "amphista"])
def test_a_short_limit_row_with_a_long_prompt_fits_its_own_room(tiny_amphista_engine, monkeypatch, spec):
    """Each row is checked against its own limit: a long prompt with a small one batches with a short prompt with a
    large one (one limit for both did not fit). A row that ended stops taking cache slots: rows are dropped only in
    bunches, and never under CUDA graphs (can_drop_rows False here), and a kept plain row went on one slot a step,
    past its prompt + its own limit, while the other row decoded."""
    eng = tiny_amphista_engine
    tree = eng._tree_spec(None, 2)           # the batch's default tree: its scratch room (make_speculative_decoder)
    room = eng.max_seq_len - (tree.num_nodes + tree.max_depth if spec else 0)
    long = list(range(5, 5 + room - 30))               # leaves 30 slots: limit 30 fits, 40 does not
    prompts, limits = [long, TEXTS[0]], [30, 40]
    with pytest.raises(CacheFullError, match=r"prompt 0 \(\d+ tokens\) \+ max_new_tokens \(40\)"):
        eng.generate_batch(prompts, 40, chat=False, **spec)
    alone = [eng.generate(p, n, chat=False, **spec) for p, n in zip(prompts, limits)]
    monkeypatch.setattr(PlainDecoder, "can_drop_rows", lambda self: False)
    got = eng.generate_batch(prompts, limits, chat=False, **spec)
    for g, a, n in zip(got, alone, limits):
        _same(g, a)
        assert len(g.token_ids) == n
    # limits [40, 30]: the long row's own limit is past its room, named by its index
    with pytest.raises(CacheFullError, match=r"^prompt 0 \(\d+ tokens\) \+ max_new_tokens \(40\)"):
        eng.generate_batch(prompts, [40, 30], chat=False, **spec)


def test_tree_room_only_where_a_row_decodes_past_its_first_token(tiny_amphista_engine):
    """max_new_tokens 1 takes no tree room (the prefill gives the token): so a batch of limits [1, 1] with a prompt
    that fills the cache but one slot; one row with limit 2 runs steps, and every row's tree needs its room."""
    eng = tiny_amphista_engine
    full = list(range(5, 5 + eng.max_seq_len - 1))
    got = eng.generate_batch([full, TEXTS[0]], [1, 1], chat=False, speculative="amphista")
    assert [len(g.token_ids) for g in got] == [1, 1]
    with pytest.raises(CacheFullError, match=r"^prompt 0 .*\+ tree room"):
        eng.generate_batch([full, TEXTS[0]], [1, 2], chat=False, speculative="amphista")


@pytest.mark.parametrize("limits, message", [
    ([3, 9], r"^max_new_tokens has 2 values for 3 prompts: give one per prompt"),
    ([3, 9, 5, 1], r"^max_new_tokens has 4 values for 3 prompts"),
    ([3, 0, 5], r"^max_new_tokens\[1\] must be a positive integer, got int 0"),
    ([3, 9, -2], r"^max_new_tokens\[2\] must be a positive integer, got int -2"),
    ([True, 9, 5], r"^max_new_tokens\[0\] must be a positive integer, got bool True"),
    ([3, 9.0, 5], r"^max_new_tokens\[1\] must be a positive integer, got float 9.0"),
    ([3, "9", 5], r"^max_new_tokens\[1\] must be a positive integer, got str '9'"),
    ([], r"^max_new_tokens is an empty list"),
    (np.ones((3, 1), dtype=int), r"^max_new_tokens must be one positive integer or a flat list"),
    (True, r"^max_new_tokens must be a positive integer, got True"),
])
def test_bad_limits_are_named(tiny_amphista_engine, limits, message):
    with pytest.raises(InputError, match=message):
        tiny_amphista_engine.generate_batch(TEXTS, limits, chat=False)


def test_a_list_for_one_prompt_must_hold_one(tiny_amphista_engine):
    with pytest.raises(InputError, match=r"^max_new_tokens has 2 values for 1 prompt: "):
        tiny_amphista_engine.generate(TEXTS[0], [3, 4], chat=False)
    with pytest.raises(InputError, match=r"^max_new_tokens has 2 values for 1 prompt: "):
        list(tiny_amphista_engine.stream(TEXTS[0], [3, 4], chat=False))


def test_other_options_stay_one_per_batch(tiny_amphista_engine):
    with pytest.raises(InputError, match=r"^temperature takes one value, which applies to every prompt"):
        tiny_amphista_engine.generate_batch(TEXTS, LIMITS, chat=False, temperature=[0.0, 0.0, 0.0])


# ---- the server ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batching(tiny_amphista_engine):
    """(engine, base URL, app, log lines): a server batching up to 4 requests, in a background thread (as
    test_serve_batching.py's)."""
    from conftest import serving
    lines: list[str] = []
    with serving(tiny_amphista_engine, model_id="tiny", log=lines.append, max_batch=4,
                 continuous=False) as httpd:     # grouping at a run's start (joins: test_serve_continuous.py)
        yield tiny_amphista_engine, httpd.url, httpd.app, lines


def test_requests_with_different_max_tokens_share_a_run(batching, monkeypatch):
    engine, url, app, lines = batching
    limits = [4, 15, 9]
    refs = [engine.generate(p, n) for p, n in zip(PROMPTS, limits)]
    runs = Runs(engine, monkeypatch)
    streams = [False, True, False]
    before = app.batch_sizes[3]
    replies = run_queued(app, runs, url, [{"messages": p, "max_tokens": n} for p, n in zip(PROMPTS, limits)],
                         streams)
    assert runs.sizes == [3]           # one run for the three
    assert app.batch_sizes[3] == before + 1
    assert sum("batch of 3" in ln for ln in lines[-3:]) == 3, lines[-3:]
    for ref, reply, stream, n in zip(refs, replies, streams, limits):
        assert text_of(reply, stream) == ref.text
        assert ref.finish_reason == "length" and len(ref.token_ids) == n
        if stream:
            assert reply[-2]["choices"][0]["finish_reason"] == "length"
        else:
            assert reply[1]["choices"][0]["finish_reason"] == "length"
            assert reply[1]["usage"]["completion_tokens"] == n


def test_a_request_without_max_tokens_batches_with_one_that_sets_it(batching, monkeypatch):
    """Left out, max_tokens is the server's default cut to the room the prompt leaves (the tiny engine's 128-slot
    cache: less than the default 512); it now shares a run with a request that sets its own."""
    engine, url, app, _ = batching
    room = engine.max_seq_len - len(engine.encode_prompt(PROMPTS[1]))
    refs = [engine.generate(PROMPTS[0], 5), engine.generate(PROMPTS[1], room)]
    runs = Runs(engine, monkeypatch)
    replies = run_queued(app, runs, url, [{"messages": PROMPTS[0], "max_tokens": 5}, {"messages": PROMPTS[1]}])
    assert runs.sizes == [2]
    assert [text_of(r, False) for r in replies] == [ref.text for ref in refs]
    assert [r[1]["usage"]["completion_tokens"] for r in replies] == [len(ref.token_ids) + (ref.finish_reason == "eos")
                                                                     for ref in refs]


def test_auto_weighs_each_rows_own_room(tiny_hf_dir, monkeypatch):
    """speculative="auto" falls back to plain decoding where a row's prompt + its own limit leaves no room for the
    tree: the warning names that row and the limit that would let it speculate; rows that fit speculate."""
    import re
    import warnings

    from amphista_engine.heads import random_heads
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=64)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    # as if the speed check found the heads faster here (the decision to test, not this machine's timing)
    monkeypatch.setattr(Engine, "resolve_speculation",
                        lambda self, s, t, *_: ("amphista", t or "chain-3", None) if s == "auto" else (s, t, None))
    short, long = eng.encode_prompt(TEXTS[0], chat=False), list(range(5, 45))     # chain-3's room: 7 slots
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # 40 + 10 + 7 and 5 + 30 + 7 fit: one limit of 30 would not
        got = eng.generate_batch([long, short], [10, 30], chat=False, speculative="auto")
    assert [g.stats.extra.get("tree") for g in got] == ["chain-3"] * 2
    assert [len(g.token_ids) for g in got] == [10, 30]
    with pytest.warns(UserWarning, match=re.escape(
            "the tree needs 7 cache slots past prompt + max_new_tokens, but max_seq_len=64 leaves 4 for prompt 0; "
            "decoding plainly (to speculate: max_new_tokens <= 17 for prompt 0 or max_seq_len >= 67)")):
        got = eng.generate_batch([long, short], [20, 30], chat=False, speculative="auto")
    assert "tree" not in got[0].stats.extra and [len(g.token_ids) for g in got] == [20, 30]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", SPECS, ids=["plain", "amphista"])
def test_per_row_limits_under_cuda_graphs(tiny_hf_dir, monkeypatch, spec):
    """CUDA graphs keep every row of the batch (no row dropping): a row that ended stays in the replayed steps, its
    cache length held by `ongoing` (a state tensor the graphs copy in), its tokens dropped by the host loop. The
    long prompt's row leaves room for its own limit only: a row kept advancing ran past the cache."""
    from amphista_engine.heads import random_heads

    def engine(graphs: bool):
        eng = Engine.from_pretrained(str(tiny_hf_dir), device="cuda", dtype="fp32", max_seq_len=128,
                                     max_batch_size=2, cuda_graphs=graphs)
        eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
        return eng
    eng, eager = engine(True), engine(False)
    tree = eng._tree_spec(None, 2)
    long = list(range(5, 5 + eng.max_seq_len - (tree.num_nodes + tree.max_depth if spec else 0) - 12))
    prompts, limits = [long, TEXTS[0]], [12, 40]
    monkeypatch.setattr(PlainDecoder, "can_drop_rows", lambda self: False)     # the eager run keeps the batch too
    want = eager.generate_batch(prompts, limits, chat=False, **spec)
    assert [len(g.token_ids) for g in want] == limits
    for _ in range(2):          # the second run replays the graphs the first captured
        got = eng.generate_batch(prompts, limits, chat=False, **spec)
        for g, w in zip(got, want):
            _same(g, w)
    assert eng.graphs.stats.replays > 0
