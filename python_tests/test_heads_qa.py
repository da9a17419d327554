"""Heads checkpoints brought from elsewhere: damaged or varied config.json / model.safetensors are refused with
an AmphistaError that names the file and the field (never a raw torch error, never silently used), fitted trees
in the config are checked at load, and Engine.load_heads takes None / "none" to unload and names a bad type."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from amphista_engine import AmphistaError
from amphista_engine.errors import ConfigError, InputError, ModelLoadError
from amphista_engine.heads import HeadsConfig, load_heads, random_heads, save_heads
from conftest import edited_copy, needs_smollm2, random_tiny_model


@pytest.fixture(scope="module")
def target():
    return random_tiny_model()


@pytest.fixture(scope="module")
def saved(target, tmp_path_factory):
    """Random heads of both kinds (the Amphista ones with a draft vocabulary and a fitted tree) saved in fp32."""
    root = tmp_path_factory.mktemp("heads")
    for kind in ("amphista", "medusa"):
        heads = random_heads(kind, target, num_heads=3, draft_vocab_size=48 if kind == "amphista" else 0)
        if kind == "amphista":
            heads.set_draft_vocab(torch.randperm(64, generator=torch.Generator().manual_seed(0))[:48])
        heads.config.extra = {"trees": {"tuned-4": [[0], [1], [0, 0]]},
                              "tree_search": {"decoding_tau": {"tuned-4": 1.5}}}
        save_heads(heads, root / kind, dtype="float32")
    return root


def variant(saved, tmp_path, kind="amphista", cfg=None, state=None):
    """A copy of the saved heads with config.json fields replaced (cfg) and tensors changed (state(dict))."""
    return edited_copy(saved / kind, tmp_path / f"{kind}-variant", cfg, state)


# ---- config.json fields -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, bad, field", [
    ("amphista", dict(num_heads=True), "num_heads"),             # was taken as 1 head
    ("amphista", dict(stage_of_head="ab"), "stage_of_head"),     # was a raw ValueError from int('a')
    ("amphista", dict(stage_of_head=[0.5, 0, 1]), "stage_of_head"),   # was truncated to stage 0
    ("medusa", dict(resblock_bias="no"), "resblock_bias"),       # "no" is truthy: was a silent yes
    ("medusa", dict(per_head_lm_head="yes"), "per_head_lm_head"),
    ("medusa", dict(medusa_layers="1"), "medusa_layers"),        # was "'<' not supported ..." naming no field
    ("amphista", dict(n_heads="4"), "n_heads"),
    ("amphista", dict(head_dim="16"), "head_dim"),
    ("amphista", dict(max_position_embeddings="x"), "max_position_embeddings"),   # was accepted
    ("amphista", dict(version="x"), "version"),                  # was accepted
    ("amphista", dict(version=99), "version 99 is newer"),
    ("medusa", dict(norm_eps="x"), "norm_eps"),                  # medusa builds no ModelConfig: was accepted
    ("medusa", dict(rope_scaling=[1]), "rope_scaling"),
    ("amphista", dict(target_fingerprint=5), "target_fingerprint"),
    ("amphista", dict(extra=None), "extra must be an object"),   # was an AttributeError at generate
    ("amphista", dict(extra=[1]), "extra must be an object"),
])
def test_config_fields_wrongly_typed_are_named(target, kind, bad, field):
    with pytest.raises(ConfigError, match=field):
        HeadsConfig.for_target(target.config, kind=kind, **{"num_heads": 3, **bad})


def test_config_errors_name_the_file(saved, tmp_path, target):
    d = variant(saved, tmp_path, cfg=dict(kind="eagle"))
    with pytest.raises(ConfigError, match=r"config\.json: .*kind must be one of"):
        load_heads(d, target)
    (d / "config.json").write_bytes(b"\xff\xfe{")                # not UTF-8: was a raw UnicodeDecodeError
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        load_heads(d, target)


def test_model_checkpoint_given_as_heads_is_named(saved, tmp_path, target):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "vocab_size": 64}))
    shutil.copy(saved / "medusa" / "model.safetensors", d / "model.safetensors")
    with pytest.raises(ModelLoadError, match="holds a model checkpoint .*not drafting heads"):
        load_heads(d, target)


# ---- model.safetensors tensors ------------------------------------------------------------------------------
def test_weights_of_wrong_dtype_or_not_finite_are_refused(saved, tmp_path, target):
    d = variant(saved, tmp_path, state=lambda s: s.update(pos_emb=torch.zeros_like(s["pos_emb"], dtype=torch.int32)))
    with pytest.raises(ConfigError, match=r"model\.safetensors: tensor pos_emb has dtype torch.int32"):
        load_heads(d, target)     # was a raw RuntimeError from load_state_dict
    shutil.rmtree(d)
    d = variant(saved, tmp_path, state=lambda s: s["pos_emb"].view(-1).__setitem__(3, float("nan")))
    with pytest.raises(ConfigError, match="tensor pos_emb holds NaN"):
        load_heads(d, target)     # was loaded: every draft garbage


def test_draft_vocab_ids_must_be_integers(saved, tmp_path, target):
    def fractional(s):
        s["draft_vocab"] = s["draft_vocab"].float() + 0.5
    d = variant(saved, tmp_path, state=fractional)
    with pytest.raises(ConfigError, match=r"model\.safetensors: bad draft_vocab tensor: .*must be integers"):
        load_heads(d, target)     # was truncated silently to other token ids
    heads = load_heads(saved / "amphista", target)
    with pytest.raises(ConfigError, match="must be integers"):
        heads.set_draft_vocab(heads.draft_vocab.float() + 0.5)
    # int32 ids are fine, held as int64 like the saved ones
    shutil.rmtree(d)
    d = variant(saved, tmp_path, state=lambda s: s.update(draft_vocab=s["draft_vocab"].int()))
    loaded = load_heads(d, target)
    assert loaded.draft_vocab.dtype == torch.long and torch.equal(loaded.draft_vocab, heads.draft_vocab)


# ---- fitted trees in config.json extra ----------------------------------------------------------------------
@pytest.mark.parametrize("trees, message", [
    ({"tuned-4": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]},
     r"extra.trees\['tuned-4'\] is 4 deep but the heads draft only 3"),
    ({"tuned-4": [[0], [-1]]}, "negative rank"),
    ({"tuned-4": 5}, "must be a list of rank paths"),
    ({"tuned-4": "tree-16"}, "must be a list of rank paths"),    # was followed as an alias of tree-16
    ({"tuned-4": [[0], [12]]}, "rank 12; ranks must be below 10"),
    ({"tuned-4": [[0], [1, 0]]}, "lacks its prefix"),
    ({"tuned-4": []}, "has no paths"),
    ({"tree-16": [[0]]}, "would shadow a built-in tree"),        # was used in place of the built-in tree-16
    ({"dynamic-8": [[0]]}, "would shadow"),
    ([[0]], "extra.trees must map tree names"),
])
def test_malformed_fitted_trees_are_refused_at_load(saved, tmp_path, target, trees, message):
    d = variant(saved, tmp_path, cfg=lambda c: {"extra": {**c["extra"], "trees": trees}})
    with pytest.raises(ConfigError, match=r"config\.json: .*" + message):
        load_heads(d, target)     # were all accepted, then failed (or shadowed) only when decoding on them


@pytest.mark.parametrize("tau", ["y", float("inf"), 0.5], ids=["string", "inf", "below-1"])
def test_malformed_tree_search_record_is_refused(saved, tmp_path, target, tau):
    """A string was a raw ValueError from float() in speculation_check; Infinity (JSON reads it) or a tau below 1
    (tokens per forward) made the auto check's verdict meaningless."""
    d = variant(saved, tmp_path, cfg=lambda c: {"extra": {**c["extra"], "tree_search": {"decoding_tau": {"x": tau}}}})
    with pytest.raises(ConfigError, match="extra.tree_search.decoding_tau must map tree names to finite numbers >= 1"):
        load_heads(d, target)


