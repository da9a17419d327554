"""QA of a long `amphista chat` session as a user has one (2026-12-05): a conversation that outgrows --max-seq-len,
every turn's answer against a fresh engine given the same messages (plain, Amphista and Medusa heads, across
/reset, a cut answer, a stop string, an answer with special tokens and a Ctrl-C mid-answer), and stdin's edges.
The engine was right throughout; what failed was what the user is told: the note on dropped exchanges came after
the answer, a message too long for the cache named the API's max_seq_len and no way out, `chat --help` explained
nothing, a growing message list in the API was not told it can drop old turns, and end of input left "> " open."""
from __future__ import annotations

import io
import re

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.cli import main
from amphista_engine.errors import CacheFullError

from conftest import needs_smollm2

SYSTEM = {"role": "system", "content": "Be brief."}
SPECIAL = 13            # <jupyter_code> in SmolLM2's vocabulary: a special token the answer text leaves out


def _tiny_chat(tiny_hf_dir, monkeypatch, capsys, text, *extra):
    pytest.importorskip("transformers")          # tiny_hf_dir writes its checkpoint with it
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    rc = main(["chat", "--model", str(tiny_hf_dir), "--device", "cpu", "--heads", "none", "--max-new-tokens", "4",
               *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ---------------------------------------------------------------- the real model, a long session

@pytest.fixture(scope="module")
def engines():
    """(the engine the CLI chats on, a reference given each turn's whole message list afresh)."""
    return tuple(Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=120)
                 for _ in range(2))


LINES = ["Write a poem about the sea.", "", "   ", "Another one, about rain.\r", "/foo", "/help",
         "Tell me a story about a fox.", "/reset", "What is 2+2?", "Name three fruits.", "And three colors?", "Why?",
         "Write a poem about Rome.", "Another, about Paris."]
INTERRUPTED, FORCED = 5, 4          # the turns (recorded runs) cut by Ctrl-C and made to emit a special token


@needs_smollm2
@pytest.mark.parametrize("heads, kind", [("none", None), ("default", "amphista"), ("smollm2-135m-medusa", "medusa")])
def test_a_long_chat_answers_each_turn_as_a_fresh_engine_and_says_what_it_drops(engines, heads, kind, monkeypatch,
                                                                                 capsys):
    """Through drops of the oldest exchanges (the system message kept), /reset, answers cut by --max-new-tokens and
    ended by --stop, an answer holding a special token and a Ctrl-C mid-answer, every kept turn decodes (with the
    cache reused from the turn before) the tokens a fresh engine decodes from the same messages. The note saying
    exchanges were dropped came after the answer and its stats line; it now comes before them."""
    chat, fresh = engines
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **k: chat))
    stream, runs = Engine.stream, []

    def recorded(self, prompt, **kw):
        chunks = stream(self, prompt, **kw)          # raises CacheFullError here: not a run
        runs.append([[dict(m) for m in prompt], kw, None])
        hooks, n = [], len(runs)
        if n == INTERRUPTED:                          # Ctrl-C lands in the first decode step of this run

            def interrupt(module, args, calls=[]):
                calls.append(1)
                if len(calls) == 2:
                    raise KeyboardInterrupt
            hooks.append(self.model.register_forward_pre_hook(interrupt))
        if n == FORCED:                               # the LM head's 3rd call picks the special token

            def force(module, args, out, calls=[]):
                calls.append(1)
                if len(calls) == 3:
                    out[..., SPECIAL] = out.max() + 100
            hooks.append(self.model.output.register_forward_hook(force))

        def body():
            try:
                yield from chunks
                runs[-1][2] = self.last_result
            finally:
                for h in hooks:
                    h.remove()
        return body()

    monkeypatch.setattr(Engine, "stream", recorded)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(LINES)))      # no newline at the end: EOF mid-line
    spec = ["--speculative", kind] if kind else []
    rc = main(["chat", "--max-seq-len", "120", "--max-new-tokens", "24", "--device", "cpu", "--heads", heads, *spec,
               "--stop", "fox", "--system", SYSTEM["content"]])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err and err.endswith("> \n")
    assert "unknown command /foo" in err and "oldest exchanges are left out" in err          # /help says so
    assert len(runs) == 9 and runs[INTERRUPTED - 1][2] is None and "(interrupted" in err
    assert SPECIAL in runs[FORCED - 1][2].token_ids and "<jupyter_code>" not in runs[FORCED - 1][2].text
    finishes = re.findall(r"finish: (\w+)", err)
    assert {"stop", "length"} <= set(finishes)
    # dropped exchanges are announced before the answer (its stats line follows the note), the system message kept
    notes = re.findall(r"\(the oldest (?:exchange no longer fits|\d+ exchanges no longer fit) the cache "
                       r"\(--max-seq-len\): dropped; the --system message stays\)\n\[(?:plain|amphista|medusa)", err)
    assert len(notes) >= 2 and not re.search(r"finish: \w+\n\(the oldest", err)
    assert all(m[0] == SYSTEM for m, _, _ in runs)
    assert [m[-1]["content"] for m, _, _ in runs] == [LINES[0], LINES[3].strip(), *LINES[6:7], *LINES[8:]]
    fresh.load_heads(None if heads == "none" else heads)
    for i, (messages, kw, result) in enumerate(runs):
        if result is not None and i != FORCED - 1:          # that one's logits were forced: the runs after it count
            want = fresh.generate(messages, **{k: v for k, v in kw.items() if k != "reuse_prefix"})
            assert result.token_ids == want.token_ids, messages
    assert any(r and r.stats.extra.get("prompt_tokens_reused") for _, _, r in runs)


