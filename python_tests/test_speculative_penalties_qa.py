"""Speculative decoding under repetition / presence / frequency penalties, as a demanding user QA-ing it: tree rejection
sampling keeps plain sampling's penalised law (a chi-square over many seeded rows of a vocabulary of 8, where 64-node
trees put a token several times on one path and the root's token below it); a prohibitive presence penalty never lets
a token repeat on any accepted path (rejection, typical, greedy); long accepted paths of an oracle drafter, over a
draft vocabulary too, give plain greedy output; a kept chat prefix counts for repetition_penalty; penalties past
fp32's range are refused by name; and on the real SmolLM2, seeded sampling, batches with rows ending early and rows
joining mid-run, logprobs and reuse_prefix chat turns match plain decoding under the penalties."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.errors import InputError
from amphista_engine.generation import GenerationStats, PlainDecoder, run
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams, probs_from_logits
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec

from conftest import collect, needs_smollm2, random_tiny_model
from test_logit_bias_penalties import _plain
from test_sampled_speculation_user_qa import law_check, tail
from test_speculative import PROMPTS, OracleHeads, OracleVocabHeads, _NoText, spec_ids

pytestmark = pytest.mark.usefixtures("one_thread_module")

V = 8
EOS = V - 1                              # random_tiny_model's EOS is its last token
SHORT, LONG = [3, 5, 3], [1, 4, 2, 6, 6, 5, 3, 1]
LIMIT = 5
# Seeded, so each check is one fixed outcome; a sound sampler fails one with probability P_MIN
P_MIN = 1e-6


@pytest.fixture(scope="module")
def tiny8():
    return random_tiny_model(seed=11, vocab=V, dim=16, heads=2, kv_heads=1, inter=32)


def penalised_law(model, prompt, limit, p: SamplingParams) -> dict:
    """The law of an answer under plain sampling, from the model's own logits with the penalties applied by hand
    (CTRL's on the prompt's and answer's tokens, once each; OpenAI's on the answer's counts), then temperature /
    top_k / top_p / min_p. An answer ends at EOS (kept as its last entry) or after `limit` tokens. {answer: probability}."""
    live, done = {(): 1.0}, {}
    for pos in range(limit):
        prefixes = list(live)
        ids = torch.tensor([prompt + list(s) for s in prefixes])
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1])[None].expand(len(prefixes), -1))[:, -1].double()
        for i, s in enumerate(prefixes):
            for t in set(prompt) | set(s):
                x = logits[i, t]
                logits[i, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            for t in set(s):
                logits[i, t] -= p.frequency_penalty * s.count(t) + p.presence_penalty
        probs = probs_from_logits(logits.float(), p.temperature, p.top_k, p.top_p, p.min_p).double()
        nxt = {}
        for i, s in enumerate(prefixes):
            for x in probs[i].nonzero().flatten().tolist():
                (done if x == EOS or pos == limit - 1 else nxt)[s + (x,)] = live[s] * probs[i, x].item()
        live = nxt
    return done


def answers(decoder, prompts, limit):
    stats = [GenerationStats() for _ in prompts]
    list(run(decoder, prompts, _NoText(), limit, [EOS], [], stats))
    return [tuple(r.ids) + ((EOS,) if r.finish_reason == "eos" else ()) for r in decoder.rows], stats


def first3(a):
    return a[:3]


@pytest.mark.parametrize("tree, params", [
    ("mc_sim_7b_63", SamplingParams(1.0, repetition_penalty=1.6, presence_penalty=0.5, frequency_penalty=1.5,
                                    seed=3)),
    ("dynamic-64", SamplingParams(1.0, 5, 0.9, repetition_penalty=0.5, frequency_penalty=-0.9, seed=4)),
], ids=["punish-mc_sim", "reward-topk-topp-dynamic"])
def test_rejection_sampling_keeps_plain_samplings_penalised_law(tiny8, tree, params):
    """Rows of two prompts (SHORT repeats a token; the root's token is penalised below it), 5 tokens each, through
    the engine's host loop. Over 8 tokens a 64-node tree repeats tokens along its paths, and most tokens come from
    accepted nodes. A node penalised without its own path (or with the root counted twice, or seen / counts not
    updated after a step) leaves this law: p-values of 1e-61 and answers outside top_k's support."""
    n = 2000
    heads = random_heads("amphista", tiny8, num_heads=4, seed=3)
    cache = KVCache.for_model(tiny8.config, 2 * n, 64, torch.float32, "cpu")
    dec = SpeculativeDecoder(tiny8, cache, heads, TreeSpec(tree, 4, "cpu"), params, acceptance="rejection")
    rows, stats = answers(dec, [SHORT, LONG] * n, LIMIT)
    multi = sum(sum(c for k, c in enumerate(s.accept_hist) if k > 1) for s in stats)
    assert multi > n, multi                    # accepted paths gave most answers: the test measures them
    for parity, prompt in ((0, SHORT), (1, LONG)):
        law = penalised_law(tiny8, prompt, LIMIT, params)
        got = rows[parity::2]
        pvals = law_check(got, law, first3), law_check(got, law, tail)
        assert min(pvals) > P_MIN, (prompt, pvals)


def test_the_law_is_plain_samplings(tiny8):
    """The reference law above is what plain sampling draws (so the check above compares with plain decoding)."""
    n = 1500
    params = SamplingParams(1.0, repetition_penalty=1.6, presence_penalty=0.5, frequency_penalty=1.5, seed=9)
    cache = KVCache.for_model(tiny8.config, 2 * n, 64, torch.float32, "cpu")
    rows, _ = answers(PlainDecoder(tiny8, cache, params), [SHORT, LONG] * n, LIMIT)
    for parity, prompt in ((0, SHORT), (1, LONG)):
        law = penalised_law(tiny8, prompt, LIMIT, params)
        assert min(law_check(rows[parity::2], law, first3), law_check(rows[parity::2], law, tail)) > P_MIN


@pytest.mark.parametrize("kind, acceptance, temperature", [("amphista", "rejection", 1.0),
                                                           ("medusa", "typical", 0.7),
                                                           ("amphista", "greedy", 0.0)])
def test_a_prohibitive_presence_penalty_never_repeats_a_token_on_an_accepted_path(tiny8, kind, acceptance,
                                                                                   temperature):
    """presence_penalty 1000: a token the answer holds has probability 0. The 64-node trees over 8 tokens draft
    repeats on nearly every path (the root's token below the root too); none may be accepted, nor be the bonus."""
    n = 300
    heads = random_heads(kind, tiny8, num_heads=4, seed=5)
    cache = KVCache.for_model(tiny8.config, 2 * n, 64, torch.float32, "cpu")
    params = SamplingParams(temperature, presence_penalty=1000.0, seed=7)
    dec = SpeculativeDecoder(tiny8, cache, heads, TreeSpec("mc_sim_7b_63", 4, "cpu"), params, acceptance=acceptance)
    rows, stats = answers(dec, [SHORT, LONG] * n, 6)
    assert sum(sum(s.accept_hist[2:]) for s in stats) > n // 4       # accepted paths, not bonus tokens only
    repeated = [a for a in rows if len(set(a)) < len(a)]
    assert not repeated, repeated[:5]


GREEDY_PARAMS = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
                 SamplingParams(repetition_penalty=0.7), SamplingParams(frequency_penalty=-0.6)]


@pytest.mark.parametrize("params", GREEDY_PARAMS, ids=["punish", "reward-rep", "reward-freq"])
@pytest.mark.parametrize("tree", ["tree-16", "dynamic-16", "chain-4"])
def test_long_accepted_paths_give_plain_greedy_output(tree, params):
    """An oracle drafter that knows the penalised answer: long accepted runs, along which the answer repeats tokens
    (a reward makes it loop), each node penalised for its own path; also drafting over a draft vocabulary (a drafter
    with token_ids and no declared draft_vocab_size: its 40-slot drafts met the [B, V] penalties in a torch size
    error)."""
    model = random_tiny_model(seed=11)
    prompt = PROMPTS[0]
    want = _plain(model, prompt, 48, params)
    assert want != _plain(model, prompt, 48, SamplingParams())
    for heads in (OracleHeads(prompt + want, 64, 4), OracleVocabHeads(prompt + want, 64, 4, keep=40)):
        got, why, stats = spec_ids(model, heads, tree, prompt, 48, eos=[], params=params)
        assert got == want and why == "length", type(heads).__name__
        assert stats.tau > 1.3, stats.tau


def test_a_kept_prefix_counts_for_the_repetition_penalty(tiny8):
    """reuse_prefix: only the tokens after the kept prefix are prefilled, but all the prompt's tokens are in the
    context the repetition penalty reads (plain and speculative decoders alike)."""
    first = [1, 2, 3, 4]
    prompt = first + [5, 0]
    cache = KVCache.for_model(tiny8.config, 1, 64, torch.float32, "cpu")
    params = SamplingParams(repetition_penalty=1.5)
    heads = random_heads("amphista", tiny8, num_heads=3, seed=1)
    for make in (lambda: PlainDecoder(tiny8, cache, params),
                 lambda: SpeculativeDecoder(tiny8, cache, heads, TreeSpec("chain-3", 3, "cpu"), params)):
        make().prefill([first])
        dec = make()
        dec.prefix_reuse = len(first)
        dec.prefill([prompt])
        held = set(dec.seen[0].nonzero().flatten().tolist())
        assert held == set(prompt) | {int(dec.next[0])}, held


@pytest.mark.parametrize("kw, name", [(dict(frequency_penalty=1e300), "frequency_penalty"),
                                      (dict(presence_penalty=-1e300), "presence_penalty"),
                                      (dict(frequency_penalty=-1e38), "frequency_penalty"),
                                      (dict(repetition_penalty=1e39), "repetition_penalty")])
def test_penalties_past_fp32s_range_are_refused_by_name(kw, name):
    """They were taken, became inf in fp32, and 0 * inf made NaN logits: plain greedy gave tokens 0, 1, 2, ... (the
    NaN row's argmax), a speculative step a NonFiniteError blaming the model."""
    with pytest.raises(InputError, match=name):
        SamplingParams(**kw)
    SamplingParams(**{name: 1e6 if name == "repetition_penalty" else -1e6})        # the edge is taken


# ---------------------------------------------------------------- the real SmolLM2

@pytest.fixture(scope="module")
def smol():
    from amphista_engine import Engine
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=384, max_batch_size=3)


