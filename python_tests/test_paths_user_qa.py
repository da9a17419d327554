"""QA of every place that takes or writes a path, as a user whose files live in awkward places (2026-12-06).

Bugs pinned: `--out=~/x` and quoted "~/x" (which the shell leaves alone) made a folder named `~` in the working
directory for distill, train, eval, bench, tree-search and eval-tau, and perplexity --file / eval --questions /
distill --prompts said "not found"; `distill --out` given an existing file that is not a shard (a GGUF, notes)
cut its tail as a "torn record" and appended JSON to it, and `train --log` appended to one; an --out whose parent
is a file, or a folder that is read-only, failed after the load, the timing or the training ("File exists: afile"),
and `train` into a read-only folder ended with safetensors' traceback; save_heads rewrote config.json in place (a
full disk left it torn); an unreadable model.safetensors was "No such file or directory ... truncated or corrupt
download?", an unreadable config.json "not valid JSON", an unreadable model folder "Permission denied:
DIR/generation_config.json"; a dangling symlink was only "not found"; a folder named model.safetensors was read as
weights; a folder holding only the SmolLM2 GGUF, a link to it without the .gguf suffix or as .GGUF loaded it but
got no shipped heads; a folder named like the alias was passed over silently; an eval rerun with every answer
already in --out recomputed nothing and said nothing, and bench, tree-search and eval-tau replaced or reused an
earlier result without a word.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from amphista_engine.cli import main
from amphista_engine.errors import AmphistaError, InputError, ModelLoadError

from conftest import greedy_records, needs_smollm2

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _permissions_bypassed() -> bool:
    """Whether this process reads a chmod 000 file anyway (root, or CAP_DAC_OVERRIDE)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "f"
        f.write_text("x")
        f.chmod(0)
        try:
            f.read_text()
            return True
        except PermissionError:
            return False
        finally:
            f.chmod(0o644)


