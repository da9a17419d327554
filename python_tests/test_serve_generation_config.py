"""`amphista serve --generation-config auto` (the default, as vLLM's): requests that leave a sampling field out get
the model's generation_config.json values where it samples; the flags win over them; none keeps the greedy defaults."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amphista_engine.cli import build_parser
from amphista_engine.errors import ModelLoadError
from amphista_engine.loading import generation_defaults
from amphista_engine.serving.commands import sampling_defaults

from conftest import edited_copy


def _dir(tmp_path, gc) -> Path:
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    if gc is not None:
        (d / "generation_config.json").write_text(gc if isinstance(gc, str) else json.dumps(gc))
    return d


@pytest.mark.parametrize("gc,want", [
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [1, 2]},   # Qwen3's
     {"temperature": 0.6, "top_p": 0.95, "top_k": 20}),
    ({"do_sample": True, "top_k": 64, "top_p": 0.95}, {"temperature": 1.0, "top_k": 64, "top_p": 0.95}),  # Gemma 3's
    ({"temperature": 0.7, "top_p": 0.8}, {}),                     # do_sample false (transformers' default): greedy
    ({"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20},   # Qwen2.5's
     {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}),
    ({"bos_token_id": 1, "eos_token_id": 2}, {}),
    (None, {}),
])
def test_generation_defaults_read_as_transformers_would_sample(tmp_path, gc, want):
    got, file = generation_defaults(_dir(tmp_path, gc))
    assert got == want and (file is None) == (gc is None)


def test_bad_generation_configs_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="generation_config.json: not valid JSON"):
        generation_defaults(_dir(tmp_path, "{oops"))
    with pytest.raises(ModelLoadError, match="temperature must be a number >= 0"):
        generation_defaults(_dir(tmp_path, {"do_sample": True, "temperature": "hot"}))


def test_flags_win_and_none_keeps_greedy(tmp_path, capsys):
    d = _dir(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1})
    args = build_parser().parse_args(["serve", "--model", str(d), "--top-p", "0.5"])
    assert sampling_defaults(args) == {"temperature": 0.6, "top_k": 20, "repetition_penalty": 1.1}
    assert (args.temperature, args.top_p, args.top_k, args.repetition_penalty) == (0.6, 0.5, 20, 1.1)
    err = capsys.readouterr().err
    assert "request defaults from" in err and "temperature 0.6" in err and "top_p" not in err
    assert "plain" not in err                 # the penalty no longer turns the server's speculation off
    args = build_parser().parse_args(["serve", "--model", str(d), "--generation-config", "none"])
    assert sampling_defaults(args) == {} and (args.temperature, args.top_p, args.top_k, args.repetition_penalty) == (
        0.0, 1.0, 0, 1.0)
    args = build_parser().parse_args(["serve"])                  # the embedded GGUF: no generation_config
    assert sampling_defaults(args) == {} and args.temperature == 0.0


def test_a_speculative_server_takes_the_files_penalty(tmp_path, capsys):
    """--speculative amphista on a model whose generation_config sets a repetition_penalty (Qwen2.5's 1.05): the
    penalty once needed plain decoding, so the file's was left out; speculative decoding now takes it, as plain
    decoding does."""
    d = _dir(tmp_path, {"do_sample": True, "temperature": 0.7, "repetition_penalty": 1.05})
    for speculative in ("amphista", "auto"):
        args = build_parser().parse_args(["serve", "--model", str(d), "--speculative", speculative])
        assert sampling_defaults(args) == {"temperature": 0.7, "repetition_penalty": 1.05}
        assert args.repetition_penalty == 1.05 and "not applied" not in capsys.readouterr().err


def test_the_server_samples_as_the_model_asks(tiny_hf_dir, tmp_path):
    """A server over a model whose generation_config samples answers a request without a temperature by sampling
    (seeded requests with other seeds differ), where --generation-config none answers greedily (seeds change
    nothing)."""
    from test_serve import call
    model = edited_copy(tiny_hf_dir, tmp_path / "sampling")
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 1.5, "top_k": 50}))
    answers = {}
    for mode in ("auto", "none"):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "AMPHISTA_CACHE_DIR": "off"}
        proc = subprocess.Popen([sys.executable, "-m", "amphista_engine.cli", "serve", "--model", str(model),
                                 "--port", "0", "--heads", "none", "--max-seq-len", "128", "--max-new-tokens", "12",
                                 "--generation-config", mode], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        try:
            lines, deadline, m = [], time.time() + 60, None
            while time.time() < deadline and not m:
                line = proc.stderr.readline()
                assert line, f"the server exited: {''.join(lines)}"
                lines.append(line)
                m = re.search(r"(http://\S+)/v1\b", line)
            assert m, "".join(lines)
            assert ("request defaults from" in "".join(lines)) == (mode == "auto")
            answers[mode] = [call(m.group(1), "/v1/completions", {"prompt": "The quick brown fox", "seed": s})[1]
                             ["choices"][0]["text"] for s in range(4)]
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert len(set(answers["none"])) == 1          # greedy: the seed changes nothing
    assert len(set(answers["auto"])) > 1           # sampled at the model's temperature
