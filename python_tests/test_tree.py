"""Static and dynamic token trees: layout invariants, shipped trees, dynamic selection vs brute force."""
import itertools
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from amphista_engine.errors import ConfigError
from amphista_engine.tree import (TREES, build_tree, dynamic_tree, get_tree_choices, path_tokens,
                                  static_tree_tokens)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def random_paths(rng: random.Random, n_paths: int, topk: int, max_depth: int = 99):
    """A random prefix-closed path set: grow by attaching a child to a random existing node."""
    paths, seen = [], set()
    for _ in range(20 * n_paths):
        if len(paths) == n_paths:
            break
        parent = rng.choice([()] + [p for p in paths if len(p) < max_depth])
        p = parent + (rng.randrange(topk),)
        if p not in seen:
            seen.add(p), paths.append(p)
    return paths


@st.composite
def path_sets(draw, max_paths=79):
    topk = draw(st.integers(1, 6))
    rng = random.Random(draw(st.integers(0, 2**32)))
    paths = random_paths(rng, draw(st.integers(0, max_paths)), topk)
    rng.shuffle(paths)  # input order must not matter
    return topk, paths


def check_layout(depth, parent, rank, mask, bits, retrieve, paths, width, pad_rows=False):
    """Every invariant of one (unbatched) tree against the path set it should encode."""
    depth, parent, rank, retrieve = depth.tolist(), parent.tolist(), rank.tolist(), retrieve.tolist()
    n = len(paths) + 1
    assert len(depth) == len(parent) == len(rank) == n and mask.shape == (n, n)
    assert (depth[0], parent[0], rank[0]) == (0, -1, -1)
    node_path = [()]
    for i in range(1, n):
        assert 0 <= parent[i] < i            # parents precede children
        node_path.append(node_path[parent[i]] + (rank[i],))
    keys = [(len(p), p) for p in node_path]
    assert keys == sorted(keys) and len(set(keys)) == n       # (depth, path) order, siblings by rank
    assert set(node_path[1:]) == set(map(tuple, paths))
    anc = []
    for i in range(n):
        anc.append((anc[parent[i]] if i else set()) | {i})
        assert depth[i] == len(anc[i]) - 1 == len(node_path[i])
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == anc[i]
    if n <= 64:
        assert [b & (2**64 - 1) for b in bits.tolist()] == [sum(1 << j for j in a) for a in anc]
    else:
        assert bits is None
    leaves = [i for i in range(n) if i not in set(parent)]
    covered, seen_pad = [], False
    for row in retrieve:
        assert len(row) == width and row[0] == 0
        length = sum(x >= 0 for x in row)
        assert all(x == -1 for x in row[length:])
        for j in range(1, length):
            assert parent[row[j]] == row[j - 1] and depth[row[j]] == j
        if row[length - 1] in leaves:
            assert not seen_pad            # leaf rows come before padding rows
            covered.append(row[length - 1])
        else:
            assert pad_rows and length == 1
            seen_pad = True
    assert covered == leaves               # each leaf exactly once, in node order


def check_static(tree, paths):
    assert tree.num_nodes == len(paths) + 1 and not tree.batched
    assert torch.equal(tree.position_offsets, tree.depth)
    assert tree.max_depth == max((len(p) for p in paths), default=0)
    check_layout(tree.depth, tree.parent, tree.rank, tree.mask, tree.ancestor_bits, tree.retrieve, paths,
                 tree.max_depth + 1)


@SETTINGS
@given(path_sets())
def test_random_static_trees(case):
    topk, paths = case
    check_static(build_tree(paths, topk=topk), paths)


def test_big_tree_has_no_bitmask():
    paths = random_paths(random.Random(1), 79, 4)
    tree = build_tree(paths, topk=4)
    assert tree.num_nodes == 80 and tree.ancestor_bits is None
    check_static(tree, paths)


def test_shipped_trees():
    mc = build_tree("mc_sim_7b_63")
    assert mc.num_nodes == 64 and mc.max_depth == 4 and mc.ancestor_bits is not None
    assert mc.ancestor_bits.dtype == torch.int64
    assert get_tree_choices("mc_sim_7b_63")[:4] == [(0,), (1,), (2,), (3,)]
    assert (0, 0, 0, 0) in TREES["mc_sim_7b_63"] and (0, 7, 0) == TREES["mc_sim_7b_63"][-1]
    for name in TREES:
        check_static(build_tree(name), TREES[name])
    assert build_tree("tree-16").num_nodes == 16 and build_tree("tree-32").num_nodes == 32
    for k in range(1, 6):
        chain = build_tree(f"chain-{k}")
        assert chain.num_nodes == k + 1 and chain.retrieve.tolist() == [list(range(k + 1))]


def test_root_only_tree():
    t = build_tree([])
    assert t.num_nodes == 1 and t.max_depth == 0 and t.retrieve.tolist() == [[0]]


@pytest.mark.parametrize("bad, what", [
    ("no-such-tree", "known trees: chain-1"),
    ([(0,), (1, 0)], "lacks its prefix"),
    ([(0,), (-1,)], "negative"),
    ([(0,), (0,)], "twice"),
    ([(0,), ()], "non-empty"),
    ([(0,), (0.5,)], "integer"),
    ([(i,) for i in range(600)], "limit"),
])
def test_bad_trees(bad, what):
    with pytest.raises(ConfigError, match=what):
        build_tree(bad, topk=1000)


