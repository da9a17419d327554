"""Seeded differential checks of how token trees are chosen: dynamic trees (tree.dynamic_tree, both the CPU kernel
and the torch reference) against a brute-force top-(N-1) over every path, and tree_search's fits against a brute-force
optimum over every prefix-closed tree."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from amphista_engine import tree as tree_mod
from amphista_engine.training import tree_search as ts


# ---- brute-force references --------------------------------------------------------------------------------------

def _all_paths(k_heads: int, k: int, d_max: int):
    for d in range(1, d_max + 1):
        yield from itertools.product(range(k), repeat=d)


def _score(values_row, path) -> float:
    return sum(float(values_row[d][r]) for d, r in enumerate(path))


def _check_tree_wellformed(tb, b: int, num_nodes: int):
    """The tree's buffers for row b describe one tree; returns its nodes as rank paths (root = ())."""
    depth, parent, rank = tb.depth[b].tolist(), tb.parent[b].tolist(), tb.rank[b].tolist()
    n = num_nodes
    assert len(depth) == n and depth[0] == 0 and parent[0] == -1 and rank[0] == -1
    paths = [()]
    for i in range(1, n):
        p = parent[i]
        assert 0 <= p < i, f"node {i}: parent {p} must precede it"
        assert depth[i] == depth[p] + 1
        paths.append(paths[p] + (rank[i],))
    assert len(set(paths)) == n, f"duplicate paths {paths}"
    # nodes in (depth, path) order, as every static tree
    assert paths == sorted(paths, key=lambda q: (len(q), q))
    chains = []
    for i in range(n):
        chains.append((chains[parent[i]] if i else []) + [i])
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        mask[i, chains[i]] = True
    assert torch.equal(tb.mask[b], mask)
    if n <= 64:
        bits = [sum(1 << j for j in chains[i]) for i in range(n)]
        assert [v & ((1 << 64) - 1) for v in tb.ancestor_bits[b].tolist()] == bits
    else:
        assert tb.ancestor_bits is None
    assert torch.equal(tb.position_offsets[b], tb.depth[b])
    has_child = set(parent[1:])
    leaves = [i for i in range(n) if i not in has_child]
    width = tb.retrieve.shape[-1]
    assert width == tb.max_depth + 1 and max(depth) <= tb.max_depth
    want = [chains[i] + [-1] * (width - len(chains[i])) for i in leaves]
    want += [[0] + [-1] * (width - 1)] * (n - 1 - len(leaves))       # rows holding only the root
    assert tb.retrieve[b].tolist() == want
    return paths, depth


def _brute_dynamic(values_row, k_heads: int, k: int, num_nodes: int):
    """(optimal multiset of scores, the strict set when the cut is not a tie, else None)."""
    m = num_nodes - 1
    d_max = min(k_heads, m)
    scored = sorted(((_score(values_row, p), p) for p in _all_paths(k_heads, k, d_max)),
                    key=lambda sp: -sp[0] if sp[0] == sp[0] else math.inf)
    top = [s for s, _ in scored[:m]]
    strict = None
    if len(scored) == m or scored[m - 1][0] > scored[m][0]:
        strict = {p for _, p in scored[:m]}
    return sorted(top), strict


def _random_values(g: random.Random, b: int, k_heads: int, k: int, ties: bool, neg_inf: bool):
    vals = torch.empty(b, k_heads, k)
    for i, j in itertools.product(range(b), range(k_heads)):
        if ties:
            row = [float(g.choice([0.0, -0.5, -1.0, -1.5, -2.0])) for _ in range(k)]
        else:
            row = [math.log(g.random() + 1e-9) for _ in range(k)]
        if neg_inf:
            row = [v if g.random() < 0.6 else -math.inf for v in row]
        vals[i, j] = torch.tensor(sorted(row, reverse=True))
    return vals


def _cases(n_cases: int, seed: int):
    g = random.Random(seed)
    for _ in range(n_cases):
        k_heads, k = g.randint(1, 4), g.randint(1, 10)
        cap = sum(k ** d for d in range(1, k_heads + 1))
        if cap > 400:       # brute force over every path: keep it small
            k = min(k, 4)
            cap = sum(k ** d for d in range(1, k_heads + 1))
        num_nodes = g.randint(2, min(cap, 80) + 1)
        yield g, g.randint(1, 3), k_heads, k, num_nodes, g.random() < 0.4, g.random() < 0.25


