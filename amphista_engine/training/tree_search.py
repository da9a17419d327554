"""`amphista tree-search`: static trees fitted to a set of heads, from their ranks on held-out data.

Medusa's shipped trees (mc_sim_7b_63) were fitted to Vicuna-7B heads with ~60% head-1 accuracy; heads that
are right less often want a wider, shallower tree. Under greedy decoding a tree node with rank path
(r_1..r_d) is accepted exactly when, for every depth j <= d, the true token x_{t+1+j} is head j's r_j-th
guess. So on teacher-forced held-out sequences (the trainer's held-out split of the distilled data, never
the evaluation questions) we record each position's rank tuple (rank of the true token under heads 1..K,
TOPK = "not in the top-k"), and a node's acceptance rate is the share of positions whose tuple starts with
its path: exact for these heads and this data, no independence assumption between heads (unlike Medusa's
product of per-head accuracies). The expected tokens per step of a tree is 1 + the sum of its nodes' rates,
and the best tree of N nodes is simply the N - 1 paths of highest rate: a path's rate never exceeds its
prefix's, so that set is closed under prefixes (ties are broken toward shallower paths, which keeps it so).

Held-out data mixes its sources as the training prompts do (here: a third grade-school math, a quarter code),
while the traffic a static tree serves may not (MT-Bench is three quarters general chat). Source weights
(`--source-weights`, as `train` takes them) weigh each position by its sequence's source, so a tree can be
fitted to the mix it will serve; every function below takes an optional per-row weight for that.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch

from ..errors import ConfigError, InputError
from ..text_files import user_path
from ..tree import MAX_TREE_NODES, TOPK, TREES, get_tree_choices


def best_tree(ranks: torch.Tensor, num_nodes: int, topk: int = TOPK, weights: torch.Tensor | None = None
              ) -> list[tuple[int, ...]]:
    """The num_nodes - 1 paths with the highest acceptance rate. ranks: [P, K] long, values in [0, topk];
    weights: [P] per-row weight (None: all alike)."""
    if num_nodes < 2:
        raise ConfigError(f"a tree needs at least 2 nodes (root + 1), got {num_nodes}")
    counts = path_counts(ranks, topk, weights)
    order = sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))
    paths = [p for p, _ in order[:num_nodes - 1]]
    if len(paths) < num_nodes - 1:
        # too little data to rank them all: pad with unseen paths, shallow and low-rank first (never a gap)
        seen = set(paths)
        frontier = [(r,) for r in range(topk)]
        while len(paths) < num_nodes - 1 and frontier:
            p = frontier.pop(0)
            if p not in seen:
                paths.append(p)
                seen.add(p)
            if len(p) < ranks.shape[1]:
                frontier += [p + (r,) for r in range(topk)]
    if len(paths) < num_nodes - 1:      # not a smaller tree under the name PREFIX-num_nodes
        raise ConfigError(f"a tree of {num_nodes} nodes needs {num_nodes - 1} rank paths, but {ranks.shape[1]} "
                          f"heads x top-{topk} hold only {len(paths)}")
    return get_tree_choices(paths)      # validates (prefix-closed) and sorts by (depth, path)


def path_counts(ranks: torch.Tensor, topk: int = TOPK, weights: torch.Tensor | None = None) -> Counter:
    """How many positions (their total weight) accept each rank path (every prefix of every position's tuple,
    misses cut it)."""
    counts: Counter = Counter()
    ws = [1] * ranks.shape[0] if weights is None else weights.tolist()
    for row, w in zip(map(tuple, ranks.tolist()), ws):
        for d in range(1, len(row) + 1):
            if row[d - 1] >= topk:
                break
            counts[row[:d]] += w
    return counts


def expected_tau(ranks: torch.Tensor, paths, topk: int = TOPK, weights: torch.Tensor | None = None) -> float:
    """1 + the mean number of tree nodes accepted per position (weighted by `weights`, else all alike)."""
    counts = path_counts(ranks, topk, weights)
    total = ranks.shape[0] if weights is None else float(weights.sum())
    return 1.0 + sum(counts.get(tuple(p), 0) for p in get_tree_choices(paths)) / max(1e-12, total)


def accepted_depth(rank_row, paths: set) -> int:
    """Tokens a tree (a set of rank-path tuples) accepts at a position with these per-head ranks."""
    d = 0
    while d < len(rank_row) and tuple(rank_row[:d + 1]) in paths:
        d += 1
    return d


def decoding_tau(ranks: torch.Tensor, seq_idx: torch.Tensor, paths, weights: torch.Tensor | None = None) -> float:
    """The tau decoding would see: per sequence, start at the first answer position, accept the longest path
    the ranks allow, jump past the accepted tokens, repeat. Decoding visits a position only when the previous
    step stopped right before it, so stretches the heads find easy are crossed in few steps and weigh less:
    tokens / steps is roughly a harmonic mean of (1 + accepted), below expected_tau's arithmetic mean (by ~10%
    for the shipped heads; benchmarks/tau_consistency.py checks it against real decoding). weights: per row;
    each step and its tokens count with the weight of the row it starts from (a sequence's rows share one)."""
    steps, tokens, _ = _walk(ranks.tolist(), seq_idx.tolist(), {tuple(p) for p in get_tree_choices(paths)},
                             None if weights is None else weights.tolist())
    return tokens / max(1e-12, steps)


def _walk(rows: list, seqs: list, paths: set, weights: list | None = None) -> tuple[float, float, list[int]]:
    """(steps, tokens, visited row indices) of decoding, steps and tokens weighted by their first row's weight.
    rows: rank tuples, each sequence's consecutive answer positions together and in order (as heldout_ranks
    returns them); seqs[i]: row i's sequence."""
    return _walk_depths(lambda i: accepted_depth(rows[i], paths), seqs, weights)


def _walk_depths(depth_of, seqs: list, weights: list | None = None) -> tuple[float, float, list[int]]:
    """_walk with a step at row i accepting depth_of(i) tokens past its root."""
    visits, steps, tokens, start = [], 0, 0, 0
    for end in range(1, len(seqs) + 1):
        if end < len(seqs) and seqs[end] == seqs[start]:
            continue
        i = start
        while i < end:
            visits.append(i)
            w = 1 if weights is None else weights[i]
            n = 1 + depth_of(i)
            steps, tokens, i = steps + w, tokens + w * n, i + n
        start = end
    return steps, tokens, visits


def dynamic_depths(ranks: torch.Tensor, values: torch.Tensor, num_nodes: int, chunk: int = 4096) -> torch.Tensor:
    """Tokens a dynamic tree of num_nodes accepts at each position (beyond the root's), [P]: the tree is the
    one decoding builds from the heads' top-k log-probs there (tree.dynamic_tree_nodes), and a node is
    accepted when its path is a prefix of the position's true rank tuple. ranks [P, K] (TOPK = a miss),
    values [P, K, k] (heldout_ranks(with_scores=True))."""
    from ..tree import dynamic_tree_nodes
    k = values.shape[-1]
    d_max = min(ranks.shape[1], num_nodes - 1)
    pows = k ** torch.arange(d_max, -1, -1)                             # k^d_max .. k^0
    out = []
    for i in range(0, ranks.shape[0], chunk):
        r, v = ranks[i:i + chunk, :d_max], values[i:i + chunk]
        code, depth = dynamic_tree_nodes(v, num_nodes)
        picked = depth * pows[0] + code                                 # one key per node: depth, then path
        # the true path's key at each depth d: d * k^d_max + sum_{j<=d} r_j * k^(d_max - j)
        true_code = (r * pows[1:]).cumsum(1)
        true_key = torch.arange(1, d_max + 1) * pows[0] + true_code
        hit = (picked[:, None, :] == true_key[:, :, None]).any(-1) & (r < k).cummin(1).values
        out.append(hit.long().cummin(1).values.sum(1))                 # the set is prefix-closed: count the run
    return torch.cat(out)


def dynamic_decoding_tau(ranks: torch.Tensor, values: torch.Tensor, seq_idx: torch.Tensor, num_nodes: int,
                         weights: torch.Tensor | None = None) -> tuple[float, float]:
    """(decoding walk tau, per-position expected tau) of dynamic-num_nodes trees: decoding_tau and
    expected_tau for a tree rebuilt at every position from the heads' scores."""
    depths = dynamic_depths(ranks, values, num_nodes)
    ws = None if weights is None else weights.tolist()
    steps, tokens, _ = _walk_depths(depths.tolist().__getitem__, seq_idx.tolist(), ws)
    w = torch.ones(len(depths)) if weights is None else weights.float()
    return tokens / max(1e-12, steps), 1.0 + float((w * depths).sum() / w.sum().clamp_min(1e-12))


def walk(rows: list, paths: set) -> tuple[int, int]:
    """(steps, tokens) of decoding one sequence whose consecutive answer positions have these rank rows."""
    return _walk(rows, [0] * len(rows), paths)[:2]


def fit_decoding_tree(ranks: torch.Tensor, seq_idx: torch.Tensor, num_nodes: int, topk: int = TOPK,
                      rounds: int = 8, weights: torch.Tensor | None = None) -> list[tuple[int, ...]]:
    """best_tree maximises acceptance over every position alike, but decoding only steps from the positions
    where its previous step stopped. Refit the tree on the positions its own walk visits, while that raises
    decoding_tau; returns the best tree seen (best_tree's included, so never worse than it)."""
    rows, seqs = ranks.tolist(), seq_idx.tolist()
    ws = None if weights is None else weights.tolist()
    best, best_tau = None, -1.0
    tree = best_tree(ranks, num_nodes, topk, weights)
    for _ in range(rounds + 1):
        steps, tokens, visits = _walk(rows, seqs, set(tree), ws)
        if tokens / max(1e-12, steps) <= best_tau:
            break
        best, best_tau = tree, tokens / max(1e-12, steps)
        tree = best_tree(ranks[visits], num_nodes, topk, None if weights is None else weights[visits])
    return best


@torch.no_grad()
def heldout_ranks(heads, target, seqs, cache_dir=None, batch_tokens: int = 4096, topk: int = TOPK,
                  with_seq: bool = False, with_scores: bool = False):
    """Rank of the true token under each head at every answer position that has all K targets: [P, K]
    (sequence by sequence, positions in order); with_seq: also each row's index into seqs, [P]; with_scores:
    also each head's top-k log-probs there, [P, K, k] (what a dynamic tree is built from)."""
    from ..heads import lm_head_fingerprint
    from .hidden_cache import HiddenSource, pad_batch
    from .plan import epoch_batches
    from .trainer import head_features, loss_rows
    dev = target.tok_embeddings.weight.device
    K = heads.num_heads
    hs = HiddenSource(target, cache_dir, lm_head_fingerprint(target))
    out, seq_of, scores = [], [], []
    for bi in epoch_batches(seqs, batch_tokens, 0, 0):
        batch = [seqs[i] for i in bi]
        x, lengths, plen = pad_batch(batch, dev)
        hidden = hs.get(batch, x)
        nxt = torch.zeros_like(x)
        nxt[:, :-1] = x[:, 1:]
        valid = loss_rows(lengths, plen, x.shape[1], K)
        rows = valid.all(-1).nonzero()                                   # positions where every head has a target
        if rows.shape[0] == 0:
            continue
        logits = heads.logits(head_features(heads, hidden, nxt, rows)).float()
        top_values, top = logits.topk(min(topk, logits.shape[-1]), dim=-1)               # [N, K, k] slots
        if with_scores:     # log_softmax keeps the order: the top-k of the log-probs are these slots
            scores.append((top_values - logits.logsumexp(-1, keepdim=True)).cpu())
        tgt = x[rows[:, :1], rows[:, 1:2] + torch.arange(K, device=dev) + 2]            # [N, K] tokens
        tgt = heads.slots_of(tgt)                                        # -1: outside the draft vocabulary
        hit = top == tgt[..., None]
        rank = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(tgt, topk))
        out.append(rank.cpu())
        seq_of.append(torch.tensor(bi)[rows[:, 0].cpu()])
    if not out:
        raise InputError("no held-out position with targets for every head (sequences too short?)")
    res = (torch.cat(out),) + ((torch.cat(seq_of),) if with_seq else ()) + ((torch.cat(scores),) if with_scores else ())
    return res if len(res) > 1 else res[0]


