"""QA of `amphista generate` as a shell user scripts it (2026-12-05): where the prompt comes from, what stdout holds
(one answer, or one JSON object whose keys --help names), what Ctrl-C does to a shell loop around it, and flags that
did nothing without a word. Each test pins a bug; all but the last run on the tiny random checkpoint."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import warnings

import pytest

from amphista_engine import Engine
from amphista_engine.cli import main
from amphista_engine.errors import NonFiniteError

from conftest import needs_smollm2

pytest.importorskip("transformers")        # tiny_hf_dir writes its checkpoint with it

PROMPT = "The quick brown fox"             # the tiny model answers it without an EOS for thousands of tokens


def _args(model, *extra, new=6):
    return ["--model", str(model), "--device", "cpu", "--max-seq-len", "128", "--heads", "none",
            "--max-new-tokens", str(new), "--no-chat", *extra]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("before", [[], ["-x"]])
def test_a_missing_prompt_says_how_to_give_one(tiny_hf_dir, capsys, before):
    """`cat q.txt | amphista generate` and `amphista generate -x` said only 'the following arguments are required:
    prompt': nothing about '-' (stdin is read only for it) nor about '--' before a prompt starting with '-'."""
    with pytest.raises(SystemExit) as exit_:
        main(["generate", *before, *_args(tiny_hf_dir)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "required: prompt; give it as an argument or '-' to read it from stdin" in err
    assert "goes after '--' (amphista generate -- '-x')" in err
    assert main(["generate", *_args(tiny_hf_dir), "--", "-x"]) == 0        # what the hint says works
    assert capsys.readouterr().out.endswith("\n")


def test_reading_the_prompt_from_a_terminal_says_so(tiny_hf_dir, monkeypatch, capsys):
    """`amphista generate -` typed at a terminal waited in silence for input that was never coming."""
    monkeypatch.setattr(sys, "stdin", _Terminal(PROMPT + "\n"))
    assert main(["generate", "-", *_args(tiny_hf_dir)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("reading the prompt from stdin (end it with Ctrl-D)\n") and "loading" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))          # piped: no note
    assert main(["generate", "-", *_args(tiny_hf_dir)]) == 0
    assert "reading the prompt" not in capsys.readouterr().err


def test_a_stop_string_that_is_not_utf8_is_refused(tiny_hf_dir, capsys):
    """`--stop $'a\\xffb'`: argv's lone surrogate could never match the answer text, so the flag did nothing,
    while the same bytes in the prompt or --system are refused."""
    assert main(["generate", PROMPT, *_args(tiny_hf_dir), "--stop", "ok", "--stop", "a\udcffb"]) == 2
    err = capsys.readouterr().err
    assert "amphista: error: a --stop string is not UTF-8 text (byte 0xff at character 1)" in err
    assert "loading" not in err


def _json(tiny_hf_dir, capsys, *extra):
    assert main(["generate", PROMPT, *_args(tiny_hf_dir, "--json", *extra)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.endswith("\n")                       # one object, on one line
    return json.loads(out)


def test_sampling_flags_under_greedy_decoding_say_they_do_nothing(tiny_hf_dir, capsys):
    """A script passing --seed or --top-k without --temperature got greedy text, with no word that those flags
    were ignored."""
    plain = _json(tiny_hf_dir, capsys)
    with pytest.warns(UserWarning, match=r"^--top-k 5, --seed 3 have no effect with greedy decoding "
                                         r"\(--temperature 0, the default\): add --temperature T to sample$"):
        assert _json(tiny_hf_dir, capsys, "--top-k", "5", "--seed", "3")["token_ids"] == plain["token_ids"]
    with pytest.warns(UserWarning, match=r"^--top-p 0.5 has no effect with greedy"):
        _json(tiny_hf_dir, capsys, "--top-p", "0.5")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no effect with greedy")
        sampled = _json(tiny_hf_dir, capsys, "--temperature", "1", "--top-k", "5", "--seed", "3")
    assert sampled["token_ids"] == _json(tiny_hf_dir, capsys, "--temperature", "1", "--top-k", "5", "--seed", "3")[
        "token_ids"]                                                    # the seed is used: same seed, same text


def test_a_tree_with_no_heads_to_draft_with_is_named(tiny_hf_dir, capsys):
    """`--tree tree-16` on a model with no shipped heads decoded plainly, the flag dropped without a word (with
    --heads none the same flag is refused)."""
    args = [a for a in _args(tiny_hf_dir) if a not in ("--heads", "none")]
    with pytest.warns(UserWarning, match=r"--tree tree-16 is not used: there are no drafting heads to draft with"):
        assert main(["generate", PROMPT, *args, "--tree", "tree-16"]) == 0
    assert "[plain]" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_q4_on_a_gpu_is_refused_before_the_load(capsys, device):
    """--quant q4 --device cuda loaded the whole model first, then said "quant='q4' runs on the CPU only ... use
    quant='none'" in the API's terms (or, without CUDA, named the missing CUDA instead)."""
    assert main(["generate", "hi", "--model", "/no/such/model", "--device", device, "--quant", "q4"]) == 2
    err = capsys.readouterr().err
    assert f"amphista: error: --quant q4 runs on the CPU only (--device {device}); use --quant auto or none" in err
    assert "loading" not in err


def test_an_error_mid_answer_starts_its_own_line(tiny_hf_dir, monkeypatch, capsys):
    """An AmphistaError raised while the answer streams (NonFiniteError: fp16 overflow) left the cut answer without
    its newline: on a terminal, 'amphista: error: ...' went on at the end of the answer's line."""
    stream = Engine.stream

    def fails_after_one_chunk(self, prompt, **kwargs):
        chunks = stream(self, prompt, **kwargs)

        def gen():
            yield next(chunks)
            raise NonFiniteError("the logits turned NaN at token 2")
        return gen()

    monkeypatch.setattr(Engine, "stream", fails_after_one_chunk)
    assert main(["generate", PROMPT, *_args(tiny_hf_dir)]) == 2
    cap = capsys.readouterr()
    assert cap.out.endswith("\n") and cap.out.strip() and cap.out.count("\n") == 1
    assert "amphista: error: the logits turned NaN at token 2" in cap.err and "Traceback" not in cap.err


DOCUMENTED = {"text", "token_ids", "prompt_tokens", "finish_reason", "stats", "speculative", "weights", "kernels",
              "speculation_check"}


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())      # argparse wraps the help text


def test_json_help_names_the_keys_a_script_reads(tiny_hf_dir, capsys):
    """--json's keys were documented nowhere (README: 'one machine-readable object'; --help: 'one JSON object')."""
    text = _help(capsys)
    for key in DOCUMENTED | {"eos, length or stop", "tau", "tree_nodes", "dtype, quant, linears"}:
        assert key in text, key
    # stdout is that one object even where warnings are written (they go to stderr)
    with pytest.warns(UserWarning):
        out = _json(tiny_hf_dir, capsys, "--max-seq-len", "600", "--seed", "1")
    assert set(out) == DOCUMENTED - {"speculation_check"} and out["speculative"] is None
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 6
    assert {"prompt_tokens", "new_tokens", "prefill_ms", "decode_ms", "tau", "accept_hist"} <= set(out["stats"])


def _cmd(tiny_hf_dir, new=3000):
    return [sys.executable, "-m", "amphista_engine.cli", "generate", PROMPT, "--model", str(tiny_hf_dir), "--device",
            "cpu", "--max-seq-len", "4096", "--max-new-tokens", str(new), "--no-chat", "--heads", "none"]


@pytest.mark.skipif(os.name != "posix", reason="signals and a POSIX shell")
def test_ctrl_c_ends_the_process_by_sigint_and_stops_a_shell_loop(tiny_hf_dir):
    """Ctrl-C ended the run with exit(130): bash then took the child for one that handled the signal and went on
    with `for f in ...; do amphista generate ...; done` at the next item, at each Ctrl-C."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(tiny_hf_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(1)                   # the answer streams: the model is loaded and decoding
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and b"Traceback" not in err      # the shell's $? is 130
    # what a terminal's Ctrl-C does: SIGINT to the whole foreground group, the shell running the loop included
    loop = ('for i in 1 2; do "$@"; echo "went on after $i" >&2; done; echo "loop done" >&2')
    shell = subprocess.Popen(["bash", "-c", loop, "bash", *_cmd(tiny_hf_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        assert shell.stdout.read(1)
        os.killpg(shell.pid, signal.SIGINT)
        _, err = shell.communicate(timeout=120)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
    assert b"went on after" not in err and b"loop done" not in err and b"Traceback" not in err
    assert shell.returncode == -signal.SIGINT


@needs_smollm2
def test_the_embedded_models_json_holds_the_documented_keys(capsys):
    """The real model with its shipped heads (the CPU times them: speculation_check, a tree in stats): every key
    of the object is one --help names, and nothing but it is on stdout."""
    text = _help(capsys)
    assert main(["generate", "What is 2+2? Answer with one number.", "--max-new-tokens", "12", "--device", "cpu",
                 "--max-seq-len", "256", "--json"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert cap.out == json.dumps(out) + "\n" and "loading smollm2-135m" in cap.err
    assert set(out) == DOCUMENTED and "4" in out["text"]
    assert out["speculative"] in ("amphista", None) and ("tree" in out["stats"]) == (out["speculative"] is not None)
    assert out["speculation_check"]["pays"] == (out["speculative"] is not None)
    assert all(k in text for k in ("tree", "tree_nodes", "accept_hist"))
