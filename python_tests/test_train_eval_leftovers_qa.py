"""Leftovers of the training and evaluation CLI QA (2026-12): messages that said the wrong thing or nothing.

Pinned: `train --eval-frac 0.99` said it "held out no sequence" when it would have held out every one; `--draft-vocab
1` trained with a loss identically 0; `--warmup` longer than the run kept the learning rate below --lr throughout;
`--init-from` mismatches named config keys, not the flags to pass; an empty question file was not called empty;
`eval --max-new-tokens 1` wrote tau 0.0 and decode_tokens_per_s 0.0 (no decoder reaches them); `--tree mix-4` on an
--out whose run resolved an unset --tree to mix-4 was refused; CJK category names repeated matplotlib's glyph warning
per glyph and per draw; Ctrl-C in `eval` gave no hint that its answers were saved and a rerun resumes.
"""
from __future__ import annotations

import json
import warnings

import pytest

from amphista_engine.cli import main
from amphista_engine.errors import ConfigError, InputError
from amphista_engine.evaluation.runner import run_eval
from amphista_engine.training.data import load_shard
from amphista_engine.training.plan import split_heldout
from amphista_engine.training.trainer import train_heads

from conftest import interrupted_on_call, write_questions
from conftest import train_cfg as cfg

pytestmark = pytest.mark.usefixtures("one_thread_module")

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Compose a short travel blog post about Hawaii."]},
    {"question_id": 91, "category": "roleplay", "turns": ["Pretend yourself to be Elon Musk. Why go to Mars?"]},
]
NO_MODEL = "/nonexistent/model-dir"      # a load would fail on it: the error asserted came first




# ---- 1. --eval-frac that would hold out everything ----------------------------------------------------------

def test_an_eval_frac_covering_every_prompt_says_so(shard, target, tmp_path, capsys, monkeypatch):
    from amphista_engine.training import trainer
    real = trainer.train_heads
    monkeypatch.setattr(trainer, "train_heads", lambda c: real(c, target=target))
    seqs = load_shard(shard, 64, 256).sequences
    frac = 0.99             # the QA's value: on these 16 prompts it would hold out all of them, so none is
    assert split_heldout(seqs, frac)[1] == []
    rc = main(["train", "--data", str(shard), "--out", str(tmp_path / "o"), "--num-heads", "3", "--steps", "1",
               "--batch-tokens", "200", "--eval-frac", str(frac)])
    err = capsys.readouterr().err
    assert rc == 0 and "held out no sequence" not in err
    assert f"--eval-frac {frac} would hold out every one of the 16 prompts and leave nothing to train on" in err
    suggested = float(err.split("pass --eval-frac ")[1].split(" ")[0])
    train, held = split_heldout(seqs, suggested)           # what the message advises does evaluate
    assert held and train


def test_tree_search_names_the_same_reason(shard, target, tmp_path):
    from amphista_engine.training.tree_search import tree_search
    heads = tmp_path / "h"
    train_heads(cfg(shard, heads, steps=1), target=target)
    with pytest.raises(InputError, match="would hold out every one of the 16 prompts"):
        tree_search(shard, heads, nodes=[4], dynamic=[], eval_frac=0.9999, target=target)


# ---- 2. --draft-vocab 1, --warmup past the run --------------------------------------------------------------

def test_a_one_token_draft_vocabulary_is_refused(shard, target, tmp_path):
    with pytest.raises(ConfigError, match="--draft-vocab 1: .*learn nothing.*--draft-vocab 0 .* or at least 2"):
        train_heads(cfg(shard, tmp_path / "o", draft_vocab=1), target=target)
    assert not (tmp_path / "o").exists()
    res = train_heads(cfg(shard, tmp_path / "two", draft_vocab=2), target=target)   # the smallest that learns
    assert res["final_eval"]["loss"] > 0


def test_a_warmup_longer_than_the_run_is_refused(shard, target, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"--warmup 100 is longer than the run \(2 steps, from --steps\).*"
                                          r"pass --warmup 2 or less"):
        train_heads(cfg(shard, tmp_path / "o", warmup=100), target=target)
    assert not (tmp_path / "o").exists()                   # refused before anything is written
    with pytest.raises(ConfigError, match=r"--warmup 10000 is longer than the run \(\d+ steps, from --epochs"):
        train_heads(cfg(shard, tmp_path / "e", steps=None, epochs=1.0, warmup=10000), target=target)
    assert train_heads(cfg(shard, tmp_path / "ok", warmup=2), target=target)["steps"] == 2
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "a longer warmup is refused" in " ".join(capsys.readouterr().out.split())


# ---- 3. --init-from mismatches name the flag ----------------------------------------------------------------

def test_init_from_mismatches_name_the_flag_to_pass(shard, target, tmp_path):
    src = tmp_path / "src"
    train_heads(cfg(shard, src, steps=1, draft_vocab=40), target=target)
    with pytest.raises(ConfigError, match=r"draft_vocab_size: 40 vs 0 \(pass --draft-vocab 40\)"):
        train_heads(cfg(shard, tmp_path / "a", init_from=str(src)), target=target)
    with pytest.raises(ConfigError, match=r"num_heads: 3 vs 4 \(pass --num-heads 3\).*"
                                          r"stage_of_head: \[0, 1, 1\] vs .*\(pass --stage-of-head 0,1,1\)"):
        train_heads(cfg(shard, tmp_path / "b", init_from=str(src), draft_vocab=40, num_heads=4), target=target)
    with pytest.raises(ConfigError, match=r"kind: 'amphista' vs 'medusa' \(pass --kind amphista\)"):
        train_heads(cfg(shard, tmp_path / "c", init_from=str(src), draft_vocab=40, kind="medusa"), target=target)
    grown = tmp_path / "grown"
    train_heads(cfg(shard, grown, steps=1, draft_vocab=40, init_from=str(src), layers_per_stage=2), target=target)
    with pytest.raises(ConfigError, match=r"only grow.*layers_per_stage 2 -> 1 \(pass --layers-per-stage 2 or more"):
        train_heads(cfg(shard, tmp_path / "d", init_from=str(grown), draft_vocab=40), target=target)