def check_prefix(prefix: str, nodes) -> None:
    """A saved tree's name must not shadow a built-in one: the heads' own trees win in TreeSpec, so `dynamic-4`
    or `tree-16` would silently stop meaning what they mean for every other set of heads."""
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", prefix):
        raise InputError(f"--prefix {prefix!r}: expected a simple name (a letter, then letters, digits or _), "
                         f"e.g. tuned or mix")
    taken = [f"{prefix}-{n}" for n in nodes if f"{prefix}-{n}" in TREES]
    if prefix in ("dynamic", "chain") or taken:
        raise InputError(f"--prefix {prefix!r} would name trees like built-in ones ("
                         f"{', '.join(taken) or prefix + '-N'}); pick another prefix")


def _check_out_is_ours(out) -> None:
    """--out is replaced whole: an existing file that is not an earlier tree-search result (the distilled shard,
    the heads' config.json, given by a slip) was overwritten without a word, losing the data or the heads."""
    path = Path(out).expanduser() if out is not None else None
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    try:
        prev = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError:
        prev = None
    if not (isinstance(prev, dict) and isinstance(prev.get("trees"), dict) and "expected_tau" in prev):
        raise InputError(f"--out {out} exists and is not a tree-search result; it would be overwritten: pick "
                         f"another --out (or delete that file)")