def test_rank_beyond_topk():
    with pytest.raises(ConfigError, match="topk"):
        build_tree([(0,), (3,)], topk=3)


def test_static_tokens_and_path_tokens():
    tree = build_tree("tree-16")
    g = torch.Generator().manual_seed(0)
    root = torch.randint(0, 1000, (3,), generator=g)
    heads = torch.randint(0, 1000, (3, 4, 10), generator=g)
    tok = static_tree_tokens(tree, root, heads)
    for b in range(3):
        want = [root[b].item()] + [heads[b, len(p) - 1, p[-1]].item() for p in get_tree_choices("tree-16")]
        assert tok[b].tolist() == want
    pt = path_tokens(tok, tree.retrieve, pad_value=-7)
    for b, p in itertools.product(range(3), range(tree.retrieve.shape[0])):
        assert pt[b, p].tolist() == [tok[b, i].item() if i >= 0 else -7 for i in tree.retrieve[p].tolist()]
    with pytest.raises(ConfigError):
        static_tree_tokens(tree, root, heads[:, :2])


def brute_force_top(values, n_pick, k_heads, topk):
    """All paths up to depth K scored by summed log-probs; the n_pick best."""
    scored = []
    for d in range(1, k_heads + 1):
        for p in itertools.product(range(topk), repeat=d):
            scored.append((sum(values[j, r].item() for j, r in enumerate(p)), p))
    scored.sort(key=lambda x: -x[0])
    return {p for _, p in scored[:n_pick]}


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_dynamic_tree_matches_brute_force(k_heads, topk, data):
    capacity = sum(topk ** d for d in range(1, k_heads + 1))
    n = data.draw(st.integers(2, min(capacity + 1, 90)))
    b, v = 3, 12
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    logits = torch.randn(b, k_heads, v, generator=g) * 2
    root = torch.randint(0, v, (b,), generator=g)
    dt = dynamic_tree(root, logits, n, topk=topk)
    # the (values, indices) form gives the same tree
    vals, idx = torch.log_softmax(logits, -1).topk(topk, -1)
    assert torch.equal(dynamic_tree(root, (vals, idx), n, topk=topk).tokens, dt.tokens)
    assert dt.batched and dt.tokens.shape == (b, n) and dt.retrieve.shape == (b, n - 1, dt.max_depth + 1)
    for row in range(b):
        node_paths = [()]
        for i in range(1, n):
            node_paths.append(node_paths[dt.parent[row, i]] + (dt.rank[row, i].item(),))
        paths = node_paths[1:]
        assert set(paths) == brute_force_top(vals[row], n - 1, k_heads, topk)
        bits = dt.ancestor_bits[row] if dt.ancestor_bits is not None else None
        check_layout(dt.depth[row], dt.parent[row], dt.rank[row], dt.mask[row], bits, dt.retrieve[row],
                     paths, dt.max_depth + 1, pad_rows=True)
        # same buffers as the static tree with the same paths
        st_tree = build_tree(paths, topk=topk)
        for f in ("depth", "parent", "rank", "mask"):
            assert torch.equal(getattr(dt, f)[row], getattr(st_tree, f))
        assert (bits is None) == (st_tree.ancestor_bits is None)
        if bits is not None:
            assert torch.equal(bits, st_tree.ancestor_bits)
        leaves = st_tree.retrieve.shape[0]
        pad = dt.max_depth - st_tree.max_depth
        assert dt.retrieve[row, :leaves].tolist() == [r + [-1] * pad for r in st_tree.retrieve.tolist()]
        assert all(r == [0] + [-1] * dt.max_depth for r in dt.retrieve[row, leaves:].tolist())
        want = [root[row].item()] + [idx[row, len(p) - 1, p[-1]].item() for p in paths]
        assert dt.tokens[row].tolist() == want
        assert torch.equal(dt.position_offsets[row], dt.depth[row])


def test_dynamic_tree_limits():
    logits = torch.randn(2, 2, 8)
    assert dynamic_tree(torch.zeros(2, dtype=torch.long), logits, 7, topk=2).num_nodes == 7
    with pytest.raises(ConfigError):
        dynamic_tree(torch.zeros(2, dtype=torch.long), logits, 8, topk=2)   # only 6 paths exist
    with pytest.raises(ConfigError):
        dynamic_tree(torch.zeros(2, dtype=torch.long), logits, 1, topk=2)
    big = dynamic_tree(torch.zeros(2, dtype=torch.long), torch.randn(2, 4, 50), 80)
    assert big.ancestor_bits is None and big.mask.shape == (2, 80, 80)


def test_dynamic_tree_ties_stay_closed():
    # Degenerate heads (one-hot, so most log-probs are -inf and many scores tie): parents still precede.
    logits = torch.full((1, 3, 6), float("-inf"))
    logits[..., 0] = 0
    dt = dynamic_tree(torch.zeros(1, dtype=torch.long), logits, 10, topk=3)
    paths = [()]
    for i in range(1, 10):
        paths.append(paths[dt.parent[0, i]] + (dt.rank[0, i].item(),))
    assert {(0,), (0, 0), (0, 0, 0)} <= set(paths)          # the certain chain is in
    check_layout(dt.depth[0], dt.parent[0], dt.rank[0], dt.mask[0], dt.ancestor_bits[0], dt.retrieve[0],
                 paths[1:], 4, pad_rows=True)
