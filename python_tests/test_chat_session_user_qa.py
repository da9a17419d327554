"""QA of `amphista chat` as a demanding user has it (2026-12-06): a conversation on stdin with the embedded SmolLM2
and the tiny test model. Every turn with the cache reused answered as a fresh engine given the same messages did
(plain, Amphista, Medusa; 4-bit, fp32 and bf16; across /reset, edited history, another system message, changed
chat_template_kwargs, a regenerated turn and a seeded sampled turn), so nothing here is about the engine. What failed
was reading what the user typed: pasted code lost its first line's indentation, a byte order mark at the start of
the input (a file saved by Notepad) went into the first message and hid a /reset or /exit there, and text ended
with Ctrl-D at a terminal had the answer run on after it on the same line."""
from __future__ import annotations

import io
import re

import pytest

import amphista_engine.cli as cli
from amphista_engine.cli import main
from amphista_engine.errors import InputError


def _chat(tiny_hf_dir, monkeypatch, capsys, stdin, spy=True):
    """Runs `amphista chat` on the tiny model with `stdin`; returns (exit code, the user messages sent, stderr)."""
    pytest.importorskip("transformers")          # tiny_hf_dir writes its checkpoint with it
    sent = []
    if spy:     # what would be sent, without decoding it
        monkeypatch.setattr(cli, "_chat_turn", lambda engine, system, history, turn, kw: sent.append(
            turn[0]["content"]))
    monkeypatch.setattr("sys.stdin", stdin)
    rc = main(["chat", "--model", str(tiny_hf_dir), "--device", "cpu", "--heads", "none", "--max-new-tokens", "4",
               "--max-seq-len", "128", "--system", "be brief"])
    return rc, sent, capsys.readouterr().err


def test_pasted_code_keeps_its_first_lines_indentation(tiny_hf_dir, monkeypatch, capsys):
    """A method pasted between triple quotes came out as `def f(self):\\n        return 1`: the message was strip()ped
    whole, taking the first line's indentation and leaving the body 8 columns right of its def. Only the blank
    lines around it go (and a one-line message is still stripped)."""
    text = ('"""\n\n    def f(self):\n        return 1\n   \n"""\n'
            '    x = 1 \\\n    y = 2\n'
            '"""   one line   """\n'
            '   plain   \n')
    rc, sent, err = _chat(tiny_hf_dir, monkeypatch, capsys, io.StringIO(text))
    assert rc == 0 and "Traceback" not in err
    assert sent == ["    def f(self):\n        return 1", "    x = 1 \n    y = 2", "one line", "plain"]


@pytest.mark.parametrize("first, want", [("/reset", ["hello"]), ("/exit", []), ("fox", ["fox", "hello"])])
def test_a_byte_order_mark_at_the_start_of_the_input_is_not_text(tiny_hf_dir, monkeypatch, capsys, first, want):
    """A conversation file saved with a BOM: `\\ufeff/exit` was sent to the model as a message (and the chat went
    on), `\\ufefffox` reached the model as a BOM and fox. The mark is taken off the input's first line only."""
    rc, sent, err = _chat(tiny_hf_dir, monkeypatch, capsys, io.StringIO(f"\ufeff{first}\nhello\n"))
    assert rc == 0 and sent == want
    assert "unknown command" not in err


def test_generate_reads_a_prompt_file_with_a_byte_order_mark_as_its_text(monkeypatch):
    """`amphista generate - < prompt.txt` with a BOM: the mark went into the prompt (3 more bytes for the model)."""
    seen = []

    def load(args, prompt=None):
        seen.append(prompt)
        raise InputError("stop before the load")
    monkeypatch.setattr(cli, "_load", load)
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeffWhat is 2+2?\n"))
    assert main(["generate", "-", "--max-new-tokens", "4"]) == 2
    assert seen == ["What is 2+2?"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_text_ended_by_ctrl_d_at_a_terminal_is_answered_on_a_line_of_its_own(tiny_hf_dir, monkeypatch, capsys, tty):
    """At a terminal, `abc` then Ctrl-D (no Enter) sends abc with no newline: the answer and its stats line ran on
    after it, "> abcI'm sorry...". A pipe's last line without a newline is not echoed: nothing is added there."""
    stdin = (_Terminal if tty else io.StringIO)("fox\nabc")
    rc, _, err = _chat(tiny_hf_dir, monkeypatch, capsys, stdin, spy=False)
    assert rc == 0 and "Traceback" not in err
    stats = [m.start() for m in re.finditer(r"\[plain\] prompt \d+ tok", err)]
    assert len(stats) == 2
    assert err[:stats[0]].endswith("> ")             # an answer to a line typed with Enter follows its "> " line
    assert err[:stats[1]].endswith("> \n" if tty else "> ")