def _heldout_share(heads, eval_frac: float | None) -> float:
    """The held-out share to fit on: by default the one the heads' training held out. A larger one takes in
    sequences that trained the heads (where --data is their training data), whose ranks flatter them."""
    training = heads.config.extra.get("training")
    trained = training.get("eval_frac") if isinstance(training, dict) else None
    if not isinstance(trained, (int, float)) or isinstance(trained, bool):
        return 0.05 if eval_frac is None else eval_frac
    if eval_frac is None:
        if not 0 < trained < 1:
            raise InputError(f"the heads were trained with --eval-frac {trained}: no sequence of their data was held "
                             f"out; pass --eval-frac and data they were not trained on")
        return trained
    if eval_frac > trained:
        print(f"tree-search: warning: --eval-frac {eval_frac} holds out more than the {trained} the heads were "
              f"trained with: on their training data the trees are fitted partly on sequences they trained on",
              file=sys.stderr)
    return eval_frac


def tree_search(data, heads_dir, model: str = "smollm2-135m", nodes=(16, 32, 63), out=None, save: bool = False,
                eval_frac: float | None = None, cache_hidden=None, device=None, dtype=None, max_seq_len: int = 1024,
                compare=("mc_sim_7b_63", "tree-32", "tree-16"), target=None, heads=None, source_weights=None,
                prefix: str = "tuned", dynamic=(), tokenizer=None) -> dict:
    """Fits one tree per size in `nodes` to the heads on the held-out split of `data` (the same split the
    trainer holds out). Prints expected tau of each fitted and each `compare` tree; `save` stores the trees
    in the heads' config.json as `PREFIX-N` (then `--tree tuned-63` works wherever the heads are loaded).
    dynamic: sizes N of dynamic-N trees to replay on the same positions (dynamic_decoding_tau); their tau is
    recorded beside the fitted trees', so `--speculative auto` can weigh them too.
    source_weights ("src=w,..." or a dict, unlisted sources weigh 1, 0 drops one): each held-out position
    weighs its source's weight, in the fit and in every tau printed.
    eval_frac: None takes the held-out share the heads' training recorded (0.05 where none is recorded).
    tokenizer: the target's (loaded with `model`; with a `target` given, optional): records without prompt text are
    decoded and checked against the evaluation questions, as `train` checks them."""
    from ..heads import lm_head_fingerprint, load_heads
    from .data import load_shard, prompt_text_decoder
    out, cache_hidden = user_path(out), user_path(cache_hidden)      # from Python, as a shell would expand them
    from .plan import check_source_weights, no_heldout_reason, parse_source_weights, split_heldout
    bad = [n for n in dynamic if not 2 <= n <= 64]
    if bad:
        raise InputError(f"dynamic tree sizes {bad}: tree-search replays dynamic-N for N in [2, 64]")
    nodes = list(nodes)
    if not nodes or any(not isinstance(n, int) or n < 2 for n in nodes):     # none fitted no tree, and "succeeded"
        raise InputError(f"--nodes {nodes}: expected tree sizes (node counts) of at least 2, e.g. 16,32,63")
    check_prefix(prefix, nodes)
    big = [n for n in nodes if n > MAX_TREE_NODES]
    if big:
        raise InputError(f"tree sizes {big}: a tree has at most {MAX_TREE_NODES} nodes")
    if eval_frac is not None and not 0 < eval_frac < 1:
        raise InputError(f"--eval-frac {eval_frac}: need 0 < --eval-frac < 1 (the held-out share `train` used)")
    if max_seq_len < 2:
        raise InputError(f"--max-seq-len must be at least 2, got {max_seq_len}")
    if out is not None and Path(out).is_dir():
        raise InputError(f"--out {out} is a directory; give the JSON file to write")
    _check_out_is_ours(out)
    # the heads folder as load_heads takes it (~, or its config.json / model.safetensors named): --save wrote to
    # "HEADS/config.json/config.json" and failed once the search was done
    folder = Path(heads_dir).expanduser()
    if folder.is_file() and folder.name in ("config.json", "model.safetensors"):
        folder = folder.parent
    cfg_file = folder / "config.json"
    if save and cfg_file.is_file() and not os.access(cfg_file, os.W_OK):     # before the search, not after it
        raise InputError(f"--save: {cfg_file} is not writable; copy the heads to a directory you can write, or "
                         f"keep the trees with --out FILE.json (--tree FILE.json takes one)")
    loaded_as = None        # the --model a mismatch names: only where that is what `target` was loaded from
    if target is None:
        from ..loading import load_model, parse_device, parse_dtype
        dev = parse_device(device)
        dt = parse_dtype(dtype, dev)
        loaded = load_model(model, dtype=dt, device=dev, max_seq_len=max_seq_len)
        target, tokenizer, loaded_as = loaded.model, loaded.tokenizer, str(model)
    target.eval().requires_grad_(False)
    if heads is None:
        heads = load_heads(folder, target, dtype=torch.float32, target_name=loaded_as)
    # before the held-out pass: a size the heads cannot fill would otherwise be fitted (or replayed) smaller
    capacity = sum(TOPK ** d for d in range(1, heads.num_heads + 1)) + 1
    if max(list(nodes) + list(dynamic), default=0) > capacity:
        # each size once: the default --dynamic repeats --nodes, and the fix is a smaller --nodes (and --dynamic)
        raise InputError(f"tree sizes {sorted({n for n in list(nodes) + list(dynamic) if n > capacity})}: "
                         f"{heads.num_heads} heads x top-{TOPK} hold at most {capacity} nodes; pass smaller --nodes "
                         f"(and --dynamic), e.g. --nodes {min(8, capacity)}")
    eval_frac = _heldout_share(heads, eval_frac)
    shard = load_shard([data] if isinstance(data, (str, Path)) else list(data), target.config.vocab_size,
                       min(max_seq_len, target.rope_len), fingerprint=lm_head_fingerprint(target),
                       prompt_text=prompt_text_decoder(tokenizer) if tokenizer is not None else None)
    _, held = split_heldout(shard.sequences, eval_frac)
    if not held:
        names = data if isinstance(data, (str, Path)) else ", ".join(map(str, data))
        raise InputError(f"no held-out sequences in {names}: {no_heldout_reason(shard.sequences, eval_frac)}")
    sw = parse_source_weights(source_weights)
    if sw:
        check_source_weights(sw, shard.sequences)
        held = [s for s in held if sw.get(s.source, 1.0) > 0]      # a dropped source costs no target forward
    ranks, seq_idx, scores = heldout_ranks(heads, target, held, cache_hidden, with_seq=True, with_scores=True)
    row_sources = [held[i].source for i in seq_idx.tolist()]
    row_w = [sw.get(src, 1.0) for src in row_sources]
    weights = torch.tensor(row_w) if sw else None
    mix: dict[str, float] = {}
    for src, w in zip(row_sources, row_w):
        mix[src] = mix.get(src, 0.0) + w
    total = sum(mix.values())
    result = {"heads": str(heads_dir), "heldout_sequences": len(held), "positions": int(ranks.shape[0]),
              "source_weights": sw, "position_mix": {k: round(v / total, 4) for k, v in sorted(mix.items())},
              "head_top1": [round(float((ranks[:, k] == 0).float().mean()), 4) for k in range(heads.num_heads)],
              "trees": {}, "expected_tau": {}, "decoding_tau": {}}
    for n in nodes:
        paths = fit_decoding_tree(ranks, seq_idx, n, weights=weights)
        result["trees"][f"{prefix}-{n}"] = [list(p) for p in paths]
        result["expected_tau"][f"{prefix}-{n}"] = round(expected_tau(ranks, paths, weights=weights), 4)
        result["decoding_tau"][f"{prefix}-{n}"] = round(decoding_tau(ranks, seq_idx, paths, weights), 4)
    for n in dynamic:
        result["decoding_tau"][f"dynamic-{n}"], result["expected_tau"][f"dynamic-{n}"] = (
            round(t, 4) for t in dynamic_decoding_tau(ranks, scores, seq_idx, n, weights))
    for name in compare:
        paths = get_tree_choices(name)
        if max(map(len, paths)) <= heads.num_heads:
            result["expected_tau"][name] = round(expected_tau(ranks, paths, weights=weights), 4)
            result["decoding_tau"][name] = round(decoding_tau(ranks, seq_idx, paths, weights), 4)
    print(f"tree-search: {len(held)} held-out sequences, {ranks.shape[0]} positions; head top-1 "
          f"{result['head_top1']}" + (f"; position mix after source weights {result['position_mix']}" if sw else ""),
          file=sys.stderr)
    for name, tau in result["expected_tau"].items():
        print(f"  {name:<14} expected tau {tau:.3f} (per position), {result['decoding_tau'][name]:.3f} "
              f"(decoding walk)", file=sys.stderr)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    if save:
        from ..heads.checkpoint import WEIGHTS_KEY, drop_fitted, stale_prefixes, weights_stamp
        cfg = json.loads(cfg_file.read_text())
        extra = cfg.setdefault("extra", {})
        # The record names the weights its trees were fitted to (save_heads and load_heads drop it, and its trees,
        # once the heads hold others). A family refitted here is replaced whole: its trees of sizes not refitted now
        # would stay without a recorded tau; a family fitted to other weights (the heads retrained since) goes too,
        # where speculative="auto" would have trusted its taus.
        stamp = weights_stamp(heads.state_dict())
        stale = stale_prefixes(extra, stamp)
        gone = drop_fitted(extra, set(stale) | {prefix})
        retrained = sorted(n for n in gone if n.rpartition("-")[0] in stale)
        if retrained:
            print(f"tree-search: dropped {', '.join(retrained)} from {cfg_file}: fitted to other weights than these "
                  f"heads' (retrained since)", file=sys.stderr)
        replaced = sorted(n for n in gone if n not in retrained and n not in result["trees"])
        if replaced:
            print(f"tree-search: dropped {', '.join(replaced)} from {cfg_file}: this fit replaces the {prefix}-N trees "
                  f"of the last one (pass every size to keep in one --nodes, or save under another --prefix)",
                  file=sys.stderr)
        extra.setdefault("trees", {}).update(result["trees"])
        keys = ("heldout_sequences", "positions", "source_weights", "expected_tau", "decoding_tau")
        record = {**{k: result[k] for k in keys}, WEIGHTS_KEY: stamp}
        if prefix == "tuned":
            extra["tree_search"] = record
        else:       # a second family of trees (another mix) keeps the first family's record
            extra[f"tree_search_{prefix}"] = record
        _replace_text(cfg_file, json.dumps(cfg, indent=2) + "\n")
    return result


def _replace_text(path: Path, text: str) -> None:
    """Rewrites the heads' config.json whole or not at all: written in place, a full disk or a kill mid-write
    left a truncated config.json, and the heads (hours of training) no longer loaded."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            tmp.write_text(text)
            shutil.copymode(path, tmp)       # the file keeps its mode, as an in-place write kept it
            os.replace(tmp, path)
        except PermissionError:
            # a folder that is not writable, holding a config.json that is: only an in-place write can save there
            if not os.access(path, os.W_OK) or os.access(path.parent, os.W_OK):
                raise
            path.write_text(text)
    except OSError as e:
        raise InputError(f"--save: cannot write {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
