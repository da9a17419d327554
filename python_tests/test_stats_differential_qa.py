"""Differential QA of the numbers the engine reports about speculative decoding (GenerationStats: decode steps,
tokens per step, tau, accept_hist, new_tokens) and of the tau `amphista eval-tau` aggregates from them, each against
an independent recount: the tokens each verify step offered (the decoder's step wrapped), cut where the row really
ended (EOS, stop string, max_new_tokens), plain greedy decoding's tokens, the same row decoded alone, and `amphista
eval`'s records of the same questions."""
from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from amphista_engine.generation import GenerationStats, PlainDecoder, run
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec

from conftest import needs_smollm2, random_tiny_model, tiny_engine_with_saved_heads, write_questions
from test_continuous_batching import RowOracle
from test_speculative import OracleHeads, RowOracles

TREES = ["chain-3", "tree-16", "dynamic-8"]


class _Letters:
    """Each token is one letter of text, so stop strings have text to complete in (and may complete mid-step)."""
    def stream_decoder(self, **_):
        class S:
            pending = ""

            def push(self, tok):
                return _text([tok])

            def flush(self):
                return ""
        return S()


def _text(ids):
    return "".join(chr(ord("a") + t % 26) for t in ids)


def _decode(model, heads, tree, prompts, max_new, eos=(), stop=(), admit=None, batch=None):
    """(decoder, stats, counts): counts[k] is what step k's verify offered each decoder row (its accepted path + 1)."""
    cache = KVCache.for_model(model.config, batch or len(prompts), 256, torch.float32, "cpu")
    dec = (PlainDecoder(model, cache, SamplingParams()) if heads is None
           else SpeculativeDecoder(model, cache, heads, TreeSpec(tree, 3, "cpu"), SamplingParams()))
    if admit is not None:
        dec.admits = True
    counts, step = [], dec.step

    def recorded():
        out, count = step()
        counts.append(count.tolist())
        return out, count
    dec.step = recorded
    stats = [GenerationStats() for _ in prompts]
    list(run(dec, prompts, _Letters(), max_new, list(eos), list(stop), stats, admit=admit))
    return dec, stats, counts


def _recount(row, counts) -> tuple[int, int, list[int]]:
    """(decode steps, step tokens, accept_hist) of a row decoded alone, from the raw per-step counts: the row takes
    its ids and the EOS that ended it, the first from the prefill, then each step's offer until it has them all."""
    left, used = len(row.ids) + (row.finish_reason == "eos") - 1, []
    for (c,) in counts:
        if left <= 0:
            break
        used.append(min(c, left))
        left -= used[-1]
    hist = [0] * (max(used, default=-1) + 1)
    for u in used:
        hist[u] += 1
    return len(used), sum(used), hist


def _check_sums(s: GenerationStats, row):
    """The stats' own arithmetic: steps = histogram total, step tokens = its weighted sum, and every token of the
    answer (+ the EOS that ended it) is the prefill's one or a step's."""
    assert sum(s.accept_hist) == s.decode_steps
    assert sum(n * c for n, c in enumerate(s.accept_hist)) == s.step_tokens
    assert s.new_tokens == len(row.ids)
    if s.new_tokens or row.finish_reason != "eos":
        assert s.new_tokens + (row.finish_reason == "eos") == s.step_tokens + 1
    assert s.tau == (s.step_tokens / s.decode_steps if s.decode_steps else 0.0)


@pytest.mark.parametrize("seed", range(3))      # each of random_tiny_model's seeds (seed % 3) once
def test_stats_count_the_tokens_each_step_really_gave(seed):
    """Seeded sweep over trees and drafters (an oracle that guesses the greedy text, random Amphista and Medusa heads)
    with EOS, stop strings and max_new_tokens that cut a step's accepted path: the answer equals plain greedy's, and
    the stats equal the recount from the raw step counts (tokens past the end are not counted as accepted)."""
    rnd = random.Random(seed)
    model = random_tiny_model(seed=seed % 3)
    prompt = [rnd.randrange(60) for _ in range(rnd.randrange(1, 8))]
    full = _decode(model, None, None, [prompt], 60)[0].rows[0].ids
    for tree in TREES:
        for kind in ("oracle", "amphista", "medusa"):
            max_new = rnd.randrange(1, 50)
            eos = [full[rnd.randrange(len(full))]] if rnd.random() < 0.4 else []
            at = rnd.randrange(2, 40)
            stop = [_text(full[at:at + rnd.randrange(1, 4)])] if rnd.random() < 0.4 else []
            heads = (OracleHeads(prompt + full, 64, 3, hit=0.85, seed=seed) if kind == "oracle"
                     else random_heads(kind, model, num_heads=3, seed=seed))
            plain, plain_stats, _ = _decode(model, None, None, [prompt], max_new, eos, stop)
            dec, stats, counts = _decode(model, heads, tree, [prompt], max_new, eos, stop)
            row, s, where = dec.rows[0], stats[0], (tree, kind, max_new, eos, stop)
            assert (row.ids, row.finish_reason) == (plain.rows[0].ids, plain.rows[0].finish_reason), where
            assert (s.decode_steps, s.step_tokens, s.accept_hist) == _recount(row, counts), where
            assert (s.prompt_tokens, s.new_tokens) == (len(prompt), len(row.ids)), where
            _check_sums(s, row)
            p = plain_stats[0]
            assert p.decode_steps == p.step_tokens == s.step_tokens and (p.tau == 1.0 or not p.decode_steps)


