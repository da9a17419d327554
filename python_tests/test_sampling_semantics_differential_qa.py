"""Differential QA of the logits processing and sampling law against the peers the README names: transformers'
LogitsProcessors / warpers (repetition_penalty over prompt + answer, temperature, top_k, top_p, min_p, sequence
bias, bad words, min new tokens) and a reference written from vLLM's sampler (allowed ids, bad words on the answer
only, min_tokens, logit_bias, repetition -> frequency -> presence penalties, temperature, min_p, top_k, top_p).

Seeded random logits (vocabularies 7..50k, rows with their own histories, ties, -inf, extreme values, fp32 and
bf16) go through the decoder's own steps (PlainDecoder._biased / _held_back / _penalised, then probs_from_logits).
The differences allowed are the README's: of tokens tied at the nucleus' edge the lowest ids are kept (transformers
keeps the highest), and vLLM takes the nucleus after min_p. A verified tree's nodes are processed as plain steps
on the history + their own path, bit for bit."""
from __future__ import annotations

import random

import pytest
import torch

from amphista_engine.generation import PlainDecoder
from amphista_engine.sampling import SamplingParams, _tree_penalties_dense, greedy_token, probs_from_logits
from amphista_engine.tree import TreeBuffers

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")
NEG = float("-inf")


def rand_logits(rng, B, V, dtype):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    kind = rng.choice(["normal", "ties", "wide", "extreme", "peaked"])
    x = torch.randn(B, V, generator=g) * rng.choice([0.5, 2.0, 5.0])
    if kind == "ties":
        x = (x * 2).round() / 2
    elif kind == "wide":
        x = x * 50
    elif kind == "extreme":
        x = torch.where(torch.rand(B, V, generator=g) < 0.05, torch.randn(B, V, generator=g).sign() * 1e4, x)
    elif kind == "peaked":
        x[:, rng.randrange(V)] += 30
    x = x.masked_fill(torch.rand(B, V, generator=g) < rng.choice([0, 0, 0.1, 0.5]), NEG)
    for b in range(B):
        if not torch.isfinite(x[b]).any():
            x[b, rng.randrange(V)] = 0.0
    return x.to(dtype)


