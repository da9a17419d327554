"""QA of the generation surface (Engine.generate/stream/batch, `amphista generate`, `amphista chat`): each test
pins a bug found by a QA pass (2026-12-05) on a tiny random checkpoint."""
from __future__ import annotations

import io
import json
import re

import pytest
import torch

from amphista_engine import Engine, InputError
from amphista_engine.cli import main

pytest.importorskip("transformers")        # tiny_hf_dir writes its checkpoint with it

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(tiny_amphista_engine):
    return tiny_amphista_engine


@pytest.fixture(scope="module")
def heads_dir(tiny_amphista_heads_dir):
    return tiny_amphista_heads_dir


def test_a_tree_that_is_neither_a_name_nor_a_path_list_is_named(engine):
    """tree=5 raised TypeError: 'int' object is not iterable (from the key the engine files trees under)."""
    for tree in (5, [5], [[[0]]], {"a": 1}):
        for speculative in ("amphista", "auto"):
            with pytest.raises(InputError, match="tree must be a name .* or None, got"):
                engine.generate(PROMPT, chat=False, max_new_tokens=2, speculative=speculative, tree=tree)
    ok = engine.generate(PROMPT, chat=False, max_new_tokens=4, speculative="amphista", tree=[[0], [1], [0, 0]])
    assert ok.token_ids == engine.generate(PROMPT, chat=False, max_new_tokens=4).token_ids


def test_chat_and_reuse_prefix_take_booleans_only(engine):
    """chat="no" is truthy: it formatted the prompt as a chat without a word; reuse_prefix="no" reused."""
    for kw in (dict(chat="no"), dict(chat=0), dict(reuse_prefix="no"), dict(reuse_prefix=None)):
        with pytest.raises(InputError, match=f"{next(iter(kw))} must be True"):
            engine.generate(PROMPT, max_new_tokens=2, **kw)
    with pytest.raises(InputError, match="chat must be True"):
        engine.encode_prompt(PROMPT, chat="false")


@pytest.mark.parametrize("kw", [dict(temperature=1e-300), dict(temperature=5e-324),
                                dict(temperature=0.7, repetition_penalty=1e-300)])
def test_a_temperature_or_penalty_too_small_to_divide_by_is_named(engine, kw):
    """logits / 1e-300 is inf in fp32: torch.multinomial raised 'probability tensor contains either inf, nan'."""
    with pytest.raises(InputError, match="(temperature|repetition_penalty) must be .*at least 1e-06"):
        engine.generate(PROMPT, chat=False, max_new_tokens=2, seed=0, **kw)
    small = engine.generate(PROMPT, chat=False, max_new_tokens=6, temperature=1e-6, seed=0)   # the edge works
    assert small.token_ids == engine.generate(PROMPT, chat=False, max_new_tokens=6).token_ids


def test_a_repetition_penalty_below_one_on_fp16_logits_stays_finite():
    """fp16 logits divided by a penalty < 1 overflowed past 65504 to inf, and sampling then met NaN."""
    from amphista_engine.sampling import SamplingParams, apply_repetition_penalty, sample
    logits = torch.tensor([[100.0, 90.0, -3.0, 1.0]], dtype=torch.float16)
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 1e-3)
    assert torch.isfinite(out).all() and out[0, 0] == pytest.approx(1e5)
    tok = sample(out, SamplingParams(temperature=1.0, repetition_penalty=1e-3, seed=0),
                 torch.Generator().manual_seed(0))
    assert tok.item() == 0