@pytest.mark.parametrize("builder", ["dispatch", "reference"])
def test_dynamic_tree_matches_brute_force(builder):
    for g, b, k_heads, k, num_nodes, ties, neg_inf in _cases(250, 7 + (builder == "reference")):
        values = _random_values(g, b, k_heads, k, ties, neg_inf)
        indices = torch.randint(0, 1000, (b, k_heads, k))
        root = torch.randint(0, 1000, (b,))
        if builder == "dispatch":
            tb = tree_mod.dynamic_tree(root, (values, indices), num_nodes, k)
        else:
            out = tree_mod.dynamic_tree_buffers(root, values, indices, num_nodes)
            tokens, depth, parent, rank, bits, mask, retrieve = out
            tb = tree_mod.TreeBuffers(num_nodes, min(k_heads, num_nodes - 1), k, depth, parent, rank, bits, mask,
                                      retrieve, depth, tokens)
        ctx = f"b={b} K={k_heads} k={k} N={num_nodes} ties={ties} -inf={neg_inf}"
        for row in range(b):
            paths, depth = _check_tree_wellformed(tb, row, num_nodes)
            got = set(paths[1:])
            assert len(got) == num_nodes - 1, ctx
            want_scores, strict = _brute_dynamic(values[row].tolist(), k_heads, k, num_nodes)
            got_scores = sorted(_score(values[row].tolist(), p) for p in got)
            assert got_scores == want_scores, ctx
            if strict is not None:
                assert got == strict, ctx
            # each node's token is its head's token at its rank; the root is the root
            toks = tb.tokens[row].tolist()
            assert toks[0] == int(root[row])
            for i, p in enumerate(paths[1:], 1):
                assert toks[i] == int(indices[row, len(p) - 1, p[-1]]), ctx


def test_dynamic_tree_kernel_equals_reference():
    for g, b, k_heads, k, num_nodes, ties, neg_inf in _cases(200, 11):
        values = _random_values(g, b, k_heads, k, ties, neg_inf)
        indices = torch.randint(0, 50, (b, k_heads, k))
        root = torch.randint(0, 50, (b,))
        got = tree_mod.dynamic_tree(root, (values, indices), num_nodes, k)
        ref = tree_mod.dynamic_tree_buffers(root, values, indices, num_nodes)
        names = ("tokens", "depth", "parent", "rank", "ancestor_bits", "mask", "retrieve")
        for name, want in zip(names, ref):
            have = getattr(got, name)
            assert (have is None) == (want is None) and (want is None or torch.equal(have, want)), name


def test_dynamic_tree_duplicate_tokens_and_tiny_vocab():
    """Two slots of one head mapping to one token (a draft vocabulary) or a vocabulary below top-k: still one tree."""
    g = random.Random(3)
    for _ in range(60):
        k_heads, v = g.randint(1, 4), g.randint(1, 4)
        logits = torch.randn(2, k_heads, v)
        cap = sum(min(10, v) ** d for d in range(1, k_heads + 1))
        n = g.randint(2, min(cap, 40) + 1)
        tb = tree_mod.dynamic_tree(torch.tensor([1, 2]), logits, n)
        assert tb.topk == min(10, v)
        for row in range(2):
            _check_tree_wellformed(tb, row, n)
        # a draft vocabulary whose slots repeat tokens: node tokens repeat, the layout is still the slots'
        values, slots = torch.log_softmax(logits, -1).topk(min(10, v), dim=-1)
        draft_vocab = torch.tensor([5, 5, 7, 5])
        tb2 = tree_mod.dynamic_tree(torch.tensor([1, 2]), (values, draft_vocab[slots]), n, min(10, v))
        for row in range(2):
            _check_tree_wellformed(tb2, row, n)
            assert torch.equal(tb2.depth[row], tb.depth[row]) and torch.equal(tb2.parent[row], tb.parent[row])
            assert set(tb2.tokens[row, 1:].tolist()) <= {5, 7}


def test_dynamic_tree_nan_scores_still_one_tree():
    """A NaN score (overflowed fp16 heads) sorted above every real one: a node whose parent was left out joined the
    tree, its mask lacking that parent while its depth and parent said otherwise (two nodes with one path)."""
    values = torch.tensor([[[0.0, float("nan"), -1.0], [float("nan"), -0.5, -2.0]]])
    for n in range(2, 13):
        tb = tree_mod.dynamic_tree(torch.tensor([0]), (values, torch.arange(6).view(1, 2, 3)), n, 3)
        _check_tree_wellformed(tb, 0, n)
    g = random.Random(17)
    for _, b, k_heads, k, num_nodes, ties, neg_inf in _cases(80, 19):
        values = _random_values(g, b, k_heads, k, ties, neg_inf)
        values[torch.rand(values.shape, generator=torch.Generator().manual_seed(g.randint(0, 99))) < 0.3] = math.nan
        tb = tree_mod.dynamic_tree(torch.zeros(b, dtype=torch.long), (values, torch.zeros_like(values).long()),
                                   num_nodes, k)
        for row in range(b):
            paths, _ = _check_tree_wellformed(tb, row, num_nodes)
            # a NaN guess ranks as -inf would
            clean = values[row].masked_fill(values[row].isnan(), -math.inf).tolist()
            want, strict = _brute_dynamic(clean, k_heads, k, num_nodes)
            assert sorted(_score(clean, p) for p in paths[1:]) == want
            if strict is not None:
                assert set(paths[1:]) == strict


