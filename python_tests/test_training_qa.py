"""QA of making drafting heads: distill/train/tree-search flags and files a user gets wrong, Ctrl-C during training,
and the held-out numbers training and tree-search report. Tiny random target: the whole file runs in seconds."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from amphista_engine.errors import ConfigError, InputError
from amphista_engine.training.data import ShardWriter
from amphista_engine.training.trainer import TrainConfig, train_heads

from conftest import greedy_records, random_tiny_model

K = 3


@pytest.fixture(scope="module")
def target():
    return random_tiny_model(seed=0, vocab=64, dim=32, max_len=256)


def _write(path, records):
    with ShardWriter(path) as w:
        for r in records:
            w.write(r)
    return path


@pytest.fixture(scope="module")
def shard(tmp_path_factory, target):
    return _write(tmp_path_factory.mktemp("shard") / "tiny.jsonl", greedy_records(target, 24, 6, 20))


def cfg(shard, out, **kw):
    base = dict(data=[str(shard)], out=str(out), kind="amphista", num_heads=K, steps=6, batch_tokens=200,
                lr=3e-3, eval_frac=0.2, progress=False, seed=3, loss_positions=40)
    base.update(kw)
    return TrainConfig(**base)


def _same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(shard, target, tmp_path_factory):
    """The 6-step run that interrupted and resumed runs must equal."""
    return train_heads(cfg(shard, tmp_path_factory.mktemp("full") / "h"), target=target)["heads"].state_dict()


# ---- numbers that are not numbers ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, flag", [
    (dict(lr=float("nan")), "--lr"),                  # was torch's ValueError traceback
    (dict(lr=float("inf")), "--lr"),                  # trained to NaN weights, saved, then unloadable
    (dict(weight_decay=float("nan")), "--weight-decay"),
    (dict(clip=float("nan")), "--clip"),
    (dict(mse_weight=float("inf")), "--mse-weight"),
    (dict(steps=None, epochs=float("nan")), "--epochs"),   # was "cannot convert float NaN to integer"
    (dict(steps=None, epochs=float("inf")), "--epochs"),
])
def test_train_refuses_non_finite_numbers(shard, target, tmp_path, kw, flag):
    with pytest.raises(ConfigError, match=f"{flag} must be a finite number, got"):
        train_heads(cfg(shard, tmp_path / "o", **kw), target=target)
    assert not (tmp_path / "o").exists()


def test_negative_clip_is_refused_not_taken_as_no_clipping(shard, target, tmp_path):
    with pytest.raises(ConfigError, match="--clip must be >= 0 \\(0 = no clipping\\), got -1"):
        train_heads(cfg(shard, tmp_path / "o", clip=-1.0), target=target)


def test_train_cli_refuses_nan_before_loading(shard, tmp_path, capsys):
    from amphista_engine.cli import main
    rc = main(["train", "--data", str(shard), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no-model"),
               "--lr", "nan"])
    err = capsys.readouterr().err
    assert rc == 2 and "--lr must be a finite number, got nan" in err and "Traceback" not in err


# ---- output folders and trainer states ---------------------------------------------------------------------
def test_train_out_that_is_a_file_is_named(shard, target, tmp_path):
    with pytest.raises(InputError, match=r"--out .*tiny.jsonl is a file; give a directory for the heads"):
        train_heads(cfg(shard, shard), target=target)


@pytest.mark.parametrize("content", [b"garbage\n", b"", "torn", "no-keys"])
def test_resume_from_an_unreadable_trainer_state_is_named(shard, target, tmp_path, content):
    out = tmp_path / "h"
    train_heads(cfg(shard, out, steps=2), target=target)
    state = out / "trainer_state.pt"
    if content == "torn":             # a copy cut short (torch raised a bare OSError: Invalid argument)
        state.write_bytes(state.read_bytes()[:3000])
    elif content == "no-keys":        # a torch file, but not one train wrote
        torch.save({"step": 2}, state)
    else:
        state.write_bytes(content)
    with pytest.raises(InputError, match=r"--resume: .*trainer_state.pt is not a trainer state that `amphista "
                                         r"train` wrote .*--overwrite"):
        train_heads(cfg(shard, out, steps=4, resume=True), target=target)


# ---- Ctrl-C during training --------------------------------------------------------------------------------
def test_ctrl_c_mid_step_keeps_a_checkpoint_resume_continues_exactly(shard, target, tmp_path, monkeypatch, capsys,
                                                                   uninterrupted):
    """With the default --save-every 0 a Ctrl-C used to end the run with exit code 130, no word and no checkpoint:
    every step since the start was lost. Now the last finished step is saved and named."""
    from amphista_engine.training import trainer
    calls, real = [], trainer.LossComputer.__call__

    def interrupt_on_fourth_step(self, *a, **k):
        if a[-1]:                        # backward: a training step (evaluation passes False)
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(trainer.LossComputer, "__call__", interrupt_on_fourth_step)
    out = tmp_path / "h"
    with pytest.raises(KeyboardInterrupt):
        train_heads(cfg(shard, out), target=target)
    assert "train: interrupted at step 3 of 6: checkpoint saved in" in capsys.readouterr().err
    assert torch.load(out / "trainer_state.pt", weights_only=False)["step"] == 3
    monkeypatch.setattr(trainer.LossComputer, "__call__", real)
    _same_state(train_heads(cfg(shard, out, resume=True), target=target)["heads"].state_dict(), uninterrupted)


def test_ctrl_c_during_the_update_lands_after_it(shard, target, tmp_path, monkeypatch, capsys, uninterrupted):
    """A SIGINT between the optimizer's update and the step count would save updated weights under the old step
    number, and --resume would then take that step twice: it is held until the update is counted."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is handled by someone else here")
    real, calls = torch.optim.AdamW.step, []

    def step_then_sigint(self, *a, **k):
        r = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return r
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_sigint)
    out = tmp_path / "h"
    with pytest.raises(KeyboardInterrupt):
        train_heads(cfg(shard, out), target=target)
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    assert "interrupted at step 2 of 6: checkpoint saved" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _same_state(train_heads(cfg(shard, out, resume=True), target=target)["heads"].state_dict(), uninterrupted)