def test_a_reuse_stream_set_up_before_another_run_prefills_what_that_run_rewrote(engine):
    """A reuse_prefix stream decided what the cache held when it was made; a run that started (and rewrote the
    cache) before its first chunk was asked for made it decode on that run's K/V: another prompt's answer."""
    first = engine.generate(PROMPT, chat=False, max_new_tokens=8, reuse_prefix=True)
    second = PROMPT + first.text + " jumps over the lazy dog"
    fresh = engine.generate(second, chat=False, max_new_tokens=12)
    for spec in (None, "amphista"):
        engine.generate(PROMPT, chat=False, max_new_tokens=8, reuse_prefix=True, speculative=spec)
        stream = engine.stream(second, chat=False, max_new_tokens=12, reuse_prefix=True, speculative=spec)
        engine.generate("Hello, world! def f(x): return x * 2", chat=False, max_new_tokens=8)   # rewrites the cache
        assert "".join(stream) == fresh.text
        assert engine.last_result.token_ids == fresh.token_ids
        assert "prompt_tokens_reused" not in engine.last_result.stats.extra
    engine.generate(PROMPT, chat=False, max_new_tokens=8, reuse_prefix=True)        # nothing in between: reused
    stream = engine.stream(second, chat=False, max_new_tokens=12, reuse_prefix=True)
    assert "".join(stream) == fresh.text and engine.last_result.stats.extra["prompt_tokens_reused"] > 0


def test_last_results_exists_before_any_batch(tiny_hf_dir):
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=64)
    assert eng.last_results == [] and eng.last_result is None


def _cli(tiny_hf_dir, heads_dir, capsys, *extra, command="generate"):
    args = [command] + ([PROMPT, "--no-chat"] if command == "generate" else []) + [
        "--model", str(tiny_hf_dir), "--device", "cpu", "--max-seq-len", "128", "--heads", str(heads_dir), *extra]
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_with_a_repetition_penalty_speculates(engine, tiny_hf_dir, heads_dir, capsys):
    """`amphista generate --repetition-penalty 1.3` once failed under --speculative auto, then decoded plainly with
    a warning; the penalty now follows each tree path, so a named method speculates and equals plain decoding."""
    rc, out, err = _cli(tiny_hf_dir, heads_dir, capsys, "--max-new-tokens", "8", "--repetition-penalty", "1.3",
                        "--speculative", "amphista", "--json")
    assert rc == 0, err
    res = json.loads(out)
    plain = engine.generate(PROMPT, chat=False, max_new_tokens=8, repetition_penalty=1.3)
    assert res["token_ids"] == plain.token_ids and res["speculative"] == "amphista" and "tree" in res["stats"]


def test_cli_auto_decodes_plainly_where_only_the_tree_room_does_not_fit(engine, tiny_hf_dir, heads_dir, capsys):
    """The engine's speculative="auto" decodes plainly (with a warning) where the tree's scratch slots do not fit
    but the answer does; the CLI resolved auto to the heads' kind first, so the same request failed with
    'tree room (N) exceeds the cache'."""
    n = len(engine.encode_prompt(PROMPT, chat=False))
    room = str(128 - n)                                # the whole cache: no slot left for a tree
    with pytest.warns(UserWarning, match="speculative='auto': the tree needs .* decoding plainly"):
        rc, out, err = _cli(tiny_hf_dir, heads_dir, capsys, "--max-new-tokens", room)
    assert rc == 0, err
    assert "[plain]" in err
    assert "Traceback" not in err and "exceeds the cache" not in err
    # where the tree fits, auto still speculates (the heads record no tau: the check speculates as asked), and the
    # stats line and --json name the method that ran
    rc, out, err = _cli(tiny_hf_dir, heads_dir, capsys, "--max-new-tokens", "8", "--json")
    res = json.loads(out)
    assert rc == 0 and res["speculative"] == "amphista" and res["stats"]["tree"] == res["speculation_check"]["tree"]
    assert res["token_ids"] == engine.generate(PROMPT, chat=False, max_new_tokens=8).token_ids
    rc, out, err = _cli(tiny_hf_dir, heads_dir, capsys, "--max-new-tokens", "8")
    assert rc == 0 and re.search(r"\[amphista \S+\] prompt", err)


