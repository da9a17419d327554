"""QA of the training CLI as a user runs it end to end (2026-12-06, second pass): distill -> train -> tree-search.

Bugs pinned: `train --data a --data b` (and tree-search's) kept only b, training on part of the data without a word;
a shard without target_fingerprint (the format of the committed shards) distilled by another tokenizer whose ids
all fall inside this target's vocabulary trained on garbage silently; `--kind medusa` dropped the Amphista-only
layout flags (--layers-per-stage, --sal-intermediate-size, ...) silently; a torn hidden-cache entry failed the run
with torch.load's UnpicklingError traceback, a torn meta.json with a JSONDecodeError traceback, and a --cache-hidden
that is a file with "File exists"; the prompt file given as --data was "malformed record: N"; `train --out` inside
the shipped heads (with --overwrite) replaced the package's own heads.
"""
from __future__ import annotations

import json

import pytest

from amphista_engine.cli import main
from amphista_engine.errors import ConfigError, InputError
from amphista_engine.training.data import load_shard, prompt_text_decoder
from amphista_engine.training.trainer import train_heads

from conftest import train_cfg as cfg

pytestmark = pytest.mark.usefixtures("one_thread_module")




@pytest.mark.parametrize("command", ["train", "tree-search"])
def test_a_repeated_data_flag_reads_every_shard(command, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("amphista_engine.training.trainer.train_heads",
                        lambda c: seen.setdefault("data", c.data) and {"final_eval": {"loss": 0.0}})
    monkeypatch.setattr("amphista_engine.training.tree_search.tree_search",
                        lambda data, *a, **k: seen.setdefault("data", data))
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    rest = ["--out", str(tmp_path / "h")] if command == "train" else ["--heads", str(tmp_path / "h")]
    assert main([command, "--data", a, "--data", b, *rest]) == 0
    assert list(seen["data"]) == [a, b]


def test_fingerprintless_records_of_another_tokenizer_are_refused(tiny_hf_dir, tmp_path):
    from amphista_engine.loading import load_model
    loaded = load_model(str(tiny_hf_dir), device="cpu")
    tok, V = loaded.tokenizer, loaded.model.config.vocab_size
    texts = [f"Hello number {i}, the quick brown fox {i * 7}" for i in range(6)]
    ours = [tok.encode(t) for t in texts]

    def write(path, ids_of):
        path.write_text("".join(json.dumps({"id": f"p{i}", "source": "s", "prompt": t, "prompt_ids": ids_of(ids),
                                            "answer_ids": [5, 6, 7]}) + "\n"       # no target_fingerprint
                                for i, (t, ids) in enumerate(zip(texts, ours))))
        return path
    good = write(tmp_path / "good.jsonl", list)
    # another tokenizer's ids for the same text: other ids, every one inside this vocabulary
    other = write(tmp_path / "other.jsonl", lambda ids: [(t * 7 + 11) % 250 + 3 for t in ids])
    decode = prompt_text_decoder(tok)
    assert len(load_shard(good, V, 256, prompt_text=decode).sequences) == 6
    with pytest.raises(InputError, match="do not decode to their prompt text.*distilled by another model"):
        load_shard(other, V, 256, prompt_text=decode)


@pytest.mark.parametrize("flag", [dict(layers_per_stage=2), dict(sal_intermediate_size=128), dict(aeb_layers=2),
                                  dict(aeb_intermediate_size=128), dict(stage_of_head="0,0,1")])
def test_medusa_refuses_amphista_only_layout_flags(shard, target, tmp_path, flag):
    with pytest.raises(ConfigError, match="Amphista-only.*--kind medusa"):
        train_heads(cfg(shard, tmp_path / "h", kind="medusa", **flag), target=target)


def test_a_torn_hidden_cache_is_recomputed_or_named(shard, target, tmp_path, capsys):
    cache = tmp_path / "hidden"
    train_heads(cfg(shard, tmp_path / "a", cache_hidden=str(cache)), target=target)
    entries = sorted(cache.glob("*.pt"))
    for e in entries:
        e.write_bytes(b"garbage, not a torch file")       # a cut copy, a disk error
    res = train_heads(cfg(shard, tmp_path / "b", cache_hidden=str(cache)), target=target)
    assert res["steps"] == 2 and "unreadable hidden-state cache entry" in capsys.readouterr().err
    assert any(e.read_bytes()[:7] != b"garbage" for e in entries)       # rewritten as it was recomputed
    (cache / "meta.json").write_text("{torn")
    with pytest.raises(ConfigError, match="meta.json is not a cache record"):
        train_heads(cfg(shard, tmp_path / "c", cache_hidden=str(cache)), target=target)
    with pytest.raises(InputError, match="--cache-hidden .* is a file"):
        train_heads(cfg(shard, tmp_path / "d", cache_hidden=str(shard)), target=target)


def test_a_prompt_file_as_data_is_named(tmp_path):
    prompts = tmp_path / "train_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "source": "s", "prompt": f"question {i}"}) + "\n"
                               for i in range(3)))
    with pytest.raises(InputError, match="prompt file: `amphista distill` answers it: 3"):
        load_shard(prompts, 64, 256)


def test_train_out_inside_the_shipped_heads_is_refused(shard, target, tmp_path, monkeypatch):
    from amphista_engine import shipped_heads
    fake = tmp_path / "package_heads"
    (fake / "smollm2-135m-amphista").mkdir(parents=True)
    monkeypatch.setattr(shipped_heads, "DATA", fake)
    with pytest.raises(InputError, match="inside the shipped heads"):
        train_heads(cfg(shard, fake / "smollm2-135m-amphista", overwrite=True), target=target)
    assert not list((fake / "smollm2-135m-amphista").iterdir())


def test_tree_search_out_never_overwrites_a_file_that_is_not_its_result(shard, target, tmp_path):
    """--out the shard (or the heads' config.json) by a slip: it was replaced by the search's JSON, the data lost."""
    from amphista_engine.training.tree_search import tree_search
    heads = tmp_path / "h"
    train_heads(cfg(shard, heads), target=target)
    data = tmp_path / "data.jsonl"
    data.write_bytes(shard.read_bytes())
    for victim in (data, heads / "config.json"):
        before = victim.read_bytes()
        with pytest.raises(InputError, match="exists and is not a tree-search result"):
            tree_search(data, heads, nodes=[4], dynamic=[], out=victim, target=target)
        assert victim.read_bytes() == before
    res = tmp_path / "trees.json"
    for _ in range(2):      # its own result is rewritten
        tree_search(data, heads, nodes=[4], dynamic=[], out=res, target=target)
    assert "tuned-4" in json.loads(res.read_text())["trees"]


def test_log_that_is_a_data_shard_is_refused(shard, target, tmp_path):
    before = shard.read_bytes()
    with pytest.raises(InputError, match="--log .* is a --data shard"):
        train_heads(cfg(shard, tmp_path / "h", log=str(shard)), target=target)
    assert shard.read_bytes() == before
