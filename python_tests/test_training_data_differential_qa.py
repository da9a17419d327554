"""Differential checks of the heads-training data pipeline: what batching, the hidden-state cache and `distill`
feed the trainer.

A padded batch of records of different lengths must train as the documented per-head, position-weighted
combination of each record alone (prompt and padding positions carry no loss, a record too short for head k gives
it no label); the cache must hand back each record's own target states (bf16 as stored) whatever the batch or
order, and refuse a cache another model filled; distilled answers must be the engine's greedy generate.
"""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from conftest import edited_copy, greedy_records, random_tiny_model, train_cfg
from amphista_engine.errors import ConfigError
from amphista_engine.heads import random_heads
from amphista_engine.training.data import Sequence, ShardWriter
from amphista_engine.training.hidden_cache import HiddenSource, fill_hidden_cache, pad_batch
from amphista_engine.training.trainer import LossComputer, head_features, loss_rows, train_heads

pytestmark = pytest.mark.usefixtures("one_thread_module")

K = 3
LAM = [0.8 ** k for k in range(K)]
# (prompt tokens, answer tokens): long, too short for heads 1 and 2, too short for head 2, a 1-token prompt
SHAPES = [(6, 20), (5, 2), (6, 3), (8, 12), (1, 9)]


@pytest.fixture(scope="module")
def seqs(target):
    recs = greedy_records(target, len(SHAPES), 8, 20, seed=5)
    return [Sequence(f"s{i}", (r["prompt_ids"] + r["answer_ids"])[8 - p:8 + a], p)
            for i, (r, (p, a)) in enumerate(zip(recs, SHAPES))]


def _loss_and_grad(target, heads, batch, loss, w):
    """The trainer's run_batch (no position sampling): loss, per-head counts and the flat gradient."""
    lc = LossComputer(target, loss, 0.8, K, 7, contextlib.nullcontext)     # chunks of 7 rows straddle records
    lc.w = torch.tensor(w)
    heads.zero_grad(set_to_none=True)
    x, lengths, plen = pad_batch(batch, "cpu")
    hidden = HiddenSource(target, None, "").get(batch, x)
    nxt = torch.zeros_like(x)
    nxt[:, :-1] = x[:, 1:]
    valid = loss_rows(lengths, plen, x.shape[1], K)
    rows = valid[..., 0].nonzero()
    feats = head_features(heads, hidden, nxt, rows)
    total, g, stats = lc(heads, feats, hidden, x, rows, valid[rows[:, 0], rows[:, 1]], True)
    feats.backward(g)
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in heads.parameters()])
    return float(total), stats["count"], grad


