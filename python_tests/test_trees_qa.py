"""QA of token trees and the automatic choices: tree files and names refused by name, tree buffers against an
independent construction, random path-list trees lossless, the step-cost key, and `tree-search` sizes and --save."""
from __future__ import annotations

import json
import random

import pytest
import torch

from amphista_engine.errors import AmphistaError, ConfigError, InputError
from amphista_engine.kv_cache import KVCache
from amphista_engine.model import AttentionSpec, causal_mask
from amphista_engine.speculative import TreeSpec
from amphista_engine.tree import build_tree

from conftest import random_tiny_model
from test_speculative import OracleHeads, plain_ids, spec_ids


def _random_tree(rng: random.Random, n_paths: int, topk: int, max_depth: int, chain: int = 0) -> list[list[int]]:
    """A prefix-closed path list grown from random nodes, with the top-guess chain of `chain` nodes in it, and
    shuffled (input order must not matter)."""
    paths: set[tuple[int, ...]] = {(0,) * d for d in range(1, chain + 1)}
    while len(paths) < n_paths:
        parent = rng.choice([()] + [p for p in paths if len(p) < max_depth])
        paths.add(parent + (rng.randrange(topk),))
    out = [list(p) for p in paths]
    rng.shuffle(out)
    return out


def _reference_buffers(paths):
    """The tree layout from its definition alone: nodes sorted by (depth, path); node j is visible to node i iff
    j's path is a prefix of i's; leaf rows list the prefixes of each leaf; positions are depths."""
    nodes = [()] + sorted(map(tuple, paths), key=lambda p: (len(p), p))
    n, index = len(nodes), {p: i for i, p in enumerate(nodes)}
    mask = [[nodes[i][:len(nodes[j])] == nodes[j] for j in range(n)] for i in range(n)]
    inner = {p[:-1] for p in nodes[1:]}
    width = max(map(len, nodes)) + 1
    retrieve = [[index[p[:d]] for d in range(len(p) + 1)] + [-1] * (width - len(p) - 1)
                for p in nodes if p not in inner]
    bits = [sum(1 << j for j in range(n) if mask[i][j]) for i in range(n)]
    return {"depth": [len(p) for p in nodes], "parent": [-1] + [index[p[:-1]] for p in nodes[1:]],
            "rank": [-1] + [p[-1] for p in nodes[1:]], "mask": mask, "retrieve": retrieve,
            "bits": [b - (1 << 64) if b >= 1 << 63 else b for b in bits] if n <= 64 else None}


@pytest.mark.parametrize("seed,n_paths,topk,depth", [(0, 1, 1, 1), (1, 9, 3, 4), (2, 40, 10, 5), (3, 63, 10, 4),
                                                     (4, 63, 2, 7), (5, 100, 6, 5)])
def test_tree_buffers_match_an_independent_construction(seed, n_paths, topk, depth):
    paths = _random_tree(random.Random(seed), n_paths, topk, depth)
    ref, tree = _reference_buffers(paths), build_tree(paths, topk=topk)
    assert tree.num_nodes == n_paths + 1 and tree.max_depth == max(map(len, paths))
    for name in ("depth", "parent", "rank", "mask", "retrieve"):
        assert getattr(tree, name).tolist() == ref[name], name
    assert tree.position_offsets.tolist() == ref["depth"]
    assert (tree.ancestor_bits is None) == (ref["bits"] is None)
    if ref["bits"] is not None:
        assert tree.ancestor_bits.tolist() == ref["bits"]


@pytest.mark.parametrize("decode", [False, True])
def test_random_tree_verification_equals_each_path_alone(decode):
    """The verify forward over a random tree (reference mask, positions prefix + depth), on the plain and the
    position-ordered decode path, gives each node the logits of its root-to-node path decoded causally."""
    model = random_tiny_model(seed=7, vocab=64)
    paths = _random_tree(random.Random(11), 30, 4, 4)
    ref = _reference_buffers(paths)
    n, g = len(ref["depth"]), torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 64, (1, 7), generator=g)
    tokens = torch.randint(0, 64, (1, n), generator=g)
    cache = KVCache.for_model(model.config, 1, 128, torch.float32, "cpu")
    with torch.no_grad():
        model(prefix, torch.arange(7)[None], cache, AttentionSpec(cache.length, causal_mask(7, "cpu"), 128))
        cache.length += 7
        spec = AttentionSpec(cache.length, torch.tensor(ref["mask"])[None], 128, decode=decode)
        logits = model(tokens, 7 + torch.tensor(ref["depth"])[None], cache, spec)[0]
        for i in range(n):
            path = [j for j in range(n) if ref["mask"][i][j]]
            seq = torch.cat([prefix[0], tokens[0, path]])[None]
            alone = model(seq, torch.arange(seq.shape[1])[None])[0, -1]
            assert (logits[i] - alone).norm() / alone.norm() < 1e-5, i


