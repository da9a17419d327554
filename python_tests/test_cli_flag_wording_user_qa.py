"""QA of what `amphista generate` and `amphista chat` tell a user at the shell (2026-12-07). The engine's errors and
warnings name its Python keyword arguments, and the commands printed them as they were: a message too long for the
cache was "longer than the cache (max_seq_len=128)", followed by the command's own copy of the same advice; a tree
that did not fit suggested "speculative=None, or 'auto'"; the fallback of --speculative auto to plain decoding named
max_new_tokens and max_seq_len. And `amphista chat` at a terminal read sys.stdin directly: no line editing, the up
arrow typed ^[[A into the message instead of recalling the last one."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import types
import warnings

import pytest

from amphista_engine import Engine
from amphista_engine.cli import main

API_NAMES = re.compile(r"max_seq_len|max_new_tokens|(?<![-\w])speculative=")


def _run(monkeypatch, capsys, argv, stdin=""):
    """main(argv) with `stdin`, the warnings it shows written to stderr as the command writes them (pytest records
    warnings instead of showing them, and so would never call the command's formatter)."""
    pytest.importorskip("transformers")          # tiny_hf_dir writes its checkpoint with it
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _tiny(tiny_hf_dir, command, *extra):
    return [command, *extra, "--model", str(tiny_hf_dir), "--device", "cpu"]


def _prompt_tokens(engine, prompt) -> int:
    return len(engine.encode_prompt(prompt, None))


# ------------------------------------------------------------------------------------ errors and warnings

def test_chat_a_message_too_long_for_the_cache_names_the_flags_and_says_its_advice_once(tiny_hf_dir, monkeypatch,
                                                                                         capsys):
    rc, _, err = _run(monkeypatch, capsys, _tiny(tiny_hf_dir, "chat", "--heads", "none", "--max-seq-len", "128",
                                                 "--max-new-tokens", "10"), "fox " * 200 + "\n")
    assert rc == 0 and "Traceback" not in err
    (line,) = re.findall(r"amphista: error: .*", err)
    assert "longer than the cache (--max-seq-len=128)" in line and "with --max-new-tokens=10 it needs --max-seq-len" \
        in line and "It was not sent (the conversation so far is kept)" in line
    assert not API_NAMES.search(err), line
    assert line.count("--max-seq-len") == 3 and line.count("raise --max-seq-len") == 1, line    # no second advice


def test_generate_names_the_flags_in_the_engines_errors(tiny_hf_dir, monkeypatch, capsys):
    rc, out, err = _run(monkeypatch, capsys, _tiny(tiny_hf_dir, "generate", "fox " * 200, "--heads", "none",
                                                   "--max-seq-len", "64", "--max-new-tokens", "10"))
    assert rc == 2 and out == "" and "Traceback" not in err
    assert "longer than the cache (--max-seq-len=64): no room for an answer; shorten it or raise --max-seq-len " \
           "(with --max-new-tokens=10 it needs --max-seq-len >= " in err
    assert not API_NAMES.search(err), err
    # an error the engine raises for the run's settings was said with the API's names (only a full cache's wasn't)
    rc, out, err = _run(monkeypatch, capsys, _tiny(tiny_hf_dir, "generate", "fox", "--heads", "none", "--min-tokens",
                                                   "5", "--max-new-tokens", "4"))
    assert rc == 2 and "amphista: error: --min-tokens (5) is more than --max-new-tokens (4)" in err, err
    assert "min_tokens" not in err and not API_NAMES.search(err), err


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_a_tree_that_does_not_fit_suggests_the_speculative_flag(tiny_amphista_engine, tiny_hf_dir,
                                                                tiny_amphista_heads_dir, monkeypatch, capsys, command):
    """The answer fits the cache, the tree's scratch slots do not: the way out is plain decoding, which the engine
    named as speculative=None or 'auto'."""
    prompt = [{"role": "user", "content": "fox"}] if command == "chat" else "fox"
    room = 256 - _prompt_tokens(tiny_amphista_engine, prompt)       # exactly the answer's room
    argv = _tiny(tiny_hf_dir, command, *(["fox"] if command == "generate" else []), "--heads",
                 str(tiny_amphista_heads_dir), "--speculative", "amphista", "--tree", "tree-16", "--max-seq-len",
                 "256", "--max-new-tokens", str(room))
    rc, _, err = _run(monkeypatch, capsys, argv, "fox\n")
    assert rc == (0 if command == "chat" else 2) and "Traceback" not in err, err
    (line,) = re.findall(r"amphista: error: .*", err)
    assert f"--max-new-tokens ({room}) + tree room" in line and "exceeds the cache (--max-seq-len=256)" in line
    assert "decode plainly (--speculative none or auto, which does so where only the tree's room is missing)" in line
    assert not API_NAMES.search(err), line
    assert line.count("raise --max-seq-len") == 1, line


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_the_warning_that_auto_decodes_plainly_names_the_flags(tiny_amphista_engine, tiny_hf_dir,
                                                               tiny_amphista_heads_dir, monkeypatch, capsys, command):
    """--speculative auto with heads that pay here, and a cache with room for the answer but not the tree: the run
    decodes plainly, with a warning that named speculative='auto', max_new_tokens and max_seq_len."""
    check = types.SimpleNamespace(pays=True, tree="tree-16", reason="the heads pay here (the test says so)",
                                  to_dict=lambda: {})
    monkeypatch.setattr(Engine, "speculation_check", lambda self, *a, **k: check)    # no timing, always pays
    prompt = [{"role": "user", "content": "fox"}] if command == "chat" else "fox"
    room = 256 - _prompt_tokens(tiny_amphista_engine, prompt) - 1
    argv = _tiny(tiny_hf_dir, command, *(["fox"] if command == "generate" else []), "--heads",
                 str(tiny_amphista_heads_dir), "--speculative", "auto", "--tree", "tree-16", "--max-seq-len", "256",
                 "--max-new-tokens", str(room))
    rc, _, err = _run(monkeypatch, capsys, argv, "fox\n")
    assert rc == 0 and "Traceback" not in err and "amphista: error" not in err
    (line,) = re.findall(r"amphista: warning: .*", err)
    assert line.startswith("amphista: warning: --speculative=auto: the tree needs ") and \
        "past prompt + --max-new-tokens, but --max-seq-len=256 leaves 1; decoding plainly (to speculate: " \
        "--max-new-tokens <= " in line and " or --max-seq-len >= " in line, line
    assert not API_NAMES.search(err), line
    assert re.search(r"\n\[plain\] prompt \d+ tok", err)


def test_the_python_api_keeps_its_argument_names(tiny_hf_dir):
    """The wording is the commands': an Engine's caller is still told max_seq_len and max_new_tokens."""
    from amphista_engine.errors import CacheFullError
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=64)
    with pytest.raises(CacheFullError, match=r"longer than the cache \(max_seq_len=64\).*max_new_tokens=10"):
        eng.generate("fox " * 200, max_new_tokens=10)