# ---- tree search ----------------------------------------------------------------------------------------------------

def _prefix_closed_trees(universe, size):
    """Every prefix-closed set of `size` paths drawn from universe (a list sorted by (depth, path))."""
    uni = sorted(universe, key=lambda p: (len(p), p))

    def rec(i, chosen):
        if len(chosen) == size:
            yield frozenset(chosen)
            return
        if i == len(uni) or len(uni) - i < size - len(chosen):
            return
        p = uni[i]
        if len(p) == 1 or p[:-1] in chosen:
            chosen.add(p)
            yield from rec(i + 1, chosen)
            chosen.discard(p)
        yield from rec(i + 1, chosen)
    yield from rec(0, set())


def _rate(ranks_rows, weights, path, topk) -> float:
    return sum(w for row, w in zip(ranks_rows, weights) if all(r < topk for r in row[:len(path)])
               and tuple(row[:len(path)]) == path)


def _random_ranks(g: random.Random, positions: int, k_heads: int, topk: int):
    # correlated heads: a miss at head d makes later ranks larger, as real heads do
    rows = []
    for _ in range(positions):
        row, skew = [], g.random()
        for _ in range(k_heads):
            r = min(topk, int(g.expovariate(0.4 + 2 * skew)))
            row.append(r)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def test_best_tree_is_the_optimum_and_expected_tau_is_independent():
    g = random.Random(5)
    for case in range(120):
        k_heads, topk = g.randint(1, 3), g.randint(1, 3)
        ranks = _random_ranks(g, g.randint(1, 40), k_heads, topk)
        weights = torch.tensor([float(g.choice([0.5, 1, 2])) for _ in range(ranks.shape[0])]) if case % 2 else None
        ws = [1.0] * ranks.shape[0] if weights is None else weights.tolist()
        rows = ranks.tolist()
        universe = list(_all_paths(k_heads, topk, k_heads))
        cap = len(universe)
        n = g.randint(2, min(cap, 7) + 1)
        got = ts.best_tree(ranks, n, topk, weights)
        assert len(got) == n - 1 and len(set(got)) == n - 1
        assert got == tree_mod.get_tree_choices(got)          # prefix-closed and in (depth, path) order
        total = sum(ws)
        tau_of = {}
        for t in _prefix_closed_trees(universe, n - 1):
            tau_of[t] = 1 + sum(_rate(rows, ws, p, topk) for p in t) / total
        best = max(tau_of.values())
        mine = 1 + sum(_rate(rows, ws, p, topk) for p in got) / total
        assert math.isclose(mine, best, rel_tol=1e-9), (case, got)
        assert math.isclose(ts.expected_tau(ranks, got, topk, weights), mine, rel_tol=1e-9)


def _brute_walk(rows, seqs, paths, ws):
    steps = tokens = 0.0
    i = 0
    while i < len(rows):
        d = 0
        while d < len(rows[i]) and tuple(rows[i][:d + 1]) in paths:
            d += 1
        # a step may not run past its sequence's last position
        end = i
        while end + 1 < len(rows) and seqs[end + 1] == seqs[i]:
            end += 1
        steps += ws[i]
        tokens += ws[i] * (1 + d)
        nxt = i + 1 + d
        i = nxt if nxt <= end else end + 1
    return tokens / steps


def test_decoding_fit_never_below_best_tree_and_its_tau_is_independent():
    g = random.Random(9)
    for _ in range(60):
        k_heads, topk = g.randint(1, 3), g.randint(1, 3)
        seq_len = [g.randint(1, 12) for _ in range(g.randint(1, 4))]
        ranks = _random_ranks(g, sum(seq_len), k_heads, topk)
        seq_idx = torch.tensor([s for s, n in enumerate(seq_len) for _ in range(n)])
        rows, seqs, ws = ranks.tolist(), seq_idx.tolist(), [1.0] * ranks.shape[0]
        universe = list(_all_paths(k_heads, topk, k_heads))
        n = g.randint(2, min(len(universe), 6) + 1)
        fit = ts.fit_decoding_tree(ranks, seq_idx, n, topk)
        greedy = ts.best_tree(ranks, n, topk)
        tau_fit = ts.decoding_tau(ranks, seq_idx, fit)
        assert math.isclose(tau_fit, _brute_walk(rows, seqs, set(fit), ws), rel_tol=1e-9)
        assert tau_fit >= ts.decoding_tau(ranks, seq_idx, greedy) - 1e-12
        opt = max(_brute_walk(rows, seqs, set(t), ws) for t in _prefix_closed_trees(universe, n - 1))
        # a heuristic by design (refits on the positions its walk visits): bounded by the optimum, not equal to it
        assert tau_fit <= opt + 1e-9