@pytest.mark.parametrize("seed,n_paths,depth", [(0, 5, 2), (1, 30, 4), (2, 90, 5)])
def test_random_path_list_trees_are_lossless(seed, n_paths, depth):
    """Greedy speculative output equals plain output on random path-list trees (a JSON string and a list), with
    an oracle drafter so that deep paths are accepted; more than 64 nodes takes the unbitmasked path."""
    model = random_tiny_model(seed=11)
    paths = _random_tree(random.Random(seed), n_paths, 10, depth, chain=2)
    prompt = [5, 9, 2, 33, 17]
    full, _ = plain_ids(model, prompt, 40, eos=[])
    for tree in (paths, json.dumps(paths)):
        got, why, stats = spec_ids(model, OracleHeads(prompt + full, 64, 5, seed=seed), tree, prompt, 40, eos=[])
        assert got == full and why == "length"
    assert stats.tau > 1.3


def test_tree_files_that_are_not_trees_are_named(tmp_path):
    """A tree file that is not UTF-8, a directory, or a tree-search result whose `trees` is not a map of trees
    is a ConfigError naming the file; one holding several trees names them."""
    cases = {"latin1.json": b"[[0], [1]]  # \xe9t\xe9", "trees_int.json": b'{"trees": 5}',
             "trees_list.json": b'{"trees": [[0], [1]]}',
             "two.json": json.dumps({"trees": {"tuned-4": [[0]], "tuned-8": [[0], [1]]}}).encode()}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "dir.json").mkdir()
    for name in list(cases) + ["dir.json"]:
        with pytest.raises(ConfigError, match=f"tree file {tmp_path / name}"):
            TreeSpec(str(tmp_path / name), 4, "cpu")
    with pytest.raises(ConfigError, match="not UTF-8"):
        TreeSpec(str(tmp_path / "latin1.json"), 4, "cpu")
    with pytest.raises(ConfigError, match=r"holds 2 trees \(tuned-4, tuned-8\)"):
        TreeSpec(str(tmp_path / "two.json"), 4, "cpu")
    (tmp_path / "one.json").write_text(json.dumps({"trees": {"tuned-4": [[0], [1], [0, 0]]}}))
    assert TreeSpec(str(tmp_path / "one.json"), 4, "cpu").num_nodes == 4


@pytest.mark.parametrize("name", ["dynamic-+8", "dynamic- 8", "dynamic-1_6", "dynamic-\u0668", "dynamic-8 "])
def test_dynamic_tree_names_take_plain_digits_only(name):
    """int() takes these as 8 or 16: a tree nobody asked for, under a name no recorded tau or timing matches."""
    with pytest.raises(ConfigError, match="'dynamic-N' with N an integer"):
        TreeSpec(name, 4, "cpu")
    assert TreeSpec("dynamic-8", 4, "cpu").num_nodes == 8


def test_step_cost_key_follows_the_decode_path(tiny_hf_dir, monkeypatch):
    """The position-ordered decode attention (AMPHISTA_EXACT_GREEDY=1 in fp32, model.ordered_attention off in
    bf16) changes a step's time, so a timing kept from the other path must not be reused."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    from amphista_engine.speculation_check import cost_key
    keys = {}
    for dtype in ("fp32", "bf16"):
        eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype=dtype, max_seq_len=128)
        eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
        spec = eng._tree_spec("tree-16")
        monkeypatch.delenv("AMPHISTA_EXACT_GREEDY", raising=False)
        keys[dtype] = cost_key(eng, spec, 64)
        monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", "1")
        keys[dtype, "exact"] = cost_key(eng, spec, 64)
        monkeypatch.delenv("AMPHISTA_EXACT_GREEDY")
        eng.model.ordered_attention = False
        keys[dtype, "unordered"] = cost_key(eng, spec, 64)
    assert keys["fp32"] != keys["fp32", "exact"] and keys["fp32"] == keys["fp32", "unordered"]
    assert keys["bf16"] == keys["bf16", "exact"] and keys["bf16"] != keys["bf16", "unordered"]


def test_kept_step_costs_that_are_not_finite_are_measured_again(tiny_hf_dir, tmp_path, monkeypatch):
    """An entry edited to Infinity (json reads it) or true is measured over, not weighed as a time."""
    import amphista_engine.speculation_check as sc
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    monkeypatch.setenv(sc.CACHE_ENV, str(tmp_path))
    calls = []
    monkeypatch.setattr(sc, "_time_steps", lambda engine, specs, *a: calls.append(1) or (10.0, {
        s.name: 15.0 for s in specs}))
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    eng.heads.config.extra = {"tree_search": {"decoding_tau": {"tree-16": 2.0}}}
    first = sc.check_speculation(eng, "tree-16")
    assert calls == [1] and first.pays and first.step_ratio == 1.5
    entries = json.loads(sc.costs_file().read_text())
    for bad in ("Infinity", "true"):
        sc.costs_file().write_text(json.dumps(entries).replace("10.0", bad))
        again = sc.check_speculation(eng, "tree-16")
        assert again.measured_on is None and again.step_ratio == 1.5
    assert calls == [1, 1, 1]


def test_tree_search_save_never_writes_into_the_shipped_heads(tmp_path, capsys):
    """--save is refused for the shipped heads by any name: 'default', a shipped directory's name, its path."""
    from amphista_engine.cli import main
    from amphista_engine.shipped_heads import DATA
    data = tmp_path / "d.jsonl"
    data.write_text("")
    for heads in ("smollm2-135m-medusa", str(DATA / "smollm2-135m-amphista"), str(DATA / ".." / "heads" /
                                                                               "smollm2-135m-medusa")):
        assert main(["tree-search", "--data", str(data), "--heads", heads, "--save", "--model",
                     str(tmp_path / "no-model")]) == 2
        err = capsys.readouterr().err
        assert "--save would write into the shipped heads" in err and "Traceback" not in err


