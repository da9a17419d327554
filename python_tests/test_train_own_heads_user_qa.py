"""QA as a user who trains drafting heads for their own model with the CLI (2026-12-05):
`amphista distill` -> `amphista train` -> `amphista tree-search --save` -> `generate --heads DIR` / `Engine.load_heads`.

Everything runs on tiny random HF checkpoints (conftest's TINY_HF) and prompt files written here. Bugs pinned: a second
prompt file whose ids collide with the first's (ShareGPT items without an 'id' are sharegpt-N in every file) was
"already answered" in the shard (0 new records, its prompts never answered); shards with colliding ids lost the later
records under a plain "duplicate id" count; heads of another model were refused by fingerprints only, not naming the
model they were trained with nor the one loaded, and heads trained on a target handed to train_heads recorded the
default --model (smollm2-135m) as theirs; a prompt file saved with a UTF-8 byte-order mark was "malformed JSON" (a
ShareGPT one too); `tree-search --save` rewrote config.json in place, so a failed write left the heads unloadable;
a tree-size error listed each size twice.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.cli import main
from amphista_engine.errors import HeadsMismatchError, InputError
from amphista_engine.heads import load_heads, random_heads, save_heads

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT = "Hello number 3, the quick brown fox"


def _prompts(n=12, words="fox"):
    return [{"id": f"p{i}", "source": f"s{i % 2}", "prompt": f"Hello number {i}, the quick brown {words} {i * 7}"}
            for i in range(n)]


def _hf_dir(path: Path, seed: int, **over) -> Path:
    """Another tiny Llama checkpoint like conftest's tiny_hf_dir (same tokenizer), with other weights or shapes."""
    from conftest import write_tiny_hf
    return write_tiny_hf(path, seed, **over)


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module", params=["amphista", "medusa"])
def pipeline(request, tiny_hf_dir, tmp_path_factory):
    """The README's four commands on the tiny model: distill -> train -> tree-search --save. Returns the paths."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"own_{kind}")
    prompts, shard, heads = root / "prompts.jsonl", root / "distill.jsonl", root / "heads"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in _prompts()))
    model = ("--model", tiny_hf_dir, "--device", "cpu")
    assert _cli("distill", "--prompts", prompts, "--out", shard, *model, "--max-new-tokens", 24,
                "--max-seq-len", 128) == 0
    assert _cli("train", "--data", shard, "--out", heads, *model, "--kind", kind, "--num-heads", 3, "--steps", 4,
                "--batch-tokens", 512, "--max-seq-len", 128, "--eval-frac", 0.2) == 0
    assert _cli("tree-search", "--data", shard, "--heads", heads, *model, "--nodes", "4,8", "--max-seq-len", 128,
                "--save") == 0
    return {"kind": kind, "root": root, "shard": shard, "heads": heads, "model": tiny_hf_dir}


# ---- the whole pipeline ---------------------------------------------------------------------------------
def test_pipeline_each_step_reads_the_last_and_drafts_keep_greedy_output(pipeline, capsys):
    """A regression guard for the README's pipeline (it worked): every record of the distilled shard names the
    target, the heads record their recipe and the fitted trees, and speculative greedy output equals plain."""
    kind, heads = pipeline["kind"], pipeline["heads"]
    records = [json.loads(line) for line in pipeline["shard"].read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(p["id"] for p in _prompts())
    assert len({r["target_fingerprint"] for r in records}) == 1
    cfg = json.loads((heads / "config.json").read_text())
    assert cfg["kind"] == kind and cfg["num_heads"] == 3
    assert cfg["target_fingerprint"] == records[0]["target_fingerprint"]
    assert cfg["extra"]["training"]["model"] == str(pipeline["model"])
    assert set(cfg["extra"]["trees"]) == {"tuned-4", "tuned-8"}
    assert {"tuned-4", "tuned-8"} <= set(cfg["extra"]["tree_search"]["expected_tau"])

    eng = Engine.from_pretrained(str(pipeline["model"]), device="cpu", max_seq_len=128)
    plain = eng.generate(PROMPT, max_new_tokens=24).token_ids
    eng.load_heads(str(heads))
    assert eng.heads.config.kind == kind
    for tree in ("tuned-8", "tuned-4", None):
        r = eng.generate(PROMPT, max_new_tokens=24, speculative=kind, tree=tree)
        assert r.token_ids == plain, tree
    capsys.readouterr()
    common = ("--model", pipeline["model"], "--device", "cpu", "--max-new-tokens", 16, "--max-seq-len", 128, "--json")
    assert _cli("generate", PROMPT, "--heads", heads, "--speculative", kind, "--tree", "tuned-8", *common) == 0
    spec = json.loads(capsys.readouterr().out)
    assert _cli("generate", PROMPT, "--heads", "none", *common) == 0
    assert spec["token_ids"] == json.loads(capsys.readouterr().out)["token_ids"]
    assert spec["speculative"] == kind and spec["stats"]["tree"] == "tuned-8"


# ---- heads of one model loaded on another ---------------------------------------------------------------
def test_heads_on_another_model_are_refused_naming_both_models(pipeline, tmp_path, capsys):
    """Before: 'built for another target: theirs has LM-head fingerprint V300-d64-... the loaded model has
    V300-d64-...': two hashes, and no word of which model the heads want (a forgotten --model loads smollm2)."""
    same_shape = _hf_dir(tmp_path / "other_weights", seed=7)
    narrower = _hf_dir(tmp_path / "narrower", seed=7, hidden_size=32, intermediate_size=64)
    heads, trained = pipeline["heads"], str(pipeline["model"])
    for other in (same_shape, narrower):
        eng = Engine.from_pretrained(str(other), device="cpu", max_seq_len=128)
        with pytest.raises(HeadsMismatchError) as e:
            eng.load_heads(str(heads))
        msg = str(e.value)
        assert f"trained with --model {trained}" in msg and f"the loaded model {other} has" in msg, msg
        # same shapes: maybe the very model converted or quantized, which is another target too
        assert ("converted or quantized copy" in msg) == (other == same_shape)
        assert eng.heads is None
    capsys.readouterr()
    assert _cli("generate", PROMPT, "--model", same_shape, "--device", "cpu", "--heads", heads, "--speculative",
                pipeline["kind"], "--max-new-tokens", 4, "--max-seq-len", 128) == 2
    err = capsys.readouterr().err
    assert f"trained with --model {trained}" in err and f"the loaded model {same_shape} has" in err, err
    assert "converted or quantized copy" in err
    # tree-search without --model (it defaults to smollm2-135m) says which model the heads want
    from conftest import SMOLLM2_AVAILABLE
    if SMOLLM2_AVAILABLE:
        assert _cli("tree-search", "--data", pipeline["shard"], "--heads", heads, "--device", "cpu", "--nodes", 4) == 2
        err = capsys.readouterr().err
        assert f"trained with --model {trained}" in err and "the loaded model smollm2-135m has" in err, err