def test_dynamic_depths_match_a_rebuilt_dynamic_tree():
    """tree-search's replay of dynamic-N accepts what the tree decoding builds would accept."""
    g = random.Random(13)
    for _ in range(80):
        k_heads, k = g.randint(1, 4), g.randint(1, 5)
        cap = sum(k ** d for d in range(1, k_heads + 1))
        n = g.randint(2, min(cap, 64) + 1)
        p = g.randint(1, 12)
        values = _random_values(g, p, k_heads, k, g.random() < 0.4, False)
        ranks = torch.tensor([[min(k, int(g.expovariate(0.6))) for _ in range(k_heads)] for _ in range(p)])
        got = ts.dynamic_depths(ranks, values, n).tolist()
        indices = torch.arange(k_heads * k).view(1, k_heads, k).expand(p, -1, -1).contiguous()
        tb = tree_mod.dynamic_tree(torch.zeros(p, dtype=torch.long), (values, indices), n, k)
        for row in range(p):
            paths, _ = _check_tree_wellformed(tb, row, n)
            want = ts.accepted_depth([r if r < k else 10 ** 6 for r in ranks[row].tolist()], set(paths[1:]))
            assert got[row] == want, (k_heads, k, n, ranks[row].tolist(), sorted(paths))


# ---- predicted vs realised tau --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,tree_of", [("medusa", "fit"), ("amphista", "dynamic-9")])
def test_walk_tau_from_heldout_ranks_equals_realised_tau(kind, tree_of):
    """Statistics gathered as `tree-search` gathers them (heldout_ranks on the decoded sequence) predict the tau of
    real greedy speculative decoding with the fitted tree (or dynamic-N) on a tiny target whose 12-token vocabulary
    lets random heads be right often."""
    from conftest import random_tiny_model
    from amphista_engine.heads import random_heads
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.sampling import SamplingParams
    from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
    from amphista_engine.training.data import Sequence

    torch.manual_seed(0)
    k_heads, vocab, prompt, total = 3, 12, [3, 1, 4, 1, 5], 120
    target = random_tiny_model(seed=2, vocab=vocab, max_len=512)
    target.config.eos_token_id = []
    heads = random_heads(kind, target, k_heads, seed=4, std=0.3)

    def decode(tree):
        cache = KVCache.for_model(target.config, 1, 512, torch.float32, "cpu")
        dec = SpeculativeDecoder(target, cache, heads, TreeSpec(tree, k_heads, "cpu"), SamplingParams())
        seq, counts = [int(dec.prefill([prompt])[0])], []
        while len(seq) < total:
            toks, cnt = dec.step()
            counts.append(int(cnt[0]))
            seq += toks[0, :counts[-1]].tolist()
        return seq, counts

    seq, _ = decode([[0]])
    ranks, seq_idx, scores = ts.heldout_ranks(heads, target, [Sequence("s", prompt + seq, len(prompt))],
                                              with_seq=True, with_scores=True)
    if tree_of == "fit":
        tree = ts.fit_decoding_tree(ranks, seq_idx, 12)
        predicted = ts.decoding_tau(ranks, seq_idx, tree)
    else:
        tree = tree_of
        predicted, _ = ts.dynamic_decoding_tau(ranks, scores, seq_idx, int(tree_of.split("-")[1]))
    seq2, counts = decode(tree)
    assert seq2[:len(seq)] == seq[:len(seq2)]                      # lossless: the same greedy text
    # realised tau over the steps whose root has a full rank tuple (the walk's positions)
    pos, steps, tokens = 0, 0, 0
    for c in counts:
        if pos >= ranks.shape[0]:
            break
        steps, tokens, pos = steps + 1, tokens + c, pos + c
    assert steps >= 20 and tokens / steps > 1.1                   # the heads do accept something
    walked, w_tokens = ts._walk_depths(
        (lambda i: ts.accepted_depth(ranks[i].tolist(), set(map(tuple, tree)))) if tree_of == "fit"
        else ts.dynamic_depths(ranks, scores, int(tree_of.split("-")[1])).tolist().__getitem__,
        seq_idx.tolist())[:2]
    assert w_tokens / walked == pytest.approx(predicted)
    assert tokens / steps == pytest.approx(predicted), (tokens / steps, predicted)
