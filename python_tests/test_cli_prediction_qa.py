"""OpenAI's predicted outputs at the CLI: `amphista generate PROMPT --prediction TEXT` / `--prediction-file PATH`,
on the embedded (4-bit) SmolLM2. Before: the engine and the server took a prediction, the CLI had no flag for one
(argparse: "unrecognized arguments"), so a user editing a file from the shell could not draft from it. Now generate
passes it to the engine as prediction= (a plain --speculative auto run, --heads none or heads slower than plain
steps, decodes by lookup; heads that pay run beside a lookup chain), --json's stats count OpenAI's accepted and
rejected prediction tokens as the server's usage does (prompt_lookup.prediction_counts, one home), and a file that
is missing, not UTF-8 or empty, an empty text, both flags, or a --speculative that never drafts from it is refused
by name before the load."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from amphista_engine.cli import build_parser, main
from conftest import needs_smollm2

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

PROMPT = "Add type hints to this function: def add(a, b): return a + b"


def _generate(capsys, *flags, new=20):
    rc = main(["generate", PROMPT, "--device", "cpu", "--max-new-tokens", str(new), "--json", *flags])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def plain():
    """The greedy answer without a prediction (--heads none: plain decoding), read once for the module (whose
    scope has no capsys: stdout caught here)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["generate", PROMPT, "--device", "cpu", "--max-new-tokens", "20", "--json", "--heads",
                     "none"]) == 0
    got = json.loads(out.getvalue())
    assert got["speculative"] is None and len(got["token_ids"]) == 20
    return got


def test_the_plain_answer_as_prediction_is_accepted_whole_in_fewer_steps(capsys, plain):
    """--heads none with --speculative auto (the default) decodes by lookup from the prediction: the same tokens,
    every predicted token accepted, and more tokens per step than lookup from the prompt alone."""
    lookup = _generate(capsys, "--speculative", "lookup")
    got = _generate(capsys, "--heads", "none", "--prediction", plain["text"])
    assert got["token_ids"] == plain["token_ids"] and got["text"] == plain["text"]
    assert got["speculative"] == "lookup" and got["stats"]["method"] == "lookup"
    assert got["stats"]["accepted_prediction_tokens"] == len(plain["token_ids"])
    assert got["stats"]["rejected_prediction_tokens"] == 0
    assert got["stats"]["tau"] > lookup["stats"]["tau"]
    assert "accepted_prediction_tokens" not in lookup["stats"]      # no prediction, no counts (as OpenAI's usage)


def test_a_wrong_prediction_keeps_the_answer_and_counts_its_rejected_tokens(capsys, plain):
    from amphista_engine import Engine
    from amphista_engine.prompt_lookup import prediction_ids
    guess = "def add(a: int, b: int) -> int:\n    return a + b\n"
    got = _generate(capsys, "--speculative", "lookup", "--prediction", guess)
    assert got["token_ids"] == plain["token_ids"]
    stats = got["stats"]
    engine = Engine.from_pretrained("smollm2-135m", device="cpu")
    assert stats["accepted_prediction_tokens"] + stats["rejected_prediction_tokens"] == len(
        prediction_ids(engine.tokenizer, guess, engine.max_seq_len))
    assert stats["rejected_prediction_tokens"] > 0


def test_prediction_file_reads_the_file(capsys, plain, tmp_path):
    path = tmp_path / "expected.txt"
    path.write_bytes(b"\xef\xbb\xbf" + plain["text"].encode())     # a byte order mark is no answer text
    got = _generate(capsys, "--heads", "none", "--prediction-file", str(path))
    assert got["token_ids"] == plain["token_ids"] and got["speculative"] == "lookup"
    assert got["stats"]["accepted_prediction_tokens"] == len(plain["token_ids"])
    assert got["stats"]["rejected_prediction_tokens"] == 0


@pytest.mark.parametrize("pays, method", [(True, "amphista+lookup"), (False, "lookup")])
def test_auto_with_the_shipped_heads(capsys, plain, monkeypatch, pays, method):
    """The default run (shipped heads, --speculative auto): beside the heads where the CPU's check says they pay,
    by lookup alone where it says plain decoding (the heads never read a prediction). The check is stubbed: its
    verdict is a timing."""
    from amphista_engine import Engine
    from amphista_engine.speculation_check import SpeculationCheck
    monkeypatch.setattr(Engine, "speculation_check",
                        lambda self, tree=None, *a, **k: SpeculationCheck(pays, tree or "dynamic-4", "stubbed"))
    got = _generate(capsys, "--prediction", plain["text"])
    assert got["token_ids"] == plain["token_ids"] and got["speculative"] == method
    assert got["stats"]["rejected_prediction_tokens"] == 0


@pytest.fixture
def no_load(monkeypatch):
    from amphista_engine import Engine

    def refuse(*a, **k):
        raise AssertionError("the model loaded before the flags were checked")
    monkeypatch.setattr(Engine, "from_pretrained", refuse)


def _error(capsys, *flags) -> str:
    rc = main(["generate", PROMPT, "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.startswith("amphista: error:") and err.count("\n") == 1, err     # one line, as the CLI's errors
    return err


@pytest.mark.parametrize("speculative", ["none", "amphista", "medusa"])
@pytest.mark.parametrize("flag", ["--prediction", "--prediction-file"])
def test_a_method_that_never_reads_the_prediction_is_refused(capsys, no_load, tmp_path, speculative, flag):
    path = tmp_path / "f.py"
    path.write_text("def f(x: int) -> int:\n    return x\n")
    value = str(path) if flag == "--prediction-file" else "def f(x: int) -> int: ..."
    err = _error(capsys, flag, value, "--speculative", speculative)
    for word in (flag, f"--speculative {speculative}", "--speculative auto", "lookup", "amphista+lookup",
                 "medusa+lookup"):
        assert word in err, (word, err)


def test_bad_prediction_files_and_texts_are_named(capsys, no_load, tmp_path):
    missing = tmp_path / "nope.py"
    err = _error(capsys, "--prediction-file", str(missing))
    assert f"--prediction-file {str(missing)!r}: no such file" in err
    err = _error(capsys, "--prediction-file", str(tmp_path))
    assert "--prediction-file" in err and "is a directory" in err
    latin = tmp_path / "latin1.py"
    latin.write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    err = _error(capsys, "--prediction-file", str(latin))
    assert "--prediction-file" in err and str(latin) in err and "not UTF-8" in err
    empty = tmp_path / "empty.py"
    empty.write_text("\n")
    err = _error(capsys, "--prediction-file", str(empty))
    assert f"--prediction-file {str(empty)!r} is empty" in err
    assert "--prediction is empty" in _error(capsys, "--prediction", "")
    # bytes that are not UTF-8 in argv reach Python as lone surrogates
    assert "--prediction is not UTF-8 text" in _error(capsys, "--prediction", "caf\udce9")


def test_both_flags_are_refused_and_only_generate_takes_them(capsys, no_load, tmp_path):
    path = tmp_path / "f.py"
    path.write_text("x = 1\n")
    with pytest.raises(SystemExit) as e:
        main(["generate", PROMPT, "--prediction", "x = 1", "--prediction-file", str(path)])
    assert e.value.code == 2
    assert "--prediction-file: not allowed with argument --prediction" in capsys.readouterr().err
    commands = build_parser()._subparsers._group_actions[0].choices
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in commands.items()}
    assert {"--prediction", "--prediction-file"} <= flags["generate"]
    assert not {"--prediction", "--prediction-file"} & (flags["chat"] | flags["eval"])
