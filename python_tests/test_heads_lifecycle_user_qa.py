"""QA as a user who trains, saves, fits trees for, loads and shares drafting heads (2026-12-05).

Bugs pinned: one heads module loaded into two engines (`engine_b.load_heads(engine_a.heads)`) was rebound to the
second engine's model and cast by neither, and each engine's runs reset the other's SAL cache, so a chat's kept prefix
was never reused on either (output stayed right); heads taken on a converted or quantized copy of their model (kept
LM-head rows, SKETCH_TOLERANCE) could not be saved again (the copy no longer took the saved heads), handed back to an
engine as a module (eval re-loads its modules: HeadsMismatchError), nor warm-start `train --init-from` on that copy;
`tree-search --save` run again left the earlier run's PREFIX-N trees without a recorded tau, and heads retrained and
saved again (save_heads keeps the config's extra) or a model.safetensors replaced by hand kept trees and taus fitted
to the old weights, which speculative="auto" trusted; save_heads (and `train --out --overwrite`, which the refusal of
an existing model.safetensors suggests) overwrote a model checkpoint's folder; a public Medusa folder
(medusa_lm_head.pt) was said to "lack" files; `tree-search --save` with the heads named by their config.json
failed once the search was done.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.errors import ConfigError, HeadsMismatchError, ModelLoadError
from amphista_engine.heads import load_heads, new_heads, random_heads, save_heads

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


# ---- one heads module, two engines ----------------------------------------------------------------------
def test_one_heads_module_in_two_engines_keeps_each_engines_chat_prefix(tiny_hf_dir):
    """Engines of other max_seq_len and dtype share a heads module; their chats alternate turns with reuse_prefix.
    Before: B ran A's very module (rebound to B's model, fp32 in a bf16 engine) and each run reset the other's SAL
    cache epoch, so no turn reused its history (prompt_tokens_reused never set); greedy output was right."""
    a = _quiet(Engine.from_pretrained, str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=400)
    b = _quiet(Engine.from_pretrained, str(tiny_hf_dir), device="cpu", dtype="bf16", max_seq_len=512)
    heads = random_heads("amphista", a.model, num_heads=3, seed=1)
    assert a.load_heads(heads) is heads                       # one engine: the module itself, as before
    mine = b.load_heads(a.heads)
    assert mine is b.heads and mine is not heads and a.heads is heads
    assert heads._bound[0] is a.model.tok_embeddings and mine._bound[0] is b.model.tok_embeddings
    assert mine.norm.weight.dtype == torch.bfloat16 and heads.norm.weight.dtype == torch.float32
    assert b.load_heads(b.heads) is mine                      # its own heads again: no new copy
    turns, reused = {a: [], b: []}, {a: [], b: []}
    for text in ("hi", "ok", "yes"):
        for eng in (a, b):
            turns[eng].append({"role": "user", "content": text})
            r = eng.generate(turns[eng], max_new_tokens=5, speculative="amphista", reuse_prefix=True)
            reused[eng].append(r.stats.extra.get("prompt_tokens_reused"))
            assert r.token_ids == eng.generate(turns[eng], max_new_tokens=5).token_ids
            turns[eng].append({"role": "assistant", "content": r.text})
            # the plain check above rewrote the cache: redo the turn so the next one can reuse it
            eng.generate(turns[eng][:-1], max_new_tokens=5, speculative="amphista", reuse_prefix=True)
    for eng in (a, b):
        assert reused[eng][0] is None and all(n and n > 50 for n in reused[eng][1:]), reused


# ---- heads on a converted or quantized copy of their model ------------------------------------------------
@pytest.fixture(scope="module")
def copy_setup(tiny_hf_dir, tmp_path_factory):
    """(engine on tiny_hf_dir, engine on a copy whose LM head is off by ~5% (as a requantized GGUF), heads dir)."""
    from conftest import edited_copy
    root = tmp_path_factory.mktemp("copy")

    def nudge(t):
        w = t["lm_head.weight"]
        t["lm_head.weight"] = w + torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std() * 0.05
    edited_copy(Path(tiny_hf_dir), root / "q", tensors=nudge)
    orig = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    quant = Engine.from_pretrained(str(root / "q"), device="cpu", dtype="fp32", max_seq_len=256)
    return orig, quant, save_heads(random_heads("amphista", orig.model, num_heads=3, seed=2), root / "h")


def test_heads_taken_on_a_converted_copy_save_and_load_again(copy_setup, tmp_path):
    """Before: re-saved from the copy, the heads kept no LM-head rows ('these heads keep no LM-head rows'), and the
    engine refused its own heads handed back as a module (HeadsMismatchError), as `amphista eval` hands them."""
    orig, quant, heads_dir = copy_setup
    with pytest.warns(UserWarning, match="converted or quantized copy"):
        heads = quant.load_heads(str(heads_dir))
    with pytest.warns(UserWarning, match="converted or quantized copy"):
        assert quant.load_heads(heads) is heads
    save_heads(heads, tmp_path / "again")
    with pytest.warns(UserWarning, match="converted or quantized copy"):
        again = quant.load_heads(str(tmp_path / "again"))
    assert again.config.target_fingerprint == json.loads((heads_dir / "config.json").read_text())["target_fingerprint"]
    with warnings.catch_warnings():                                   # and still the exact model's, silently
        warnings.simplefilter("error")
        assert orig.load_heads(str(tmp_path / "again")) is not None
    prompt = "Hello number 3, the quick brown fox"
    assert quant.generate(prompt, max_new_tokens=12, speculative="amphista").token_ids == \
        quant.generate(prompt, max_new_tokens=12).token_ids
    from conftest import random_tiny_model
    stranger = random_tiny_model(seed=5, vocab=300, dim=64, inter=128)   # the same shapes, another LM head
    with pytest.raises(HeadsMismatchError, match="built for another target"):
        quant.load_heads(random_heads("amphista", stranger, num_heads=3))


def test_init_from_heads_taken_on_a_converted_copy(copy_setup):
    """`train --init-from DIR` on the copy: load_heads took the source heads for it, then warm_start refused them
    ('differ from the requested ones in target_fingerprint')."""
    from amphista_engine.training.warm_start import warm_start
    _, quant, heads_dir = copy_setup
    source = _quiet(load_heads, heads_dir, quant.model, dtype=torch.float32)
    fresh = new_heads("amphista", quant.model, num_heads=3, dtype=torch.float32)
    assert warm_start(fresh, source) == []
    assert torch.equal(fresh.pos_emb, source.pos_emb)
    with pytest.raises(ConfigError, match="target_fingerprint"):      # a source bound elsewhere is still checked
        warm_start(new_heads("amphista", quant.model, num_heads=3, dtype=torch.float32),
                   _quiet(load_heads, heads_dir, copy_setup[0].model, dtype=torch.float32))


# ---- tree-search --save and the weights the trees were fitted to -------------------------------------------
@pytest.fixture(scope="module")
def tree_setup(tmp_path_factory):
    from conftest import greedy_records, random_tiny_model

    from amphista_engine.training.data import ShardWriter
    root = tmp_path_factory.mktemp("trees")
    target = random_tiny_model(seed=0, vocab=64, dim=32, max_len=256)
    with ShardWriter(root / "s.jsonl") as w:
        for r in greedy_records(target, n=12, answer_len=12):
            w.write(r)
    save_heads(random_heads("amphista", target, num_heads=3, seed=1), root / "h")
    return target, root / "s.jsonl", root / "h"


def _fit(tree_setup, heads_dir, nodes, **kw):
    from amphista_engine.training.tree_search import tree_search
    target, shard, _ = tree_setup
    return tree_search(shard, heads_dir, nodes=nodes, save=True, target=target, eval_frac=0.5, dynamic=(),
                       compare=(), **kw)


def _extra(heads_dir, target):
    return _quiet(load_heads, heads_dir, target).config.extra


def test_tree_search_save_again_replaces_its_family(tree_setup, tmp_path, capsys):
    """Before: a second --save of the tuned trees with other sizes kept the first run's tuned-8 beside a record that
    no longer named it (another prefix's family stays); heads named by their config.json were searched, then the
    save failed on 'HEADS/config.json/config.json'."""
    target, _, src = tree_setup
    heads_dir = Path(shutil.copytree(src, tmp_path / "h"))
    _fit(tree_setup, heads_dir, (4, 8))
    _fit(tree_setup, heads_dir, (6,), prefix="mix")
    capsys.readouterr()
    _fit(tree_setup, heads_dir / "config.json", (4,))     # named by its config.json, as load_heads takes heads
    assert "dropped tuned-8" in capsys.readouterr().err
    extra = _extra(heads_dir, target)
    assert set(extra["trees"]) == {"tuned-4", "mix-6"}
    assert set(extra["tree_search"]["decoding_tau"]) == {"tuned-4"} and "mix-6" in extra["tree_search_mix"]["decoding_tau"]


def test_trees_fitted_to_other_weights_are_dropped(tree_setup, tmp_path):
    """Heads loaded, trained further and saved again kept their config's trees and taus (speculative='auto' read
    them); so did a record written before records named their weights (the shipped heads' kind), and a folder whose
    model.safetensors was replaced by hand."""
    from amphista_engine.speculation_check import expected_tau
    target, _, src = tree_setup
    heads_dir = Path(shutil.copytree(src, tmp_path / "h"))
    _fit(tree_setup, heads_dir, (4,))
    _fit(tree_setup, heads_dir, (6,), prefix="mix")
    cfg = json.loads((heads_dir / "config.json").read_text())
    cfg["extra"]["tree_search_mix"].pop("weights", None)      # as records written before they named their weights
    (heads_dir / "config.json").write_text(json.dumps(cfg))

    heads = load_heads(heads_dir, target)
    assert expected_tau(heads.config, "mix-6") and expected_tau(heads.config, "tuned-4")
    save_heads(heads, tmp_path / "same")                       # unchanged weights: the trees stay
    assert {"tuned-4", "mix-6"} <= set(_extra(tmp_path / "same", target)["trees"])
    with torch.no_grad():                                      # "trained further"
        heads.pos_emb.add_(0.5)
    with pytest.warns(UserWarning, match=r"dropped the fitted trees mix-6, tuned-4 .*fitted to other weights"):
        save_heads(heads, heads_dir)
    extra = _extra(heads_dir, target)
    assert "trees" not in extra and not any(k.startswith("tree_search") for k in extra)

    _fit(tree_setup, heads_dir, (4,))                          # refitted, then the weights replaced by hand
    shutil.copy(tmp_path / "same" / "model.safetensors", heads_dir / "model.safetensors")
    with pytest.warns(UserWarning, match="holds other weights than those they were fitted to"):
        extra = load_heads(heads_dir, target).config.extra
    assert "trees" not in extra and "tree_search" not in extra


# ---- folders ------------------------------------------------------------------------------------------------
def test_heads_are_not_saved_over_a_model_checkpoint(tiny_hf_dir, tmp_path):
    """save_heads(heads, MODEL_DIR) replaced the model's config.json and model.safetensors; `train --out MODEL_DIR`
    refused only for lack of --overwrite, which it suggested."""
    from conftest import greedy_records, random_tiny_model

    from amphista_engine.training.data import ShardWriter
    from amphista_engine.training.trainer import TrainConfig, train_heads
    model_dir = Path(shutil.copytree(tiny_hf_dir, tmp_path / "model"))
    before = (model_dir / "model.safetensors").read_bytes()
    eng = Engine.from_pretrained(str(model_dir), device="cpu", max_seq_len=64)
    with pytest.raises(ConfigError, match="holds a model checkpoint.*folder of their own"):
        save_heads(random_heads("medusa", eng.model, num_heads=2), model_dir)
    target = random_tiny_model(seed=0, vocab=64, dim=32, max_len=256)
    with ShardWriter(tmp_path / "s.jsonl") as w:
        for r in greedy_records(target, n=4, answer_len=6):
            w.write(r)
    with pytest.raises(ConfigError, match="holds a model checkpoint"):
        train_heads(TrainConfig(data=[str(tmp_path / "s.jsonl")], out=str(model_dir), num_heads=2, steps=1,
                                batch_tokens=400, overwrite=True, progress=False), target=target)
    assert (model_dir / "model.safetensors").read_bytes() == before and "model_type" in json.loads(
        (model_dir / "config.json").read_text())


def test_a_public_medusa_folder_is_named_as_such(tiny_amphista_engine, tmp_path):
    """Before: 'heads directory ... lacks model.safetensors' for FasterDecoding's layout (config.json +
    medusa_lm_head.pt), with no word of load_medusa_checkpoint."""
    folder = tmp_path / "medusa-vicuna"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"medusa_num_heads": 5, "medusa_num_layers": 1}))
    torch.save({}, folder / "medusa_lm_head.pt")
    for path in (folder, folder / "medusa_lm_head.pt"):
        with pytest.raises(ModelLoadError, match="public Medusa heads.*load_medusa_checkpoint"):
            tiny_amphista_engine.load_heads(str(path))


def test_an_fp16_save_refuses_weights_fp16_cannot_hold(tmp_path):
    """fp16 holds magnitudes up to 65504: heads with a larger weight were saved with inf in it (every draft NaN
    after loading). The save now refuses by name and writes nothing; bf16 (the default) keeps it."""
    import torch

    from amphista_engine.errors import ConfigError
    from amphista_engine.heads import load_heads, random_heads, save_heads
    from conftest import random_tiny_model
    model = random_tiny_model(seed=3)
    heads = random_heads("medusa", model, num_heads=2, seed=1)
    name, w = next((k, v) for k, v in heads.named_parameters() if v.dim() >= 2)
    with torch.no_grad():
        w.view(-1)[0] = 1e5
    with pytest.raises(ConfigError, match=f"{name} reaches 1e\\+05, past fp16's largest value"):
        save_heads(heads, tmp_path / "fp16", dtype="fp16")
    assert not (tmp_path / "fp16").exists()
    save_heads(heads, tmp_path / "bf16")
    back = load_heads(tmp_path / "bf16", model)
    assert torch.isfinite(dict(back.named_parameters())[name]).all()
