"""QA of `amphista train --resume` with a changed schedule (--steps, --warmup) or --weight-decay.

Bug pinned: the saved optimizer state carries the learning rate the *old* schedule gave for the next step, and
loading it put that rate back into the optimizer; the scheduler only recomputed it after the first resumed step. A
finished run's rate is 0 (the cosine has decayed to its end), so `--resume --steps <more>` spent its first step
changing nothing; a changed --warmup likewise took effect one step late. The saved weight decay also replaced a
changed --weight-decay for the whole resumed run, although the resume warned that it "continues with" the new one.

Oracle: the learning rate the new schedule gives at step s is the one a fresh run with the new settings uses at s.
"""
from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from amphista_engine.errors import ConfigError
from amphista_engine.training.trainer import train_heads

from conftest import train_cfg as cfg

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _train(shard, target, out, **kw) -> tuple[dict, list[tuple[float, float]]]:
    """train_heads and, per optimizer update, (lr, weight decay) of the decayed parameter group."""
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"])))
    try:
        return train_heads(cfg(shard, out, **kw), target=target), seen
    finally:
        hook.remove()


def _lrs(seen):
    return [lr for lr, _ in seen]


def test_a_longer_resume_of_a_finished_run_takes_the_new_schedule_from_its_first_step(shard, target, tmp_path):
    _, fresh = _train(shard, target, tmp_path / "fresh", steps=6)
    assert len(fresh) == 6 and all(lr > 0 for lr in _lrs(fresh))

    out = tmp_path / "o"
    done, _ = _train(shard, target, out, steps=3)
    before = {k: v.clone() for k, v in done["heads"].state_dict().items()}
    # --lr feeds the schedule too, and may not change on a resume: refused by name
    with pytest.raises(ConfigError, match=r"--lr 0\.003 -> 0\.001"):
        _train(shard, target, out, steps=6, lr=1e-3, resume=True)

    one, first = _train(shard, target, out, steps=6, stop_after=4, resume=True)
    assert one["start_step"] == 3 and one["steps"] == 4
    assert _lrs(first) == pytest.approx(_lrs(fresh)[3:4], rel=1e-12, abs=0)
    # the first resumed update moves the heads (at the old schedule's rate 0 it left every weight as it was)
    after = one["heads"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    rest, later = _train(shard, target, out, steps=6, resume=True)
    assert rest["steps"] == 6
    assert _lrs(later) == pytest.approx(_lrs(fresh)[4:6], rel=1e-12, abs=0)


@pytest.mark.parametrize("first, cut, then", [
    (dict(steps=4, warmup=2), None, dict(steps=8, warmup=6)),        # a finished run resumed longer, warming anew
    (dict(steps=8, warmup=1), 3, dict(steps=8, warmup=4)),           # cut mid-run, resumed with a longer warmup
    (dict(steps=8, warmup=5), 3, dict(steps=8, warmup=0)),           # cut mid-warmup, resumed without one
])
def test_a_changed_warmup_applies_from_the_first_resumed_step(shard, target, tmp_path, first, cut, then):
    _, fresh = _train(shard, target, tmp_path / "fresh", **then)
    out = tmp_path / "o"
    _train(shard, target, out, **first, stop_after=cut)
    res, seen = _train(shard, target, out, **then, resume=True)
    start = res["start_step"]
    assert start == (cut or first["steps"]) and res["steps"] == then["steps"]
    assert _lrs(seen) == pytest.approx(_lrs(fresh)[start:], rel=1e-12, abs=0)


def test_a_changed_weight_decay_applies_to_the_resumed_steps(shard, target, tmp_path, capsys):
    out = tmp_path / "o"
    _, seen = _train(shard, target, out, steps=4, stop_after=2)
    assert {wd for _, wd in seen} == {0.0}
    capsys.readouterr()
    _, seen = _train(shard, target, out, steps=4, weight_decay=0.1, resume=True)
    assert "continues with --weight-decay 0.0 -> 0.1" in capsys.readouterr().err
    assert [wd for _, wd in seen] == [0.1, 0.1]


def test_the_log_records_the_rate_each_update_used(shard, target, tmp_path):
    """Each step's log record holds the learning rate of its own update: it held the next step's (read after the
    scheduler stepped), so a finished run's last record said 0."""
    import json
    log = tmp_path / "log.jsonl"
    _, seen = _train(shard, target, tmp_path / "o", steps=5, warmup=2, log=str(log))
    logged = [r["lr"] for r in map(json.loads, log.read_text().splitlines()) if not r.get("eval")]
    assert logged == pytest.approx(_lrs(seen), rel=1e-12, abs=0) and logged[-1] > 0
