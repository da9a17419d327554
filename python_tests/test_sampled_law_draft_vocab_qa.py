"""Sampled speculative decoding with heads of a reduced draft vocabulary (HeadsConfig.draft_vocab_size,
`--draft-vocab`): the heads score a subset of the tokens, slot i standing for token draft_vocab[i], and the tree
holds those tokens only. Tree rejection sampling must still give plain sampling's law over the full vocabulary: a
token outside the subset is never drafted, so it comes from the residual (the draw that no child holds), at the
target's own rate.

test_sampled_law_differential_qa.py's method and thresholds, reusing its helpers: a batch of N answers of PROMPT
decoded plainly (seed 1) and speculatively (seed 2) through generation.run, and Pearson chi-square tests of
homogeneity on the answers' first tokens, their lengths and last two tokens, and a repeated token, each failing
below P_MIN = 1e-6 (cells pooled below MIN_CELL; 6 configurations x 3 checks: a false failure below 2e-5, and
none with the fixed seeds). Drafters: Amphista and Medusa heads of random weights with a
draft vocabulary (their LM head's rows gathered for the subset), and SubsetAgreeingHeads, which draft the target's
own logits along its greedy path restricted to the subset (accepted often, on a chain too). Each subset is in a
non-identity order, so a slot left unmapped would put other tokens in the tree: the tree's tokens are checked to lie
in the subset. Subsets: LIKELY holds ~70% of the tiny target's next-token mass, UNLIKELY ~20%, so with it most
tokens come from the residual. Scratch injections (not kept) each failed: the slots left unmapped in the tree (9 of
17 tests, by the tree-token check; the law itself stays exact, as rejection sampling with q = 1 holds for any tree
tokens), the bonus after a rejection drawn among the tree's tokens only (6 of 6 law cases: p 0.0, or too few tokens from
outside the subset), typical acceptance fed the unbiased logits (3 of 3), greedy's bonus the argmax over the tree's
tokens (4 of 8).

Typical acceptance is lossy by design: only that it never emits a token the target's options ban (allowed_token_ids,
bad words) while the draft vocabulary holds mostly banned tokens. Greedy speculative decoding with draft-vocabulary
heads must give plain greedy's tokens exactly."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from amphista_engine.errors import ConfigError
from amphista_engine.generation import GenerationStats, PlainDecoder, run
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec

from conftest import random_tiny_model
import test_sampled_law_differential_qa as law_file
from test_sampled_law_differential_qa import (CHECKS, EOS, MIX, P_MIN, PROMPT, V, AgreeingHeads, answers,
                                              homogeneity_pvalue)
from test_speculative import _NoText

pytestmark = pytest.mark.usefixtures("one_thread_module")

# answers per sample, half test_sampled_law_differential_qa's: a bonus drawn from the target's law with the tree's
# children left in (scratch injection) still failed every case here at p < 1e-11, the sound sampler passed at p > 0.2
N = 2000

LIKELY = [6, 3, 0, 4]          # ~70% of the target's next-token mass (after most tokens)
UNLIKELY = [5, 1, 2]           # ~20%: the target's likely tokens lie outside


@pytest.fixture(scope="module")
def tiny8():
    # test_sampled_law_differential_qa's target (V = 8, EOS = 7): LIKELY / UNLIKELY are chosen for it
    return random_tiny_model(seed=11, vocab=V, dim=16, heads=2, kv_heads=1, inter=32)


class SubsetAgreeingHeads(AgreeingHeads):
    """AgreeingHeads over a draft vocabulary: slot i scores token subset[i] with the target's own logit, as heads
    with draft_vocab do (drafts [B, K, len(subset)], token_ids maps slots back)."""

    def __init__(self, model, prompt, num_heads, subset):
        super().__init__(model, prompt, num_heads)
        self.draft_vocab = torch.tensor(subset)
        self.config = SimpleNamespace(kind="amphista", draft_vocab_size=len(subset))

    def token_ids(self, slots):
        return self.draft_vocab[slots]

    def step(self, hidden, next_tokens, count, kv_len):
        return super().step(hidden, next_tokens, count, kv_len)[..., self.draft_vocab]


def drafter(model, kind: str, subset: list[int], num_heads: int = 3):
    if kind == "agree":
        return SubsetAgreeingHeads(model, PROMPT, num_heads, subset)
    heads = random_heads(kind, model, num_heads=num_heads, seed=3, draft_vocab_size=len(subset))
    return heads.set_draft_vocab(torch.tensor(subset))


@pytest.fixture
def tree_tokens(monkeypatch):
    """The set of the non-root tokens of every tree a step builds."""
    seen, build = set(), TreeSpec.build

    def spy(self, root, draft_logits, token_ids=None):
        tree = build(self, root, draft_logits, token_ids)
        seen.update(tree.tokens[:, 1:].unique().tolist())
        return tree

    monkeypatch.setattr(TreeSpec, "build", spy)
    return seen


# (sampling options, drafter, draft vocabulary, tree, fewest steps that must accept a draft)
CASES = {
    "amphista heads, likely subset, T1 top_k 5, dynamic-32": (
        dict(temperature=1.0, top_k=5), "amphista", LIKELY, "dynamic-32", N // 4),
    "medusa heads, unlikely subset, T1.3 top_p 0.9, tree-16": (
        dict(temperature=1.3, top_p=0.9), "medusa", UNLIKELY, "tree-16", N // 10),
    "agreeing, likely subset, T0.6 top_p 0.85, chain": (
        dict(temperature=0.6, top_p=0.85), "agree", LIKELY, "chain-3", N // 10),
    "agreeing, unlikely subset, T1 top_k 6, dynamic-8": (
        dict(temperature=1.0, top_k=6), "agree", UNLIKELY, "dynamic-8", N // 10),
    "medusa heads, likely subset, presence+logit_bias, chain": (
        dict(temperature=1.0, presence_penalty=0.7, logit_bias={6: 1.0, 3: -0.5}), "medusa", LIKELY, "chain-3",
        N // 10),
    "amphista heads, unlikely subset, repetition+allowed ids, static mix tree": (
        dict(temperature=0.8, repetition_penalty=1.5, allowed_token_ids=[0, 1, 3, 5, 6, EOS]), "amphista", UNLIKELY,
        MIX, N // 10),
}


@pytest.mark.parametrize("case", list(CASES))
def test_draft_vocab_speculative_answers_follow_plain_samplings_law(tiny8, tree_tokens, monkeypatch, case):
    """The law of an answer's first tokens (EOS included) is one for plain and speculative sampling with heads that
    draft a subset of the vocabulary; tokens outside it still come at the target's rates."""
    options, kind, subset, tree, fewest = CASES[case]
    monkeypatch.setattr(law_file, "N", N)          # answers() reads its module's N
    plain, _ = answers(tiny8, SamplingParams(seed=1, **options))
    spec, accepted = answers(tiny8, SamplingParams(seed=2, **options), drafter(tiny8, kind, subset), tree)
    assert tree_tokens and tree_tokens <= set(subset), (tree_tokens, subset)     # slots were mapped to token ids
    assert accepted > fewest, accepted          # drafts were accepted: the check measures the acceptance
    outside = sum(t not in subset for s in spec for t in s[1:])
    assert outside > N // 4, outside            # the residual gave tokens the heads cannot draft
    pvals = {name: homogeneity_pvalue([key(s) for s in plain], [key(s) for s in spec]) for name, key in CHECKS.items()}
    assert min(pvals.values()) > P_MIN, pvals


