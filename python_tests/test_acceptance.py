"""Acceptance rules: greedy and typical against brute-force references; rejection sampling is lossless."""
import math
import random

import pytest
import torch

from amphista_engine.acceptance import (_probs, greedy_accept, rejection_sample_accept, typical_accept)
from amphista_engine.errors import InputError
from amphista_engine.tree import build_tree, dynamic_tree


def random_paths(rng: random.Random, n_paths: int, topk: int):
    """A random prefix-closed path set (same generator as test_tree)."""
    paths, seen = [], set()
    for _ in range(20 * n_paths):
        if len(paths) == n_paths:
            break
        p = rng.choice([()] + paths) + (rng.randrange(topk),)
        if p not in seen:
            seen.add(p), paths.append(p)
    return paths


# ---------------------------------------------------------------- helpers

def random_case(seed, b=6, v=6, n_paths=None, bias=4.0):
    """A random tree, random node tokens, and logits that often (not always) predict one child's token."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    topk = rng.randint(1, 3)
    paths = random_paths(rng, rng.randint(0, 40) if n_paths is None else n_paths, topk)
    tree = build_tree(paths, topk=topk)
    n = tree.num_nodes
    tokens = torch.randint(0, v, (b, n), generator=g)
    logits = torch.randn(b, n, v, generator=g)
    parent = tree.parent.tolist()
    for row in range(b):
        for i in range(n):
            kids = [c for c in range(n) if parent[c] == i]
            if kids and rng.random() < 0.75:
                logits[row, i, tokens[row, rng.choice(kids)]] += bias
    return tree, tokens, logits


def children(tree):
    parent = tree.parent.tolist()
    return [[c for c in range(tree.num_nodes) if parent[c] == i] for i in range(tree.num_nodes)]


def check_result(res, tree, tokens, row, accept_len, accepted_ok, bonus=None):
    """Shape-level contract of an AcceptResult row: a valid accepted chain, the retrieve row, emitted."""
    L = res.accept_len[row].item()
    assert L == accept_len
    nodes = res.accepted_nodes[row].tolist()
    assert nodes[0] == 0 and all(x == -1 for x in nodes[L + 1:])
    for j in range(1, L + 1):
        assert tree.parent[nodes[j]].item() == nodes[j - 1] and accepted_ok(nodes[j])
    assert tree.retrieve[res.best_path[row]].tolist()[:L + 1] == nodes[:L + 1]
    if bonus is not None:
        assert res.next_token[row].item() == bonus(nodes[L])
    d1 = tree.max_depth + 1
    want = [tokens[row, x].item() for x in nodes[1:L + 1]] + [res.next_token[row].item()]
    assert res.emitted[row].tolist() == want + [-1] * (d1 - L - 1)


# ---------------------------------------------------------------- greedy

@pytest.mark.parametrize("seed", range(25))
def test_greedy_matches_reference(seed):
    tree, tokens, logits = random_case(seed)
    res = greedy_accept(tokens, logits, tree.retrieve)
    kids, pred = children(tree), logits.argmax(-1)
    for row in range(tokens.shape[0]):
        ok = {0}  # accepted nodes: root, then children whose token is the parent's argmax
        for i in range(tree.num_nodes):
            if i in ok:
                ok |= {c for c in kids[i] if tokens[row, c] == pred[row, i]}
        longest = max(tree.depth[i].item() for i in ok)
        check_result(res, tree, tokens, row, longest, ok.__contains__, lambda last: pred[row, last].item())


def test_greedy_extremes_and_per_row_retrieve():
    tree = build_tree("tree-16")
    n, v = tree.num_nodes, 20
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, v, (2, n), generator=g)
    logits = torch.randn(2, n, v, generator=g)
    # row 0: nothing accepted (argmax is a token no node holds); row 1: the deepest path, fully accepted
    logits[0, :, v - 1] = 100
    tokens[0].clamp_(max=v - 2)
    tokens[1] = torch.arange(n)          # distinct, so exactly one full-depth path is accepted
    deepest = tree.retrieve[tree.depth[tree.retrieve.clamp(min=0)].max(-1).values.argmax()]
    for a, c in zip(deepest[:-1].tolist(), deepest[1:].tolist()):
        logits[1, a, tokens[1, c]] = 100
    logits[1, deepest[-1], 7] = 100
    for retrieve in (tree.retrieve, tree.retrieve.expand(2, -1, -1)):   # shared and per-row layouts
        res = greedy_accept(tokens, logits, retrieve)
        assert res.accept_len.tolist() == [0, tree.max_depth]
        assert res.next_token.tolist() == [v - 1, 7]
        assert res.accepted_nodes[1].tolist() == deepest.tolist()
        assert res.emitted[0].tolist() == [v - 1] + [-1] * tree.max_depth


def table_model(seed, depth, v, scale=1.5):
    """A tiny deterministic 'target': the logits after a token at depth d are L[d, token]."""
    return torch.randn(depth, v, v, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_equals_plain_greedy_decoding():
    v, b = 6, 40
    L = table_model(3, 6, v, scale=3)
    g = torch.Generator().manual_seed(1)
    root = torch.randint(0, v, (b,), generator=g)
    dt = dynamic_tree(root, torch.randn(b, 4, v, generator=g) * 3, 12, topk=3)
    res = greedy_accept(dt.tokens, L[dt.depth, dt.tokens], dt.retrieve)
    for row in range(b):
        seq, x = [], root[row].item()
        for d in range(res.accept_len[row].item() + 1):
            x = L[d, x].argmax().item()
            seq.append(x)
        assert res.emitted[row, :len(seq)].tolist() == seq
    assert res.accept_len.float().mean() > 0.5      # the drafts are good enough to exercise acceptance


# ---------------------------------------------------------------- typical

def typical_reference(tree, tokens, logits, row, temp, thr=0.09, alpha=0.3):
    """Medusa's evaluate_posterior (typical mode), one path at a time."""
    best = None
    for p, path in enumerate(tree.retrieve.tolist()):
        length, ll = 0, 0.0
        for a, c in zip(path[:-1], path[1:]):
            if c < 0:
                break
            prob = torch.softmax(logits[row, a].float() / temp, -1)
            ent = -(prob * torch.log(prob + 1e-5)).sum()
            x = prob[tokens[row, c]]
            if not x > min(thr, alpha * math.exp(-ent.item())):
                break
            length, ll = length + 1, ll + math.log(x.item())
        if best is None or (length, ll) > best[:2]:
            best = (length, ll, p)
    return best[0], best[2]


