"""A second demanding user of `amphista eval` and `amphista perplexity`: an --out whose answers file lost its config
or its last newline, or holds a foreign line; a question file saved with a byte order mark; an --out or a --file
that cannot work, named before the model loads."""
from __future__ import annotations

import json

import pytest

from amphista_engine.cli import main as cli_main
from amphista_engine.errors import InputError
from amphista_engine.evaluation.questions import read_questions
from amphista_engine.evaluation.runner import run_eval
from conftest import write_questions

pytestmark = pytest.mark.usefixtures("one_thread_module")

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Compose a short travel blog post about Hawaii."]},
    {"question_id": 91, "category": "roleplay", "turns": ["Pretend yourself to be Elon Musk. Why go to Mars?"]},
]
QUIET = dict(progress=False, log=lambda msg: None)
NO_MODEL = "/nonexistent/model-dir"      # a load would fail on it: errors that name something else came first


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir, tmp_path_factory):
    from conftest import tiny_engine_with_saved_heads
    return tiny_engine_with_saved_heads(tiny_hf_dir, tmp_path_factory.mktemp("evalqa2"))[0]


@pytest.fixture
def questions(tmp_path):
    return write_questions(tmp_path / "q.jsonl", QUESTIONS)


def _ar(engine, q, out, **kw):
    return run_eval(q, methods="ar", engine=engine, out=out, warmup=0, **{"max_new_tokens": 4, **kw, **QUIET})


def test_answers_without_their_run_config_are_not_mixed_in(tiny, questions, tmp_path):
    """With run_config.json gone, 4-token answers were reused in a 12-token run, and the config rewritten to say 12."""
    out = tmp_path / "o"
    _ar(tiny, questions, out, limit=1)
    (out / "run_config.json").unlink()
    with pytest.raises(InputError, match=r"holds answers .* but no run_config.json"):
        _ar(tiny, questions, out, max_new_tokens=12)


def test_a_last_answer_without_its_newline_is_kept(tiny, questions, tmp_path, monkeypatch):
    """The next answer was appended onto that line, and the run after dropped both as one torn line."""
    out = tmp_path / "o"
    _ar(tiny, questions, out, limit=1)
    f = out / "answers.jsonl"
    f.write_text(f.read_text().rstrip("\n"))
    _ar(tiny, questions, out)
    assert [json.loads(line)["question_id"] for line in f.read_text().splitlines()] == [81, 91]
    calls = []
    real = tiny.generate
    monkeypatch.setattr(tiny, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    s = _ar(tiny, questions, out)
    assert calls == [] and s["overall"]["ar"]["questions"] == 2


def test_a_foreign_or_damaged_answers_line_is_named(tiny, questions, tmp_path):
    out = tmp_path / "o"
    _ar(tiny, questions, out, limit=1)
    f = out / "answers.jsonl"
    good = f.read_text()
    # a line with the key fields but none of the answer's: a KeyError trace from the summary before
    f.write_text(json.dumps({"question_id": 91, "method": "ar", "category": "roleplay"}) + "\n" + good)
    with pytest.raises(InputError, match=r"answers.jsonl:1: not a valid answer record \(no field 'choices'\)"):
        _ar(tiny, questions, out)
    f.write_bytes(good.encode() + b"\xff\xfe\n")         # a UnicodeDecodeError trace before
    with pytest.raises(InputError, match=r"answers.jsonl:2: not UTF-8 text"):
        _ar(tiny, questions, out)


def test_a_question_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(q) + "\r\n" for q in QUESTIONS).encode())
    assert [q["question_id"] for q in read_questions(path)] == [81, 91]


def test_an_out_that_cannot_be_made_is_named_before_the_load(questions, tmp_path):
    with pytest.raises(InputError, match=r"Not a directory: .*q.jsonl/x \(the --out folder cannot be made\)"):
        run_eval(questions, methods="ar", model=NO_MODEL, out=questions / "x", **QUIET)


def test_perplexity_names_an_empty_file_or_a_directory_before_the_load(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text(" \n\n")
    for path, want in ((tmp_path / "empty.txt", "empty.txt holds no text"), (tmp_path, "is a directory")):
        assert cli_main(["perplexity", "--model", NO_MODEL, "--file", str(path)]) == 2
        err = capsys.readouterr().err
        assert want in err and "loading" not in err and "Traceback" not in err
