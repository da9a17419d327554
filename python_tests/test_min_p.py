"""min-p sampling (vLLM's and transformers' min_p): only tokens at least min_p times as likely as the most likely one
are sampled. Plain sampling and speculative decoding's rejection sampling keep the same law; the Python API, the CLI,
the server and a model's generation_config.json take it; bad values are named."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from amphista_engine.cli import main
from amphista_engine.errors import InputError
from amphista_engine.generation import PlainDecoder
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.loading import generation_defaults
from amphista_engine.sampling import SamplingParams, probs_from_logits
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec, resolve_acceptance

from conftest import needs_smollm2, random_tiny_model
from test_sampled_speculation_user_qa import law_check, tail
from test_speculative_penalties_qa import LONG, SHORT, answers, first3, penalised_law

pytestmark = pytest.mark.usefixtures("one_thread_module")

P_MIN = 1e-6        # seeded: each check is one fixed outcome; a sound sampler fails one with this probability


def reference(logits: torch.Tensor, temperature: float, min_p: float, top_k: int = 0, top_p: float = 1.0):
    """fp64, the definitions written out in transformers' order: top_k, the nucleus of what is left, min-p."""
    q = torch.softmax(logits.double() / temperature, -1)
    if top_k:
        q = q * (q >= q.topk(top_k, -1).values[..., -1:])
        q = q / q.sum(-1, keepdim=True)
    sq, order = q.sort(-1, descending=True)
    q = q.scatter(-1, order, sq * ((sq.cumsum(-1) - sq) < top_p))
    q = q * (q >= min_p * q.max(-1, keepdim=True).values)
    return q / q.sum(-1, keepdim=True)


@pytest.mark.parametrize("min_p, top_k, top_p", [(0.05, 0, 1.0), (0.3, 0, 1.0), (1.0, 0, 1.0), (0.02, 12, 0.8),
                                                 (0.2, 0, 0.5)])
def test_probs_keep_the_tokens_at_least_min_p_of_the_top(min_p, top_k, top_p):
    g = torch.Generator().manual_seed(int(min_p * 100) + top_k)
    logits = torch.randn(7, 300, generator=g) * 3
    got = probs_from_logits(logits, 0.8, top_k, top_p, min_p)
    want = reference(logits, 0.8, min_p, top_k, top_p)
    assert torch.equal(got > 0, want > 0)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    assert (got > 0).sum(-1).max() < 300 and (got > 0).sum(-1).min() >= 1       # it cuts, and keeps the top
    if min_p == 1.0:
        assert torch.equal(got.argmax(-1), logits.argmax(-1)) and ((got > 0).sum(-1) == 1).all()


def test_min_p_zero_is_off():
    logits = torch.randn(3, 100)
    assert torch.equal(probs_from_logits(logits, 0.7, 5, 0.9, 0.0), probs_from_logits(logits, 0.7, 5, 0.9))
    assert SamplingParams().min_p == 0.0
    assert SamplingParams(1.0, min_p=0.1) != SamplingParams(1.0)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.1", True, [0.1]])
def test_bad_min_p_is_named(bad):
    with pytest.raises(InputError, match="min_p"):
        SamplingParams(1.0, min_p=bad)


def test_typical_acceptance_refuses_min_p():
    with pytest.raises(InputError, match="min_p"):
        resolve_acceptance("typical", SamplingParams(1.0, min_p=0.1))
    assert resolve_acceptance("auto", SamplingParams(1.0, min_p=0.1)) == "rejection"


V = 8


@pytest.fixture(scope="module")
def tiny8():
    return random_tiny_model(seed=11, vocab=V, dim=16, heads=2, kv_heads=1, inter=32)


@pytest.fixture(scope="module")
def min_p_laws(tiny8):
    """{parity: (min-p's exact law, the answer count at T = 1.5 without min-p)}: both samplers' checks, made once."""
    params, unfiltered = SamplingParams(1.5, seed=5, min_p=0.25), SamplingParams(1.5)
    return {parity: (penalised_law(tiny8, prompt, 5, params), len(penalised_law(tiny8, prompt, 5, unfiltered)))
            for parity, prompt in ((0, SHORT), (1, LONG))}


@pytest.mark.parametrize("make", ["plain", "amphista"])
def test_sampling_keeps_the_min_p_law(tiny8, min_p_laws, make):
    """Rows of two prompts, 5 tokens each: plain sampling, and rejection sampling over a 64-node tree (most tokens
    from accepted nodes), follow min-p's law; min-p cuts tokens that sampling at T = 1.5 would otherwise give."""
    n, limit = 1500, 5
    params = SamplingParams(1.5, seed=5, min_p=0.25)
    cache = KVCache.for_model(tiny8.config, 2 * n, 64, torch.float32, "cpu")
    if make == "plain":
        dec = PlainDecoder(tiny8, cache, params)
    else:
        heads = random_heads("amphista", tiny8, num_heads=4, seed=3)
        dec = SpeculativeDecoder(tiny8, cache, heads, TreeSpec("dynamic-64", 4, "cpu"), params, acceptance="rejection")
    rows, stats = answers(dec, [SHORT, LONG] * n, limit)
    if make != "plain":
        assert sum(sum(s.accept_hist[2:]) for s in stats) > n        # accepted paths gave most tokens
    for parity, prompt in ((0, SHORT), (1, LONG)):
        law, unfiltered = min_p_laws[parity]        # no penalties: min-p's law, top_k / top_p off
        assert len(law) < unfiltered                                  # min-p forbids answers: the check can fail
        got = rows[parity::2]
        assert min(law_check(got, law, first3), law_check(got, law, tail)) > P_MIN


@pytest.fixture(scope="module")
def smol():
    from amphista_engine import Engine
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=256)


