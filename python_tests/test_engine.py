"""The public API and CLI on a tiny random checkpoint: greedy equals transformers, streaming, stops, errors."""
from __future__ import annotations

import io
import json
import re

import pytest
import torch

from amphista_engine import Engine, InputError
from amphista_engine.cli import main

from conftest import needs_smollm2

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    return Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=256, max_batch_size=4)


def test_greedy_matches_transformers_generate(engine, tiny_hf_dir):
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    for prompt in ["The quick brown fox", "Hello, world! def f(x):"]:
        res = engine.generate(prompt, max_new_tokens=24, chat=False)
        ids = engine.encode_prompt(prompt, chat=False)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                              pad_token_id=0)[0, len(ids):].tolist()
        got = res.token_ids + ([2] if res.finish_reason == "eos" else [])
        assert got == ref[:len(got)] and (res.finish_reason == "eos" or len(got) == 24)
        assert res.text == engine.tokenizer.decode(res.token_ids)
        assert res.stats.prefill_ms > 0 and res.stats.prompt_tokens == len(ids)


def test_stream_concatenates_to_text(engine):
    chunks = list(engine.stream("The quick brown fox", max_new_tokens=30, chat=False))
    assert "".join(chunks) == engine.last_result.text
    assert len(engine.last_result.token_ids) <= 30


def test_max_new_tokens_and_tau(engine):
    res = engine.generate("Speculative decoding", max_new_tokens=5, chat=False)
    assert len(res.token_ids) <= 5
    if res.finish_reason == "length":
        assert len(res.token_ids) == 5 and res.stats.tau == pytest.approx(1.0)


def test_stop_string_truncates_and_is_never_streamed(engine):
    full = engine.generate("The quick brown fox", max_new_tokens=40, chat=False, temperature=0)
    text = full.text
    if len(text) < 6:
        pytest.skip("tiny model produced too little text")
    stop = text[3:6]
    chunks = list(engine.stream("The quick brown fox", max_new_tokens=40, chat=False, stop=[stop]))
    res = engine.last_result
    assert res.finish_reason == "stop" and res.text == text[:text.find(stop)]
    assert "".join(chunks) == res.text


def test_seeded_sampling_is_reproducible(engine):
    kw = dict(max_new_tokens=20, chat=False, temperature=0.9, top_p=0.9, top_k=50, seed=123)
    a = engine.generate("The quick brown fox", **kw).token_ids
    b = engine.generate("The quick brown fox", **kw).token_ids
    c = engine.generate("The quick brown fox", **{**kw, "seed": 7}).token_ids
    assert a == b and a != c


def test_batch_equals_single(engine):
    prompts = ["The quick brown fox", "Hello", "def f(x):\n    return x * 2 and more words here"]
    batch = engine.generate_batch(prompts, max_new_tokens=16, chat=False)
    for p, r in zip(prompts, batch):
        assert r.token_ids == engine.generate(p, max_new_tokens=16, chat=False).token_ids


def test_batch_drops_ended_rows_and_still_equals_single(engine, monkeypatch):
    from amphista_engine.generation import PlainDecoder
    prompts = ["The quick brown fox", "Hello", "def f(x):\n    return x * 2 and more words here", "Once upon"]
    singles = [engine.generate(p, max_new_tokens=24, chat=False).text for p in prompts]
    if min(map(len, singles)) < 12:
        pytest.skip("tiny model produced too little text")
    # a stop string from the middle of one answer ends that row (and any row that says it) early
    stop = singles[1][5:8]
    kept = []
    real = PlainDecoder.keep_rows
    monkeypatch.setattr(PlainDecoder, "keep_rows", lambda self, keep: kept.append(list(keep)) or real(self, keep))
    batch = engine.generate_batch(prompts, max_new_tokens=24, chat=False, stop=[stop])
    assert kept and all(len(k) < 4 for k in kept)            # the decoder went on with fewer rows
    for p, r in zip(prompts, batch):
        one = engine.generate(p, max_new_tokens=24, chat=False, stop=[stop])
        assert (r.token_ids, r.text, r.finish_reason) == (one.token_ids, one.text, one.finish_reason)
        assert r.stats.decode_steps == one.stats.decode_steps