# ---------------------------------------------------------------- what the user is told (tiny model)

def test_a_message_too_long_for_the_cache_names_the_flags_and_is_not_sent(tiny_hf_dir, monkeypatch, capsys):
    """The error for a pasted message longer than the cache said "prompt is N tokens, longer than the cache
    (max_seq_len=128): no room for an answer": the API's name, and nothing to do about it."""
    long = "fox " * 100
    rc, out, err = _tiny_chat(tiny_hf_dir, monkeypatch, capsys, f"{long}\nfox\n{long}\nfox\n", "--max-seq-len", "128",
                              "--system", "be brief")
    assert rc == 0 and "Traceback" not in err and len(re.findall(r"prompt \d+ tok", err)) == 2
    first, second = re.findall(r"amphista: error: that message does not fit the cache.*", err)
    assert "even without the earlier exchanges" not in first and "even without the earlier exchanges" in second
    for line in (first, second):
        assert "longer than the cache (--max-seq-len=128): no room for an answer; shorten it or raise --max-seq-len" \
            in line and "(the prompt: the message in the chat template after the --system message). It was not " \
            "sent (the conversation so far is kept)" in line and "max_seq_len" not in line


def test_a_conversation_past_the_cache_in_the_api_is_told_it_can_drop_old_turns(tiny_hf_dir):
    """engine.generate(messages) on a history that outgrew max_seq_len said only "raise max_seq_len or lower
    max_new_tokens"; a caller keeping a chat's messages can also drop its oldest exchanges (amphista chat does)."""
    pytest.importorskip("transformers")
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fox jumps"},
             {"role": "assistant", "content": "the lazy dog"}, {"role": "user", "content": "again"}]
    n = len(eng.encode_prompt(turns))
    assert eng.generate(turns, max_new_tokens=128 - n).finish_reason        # fits exactly
    with pytest.raises(CacheFullError, match=r"raise max_seq_len or lower max_new_tokens \(or drop the "
                                             r"conversation's oldest exchanges\)"):
        eng.generate(turns, max_new_tokens=128 - n + 1)
    with pytest.raises(CacheFullError, match=r"longer than the cache .*; raise max_seq_len \(or drop the "
                                             r"conversation's oldest exchanges\)"):
        eng.generate(turns + turns[1:] * (128 // n + 1), max_new_tokens=4)
    for prompt in ("fox " * 150, turns[:2]):            # nothing to drop: no such hint
        with pytest.raises(CacheFullError) as e:
            eng.generate(prompt, max_new_tokens=100)
        assert "oldest" not in str(e.value)
    assert eng.generate(turns, max_new_tokens=4).token_ids     # the engine goes on


def test_chat_help_explains_the_session_and_what_a_full_cache_does(capsys):
    """`amphista chat --help` had no description: the commands, Ctrl-C and what happens when the conversation
    outgrows --max-seq-len were nowhere in it."""
    with pytest.raises(SystemExit) as e:
        main(["chat", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for words in ("/reset starts a new conversation", "/exit or /quit", "Ctrl-C stops an answer",
                  "no longer fits --max-seq-len with room for --max-new-tokens, its oldest exchanges are left out",
                  "the --system message stays", "a message too long for the cache on its own is not sent"):
        assert words in out, words


class _InterruptedStdin(io.StringIO):
    """A terminal where the user types one line, then presses Ctrl-C at the prompt."""

    def readline(self, *args):
        line = super().readline(*args)
        if not line:
            raise KeyboardInterrupt
        return line


@pytest.mark.parametrize("ctrl_c", [False, True])
def test_leaving_the_chat_ends_the_prompt_line(tiny_hf_dir, monkeypatch, capsys, ctrl_c):
    """End of input (Ctrl-D) or Ctrl-C at the "> " prompt left it without a newline: the shell's prompt ran on
    after it. A line with Windows' ending, blank lines and one cut by end of input are turns as typed."""
    pytest.importorskip("transformers")
    text = "fox\r\n\n \t \njumps"         # --system: the built-in vicuna_v1.1's own is too long for 128
    if ctrl_c:
        monkeypatch.setattr("sys.stdin", _InterruptedStdin(text))
        rc = main(["chat", "--model", str(tiny_hf_dir), "--device", "cpu", "--heads", "none", "--max-new-tokens",
                   "4", "--max-seq-len", "128", "--system", "be brief"])
        out, err = capsys.readouterr()
    else:
        rc, out, err = _tiny_chat(tiny_hf_dir, monkeypatch, capsys, text, "--max-seq-len", "128", "--system",
                                  "be brief")
    assert rc == (130 if ctrl_c else 0) and err.endswith("> \n") and "Traceback" not in err
    assert len(re.findall(r"prompt \d+ tok", err)) == 2 and len(out.split("\n")) == 3
    assert torch.is_grad_enabled()


def test_a_message_of_several_lines_is_one_turn(tiny_hf_dir, monkeypatch, capsys):
    """Pasted code was answered line by line, each line a turn of its own: a message between triple quotes (as
    Ollama reads them), or lines ending in a backslash, is now one turn with its newlines; input that ends inside
    such a message sends nothing."""
    import amphista_engine.cli as cli
    sent, real = [], cli._chat_turn
    monkeypatch.setattr(cli, "_chat_turn", lambda e, s, h, turn, kw: sent.append(turn[0]["content"]) or real(
        e, s, h, turn, kw))
    text = ('"""\ndef f(x):\n    return x\n"""\nfirst \\\n  second\n"""one line"""\n"""starts here\nends here"""\n'
            'plain\n"""\nnever closed\n')
    rc, _, err = _tiny_chat(tiny_hf_dir, monkeypatch, capsys, text, "--max-seq-len", "256")
    assert rc == 0 and "Traceback" not in err
    assert sent == ["def f(x):\n    return x", "first \n  second", "one line", "starts here\nends here", "plain"]
    assert "input ended inside a multi-line message: not sent" in err and err.count("... ") == 7
