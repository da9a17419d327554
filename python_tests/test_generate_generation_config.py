"""`amphista generate` / `chat` take the model's generation_config.json sampling for the flags left out, as
`amphista serve` (and transformers' generate, and vLLM) do: `--generation-config auto`, the default; `none` keeps the
greedy defaults; a flag given wins."""
from __future__ import annotations

import io
import json
import shutil
import warnings

import pytest

from amphista_engine.cli import main
from amphista_engine.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread_module")

QWEN3_LIKE = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9}


@pytest.fixture(scope="module")
def sampling_dir(tiny_hf_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("gc") / "m"
    shutil.copytree(tiny_hf_dir, d)
    (d / "generation_config.json").write_text(json.dumps(QWEN3_LIKE))
    return d


def _generate(d, capsys, *flags, seed=True):
    args = ["generate", "the quick brown fox", "--model", str(d), "--device", "cpu", "--heads", "none", "--no-chat",
            "--max-new-tokens", "12", "--max-seq-len", "256", "--ignore-eos", "--json", *flags]
    args += ["--seed", "7"] if seed else []         # greedy runs warn that a seed does nothing
    assert main(args) == 0
    out = capsys.readouterr()
    return json.loads(out.out)["token_ids"], out.err


def test_generate_samples_as_the_model_says_unless_told_otherwise(sampling_dir, capsys):
    engine = Engine.from_pretrained(str(sampling_dir), device="cpu", max_seq_len=256)

    def api(**kw):
        return engine.generate("the quick brown fox", max_new_tokens=12, chat=False, ignore_eos=True, seed=7,
                               **kw).token_ids
    ids, err = _generate(sampling_dir, capsys)
    assert "sampling from" in err and "temperature 0.7" in err and "top_k 20" in err and "top_p 0.9" in err
    assert ids == api(temperature=0.7, top_k=20, top_p=0.9)
    greedy = api()
    assert ids != greedy                                    # 12 tokens sampled at 0.7 over a random model
    ids, err = _generate(sampling_dir, capsys, "--generation-config", "none", seed=False)
    assert ids == greedy and "sampling from" not in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the file's top_k / top_p are not taken under greedy, nor warned of
        ids, err = _generate(sampling_dir, capsys, "--temperature", "0", seed=False)       # a flag given wins
    assert ids == greedy and "top_k" not in err
    ids, _ = _generate(sampling_dir, capsys, "--top-k", "3")
    assert ids == api(temperature=0.7, top_k=3, top_p=0.9)


def test_models_without_a_sampling_config_stay_greedy(tiny_hf_dir, capsys, monkeypatch):
    ids, err = _generate(tiny_hf_dir, capsys, seed=False)    # save_pretrained's generation_config: do_sample false
    assert "sampling from" not in err
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=256)
    assert ids == engine.generate("the quick brown fox", max_new_tokens=12, chat=False, ignore_eos=True).token_ids


def test_chat_takes_it_too(sampling_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", str(sampling_dir), "--device", "cpu", "--heads", "none", "--max-new-tokens", "4",
                 "--max-seq-len", "256", "--seed", "1"]) == 0
    assert "sampling from" in capsys.readouterr().err