@pytest.mark.parametrize("seed", range(3))
def test_a_batch_rows_stats_are_its_own_run_alone(seed):
    """Rows of one batch, each with its own limit, ended by EOS, a stop string or its limit at different steps
    (the batch drops ended rows): each row's counts equal the row decoded alone with the same drafts."""
    rnd = random.Random(100 + seed)
    model = random_tiny_model(seed=seed)
    B = 3 + seed % 2
    prompts = [[rnd.randrange(60) for _ in range(rnd.randrange(1, 8))] for _ in range(B)]
    fulls = [_decode(model, None, None, [p], 60)[0].rows[0].ids for p in prompts]
    for tree in TREES:
        limits = [rnd.randrange(1, 50) for _ in range(B)]
        eos = [fulls[0][rnd.randrange(30)]]
        at = rnd.randrange(2, 40)
        stop = [_text(fulls[1][at:at + 2])]
        alone = []
        for b in range(B):
            dec, stats, _ = _decode(model, RowOracles([prompts[b] + fulls[b]], 64, 3, [b]), tree, [prompts[b]],
                                    limits[b], eos, stop)
            s = stats[0]
            alone.append((dec.rows[0].ids, dec.rows[0].finish_reason, s.decode_steps, s.step_tokens, s.accept_hist))
        heads = RowOracles([p + f for p, f in zip(prompts, fulls)], 64, 3, list(range(B)))
        dec, stats, _ = _decode(model, heads, tree, prompts, limits, eos, stop)
        got = [(r.ids, r.finish_reason, s.decode_steps, s.step_tokens, s.accept_hist) for r, s in zip(dec.rows, stats)]
        assert got == alone, tree
        for r, s in zip(dec.rows, stats):
            _check_sums(s, r)


def test_rows_that_join_a_running_batch_count_only_their_own_steps():
    """Continuous batching (admit): a joiner's first token comes from its own prefill (no step), and its counts are
    those of its run alone; the row it joins keeps its own. The oracle drafts every row's true text (hit=1), so a
    row accepts the same paths in the batch as alone."""
    model = random_tiny_model(seed=5)
    prompts = [[5, 9, 2, 33, 17], [1, 2, 3], [60, 61, 62, 4], [7, 7, 8]]
    limits = [6, 30, 20, 25]
    fulls = [_decode(model, None, None, [p], 40)[0].rows[0].ids for p in prompts]
    refs = [p + f for p, f in zip(prompts, fulls)]

    def oracle(refs):      # RowOracle: the run's first row drafts refs[0], the joiners the next ones in turn
        o = RowOracle(refs)
        o.hit = 1.0
        return o
    alone = []
    for p, ref, limit in zip(prompts, refs, limits):
        dec, stats, counts = _decode(model, oracle([ref]), "dynamic-8", [p], limit)
        assert (stats[0].decode_steps, stats[0].step_tokens, stats[0].accept_hist) == _recount(dec.rows[0], counts)
        alone.append((dec.rows[0].ids, stats[0].decode_steps, stats[0].step_tokens, stats[0].accept_hist))
    queue = list(zip(prompts[1:], limits[1:]))

    def admit(free):
        return [queue.pop(0)] if queue and free else []
    dec, stats, _ = _decode(model, oracle(refs), "dynamic-8", prompts[:1], limits[:1], admit=admit, batch=2)
    got = [(r.ids, s.decode_steps, s.step_tokens, s.accept_hist) for r, s in zip(dec.rows, stats)]
    assert got == alone and all(s.tau > 2 for s in stats)
    assert [s.prompt_tokens for s in stats] == [len(p) for p in prompts]