# ------------------------------------------------------------------------------------ chat at a terminal

# `amphista chat` with no model: what each turn would send is written to stderr as JSON.
CHILD = r"""
import json, os, sys
if sys.argv[1]:
    os.dup2(os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)    # answers go to a file
import amphista_engine.cli as cli
engine = type("E", (), {"tokenizer": type("T", (), {"chat_template": "{{ messages }}"})()})()
cli._load = lambda args, prompt=None: (engine, None, None, None)
cli._chat_turn = lambda engine, system, history, turn, kw: print(
    "sent:" + json.dumps(turn[0]["content"]), file=sys.stderr, flush=True)
rc = cli.main(["chat", "--heads", "none", "--max-new-tokens", "4"])
print("readline " + ("imported" if "readline" in sys.modules else "not imported") + f", exit {rc}", file=sys.stderr,
      flush=True)
"""


def _sent(text: str) -> list[str]:
    return [json.loads(s) for s in re.findall(r"sent:(\".*?\")\r?\n", text)]


class _Pty:
    """The child on a pseudo-terminal (stdin and stderr; stdout a file): keys written, what it shows read."""

    def __init__(self, out_path):
        import pty
        self.pid, self.fd = pty.fork()
        if self.pid == 0:        # the child: nothing of pytest's runs here
            try:
                os.environ["TERM"] = "xterm"
                os.execv(sys.executable, [sys.executable, "-c", CHILD, str(out_path)])
            finally:
                os._exit(127)
        self.shown = b""

    def until(self, what: bytes, after: int = 0, timeout: float = 60):
        import select
        end = time.monotonic() + timeout
        while what not in self.shown[after:] and time.monotonic() < end:
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.shown += os.read(self.fd, 4096)
                except OSError:       # the child ended
                    break
        assert what in self.shown[after:], (what, self.shown)

    def type(self, keys: bytes, then: bytes = b"> "):
        """Types keys (Enter is \r, as a terminal sends it) and waits for the next prompt."""
        start = len(self.shown)
        os.write(self.fd, keys)
        self.until(then, after=start)

    def close(self):
        os.write(self.fd, b"\x04")              # Ctrl-D at an empty prompt: the end of input
        self.until(b", exit 0")
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        return self.shown.decode(errors="replace")