# ---- 4. an empty question file ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, extra", [("", ""), ("\n  \n\t\n", " (only blank lines)")])
def test_an_empty_question_file_is_called_empty(tmp_path, capsys, text, extra):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    want = f"questions file {path} is empty{extra}; give a Spec-Bench-format JSONL file"
    for argv in (["eval", "--questions", str(path), "--model", NO_MODEL, "--out", str(tmp_path / "o")],
                 ["eval-tau", "--questions", str(path), "--heads", str(tmp_path / "h"), "--model", NO_MODEL]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert want in err and "question lacks" not in err and "Traceback" not in err


# ---- 5-8. amphista eval on the tiny engine ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_hf_dir, tmp_path_factory):
    from conftest import tiny_engine_with_saved_heads
    return tiny_engine_with_saved_heads(tiny_hf_dir, tmp_path_factory.mktemp("leftovers"))


@pytest.fixture
def questions(tmp_path):
    return write_questions(tmp_path / "q.jsonl", QUESTIONS)


def _eval(tiny, q, out, **kw):
    engine, heads = tiny
    logged = kw.pop("logged", [])
    return run_eval(q, engine=engine, heads=heads, out=out, warmup=0, progress=False, log=logged.append,
                    **{"methods": "ar,amphista", "max_new_tokens": 4, **kw})


def test_no_decoding_step_gives_no_tau_rather_than_zero(tiny, questions, tmp_path):
    from amphista_engine.evaluation.bench import parse_tau
    out = tmp_path / "o"
    s = _eval(tiny, questions, out, max_new_tokens=1)
    written = json.loads((out / "summary.json").read_text())
    for m in ("ar", "amphista"):
        for got in (s["overall"][m], written["overall"][m], written["categories"]["writing"][m]):
            assert got["decoding_steps"] == 0 and got["tau"] is None and got["decode_tokens_per_s"] is None
    assert "| **overall** | 2 | 2 |" in (out / "summary.md").read_text()
    row = next(r for r in (out / "summary.md").read_text().splitlines() if r.startswith("| **overall**"))
    assert row.split(" | ")[4] == "-"                      # amphista tau
    with pytest.raises(InputError, match=r"measured no tau for amphista \(overall\.amphista\.tau is null: none of "
                                         r"its answers took a decoding step\); rerun eval with a larger"):
        parse_tau(str(out / "summary.json"))


def test_the_resolved_tree_named_on_a_resume_is_the_same_run(tiny, questions, tmp_path):
    out = tmp_path / "o"
    first = _eval(tiny, questions, out, limit=1)
    tree = first["meta"]["tree_used"]["amphista"]
    s = _eval(tiny, questions, out, tree=tree)             # --tree TREE where TREE is what unset resolved to
    assert s["overall"]["amphista"]["questions"] == 2 and "runs" in s
    assert len((out / "answers.jsonl").read_text().splitlines()) == 4     # the first question's answers reused
    other = "chain-2" if tree != "chain-2" else "chain-3"
    with pytest.raises(InputError, match=f"amphista tree: '{tree}' there, '{other}' now"):
        _eval(tiny, questions, out, tree=other)


def test_missing_glyphs_are_named_once_and_filters_are_left_alone(tmp_path):
    mpl = pytest.importorskip("matplotlib")
    from amphista_engine.evaluation.plots import plot_eval
    g = {"ar": {"tau": 1.0, "speedup": 1.0}, "amphista": {"tau": None, "speedup": 1.5}}
    summary = {"methods": ["ar", "amphista"], "overall": g, "categories": {"数学": g, "写作": g}, "meta": {}}
    before, logged = list(warnings.filters), []
    with mpl.rc_context({"font.family": ["DejaVu Sans"]}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = plot_eval(summary, tmp_path, logged.append)
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert not [w for w in caught if "missing from font" in str(w.message)]
    glyphs = [line for line in logged if "lacks" in line]
    assert len(glyphs) == 1 and "lacks 4 character(s)" in glyphs[0] and "数学写作" in glyphs[0]
    assert warnings.filters == before


def test_ctrl_c_in_eval_says_a_rerun_resumes(tiny, questions, tmp_path, monkeypatch):
    engine, _ = tiny
    monkeypatch.setattr(engine, "generate", interrupted_on_call(engine.generate, 2))
    logged = []
    with pytest.raises(KeyboardInterrupt):
        _eval(tiny, questions, tmp_path / "o", methods="ar", logged=logged)
    hint = [line for line in logged if "interrupted" in line]
    assert hint == [f"eval: interrupted with 1 of 2 answers saved in {tmp_path / 'o' / 'answers.jsonl'}; rerun the "
                    f"same command to resume from them"]