@needs_smollm2
def test_engine_stats_on_smollm2_match_a_recount_and_each_row_alone(monkeypatch):
    """The shipped heads accept several tokens a step: generate()'s stats equal the recount of the wrapped steps,
    with a stop string and max_new_tokens cutting a step's path; a batch (n=2) and its joiners report each row's
    own numbers, those of the row generated alone."""
    from conftest import smollm2_with_shipped_heads
    engine = smollm2_with_shipped_heads(max_batch_size=3)
    counts, step = [], SpeculativeDecoder.step

    def recorded(self):
        out, count = step(self)
        counts.append(count.tolist())
        return out, count
    monkeypatch.setattr(SpeculativeDecoder, "step", recorded)
    q = "Write a python function that adds two numbers."
    full = engine.generate(q, max_new_tokens=40, speculative="none")
    for kw in ({"max_new_tokens": 40}, {"max_new_tokens": 7}, {"max_new_tokens": 40, "stop": ["return"]}):
        counts.clear()
        r = engine.generate(q, speculative="amphista", tree="dynamic-8", **kw)
        assert r.token_ids == full.token_ids[:len(r.token_ids)]
        row = type("Row", (), {"ids": r.token_ids, "finish_reason": r.finish_reason})
        assert (r.stats.decode_steps, r.stats.step_tokens, r.stats.accept_hist) == _recount(row, counts), kw
        assert r.stats.tau > 1.5 and r.stats.extra["tree"] == "dynamic-8"
        _check_sums(r.stats, row)
    prompts, joiners = ["Say hi.", q], [("List three colors.", 12), ("What is 2+2?", 25)]
    queue = list(joiners)
    batch = engine.generate_batch(prompts, max_new_tokens=[30, 20], n=2, speculative="amphista", tree="dynamic-8")
    list(engine.stream_batch(prompts[:1], max_new_tokens=30, speculative="amphista", tree="dynamic-8",
                             admit=lambda free: [queue.pop(0)] if queue and free else []))
    joined = engine.last_results
    alone = {}          # n=2's rows share a prompt: one run alone answers both
    for got, (p, limit) in zip(batch[::2] + batch[1::2] + joined[1:],
                               list(zip(prompts, [30, 20])) * 2 + joiners):
        if (p, limit) not in alone:
            alone[p, limit] = engine.generate(p, max_new_tokens=limit, speculative="amphista", tree="dynamic-8")
        want = alone[p, limit]
        assert got.token_ids == want.token_ids
        assert [(x.stats.decode_steps, x.stats.step_tokens, x.stats.accept_hist, x.stats.new_tokens,
                 x.stats.prompt_tokens) for x in (got, want)] == [(want.stats.decode_steps, want.stats.step_tokens,
                                                                   want.stats.accept_hist, want.stats.new_tokens,
                                                                   len(want.prompt_token_ids))] * 2


# ---- amphista eval-tau: its means against the per-question records and against `amphista eval` ------------------

QUESTIONS = [{"question_id": 1, "category": "a", "turns": ["hello there", "and more"]},
             {"question_id": 2, "category": "b", "turns": ["what is it"]},
             {"question_id": 3, "category": "a", "turns": ["x y z"]}]


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, heads = tiny_engine_with_saved_heads(tiny_hf_dir, tmp_path_factory.mktemp("heads"))
    engine.loaded_name = str(tiny_hf_dir)
    return engine, heads


def _eval_tau(engine, heads, path, **kw):
    from amphista_engine.training.evaltau import eval_tau
    return eval_tau(path, heads["amphista"], engine=engine, quiet=True, speculative="amphista", **kw)


def test_eval_tau_asks_each_question_as_eval_does(tiny, tmp_path, monkeypatch):
    """eval-tau passed the first turn as a bare string: on a model without a chat template of its own that took no
    template, so it measured the heads on the raw question, while `amphista eval` (a message list: the fallback
    template) measured the chat's answer; the two reported other steps and taus for one question. Now each
    question's prompt and counts equal eval's first turn's."""
    from amphista_engine.evaluation.runner import run_eval
    engine, heads = tiny
    assert engine.tokenizer.chat_template is None
    q = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    run_eval(q, "amphista", heads={"amphista": heads["amphista"]}, max_new_tokens=12, out=tmp_path / "eval",
             engine=engine, progress=False, warmup=0, log=lambda m: None)
    records = {r["question_id"]: r["choices"][0] for r in map(json.loads, open(tmp_path / "eval" / "answers.jsonl"))
               if r["method"] == "amphista"}
    prompts, generate = [], engine.generate

    def spy(prompt, **kw):
        r = generate(prompt, **kw)
        prompts.append(r.prompt_token_ids)
        return r
    monkeypatch.setattr(engine, "generate", spy)
    res = _eval_tau(engine, heads, q, max_new_tokens=12)
    for row, ids, question in zip(res["per_question"], prompts, QUESTIONS):
        first = records[row["question_id"]]
        assert ids == engine.encode_prompt([{"role": "user", "content": question["turns"][0]}])
        assert len(ids) == first["prompt_tokens"][0]
        assert (row["decode_steps"], row["step_tokens"], row["new_tokens"]) == \
            (first["decoding_steps"][0], first["step_tokens"][0], first["new_tokens"][0])


