"""Dynamic-tree node scores: raw head log-probs vs calibrated (per-head P(correct | parent correct, log-prob))."""
import sys, torch
d = torch.load(sys.argv[1]); V, R, S = d["values"].double(), d["ranks"], d["seq"]
P, K, k = V.shape
M = int(sys.argv[2]) - 1 if len(sys.argv) > 2 else 62

def accepted(g, R, m=M):
    # threshold = m-th best node score of the dynamic tree (beam expansion, exact when children <= parents)
    b = g.shape[0]
    scores = torch.zeros(b, 1, dtype=g.dtype); pool = []
    for j in range(K):
        s = (scores[:, :, None] + g[:, j, None, :]).flatten(1)
        scores = s.topk(min(m, s.shape[1]), dim=1).values
        pool.append(scores)
    thr = torch.cat(pool, 1).topk(m, dim=1).values[:, -1]
    ok = torch.ones(b, dtype=torch.bool); S_ = torch.zeros(b, dtype=g.dtype); depth = torch.zeros(b, dtype=torch.long)
    for j in range(K):
        r = R[:, j]
        inb = r < k
        S_ = S_ + torch.where(inb, g[:, j].gather(1, r.clamp(max=k - 1)[:, None])[:, 0], torch.tensor(-1e30, dtype=g.dtype))
        ok = ok & inb & (S_ >= thr - 1e-12)
        depth += ok.long()
    return depth

def walk_tau(depth, seq):
    depth, seq = depth.tolist(), seq.tolist()
    steps = toks = 0; i = 0; n = len(depth)
    while i < n:
        j = i
        while j < n and seq[j] == seq[i]: j += 1
        p = i
        while p < j:
            a = 1 + depth[p]; steps += 1; toks += a; p += a
        i = j
    return toks / steps, (1 + torch.tensor(depth, dtype=torch.float)).mean().item()

def fit_bins(V, R, nb=24):
    """per head j: table (edges, log c) of P(rank-r token correct | true prefix in top-k), binned over log-prob."""
    tabs = []
    for j in range(K):
        sel = (R[:, :j] < k).all(1)
        v = V[sel, j]                       # [n, k]
        lab = (R[sel, j, None] == torch.arange(k)).double()
        vf, lf = v.flatten(), lab.flatten()
        q = torch.quantile(vf.float()[torch.randperm(vf.numel())[:200000]].double(), torch.linspace(0, 1, nb + 1, dtype=torch.double))
        idx = torch.bucketize(vf, q[1:-1])
        c = torch.zeros(nb, dtype=torch.double).index_add_(0, idx, lf) + 0.5
        n = torch.zeros(nb, dtype=torch.double).index_add_(0, idx, torch.ones_like(lf)) + 1.0
        p = c / n
        # pool-adjacent-violators: monotone non-decreasing in log-prob
        vals, wts = p.tolist(), n.tolist(); blocks = []
        for vv, ww in zip(vals, wts):
            blocks.append([vv, ww, 1])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                a, b_ = blocks.pop(), blocks.pop()
                blocks.append([(a[0]*a[1] + b_[0]*b_[1]) / (a[1] + b_[1]), a[1] + b_[1], a[2] + b_[2]])
        iso = torch.tensor([bb[0] for bb in blocks for _ in range(bb[2])], dtype=torch.double)
        centers = torch.tensor([vf[idx == i].mean().item() if (idx == i).any() else float(q[i]) for i in range(nb)], dtype=torch.double)
        tabs.append((centers, iso.clamp(1e-6, 1).log()))
    return tabs

def apply_bins(V, tabs):
    out = torch.empty_like(V)
    for j, (x, y) in enumerate(tabs):
        v = V[:, j]
        i = torch.bucketize(v, x).clamp(1, len(x) - 1)
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        t = ((v - x0) / (x1 - x0).clamp(min=1e-9)).clamp(0, 1)
        out[:, j] = y0 + t * (y1 - y0)
    # non-increasing down the rank list (ranks are sorted by log-prob) and <= 0
    return out.clamp(max=0)

uniq = S.unique()
fold = (S % 2)
res = {}
for name in ["raw", "bins"] + [f"temp{a}" for a in (0.7, 1.3, 1.6, 2.0)]:
    taus = []
    for f in (0, 1):
        tr, te = fold != f, fold == f
        if name == "raw": g = V[te]
        elif name == "bins": g = apply_bins(V[te], fit_bins(V[tr], R[tr]))
        else:
            a = float(name[4:]); g = V[te] * torch.tensor([1.0] + [a] * (K - 1), dtype=V.dtype)[None, :, None]
        dep = accepted(g, R[te])
        taus.append(walk_tau(dep, S[te]))
    res[name] = taus
    print(name, "walk %.4f %.4f  per-pos %.4f %.4f" % (taus[0][0], taus[1][0], taus[0][1], taus[1][1]), flush=True)
# show the fitted tables on all data
for j, (x, y) in enumerate(fit_bins(V, R)):
    print("head", j + 1, " ".join(f"{a:.2f}:{b.exp():.3f}" for a, b in zip(x[::3], y[::3])))
