"""`amphista tree-search`: trees fitted to heads from held-out rank tuples."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from amphista_engine.errors import ConfigError
from amphista_engine.heads import load_heads
from amphista_engine.training.data import Sequence
from amphista_engine.training.tree_search import (accepted_depth, best_tree, decoding_tau, dynamic_decoding_tau,
                                                  dynamic_depths, expected_tau, fit_decoding_tree, heldout_ranks,
                                                  tree_search)
from amphista_engine.training.trainer import train_heads
from amphista_engine.tree import get_tree_choices

from test_training import K, cfg, greedy_tokens, shard  # noqa: F401  (fixtures; target: conftest's)


def _closed_sets(paths, n):
    for combo in itertools.combinations(paths, n):
        s = set(combo)
        if all(len(p) == 1 or p[:-1] in s for p in combo):
            yield combo


def test_best_tree_is_optimal_by_brute_force():
    """On skewed random rank tuples, the fitted tree's expected tau beats every other prefix-closed tree."""
    g = torch.Generator().manual_seed(0)
    topk = 3
    probs = torch.tensor([0.45, 0.25, 0.1, 0.2])          # ranks 0, 1, 2 and a miss (= topk)
    ranks = torch.multinomial(probs, 400 * 2, replacement=True, generator=g).view(400, 2)
    every = [(a,) for a in range(topk)] + [(a, b) for a in range(topk) for b in range(topk)]
    for n in (2, 4, 6):
        tree = best_tree(ranks, n, topk)
        assert len(tree) == n - 1 and get_tree_choices(tree) == tree            # valid, prefix-closed
        best = max(expected_tau(ranks, c, topk) for c in _closed_sets(every, n - 1))
        assert expected_tau(ranks, tree, topk) == pytest.approx(best)
    # by hand: tau = 1 + share of rows accepting each node
    assert expected_tau(torch.tensor([[0, 1], [0, 3], [1, 0]]), [(0,), (0, 1)], topk) == pytest.approx(1 + 3 / 3)
    with pytest.raises(ConfigError, match="at least 2 nodes"):
        best_tree(ranks, 1, topk)


def test_best_tree_pads_when_data_is_scarce():
    tree = best_tree(torch.tensor([[0, 0, 0]]), 12, topk=4)      # one row: 3 seen paths, 8 more needed
    assert len(tree) == 11 and get_tree_choices(tree) == tree


def _decode_with_fresh_heads(shard, target, tmp_path, kind: str, tree, tokens: int = 40):  # noqa: F811
    """Heads of `kind` trained briefly on the shard, then greedy speculative decoding of its last prompt on
    `tree`: (heads, prompt, the decoded tokens, the tokens each step emitted)."""
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.sampling import SamplingParams
    from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
    train_heads(cfg(shard, tmp_path / "h", kind=kind, steps=10, eval_frac=0.0), target=target)
    heads = load_heads(tmp_path / "h", target, dtype=torch.float32)
    prompt = json.loads(shard.read_text().splitlines()[-1])["prompt_ids"]
    cache = KVCache.for_model(target.config, 1, 256, torch.float32, "cpu")
    dec = SpeculativeDecoder(target, cache, heads, TreeSpec(tree, K, "cpu"), SamplingParams())
    seq = [int(dec.prefill([prompt])[0])]
    counts = []
    while len(seq) < tokens:
        toks, cnt = dec.step()
        counts.append(int(cnt[0]))
        seq += toks[0, :counts[-1]].tolist()
    return heads, prompt, seq, counts


def test_expected_tau_predicts_every_speculative_step(shard, target, tmp_path):  # noqa: F811
    """For each decoding step, 1 + (tree nodes whose path prefixes the position's rank tuple) is exactly the
    number of tokens the greedy speculative step emits: the model behind tree-search is the decoder's own."""
    tree = best_tree(torch.zeros(1, K, dtype=torch.long), 12)              # a wide tree with depth K
    heads, prompt, seq, counts = _decode_with_fresh_heads(shard, target, tmp_path, "medusa", tree)
    ranks = heldout_ranks(heads, target, [Sequence("s", prompt + seq, len(prompt))])   # positions P-1 ...
    pos, checked = 0, 0
    for c in counts:
        if pos + K + 2 <= len(seq):                       # the position's rank tuple lies inside the sequence
            r = tuple(ranks[pos].tolist())
            assert c == 1 + sum(r[:len(p)] == p for p in tree)
            checked += 1
        pos += c
    assert checked >= 5 and max(counts) > 1                # the heads do accept something
    # decoding_tau's walk over the same ranks visits the same positions and accepts the same counts
    paths, i, walked = {tuple(p) for p in tree}, 0, []
    while len(walked) < checked:
        walked.append(1 + accepted_depth(ranks[i].tolist(), paths))
        i += walked[-1]
    assert walked == counts[:checked]