@pytest.mark.parametrize("seed", range(12))
def test_typical_matches_reference(seed):
    tree, tokens, logits = random_case(100 + seed, bias=2.5)
    temp = [0.5, 0.8, 1.0, 1.3][seed % 4]
    res = typical_accept(tokens, logits, tree.retrieve, temp, generator=torch.Generator().manual_seed(0))
    for row in range(tokens.shape[0]):
        length, best = typical_reference(tree, tokens, logits, row, temp)
        assert res.accept_len[row].item() == length and res.best_path[row].item() == best
        check_result(res, tree, tokens, row, length, lambda node: True)
        last = res.accepted_nodes[row, length]
        assert torch.softmax(logits[row, last] / temp, -1)[res.next_token[row]] > 0


def test_typical_greedy_and_bonus_distribution():
    tree, tokens, logits = random_case(7)
    assert torch.equal(typical_accept(tokens, logits, tree.retrieve, 0.0).emitted,
                       greedy_accept(tokens, logits, tree.retrieve).emitted)
    # bonus ~ softmax(logits[last] / T): a one-node tree repeated over many rows
    b, v, temp = 20000, 5, 0.7
    row_logits = torch.tensor([1.0, 0.2, -0.5, 0.9, 0.0])
    root_tree = build_tree([])
    res = typical_accept(torch.zeros(b, 1, dtype=torch.long), row_logits.expand(b, 1, v), root_tree.retrieve,
                         temp, generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(res.next_token, minlength=v).double()
    assert chi2_pvalue(counts, b * torch.softmax(row_logits.double() / temp, -1)) > 1e-4


# ---------------------------------------------------------------- rejection sampling

def chi2_pvalue(observed, expected, min_expected=5.0):
    """Pearson chi-square p-value; cells expected below min_expected are pooled into one."""
    observed, expected = observed.flatten().double(), expected.flatten().double()
    small = expected < min_expected
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    assert observed[expected == 0].sum() == 0, "an impossible outcome occurred"
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    df = int(keep.sum()) - 1
    try:
        from scipy.stats import chi2
        return float(chi2.sf(stat, df))
    except ImportError:  # Wilson-Hilferty normal approximation
        z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
        return 0.5 * math.erfc(z / math.sqrt(2))


def emitted_joint(res, root, L, probs, n_tok, g):
    """First n_tok tokens of the step's output, completed by sampling the model where the step stopped."""
    m = res.accept_len + 1
    out, prev = [], root
    for k in range(n_tok):
        fresh = torch.multinomial(probs[k][prev], 1, generator=g).squeeze(1)
        tok = torch.where(m > k, res.emitted[:, min(k, res.emitted.shape[1] - 1)], fresh)
        out.append(tok)
        prev = tok
    return out


def lossless_check(tree, tokens, L, root, temp, top_k=0, top_p=1.0, seed=0, accept=rejection_sample_accept):
    """Chi-square: the joint law of the first 3 emitted tokens equals autoregressive sampling of L."""
    b, v = tokens.shape[0], L.shape[-1]
    g = torch.Generator().manual_seed(seed)
    depth = tree.depth.expand_as(tokens)
    res = accept(tokens, L[depth, tokens], tree, temp, top_k=top_k, top_p=top_p, generator=g)
    probs = [_probs(L[k], temp, top_k, top_p).double() for k in range(L.shape[0])]
    e1, e2, e3 = emitted_joint(res, root, L, probs, 3, g)
    counts = torch.bincount((e1 * v + e2) * v + e3, minlength=v ** 3).double()
    r0 = root[0].item()
    assert (root == r0).all()
    expected = b * probs[0][r0][:, None, None] * probs[1][:, :, None] * probs[2][None, :, :]
    return chi2_pvalue(counts, expected), res, probs


def last_node_law(tree, tokens, probs):
    """Exact law of the deepest accepted node under the specified sibling-by-sibling procedure."""
    kids, tok = children(tree), tokens[0].tolist()
    depth = tree.depth.tolist()
    reach = [1.0] + [0.0] * (tree.num_nodes - 1)
    last = [0.0] * tree.num_nodes
    for i in range(tree.num_nodes):
        p = probs[depth[i]][tok[i]]
        seen, residual = set(), 1.0
        for c in kids[i]:
            if tok[c] not in seen:      # a repeated sibling token was already zeroed: never accepted
                seen.add(tok[c])
                reach[c] = reach[i] * p[tok[c]].item()
                residual -= p[tok[c]].item()
        last[i] = reach[i] * max(residual, 0.0)
    return torch.tensor(last, dtype=torch.float64)


B = 20000


def ranked(L, d, x):
    return L[d, x].argsort(descending=True).tolist()


def tree_case(name, L, r0):
    """Trees with tokens chosen so that acceptance is frequent but not certain."""
    if name == "chain":
        tree = build_tree("chain-3")
        t1 = ranked(L, 0, r0)[0]
        t2 = ranked(L, 1, t1)[0]
        tok = [r0, t1, t2, ranked(L, 2, t2)[1]]
    else:  # branching, with a duplicate sibling token (node (1,) repeats (0,)) that owns a subtree
        tree = build_tree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0)], topk=3)
        a, b2 = ranked(L, 0, r0)[:2]
        c, d2 = ranked(L, 1, a)[:2]
        tok = [r0, a, a, b2, c, d2, ranked(L, 1, a)[2], ranked(L, 1, b2)[0], ranked(L, 2, c)[0]]
    return tree, torch.tensor(tok).expand(B, -1)


