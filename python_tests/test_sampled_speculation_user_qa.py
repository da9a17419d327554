"""Sampled speculative decoding, as a user QA-ing it: tree rejection sampling keeps plain sampling's law where the other
tests leave gaps (trees with many and repeated siblings: dynamic-64 and mc_sim_7b_63 over a vocabulary smaller than
their top-k; top_k and top_p together with temperature != 1 and a logit_bias; min_tokens holding EOS and a stop id
back node by node; rows of two prompt lengths with their own max_new_tokens, ending by EOS, a stop id or their limit
inside accepted paths, and dropped from the batch as they end); a seed gives one prompt's real-model answer plain
and speculative alike under min_tokens, ignore_eos, stop ids and stop strings; Medusa's typical acceptance names a bad
threshold instead of accepting tokens of probability 0 or nothing at all."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.acceptance import typical_accept
from amphista_engine.errors import InputError
from amphista_engine.generation import GenerationStats, run
from amphista_engine.heads import random_heads
from amphista_engine.kernels import ops
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams, probs_from_logits
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
from amphista_engine.tree import build_tree

from conftest import needs_smollm2, random_tiny_model
from test_acceptance import chi2_pvalue
from test_speculative import _NoText

pytestmark = pytest.mark.usefixtures("one_thread_module")

V = 8
EOS, STOP_ID = V - 1, 4                  # random_tiny_model's EOS is its last token
SHORT, LONG = [3, 5], [1, 4, 2, 6, 6, 5, 3, 1]
# per prompt: its max_new_tokens (rows of one batch end at their own limit and are dropped as they end)
# (the long prompt's answers of 6 and 7 tokens, a quarter of them, take a second speculative step)
LIMITS = {tuple(SHORT): 4, tuple(LONG): 7}
TEMPERATURE, TOP_K, TOP_P = 0.8, 4, 0.9
BIAS = {STOP_ID: -0.5, 2: -0.7, 6: 0.4}   # the model's EOS and the stop id still end ~90% of the answers
MIN_TOKENS = 2
# Seeded, so each check is one fixed outcome; a sound sampler fails one with probability P_MIN (a union over this
# file's few law checks stays below 1e-6)
P_MIN = 5e-8




@pytest.fixture(scope="module")
def tiny8():
    return random_tiny_model(seed=11, vocab=V, dim=16, heads=2, kv_heads=1, inter=32)


def answers_law(model, prompt, limit):
    """The law of a row's answer as plain sampling defines it, computed here from the model's own logits: logit_bias,
    then EOS and the stop id at -inf for answer tokens 0..MIN_TOKENS-1, then temperature / top_k / top_p; an answer
    ends at EOS or the stop id (kept as its last entry) or after `limit` tokens. {answer tuple: probability}."""
    live, done = {(): 1.0}, {}
    for pos in range(limit):
        prefixes = list(live)
        ids = torch.tensor([prompt + list(s) for s in prefixes])
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1])[None].expand(len(prefixes), -1))[:, -1].float()
        for tok, value in BIAS.items():
            logits[:, tok] += value
        if pos < MIN_TOKENS:
            logits[:, [EOS, STOP_ID]] = float("-inf")
        probs = probs_from_logits(logits, TEMPERATURE, TOP_K, TOP_P).double()
        nxt = {}
        for i, s in enumerate(prefixes):
            for x in probs[i].nonzero().flatten().tolist():
                p = live[s] * probs[i, x].item()
                (done if x in (EOS, STOP_ID) or pos == limit - 1 else nxt)[s + (x,)] = p
        live = nxt
    return done


def run_rows(decoder, prompts, limits):
    """The engine's host loop (generation.run) over one batch: each row's answer as a tuple, its ending EOS or
    stop id appended where it ended by one."""
    stats = [GenerationStats() for _ in prompts]
    list(run(decoder, prompts, _NoText(), limits, [EOS], [], stats, stop_ids=[STOP_ID]))
    out = []
    for row in decoder.rows:
        end = {"eos": (EOS,), "stop": (STOP_ID,)}.get(row.finish_reason, ())
        out.append(tuple(row.ids) + end)
    return out, stats


def law_check(answers, law, key=lambda a: a):
    """Chi-square p-value of the answers' counts against law, both seen through key(answer) (a projection: where
    the full law's cells are too many for the sample, its tail still has few); an answer the law forbids fails at
    once."""
    bad = [a for a in answers if a not in law]
    assert not bad, f"answers plain sampling can never give: {sorted(set(bad))[:5]}"
    cells: dict = {}
    for a, p in law.items():
        cells[key(a)] = cells.get(key(a), 0.0) + p
    index = {k: i for i, k in enumerate(sorted(cells))}
    counts = torch.bincount(torch.tensor([index[key(a)] for a in answers]), minlength=len(index)).double()
    expected = torch.tensor([cells[k] for k in sorted(cells)], dtype=torch.float64) * len(answers)
    return chi2_pvalue(counts, expected, min_expected=10.0)


def tail(a):
    """An answer's length and its last two tokens: for a long answer, those a later step gave."""
    return len(a), a[-2:]