def rand_params(rng, V):
    kw = dict(temperature=rng.choice([0.0, 0.0, 1e-6, 0.3, 0.7, 1.0, 1.5, 5.0]))
    if rng.random() < 0.5:
        kw["top_k"] = rng.choice([1, 2, 3, V - 1, V, V + 5, max(1, V // 3)])
    if rng.random() < 0.5:
        kw["top_p"] = rng.choice([1e-9, 0.1, 0.5, 0.9, 0.95, 0.9999, 0.999999, 1.0])
    if rng.random() < 0.4:
        kw["min_p"] = rng.choice([1e-6, 0.05, 0.1, 0.5, 1.0])
    if rng.random() < 0.5:
        kw["repetition_penalty"] = rng.choice([1e-6, 0.5, 0.9, 1.1, 1.3, 2.0, 1e6])
    if rng.random() < 0.4:
        kw["presence_penalty"] = rng.choice([-2.0, -0.5, 0.5, 2.0, 1e6])
    if rng.random() < 0.4:
        kw["frequency_penalty"] = rng.choice([-2.0, -0.3, 0.3, 2.0, 1e3])
    if rng.random() < 0.3:
        kw["logit_bias"] = {rng.randrange(V): rng.choice([-100.0, -1.5, 0.25, 5.0, 100.0, 1e6, -1e6])
                            for _ in range(rng.randint(1, 4))}
    if rng.random() < 0.2:
        kw["allowed_token_ids"] = rng.sample(range(V), rng.randint(1, min(V, 6)))
    if rng.random() < 0.25:
        kw["bad_words_ids"] = [[rng.randrange(V) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 3))]
    return SamplingParams(**kw)


def decoder(params, V, prompts, outputs, eos, min_tokens):
    """A PlainDecoder's sampling state (no model) after prompts and outputs, as prefill and _record leave it."""
    B = len(prompts)
    d = PlainDecoder.__new__(PlainDecoder)
    d.params, d.device, d.constraint = params, torch.device("cpu"), None
    d.bias = params.bias_tensor(V, d.device)
    d.bad_last = d.bad_prefix = d.recent = None
    multi = [w for w in params.bad_words_ids if len(w) > 1]
    if multi:
        R = max(len(w) for w in multi) - 1
        d.bad_last = torch.tensor([w[-1] for w in multi])
        d.bad_prefix = torch.tensor([list(w[-2::-1]) + [-1] * (R + 1 - len(w)) for w in multi])
        d.recent = torch.full((B, R), -1, dtype=torch.long)
        for b, out in enumerate(outputs):
            if out[-R:]:
                d.recent[b, R - len(out[-R:]):] = torch.tensor(out[-R:])
    d.min_tokens = min_tokens
    d.produced = torch.tensor([len(o) for o in outputs]) if min_tokens else None
    d.ban_ids = torch.tensor(eos) if min_tokens else None
    d.seen = d.counts = None
    if params.repetition_penalty != 1.0:
        d.seen = torch.zeros(B, V, dtype=torch.bool)
        for b in range(B):
            d.seen[b, prompts[b] + outputs[b]] = True
    if params.penalized:
        d.counts = torch.zeros(B, V, dtype=torch.int32)
        for b in range(B):
            d.counts[b].index_add_(0, torch.tensor(outputs[b], dtype=torch.long),
                                   torch.ones(len(outputs[b]), dtype=torch.int32))
    return d


def engine_step(logits, params, prompts, outputs, eos=(), min_tokens=0):
    """(the logits PlainDecoder._sample hands `sample`, the probabilities it samples from)."""
    d = decoder(params, logits.shape[-1], prompts, outputs, list(eos), min_tokens)
    x = d._penalised(d._constrained(d._held_back(d._biased(logits))))
    return x, probs_from_logits(x, params.temperature, params.top_k, params.top_p, params.min_p)


def hf_step(row, params, prompt, output, eos=(), min_tokens=0):
    """transformers' processors in generate's order; bad words read on the answer only (vLLM's bad_words, which the
    README follows), and presence / frequency by OpenAI's formula (transformers has neither)."""
    V = row.shape[-1]
    s = row.float()[None].clone()
    context = torch.tensor([prompt + output or [0]])
    if params.logit_bias:
        s = hf.SequenceBiasLogitsProcessor([[[t], v] for t, v in params.logit_bias])(context, s)
    if params.allowed_token_ids is not None:
        keep = torch.zeros(V, dtype=torch.bool)
        keep[list(params.allowed_token_ids)] = True
        s = s.masked_fill(~keep, NEG)
    if params.bad_words_ids:
        if output:
            s = hf.NoBadWordsLogitsProcessor([list(w) for w in params.bad_words_ids])(torch.tensor([output]), s)
        else:
            s[0, [w[0] for w in params.bad_words_ids if len(w) == 1]] = NEG
    if min_tokens:
        s = hf.MinNewTokensLengthLogitsProcessor(len(prompt), min_tokens, list(eos))(torch.tensor([prompt + output]), s)
    if params.repetition_penalty != 1.0 and prompt + output:
        s = hf.RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(torch.tensor([prompt + output]), s)
    if params.penalized:
        count = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=V)
        s = s - params.frequency_penalty * count - params.presence_penalty * (count > 0)
    processed = s[0].clone()
    if params.greedy:
        return processed, None
    s = hf.TemperatureLogitsWarper(params.temperature)(context, s)
    if params.top_k:
        s = hf.TopKLogitsWarper(params.top_k)(context, s)
    if params.top_p < 1.0:
        s = hf.TopPLogitsWarper(params.top_p)(context, s)
    if params.min_p > 0:
        s = hf.MinPLogitsWarper(params.min_p)(context, s)
    return processed, torch.softmax(s, -1)[0]


def vllm_step(row, params, prompt, output, eos=(), min_tokens=0):
    """vLLM's sampler (v1 Sampler's documented steps) on one row, in fp32."""
    V = row.shape[-1]
    x = row.float().clone()
    if params.allowed_token_ids is not None:
        keep = torch.zeros(V, dtype=torch.bool)
        keep[list(params.allowed_token_ids)] = True
        x = x.masked_fill(~keep, NEG)
    for w in params.bad_words_ids:
        if len(w) == 1 or (len(output) >= len(w) - 1 and output[len(output) - len(w) + 1:] == list(w[:-1])):
            x[w[-1]] = NEG
    if min_tokens and len(output) < min_tokens:
        x[list(eos)] = NEG
    for t, v in params.logit_bias:
        x[t] += v
    seen = torch.zeros(V, dtype=torch.bool)
    seen[prompt + output] = True
    count = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=V)
    pen = torch.where(seen, torch.tensor(params.repetition_penalty, dtype=torch.float32), torch.tensor(1.0))
    x = torch.where(x > 0, x / pen, x * pen)
    x = x - params.frequency_penalty * count
    x = x - params.presence_penalty * (count > 0)
    processed = x.clone()
    if params.greedy:
        return processed, None
    x = x / params.temperature
    if params.min_p > 0:
        pr = x.softmax(-1)
        x = x.masked_fill(pr < params.min_p * pr.max(), NEG)
    if 0 < params.top_k < V:
        x = x.masked_fill(x < x.topk(params.top_k).values[-1], NEG)
    if params.top_p < 1.0:
        sx, order = x.sort()
        drop = sx.softmax(-1).cumsum(-1) <= 1 - params.top_p
        drop[-1] = False
        x = x.masked_fill(torch.zeros(V, dtype=torch.bool).scatter(0, order, drop), NEG)
    return processed, x.softmax(-1)


