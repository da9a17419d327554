"""QA of `amphista generate` / `amphista chat` as a user runs them (2026-12-05): the streams around the answer
(stdin, stdout, stderr closed, failing or in another encoding), Ctrl-C at start-up, and flag messages. Each test
pins a bug that ended in a raw Python trace or a misleading message; all run on the tiny random checkpoint."""
from __future__ import annotations

import io
import re
import sys

import pytest

from amphista_engine import cli
from amphista_engine.cli import main

pytest.importorskip("transformers")        # tiny_hf_dir writes its checkpoint with it

PROMPT = "The quick brown fox"


def _args(tiny_hf_dir, *extra, command="generate"):
    return [command, "--model", str(tiny_hf_dir), "--device", "cpu", "--max-seq-len", "128", "--heads", "none",
            "--max-new-tokens", "6", *extra]


def _stdout(encoding="utf-8"):
    return io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="strict", write_through=True)


def _stdin(data: bytes, encoding="utf-8"):
    return io.TextIOWrapper(io.BytesIO(data), encoding=encoding, errors="strict")


def test_an_answer_the_stdout_encoding_cannot_show_is_written_with_replacements(tiny_hf_dir, monkeypatch, capsys):
    """PYTHONIOENCODING=ascii (or a Latin-1 terminal): the first chunk with a character the encoding lacks ended
    the run in a UnicodeEncodeError trace from sys.stdout.write."""
    out = _stdout()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(_args(tiny_hf_dir, PROMPT, "--no-chat")) == 0
    text = out.buffer.getvalue().decode()
    assert not text.isascii()                 # the tiny model's answer holds U+FFFD: the case under test
    ascii_out = _stdout("ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    with pytest.warns(UserWarning, match=r"stdout's encoding \(ascii\) cannot show some characters") as seen:
        assert main(_args(tiny_hf_dir, PROMPT, "--no-chat")) == 0
    assert ascii_out.buffer.getvalue() == text.encode("ascii", "replace") and len(seen) == 1


@pytest.mark.parametrize("encoding, data, message", [
    ("utf-8", b"a\xffb", r"the prompt on stdin is not UTF-8 text \(byte 0xff at character 1\)"),
    ("ascii", "héllo".encode(), r"the prompt on stdin is not ascii text \(byte 0xc3 at character 1; "
                                r"stdin is read as ascii: PYTHONIOENCODING=utf-8")])
def test_stdin_that_its_encoding_cannot_decode_is_named(tiny_hf_dir, monkeypatch, capsys, encoding, data, message):
    """With PYTHONIOENCODING=utf-8 or a UTF-8 locale other than C.UTF-8, Python decodes stdin strictly: a byte that
    is not UTF-8 raised UnicodeDecodeError from the codec instead of the 'not UTF-8 text' error."""
    monkeypatch.setattr(sys, "stdin", _stdin(data, encoding))
    assert main(_args(tiny_hf_dir, "-")) == 2
    err = capsys.readouterr().err
    assert re.search("amphista: error: " + message, err) and "loading" not in err


def test_chat_reports_an_undecodable_line_and_goes_on(tiny_hf_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", _stdin(b"a\xffb\nhello\n"))
    assert main(_args(tiny_hf_dir, "--max-seq-len", "256", command="chat")) == 0
    cap = capsys.readouterr()
    assert "that line is not UTF-8 text (byte 0xff at character 1); it was not sent" in cap.err
    assert cap.err.count("finish: ") == 1 and cap.out.strip()       # the next line was answered


@pytest.mark.parametrize("command, extra", [("generate", (PROMPT,)), ("generate", (PROMPT, "--json")),
                                            ("chat", ())])
def test_a_closed_stdout_is_an_error_before_the_load(tiny_hf_dir, monkeypatch, capsys, command, extra):
    """`amphista generate ... >&-`: AttributeError: 'NoneType' object has no attribute 'write', after the load."""
    monkeypatch.setattr(sys, "stdin", _stdin(b"hello\n"))
    monkeypatch.setattr(sys, "stdout", None)
    assert main(_args(tiny_hf_dir, *extra, command=command)) == 2
    err = capsys.readouterr().err
    assert "amphista: error: stdout is closed" in err and "loading" not in err


@pytest.mark.parametrize("command, extra", [("generate", ("-",)), ("chat", ())])
def test_a_closed_stdin_is_an_error_before_the_load(tiny_hf_dir, monkeypatch, capsys, command, extra):
    """`amphista generate - <&-` / `amphista chat <&-`: AttributeError on sys.stdin.read / readline."""
    monkeypatch.setattr(sys, "stdin", None)
    assert main(_args(tiny_hf_dir, *extra, command=command)) == 2
    err = capsys.readouterr().err
    assert "amphista: error: stdin is closed" in err and "loading" not in err


class _FullDisk(io.StringIO):
    def write(self, s):
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("extra", [(), ("--json",)])
def test_a_stdout_that_cannot_be_written_is_one_error_line(tiny_hf_dir, monkeypatch, capsys, extra):
    """`amphista generate ... > /dev/full`: a raw 'OSError: [Errno 28] No space left on device' trace."""
    monkeypatch.setattr(sys, "stdout", _FullDisk())
    assert main(_args(tiny_hf_dir, PROMPT, *extra)) == 2
    assert "amphista: error: cannot write the answer to stdout: No space left on device" in capsys.readouterr().err


def test_a_closed_stderr_keeps_the_progress_lines_out_of_the_answer(tiny_hf_dir, monkeypatch):
    """`2>&-`: print(file=None) writes to stdout, so 'loading ...' and the stats line landed in the answer."""
    out = _stdout()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(_args(tiny_hf_dir, PROMPT, "--no-chat")) == 0
    answer = out.buffer.getvalue()
    out = _stdout()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", None)
    assert main(_args(tiny_hf_dir, PROMPT, "--no-chat")) == 0
    assert out.buffer.getvalue() == answer


def test_ctrl_c_while_the_commands_import_is_quiet(monkeypatch):
    """Ctrl-C in the first seconds (torch importing while the parser is built) printed a KeyboardInterrupt trace."""
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        rc = main(["generate", "x"])
    except KeyboardInterrupt:               # (not raised on: pytest would stop the whole session)
        pytest.fail("Ctrl-C during start-up left main as a KeyboardInterrupt trace")
    assert rc == 130


@pytest.mark.parametrize("value", ["0", "-5", "1"])
def test_a_max_seq_len_below_two_is_named_as_such(value, capsys):
    """--max-seq-len 0 / -5 was reported as '--max-new-tokens 6 leaves no room for a prompt in the cache'."""
    assert main(["generate", "x", "--max-seq-len", value, "--max-new-tokens", "1"]) == 2
    assert f"amphista: error: --max-seq-len must be at least 2 (the static KV cache's length), got {value}" \
        in capsys.readouterr().err


def test_chat_takes_an_empty_system_message_as_generate_does(tiny_hf_dir, monkeypatch, capsys):
    """`chat --system ''` dropped the message (the template's default system prompt came back), while
    `generate --system ''` sends an empty one: the same flag gave two prompts."""
    assert main(_args(tiny_hf_dir, "hello", "--system", "")) == 0
    generate = re.search(r"prompt (\d+) tok", capsys.readouterr().err).group(1)
    monkeypatch.setattr(sys, "stdin", _stdin(b"hello\n"))
    assert main(_args(tiny_hf_dir, "--system", "", "--max-seq-len", "256", command="chat")) == 0
    assert re.search(r"prompt (\d+) tok", capsys.readouterr().err).group(1) == generate