@pytest.mark.parametrize("kind,loss", [("amphista", "kl"), ("amphista", "ce"), ("medusa", "kl")])
def test_batch_loss_and_gradient_are_the_per_head_position_weighted_mix_of_each_record(target, seqs, kind, loss):
    # trainer.py: "the mean over valid positions per head, summed over heads with weights lambda^k": over a
    # batch, head k's mean weighs each record by its count of valid positions for that head
    heads = random_heads(kind, target, num_heads=K, seed=1).float().train().requires_grad_(True)
    total, count, grad = _loss_and_grad(target, heads, seqs, loss, LAM)
    assert torch.isfinite(grad).all() and count.tolist() == [19 + 1 + 2 + 11 + 8, 18 + 0 + 1 + 10 + 7,
                                                             17 + 0 + 0 + 9 + 6]
    want_loss, want_grad = 0.0, torch.zeros_like(grad)
    for k in range(K):
        one = [float(j == k) for j in range(K)]
        for s in seqs:
            lk, ck, gk = _loss_and_grad(target, heads, [s], loss, one)
            assert torch.isfinite(gk).all()
            want_loss += LAM[k] * lk * float(ck[k]) / float(count[k])
            want_grad += LAM[k] * gk * float(ck[k]) / float(count[k])
    assert total == pytest.approx(want_loss, rel=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_only_answer_tokens_are_labels_and_padding_none(seqs):
    x, lengths, plen = pad_batch(seqs, "cpu")
    valid = loss_rows(lengths, plen, x.shape[1], K)
    for b, s in enumerate(seqs):
        for t, k in valid[b].nonzero().tolist():
            # from the prompt's last position on, drafting a token of this record's answer (never padding)
            assert s.prompt_len - 1 <= t and s.prompt_len <= t + k + 2 < len(s.ids)
        n_answer = len(s.ids) - s.prompt_len
        assert [int(valid[b, :, k].sum()) for k in range(K)] == [max(0, n_answer - 1 - k) for k in range(K)]


@pytest.mark.parametrize("mse", [0.0, 0.5])
def test_heldout_loss_is_one_position_weighted_mean_whatever_the_batch_tokens(target, tmp_path, mse):
    # the step-0 evaluation scores the same initial heads on the same held-out records: only --batch-tokens
    # (how they are packed) differs, which must not move the loss (nll and top-k never moved)
    recs = greedy_records(target, 24, 6, 20, seed=2)
    with ShardWriter(tmp_path / "s.jsonl") as w:
        for i, r in enumerate(recs):
            w.write({**r, "answer_ids": r["answer_ids"][:3 + (i * 7) % 17]})
    kw = dict(steps=1, eval_every=1, eval_frac=0.3, mse_weight=mse)
    evals = [train_heads(train_cfg(tmp_path / "s.jsonl", tmp_path / f"o{bt}", batch_tokens=bt, **kw),
                         target=target)["history"][0] for bt in (40, 100, 2000)]
    assert evals[0]["positions"] > 40 and len({e["positions"] for e in evals}) == 1
    for e in evals[:2]:
        assert e["loss"] == pytest.approx(evals[2]["loss"], rel=1e-5)
        assert e["nll"] == pytest.approx(evals[2]["nll"], rel=1e-5)


def _fresh(target, s):
    with torch.no_grad():
        x = torch.tensor([s.ids])
        _, h = target(x, torch.arange(x.shape[1])[None], return_hidden=True,
                      logits_at=torch.zeros(1, 1, dtype=torch.long))
    return h[0].to(torch.bfloat16).float()


def test_hidden_cache_reads_back_each_records_own_states_in_any_batch_and_order(target, seqs, tmp_path):
    fill_hidden_cache(HiddenSource(target, str(tmp_path / "c"), "fp"), seqs, 64, "cpu", progress=False)
    hs = HiddenSource(target, str(tmp_path / "c"), "fp")
    for batch in ([seqs[3], seqs[0], seqs[4]], [seqs[2], seqs[1]], list(reversed(seqs))):
        x, _, _ = pad_batch(batch, "cpu")
        got = hs.get(batch, x)
        for b, s in enumerate(batch):
            torch.testing.assert_close(got[b, :len(s.ids)], _fresh(target, s), rtol=2 ** -7, atol=1e-5)
            assert not got[b, len(s.ids):].any()
    assert hs.misses == 0 and hs.hits == 3 + 2 + len(seqs)


def _other_body(target):
    """Another model with the same LM head (a fine-tune that kept its embeddings and head)."""
    other = random_tiny_model(seed=0, vocab=64, dim=32, max_len=256)
    with torch.no_grad():
        other.layers[0].attention.wqkv.weight.mul_(1.5)
    return other


def test_hidden_cache_filled_by_another_model_with_the_same_lm_head_is_refused(target, seqs, tmp_path):
    from amphista_engine.heads import lm_head_fingerprint
    other = _other_body(target)
    fp = lm_head_fingerprint(target)
    assert lm_head_fingerprint(other) == fp
    fill_hidden_cache(HiddenSource(target, str(tmp_path / "c"), fp), seqs, 64, "cpu", progress=False)
    with pytest.raises(ConfigError, match=r"hidden-state cache .*another model.*--cache-hidden"):
        HiddenSource(other, str(tmp_path / "c"), fp)
    with pytest.raises(ConfigError, match="another target"):
        HiddenSource(target, str(tmp_path / "c"), "V64-d32-0000")
    # the same model loaded in another dtype reads it (states are used as stored)
    HiddenSource(random_tiny_model(seed=0, vocab=64, dim=32, max_len=256, dtype=torch.bfloat16),
                 str(tmp_path / "c"), fp)
    HiddenSource(random_tiny_model(seed=0, vocab=64, dim=32, max_len=256, dtype=torch.float16),
                 str(tmp_path / "c"), fp)


def test_hidden_cache_written_before_the_weights_sketch_still_opens(target, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"fingerprint": "fp", "dtype": "bfloat16", "format": 1,
                                             "computed_in": "float32"}))
    assert HiddenSource(target, str(d), "fp").computed_in == "float32"