def same_law(pe, pr, x, tag):
    """pe (engine) and pr (a peer) give the same distribution, but for a swap among tokens tied at the nucleus'
    edge, where the engine keeps the lowest ids (README)."""
    only_e, only_r = (pe > 0) & ~(pr > 0), (pr > 0) & ~(pe > 0)
    if only_e.any() or only_r.any():
        tied = set(x[only_e | only_r].tolist())
        assert len(tied) == 1 and int(only_e.sum()) == int(only_r.sum()), tag
        assert int(only_e.nonzero().max()) < int(only_r.nonzero().min()), tag
        assert torch.allclose(pe[pe > 0].sort().values, pr[pr > 0].sort().values, rtol=1e-5, atol=0), tag
        return "tie"
    both = pe > 0
    rel = ((pe[both] - pr[both]).abs() / pr[both]).max().item()
    assert rel <= 1e-5, f"{tag}: relative error {rel:.3g}"
    return "equal"


def test_plain_step_matches_transformers_and_vllm_seeded_sweep():
    rng = random.Random(20240611)
    tally = {"rows": 0, "tie": 0, "equal": 0, "all_banned": 0, "refused": 0, "greedy": 0}
    for case in range(1500):
        V = rng.choice([7, 8, 13, 50, 100, 1000, 5000, 50000]) if rng.random() < 0.9 else rng.randint(7, 3000)
        B = rng.randint(1, 4)
        dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
        logits = rand_logits(rng, B, V, dtype)
        params = rand_params(rng, V)
        prompts = [[rng.randrange(V) for _ in range(rng.randint(0, 6))] for _ in range(B)]
        # answers drawn from a few ids: tokens repeated many times
        outputs = [[rng.randrange(min(V, 10)) for _ in range(rng.randint(0, 12))] for _ in range(B)]
        min_tokens = rng.choice([0, 0, 3, 6])
        eos = [rng.randrange(V)] + ([rng.randrange(V)] if rng.random() < 0.3 else [])
        if params.allowed_token_ids is not None and \
                set(params.allowed_token_ids) <= {w[0] for w in params.bad_words_ids if len(w) == 1}:
            with pytest.raises(Exception, match="allowed_token_ids"):
                engine_step(logits, params, prompts, outputs, eos, min_tokens)
            tally["refused"] += 1
            continue
        xe, pe = engine_step(logits, params, prompts, outputs, eos, min_tokens)
        for b in range(B):
            tag = f"case {case} row {b} V={V} {dtype} {params}"
            xh, ph = hf_step(logits[b], params, prompts[b], outputs[b], eos, min_tokens)
            xv, pv = vllm_step(logits[b], params, prompts[b], outputs[b], eos, min_tokens)
            # the same formulas in the same order on fp32: the same floats
            assert torch.equal(xe[b], xh) and torch.equal(xe[b], xv), tag
            if not torch.isfinite(xe[b]).any():
                tally["all_banned"] += 1      # flag_no_token's case (an InputError for the user)
                continue
            tally["rows"] += 1
            if params.greedy:
                assert int(greedy_token(xe[b:b + 1])) == int(xh.argmax()), tag
                tally["greedy"] += 1
                continue
            tally[same_law(pe[b], ph, xe[b], tag)] += 1
            if not (params.min_p > 0 and params.top_p < 1.0):     # vLLM's nucleus after min_p: README
                same_law(pe[b], pv, xe[b], tag)
    assert tally["rows"] > 3000 and tally["tie"] > 10 and tally["greedy"] > 200 and tally["all_banned"], tally


