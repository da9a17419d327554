"""Step 4 of a decoding step: decide which tree nodes the target accepts, and the bonus token.

Inputs share one layout: tokens [B, N] node tokens (node 0 = the root, already emitted), logits [B, N, V]
the target's logits at each node (predicting the token after it), and the tree's retrieve paths
[P, D+1] (static tree, shared by all rows) or [B, P, D+1] (dynamic tree, one per row). Everything stays on
the device with fixed shapes; the only Python loop is over depth (rejection sampling).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InputError
from .sampling import SamplingParams, draw, exponential_race, greedy_token, probs_from_logits
from .tree import TreeBuffers
from .values import is_real


@dataclass
class AcceptResult:
    accept_len: torch.Tensor      # [B] long: accepted non-root nodes; tokens emitted = accept_len + 1
    best_path: torch.Tensor       # [B] long: a retrieve row whose prefix is the accepted path
    accepted_nodes: torch.Tensor  # [B, D+1] long: node ids root..last accepted, then -1
    next_token: torch.Tensor      # [B] long: the bonus token, from the target at the last accepted node
    emitted: torch.Tensor         # [B, D+1] long: accepted non-root tokens then the bonus, then -1


def _check_sampling(temperature, top_k=0, top_p=1.0, min_p=0.0):
    SamplingParams(temperature, top_k, top_p, min_p=min_p)     # raises InputError naming the bad parameter


def _check_typical(posterior_threshold, posterior_alpha):
    """Medusa's threshold min(posterior_threshold, posterior_alpha * exp(-H)) must be >= 0: below 0 every child passed
    `p > threshold`, tokens of probability 0 too (a min_tokens-held EOS, a grammar's banned token, a -inf bias), and a
    NaN turned every comparison false, so nothing was ever accepted, both silently."""
    for name, v in (("posterior_threshold", posterior_threshold), ("posterior_alpha", posterior_alpha)):
        if not is_real(v) or v < 0:
            raise InputError(f"typical acceptance's {name} must be a finite number >= 0, got {v!r:.40}")


_probs = probs_from_logits


def _rows(retrieve: torch.Tensor, b: int) -> torch.Tensor:
    return retrieve.expand(b, *retrieve.shape[-2:])


def _row(r: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """r [B, P, D+1], idx [B] -> r[b, idx[b]] [B, D+1]."""
    return r.gather(1, idx.view(-1, 1, 1).expand(-1, 1, r.shape[-1])).squeeze(1)


def _finish(tokens, retrieve, best_path, accept_len, next_token) -> AcceptResult:
    depth = torch.arange(retrieve.shape[-1], device=tokens.device)
    nodes = _row(retrieve, best_path).masked_fill(depth > accept_len[:, None], -1)
    node_tok = tokens.gather(1, nodes.clamp(min=0))
    after = torch.cat([node_tok[:, 1:], node_tok[:, :1]], 1)          # token of accepted node j + 1
    emitted = torch.where(depth < accept_len[:, None], after,
                          torch.where(depth == accept_len[:, None], next_token[:, None], -1))
    return AcceptResult(accept_len, best_path, nodes, next_token, emitted)


def _path_parts(tokens, retrieve):
    """Per path step j -> j+1: (parent node id, child node id clamped, child exists) each [B, P, D]."""
    r = _rows(retrieve, tokens.shape[0])
    return r[..., :-1].clamp(min=0), r[..., 1:].clamp(min=0), r[..., 1:] >= 0, r


def greedy_accept(tokens: torch.Tensor, logits: torch.Tensor, retrieve: torch.Tensor) -> AcceptResult:
    """Accept child c of node i iff token(c) == argmax(logits[i]); the longest accepted path wins (first
    such retrieve row on ties); bonus = argmax at its last node. Emits exactly what greedy decoding would."""
    b = tokens.shape[0]
    pred = greedy_token(logits)                                        # [B, N]
    par, child, valid, r = _path_parts(tokens, retrieve)
    flat = lambda t, idx: t.gather(1, idx.reshape(b, -1)).view_as(idx)
    ok = valid & (flat(tokens, child) == flat(pred, par))
    lens = ok.long().cumprod(-1).sum(-1)                               # [B, P]
    accept_len = lens.max(-1).values
    best = lens.argmax(-1)                                             # argmax returns the first maximum
    last = _row(r, best).gather(1, accept_len[:, None])
    return _finish(tokens, r, best, accept_len, pred.gather(1, last).squeeze(1))


def typical_accept(tokens: torch.Tensor, logits: torch.Tensor, retrieve: torch.Tensor, temperature: float,
                   posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                   generator: Optional[torch.Generator] = None) -> AcceptResult:
    """Medusa's typical acceptance: child x of node i is accepted iff p_i(x) > min(threshold,
    alpha * exp(-H(p_i))), p_i = softmax(logits[i] / T). Longest path wins, ties by the sum of the accepted
    tokens' log-probs (then the first row). Bonus sampled from p at the last accepted node. T = 0: greedy."""
    _check_sampling(temperature)
    _check_typical(posterior_threshold, posterior_alpha)
    if temperature == 0:
        return greedy_accept(tokens, logits, retrieve)
    b, n, v = logits.shape
    p = torch.softmax(logits.float() / temperature, dim=-1)
    entropy = -(p * torch.log(p + 1e-5)).sum(-1)                       # Medusa's epsilon
    thresh = torch.clamp(posterior_alpha * torch.exp(-entropy), max=posterior_threshold)  # [B, N]
    par, child, valid, r = _path_parts(tokens, retrieve)
    flat = lambda t, idx: t.gather(1, idx.reshape(b, -1)).view_as(idx)
    cand_p = flat(p.view(b, n * v), par * v + flat(tokens, child))   # p_parent(child token) [B, P, D]
    ok = valid & (cand_p > flat(thresh, par))
    lens = ok.long().cumprod(-1).sum(-1)
    accept_len = lens.max(-1).values
    steps = torch.arange(ok.shape[-1], device=tokens.device)
    loglik = torch.where(steps < accept_len[:, None, None], torch.log(cand_p), 0.0).sum(-1)
    loglik = torch.where(lens == accept_len[:, None], loglik, float("-inf"))
    best = loglik.argmax(-1)
    last = _row(r, best).gather(1, accept_len[:, None])
    bonus = exponential_race(p.gather(1, last[:, :, None].expand(-1, 1, v)).squeeze(1), generator)
    return _finish(tokens, r, best, accept_len, bonus)