def test_train_refuses_another_models_cache_by_flag(target, shard, tmp_path):
    train_heads(train_cfg(shard, tmp_path / "a", cache_hidden=str(tmp_path / "c"), steps=1), target=target)
    with pytest.raises(ConfigError, match="another model"):
        train_heads(train_cfg(shard, tmp_path / "b", cache_hidden=str(tmp_path / "c"), steps=1),
                    target=_other_body(target))


def test_cached_run_resumed_equals_a_cached_run_straight_through(target, shard, tmp_path):
    # the resumed run reads states cached by its first part (other batches): the same states as a run that
    # computed them all itself, so the same heads
    straight = train_heads(train_cfg(shard, tmp_path / "p", steps=3, cache_hidden=str(tmp_path / "c1")),
                           target=target)["heads"].state_dict()
    cache = str(tmp_path / "c2")
    train_heads(train_cfg(shard, tmp_path / "r", steps=3, stop_after=1, cache_hidden=cache), target=target)
    resumed = train_heads(train_cfg(shard, tmp_path / "r", steps=3, resume=True, cache_hidden=cache),
                          target=target)
    assert resumed["steps"] == 3
    for k, v in straight.items():
        torch.testing.assert_close(resumed["heads"].state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_distilled_records_are_the_engines_greedy_answers(tiny_hf_dir, tmp_path):
    from amphista_engine import Engine
    from amphista_engine.training.data import load_shard
    from amphista_engine.training.distill import distill

    def eos_after_288(t):      # EOS wherever token 292 would follow: some answers end on EOS, others on the limit
        w = t["lm_head.weight"]
        w[2] = w[292] * 1.05
    path = edited_copy(tiny_hf_dir, tmp_path / "m", tensors=eos_after_288)
    eng = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=128, max_batch_size=4,
                                 quant="none")
    texts = ["hello there", "a much longer prompt about the weather and the sea", "x", "two words",
             "tell me a story about cats", "ok"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "source": "s", "prompt": p}) + "\n"
                                              for i, p in enumerate(texts)))
    distill(tmp_path / "p.jsonl", tmp_path / "d.jsonl", engine=eng, batch_size=4, max_new_tokens=12,
            progress=False)
    recs = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == [f"p{i}" for i in range(len(texts))]
    assert {r["finish_reason"] for r in recs} == {"eos", "length"}
    for r in recs:
        g = eng.generate(r["prompt"], max_new_tokens=12)
        assert r["prompt_ids"] == eng.encode_prompt(r["prompt"])
        assert (r["answer_ids"], r["finish_reason"]) == (g.token_ids, g.finish_reason)
        assert 2 not in r["answer_ids"]
    data = load_shard(tmp_path / "d.jsonl", 300, 128, min_answer=1)
    for s in data.sequences:
        r = next(r for r in recs if r["id"] == s.id)
        assert (s.ids[:s.prompt_len], s.ids[s.prompt_len:]) == (r["prompt_ids"], r["answer_ids"])