SMOL_PROMPTS = ["Write a list of fruits: apple, banana,", "The capital of France is", "1, 2, 3, 4,"]


@needs_smollm2
@pytest.mark.parametrize("heads", ["default", "smollm2-135m-medusa"])
def test_smollm2_seeded_sampling_gives_plain_samplings_answer_under_penalties(smol, heads):
    """README: on a CPU one prompt's rejection sampling draws the numbers plain sampling draws, on tree rows equal to
    plain rows bit for bit; with the penalties too. EOS biased up and ignored: it repeats and is penalised too."""
    smol.load_heads(heads)
    kind = smol.heads.config.kind
    eos = smol.eos_ids[0]
    cases = [dict(temperature=1.0, repetition_penalty=1.3),
             dict(temperature=0.8, top_k=20, top_p=0.9, presence_penalty=1.5, frequency_penalty=0.5),
             dict(temperature=1.0, repetition_penalty=0.8, frequency_penalty=-0.4, ignore_eos=True,
                  logit_bias={eos: 6.0})]
    accepted = 0
    for case in cases:
        for p in SMOL_PROMPTS[:2]:
            kw = dict(max_new_tokens=14, chat=False, seed=1, **case)
            want = smol.generate(p, **kw)
            got = smol.generate(p, speculative=kind, tree="tree-16", acceptance="rejection", **kw)
            assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason), (kind, case, p)
            accepted += sum(got.stats.accept_hist[2:])
    assert accepted > 10