@pytest.mark.parametrize("kind, tree", [("amphista", "dynamic-64"), ("amphista", "mc_sim_7b_63"),
                                        ("medusa", "mc_sim_7b_63")])
def test_many_sibling_trees_keep_the_law_of_a_batch_with_min_tokens_stops_and_row_limits(tiny8, kind, tree):
    """A batch of two prompt lengths, each with its own max_new_tokens, through the engine's host loop: every row's
    answer (EOS or the stop id inside an accepted path ends it, min_tokens holds both back at the first tree nodes
    only, rows are dropped as they end) follows plain sampling's law for its prompt. Over a vocabulary of 8 the
    64-node trees repeat siblings (a top-10 of 8 tokens) and hold nearly every continuation, so most tokens come
    from accepted nodes, at every depth."""
    n = 2000
    heads = random_heads(kind, tiny8, num_heads=4, seed=3)
    cache = KVCache.for_model(tiny8.config, 2 * n, 96, torch.float32, "cpu")
    params = SamplingParams(TEMPERATURE, TOP_K, TOP_P, logit_bias=BIAS, seed=17)
    dec = SpeculativeDecoder(tiny8, cache, heads, TreeSpec(tree, 4, "cpu"), params)
    dec.min_tokens, dec.ban_ids = MIN_TOKENS, torch.tensor([EOS, STOP_ID])     # as the engine sets them
    prompts = [SHORT, LONG] * n
    answers, stats = run_rows(dec, prompts, [LIMITS[tuple(p)] for p in prompts])
    multi = sum(sum(c for k, c in enumerate(s.accept_hist) if k > 1) for s in stats)
    assert multi > n, multi                # accepted paths made most answers: the test measures the acceptance
    assert sum(len(a) >= 6 for a in answers[1::2]) > n // 10     # ... and second steps, after the first's compaction
    for parity, prompt in ((0, SHORT), (1, LONG)):
        law = answers_law(tiny8, prompt, LIMITS[tuple(prompt)])
        rows = answers[parity::2]
        pvals = law_check(rows, law), law_check(rows, law, tail)
        assert min(pvals) > P_MIN, (prompt, pvals)


# ---------------------------------------------------------------- one prompt, a seed: plain sampling's tokens

@pytest.fixture(scope="module")
def smol():
    from amphista_engine import Engine
    return Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=256)