needs_non_root = pytest.mark.skipif(_permissions_bypassed(), reason="root reads and writes through chmod 000 / 555")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME in a tmp folder, and a working directory of its own (where a literal `~` folder would appear)."""
    home = tmp_path / "hôme dir"
    cwd = tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home


def no_literal_tilde():
    assert not Path("~").exists(), "a folder named '~' was made in the working directory"


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    from amphista_engine import Engine
    return Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=256)


@pytest.fixture(scope="module")
def shard(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("shard") / "s.jsonl"
    recs = greedy_records(engine.model, n=20, prompt_len=6, answer_len=12)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "source": "s", "prompt": f"hello {i}"}) + "\n"
                            for i in range(2)))
    return path


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("questions") / "q.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "category": "c", "turns": [f"q {i}"]}) + "\n"
                            for i in range(2)))
    return path


def gguf_like(path: Path) -> bytes:
    data = b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 8 + b"\n tail bytes after a newline"
    path.write_bytes(data)
    return data


# ---- `~` in the paths a command reads and writes ------------------------------------------------------------------

def test_distill_expands_tilde_in_prompts_and_out(engine, prompts, home):
    from amphista_engine.training.distill import distill
    shutil.copy(prompts, home / "prömpts.jsonl")
    counts = distill("~/prömpts.jsonl", "~/out dir/ü/a.jsonl", engine=engine, max_new_tokens=2, progress=False,
                     max_seq_len=256)
    assert counts["written"] == 2
    assert len((home / "out dir" / "ü" / "a.jsonl").read_text().splitlines()) == 2
    no_literal_tilde()


def test_train_cli_expands_tilde_in_data_and_out(tiny_hf_dir, shard, home):
    shutil.copy(shard, home / "s.jsonl")
    (home / "train.log").write_text('{"step": 1, "loss": 0.5}\n')        # an earlier run's: appended to
    rc = main(["train", "--data", "~/s.jsonl", "--out=~/my heads", "--model", str(tiny_hf_dir), "--steps", "1",
               "--batch-tokens", "200", "--num-heads", "2", "--eval-frac", "0.2", "--log", "~/train.log"])
    assert rc == 0
    assert (home / "my heads" / "config.json").is_file() and (home / "my heads" / "model.safetensors").is_file()
    assert len((home / "train.log").read_text().splitlines()) > 1
    no_literal_tilde()


def test_eval_expands_tilde_and_says_when_every_answer_was_already_there(engine, questions, home):
    from amphista_engine.evaluation.runner import run_eval
    shutil.copy(questions, home / "qs ü.jsonl")
    kw = dict(methods="ar", engine=engine, out="~/ev", max_new_tokens=2, warmup=0, progress=False,
              max_seq_len=256)
    run_eval("~/qs ü.jsonl", log=lambda m: None, **kw)
    assert (home / "ev" / "summary.json").is_file()
    no_literal_tilde()
    logs = []
    run_eval("~/qs ü.jsonl", log=logs.append, **kw)
    assert any("already in" in m and "nothing to compute" in m for m in logs), logs


def test_bench_expands_tilde_and_says_it_replaced_an_earlier_result(tiny_hf_dir, home, capsys):
    stem = f"bench_{re.sub(r'[^A-Za-z0-9_.-]+', '-', Path(str(tiny_hf_dir)).name)}_cpu_float32"
    (home / "b").mkdir()
    (home / "b" / f"{stem}.json").write_text("{}\n")         # an earlier run's
    rc = main(["bench", "--model", str(tiny_hf_dir), "--out=~/b", "--trees", "chain-2", "--prompt-tokens", "4",
               "--repeats", "1", "--warmup", "0", "--num-heads", "2", "--device", "cpu"])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"{home / 'b' / stem}.json" in err and "replacing the earlier run's" in err, err
    assert json.loads((home / "b" / f"{stem}.json").read_text())["rows"]
    no_literal_tilde()


def test_perplexity_file_takes_tilde(tiny_hf_dir, home, capsys):
    (home / "t é.txt").write_text("The quick brown fox jumps over the lazy dog. " * 6)
    rc = main(["perplexity", "--file", "~/t é.txt", "--model", str(tiny_hf_dir), "--max-seq-len", "16",
               "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err


def test_save_heads_expands_tilde(engine, home):
    from amphista_engine.heads import random_heads, save_heads
    save_heads(random_heads("medusa", engine.model, num_heads=1), "~/héads")
    assert (home / "héads" / "config.json").is_file()
    no_literal_tilde()


# ---- outputs that would damage a file, or fail after the work ----------------------------------------------------

def test_distill_refuses_an_out_that_is_not_a_shard(engine, prompts, tmp_path):
    from amphista_engine.training.distill import distill
    for name, data in (("model.gguf", None), ("notes.txt", b"my notes\nline two\n")):
        out = tmp_path / name
        if data is None:
            data = gguf_like(out)
        else:
            out.write_bytes(data)
        with pytest.raises(InputError, match=rf"--out .*{name} exists and is not a distill shard"):
            distill(prompts, out, engine=engine, max_new_tokens=2, progress=False, max_seq_len=256)
        assert out.read_bytes() == data
    # its own shard, torn while its first record was written, still resumes
    out = tmp_path / "s.jsonl"
    out.write_text('{"id": "p0", "source": "s", "prompt": "hel')
    assert distill(prompts, out, engine=engine, max_new_tokens=2, progress=False, max_seq_len=256)["written"] == 2


@pytest.mark.parametrize("what", ["model.gguf", "the shard"])
def test_train_log_that_is_not_a_log_is_refused_before_the_load(what, tiny_hf_dir, shard, tmp_path, capsys):
    log = tmp_path / "given.log"
    if what == "model.gguf":
        data = gguf_like(log)
    else:
        data = shard.read_bytes()
        log.write_bytes(data)
    rc = main(["train", "--data", str(shard), "--out", str(tmp_path / "h"), "--model", str(tiny_hf_dir), "--steps",
               "1", "--batch-tokens", "200", "--num-heads", "2", "--eval-frac", "0.2", "--log", str(log)])
    assert rc == 2
    assert "--log" in capsys.readouterr().err and log.read_bytes() == data
    assert not (tmp_path / "h" / "model.safetensors").exists()


@pytest.mark.parametrize("command", ["distill", "train", "tree-search", "eval-tau", "train-log"])
def test_an_out_under_a_file_is_named_before_the_work(command, tiny_hf_dir, shard, prompts, questions, tmp_path,
                                                      capsys, engine):
    from amphista_engine.heads import random_heads, save_heads
    afile = tmp_path / "afile"
    afile.write_text("x")
    heads = save_heads(random_heads("amphista", engine.model, num_heads=2), tmp_path / "heads")
    model = ["--model", str(tiny_hf_dir), "--device", "cpu"]
    argv = {"distill": ["distill", "--prompts", str(prompts), "--out", f"{afile}/x.jsonl", *model],
            "train": ["train", "--data", str(shard), "--out", f"{afile}/h", *model, "--steps", "1"],
            "train-log": ["train", "--data", str(shard), "--out", str(tmp_path / "h"), "--log", f"{afile}/l.jsonl",
                          *model, "--steps", "1"],
            "tree-search": ["tree-search", "--data", str(shard), "--heads", str(heads), "--out",
                            f"{afile}/t.json", *model, "--nodes", "4", "--dynamic", "4", "--eval-frac", "0.2"],
            "eval-tau": ["eval-tau", "--questions", str(questions), "--heads", str(heads), "--out",
                         f"{afile}/t.json", *model, "--max-new-tokens", "2", "--max-seq-len", "256"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{afile} is a file, not a folder" in err, err
    assert "tree-search:" not in err and "eval-tau amphista" not in err    # nothing ran first
    assert not (tmp_path / "h").exists()


def test_save_heads_names_a_write_error_and_never_tears_config(engine, tmp_path, monkeypatch):
    import safetensors.torch

    from amphista_engine.heads import load_heads, random_heads, save_heads
    heads = random_heads("medusa", engine.model, num_heads=1)
    path = save_heads(heads, tmp_path / "h")
    before = (path / "config.json").read_text()

    def denied(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")
    monkeypatch.setattr(safetensors.torch, "save_file", denied)
    with pytest.raises(InputError, match=r"cannot write the heads to .*h/model.safetensors: .*Permission denied"):
        save_heads(heads, path)
    monkeypatch.undo()
    real = Path.write_text

    def full_disk(self, text, *a, **k):
        if "config.json" in self.name:
            real(self, text[:len(text) // 2], *a, **k)
            raise OSError(28, "No space left on device")
        return real(self, text, *a, **k)
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_heads(heads, path)
    monkeypatch.undo()
    assert (path / "config.json").read_text() == before
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    load_heads(path, engine.model)


@needs_non_root
@pytest.mark.parametrize("command", ["eval", "train", "distill"])
def test_a_read_only_out_folder_is_named_before_the_work(command, tiny_hf_dir, shard, prompts, questions, tmp_path,
                                                         capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    model = ["--model", str(tiny_hf_dir), "--device", "cpu"]
    argv = {"eval": ["eval", "--questions", str(questions), "--out", str(ro), "--methods", "ar", *model],
            "train": ["train", "--data", str(shard), "--out", str(ro), *model, "--steps", "1"],
            "distill": ["distill", "--prompts", str(prompts), "--out", str(ro / "x.jsonl"), *model]}[command]
    try:
        assert main(argv) == 2
    finally:
        ro.chmod(0o755)
    assert f"{ro} is not writable" in capsys.readouterr().err


# ---- model and heads paths ----------------------------------------------------------------------------------------

def test_dangling_symlinks_are_named_as_such(engine, tmp_path):
    from amphista_engine.loading import resolve_model_path
    (tmp_path / "model.gguf").symlink_to(tmp_path / "gone.gguf")
    (tmp_path / "heads").symlink_to(tmp_path / "gone_heads")
    with pytest.raises(ModelLoadError, match=r"symbolic link to .*gone.gguf, which does not exist"):
        resolve_model_path(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelLoadError, match=r"symbolic link to .*gone_heads, which does not exist"):
        engine.load_heads(str(tmp_path / "heads"))


def test_a_folder_named_model_safetensors_is_no_weights(tiny_hf_dir, tmp_path):
    from amphista_engine.loading import load_model
    m = tmp_path / "m"
    shutil.copytree(tiny_hf_dir, m)
    (m / "model.safetensors").unlink()
    (m / "model.safetensors").mkdir()
    with pytest.raises(ModelLoadError, match=r"no weights in .*m: expected model.safetensors"):
        load_model(str(m))


@needs_non_root
@pytest.mark.parametrize("what", ["model.safetensors", "config.json", "folder"])
def test_unreadable_model_files_are_named(what, tiny_hf_dir, tmp_path):
    from amphista_engine.loading import load_model
    m = tmp_path / "m"
    shutil.copytree(tiny_hf_dir, m)
    target = m if what == "folder" else m / what
    target.chmod(0)
    try:
        with pytest.raises(ModelLoadError, match=r"cannot be read \(permission denied\)|Permission denied\); make"):
            load_model(str(m))
    finally:
        target.chmod(0o755)


@needs_non_root
def test_unreadable_heads_weights_are_named(engine, tmp_path):
    from amphista_engine.heads import random_heads, save_heads
    path = save_heads(random_heads("medusa", engine.model, num_heads=1), tmp_path / "h")
    (path / "model.safetensors").chmod(0)
    with pytest.raises(ModelLoadError, match="model.safetensors: Permission denied"):
        engine.load_heads(str(path))


@needs_smollm2
def test_the_smollm2_file_gets_its_shipped_heads_however_it_is_named(tmp_path, home):
    from amphista_engine.loading import resolve_model_path
    from amphista_engine.shipped_heads import shipped_heads
    real = resolve_model_path("smollm2-135m")
    (home / "only").mkdir()
    (home / "only" / "m.gguf").symlink_to(real)
    (home / "SMOL.GGUF").symlink_to(real)
    (home / "smol").symlink_to(real)
    for name in ("~/only", "~/SMOL.GGUF", "~/smol", str(home / "smol")):
        assert shipped_heads(name, "amphista") is not None, name


@needs_smollm2
def test_a_model_folder_named_like_the_alias_is_not_passed_over_silently(tiny_hf_dir, home):
    from amphista_engine.loading import resolve_model_path
    shutil.copytree(tiny_hf_dir, Path("smollm2-135m"))
    with pytest.warns(UserWarning, match=r"also a model here .*pass ./smollm2-135m"):
        resolve_model_path("smollm2-135m")
    assert resolve_model_path("./smollm2-135m").is_dir()


def test_check_out_path_only_checks(tmp_path):
    """An --out under a file is an AmphistaError (one CLI line, one class for the API); a new nested folder is
    only checked, and made by the command that writes it."""
    from amphista_engine.text_files import check_out_path
    (tmp_path / "f").write_text("x")
    with pytest.raises(AmphistaError, match="is a file, not a folder"):
        check_out_path("--out", tmp_path / "f" / "x", folder=True)
    assert check_out_path("--out", tmp_path / "new" / "deeper", folder=True) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()


def test_python_api_readers_and_writers_expand_tilde(engine, shard, questions, prompts, home):
    """The CLI expanded its flags, but the Python entry points took "~/x" as a relative path: read_questions,
    read_prompts and load_shard said "not found", train_heads(TrainConfig(out="~/x")) wrote into a folder named
    `~`."""
    from amphista_engine.evaluation.questions import read_questions
    from amphista_engine.training.data import load_shard, read_prompts
    from amphista_engine.training.trainer import TrainConfig, train_heads
    for src, name in ((shard, "s.jsonl"), (questions, "q.jsonl"), (prompts, "p.jsonl")):
        shutil.copy(src, home / name)
    assert len(read_questions("~/q.jsonl")) == 2 and len(read_prompts("~/p.jsonl")) == 2
    assert len(load_shard("~/s.jsonl", engine.config.vocab_size, 64).sequences) == 20
    cfg = TrainConfig(data=["~/s.jsonl"], out="~/heads ü", steps=1, batch_tokens=200, num_heads=2, eval_frac=0.2,
                      log="~/t.log")
    train_heads(cfg, target=engine.model)
    assert (home / "heads ü" / "config.json").is_file() and (home / "t.log").is_file()
    no_literal_tilde()


def test_grammar_and_schema_files_take_tilde(home):
    """A quoted --grammar "~/g.lark" was "no such file", a --json-schema "~/s.json" was read as inline JSON ("not
    valid JSON")."""
    from amphista_engine.cli import _response_format, build_parser
    (home / "g.lark").write_text('start: "yes" | "no"\n')
    (home / "s.json").write_text('{"type": "object"}')
    args = build_parser().parse_args(["generate", "hi", "--grammar", "~/g.lark"])
    assert _response_format(args) == {"type": "grammar", "grammar": 'start: "yes" | "no"\n'}
    args = build_parser().parse_args(["generate", "hi", "--json-schema", "~/s.json"])
    assert _response_format(args) == {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}


def test_tree_files_take_tilde(home):
    """--tree "~/t.json" said "tree file not found"."""
    from amphista_engine.speculative import TreeSpec
    (home / "t.json").write_text("[[0], [1], [0, 0]]")
    assert TreeSpec("~/t.json", 3, "cpu").num_nodes == 4