def test_heads_trained_on_a_handed_target_do_not_claim_the_default_model(tmp_path):
    """train_heads(cfg, target=model) recorded cfg.model's default, smollm2-135m, as the heads' model: a mismatch
    would then send the user to a model the heads never saw."""
    from conftest import greedy_records, random_tiny_model

    from amphista_engine.training.data import ShardWriter
    from amphista_engine.training.trainer import TrainConfig, train_heads
    target = random_tiny_model(seed=0, vocab=64, dim=32, max_len=256)
    with ShardWriter(tmp_path / "s.jsonl") as w:
        for r in greedy_records(target, n=8, answer_len=10):
            w.write(r)
    train_heads(TrainConfig(data=[str(tmp_path / "s.jsonl")], out=str(tmp_path / "h"), num_heads=2, steps=1,
                            batch_tokens=400, progress=False), target=target)
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["extra"]["training"]["model"] is None
    with pytest.raises(HeadsMismatchError) as e:
        load_heads(tmp_path / "h", random_tiny_model(seed=1, vocab=64, dim=32, max_len=256))
    assert "smollm2" not in str(e.value) and "trained with" not in str(e.value)


# ---- prompt files: colliding ids, formats ---------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    return Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128, max_batch_size=8)


def _sharegpt(path: Path, words: str, n=4, bom=False):
    items = [{"conversations": [{"from": "human", "value": f"Tell me about {words} number {i}"},
                                {"from": "gpt", "value": "ok"}]} for i in range(n)]
    path.write_text(("\ufeff" if bom else "") + json.dumps(items), encoding="utf-8")
    return path