def test_auto_where_neither_the_tree_nor_the_answer_fits_names_the_plain_room(engine, recwarn):
    """speculative="auto" warned 'decoding plainly' and then refused anyway where plain decoding did not fit either
    (in `amphista chat` the warning came on the turn before the oldest exchange was dropped, and a fallback that did
    run later went unannounced); max_new_tokens="5" met `len(prompt) + max_new_tokens` there: a TypeError."""
    n = len(engine.encode_prompt(PROMPT, chat=False))
    with pytest.raises(InputError, match=r"max_new_tokens \(\d+\) exceeds the cache") as e:
        engine.generate(PROMPT, chat=False, max_new_tokens=128 - n + 1, speculative="auto")
    assert "tree room" not in str(e.value)
    assert not [w for w in recwarn if "decoding plainly" in str(w.message)]
    with pytest.raises(InputError, match="max_new_tokens must be a positive integer, got '5'"):
        engine.generate(PROMPT, chat=False, max_new_tokens="5", speculative="auto")
    with pytest.warns(UserWarning, match="decoding plainly"):        # where the answer alone fits: plain
        res = engine.generate(PROMPT, chat=False, max_new_tokens=128 - n, speculative="auto")
    assert "tree" not in res.stats.extra


def test_text_that_was_not_utf8_is_refused_by_name(engine, tiny_hf_dir, heads_dir, monkeypatch, capsys):
    """Bytes that are not UTF-8 reach Python as lone surrogates (stdin and argv use surrogateescape); the tokenizer
    then raised a bare `TypeError: TextInputSequence must be str` from deep inside generate."""
    for prompt in ("Hi \udcff there", [{"role": "user", "content": "Hi \udcff"}]):
        with pytest.raises(InputError, match="text is not valid Unicode: it holds U\\+DCFF, a lone surrogate"):
            engine.generate(prompt, max_new_tokens=2)
    monkeypatch.setattr("sys.stdin", io.StringIO("Name \udcff\udcfe a color\n"))
    assert main(["generate", "-", "--model", "/no/such/model"]) == 2       # refused before the load
    err = capsys.readouterr().err
    assert "the prompt on stdin is not UTF-8 text (byte 0xff at character 5)" in err and "loading" not in err
    assert main(["generate", "hi", "--system", "be \udce9", "--model", "/no/such/model"]) == 2
    assert "--system is not UTF-8 text (byte 0xe9 at character 3)" in capsys.readouterr().err
    # in a chat the line is skipped and the conversation goes on
    monkeypatch.setattr("sys.stdin", io.StringIO("fox \udcff\nfox\n"))
    rc, out, err = _cli(tiny_hf_dir, heads_dir, capsys, "--max-new-tokens", "2", "--speculative", "none",
                        "--system", "be brief", command="chat")
    assert rc == 0 and "that line is not UTF-8 text (byte 0xff at character 4); it was not sent" in err
    assert len(re.findall(r"prompt \d+ tok", err)) == 1 and "Traceback" not in err


@pytest.mark.parametrize("kw, match", [
    (dict(max_seq_len="128"), "max_seq_len must be an integer, got str '128'"),
    (dict(max_seq_len=2.5), "max_seq_len must be an integer, got float"),
    (dict(max_seq_len=True), "max_seq_len must be an integer, got bool True"),     # (None: the default length)
    (dict(max_batch_size=0), "max_batch_size must be at least 1, got 0"),
    (dict(max_batch_size="2"), "max_batch_size must be an integer"),
    (dict(cuda_graphs="no"), "cuda_graphs must be True or False, got str 'no'"),
])
def test_engine_settings_are_named_before_the_load(tiny_hf_dir, kw, match):
    """max_seq_len="128" raised `TypeError: bad operand type for unary -` from RoPE's tables, 2.5 a torch.zeros
    TypeError; max_batch_size=0 and cuda_graphs="no" were taken without a word."""
    with pytest.raises(InputError, match=match):
        Engine.from_pretrained(str(tiny_hf_dir), device="cpu", **{"max_seq_len": 64, **kw})