# ---- held-out numbers --------------------------------------------------------------------------------------
def test_heads_no_held_out_position_reaches_report_none(target, tmp_path):
    """Answers of 3 tokens give head 3 (which drafts 4 ahead) no position: its held-out nll was printed as 0.0, a
    perfect score, and a batch without a position for a head still counted one for it in the mean."""
    from amphista_engine.training.trainer import LossComputer, _fmt_eval
    data = _write(tmp_path / "short.jsonl", greedy_records(target, 12, 5, 3))
    res = train_heads(cfg(data, tmp_path / "h", steps=1, eval_frac=0.5), target=target)
    ev = res["final_eval"]
    assert ev["nll"][2] is None and ev["top1"][2] is None and ev["top5"][2] is None
    assert all(isinstance(v, float) and math.isfinite(v) for v in ev["nll"][:2])
    assert "| top1 " in _fmt_eval(ev) and " -" in _fmt_eval(ev)
    lossf = LossComputer(target, "kl", 0.8, K, 16, lambda: torch.autocast("cpu", enabled=False))
    from amphista_engine.heads import new_heads
    heads = new_heads("medusa", target, num_heads=K, dtype=torch.float32)
    x = torch.randint(0, 63, (1, 8))
    hidden = torch.randn(1, 8, 32)
    rows = torch.tensor([[0, 4], [0, 5]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    feats = torch.randn(2, K, 32)
    _, _, st = lossf(heads, feats, hidden, x, rows, valid, False)
    assert st["count"].tolist() == [2, 1, 0]


def test_kl_teacher_is_the_targets_softcapped_distribution(target):
    """A target with a final logit softcap (Gemma's final_logit_softcapping, Transformer.logits) teaches its capped
    distribution: the KL loss equals the one computed by hand from cap * tanh(logits / cap), not the uncapped."""
    import copy
    from amphista_engine.heads import new_heads
    from amphista_engine.training.trainer import LossComputer
    torch.manual_seed(0)
    heads = new_heads("medusa", target, num_heads=K, dtype=torch.float32)
    x = torch.randint(0, 63, (1, 8))
    hidden = torch.randn(1, 8, 32) * 8            # large logits: the cap changes them
    rows = torch.tensor([[0, 2]])
    valid = torch.ones(1, K, dtype=torch.bool)
    feats = torch.randn(1, K, 32)
    capped = copy.copy(target)
    capped.config = copy.copy(target.config)
    capped.config.final_logit_softcapping = 1.5
    off = lambda: torch.autocast("cpu", enabled=False)          # noqa: E731
    loss = {}
    for name, tgt in (("plain", target), ("capped", capped)):
        loss[name] = float(LossComputer(tgt, "kl", 1.0, K, 16, off)(heads, feats, hidden, x, rows, valid, False)[0])
    with torch.no_grad():
        logq = torch.log_softmax(heads.logits(feats).float(), -1)[0]
        h = hidden[0, (rows[0, 1] + torch.arange(K) + 1).clamp(max=7)]
        tl = torch.nn.functional.linear(h, heads.output_weight()).float()
        logp = torch.log_softmax(torch.tanh(tl / 1.5) * 1.5, -1)
        want = float((logp.exp() * (logp - logq)).sum(-1).sum())
    assert abs(loss["capped"] - want) < 1e-4 * max(1.0, abs(want)) and abs(loss["plain"] - want) > 1e-2


# ---- tree-search on the heads' own held-out split -----------------------------------------------------------
def test_tree_search_defaults_to_the_split_the_heads_were_trained_with(shard, target, tmp_path, capsys):
    """tree-search held out a fixed 5% whatever the heads' training held out: heads trained with --eval-frac 0.02
    had their trees fitted partly on sequences they trained on. The default is now the share the heads recorded,
    and a larger one given is warned about."""
    from amphista_engine.training.data import load_shard
    from amphista_engine.training.plan import split_heldout
    from amphista_engine.training.tree_search import tree_search
    train_heads(cfg(shard, tmp_path / "h", steps=1, eval_frac=0.1), target=target)
    seqs = load_shard(shard, 64, 256).sequences
    held, wider = split_heldout(seqs, 0.1)[1], split_heldout(seqs, 0.2)[1]
    assert len(split_heldout(seqs, 0.05)[1]) != len(held) < len(wider)     # this data tells the three apart
    res = tree_search(shard, tmp_path / "h", nodes=(4,), target=target, dynamic=())
    assert res["heldout_sequences"] == len(held)
    capsys.readouterr()
    res = tree_search(shard, tmp_path / "h", nodes=(4,), target=target, dynamic=(), eval_frac=0.2)
    assert res["heldout_sequences"] == len(wider)
    assert "--eval-frac 0.2 holds out more than the 0.1 the heads were trained with" in capsys.readouterr().err
    train_heads(cfg(shard, tmp_path / "all", steps=1, eval_frac=0.0), target=target)
    with pytest.raises(InputError, match="trained with --eval-frac 0.0: no sequence of their data was held out"):
        tree_search(shard, tmp_path / "all", nodes=(4,), target=target, dynamic=())


def test_tree_search_checks_text_less_records_against_evaluation_questions(tiny_hf_dir, tmp_path):
    """train decodes records that carry only prompt_ids and refuses MT-Bench questions; tree-search read the same
    shards without that check, so it fitted trees on evaluation questions."""
    from amphista_engine.heads import new_heads, save_heads
    from amphista_engine.loading import load_model
    from amphista_engine.training.tree_search import tree_search
    loaded = load_model(str(tiny_hf_dir), dtype=torch.float32, device="cpu", max_seq_len=256)
    question = "Describe a vivid and unique character, using strong imagery and creative language. " \
               "Please answer in fewer than two paragraphs."
    recs = [{"id": f"q{i}", "prompt_ids": loaded.tokenizer.encode(f"hello {i}"), "answer_ids": [5, 6, 7, 8, 9, 10]}
            for i in range(6)]
    recs.append({"id": "x", "prompt_ids": loaded.tokenizer.encode(question), "answer_ids": [5, 6, 7, 8, 9, 10]})
    data = _write(tmp_path / "d.jsonl", recs)
    save_heads(new_heads("medusa", loaded.model, num_heads=2, dtype=torch.float32), tmp_path / "h")
    with pytest.raises(InputError, match=r"MT-Bench evaluation questions \(first: id x\)"):
        tree_search(data, tmp_path / "h", model=str(tiny_hf_dir), nodes=(4,), dynamic=(), eval_frac=0.5,
                    device="cpu", max_seq_len=256)


# ---- distill --out ---------------------------------------------------------------------------------------------
def test_distill_out_that_is_the_prompt_file_or_a_folder_is_refused(tmp_path, tiny_hf_dir):
    """`--out` given the prompts file itself (or any prompt file) read its ids as answered prompts: the run said
    '20 already in' and wrote nothing (or appended answers to the prompt file)."""
    from amphista_engine.engine import Engine
    from amphista_engine.training.distill import distill
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "source": "s", "prompt": f"Hello {i}"}) + "\n"
                               for i in range(3)))
    before = prompts.read_bytes()
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=64, max_batch_size=2)
    with pytest.raises(InputError, match=r"p.jsonl holds records that are not distill answers \(id p0 has no "
                                         r"'answer_ids'\): is it a prompt file"):
        distill(prompts, prompts, max_new_tokens=4, engine=engine, progress=False)
    assert prompts.read_bytes() == before
    with pytest.raises(InputError, match="--out .* is a directory"):
        distill(prompts, tmp_path, max_new_tokens=4, engine=engine, progress=False)


def test_train_and_tree_search_refuse_evaluation_files_by_name_and_shape(shard, target, tmp_path):
    """distill refuses prompt files named or shaped like MT-Bench / Spec-Bench; train read such a question file as
    'no usable training records (malformed record: 80)', and trained on a shard named like one (whose text-less
    records it cannot check without a tokenizer)."""
    from amphista_engine.training.data import load_shard
    named = tmp_path / "mt_bench_answers.jsonl"
    named.write_bytes(shard.read_bytes())
    with pytest.raises(InputError, match="looks like an evaluation file"):
        train_heads(cfg(named, tmp_path / "h"), target=target)
    shaped = tmp_path / "q.jsonl"
    shaped.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem."]}) + "\n")
    with pytest.raises(InputError, match="is a Spec-Bench/MT-Bench question file"):
        load_shard([shard, shaped], 64, 256)