def test_dynamic_depths_replay_the_tree_builder():
    """dynamic_depths accepts exactly the prefix of a position's true rank tuple that the dynamic tree the
    decoder would build there (tree.dynamic_tree, from the same top-k log-probs) contains: checked against the
    builder's own node list, ties and misses included."""
    from amphista_engine.tree import TOPK, dynamic_tree
    g = torch.Generator().manual_seed(1)
    P, K_, k = 300, 4, TOPK
    values = torch.randn(P, K_, k, generator=g).mul(2).sort(-1, descending=True).values.log_softmax(-1)
    values[::7] = values[::7].round()                                  # ties between siblings and paths
    ranks = torch.multinomial(torch.tensor([0.4, 0.2, 0.1, 0.05, 0.05, 0.05, 0.05, 0.03, 0.03, 0.02, 0.02]),
                              P * K_, replacement=True, generator=g).view(P, K_)     # 10 = a miss
    for n in (2, 5, 16, 64):
        got = dynamic_depths(ranks, values, n, chunk=128)
        tree = dynamic_tree(torch.zeros(P, dtype=torch.long), (values, torch.arange(k).expand(P, K_, k)), n)
        for i in range(P):
            paths, path_of = set(), {0: ()}
            for j in range(1, n):
                path_of[j] = path_of[int(tree.parent[i, j])] + (int(tree.rank[i, j]),)
                paths.add(path_of[j])
            assert int(got[i]) == accepted_depth(ranks[i].tolist(), paths), (n, i)
    tau, per_position = dynamic_decoding_tau(ranks, values, torch.arange(P) // 30, 16)
    assert 1.0 <= tau and per_position == pytest.approx(1 + dynamic_depths(ranks, values, 16).float().mean().item())


def test_dynamic_replay_predicts_every_speculative_step(shard, target, tmp_path):  # noqa: F811
    """The replay behind tree-search's dynamic-N tau is the decoder's: at each step of real greedy decoding
    with a dynamic tree, the tokens emitted are 1 + dynamic_depths at that position."""
    heads, prompt, seq, counts = _decode_with_fresh_heads(shard, target, tmp_path, "amphista", "dynamic-12")
    ranks, scores = heldout_ranks(heads, target, [Sequence("s", prompt + seq, len(prompt))], with_scores=True)
    depths = dynamic_depths(ranks, scores, 12)
    pos, checked = 0, 0
    for c in counts:
        if pos + K + 2 <= len(seq):
            assert c == 1 + int(depths[pos]), (pos, c)
            checked += 1
        pos += c
    assert checked >= 5 and max(counts) > 1


def test_decoding_tau_walks_each_sequence():
    tree = [(0,), (0, 0)]
    ranks = torch.tensor([[0, 0], [9, 9], [0, 9], [9, 9], [0, 9]])
    seq = torch.tensor([0, 0, 0, 1, 1])
    # seq 0: accept 2 at its first position, which jumps past its end (1 step, 3 tokens);
    # seq 1: 0 accepted, then 1 (2 steps, 3 tokens). Every position alike would give 1 + 4 / 5.
    assert decoding_tau(ranks, seq, tree) == pytest.approx(6 / 3)
    assert expected_tau(ranks, tree, 9) == pytest.approx(1.8)
    # one sequence: the walk from row 0 skips rows 1-2 and continues at row 3
    assert decoding_tau(ranks, torch.zeros(5, dtype=torch.long), tree) == pytest.approx((3 + 1 + 2) / 3)


def test_fit_decoding_tree_beats_the_per_position_fit_on_decoding_tau():
    # easy stretches (the top guess right at every depth) between hard ones (only lower ranks, at depth 1):
    # the per-position fit spends nodes on depth that decoding crosses in few steps
    g = torch.Generator().manual_seed(0)
    rows, seqs = [], []
    for s in range(40):
        for t in range(60):
            easy = (t // 10) % 2 == 0
            rows.append([0, 0, 0, 0] if easy and torch.rand(1, generator=g) < 0.9 else
                        [int(torch.randint(1, 4, (1,), generator=g))] + [9, 9, 9])
            seqs.append(s)
    ranks, seq = torch.tensor(rows), torch.tensor(seqs)
    for n, gain in ((4, 1.0), (5, 1.15), (6, 1.1)):
        base, fit = best_tree(ranks, n, 9), fit_decoding_tree(ranks, seq, n, 9)
        assert len(fit) == n - 1 and get_tree_choices(fit) == fit
        # 5 nodes: the chain (0, 0, 0, 0) wins per position, the ranks 1..3 of the hard stretches when decoding
        assert decoding_tau(ranks, seq, fit) >= gain * decoding_tau(ranks, seq, base)
        assert expected_tau(ranks, fit, 9) <= expected_tau(ranks, base, 9) + 1e-9     # best_tree is optimal there


def test_tree_search_saves_trees_the_engine_uses(shard, target, tmp_path):  # noqa: F811
    train_heads(cfg(shard, tmp_path / "h", steps=8, eval_frac=0.2), target=target)
    res = tree_search(shard, tmp_path / "h", nodes=(8, 12), out=tmp_path / "ts.json", save=True, eval_frac=0.2,
                      target=target, compare=("chain-3",), dynamic=(12,))
    assert set(res["trees"]) == {"tuned-8", "tuned-12"} and len(res["trees"]["tuned-12"]) == 11
    assert res["decoding_tau"]["dynamic-12"] >= 1.0 and "dynamic-12" not in res["trees"]
    assert res["expected_tau"]["tuned-12"] >= res["expected_tau"]["tuned-8"] >= 1.0
    assert set(res["decoding_tau"]) == set(res["expected_tau"]) and min(res["decoding_tau"].values()) >= 1.0
    assert json.loads((tmp_path / "ts.json").read_text())["trees"] == res["trees"]
    heads = load_heads(tmp_path / "h", target, dtype=torch.float32)
    assert heads.config.extra["trees"]["tuned-12"] == res["trees"]["tuned-12"]
    assert "training" in heads.config.extra                                 # the recipe is kept
    prompt = json.loads(shard.read_text().splitlines()[0])["prompt_ids"]
    plain = greedy_tokens(target, prompt, 20)
    from amphista_engine.speculative import TreeSpec
    spec = TreeSpec("tuned-12", K, "cpu", heads.config.extra["trees"])
    assert spec.name == "tuned-12" and spec.num_nodes == 12
    assert greedy_tokens(target, prompt, 20, heads, res["trees"]["tuned-12"]) == plain
    # a tree file works too, and a tuned name the heads lack is a clear error
    (tmp_path / "t.json").write_text(json.dumps(res["trees"]["tuned-8"]))
    assert TreeSpec(str(tmp_path / "t.json"), K, "cpu").num_nodes == 8
    with pytest.raises(ConfigError, match="JSON list of rank paths"):     # two trees in it: which one?
        TreeSpec(str(tmp_path / "ts.json"), K, "cpu")
    with pytest.raises(ConfigError, match="no such fitted tree"):
        TreeSpec("tuned-99", K, "cpu", heads.config.extra["trees"])
    with pytest.raises(ConfigError, match="tree file not found"):
        TreeSpec(str(tmp_path / "missing.json"), K, "cpu")


def test_engine_resolves_the_heads_fitted_trees(tmp_path, tiny_hf_dir):
    from amphista_engine.engine import Engine
    from amphista_engine.heads import new_heads, save_heads
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)
    heads = new_heads("medusa", engine.model, num_heads=2, dtype=torch.float32)
    heads.config.extra["trees"] = {"tuned-5": [[0], [1], [0, 0], [0, 1]]}
    save_heads(heads, tmp_path / "h")
    plain = engine.generate("Hello there", max_new_tokens=12).token_ids
    engine.load_heads(tmp_path / "h")
    res = engine.generate("Hello there", max_new_tokens=12, speculative="medusa", tree="tuned-5")
    assert res.token_ids == plain and engine._tree_spec("tuned-5").num_nodes == 5
    engine.load_heads(new_heads("medusa", engine.model, num_heads=2, dtype=torch.float32))   # no fitted trees
    with pytest.raises(ConfigError, match="no such fitted tree"):
        engine.generate("Hello there", max_new_tokens=4, speculative="medusa", tree="tuned-5")


def test_source_weights_act_as_repeats_and_drops():
    """A row of weight 2 counts as that row twice, weight 0 as no row: in the fit and in both taus."""
    g = torch.Generator().manual_seed(1)
    ranks = torch.randint(0, 5, (120, 3), generator=g).clamp(max=4) * (torch.rand(120, 3, generator=g) < 0.6)
    seq = torch.arange(120) // 12                                        # 10 sequences of 12 positions
    w = (seq % 3).float()                                                # sequences weigh 0, 1, 2, 0, 1, ...
    ones = torch.ones(120)
    for n in (4, 9):
        assert best_tree(ranks, n, 9, ones) == best_tree(ranks, n, 9)
        assert fit_decoding_tree(ranks, seq, n, 9, weights=ones) == fit_decoding_tree(ranks, seq, n, 9)
        tree = best_tree(ranks, n, 9, w)
        rep = torch.cat([ranks[seq % 3 == 1]] + [ranks[seq % 3 == 2]] * 2)   # the weights as repeats and drops
        assert tree == best_tree(rep, n, 9)
        assert expected_tau(ranks, tree, 9, w) == pytest.approx(expected_tau(rep, tree, 9))
        kept = seq % 3 > 0
        rep_seq = torch.cat([seq[seq % 3 == 1]] + [seq[seq % 3 == 2] + 100 * k for k in (1, 2)])
        rep_ranks = torch.cat([ranks[seq % 3 == 1]] + [ranks[seq % 3 == 2]] * 2)
        assert decoding_tau(ranks, seq, tree, w) == pytest.approx(decoding_tau(rep_ranks, rep_seq, tree))
        assert decoding_tau(ranks[kept], seq[kept], tree, w[kept]) == pytest.approx(decoding_tau(ranks, seq, tree, w))


def test_tree_search_fits_to_a_source_mix(shard, target, tmp_path):  # noqa: F811
    """--source-weights: a source of weight 0 leaves the held-out set, the mix is reported, and trees saved
    under another prefix sit beside the tuned-N ones."""
    train_heads(cfg(shard, tmp_path / "h", steps=4, eval_frac=0.5), target=target)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**json.loads(line), "id": "o" + json.loads(line)["id"], "source": "other"})
                             + "\n" for line in shard.read_text().splitlines()))
    both = tree_search([shard, other], tmp_path / "h", nodes=(6,), eval_frac=0.5, target=target, save=True)
    assert set(both["position_mix"]) == {"tiny", "other"}
    res = tree_search([shard, other], tmp_path / "h", nodes=(6,), eval_frac=0.5, target=target, save=True,
                      source_weights="tiny=0", prefix="mix")
    assert res["position_mix"] == {"other": 1.0} and set(res["trees"]) == {"mix-6"}
    assert res["heldout_sequences"] < both["heldout_sequences"]
    extra = load_heads(tmp_path / "h", target, dtype=torch.float32).config.extra
    assert {"tuned-6", "mix-6"} <= set(extra["trees"]) and extra["tree_search_mix"]["source_weights"] == {"tiny": 0.0}
    assert extra["tree_search"]["source_weights"] == {}
    with pytest.raises(ConfigError, match="not in the training data: nosuch"):
        tree_search([shard, other], tmp_path / "h", nodes=(6,), eval_frac=0.5, target=target, source_weights="nosuch=2")