@needs_smollm2
@pytest.mark.parametrize("heads", ["default", "smollm2-135m-medusa"])
def test_smollm2_seeded_speculation_gives_plain_samplings_answer_under_min_p(smol, heads, once):
    """On a CPU one prompt's rejection sampling draws the numbers plain sampling draws: with min_p too (a min_p the
    drafts' distribution ignored would part from plain sampling's answer)."""
    smol.load_heads(heads)
    kind = smol.heads.config.kind
    accepted = 0
    for case in (dict(temperature=1.5, min_p=0.1), dict(temperature=1.0, min_p=0.05, top_k=30, top_p=0.95)):
        for prompt in ("Write a list of fruits: apple, banana,", "The capital of France is"):
            kw = dict(max_new_tokens=12, chat=False, seed=2, **case)
            # plain sampling uses no heads: both heads' runs compare with one
            want = once((tuple(sorted(case.items())), prompt), lambda: smol.generate(prompt, **kw))
            got = smol.generate(prompt, speculative=kind, tree="tree-16", **kw)
            assert got.token_ids == want.token_ids, (kind, case, prompt)
            accepted += sum(got.stats.accept_hist[2:])
    assert accepted > 5


def test_api_cli_and_generation_config_take_min_p(tiny_hf_dir, tmp_path, capsys):
    from amphista_engine import Engine
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)
    kw = dict(max_new_tokens=12, chat=False, ignore_eos=True, seed=3, temperature=2.0)
    wide, cut = engine.generate("the fox", **kw), engine.generate("the fox", min_p=0.9, **kw)
    assert wide.token_ids != cut.token_ids          # min_p reaches the sampler...
    with pytest.raises(InputError, match="min_p"):
        engine.generate("the fox", min_p=2, **kw)
    args = ["generate", "the fox", "--model", str(tiny_hf_dir), "--device", "cpu", "--heads", "none", "--no-chat",
            "--max-new-tokens", "12", "--max-seq-len", "128", "--ignore-eos", "--json", "--seed", "3",
            "--temperature", "2"]
    assert main(args + ["--min-p", "0.9"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == cut.token_ids        # ... through the flag too
    assert main(args + ["--min-p", "-1"]) != 0
    assert "--min-p" in capsys.readouterr().err
    d = tmp_path / "m"
    shutil.copytree(tiny_hf_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 2.0, "min_p": 0.9}))
    assert generation_defaults(d)[0] == {"temperature": 2.0, "min_p": 0.9}
    assert main([a if a != str(tiny_hf_dir) else str(d) for a in args[:-2]]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["token_ids"] == cut.token_ids and "min_p 0.9" in out.err


def test_server_takes_min_p(tiny_amphista_engine):
    from conftest import serving
    from test_serve import call, error_of
    engine = tiny_amphista_engine
    settings = dict(temperature=2.0, min_p=0.9, seed=11)
    ref = engine.generate("The quick brown fox", 16, chat=False, **settings)
    assert ref.token_ids != engine.generate("The quick brown fox", 16, chat=False, temperature=2.0, seed=11).token_ids
    with serving(engine, model_id="tiny", defaults=dict(max_new_tokens=64)) as httpd:
        body = {"prompt": "The quick brown fox", "max_tokens": 16}
        reply = call(httpd.url, "/v1/completions", {**body, **settings})[1]
        assert reply["choices"][0]["text"] == ref.text
        error_of(call(httpd.url, "/v1/completions", {**body, "min_p": 1.5}), 400, "min_p", param="min_p")


def test_the_speculation_check_weighs_min_p(tiny_amphista_engine, monkeypatch):
    """min_p narrows the distribution, so sampling keeps more of the heads' tau (benchmarks/results/
    sampled_tau_min_p): the check counts min_p >= 0.05 as top_p 0.9, and `--speculative auto` passes it there."""
    from amphista_engine import speculation_check as sc
    assert sc.sampled_share(1.0, 1.0, 0.1) == sc.sampled_share(1.0, 0.9) > sc.sampled_share(1.0)
    assert sc.sampled_share(1.0) < sc.sampled_share(1.0, 1.0, 0.025) < sc.sampled_share(1.0, 0.9)
    assert sc.sampled_share(0.0, 1.0, 0.5) == 1.0
    seen = []
    monkeypatch.setattr(sc, "check_speculation", lambda engine, tree, **kw: seen.append(kw) or sc.SpeculationCheck(
        False, "chain-1", "stub"))
    engine = tiny_amphista_engine
    engine._checks.clear()
    engine.generate("the fox", 2, chat=False, temperature=1.0, min_p=0.2, speculative="auto", seed=0)
    assert seen and seen[-1]["min_p"] == 0.2
    engine._checks.clear()


@pytest.mark.parametrize("key, value, words", [("min_p", 5, "min_p must be in [0, 1]"),
                                                ("top_p", 2.0, "top_p must be in (0, 1]")])
def test_a_bad_value_in_generation_config_is_named_as_the_files(tiny_hf_dir, tmp_path, capsys, key, value, words):
    """Out-of-range sampling values in a model's generation_config.json are the file's (ModelLoadError naming it
    and its key), not flags the user typed ("--min-p must be in [0, 1]" sent them looking for a flag)."""
    from amphista_engine.errors import ModelLoadError
    d = tmp_path / "m"
    shutil.copytree(tiny_hf_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 1.0, key: value}))
    with pytest.raises(ModelLoadError, match="generation_config.json"):
        generation_defaults(d)
    assert main(["generate", "hi", "--model", str(d), "--device", "cpu", "--heads", "none", "--max-seq-len", "64",
                 "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "generation_config.json" in err and words in err and "--" not in err.split("error:")[1], err
