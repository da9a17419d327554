"""Token trees for tree verification: static Medusa-style trees and the per-step dynamic tree.

A tree has N nodes; node 0 is the root r = x_{t+1} (already emitted, not yet in the KV cache). A node at
depth d > 0 holds a guess for x_{t+1+d} taken from drafting head d's top-k list at some rank. A node is
named by its path: the tuple of top-k ranks from depth 1 down to it, e.g. (0, 1) = "head 1's top guess,
then head 2's second guess". Nodes are always ordered by (depth, path), so parents precede children and
siblings appear in rank order; every buffer below uses that order.

Static trees are built once on the host (`build_tree`) and moved to the device. The dynamic tree is
built every step on the device with fixed shapes and no host synchronisation (`dynamic_tree`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Union

import torch

from .errors import ConfigError
from .values import is_integral

TOPK = 10              # Medusa's default top-k per head for sparse trees
MAX_TREE_NODES = 512   # the dense [N, N] mask and the verify forward get silly beyond this

# Medusa's 63-path tree tuned for Vicuna-7B (FasterDecoding/Medusa, medusa/model/medusa_choices.py).
# The list is in Medusa's greedy construction order: every prefix of it is itself a valid tree, which we
# use for the smaller sparse trees below.
_MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9],
    [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1],
    [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0],
    [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
]

TREES: dict[str, list[tuple[int, ...]]] = {
    "mc_sim_7b_63": [tuple(p) for p in _MC_SIM_7B_63],
    # 16 / 32 nodes incl. the root: the first 15 / 31 paths of Medusa's greedy order.
    "tree-16": [tuple(p) for p in _MC_SIM_7B_63[:15]],
    "tree-32": [tuple(p) for p in _MC_SIM_7B_63[:31]],
    # chain-K: the top guess of heads 1..K, a single path (K + 1 nodes).
    **{f"chain-{k}": [(0,) * d for d in range(1, k + 1)] for k in range(1, 6)},
}


def get_tree_choices(name_or_paths: Union[str, Sequence[Sequence[int]]]) -> list[tuple[int, ...]]:
    """A shipped tree by name, or a validated user path list; returned sorted by (depth, path)."""
    if isinstance(name_or_paths, str):
        if name_or_paths not in TREES:
            raise ConfigError(f"unknown tree {name_or_paths!r}; known trees: {', '.join(sorted(TREES))}")
        paths = TREES[name_or_paths]
    else:
        try:
            paths = [tuple(p) for p in name_or_paths]
        except TypeError as e:
            raise ConfigError(f"tree choices must be a list of rank paths, got {name_or_paths!r}") from e
    seen = set()
    for i, p in enumerate(paths):
        if len(p) == 0 or not all(is_integral(r) for r in p):
            raise ConfigError(f"tree path {p!r} must be a non-empty tuple of integer top-k ranks")
        # numpy's integers as Python's: TreeSpec([[np.int64(0)]]) was refused, where Engine's tree option takes them
        p = paths[i] = tuple(int(r) for r in p)
        if min(p) < 0:
            raise ConfigError(f"tree path {p!r} has a negative rank")
        if p in seen:
            raise ConfigError(f"tree path {p!r} appears twice")
        seen.add(p)
    for p in paths:
        if len(p) > 1 and p[:-1] not in seen:
            raise ConfigError(f"tree path {p!r} lacks its prefix {p[:-1]!r}")
    if len(paths) + 1 > MAX_TREE_NODES:
        raise ConfigError(f"tree has {len(paths) + 1} nodes (incl. root), more than the limit {MAX_TREE_NODES}")
    return sorted(paths, key=lambda p: (len(p), p))


@dataclass
class TreeBuffers:
    """Tree layout. Static trees: tensors without a batch dim. Dynamic trees: every tensor has a leading
    batch dim [B, ...] (one tree per row) and `tokens` [B, N] is set.

    depth/parent/rank [N]: root has depth 0, parent -1, rank -1. ancestor_bits [N] int64 read as uint64:
    bit j set iff node j is an ancestor-or-self of node i (None when N > 64). mask [N, N] bool: the same as
    a dense matrix (mask[i, j] = j is ancestor-or-self of i), i.e. the tree part of the attention mask.
    retrieve [P, max_depth + 1]: node ids along each root-to-leaf path, padded with -1, one row per leaf in
    node order (dynamic trees: P = N - 1, leaf rows first, then rows holding only the root).
    position_offsets = depth (positions of the nodes relative to the root's position).
    """
    num_nodes: int
    max_depth: int
    topk: int
    depth: torch.Tensor
    parent: torch.Tensor
    rank: torch.Tensor
    ancestor_bits: Optional[torch.Tensor]
    mask: torch.Tensor
    retrieve: torch.Tensor
    position_offsets: torch.Tensor
    tokens: Optional[torch.Tensor] = None

    @property
    def batched(self) -> bool:
        return self.depth.dim() == 2

    def path_below_root(self) -> torch.Tensor:
        """mask without the root's column: [i, j] = node j is an ancestor-or-self of node i and not the root (the
        tokens a node's path adds to the answer before it; the root's is already emitted)."""
        return self.mask & (self.depth > 0).unsqueeze(-2)

    def to(self, device) -> "TreeBuffers":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def _signed64(bits: int) -> int:
    return bits - (1 << 64) if bits >= 1 << 63 else bits


def build_tree(choices: Union[str, Sequence[Sequence[int]]], topk: int = TOPK, device="cpu") -> TreeBuffers:
    """Static tree buffers from a tree name or path list (host work, done once per engine)."""
    paths = get_tree_choices(choices)
    if paths and max(max(p) for p in paths) >= topk:
        bad = next(p for p in paths if max(p) >= topk)
        raise ConfigError(f"tree path {list(bad)} uses top-k rank {max(bad)}, but each head's guesses are ranked "
                          f"0..{topk - 1} (topk={topk}); use ranks below {topk}")
    index = {(): 0, **{p: i + 1 for i, p in enumerate(paths)}}
    n = len(paths) + 1
    max_depth = max((len(p) for p in paths), default=0)
    depth = [0] + [len(p) for p in paths]
    parent = [-1] + [index[p[:-1]] for p in paths]
    rank = [-1] + [p[-1] for p in paths]
    mask = torch.zeros(n, n, dtype=torch.bool)
    chains = []  # chains[i] = node ids root..i
    for i in range(n):
        chains.append((chains[parent[i]] if i else []) + [i])
        mask[i, chains[i]] = True
    has_child = set(parent[1:])
    retrieve = [chains[i] + [-1] * (max_depth + 1 - len(chains[i])) for i in range(n) if i not in has_child]
    bits = None
    if n <= 64:
        bits = torch.tensor([_signed64(sum(1 << j for j in chains[i])) for i in range(n)], dtype=torch.int64)
    depth_t = torch.tensor(depth, dtype=torch.long)
    return TreeBuffers(
        num_nodes=n, max_depth=max_depth, topk=topk, depth=depth_t,
        parent=torch.tensor(parent, dtype=torch.long), rank=torch.tensor(rank, dtype=torch.long),
        ancestor_bits=bits, mask=mask, retrieve=torch.tensor(retrieve, dtype=torch.long),
        position_offsets=depth_t.clone(),
    ).to(device)


def static_tree_tokens(tree: TreeBuffers, root: torch.Tensor, head_topk_tokens: torch.Tensor) -> torch.Tensor:
    """Node tokens [B, N] of a static tree: root [B], head_topk_tokens [B, K, k] (head k's ranked top-k)."""
    b, k_heads, k = head_topk_tokens.shape
    if k_heads < tree.max_depth or k < tree.topk:
        raise ConfigError(f"tree needs {tree.max_depth} heads x top-{tree.topk} tokens, "
                          f"got {k_heads} x top-{k}")
    flat = torch.cat([root.reshape(b, 1), head_topk_tokens.reshape(b, -1)], dim=1)
    # Node at depth d, rank r reads head d's r-th token: flat index 1 + (d-1)*k + r; the root reads 0.
    idx = torch.where(tree.depth > 0, 1 + (tree.depth - 1) * k + tree.rank, 0)
    return flat.gather(1, idx.expand(b, -1) if idx.dim() == 1 else idx)


def path_tokens(tokens: torch.Tensor, retrieve: torch.Tensor, pad_value: int = -1) -> torch.Tensor:
    """Tokens along each retrieve path: tokens [B, N], retrieve [P, D+1] or [B, P, D+1] -> [B, P, D+1]."""
    b = tokens.shape[0]
    r = retrieve.expand(b, *retrieve.shape[-2:])
    out = tokens.gather(1, r.clamp(min=0).reshape(b, -1)).view_as(r)
    return out.masked_fill(r < 0, pad_value)


def dynamic_tree_depth(k_heads: int, k: int, num_nodes: int) -> int:
    """The deepest path of a dynamic tree of num_nodes nodes over k_heads heads x top-k; a ConfigError where
    that many nodes do not exist (or the path codes would overflow int64)."""
    m = num_nodes - 1                      # non-root nodes to pick
    d_max = min(k_heads, m)                # no path can be longer than either
    capacity = sum(k ** d for d in range(1, d_max + 1))
    if m < 1 or m > capacity or num_nodes > MAX_TREE_NODES:
        raise ConfigError(f"dynamic tree of {num_nodes} nodes impossible with {k_heads} heads x top-{k} "
                          f"(need 2 <= N <= min({capacity + 1}, {MAX_TREE_NODES}))")
    if (d_max + 1) * k ** d_max >= 2 ** 62:
        raise ConfigError(f"dynamic tree with {k_heads} heads x top-{k} is too large to encode")
    return d_max


def dynamic_tree(root: torch.Tensor, head_logprobs, num_nodes: int, topk: int = TOPK) -> TreeBuffers:
    """Per-row tree of the num_nodes - 1 highest-scoring nodes, score = sum of head log-probs on the path.

    root [B]; head_logprobs: [B, K, V] log-probs (raw logits are fine: they are log-softmaxed) or a
    (values, indices) pair [B, K, >=topk] of log-probs and tokens sorted by descending probability, as
    torch.topk returns. Fixed shapes, on-device, no host sync. A child's score is <= its parent's, so the
    top set is automatically closed under parents (ties go to the shallower node, which keeps it closed).
    """
    if isinstance(head_logprobs, (tuple, list)):
        values, indices = head_logprobs
        values, indices = values[..., :topk].float(), indices[..., :topk]
    else:
        k = min(topk, head_logprobs.shape[-1])                       # tiny vocabularies: fewer ranks
        values, indices = torch.log_softmax(head_logprobs.float(), dim=-1).topk(k, dim=-1)
    b, k_heads, k = values.shape
    from .kernels import ops
    # ops.dynamic_tree refuses a num_nodes the heads cannot hold (dynamic_tree_depth), every step: not again here
    tokens, depth, parent, rank, bits, mask, retrieve = ops.dynamic_tree(root.reshape(b), values, indices, num_nodes)
    d_max = min(k_heads, num_nodes - 1)
    return TreeBuffers(num_nodes=num_nodes, max_depth=d_max, topk=k, depth=depth, parent=parent, rank=rank,
                       ancestor_bits=bits, mask=mask, retrieve=retrieve, position_offsets=depth, tokens=tokens)


def dynamic_tree_nodes(values: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The num_nodes - 1 non-root nodes a dynamic tree picks from values [B, K, k] (log-probs, each head's
    sorted descending): their path codes and depths, [B, num_nodes - 1] each, in pick order. A path
    (r_1..r_d) is encoded as the integer sum r_j * k^(d_max - j), d_max = min(K, num_nodes - 1); the node of
    depth d and rank r at that depth holds head d's r-th token. Shared by the tree builder and by
    `tree-search`, which replays dynamic trees on held-out data."""
    b, k_heads, k = values.shape
    m = num_nodes - 1
    d_max = min(k_heads, m)
    dev = values.device
    # A NaN (overflowed fp16 heads) sorts above every score: its children outranked their kept-out parent, and the
    # tree lost its shape (a node's mask missing its parent). A NaN guess is worth nothing: score it so.
    values = values.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))     # one launch
    pows = torch.pow(k, torch.arange(d_max + 1, device=dev))           # k^0 .. k^d_max
    ranks = torch.arange(k, device=dev)
    # Beam expansion: the top-m nodes of depth d all have parents among the top-m of depth d-1.
    scores = values.new_zeros(b, 1)
    codes = torch.zeros(b, 1, dtype=torch.long, device=dev)
    pool_s, pool_c, pool_d = [], [], []
    for d in range(1, d_max + 1):
        s = (scores[:, :, None] + values[:, d - 1, None, :]).flatten(1)
        c = (codes[:, :, None] + ranks * pows[d_max - d]).flatten(1)
        # stable: among equal scores keep parent-beam order then rank order
        order = s.sort(dim=1, descending=True, stable=True).indices[:, :m]
        scores, codes = s.gather(1, order), c.gather(1, order)
        pool_s.append(scores), pool_c.append(codes)
        pool_d.append(torch.full_like(codes, d))
    # Top m over all depths; the pool is in depth order, so a stable sort prefers parents on ties.
    sel = torch.cat(pool_s, 1).sort(dim=1, descending=True, stable=True).indices[:, :m]
    return torch.cat(pool_c, 1).gather(1, sel), torch.cat(pool_d, 1).gather(1, sel)


def dynamic_tree_buffers(root: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, num_nodes: int):
    """dynamic_tree's tensors in torch ops (the reference of ops.dynamic_tree): root [B], values / indices
    [B, K, k] -> tokens, depth, parent, rank, ancestor bits (None past 64 nodes), mask, retrieve."""
    b, k_heads, k = values.shape
    d_max = min(k_heads, num_nodes - 1)
    dev = values.device
    # Sort key depth * k^d_max + path code orders nodes by (depth, path) exactly like the static trees.
    pows = torch.pow(k, torch.arange(d_max + 1, device=dev))           # k^0 .. k^d_max
    code, depth = dynamic_tree_nodes(values, num_nodes)
    own_rank = code // pows[d_max - depth] % k
    tok = indices.flatten(1).gather(1, (depth - 1) * k + own_rank)      # head depth-1's own_rank-th token
    zero = torch.zeros(b, 1, dtype=torch.long, device=dev)
    key = torch.cat([zero, depth * pows[d_max] + code], 1)
    key, order = key.sort(dim=1)                                       # keys are unique
    code = torch.cat([zero, code], 1).gather(1, order)
    depth = torch.cat([zero, depth], 1).gather(1, order)
    tokens = torch.cat([root.reshape(b, 1).to(tok.dtype), tok], 1).gather(1, order)

    w = pows[d_max - depth]                                            # weight of the node's own rank
    rank = torch.where(depth > 0, (code // w) % k, -1)
    parent_key = (depth - 1) * pows[d_max] + code - rank * w
    parent = torch.where(depth > 0, torch.searchsorted(key, parent_key), -1)
    # j is an ancestor-or-self of i iff depth_j <= depth_i and i's code truncated to depth_j equals j's.
    wj = w[:, None, :]
    mask = (depth[:, None, :] <= depth[:, :, None]) & (code[:, :, None] // wj == code[:, None, :] // wj)
    bits = None
    if num_nodes <= 64:
        # distinct powers of two never carry, so the int64 sum is the uint64 bit pattern
        bits = (mask.long() << torch.arange(num_nodes, device=dev)).sum(-1)
    # Path rows: the ancestor of i at level l has key l * k^d_max + (code_i truncated to level l).
    lv = torch.arange(d_max + 1, device=dev)
    anc_key = lv * pows[d_max] + code[:, :, None] // pows[d_max - lv] * pows[d_max - lv]
    paths = torch.searchsorted(key, anc_key.flatten(1)).view(b, num_nodes, d_max + 1)
    paths = paths.masked_fill(lv > depth[:, :, None], -1)
    has_child = torch.zeros(b, num_nodes, dtype=torch.long, device=dev).scatter_add_(
        1, parent.clamp(min=0), (parent >= 0).long()) > 0
    leaf = ~has_child[:, 1:]
    row_order = (~leaf).long().sort(dim=1, stable=True).indices        # leaves first, in node order
    root_only = torch.where(lv == 0, 0, -1)                            # padding row: just the root
    retrieve = torch.where(leaf.gather(1, row_order)[:, :, None],
                           paths[:, 1:].gather(1, row_order[:, :, None].expand(-1, -1, d_max + 1)), root_only)
    return tokens, depth, parent, rank, bits, mask, retrieve
