"""Seeded sampling, as a user who needs repeatable answers: every bit of a 64-bit seed counts, a seeded run neither
reads nor moves torch's global generator, one prompt's CPU rejection sampling gives plain sampling's tokens for the
same seed (README), and the answers over many seeds follow the sampling law. test_sampling_qa.py covers generate ==
stream == a batch of one on a tiny model, and the law over the rows of one batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from amphista_engine import Engine
from amphista_engine.acceptance import rejection_sample_accept
from amphista_engine.errors import InputError
from amphista_engine.generation import PlainDecoder
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
from amphista_engine.tree import build_tree

from conftest import needs_smollm2, random_tiny_model
from test_sampling_qa import exact_law, first_tokens, law_pvalue

pytestmark = pytest.mark.usefixtures("one_thread_module")

V8 = 8


@pytest.fixture(scope="module")
def tiny8():
    return random_tiny_model(seed=11, vocab=V8, dim=16, heads=2, kv_heads=1, inter=32)


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    return eng


def uniforms(seed, n=4):
    return torch.rand(n, generator=SamplingParams(1.0, seed=seed).generator("cpu"), dtype=torch.float64)


# ---------------------------------------------------------------- every bit of the seed

def test_seeds_that_differ_only_above_bit_32_draw_differently(engine):
    """torch's CPU generator keeps only a seed's low 32 bits: seed=1 and seed=2**32 + 1 (a 64-bit hash, time_ns)
    drew the same numbers, hence the same answer, though seeds up to 2**64 - 1 are taken."""
    for low in (0, 1, 12345):
        highs = [low + k * 2**32 for k in (0, 1, 2**31, 2**32 - 1)]
        draws = [uniforms(s) for s in highs]
        assert len({tuple(d.tolist()) for d in draws}) == len(highs), low
    # seeds below 2**32 keep torch's own stream (answers seeded so before stay the same) ...
    assert torch.equal(uniforms(7), torch.rand(4, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    # ... and every seed is still itself: repeatable, and reported whole
    g = SamplingParams(1.0, seed=np.uint64(2**64 - 1)).generator("cpu")
    assert g.initial_seed() == 2**64 - 1 and torch.equal(uniforms(2**64 - 1), uniforms(2**64 - 1))
    kw = dict(max_new_tokens=12, chat=False, temperature=1.0)
    answers = {s: engine.generate("The quick brown fox", seed=s, **kw).token_ids for s in (3, 3 + 2**32, 3 + 2**40)}
    assert len({tuple(a) for a in answers.values()}) == 3, answers
    assert engine.generate("The quick brown fox", seed=3 + 2**40, **kw).token_ids == answers[3 + 2**40]


@pytest.mark.parametrize("seed", [-1, 2**64, 5.0, True, np.bool_(False), np.int32(-3), "5", torch.tensor(5)])
def test_bad_seeds_are_refused_by_name(engine, seed):
    with pytest.raises(InputError, match="seed must be an integer in"):
        engine.generate("Hello", max_new_tokens=2, temperature=1.0, seed=seed)


def test_law_over_many_seeds(tiny8):
    """One prompt sampled once per seed (as a user draws n answers): the first three tokens follow the sampling law
    (softmax(logits / T), top_k, top_p), plainly and with rejection sampling. The seeds differ only above bit 32,
    so before they all drew the same answer."""
    n, params = 500, dict(temperature=0.9, top_k=5, top_p=0.9)
    cache = KVCache.for_model(tiny8.config, 1, 24, torch.float32, "cpu")
    heads = random_heads("amphista", tiny8, num_heads=3, seed=3)
    tree = TreeSpec("tree-16", 3, "cpu")
    plain, spec, multi = [], [], 0
    for k in range(n):
        p = SamplingParams(0.9, 5, 0.9, seed=k * 2**32 + 7)
        plain.append(first_tokens(PlainDecoder(tiny8, cache, p), [[3, 5]], 3)[0][0])
        got, m = first_tokens(SpeculativeDecoder(tiny8, cache, heads, tree, p), [[3, 5]], 3)
        spec.append(got[0])
        multi += m
    law = exact_law(tiny8, [3, 5], 3, **params)
    assert multi > n // 5                   # drafts were accepted: the law checked is the acceptance's
    for seqs in (torch.stack(plain), torch.stack(spec)):
        assert law_pvalue(seqs, law, V8) > 1e-4


# ---------------------------------------------------------------- rejection sampling draws what plain sampling draws

def test_rejection_sampling_stops_drawing_once_every_row_has_its_bonus():
    """README: tree rejection sampling on a CPU stops drawing once every row has its bonus. Where every row was
    refused among the deepest nodes it drew once more, for nothing (a softmax and nucleus over the vocabulary)."""
    v, tree = 6, build_tree([(0,), (0, 0)], topk=1)          # a chain: root -> a -> b
    tokens = torch.tensor([[0, 1, 2]])
    logits = torch.full((1, 3, v), -30.0)
    logits[0, 0, 1] = logits[0, 1, 4] = 30.0                 # a is certain, b (2) is never drawn
    g = torch.Generator().manual_seed(0)
    res = rejection_sample_accept(tokens, logits, tree, 1.0, generator=g)
    assert res.accept_len.item() == 1 and res.next_token.item() == 4
    ref = torch.Generator().manual_seed(0)
    torch.rand(2, 1, generator=ref, dtype=torch.float64)     # two draws: a, then the bonus
    assert torch.equal(g.get_state(), ref.get_state())


@pytest.mark.parametrize("tree", ["chain-2", "tree-16", "dynamic-8"])
def test_one_prompts_rejection_sampling_gives_plain_samplings_tokens(tiny8, tree):
    """On a CPU a speculative row's draws are plain sampling's (one a token, from bit-equal logits), so for one
    prompt and a seed both give the same answer; the extra draw above moved every token after it."""
    cache = KVCache.for_model(tiny8.config, 1, 64, torch.float32, "cpu")
    heads = random_heads("amphista", tiny8, num_heads=3, seed=3)
    spec, multi, seeds = TreeSpec(tree, 3, "cpu"), 0, range(12)
    for seed in seeds:
        p = SamplingParams(0.8, 0, 0.95, seed=seed)
        want = first_tokens(PlainDecoder(tiny8, cache, p), [[3, 5]], 16)[0]
        got, m = first_tokens(SpeculativeDecoder(tiny8, cache, heads, spec, p), [[3, 5]], 16)
        assert got.tolist() == want.tolist(), seed
        multi += m
    assert multi > len(seeds)


# ---------------------------------------------------------------- torch's global generator

@pytest.mark.parametrize("options", [dict(), dict(speculative="amphista", tree="tree-16"),
                                     dict(speculative="amphista", tree="dynamic-8"),
                                     dict(speculative="amphista", acceptance="typical", top_p=1.0)])
def test_a_seeded_run_neither_reads_nor_moves_the_global_generator(engine, options):
    kw = {**dict(max_new_tokens=12, chat=False, temperature=0.9, top_p=0.9, seed=21), **options}
    runs = []
    for user_seed in (0, 1):
        torch.manual_seed(user_seed)
        want = torch.rand(3)
        torch.manual_seed(user_seed)
        runs.append(engine.generate("Hello there", **kw).token_ids)
        for _ in engine.stream("Hello there", **kw):
            pass
        runs.append(engine.last_result.token_ids)
        assert torch.equal(torch.rand(3), want), "a seeded run moved torch's global generator"
    assert all(r == runs[0] for r in runs)
    # seed=None: torch's global generator, as README says, so torch.manual_seed fixes it; unfixed, runs differ
    kw["seed"] = None
    fixed = []
    for _ in range(2):
        torch.manual_seed(5)
        fixed.append(engine.generate("Hello there", **kw).token_ids)
    assert fixed[0] == fixed[1]
    assert len({tuple(engine.generate("Hello there", **kw).token_ids) for _ in range(3)}) > 1


# ---------------------------------------------------------------- the real model

@needs_smollm2
@pytest.mark.parametrize("quant", ["auto", "none"])
def test_real_model_seeded_runs_repeat_across_calls_engines_and_threads(quant):
    """SmolLM2 on the 4-bit path and the fp32 one (each against itself): a seed repeats after runs with other seeds,
    in a second engine, on two threads, as a stream and a batch of one; Amphista and Medusa rejection sampling (the
    default static tree, a dynamic one) give plain sampling's tokens. Before, the static trees' answers left the
    plain one after a few tokens."""
    engines = [Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=512, quant=quant,
                                      max_batch_size=b) for b in (1, 2)]
    prompt = "Write a sentence about cats."
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.95, seed=3)
    want = engines[0].generate(prompt, **kw).token_ids
    engines[0].generate(prompt, max_new_tokens=2, temperature=1.0, seed=99)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)            # 6 tokens: a seeded answer's start is its shorter run's answer
        short = {**kw, "max_new_tokens": 6}
        assert engines[1].generate(prompt, **short).token_ids == want[:6]
        assert engines[1].generate_batch([prompt], **short)[0].token_ids == want[:6]
    finally:
        torch.set_num_threads(threads)
    first = engines[0]
    first.load_heads("default")
    runs = [dict(speculative="amphista")]
    if quant == "auto":       # the fp32 path's verification forwards cost ~4x: its dynamic tree and Medusa runs
        runs += [dict(speculative="amphista", tree="dynamic-8"), dict(speculative="medusa")]     # add nothing there
    for options in runs:
        if first.heads.config.kind != options["speculative"]:
            first.load_heads("smollm2-135m-medusa")
        got = "".join(first.stream(prompt, **kw, **options))
        assert first.last_result.token_ids == want, options
        assert got == first.last_result.text