def test_tie_rules_at_top_k_and_top_p_edges():
    # top_k keeps every token tied with the k-th (transformers' and vLLM's `<` test); top_p's edge keeps the lowest
    # ids, on the CPU's candidate path (V > 128) and its full sort alike
    for V in (10, 5000):
        x = torch.full((1, V), -5.0)
        x[0, [3, 6, 8]] = 2.0
        x[0, 1] = 4.0
        p = probs_from_logits(x, 1.0, top_k=2)
        assert set((p[0] > 0).nonzero().flatten().tolist()) == {1, 3, 6, 8}
        p = probs_from_logits(x, 1.0, top_p=float(torch.softmax(x, -1)[0, 1]) + 1e-4)
        assert (p[0] > 0).nonzero().flatten().tolist() == [1, 3]
    # top_k past the vocabulary is off, as transformers' min(top_k, V) leaves it
    x = torch.randn(2, 9)
    assert torch.equal(probs_from_logits(x, 0.7, top_k=50), probs_from_logits(x, 0.7))


def rand_tree(rng, N):
    parent = [-1] + [rng.randrange(i) for i in range(1, N)]
    depth = [0]
    for i in range(1, N):
        depth.append(depth[parent[i]] + 1)
    mask = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        j = i
        while j >= 0:
            mask[i, j], j = True, parent[j]
    return torch.tensor(parent), torch.tensor(depth), mask