@pytest.fixture
def terminal(tmp_path):
    pytest.importorskip("readline")
    if os.name != "posix":
        pytest.skip("pseudo-terminals are POSIX")
    term = _Pty(tmp_path / "answers.txt")
    term.until(b"> ")
    yield term, tmp_path / "answers.txt"
    try:
        os.kill(term.pid, 9)
        os.waitpid(term.pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass


def test_chat_at_a_terminal_edits_lines_and_recalls_the_last_one(terminal):
    term, answers = terminal
    term.type(b"What is 2+2?\r")
    term.type(b"\x1b[A\r")                          # up arrow, Enter: the same message again
    term.type(b"Name a fruitX\x7f.\r")               # a backspace deletes, as at any prompt
    term.type(b"Name a cat.\x1b[D\x1b[D\x1b[D\x1b[Dred \r")    # left arrows move the cursor into the line
    term.type(b"\x1b[A\x1b[A\x1b[A\r")               # three lines back
    shown = term.close()
    assert _sent(shown) == ["What is 2+2?", "What is 2+2?", "Name a fruit.", "Name a red cat.", "What is 2+2?"]
    assert "readline imported, exit 0" in shown
    assert answers.read_bytes() == b""              # the prompt and the echo went to the terminal, not to stdout


def test_chat_at_a_terminal_keeps_its_multi_line_messages(terminal):
    term, _ = terminal
    term.type(b'"""\r', then=b"... ")
    term.type(b"def (x):" + b"\x1b[D" * 4 + b"f\r", then=b"... ")      # edited in a continuation line
    term.type(b'    return x"""\r')
    term.type(b"one \\\r", then=b"... ")
    term.type(b"two\r")
    term.type(b'"""\r', then=b"... ")
    shown = term.close()                          # Ctrl-D inside a block: not sent
    assert _sent(shown) == ["def f(x):\n    return x", "one \ntwo"]
    assert "(the input ended inside a multi-line message: not sent)" in shown
    assert "readline imported, exit 0" in shown


def test_piped_input_is_read_as_it_was_without_readline(tmp_path):
    """A pipe is not a terminal: its lines are the messages as they are, escapes included, with no readline."""
    if os.name != "posix":
        pytest.skip("POSIX pipes")
    lines = 'hello\n\x1b[A\n"""\n  a\nb"""\nx\\\ny\n/exit\n'
    run = subprocess.run([sys.executable, "-c", CHILD, ""], input=lines.encode(), capture_output=True, timeout=120)
    err = run.stderr.decode()
    assert run.returncode == 0 and run.stdout == b"", err
    assert _sent(err) == ["hello", "\x1b[A", "  a\nb", "x\ny"]
    assert "readline not imported, exit 0" in err
    assert err.count("> ") == 5 and err.count("... ") == 3     # the prompts on stderr, one per line read