# ---- through the engine -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_and_heads(tiny_hf_dir, tmp_path_factory):
    from amphista_engine import Engine
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=128)
    root = tmp_path_factory.mktemp("engine_heads")
    heads = random_heads("amphista", engine.model, num_heads=3, seed=1)
    heads.config.extra = {"trees": {"tuned-4": [[0], [1], [0, 0]], "tuned-6": [[0], [1], [0, 0], [0, 1], [0, 0, 0]]}}
    save_heads(heads, root / "amphista", dtype="float32")
    save_heads(heads, root / "amphista-fp16", dtype="float16")
    return engine, heads, root


def test_engine_load_heads_none_unloads_and_bad_types_are_named(engine_and_heads):
    engine, _, root = engine_and_heads
    engine.load_heads(str(root / "amphista"))
    assert engine.load_heads(None) is None and engine.heads is None     # was a raw TypeError
    engine.load_heads(root / "amphista")
    assert engine.load_heads("none") is None and engine.heads is None   # as --heads none; was "path not found"
    with pytest.raises(InputError, match="needs drafting heads"):
        engine.generate("hello world", max_new_tokens=2, speculative="amphista")
    assert len(engine.generate("hello world", max_new_tokens=2).token_ids) == 2
    with pytest.raises(InputError, match="heads must be a heads directory.*got int 5"):
        engine.load_heads(5)                                             # was a raw TypeError
    with pytest.raises(InputError, match="empty string"):
        engine.load_heads("")                                            # was "heads directory . lacks config.json"
    engine.load_heads(root / "amphista")
    with pytest.raises(AmphistaError):
        engine.load_heads(root / "nowhere")
    assert engine.heads is not None                                      # a failed load keeps the loaded heads