@pytest.mark.parametrize("name, temp, top_k, top_p", [
    ("chain", 1.0, 0, 1.0), ("branch", 1.0, 0, 1.0), ("branch", 1.2, 4, 0.95), ("chain", 0.8, 0, 0.9)])
def test_rejection_sampling_is_lossless(name, temp, top_k, top_p):
    v, r0 = 5, 0          # p(top token | root) ~ 0.6: siblings get rejected often
    L = table_model(11, 4, v)
    tree, tokens = tree_case(name, L, r0)
    root = torch.full((B,), r0)
    pval, res, probs = lossless_check(tree, tokens, L, root, temp, top_k, top_p, seed=5)
    assert pval > 1e-4
    # ... and it accepts exactly as often as the specified procedure: law of the deepest accepted node
    last = res.accepted_nodes.gather(1, res.accept_len[:, None]).squeeze(1)
    counts = torch.bincount(last, minlength=tree.num_nodes).double()
    assert chi2_pvalue(counts, B * last_node_law(tree, tokens, probs)) > 1e-4
    assert res.accept_len.float().mean() > 0.5
    check_result(res, tree, tokens, 0, res.accept_len[0].item(), lambda node: True)


def test_rejection_sampling_lossless_on_dynamic_trees():
    v, r0 = 5, 1
    L = table_model(12, 4, v)
    g = torch.Generator().manual_seed(2)
    root = torch.full((B,), r0)
    # different trees per row, drafted by noisy "heads" that roughly know the model
    heads = torch.stack([L[0, r0], L[1, L[0, r0].argmax()], L[2, 0]]).expand(B, -1, -1)
    dt = dynamic_tree(root, heads + torch.randn(B, 3, v, generator=g), 8, topk=3)
    pval, res, _ = lossless_check(dt, dt.tokens, L, root, 0.9, seed=6)
    assert pval > 1e-4 and res.accept_len.float().mean() > 0.5