def test_a_second_prompt_file_with_colliding_ids_is_refused_not_taken_as_answered(engine, tmp_path):
    """Before: distilling b.json (ShareGPT, no ids) into the shard of a.json answered nothing and reported
    '0 new records, 4 already in shard': b's prompts never got an answer."""
    from amphista_engine.training.distill import distill
    a, b = _sharegpt(tmp_path / "a.json", "apples"), _sharegpt(tmp_path / "b.json", "rockets")
    shard = tmp_path / "shard.jsonl"
    assert distill(a, shard, engine=engine, max_new_tokens=6, progress=False)["written"] == 4
    before = shard.read_bytes()
    with pytest.raises(InputError, match=r"already answers 4 of these prompt id\(s\) for another prompt text "
                                         r"\(first: id 'sharegpt-0-t0', here 'Tell me about rockets number 0'\)"):
        distill(b, shard, engine=engine, max_new_tokens=6, progress=False)
    assert shard.read_bytes() == before
    # the same file again still resumes (its prompts are the ones answered), and a fresh shard takes b
    assert distill(a, shard, engine=engine, max_new_tokens=6, progress=False)["done_before"] == 4
    assert distill(b, tmp_path / "b.jsonl", engine=engine, max_new_tokens=6, progress=False)["written"] == 4


def test_shards_with_colliding_ids_warn_that_answers_are_lost(engine, tmp_path, capsys):
    """Before: training on the shards of two such files dropped the second's records as 'duplicate id', as if they
    were the first's read twice."""
    from amphista_engine.training.data import load_shard
    from amphista_engine.training.distill import distill
    sa, sb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    distill(_sharegpt(tmp_path / "a.json", "apples"), sa, engine=engine, max_new_tokens=6, progress=False)
    distill(_sharegpt(tmp_path / "b.json", "rockets"), sb, engine=engine, max_new_tokens=6, progress=False)
    capsys.readouterr()
    data = load_shard([sa, sb], 300, 128)
    err = capsys.readouterr().err
    assert len(data.sequences) == 4 and data.skipped["duplicate id"] == 4
    assert f"4 record(s) skipped as a duplicate id differ from the record kept under that id (first: id " \
           f"'sharegpt-0-t0' in {sb}; kept: the one in {sa})" in err, err
    load_shard([sa, sa], 300, 128)        # one shard twice: true duplicates, nothing lost
    assert "differ" not in capsys.readouterr().err


def test_prompt_files_with_a_bom_plain_text_or_duplicate_ids(engine, tmp_path):
    from amphista_engine.training.data import read_prompts
    from amphista_engine.training.distill import distill
    bom_jsonl = tmp_path / "bom.jsonl"
    bom_jsonl.write_text("\ufeff" + "".join(json.dumps(p) + "\n" for p in _prompts(3)), encoding="utf-8")
    assert [p.id for p in read_prompts(bom_jsonl)] == ["p0", "p1", "p2"]
    bom_sharegpt = _sharegpt(tmp_path / "bom.json", "dogs", n=2, bom=True)
    assert [p.prompt for p in read_prompts(bom_sharegpt)] == ["Tell me about dogs number 0",
                                                              "Tell me about dogs number 1"]
    assert distill(bom_sharegpt, tmp_path / "d.jsonl", engine=engine, max_new_tokens=4, progress=False)["written"] == 2
    plain = tmp_path / "prompts.txt"
    plain.write_text("What is two plus two?\nWrite a poem about dogs\n")
    with pytest.raises(InputError, match=r"prompts.txt:1: malformed JSON line .*prompt files are JSONL .* or "
                                         r"ShareGPT JSON, not plain text lines"):
        read_prompts(plain)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "x", "prompt": "a"}\n{"id": "y", "prompt": "b"}\n{"id": "x", "prompt": "c"}\n')
    with pytest.raises(InputError, match=r"prompt ids are not unique .*: id 'x' names 2 prompts"):
        read_prompts(dup)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\ufeff\n")
    with pytest.raises(InputError, match="is empty"):
        read_prompts(empty)