def test_cli_chat_quit_and_unknown_commands(tiny_hf_dir, monkeypatch, capsys):
    """/quit quits like /exit; a mistyped lone command is reported, not sent to the model as a message, while a
    message that merely starts with a slash is sent."""
    monkeypatch.setattr("sys.stdin", io.StringIO("/rest\n/usr/bin is a folder\n/quit\nnever read\n"))
    rc = main(["chat", "--model", str(tiny_hf_dir), "--device", "cpu", "--max-new-tokens", "2", "--max-seq-len", "256"])
    cap = capsys.readouterr()
    assert rc == 0 and "unknown command /rest; the commands are /reset, /help, /exit, /quit" in cap.err
    assert len(re.findall(r"prompt \d+ tok", cap.err)) == 1 and len(cap.out.splitlines()) == 1, cap.err


# ---- non-finite logits ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "default"])
def test_an_overflowing_run_is_named_and_does_not_poison_the_next(tiny_hf_dir, backend):
    """NaN activations once gave garbage tokens (greedy argmax of NaN) or a raw torch error (sampling), and their
    K/V stayed in the cache: the torch reference's masked attention multiplies stale slots by 0, and 0 x NaN is
    NaN, so every later run on the engine failed too. Now the run stops with a NonFiniteError and the next run
    decodes as a fresh engine does."""
    from amphista_engine.errors import NonFiniteError
    from amphista_engine.kernels import use_backend
    fresh = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)
    long_prompt, short = "The quick brown fox jumps over the lazy dog " * 3, "Hello"
    with use_backend(None if backend == "default" else backend):
        want = fresh.generate(short, max_new_tokens=8, chat=False).token_ids
        w = eng.model.layers[0].attention_norm.weight
        keep = w.detach().clone()
        with torch.no_grad():
            w.fill_(float("inf"))                     # every K/V of the prompt turns NaN
        # the weight is named (it said "its activations overflowed", which sends the user after the wrong fault)
        with pytest.raises(NonFiniteError, match="not finite .* new token 1 of prompt 0: the target weight "
                                                 r"layers\.0\.attention_norm\.weight holds NaN or inf"):
            eng.generate(long_prompt, max_new_tokens=4, chat=False)
        with torch.no_grad():
            w.copy_(keep)
        assert eng.generate(short, max_new_tokens=8, chat=False).token_ids == want


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_logits_that_turn_nan_mid_answer_stop_the_run_by_name(engine, speculative):
    """A NaN at a decode step (plain or a verified tree) is caught from the tokens the host reads anyway."""
    from amphista_engine.errors import NonFiniteError
    head, calls = engine.model.output, []
    real = head.forward

    def nan_from_the_third(x):
        calls.append(1)
        y = real(x)
        return y.fill_(float("nan")) if len(calls) >= 3 else y
    head.forward = nan_from_the_third
    try:
        with pytest.raises(NonFiniteError, match="not finite .*: its activations overflowed"):   # weights are fine
            engine.generate(PROMPT, max_new_tokens=16, chat=False, speculative=speculative, temperature=0.7, seed=1)
    finally:
        del head.forward
    out = engine.generate(PROMPT, max_new_tokens=8, chat=False, speculative=speculative)
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_a_second_thread_is_refused_while_a_run_decodes(engine):
    """Two threads on one engine interleaved their steps on its one KV cache: each printed the other's garbage.
    Now the second is refused by name while the first decodes; once it ends (or is closed) the engine is free."""
    from conftest import in_other_thread

    def other():
        engine.generate("Hello", max_new_tokens=4, chat=False)
    want = engine.generate(PROMPT, max_new_tokens=12, chat=False).token_ids
    stream = engine.stream(PROMPT, max_new_tokens=12, chat=False)
    next(stream)                                            # the run is under way in this thread
    err = in_other_thread(other)
    assert isinstance(err, InputError) and "decoding in another thread" in str(err)
    list(stream)
    assert engine.last_result.token_ids == want             # the refused thread touched nothing
    assert in_other_thread(other) is None                   # free again
    stream = engine.stream(PROMPT, max_new_tokens=12, chat=False)
    next(stream)
    stream.close()                                          # a closed stream frees it too
    assert in_other_thread(other) is None