@needs_smollm2
def test_smollm2_greedy_batches_joiners_and_logprobs_equal_plain(smol):
    """Rows of different lengths and limits, rows ending early, prompts joining mid-run (admit), logprobs: each
    row's tokens and logprobs are its plain answer's."""
    smol.load_heads("default")
    kw = dict(chat=False, repetition_penalty=1.3, frequency_penalty=0.4, logprobs=True, top_logprobs=2)
    limits = [6, 16, 12]
    alone = [smol.generate(p, n, **kw) for p, n in zip(SMOL_PROMPTS, limits)]
    batch = smol.generate_batch(SMOL_PROMPTS, limits, speculative="amphista", tree="mix-4", **kw)
    queue = list(zip(SMOL_PROMPTS[1:], limits[1:]))

    def admit(free):
        out = queue[:1]
        del queue[:1]
        return out
    _, _, errors = collect(smol.stream_batch(SMOL_PROMPTS[:1], limits[:1], admit=admit, speculative="amphista",
                                             tree="dynamic-8", **kw))
    assert not errors and not queue
    for got in (batch, smol.last_results):
        for g, a in zip(got, alone):
            assert (g.token_ids, g.finish_reason) == (a.token_ids, a.finish_reason)
            assert g.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-4)
    assert sum(sum(r.stats.accept_hist[2:]) for r in batch) > 0


@needs_smollm2
def test_smollm2_reuse_prefix_chat_turns_equal_plain(smol):
    """A chat's second turn reuses the first turn's K/V: the kept prefix's tokens (the first answer's too) count for
    the repetition penalty as a fresh run counts them."""
    smol.load_heads("default")
    runs = {}
    for speculative, reuse in ((None, False), (None, True), ("amphista", True)):
        smol.generate("warm up", 2, chat=False)               # nothing kept from another chat
        msgs, ids = [{"role": "user", "content": "List three colours, then list them again."}], []
        for _ in range(2):
            r = smol.generate(msgs, 16, repetition_penalty=1.4, presence_penalty=0.3, reuse_prefix=reuse,
                              speculative=speculative)
            ids.append(r.token_ids)
            msgs = msgs + [{"role": "assistant", "content": r.text}, {"role": "user", "content": "Again."}]
        if reuse:
            assert r.stats.extra.get("prompt_tokens_reused", 0) > 10
        runs[speculative, reuse] = ids
    assert runs["amphista", True] == runs[None, True] == runs[None, False]