@needs_smollm2
@pytest.mark.parametrize("heads", ["default", "smollm2-135m-medusa"])
def test_one_seeded_prompt_gives_plain_samplings_answer_under_min_tokens_ignore_eos_and_stops(smol, heads):
    """README: on a CPU one prompt's rejection sampling draws the numbers plain sampling draws, so a seed gives the
    same answer. Here where the answer's end is decided inside accepted paths: an EOS biased to come at once but held
    back by min_tokens node by node, ignored EOS, stop ids, stop strings, the last token before max_new_tokens."""
    smol.load_heads(heads)
    kind = smol.heads.config.kind
    eos = smol.eos_ids[0]
    cases = [dict(temperature=1.0, min_tokens=5, logit_bias={eos: 14.0}),
             dict(temperature=0.6, top_k=8, top_p=0.9, min_tokens=3, logit_bias={eos: 14.0}),
             dict(temperature=1.0, ignore_eos=True, logit_bias={eos: 14.0}),
             dict(temperature=1.3, top_k=40, min_tokens=6, ignore_eos=True, stop_token_ids=[28], logit_bias={28: 8.0}),
             dict(temperature=0.9, top_p=0.8, stop=[" the", "."], max_new_tokens=7)]
    ends, accepted = set(), 0
    for case in cases:
        for seed in range(2):
            kw = {**dict(max_new_tokens=10, chat=False, seed=seed), **case}
            want = smol.generate("The capital of France is", **kw)
            got = smol.generate("The capital of France is", speculative=kind, tree="tree-16", **kw)
            assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason), \
                (kind, case, seed)
            ends.add((want.finish_reason, len(want.token_ids)))
            accepted += sum(got.stats.accept_hist[2:])
    assert {r for r, _ in ends} == {"eos", "length", "stop"} and accepted > 10, (ends, accepted)
    assert ("eos", 5) in ends and ("eos", 3) in ends          # the biased EOS came right where min_tokens let it


# ---------------------------------------------------------------- typical acceptance's thresholds

@pytest.mark.parametrize("accept", [typical_accept, ops.typical_accept])
@pytest.mark.parametrize("kw", [dict(posterior_threshold=-0.01), dict(posterior_alpha=-0.3),
                                dict(posterior_threshold=float("nan")), dict(posterior_alpha=float("nan")),
                                dict(posterior_alpha=float("inf")), dict(posterior_threshold="0.09"),
                                dict(posterior_threshold=True)])
def test_typical_acceptance_names_a_bad_threshold(accept, kw):
    """A negative threshold accepted every drafted child, tokens of probability 0 included (a min_tokens-held EOS,
    a -inf bias); a NaN accepted nothing; a string died in torch.clamp."""
    tree = build_tree("tree-16")
    tokens = torch.zeros(2, tree.num_nodes, dtype=torch.long)
    logits = torch.zeros(2, tree.num_nodes, 5)
    name = next(iter(kw))
    for temperature in (0.8, 0.0):
        with pytest.raises(InputError, match=name):
            accept(tokens, logits, tree.retrieve, temperature, **kw)


def test_typical_acceptance_never_accepts_a_token_of_probability_zero():
    """The threshold's edges taken (0 for both): children of probability 0 (-inf logits) are still refused."""
    tree = build_tree("chain-3")
    tokens = torch.tensor([[0, 1, 2, 3]])
    logits = torch.zeros(1, tree.num_nodes, 5)
    logits[0, 1, 2] = float("-inf")                     # node 2's token is impossible after node 1
    res = typical_accept(tokens, logits, tree.retrieve, 1.0, posterior_threshold=0.0, posterior_alpha=0.0,
                         generator=torch.Generator().manual_seed(0))
    assert res.accept_len.item() == 1 and res.next_token.item() != 2


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_every_backend_names_a_bad_threshold(name):
    """ops.typical_accept checks the thresholds itself: the Triton kernel's dispatch reached no reference check."""
    pytest.importorskip("triton")
    from amphista_engine.kernels.backend import use_backend
    tree = build_tree("tree-16")
    tokens, logits = torch.zeros(2, tree.num_nodes, dtype=torch.long), torch.zeros(2, tree.num_nodes, 5)
    with use_backend(name):
        for kw in (dict(posterior_threshold=-0.01), dict(posterior_alpha=float("nan")), dict(temperature=-1.0)):
            with pytest.raises(InputError, match=next(iter(kw))):
                ops.typical_accept(tokens, logits, tree.retrieve, **{"temperature": 0.8, **kw})