def _decode(model, params, prompts, limit, heads=None, tree=None, acceptance="auto"):
    """Each prompt's answer ids (its ending EOS appended where it ended by one)."""
    cache = KVCache.for_model(model.config, len(prompts), 64, torch.float32, "cpu")
    if heads is None:
        dec = PlainDecoder(model, cache, params)
    else:
        dec = SpeculativeDecoder(model, cache, heads, TreeSpec(tree, heads.num_heads, "cpu"), params, acceptance)
    list(run(dec, prompts, _NoText(), limit, [EOS], [], [GenerationStats() for _ in prompts]))
    return [tuple(row.ids) + ((EOS,) if row.finish_reason == "eos" else ()) for row in dec.rows]


@pytest.mark.parametrize("kind,subset,tree", [("amphista", [6, 2, 4], "dynamic-8"),
                                              ("medusa", [4, 6, 3, 0, 2], "tree-16"),
                                              ("agree", [2, 6, 4, 0], "dynamic-8")])
def test_typical_acceptance_with_draft_vocab_emits_only_allowed_tokens(tiny8, tree_tokens, kind, subset, tree):
    """Typical acceptance (lossy by design) still never emits a token the options ban, though the draft vocabulary
    is mostly banned tokens, which the heads then draft at every node."""
    allowed, bad = [0, 1, 3, 5, EOS], [[4], [3, 0]]
    params = SamplingParams(seed=2, temperature=1.0, allowed_token_ids=allowed, bad_words_ids=bad)
    out = _decode(tiny8, params, [PROMPT] * 600, 8, drafter(tiny8, kind, subset), tree, acceptance="typical")
    assert tree_tokens <= set(subset) and tree_tokens - set(allowed), tree_tokens     # banned tokens were drafted
    assert {t for s in out for t in s} <= set(allowed)
    assert not any(s[i:i + 2] == (3, 0) for s in out for i in range(len(s) - 1))
    assert sum(len(s) > 3 for s in out) > 100        # answers ran past their first step


@pytest.mark.parametrize("kind,subset,tree", [("amphista", LIKELY, "dynamic-32"), ("medusa", UNLIKELY, "tree-16"),
                                              ("agree", UNLIKELY, "chain-3"), ("agree", LIKELY, "dynamic-8")])
@pytest.mark.parametrize("acceptance", ["auto", "typical"])
def test_greedy_with_draft_vocab_equals_plain_greedy(tiny8, kind, subset, tree, acceptance):
    prompts = [PROMPT, [1, 0, 6], [4, 4, 2, 5, 0], [6]]
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3)     # varies the greedy path a little
    plain = _decode(tiny8, params, prompts, 16)
    spec = _decode(tiny8, params, prompts, 16, drafter(tiny8, kind, subset), tree, acceptance)
    assert spec == plain


def test_a_dynamic_tree_too_big_for_a_small_draft_vocabulary_is_refused_before_the_prefill(tiny8):
    """Regression: heads of a 3-token draft vocabulary draft each head's top 3, too few for dynamic-64's nodes;
    the tree was taken and refused only at the first step, after the prefill, naming a "top-3" never chosen."""
    heads = drafter(tiny8, "amphista", [6, 3, 0])
    cache = KVCache.for_model(tiny8.config, 1, 64, torch.float32, "cpu")
    with pytest.raises(ConfigError, match=r"dynamic-64.*draft vocabulary holds 3 tokens"):
        SpeculativeDecoder(tiny8, cache, heads, TreeSpec("dynamic-64", heads.num_heads, "cpu"), SamplingParams())
    ok = SpeculativeDecoder(tiny8, cache, heads, TreeSpec("dynamic-8", heads.num_heads, "cpu"), SamplingParams())
    assert ok.tree.num_nodes == 8