def test_rejection_sampling_greedy_limit():
    tree, tokens, logits = random_case(3)
    res = rejection_sample_accept(tokens, logits, tree, 0.0)
    ref = greedy_accept(tokens, logits, tree.retrieve)
    assert torch.equal(res.emitted, ref.emitted) and torch.equal(res.accept_len, ref.accept_len)


def test_probs_top_k_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 9, generator=g)
    p = _probs(logits, 0.7, 4, 0.8)
    for row in range(50):
        q = torch.softmax(logits[row] / 0.7, -1)
        top4 = q.argsort(descending=True)[:4]
        q4 = torch.zeros_like(q)
        q4[top4] = q[top4] / q[top4].sum()
        keep, mass = [], 0.0
        for i in q4.argsort(descending=True).tolist():
            if mass >= 0.8:
                break
            keep.append(i)
            mass += q4[i].item()
        want = torch.zeros_like(q)
        want[keep] = q4[keep] / q4[keep].sum()
        torch.testing.assert_close(p[row], want)
    assert torch.equal(_probs(logits, 0, 4, 0.8), torch.nn.functional.one_hot(logits.argmax(-1), 9).float())


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"), (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_k=-1), "top_k")])
def test_bad_sampling_params(kw, name):
    tree, tokens, logits = random_case(0)
    with pytest.raises(InputError, match=name):
        rejection_sample_accept(tokens, logits, tree, **kw)
    if name == "temperature":
        with pytest.raises(InputError, match=name):
            typical_accept(tokens, logits, tree.retrieve, kw["temperature"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_host_sync():
    v, b = 32, 8
    g = torch.Generator().manual_seed(0)
    root = torch.randint(0, v, (b,), generator=g)
    heads = torch.randn(b, 4, v, generator=g)
    logits = torch.randn(b, 24, v, generator=g)
    static = build_tree("tree-32")
    static_logits = torch.randn(b, static.num_nodes, v, generator=g)
    tok_static = torch.randint(0, v, (b, static.num_nodes), generator=g)
    cpu = dynamic_tree(root, heads, 24)
    dev_in = [t.cuda() for t in (root, heads, logits, static_logits, tok_static)]
    static_cuda = static.to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dt = dynamic_tree(dev_in[0], dev_in[1], 24)
        outs = [greedy_accept(dt.tokens, dev_in[2], dt.retrieve),
                typical_accept(dt.tokens, dev_in[2], dt.retrieve, 0.8, generator=gen),
                rejection_sample_accept(dt.tokens, dev_in[2], dt, 0.8, top_k=8, top_p=0.9, generator=gen),
                rejection_sample_accept(dev_in[4], dev_in[3], static_cuda, 0.8, generator=gen)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for f in ("tokens", "depth", "parent", "rank", "mask", "ancestor_bits", "retrieve"):
        assert torch.equal(getattr(dt, f).cpu(), getattr(cpu, f)), f
    assert torch.equal(outs[0].emitted.cpu(), greedy_accept(cpu.tokens, logits, cpu.retrieve).emitted)
    assert all((o.accept_len >= 0).all() for o in outs)


# ---- draws ------------------------------------------------------------------------------------------------------
def _draw_case():
    p = torch.zeros(3, 4099)
    p[0, [0, 7, 4098]] = torch.tensor([0.5, 0.3, 0.2])          # support at both ends, unnormalised rows below
    p[1, 100:110] = torch.arange(1.0, 11.0)
    p[2, 4098] = 3.0                                             # one token, the last: u must stay inside V
    return p


def test_draw_follows_p_and_never_draws_a_zero_probability_token():
    """The CPU's inverse-CDF draw (it replaced torch.multinomial and the exponential race there: ~0.8 ms a draw)
    against the exact frequencies: rows repeated so 8 calls make 20k draws each (one call of all 60k rows spent
    most of its time paging in its ~5 GB of fp64 running sums)."""
    from amphista_engine.sampling import draw
    p, n = _draw_case(), 20000
    g = torch.Generator().manual_seed(0)
    out = torch.cat([draw(p.repeat_interleave(n // 8, 0), g).view(3, n // 8) for _ in range(8)], 1)
    assert out.dtype == torch.long and bool((out >= 0).all()) and bool((out < p.shape[1]).all())
    for row in range(3):
        got = torch.bincount(out[row], minlength=p.shape[1]).double() / n
        want = p[row].double() / p[row].sum()
        assert bool((got[want == 0] == 0).all()), row                     # never outside the support
        assert float((got - want).abs().max()) < 5 * math.sqrt(0.25 / n), row


def test_draw_is_seeded_and_holds_at_the_edges_of_the_running_sum():
    from amphista_engine.sampling import draw
    p = _draw_case()
    a = draw(p, torch.Generator().manual_seed(3))
    assert torch.equal(a, draw(p, torch.Generator().manual_seed(3)))
    last = torch.zeros(64, 300)
    last[:, -1] = 1e-3                         # all the mass on the last token: u never reaches the total
    assert bool((draw(last, torch.Generator().manual_seed(1)) == 299).all())
    nan_row = torch.full((1, 5), float("nan"))
    assert 0 <= int(draw(nan_row.nan_to_num(nan=1.0))) < 5            # sample()'s guard: any index inside V


def test_rejection_sampling_stops_drawing_once_every_row_has_its_bonus():
    """On a CPU the depth loop ends when no row is still accepting: a deep tree whose first children all miss costs
    one draw, not depth + 1 (each draw a softmax, a nucleus and a sample over the vocabulary)."""
    import amphista_engine.acceptance as acc
    tree, tokens, logits = random_case(5, b=2, v=6, n_paths=20)
    # children that can never be drawn: every non-root node's token has probability 0 at its parent
    logits = logits.clone()
    child_tokens = tokens[:, 1:]
    for b in range(tokens.shape[0]):
        logits[b, :, child_tokens[b].unique()] = float("-inf")
    calls = []
    real = acc.draw

    def counted(p, generator):
        calls.append(1)
        return real(p, generator)
    acc.draw = counted
    try:
        res = rejection_sample_accept(tokens, logits, tree, temperature=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        acc.draw = real
    assert tree.max_depth >= 1 and len(calls) == 1
    assert bool((res.accept_len == 0).all()) and bool((res.accepted_nodes[:, 1:] == -1).all())