def test_tree_search_refuses_sizes_the_heads_cannot_hold(tiny_hf_dir, tmp_path):
    """A size past the tree limit, or past what K heads x top-10 hold, is refused before the held-out pass,
    instead of a smaller tree saved under the asked-for name; best_tree refuses it too."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    from amphista_engine.training.tree_search import best_tree, tree_search
    with pytest.raises(InputError, match=r"tree sizes \[600\]: a tree has at most 512 nodes"):
        tree_search(tmp_path / "none.jsonl", tmp_path / "h", model=str(tmp_path / "no-model"), nodes=(16, 600))
    ranks = torch.randint(0, 11, (50, 1), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="1 heads x top-10 hold only 10"):
        best_tree(ranks, 16)
    assert len(best_tree(ranks, 11)) == 10
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=128)
    heads = random_heads("medusa", eng.model, num_heads=1, seed=0)
    for nodes, dynamic in (((16,), ()), ((8,), (12,))):
        with pytest.raises(InputError, match="1 heads x top-10 hold at most 11 nodes"):
            tree_search(tmp_path / "none.jsonl", tmp_path / "h", nodes=nodes, dynamic=dynamic, target=eng.model,
                        heads=heads)


def test_bad_trees_through_the_engine_are_named(tiny_hf_dir):
    """Every bad tree given to generate() is an AmphistaError, never a torch or Python error."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=96)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    bad = [[], [[0], [0]], [[0, 0]], [[10]], [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], [["0"]], [[True]], [[0.0]],
           [[None]], [0, 1], 5, {"a": 1}, "dynamic-0", "dynamic-513", "dynamic-x", "tuned-4", "mix-5", "",
           "[[0],", [[i] for i in range(10)] + [[i, j] for i in range(10) for j in range(10)]]
    for tree in bad:
        with pytest.raises(AmphistaError):
            eng.generate("hello", max_new_tokens=4, chat=False, speculative="amphista", tree=tree)


def test_an_edited_tree_file_is_read_again(tiny_hf_dir, tmp_path):
    """The engine keeps built trees; a tree file edited between runs must not be served as it was before."""
    import os
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=96)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    file = tmp_path / "t.json"
    sizes = []
    for i, paths in enumerate(([[0]], [[0], [1], [0, 0]])):
        file.write_text(json.dumps(paths))
        os.utime(file, ns=(10**18 + i, 10**18 + i))          # distinct times however coarse the file system's
        res = eng.generate("hello", max_new_tokens=3, chat=False, speculative="amphista", tree=str(file))
        sizes.append(res.stats.extra["tree_nodes"])
    assert sizes == [2, 4]


@pytest.mark.parametrize("word", ["off", "OFF", "0", "none", "false", "no"])
def test_cache_dir_words_that_turn_the_cache_off(word, monkeypatch, tmp_path):
    """AMPHISTA_CACHE_DIR=false made a folder named ./false; every off-word keeps nothing."""
    from amphista_engine import timing_cache
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(timing_cache.CACHE_ENV, word)
    assert timing_cache.path("step_costs.json") is None
    monkeypatch.setenv(timing_cache.CACHE_ENV, str(tmp_path / "c"))
    assert timing_cache.path("step_costs.json").parent == tmp_path / "c"


def test_tree_search_save_to_a_read_only_config_fails_before_the_search(tmp_path, monkeypatch):
    """A read-only heads config.json failed only once the whole search had run, with a raw PermissionError."""
    import os
    from amphista_engine.training import tree_search as ts
    (tmp_path / "config.json").write_text("{}")
    real = os.access
    monkeypatch.setattr(ts.os, "access", lambda p, mode: False if str(p).endswith("config.json") else real(p, mode))
    with pytest.raises(InputError, match="config.json is not writable"):
        ts.tree_search(tmp_path / "shard.jsonl", tmp_path, model="no-such-model", nodes=(8,), save=True)