def test_tree_search_cli_checks_before_loading(tmp_path, capsys):
    """Bad sizes and a --save into the shipped heads fail in one line, before any model loads; 'default' names the
    shipped heads (as generate and eval-tau take it)."""
    from amphista_engine.cli import main
    data = tmp_path / "d.jsonl"
    data.write_text("")
    assert main(["tree-search", "--data", str(data), "--heads", "default", "--save"]) == 2
    assert "--save would write into the shipped heads" in capsys.readouterr().err
    assert main(["tree-search", "--data", str(data), "--heads", "default", "--nodes", "0"]) == 2
    err = capsys.readouterr().err
    assert "--nodes '0': expected a comma list of node counts of at least 2" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, match", [
    (["--prefix", "dynamic"], "--prefix 'dynamic' would name trees like built-in ones"),
    (["--prefix", "chain"], "--prefix 'chain' would name trees like built-in ones"),
    (["--prefix", "tree", "--nodes", "16"], "would name trees like built-in ones \\(tree-16\\)"),
    (["--prefix", "a b/c"], "--prefix 'a b/c': expected a simple name"),
    (["--eval-frac", "1.5"], "need 0 < --eval-frac < 1"),
    (["--eval-frac", "0"], "need 0 < --eval-frac < 1"),
    (["--max-seq-len", "-5"], "--max-seq-len must be at least 2"),
    (["--out", "."], "is a directory"),
])
def test_tree_search_checks_settings_before_loading(tmp_path, capsys, monkeypatch, extra, match):
    """A prefix that would shadow a built-in tree (the heads' own trees win when a name is resolved), a bad
    held-out share or an --out that is a directory fail in one line before any model loads, not after the search."""
    import re
    from amphista_engine.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "heads").mkdir()
    args = ["tree-search", "--data", "d.jsonl", "--heads", "heads", "--model", str(tmp_path / "no-model")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err


def test_tree_search_prefix_check_on_the_function(shard, target, tmp_path):  # noqa: F811
    from amphista_engine.errors import InputError
    from amphista_engine.training.tree_search import check_prefix
    check_prefix("tuned", (16, 32, 63))
    check_prefix("mix_2", (64,))
    check_prefix("tree", (63,))          # tree-63 is no built-in name
    with pytest.raises(InputError, match="tree-32"):
        tree_search(shard, tmp_path / "h", nodes=(32,), eval_frac=0.2, target=target, prefix="tree")