def test_tree_nodes_are_processed_as_plain_steps_on_their_paths():
    """Every node's processed logits (bias, bad words on its path, min_tokens by its depth, penalties on the answer +
    its path) and probabilities equal a plain step's on the history + the node's path, bit for bit; the CPU's
    column-sparse tree_penalties equals the dense broadcast a GPU runs."""
    rng = random.Random(7)
    nodes = 0
    for case in range(600):
        V = rng.choice([7, 9, 16, 50, 300, 5000])
        B, N, batched = rng.randint(1, 3), rng.randint(1, 12), rng.random() < 0.5
        params = rand_params(rng, V)
        if params.allowed_token_ids is not None and \
                set(params.allowed_token_ids) <= {w[0] for w in params.bad_words_ids if len(w) == 1}:
            continue
        dtype = rng.choice([torch.float32, torch.bfloat16])
        logits = torch.stack([rand_logits(rng, B, V, dtype) for _ in range(N)], 1)         # [B, N, V]
        trees = [rand_tree(rng, N) for _ in range(B if batched else 1)]
        parent, depth, mask = (torch.stack(t) if batched else t[0] for t in zip(*trees))
        tokens = torch.tensor([[rng.randrange(min(V, 8)) for _ in range(N)] for _ in range(B)])
        tree = TreeBuffers(N, int(depth.max()), 4, depth, parent, torch.zeros_like(depth), None, mask,
                           torch.zeros(1, 1, dtype=torch.long), depth, tokens)
        prompts = [[rng.randrange(V) for _ in range(rng.randint(0, 5))] for _ in range(B)]
        # the root is the answer's latest token (recorded when it was sampled)
        outputs = [[rng.randrange(min(V, 8)) for _ in range(rng.randint(0, 6))] + [int(tokens[b, 0])]
                   for b in range(B)]
        min_tokens, eos = rng.choice([0, 0, 2, 5, 9]), [rng.randrange(V)]
        d = decoder(params, V, prompts, outputs, eos, min_tokens)
        pre = d._constrained(d._held_back(d._biased(logits, tree), tree.depth), tree)
        xt = d._penalised(pre, tree)
        dense = None
        if d.seen is not None or d.counts is not None:
            dense = _tree_penalties_dense(pre.float().clone(), tokens, tree.path_below_root(), d.seen, d.counts,
                                          params)
        pt = probs_from_logits(xt, params.temperature, params.top_k, params.top_p, params.min_p)
        for b in range(B):
            par = trees[b if batched else 0][0]
            for n in range(N):
                path, m = [], n
                while m > 0:
                    path.append(int(tokens[b, m]))
                    m = int(par[m])
                xp, pp = engine_step(logits[b, n][None], params, [prompts[b]], [outputs[b] + path[::-1]], eos,
                                     min_tokens)
                tag = f"case {case} row {b} node {n} {params}"
                assert torch.equal(xt[b, n], xp[0]), tag
                assert dense is None or torch.equal(dense[b, n], xp[0]), tag
                assert torch.equal(pt[b, n], pp[0]) or (pt[b, n].isnan().all() and pp[0].isnan().all()), tag
                nodes += 1
    assert nodes > 4000


def exact_nucleus(x: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The nucleus in fp64 (lowest ids first on ties): the most likely tokens until their mass reaches top_p."""
    q = torch.softmax(x.double() / temperature, -1)
    sq, order = q.sort(descending=True, stable=True)
    return torch.zeros_like(q, dtype=torch.bool).scatter(-1, order, (sq.cumsum(-1) - sq) < top_p)


@pytest.mark.parametrize("V", [5000, 50000])
@pytest.mark.parametrize("top_p", [0.9999, 0.999999])
def test_top_p_near_one_keeps_the_exact_nucleus(V, top_p):
    # Bug: the nucleus' running mass was summed in fp32 against top_p, where an fp32 softmax row sums to 1 +- a
    # few 1e-7 and fp32 sums near 1 are 6e-8 apart: at top_p 0.9999 / 0.999999 the edge moved by tens to hundreds
    # of tail tokens from the exact nucleus, which transformers' TopPLogitsWarper keeps (it sums the tail first)
    g = torch.Generator().manual_seed(V + int(top_p * 1e6))
    off = 0
    for i in range(6):
        x = torch.randn(1, V, generator=g) * 2.0
        if i % 2:
            x = x.bfloat16().float()
        kept = probs_from_logits(x, 1.0, top_p=top_p) > 0
        exact = exact_nucleus(x, 1.0, top_p)
        off += int((kept ^ exact).sum())
        if i % 2 == 0:        # the peer is exact too (bf16's ties it orders otherwise)
            hf_kept = torch.softmax(hf.TopPLogitsWarper(top_p)(None, x.clone()), -1) > 0
            assert int((hf_kept ^ exact).sum()) <= 1
    assert off == 0