def test_repetition_penalty_changes_output(engine):
    a = engine.generate("The quick brown fox", max_new_tokens=30, chat=False).token_ids
    b = engine.generate("The quick brown fox", max_new_tokens=30, chat=False, repetition_penalty=5.0).token_ids
    assert len(set(b)) >= len(set(a))


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=10_000), "exceeds the cache"),
    (dict(seed="x", temperature=0.7), "seed must be an integer"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(stop=5), "stop must be a string or a list of strings"),
    (dict(stop=["ok", None]), "stop must be a string or a list of strings"),
    (dict(acceptance="foo"), "acceptance must be one of"),      # a plain run too
    (dict(tree="tree-16"), r"tree='tree-16' applies to speculative decoding"),   # not silently plain
    (dict(acceptance="typical"), r"acceptance='typical' applies to speculative decoding"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(temperature="0.5"), "temperature must be a number, got str"),
    (dict(top_p="0.9"), "top_p must be a number, got str"),
    (dict(top_k=True), "top_k must be an integer, got bool"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
])
def test_bad_generation_parameters(engine, kwargs, match):
    with pytest.raises(InputError, match=match):
        engine.generate("The quick brown fox", chat=False, **kwargs)


def test_bad_prompts(engine):
    with pytest.raises(InputError, match="empty"):
        engine.generate("   ")
    with pytest.raises(InputError, match="longer than the cache"):
        engine.generate("fox " * 400, chat=False, max_new_tokens=1)
    with pytest.raises(InputError, match="empty"):
        engine.stream("")    # raises on the call, not on the first chunk
    with pytest.raises(InputError, match="prompt must be a non-empty string or list of messages, got bytes"):
        engine.generate(b"The quick brown fox")
    # a string is one prompt, not a batch of its characters
    with pytest.raises(InputError, match="prompts must be a list of prompts .* got str; for one prompt use generate"):
        engine.generate_batch("The quick brown fox")
    with pytest.raises(InputError, match="reuse_prefix applies to one prompt .* got 2 prompts"):
        engine.generate_batch(["The quick", "brown fox"], chat=False, reuse_prefix=True)


def test_a_cache_larger_than_memory_is_refused_by_name(tiny_hf_dir, monkeypatch):
    """An oversized max_seq_len (or batch) would be an out-of-memory kill with no message; it is an error instead,
    raised before the model builds its RoPE table, and before a larger batch's cache is allocated."""
    from amphista_engine import kv_cache
    from amphista_engine.errors import CacheFullError
    with pytest.raises(CacheFullError, match=r"max_seq_len=10000000000 \(batch 1\) needs .* GiB .*lower max_seq_len"):
        # 10^10 positions: terabytes even for the tiny model, so no machine's memory holds it (10^8 fit on 128 GiB)
        Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=10_000_000_000)
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=256)
    one_row = eng._cache_for(1).k.numel() * 4 * 2
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 4 * one_row)
    assert eng.generate_batch(["a b", "c d"], chat=False, max_new_tokens=2)    # two rows fit
    with pytest.raises(CacheFullError, match=r"\(batch 8\)"):
        eng.generate_batch(["a b"] * 8, chat=False, max_new_tokens=2)


