"""Sampled speculative decoding against plain sampling, end to end and differentially: a batch of one prompt decoded
plainly and one decoded speculatively (tree rejection sampling, the default for temperature > 0) through the engine's
host loop (generation.run), under sampling options alone and in pairs (temperature, top_k, top_p, min_p, the three
penalties, logit_bias, allowed_token_ids, bad words of one and two tokens, min_tokens holding EOS back), over a chain,
a dynamic tree and static trees. The two samples of answers must look drawn from one law.

Drafts are made to be accepted: either a tree that holds nearly every continuation of the 8-token vocabulary (random
heads), or AgreeingHeads, which draft the target's own next-token distribution along its greedy path, so a chain is
accepted often too. Tokens 2-4 of an answer then mostly come from accepted tree nodes, where a penalty or a mask
applied at the wrong depth, or a top_p / top_k taken of the wrong distribution, would show. Scratch injections (not
kept) each failed the configurations they concern: a node's own path left out of the penalties (the answer's alone):
p 1e-12 (presence+frequency, tree-16), 1e-23 (dynamic-64); top_k / top_p / min_p left out of the acceptance: p 1e-95
(chain), 1e-227 (dynamic-64); min_tokens read at depth 0 at every node: p 1e-142 (static mix tree).

Thresholds: each check is Pearson's chi-square test of homogeneity (two samples, cells whose pooled count is below
MIN_CELL merged into one) with its asymptotic p-value; a check fails below P_MIN = 1e-6. For a correct sampler the two
samples share one law, so each check fails with probability ~1e-6 (the chi-square approximation is good with pooled
cells of >= 20); over this file's 5 configurations x 3 checks a union bound puts a false failure below 2e-5. The seeds
are fixed (plain seed 1, speculative seed 2: each batch's rows draw independent numbers from one generator), so a run
gives the same counts every time and a pass is stable."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.generation import GenerationStats, PlainDecoder, run
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec

from conftest import random_tiny_model
from test_speculative import _NoText

pytestmark = pytest.mark.usefixtures("one_thread_module")

V = 8
EOS = V - 1                    # random_tiny_model's EOS is its last token
PROMPT = [3, 5, 1, 2]
N = 4000                       # answers per sample
LIMIT = 4                      # max_new_tokens: tokens 2.. come from the first speculative step(s)
MIN_CELL = 20
P_MIN = 1e-6
MIX = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]]      # a static tree of mixed ranks


@pytest.fixture(scope="module")
def tiny8():
    return random_tiny_model(seed=11, vocab=V, dim=16, heads=2, kv_heads=1, inter=32)


class AgreeingHeads:
    """A drafter whose head k scores tokens by the target's own logits k + 1 tokens past the root, along the
    target's greedy continuation of each row's answer: drafts a sampler often accepts, on a chain too."""

    class config:
        kind = "amphista"

    def __init__(self, model, prompt, num_heads):
        self.model, self.prompt, self.num_heads, self.memo = model, prompt, num_heads, {}

    def reset_cache(self, batch, max_seq_len):
        self.seqs = [list(self.prompt[:1]) for _ in range(batch)]     # step() appends each row's tokens after it

    def keep_rows(self, idx):
        self.seqs = [self.seqs[i] for i in idx.tolist()]

    def _rollout(self, ctx: tuple) -> list:
        if ctx not in self.memo:
            ids, out = list(ctx), []
            with torch.no_grad():
                for _ in range(self.num_heads + 1):
                    logits = self.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1].float()
                    ids.append(int(logits.argmax()))
                    out.append(logits)
            self.memo[ctx] = out
        return self.memo[ctx]

    def step(self, hidden, next_tokens, count, kv_len):
        drafts = torch.zeros(count.shape[0], self.num_heads, V)
        for b in range(count.shape[0]):
            self.seqs[b] += next_tokens[b, :int(count[b])].tolist()
            drafts[b] = torch.stack(self._rollout(tuple(self.seqs[b]))[1:self.num_heads + 1])   # [0]: the root's
        return drafts


def answers(model, params, heads=None, tree=None, min_tokens=0):
    """N answers of PROMPT (its ending EOS appended where it ended by one), and how many steps accepted a draft."""
    cache = KVCache.for_model(model.config, N, 64, torch.float32, "cpu")
    if heads is None:
        dec = PlainDecoder(model, cache, params)
    else:
        dec = SpeculativeDecoder(model, cache, heads, TreeSpec(tree, heads.num_heads, "cpu"), params)
    if min_tokens:
        dec.min_tokens, dec.ban_ids = min_tokens, torch.tensor([EOS])          # as the engine sets them
    stats = [GenerationStats() for _ in range(N)]
    list(run(dec, [PROMPT] * N, _NoText(), LIMIT, [EOS], [], stats))
    out = [tuple(row.ids) + ((EOS,) if row.finish_reason == "eos" else ()) for row in dec.rows]
    return out, sum(sum(s.accept_hist[2:]) for s in stats)


def homogeneity_pvalue(a: list, b: list) -> float:
    """Pearson chi-square test that samples a and b (of hashable outcomes) share one law; cells whose pooled count is
    below MIN_CELL are merged into one."""
    cells = sorted(set(a) | set(b))
    count = {c: [0, 0] for c in cells}
    for i, sample in enumerate((a, b)):
        for x in sample:
            count[x][i] += 1
    big = [count[c] for c in cells if sum(count[c]) >= MIN_CELL]
    rest = [sum(count[c][i] for c in cells if sum(count[c]) < MIN_CELL) for i in (0, 1)]
    table = torch.tensor(big + ([rest] if sum(rest) else []), dtype=torch.float64).T        # [2, cells]
    if table.shape[1] < 2:
        return 1.0
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = table.shape[1] - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


CHECKS = {
    "first three tokens": lambda s: s[:3],
    "length and last two": lambda s: (len(s), s[-2:]),      # tokens a later step gave, and EOS's place
    "a repeated token": lambda s: len(set(s)) < len(s),     # what the penalties move, at any depth
}


# (sampling options, min_tokens, drafter, tree)
CASES = {
    "presence+frequency, T1.5, tree-16": (
        dict(temperature=1.5, presence_penalty=0.8, frequency_penalty=0.6), 0, "random", "tree-16"),
    "repetition+top_p, T0.5, agreeing chain": (
        dict(temperature=0.5, repetition_penalty=1.8, top_p=0.8), 0, "agree", "chain-3"),
    "top_k+min_p+logit_bias+bad words, dynamic-8": (
        dict(temperature=1.0, top_k=5, min_p=0.1, logit_bias={2: 1.0, 4: -0.5}, bad_words_ids=[[6], [2, 4]]),
        0, "agree", "dynamic-8"),
    "allowed_token_ids+min_tokens held EOS, static mix tree": (
        dict(temperature=1.0, allowed_token_ids=[0, 2, 4, 5, EOS], logit_bias={EOS: 1.5}), 3, "agree", MIX),
    "frequency+top_k, T1.3, dynamic-64": (
        dict(temperature=1.3, frequency_penalty=1.2, top_k=4), 0, "random", "dynamic-64"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_answers_follow_plain_samplings_law(tiny8, case):
    """The law of an answer's first LIMIT tokens (EOS included) is one for plain and speculative sampling."""
    options, min_tokens, drafter, tree = CASES[case]
    plain, _ = answers(tiny8, SamplingParams(seed=1, **options), min_tokens=min_tokens)
    heads = (random_heads("amphista", tiny8, num_heads=3, seed=3) if drafter == "random"
             else AgreeingHeads(tiny8, PROMPT, 3))
    spec, accepted = answers(tiny8, SamplingParams(seed=2, **options), heads, tree, min_tokens)
    assert accepted > N // 4, accepted         # drafts were accepted: the check measures the acceptance
    pvals = {name: homogeneity_pvalue([key(s) for s in plain], [key(s) for s in spec]) for name, key in CHECKS.items()}
    assert min(pvals.values()) > P_MIN, pvals