def test_eval_tau_means_are_recomputed_from_its_rows(tiny, tmp_path, monkeypatch):
    """overall / per-category tau (all step tokens over all steps) and mean_tau (the mean of the questions' taus)
    recomputed from the per-question rows. A question that took no decoding step (its budget one token) measured no
    tau: it counted as 0.0 in mean_tau (1.0 and 1.0 came out 0.667), and with no step anywhere tau was 0.0 (no decoder
    reaches it); now it is left out of the mean, and a tau nothing measured is null."""
    engine, heads = tiny
    q = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    generate = engine.generate

    def one_token_for_question_2(prompt, **kw):     # as if its answer ended at its first token
        if (prompt if isinstance(prompt, str) else prompt[0]["content"]) == "what is it":
            kw["max_new_tokens"] = 1
        return generate(prompt, **kw)
    monkeypatch.setattr(engine, "generate", one_token_for_question_2)
    res = _eval_tau(engine, heads, q, max_new_tokens=12)
    rows = res["per_question"]
    assert [r["decode_steps"] for r in rows][1] == 0 and all(r["decode_steps"] for r in rows[::2])
    taus = [r["step_tokens"] / r["decode_steps"] for r in rows[::2]]
    assert res["overall"] == {"tau": round(sum(r["step_tokens"] for r in rows) / sum(r["decode_steps"] for r in rows),
                                           4),
                              "mean_tau": round(sum(taus) / 2, 4)}
    assert res["per_category"]["a"]["mean_tau"] == round(sum(taus) / 2, 4)
    assert res["per_category"]["b"] == {"tau": None, "mean_tau": None, "questions": 1}
    assert rows[1]["tau"] is None
    monkeypatch.setattr(engine, "generate", generate)
    none = _eval_tau(engine, heads, q, max_new_tokens=1)
    assert none["overall"] == {"tau": None, "mean_tau": None}


def test_eval_tau_with_tree_auto_reports_the_tree_it_decoded_on(tiny, tmp_path, capsys):
    """`eval-tau --tree auto` answered every question, then failed resolving the word for its summary (ConfigError
    "unknown tree 'auto'"): the run's result was lost. Now tree_used is the tree the answers' stats name."""
    engine, heads = tiny
    q = write_questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    res = _eval_tau(engine, heads, q, max_new_tokens=6, tree="auto", out=tmp_path / "tau.json")
    assert res["tree"] == "auto" and res["per_question"][0]["tree"] == res["tree_used"]
    picked = engine.generate([{"role": "user", "content": QUESTIONS[0]["turns"][0]}], max_new_tokens=6,
                             speculative="amphista", tree="auto")
    assert res["tree_used"] == picked.stats.extra["tree"]
    assert json.loads((tmp_path / "tau.json").read_text())["tree_used"] == res["tree_used"]
    fixed = _eval_tau(engine, heads, q, max_new_tokens=6, tree="chain-2")
    assert fixed["tree_used"] == fixed["per_question"][0]["tree"] == "chain-2"


def test_stats_json_of_an_answer_with_no_decoding_step_measures_no_tau():
    """Regression: an answer whose one token came from the prefill (max_new_tokens 1) said "tau": 0.0 and
    "decode_tokens_per_s": 0.0 in to_dict() (the CLI's --json, the server's `amphista` key), a tau below any
    decoder's 1 read as measured; summary() already said "no decoding step"."""
    none = GenerationStats(prompt_tokens=5, new_tokens=1, prefill_ms=3.0).to_dict()
    assert none["decode_steps"] == 0 and none["tau"] is None and none["decode_tokens_per_s"] is None
    json.dumps(none)
    some = GenerationStats(prompt_tokens=5, new_tokens=4, prefill_ms=3.0, decode_ms=10.0)
    some.record_step(2)
    some.record_step(1)
    d = some.to_dict()
    assert d["tau"] == 1.5 and d["decode_tokens_per_s"] == 300.0