def test_a_cache_past_the_trained_context_warns(tiny_hf_dir):
    """The tiny model was trained on 512 positions: a longer cache works, with a warning (a one-line one in the
    CLI); up to 512 there is none."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=512)
    with pytest.warns(UserWarning, match="max_seq_len=600 is past the 512 positions the model was trained on"):
        Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=600)
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "amphista_engine.cli", "generate", "a b", "--model", str(tiny_hf_dir),
                          "--device", "cpu", "--max-seq-len", "600", "--max-new-tokens", "2", "--no-chat"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0
    assert "\namphista: warning: --max-seq-len=600 is past the 512 positions" in run.stderr
    assert "UserWarning" not in run.stderr


def test_cli_json(tiny_hf_dir, capsys):
    rc = main(["generate", "The quick brown fox", "--model", str(tiny_hf_dir), "--max-new-tokens", "8",
               "--no-chat", "--json", "--device", "cpu", "--max-seq-len", "128"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids", "finish_reason", "stats"} and len(out["token_ids"]) <= 8
    assert out["weights"]["quant"] == "none"        # auto: float safetensors are not stored 4-bit
    rc = main(["generate", "The quick brown fox", "--model", str(tiny_hf_dir), "--max-new-tokens", "8",
               "--no-chat", "--json", "--device", "cpu", "--max-seq-len", "128", "--quant", "q4"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["weights"]["quant"] == "q4"


def test_cli_stops_quietly_when_stdout_closes(tiny_hf_dir):
    """`amphista generate ... | head`: the reader leaves early; the CLI ends with 141 (SIGPIPE's code), no trace."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "amphista_engine.cli", "generate", "The quick brown fox", "--model",
                             str(tiny_hf_dir), "--max-new-tokens", "16", "--no-chat", "--device", "cpu",
                             "--max-seq-len", "128", "--speculative", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                     # before the first chunk: its write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err


def test_cli_prompt_from_stdin_and_system_message(tiny_hf_dir, capsys, monkeypatch):
    base = ["--model", str(tiny_hf_dir), "--max-new-tokens", "6", "--json", "--device", "cpu", "--max-seq-len", "128",
            "--speculative", "none"]

    def run(prompt, *extra, stdin=None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        assert main(["generate", prompt, *base, *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        return {k: out[k] for k in ("text", "token_ids", "prompt_tokens")}

    direct = run("The quick brown fox", "--no-chat")
    assert run("-", "--no-chat", stdin="The quick brown fox\n") == direct         # echo's newline dropped
    system = run("The quick brown fox", "--system", "Answer briefly.")
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "The quick brown fox"}]
    assert system["prompt_tokens"] == len(engine.encode_prompt(messages)) != direct["prompt_tokens"]
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    assert main(["generate", "-", *base]) == 2
    assert "prompt is empty (nothing on stdin)" in capsys.readouterr().err
    assert main(["generate", "hi", *base, "--system", "x", "--no-chat"]) == 2
    assert "--system needs the chat template" in capsys.readouterr().err


def test_cli_errors_are_one_line(capsys):
    assert main(["generate", "hi", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert "model path not found" in err and "Traceback" not in err
    # decoding flags fail before anything loads (and before the CPU's speculation timing)
    assert main(["generate", "hi", "--model", "/no/such/model", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert "temperature must be finite and >= 0" in err and "loading" not in err
    assert main(["chat", "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens must be a positive integer, got 0" in err and "loading" not in err
    assert main(["generate", "hi", "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err


def test_cli_speculative_without_heads_is_an_error(tiny_hf_dir, capsys):
    """Asking for a drafting method while turning heads off is a contradiction, not plain decoding."""
    args = ["generate", "hi", "--model", str(tiny_hf_dir), "--max-new-tokens", "2", "--no-chat", "--device", "cpu",
            "--max-seq-len", "64", "--heads", "none"]
    assert main(args + ["--speculative", "medusa"]) == 2
    err = capsys.readouterr().err
    assert "--speculative medusa needs drafting heads, but --heads none" in err and "Traceback" not in err
    assert main(args) == 0 and main(args + ["--speculative", "none"]) == 0      # auto / none: plain decoding
    capsys.readouterr()
    for off in (["--speculative", "none"], []):          # a tree for a plain run is refused, before the load
        assert main(args + off + ["--tree", "tree-16"]) == 2
        err = capsys.readouterr().err
        assert "--tree tree-16 applies to speculative decoding" in err and "loading" not in err


def _chat(tiny_hf_dir, monkeypatch, capsys, lines, *extra):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    rc = main(["chat", "--model", str(tiny_hf_dir), "--device", "cpu", "--max-new-tokens", "4", *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err, [int(n) for n in re.findall(r"prompt (\d+) tok", cap.err)]


def test_cli_chat_keeps_history_resets_and_drops_what_no_longer_fits(tiny_hf_dir, monkeypatch, capsys):
    rc, out, err, prompts = _chat(tiny_hf_dir, monkeypatch, capsys, ["the quick brown fox", "", "jumps over",
                                                                     "/reset", "the quick brown fox", "/exit", "x"],
                                  "--max-seq-len", "256", "--system", "be brief")
    assert rc == 0 and len(out.splitlines()) == 3 and len(prompts) == 3     # empty line skipped, /exit stops
    assert prompts[1] > prompts[0] + 4 and prompts[2] == prompts[0]         # turn 2 carries turn 1; /reset clears
    assert "Traceback" not in err
    # a small cache: each turn keeps only the exchanges that still fit with room for the answer
    rc, out, err, prompts = _chat(tiny_hf_dir, monkeypatch, capsys, ["fox"] * 4, "--max-seq-len", "180")
    assert rc == 0 and "oldest exchange no longer fits" in err
    assert len(prompts) == 4 and prompts[1] > prompts[0] and prompts[3] == prompts[2] == prompts[1]
    assert max(prompts) + 4 <= 180
    # a message that cannot fit even alone is reported, and the conversation goes on
    rc, out, err, prompts = _chat(tiny_hf_dir, monkeypatch, capsys, ["fox " * 40, "hi"], "--max-seq-len", "180")
    assert rc == 0 and "the cache (--max-seq-len=180)" in err and len(prompts) == 1 and "Traceback" not in err
    # ... and the history before it stays: the next turn still carries the first exchange
    rc, out, err, prompts = _chat(tiny_hf_dir, monkeypatch, capsys, ["fox", "fox " * 40, "/help", "fox"],
                                  "--max-seq-len", "180")
    assert rc == 0 and "the conversation so far is kept" in err and "dropped" not in err
    assert len(prompts) == 2 and prompts[1] > prompts[0] + 4
    assert err.count("/help shows this") == 2                            # at the start, and for /help


def test_cli_checks_stop_and_room_before_loading(capsys):
    assert main(["chat", "--model", "/no/such/model", "--stop", ""]) == 2
    err = capsys.readouterr().err
    assert "stop strings must be non-empty" in err and "loading" not in err
    assert main(["generate", "hi", "--model", "/no/such/model", "--max-new-tokens", "5000"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens 5000 leaves no room for a prompt in the cache (--max-seq-len 2048)" in err
    assert "loading" not in err


def test_cli_chat_ctrl_c_stops_the_answer_not_the_conversation(tiny_hf_dir, monkeypatch, capsys):
    stream = Engine.stream
    calls = []

    def interrupted_once(self, prompt, **kwargs):
        calls.append(len(prompt))
        if len(calls) > 1:
            return stream(self, prompt, **kwargs)

        def gen():
            yield "partial"
            raise KeyboardInterrupt
        return gen()

    monkeypatch.setattr(Engine, "stream", interrupted_once)
    rc, out, err, prompts = _chat(tiny_hf_dir, monkeypatch, capsys, ["fox", "fox"], "--max-seq-len", "256")
    assert rc == 0 and "interrupted" in err and len(prompts) == 1
    assert calls == [1, 1]                 # the interrupted exchange did not enter the history
    # the cut answer ends its line on stdout too (its newline went to stderr only: the next answer ran on)
    lines = out.split("\n")
    assert lines[0] == "partial" and len(lines) == 3 and lines[2] == ""


@needs_smollm2
def test_smollm2_chat_generate_cli(capsys):
    rc = main(["generate", "What is 2+2? Answer with one number.", "--max-new-tokens", "16", "--device", "cpu",
               "--max-seq-len", "256", "--heads", "none"])
    assert rc == 0
    cap = capsys.readouterr()
    assert cap.out.strip() and "tok/s" in cap.err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_on_cuda_replays_graphs_by_default_and_matches_eager(tiny_hf_dir):
    """On a GPU the Engine replays decode steps from CUDA graphs unless told not to, and its greedy answers,
    plain and speculative, are the eager ones (fp32, so no bf16 near-tie can flip)."""
    from amphista_engine.heads import random_heads
    prompts = ["The quick brown fox", "Hello, world! def f(x):"]
    answers = {}
    for graphs in (True, False):
        kw = {} if graphs else {"cuda_graphs": False}
        eng = Engine.from_pretrained(str(tiny_hf_dir), device="cuda", dtype="float32", max_seq_len=256, **kw)
        eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1).to("cuda"))
        answers[graphs] = [eng.generate(p, max_new_tokens=40, chat=False, speculative=s).token_ids
                           for p in prompts for s in (None, "amphista")]
        assert eng.graphs.enabled == graphs
        assert (eng.graphs.stats.replays > 0) == graphs
    assert answers[True] == answers[False]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("kind", ["plain", "amphista", "medusa"])
def test_reuse_prefix_prefills_only_what_the_cache_lacks(tiny_hf_dir, kind, device):
    """A second turn that extends the first (prompt + answer + more) prefills only the new tokens and decodes
    what a fresh run decodes (fp32: greedy equal; on a GPU with CUDA graphs); anything in between that rewrites
    the cache or the heads' cache (another run, heads reset by another decoder) turns the reuse off."""
    from amphista_engine.heads import random_heads
    engine = Engine.from_pretrained(str(tiny_hf_dir), device=device, dtype="float32", max_seq_len=256)
    spec = dict(speculative=kind, tree="tree-16") if kind != "plain" else {}
    if kind != "plain":
        engine.load_heads(random_heads(kind, engine.model, num_heads=4, seed=3).to(device))
    first = "The quick brown fox"
    r1 = engine.generate(first, chat=False, max_new_tokens=12, reuse_prefix=True, **spec)
    second = first + r1.text + " and the lazy dog"
    fresh = engine.generate(second, chat=False, max_new_tokens=20, **spec)        # no reuse: and it clears what was kept
    assert "prompt_tokens_reused" not in fresh.stats.extra
    engine.generate(first, chat=False, max_new_tokens=12, reuse_prefix=True, **spec)
    again = engine.generate(second, chat=False, max_new_tokens=20, reuse_prefix=True, **spec)
    ids = engine.encode_prompt(second, chat=False)
    common = next(i for i, (a, b) in enumerate(zip(ids, engine.encode_prompt(first, chat=False) + r1.token_ids))
                  if a != b)
    assert again.stats.extra["prompt_tokens_reused"] == common - 1 > 0
    assert again.token_ids == fresh.token_ids
    # a run in between (here: without reuse) leaves nothing to reuse
    engine.generate(first, chat=False, max_new_tokens=12, reuse_prefix=True, **spec)
    engine.generate("Other words", chat=False, max_new_tokens=4, **spec)
    assert "prompt_tokens_reused" not in engine.generate(second, chat=False, max_new_tokens=4, reuse_prefix=True,
                                                         **spec).stats.extra
    if kind == "amphista":            # the heads' own cache reset elsewhere (e.g. a speculation check's decoder)
        engine.generate(first, chat=False, max_new_tokens=12, reuse_prefix=True, **spec)
        with torch.inference_mode():
            engine.heads.reset_cache(1, 256)
        assert "prompt_tokens_reused" not in engine.generate(second, chat=False, max_new_tokens=4, reuse_prefix=True,
                                                             **spec).stats.extra


def test_loading_and_decoding_do_not_import_torch_compilers(tiny_hf_dir, tmp_path):
    """The model and the heads are built on the meta device, where torch runs some ops as Python references:
    normal_ imports torch._dynamo, arange sympy (via torch._decomp's decompositions), ~2.5 s of every CLI start
    until 2026-12-03."""
    import subprocess
    import sys

    from amphista_engine.heads import random_heads, save_heads
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)
    save_heads(random_heads("amphista", eng.model, num_heads=2, seed=0, draft_vocab_size=50), tmp_path / "h")
    code = ("import sys\nfrom amphista_engine import Engine\n"
            f"e = Engine.from_pretrained({str(tiny_hf_dir)!r}, device='cpu', max_seq_len=128)\n"
            f"e.load_heads({str(tmp_path / 'h')!r})\n"
            "e.generate('The quick brown fox', chat=False, max_new_tokens=4, speculative='amphista')\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "AMPHISTA_CACHE_DIR": "off"})
    assert out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


def test_an_overtaken_stream_stops_instead_of_reading_another_runs_cache(engine):
    """Two streams share one engine's KV cache: a stream resumed after another generation started says so, instead of
    decoding on the other run's cache (QA, 2026-12-04: it went on with the second prompt's context)."""
    first = engine.stream("The quick brown fox", chat=False, max_new_tokens=20)
    next(first)
    other = engine.generate("Hello world", chat=False, max_new_tokens=5)
    assert other.token_ids == engine.generate("Hello world", chat=False, max_new_tokens=5).token_ids
    with pytest.raises(InputError, match="overtaken by a later generation on the same engine"):
        list(first)
    abandoned = engine.stream("The quick brown fox", chat=False, max_new_tokens=20)
    next(abandoned)                                  # left unfinished: later runs are unaffected
    assert engine.generate("Hello world", chat=False, max_new_tokens=5).token_ids == other.token_ids


def test_speculative_acceptance_that_would_ignore_sampling_is_refused(tiny_hf_dir):
    from amphista_engine.heads import random_heads
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=96)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
    kw = dict(chat=False, max_new_tokens=4, speculative="amphista", tree="chain-4")
    with pytest.raises(InputError, match="acceptance='greedy' keeps the target's argmax"):
        eng.generate("The quick brown fox", temperature=0.8, acceptance="greedy", **kw)
    with pytest.raises(InputError, match="acceptance='typical' .* takes no top_k / top_p"):
        eng.generate("The quick brown fox", temperature=0.8, top_k=5, acceptance="typical", **kw)


def test_auto_decodes_plainly_where_only_the_tree_room_does_not_fit(tiny_hf_dir, monkeypatch):
    """speculative="auto" means the faster way that fits: with no room for the tree's scratch slots it decodes
    plainly (with a warning) instead of refusing a request plain decoding serves."""
    from amphista_engine.heads import random_heads
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=96)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
    monkeypatch.setattr(Engine, "resolve_speculation",      # as if the check found the heads faster here
                        lambda self, s, t, *_: ("amphista", "chain-4", None) if s == "auto" else (s, t, None))
    prompt = "The quick brown fox"
    n = len(eng.encode_prompt(prompt, chat=False))
    fits_plain = 96 - n                                      # the whole cache: no room for the tree's 9 slots
    plain = eng.generate(prompt, chat=False, max_new_tokens=fits_plain)
    with pytest.warns(UserWarning, match="decoding plainly"):
        auto = eng.generate(prompt, chat=False, max_new_tokens=fits_plain, speculative="auto")
    assert auto.token_ids == plain.token_ids
    with pytest.raises(InputError, match=r"tree room \(\d+\) exceeds the cache"):   # asked for by name: refused
        eng.generate(prompt, chat=False, max_new_tokens=fits_plain, speculative="amphista")


def test_speculative_decoding_takes_a_repetition_penalty(tiny_hf_dir, monkeypatch):
    """The penalty used to need plain decoding ("auto" decoded plainly with a warning, a named method was refused);
    a tree node now carries its own path's tokens, so every way speculates and equals plain decoding."""
    import warnings

    from amphista_engine.heads import random_heads
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=96)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
    monkeypatch.setattr(Engine, "resolve_speculation",      # as if the check found the heads faster here
                        lambda self, s, t, *_: ("amphista", "chain-4", None) if s == "auto" else (s, t, None))
    kw = dict(chat=False, max_new_tokens=24, repetition_penalty=1.3)      # 12 tokens repeat none (no change)
    plain = eng.generate("The quick brown fox", **kw)
    assert plain.token_ids != eng.generate("The quick brown fox", chat=False, max_new_tokens=24).token_ids
    for speculative, tree in (("auto", None), ("auto", "chain-2"), ("amphista", "tree-16"), ("amphista", None)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            res = eng.generate("The quick brown fox", speculative=speculative, tree=tree, **kw)
        assert res.token_ids == plain.token_ids and res.stats.tau is not None


def test_a_one_token_answer_has_no_decode_rate_to_report(engine):
    res = engine.generate("The quick brown fox", chat=False, max_new_tokens=1)
    assert res.stats.new_tokens == 1 and res.stats.decode_steps == 0
    assert res.stats.summary().endswith("| 1 new tok | no decoding step") and "tau" not in res.stats.summary()