# ---- tree-search --save ---------------------------------------------------------------------------------
def test_tree_search_save_never_leaves_a_torn_config(pipeline, tmp_path, monkeypatch):
    """Before: config.json was rewritten in place; a full disk mid-write left half a JSON file, and heads that had
    taken hours to train no longer loaded. Now the heads keep their old config and the error names the file."""
    from amphista_engine.loading import load_model
    from amphista_engine.training.tree_search import tree_search
    heads = tmp_path / "heads"
    shutil.copytree(pipeline["heads"], heads)
    target = load_model(str(pipeline["model"]), dtype=torch.float32, device="cpu", max_seq_len=128).model
    before = (heads / "config.json").read_text()
    real = Path.write_text

    def full_disk(self, text, *a, **k):
        if self.name.endswith("config.json") or ".config.json.tmp" in self.name:
            real(self, text[:len(text) // 2], *a, **k)
            raise OSError(28, "No space left on device")
        return real(self, text, *a, **k)
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(InputError, match=r"--save: cannot write .*config.json: No space left on device"):
        tree_search(pipeline["shard"], heads, nodes=(4, 6), save=True, target=target, prefix="again")
    monkeypatch.undo()
    assert (heads / "config.json").read_text() == before
    assert [p.name for p in heads.iterdir() if "tmp" in p.name] == []
    load_heads(heads, target)
    # saved twice in a row: the second save changes nothing
    tree_search(pipeline["shard"], heads, nodes=(4, 6), save=True, target=target, prefix="again")
    once = (heads / "config.json").read_text()
    tree_search(pipeline["shard"], heads, nodes=(4, 6), save=True, target=target, prefix="again")
    assert (heads / "config.json").read_text() == once
    assert {"again-4", "again-6", "tuned-4", "tuned-8"} <= set(load_heads(heads, target).config.extra["trees"])


def test_tree_sizes_the_heads_cannot_hold_are_named_once(tmp_path):
    """Before: 'tree sizes [16, 32, 63, 16, 32, 63]' (the default --dynamic repeats --nodes) and no way out named."""
    from conftest import random_tiny_model

    from amphista_engine.training.tree_search import tree_search
    target = random_tiny_model(seed=0, vocab=64, dim=32, max_len=256)
    save_heads(random_heads("amphista", target, num_heads=1), tmp_path / "h1")
    with pytest.raises(InputError, match=r"tree sizes \[16, 32, 63\]: 1 heads x top-10 hold at most 11 nodes; pass "
                                         r"smaller --nodes \(and --dynamic\), e.g. --nodes 8"):
        tree_search(tmp_path / "none.jsonl", tmp_path / "h1", nodes=(16, 32, 63), dynamic=(16, 32, 63), target=target)


def test_a_relative_model_path_is_recorded_absolute(pipeline, tmp_path, monkeypatch):
    """The heads' record of their --model named a relative path as typed: from another folder it named nothing."""
    if pipeline["kind"] != "amphista":
        pytest.skip("one kind is enough")
    model = Path(pipeline["model"])
    monkeypatch.chdir(model.parent)
    assert _cli("train", "--data", pipeline["shard"], "--out", tmp_path / "h", "--model", model.name, "--device",
                "cpu", "--kind", "amphista", "--num-heads", 2, "--steps", 1, "--batch-tokens", 512, "--max-seq-len",
                128, "--eval-frac", 0.2) == 0
    recorded = json.loads((tmp_path / "h" / "config.json").read_text())["extra"]["training"]["model"]
    assert Path(recorded).is_absolute() and Path(recorded) == model.resolve()