def rejection_sample_accept(tokens: torch.Tensor, logits: torch.Tensor, tree: TreeBuffers, temperature: float,
                            top_k: int = 0, top_p: float = 1.0,
                            generator: Optional[torch.Generator] = None, min_p: float = 0.0) -> AcceptResult:
    """Lossless tree rejection sampling with deterministic drafts (q = 1).

    The specified procedure, at the current node with target distribution p: try the children in sibling
    order, accepting child x with probability p(x) under the current residual; on rejection zero p(x),
    renormalise and try the next sibling; descend into an accepted child, else draw the bonus from the
    residual. Its outcome law equals this one: draw y ~ p once; if some child holds y, descend into the
    first such child, else y is the bonus. (Sibling s with a new token is accepted with probability
    prod_{j<s}(1 - p(x_j)/R_j) * p(x_s)/R_s = p(x_s), R_j the residual mass; a repeated token has residual
    probability 0; the bonus law is p restricted to the non-child tokens, renormalised.) That is literally
    "sample the target and follow the tree while it agrees", so the output is exactly the target's
    autoregressive distribution. One draw per depth instead of one per sibling, and no sibling loop.
    """
    _check_sampling(temperature, top_k, top_p, min_p)
    b, n, v = logits.shape
    dev = tokens.device
    parent = tree.parent.expand(b, n)
    d1 = tree.max_depth + 1
    cur = torch.zeros(b, dtype=torch.long, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    accept_len = torch.zeros(b, dtype=torch.long, device=dev)
    bonus = torch.zeros(b, dtype=torch.long, device=dev)
    nodes = [cur]
    for _ in range(d1):  # the last iteration is at max depth, where no child exists: everyone stops
        y = draw(_probs(logits.gather(1, cur.view(b, 1, 1).expand(-1, 1, v)).squeeze(1),
                           temperature, top_k, top_p, min_p), generator)
        match = (parent == cur[:, None]) & (tokens == y[:, None])
        hit = active & match.any(-1)
        bonus = torch.where(active & ~hit, y, bonus)
        cur = torch.where(hit, match.long().argmax(-1), cur)           # first matching sibling
        accept_len += hit.long()
        active = hit
        nodes.append(torch.where(hit, cur, -1))
        if dev.type == "cpu" and len(nodes) <= d1 and not bool(active.any()):
            # every row has its bonus: the rest are draws for nothing (reading a flag costs no sync on a CPU). Up to
            # the last iteration: `< d1` left one such draw after every row was refused among the deepest nodes,
            # which also shifted the seeded stream away from plain sampling's
            nodes += [torch.full_like(cur, -1)] * (d1 - len(nodes))
            break
    accepted = torch.stack(nodes[:d1], 1)
    # best_path: the first retrieve row that starts with the accepted nodes
    r = _rows(tree.retrieve, b)
    steps = torch.arange(d1, device=dev)
    agree = (r == accepted[:, None, :]) | (steps > accept_len[:, None, None])
    best = agree.all(-1).long().argmax(-1)
    return _finish(tokens, r, best, accept_len, bonus)
