"""QA of the Medusa heads path as a user meets it (2026-12-06): shipped, saved, public and trained Medusa heads loaded
into an Engine and decoded with.

Bugs pinned: Medusa heads without ResBlocks (medusa_layers=0: per-head LM heads only, what a public
`medusa_lm_head.pt` of that layout loads as) failed Engine.load_heads on a 4-bit engine with a bare "max() arg is
an empty sequence" (HeadResBlocks.use_codes); fresh Medusa-style heads with their own LM heads and a draft vocabulary
(new_heads / random_heads with per_head_lm_head=True, draft_vocab_size=N) raised torch's "expanded size" RuntimeError
(the full [V, d] head copied into [K, N, d]); `train --kind amphista --init-from MEDUSA_DIR` named, beside the kind,
an aeb_heads mismatch that "no train flag sets", though passing --kind medusa is all it takes.
"""
from __future__ import annotations

import pytest
import torch

from amphista_engine.errors import ConfigError
from amphista_engine.heads import load_heads, load_medusa_checkpoint, new_heads, random_heads, save_heads
from conftest import train_cfg

pytestmark = pytest.mark.usefixtures("one_thread_module")
PROMPT = [5, 17, 42, 9, 33, 7]


@pytest.fixture(scope="module")
def q4_engine(tiny_hf_dir):
    from amphista_engine import Engine
    return Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128, quant="q4")


def _assert_lossless(engine, tree="chain-2"):
    plain = engine.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids
    spec = engine.generate(PROMPT, max_new_tokens=16, ignore_eos=True, speculative="medusa", tree=tree)
    assert spec.token_ids == plain
    assert spec.stats.tau >= 1


def test_medusa_heads_without_resblocks_load_on_a_4bit_engine(q4_engine, tmp_path):
    heads = random_heads("medusa", q4_engine.model, num_heads=3, medusa_layers=0, per_head_lm_head=True)
    # as a module, and as a directory saved from it
    assert q4_engine.load_heads(heads) is not None
    _assert_lossless(q4_engine)
    q4_engine.load_heads(str(save_heads(heads, tmp_path / "h")))
    assert q4_engine.heads.config.medusa_layers == 0
    _assert_lossless(q4_engine, tree="dynamic-4")


def test_public_medusa_checkpoint_of_lm_heads_only_loads_on_a_4bit_engine(q4_engine, tmp_path):
    """A medusa_lm_head.pt whose heads are a Linear(d, V) each ({k}.0.weight), no ResBlock."""
    V, d = q4_engine.config.vocab_size, q4_engine.config.dim
    g = torch.Generator().manual_seed(0)
    torch.save({f"medusa_head.{k}.0.weight": torch.randn(V, d, generator=g) * 0.1 for k in range(2)},
               tmp_path / "medusa_lm_head.pt")
    heads = load_medusa_checkpoint(tmp_path, q4_engine.model)
    assert heads.config.medusa_layers == 0 and heads.config.per_head_lm_head
    q4_engine.load_heads(heads)
    _assert_lossless(q4_engine)


def test_own_lm_heads_with_a_draft_vocabulary_start_from_those_tokens_rows(q4_engine, tmp_path):
    from amphista_engine.heads.checkpoint import lm_head_rows
    target = q4_engine.model
    heads = new_heads("medusa", target, num_heads=2, per_head_lm_head=True, draft_vocab_size=40)
    rows = lm_head_rows(target, heads.draft_vocab)
    assert heads.lm_heads.shape == (2, 40, target.config.dim)
    for k in range(2):
        torch.testing.assert_close(heads.lm_heads[k].float(), rows.float())
    r = random_heads("medusa", target, num_heads=2, per_head_lm_head=True, draft_vocab_size=40, seed=3)
    q4_engine.load_heads(str(save_heads(r, tmp_path / "dv")))
    assert q4_engine.heads.config.draft_vocab_size == 40
    _assert_lossless(q4_engine)


def test_warm_start_across_kinds_names_the_kind_only(target, shard, tmp_path):
    from amphista_engine.training.trainer import train_heads
    medusa = tmp_path / "medusa"
    train_heads(train_cfg(shard, medusa, kind="medusa"), target=target)
    assert load_heads(medusa, target).config.kind == "medusa"
    with pytest.raises(ConfigError) as e:
        train_heads(train_cfg(shard, tmp_path / "amph", kind="amphista", init_from=str(medusa)), target=target)
    msg = str(e.value)
    assert "kind: 'medusa' vs 'amphista' (pass --kind medusa)" in msg, msg
    assert "aeb_heads" not in msg and "no train flag" not in msg, msg
    # and the other way round
    amph = tmp_path / "amph_src"
    train_heads(train_cfg(shard, amph, kind="amphista"), target=target)
    with pytest.raises(ConfigError) as e:
        train_heads(train_cfg(shard, tmp_path / "med2", kind="medusa", init_from=str(amph)), target=target)
    assert "kind: 'amphista' vs 'medusa' (pass --kind amphista)" in str(e.value)
    assert "no train flag" not in str(e.value)


def test_heads_whose_adaptation_fails_leave_the_loaded_ones(q4_engine, monkeypatch):
    """Engine.load_heads made new heads the engine's before adapting their layers (4-bit codes): when that raised, the
    half-adapted heads stayed loaded and the next speculative call decoded with them. Now the old heads stay."""
    old = q4_engine.load_heads(random_heads("medusa", q4_engine.model, num_heads=2))
    new = random_heads("medusa", q4_engine.model, num_heads=3)

    def fail(setup, module):
        raise ConfigError("adaptation failed")
    monkeypatch.setattr(type(q4_engine.linears), "apply", fail)     # a frozen dataclass: patched on its class
    with pytest.raises(ConfigError, match="adaptation failed"):
        q4_engine.load_heads(new)
    monkeypatch.undo()
    assert q4_engine.heads is old
    _assert_lossless(q4_engine)