def test_engine_roundtrip_every_carried_tree_and_dtypes(engine_and_heads):
    """save_heads (what `amphista train` writes) -> Engine.load_heads: the same drafts as the heads in memory, on
    every tree they carry; fp16 weights on disk draft the same up to rounding; output stays the target's."""
    engine, heads, root = engine_and_heads
    plain = engine.generate("hello world", max_new_tokens=12).token_ids
    assert len(plain) == 12
    runs = {}
    for label, source in (("memory", heads), ("fp32", str(root / "amphista")), ("fp16", str(root / "amphista-fp16"))):
        engine.load_heads(source)
        for tree in sorted(engine.heads.config.extra["trees"]) + ["chain-2"]:
            r = engine.generate("hello world", max_new_tokens=12, speculative="amphista", tree=tree)
            assert r.token_ids == plain and r.stats.extra["tree"] == tree
            runs[label, tree] = r.stats.accept_hist
    for tree in ("tuned-4", "tuned-6", "chain-2"):
        assert runs["fp32", tree] == runs["memory", tree]
    loaded = load_heads(root / "amphista-fp16", engine.model, dtype=torch.float32)
    ref = load_heads(root / "amphista", engine.model, dtype=torch.float32)
    for (name, a), b in zip(loaded.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name


@pytest.mark.parametrize("kind", ["amphista", "medusa"])
def test_heads_load_on_a_quantized_copy_of_their_model_and_not_on_another(tmp_path, kind):
    """Heads keep rows of the LM head they were trained with: on the same model with its weights rounded (what a
    4-bit GGUF of it holds: ~10% relative L2 on the LM head) they load with a warning, and speculative greedy output
    is still the plain output; on another model of the same shapes, or a copy whose rows moved, they are refused
    as before; heads saved without those rows (older checkpoints) keep the exact fingerprint rule."""
    from safetensors.torch import load_file, save_file

    from amphista_engine.errors import HeadsMismatchError
    from amphista_engine.heads.checkpoint import SKETCH_KEY
    target = random_tiny_model(seed=3)
    saved = save_heads(random_heads(kind, target, num_heads=3, seed=1), tmp_path / "h")
    assert SKETCH_KEY in load_file(str(saved / "model.safetensors"))

    def copy_with(output_weight):
        other = random_tiny_model(seed=3)
        with torch.no_grad():
            other.output.weight.copy_(output_weight)
        return other
    w = target.output.weight.detach()
    g = torch.Generator().manual_seed(0)
    rounded = copy_with(w + torch.randn(w.shape, generator=g) * w.std() * 0.1)
    with pytest.warns(UserWarning, match="converted or quantized copy"):
        heads = load_heads(saved, rounded)
    assert len(heads.state_dict()) and SKETCH_KEY not in heads.state_dict()

    from test_speculative import plain_ids, spec_ids
    prompt = [1, 5, 9, 2, 7]
    assert spec_ids(rounded, heads, "chain-3", prompt, 12, eos=[])[0] == plain_ids(rounded, prompt, 12, eos=[])[0]
    for other in (random_tiny_model(seed=4), copy_with(w.roll(1, 0))):
        with pytest.raises(HeadsMismatchError, match=r"built for another target.* differ from theirs by \d+%"):
            load_heads(saved, other)
    state = load_file(str(saved / "model.safetensors"))
    del state[SKETCH_KEY]
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(HeadsMismatchError, match="keep no LM-head rows"):
        load_heads(saved, rounded)
    assert load_heads(saved, target) is not None


@needs_smollm2
def test_shipped_heads_load_on_a_4bit_requantized_smollm2():
    """The shipped heads keep their model's LM-head rows: SmolLM2 with its LM head rounded to Q4_0 (another GGUF
    of the same model) takes them, with a warning; greedy output stays the plain output."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from amphista_engine import Engine
    from amphista_engine.heads.checkpoint import CHECKPOINT_FINGERPRINT
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=256, quant="none")
    head = engine.model.output
    with torch.no_grad():
        w = head.weight.numpy()
        head.weight.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, Q.Q4_0), Q.Q4_0)))
    delattr(head, CHECKPOINT_FINGERPRINT)            # the values of another file: fingerprinted afresh
    with pytest.warns(UserWarning, match=r"differs from by 1\d\.\d%.*converted or quantized copy"):
        engine.load_heads("default")
    plain = engine.generate("Name two planets.", max_new_tokens=24)
    spec = engine.generate("Name two planets.", max_new_tokens=24, speculative="amphista")
    assert spec.token_ids == plain.token_ids and spec.stats.tau > 1.2
