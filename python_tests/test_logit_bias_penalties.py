"""logit_bias (plain and speculative), OpenAI's presence/frequency penalties (plain) and ignore_eos."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.errors import InputError
from amphista_engine.sampling import SamplingParams, check_logit_bias

from conftest import random_tiny_model
from test_speculative import OracleHeads, PROMPTS, plain_ids, spec_ids, _NoText
from amphista_engine.generation import GenerationStats, PlainDecoder, run
from amphista_engine.kv_cache import KVCache


def _plain(model, prompt, max_new, params, eos=()):
    cache = KVCache.for_model(model.config, 1, 256, model.tok_embeddings.weight.dtype, "cpu")
    dec = PlainDecoder(model, cache, params)
    list(run(dec, [prompt], _NoText(), max_new, list(eos), [], [GenerationStats()]))
    return dec.rows[0].ids


def _reference(model, prompt, max_new, bias=None, presence=0.0, frequency=0.0):
    """Greedy decoding by full forwards, the bias and OpenAI's penalties applied by hand."""
    seq, out = list(prompt), []
    V = model.config.vocab_size
    add = torch.zeros(V)
    for i, v in (bias or {}).items():
        add[i] = v
    for _ in range(max_new):
        with torch.inference_mode():
            logits = model(torch.tensor([seq]), torch.arange(len(seq))[None],
                           logits_at=torch.tensor([[len(seq) - 1]]))[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=V).float() if out else torch.zeros(V)
        tok = int((logits + add - frequency * counts - presence * (counts > 0)).argmax())
        out.append(tok)
        seq.append(tok)
    return out


def test_greedy_logit_bias_matches_hand_applied_bias_and_speculative_equals_plain():
    model = random_tiny_model(seed=11)
    prompt = PROMPTS[0]
    unbiased, _ = plain_ids(model, prompt, 40, eos=[])
    banned = sorted(set(unbiased[:6]))
    bias = {t: -100.0 for t in banned}
    bias[7] = 2.5
    params = SamplingParams(logit_bias=bias)
    plain = _plain(model, prompt, 40, params)
    assert plain == _reference(model, prompt, 40, bias=bias)
    assert plain != unbiased and not set(plain) & set(banned)
    # An oracle drafter that knows the biased continuation: long accepted runs, whose every token and bonus the
    # verification must choose under the bias, as plain decoding does
    for tree in ("tree-16", "dynamic-16"):
        heads = OracleHeads(prompt + plain, 64, 3)
        got, why, stats = spec_ids(model, heads, tree, prompt, 40, eos=[], params=params)
        assert got == plain and why == "length"
        assert stats.tau > 1.5, stats.tau


def test_sampled_speculative_never_emits_a_banned_token():
    model = random_tiny_model(seed=3)
    prompt = PROMPTS[2]
    free, _ = plain_ids(model, prompt, 30, eos=[])
    banned = sorted(set(free))[:8]
    heads = OracleHeads(prompt + free, 64, 3, hit=0.9)     # drafts the unbiased text: the banned tokens
    params = SamplingParams(temperature=1.0, seed=5, logit_bias={t: -100 for t in banned})
    got, _, _ = spec_ids(model, heads, "tree-16", prompt, 60, eos=[], params=params)
    assert len(got) == 60 and not set(got) & set(banned)


@pytest.mark.parametrize("presence,frequency", [(4.0, 0.0), (0.0, 0.8), (0.5, 0.5), (-2.0, 0.0)])
def test_presence_and_frequency_penalties_match_openai_formula(presence, frequency):
    model = random_tiny_model(seed=11)
    prompt = PROMPTS[0]
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
    got = _plain(model, prompt, 30, params)
    assert got == _reference(model, prompt, 30, presence=presence, frequency=frequency)
    assert got != _plain(model, prompt, 30, SamplingParams())


@pytest.mark.parametrize("tree", ["tree-16", "dynamic-8"])
def test_speculative_penalties_equal_plain_decoding(tree):
    """Penalties used to need plain decoding; each tree node now carries its own path's tokens (tree_penalties)."""
    from amphista_engine.heads import random_heads
    model = random_tiny_model(seed=1)
    heads = random_heads("amphista", model, num_heads=3, seed=1)
    for params in (SamplingParams(frequency_penalty=0.5), SamplingParams(presence_penalty=1.5),
                   SamplingParams(repetition_penalty=1.4, frequency_penalty=0.2)):
        want = _plain(model, PROMPTS[0], 24, params)
        assert spec_ids(model, heads, tree, PROMPTS[0], 24, eos=[], params=params)[0] == want
        assert want != _plain(model, PROMPTS[0], 24, SamplingParams())


def test_bad_values_are_named():
    for bias, what in (([1, 2], "must be a dict"), ({"a": 1}, "keys must be token ids"), ({-1: 1}, "keys must"),
                       ({3: float("nan")}, r"logit_bias\[3\] must be a number"), ({3: 1e9}, r"logit_bias\[3\]"),
                       ({3: True}, r"logit_bias\[3\]")):
        with pytest.raises(InputError, match=what):
            SamplingParams(logit_bias=bias)
    assert check_logit_bias({"12": 1, 3: -2.0}) == ((3, -2.0), (12, 1.0))     # OpenAI's JSON keys are strings
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(InputError, match=name):
            SamplingParams(**{name: float("inf")})
        with pytest.raises(InputError, match=name):
            SamplingParams(**{name: "1"})
    with pytest.raises(InputError, match="token id 64 is not in the model's vocabulary"):
        _plain(random_tiny_model(), [1, 2], 3, SamplingParams(logit_bias={64: 1.0}))


def test_engine_options(tiny_amphista_engine):
    eng = tiny_amphista_engine
    prompt = "The quick brown fox"
    base = eng.generate(prompt, chat=False, max_new_tokens=12, speculative=None)
    banned = sorted(set(base.token_ids))
    bias = {t: -100 for t in banned}
    plain = eng.generate(prompt, chat=False, max_new_tokens=12, speculative=None, logit_bias=bias)
    spec = eng.generate(prompt, chat=False, max_new_tokens=12, speculative="amphista", logit_bias=bias)
    assert plain.token_ids == spec.token_ids and not set(plain.token_ids) & set(banned)
    # logprobs stay the model's own: the bias decides which token, not its reported probability
    scored = eng.generate(prompt, chat=False, max_new_tokens=12, speculative=None, logit_bias=bias, logprobs=True)
    ref = eng.prompt_logprobs(scored.prompt_token_ids + scored.token_ids)
    assert scored.token_logprobs == pytest.approx(ref[0][-12:], abs=1e-4)
    with pytest.raises(InputError, match="token id 99999 is not in the model's vocabulary"):
        eng.generate(prompt, chat=False, max_new_tokens=2, logit_bias={99999: 1})
    pen = eng.generate(prompt, chat=False, max_new_tokens=12, speculative="amphista", presence_penalty=1.0)
    assert pen.token_ids == eng.generate(prompt, chat=False, max_new_tokens=12, speculative=None,
                                         presence_penalty=1.0).token_ids
    with pytest.raises(InputError, match="presence_penalty takes one value"):
        eng.generate_batch([prompt, prompt], max_new_tokens=2, presence_penalty=[0.1, 0.2])


def test_ignore_eos_runs_to_max_new_tokens(tiny_amphista_engine):
    eng = tiny_amphista_engine
    eos = eng.eos_ids[0]
    # a bias that makes EOS the greedy choice: the answer ends at once, unless EOS is ignored
    short = eng.generate("Hello", chat=False, max_new_tokens=10, speculative=None, logit_bias={eos: 100})
    assert short.finish_reason == "eos" and short.token_ids == []      # the ending EOS is left out
    for speculative in (None, "amphista"):
        long = eng.generate("Hello", chat=False, max_new_tokens=10, speculative=speculative, logit_bias={eos: 100},
                            ignore_eos=True)
        assert long.finish_reason == "length" and long.token_ids == [eos] * 10 and long.text == ""
    with pytest.raises(InputError, match="ignore_eos must be True or False"):
        eng.generate("Hello", max_new_tokens=2, ignore_eos=1)


def test_cli_flags(tiny_amphista_engine, tiny_hf_dir, tiny_amphista_heads_dir, capsys):
    import json
    from amphista_engine.cli import main
    eng = tiny_amphista_engine

    def cli(*extra):
        rc = main(["generate", "The quick brown fox", "--no-chat", "--model", str(tiny_hf_dir), "--device", "cpu",
                   "--max-seq-len", "128", "--heads", str(tiny_amphista_heads_dir), "--max-new-tokens", "10",
                   "--json", *extra])
        cap = capsys.readouterr()
        return rc, cap.out, cap.err

    base = eng.generate("The quick brown fox", chat=False, max_new_tokens=10, speculative=None)
    ban = base.token_ids[0]
    rc, out, err = cli("--logit-bias", f"{ban}=-100", "--logit-bias", "5=1.5", "--speculative", "amphista")
    assert rc == 0, err
    want = eng.generate("The quick brown fox", chat=False, max_new_tokens=10, speculative=None,
                        logit_bias={ban: -100, 5: 1.5})
    assert json.loads(out)["token_ids"] == want.token_ids and ban not in want.token_ids
    rc, out, err = cli("--frequency-penalty", "0.5", "--speculative", "amphista")
    assert rc == 0, err
    want = eng.generate("The quick brown fox", chat=False, max_new_tokens=10, speculative=None, frequency_penalty=0.5)
    assert json.loads(out)["token_ids"] == want.token_ids and json.loads(out)["speculative"] == "amphista"
    rc, out, err = cli("--logit-bias", "13:-100")
    assert rc != 0 and "--logit-bias takes TOKEN_ID=VALUE" in err and "Traceback" not in err
    rc, out, err = cli("--ignore-eos", "--logit-bias", f"{eng.eos_ids[0]}=100", "--speculative", "none")
    assert rc == 0, err
    assert json.loads(out)["finish_reason"] == "length" and json.loads(out)["token_ids"] == [eng.eos_ids[0]] * 10
    rc, out, err = cli("--min-tokens", "3", "--logit-bias", f"{eng.eos_ids[0]}=100", "--speculative", "none")
    assert rc == 0, err
    assert json.loads(out)["finish_reason"] == "eos" and len(json.loads(out)["token_ids"]) == 3
    rc, out, err = cli("--stop-token-id", str(base.token_ids[2]), "--speculative", "amphista")
    assert rc == 0, err
    assert json.loads(out)["finish_reason"] == "stop" and json.loads(out)["token_ids"] == base.token_ids[:2]


def test_min_tokens_holds_eos_back_plain_and_speculative(tiny_amphista_engine):
    eng = tiny_amphista_engine
    eos = eng.eos_ids[0]
    boost = {eos: 8.0}          # EOS all but forced: the answer would end at once
    assert eng.generate("Hello", chat=False, max_new_tokens=12, speculative=None, logit_bias=boost).token_ids == []
    for speculative in (None, "amphista"):
        r = eng.generate("Hello", chat=False, max_new_tokens=12, speculative=speculative, logit_bias=boost,
                         min_tokens=5)
        assert r.finish_reason == "eos" and len(r.token_ids) == 5, (speculative, r)
    plain = eng.generate("Hello", chat=False, max_new_tokens=12, speculative=None, logit_bias=boost, min_tokens=5)
    spec = eng.generate("Hello", chat=False, max_new_tokens=12, speculative="amphista", logit_bias=boost,
                        min_tokens=5)
    assert spec.token_ids == plain.token_ids
    # held back from the logits the token is chosen from, not reported: the logprobs stay the model's own
    with pytest.raises(InputError, match=r"min_tokens \(13\) is more than max_new_tokens \(12\)"):
        eng.generate("Hello", chat=False, max_new_tokens=12, min_tokens=13)
    with pytest.raises(InputError, match="min_tokens must be an integer >= 0"):
        eng.generate("Hello", max_new_tokens=2, min_tokens=-1)


def test_min_tokens_per_tree_node_matches_plain_under_an_oracle():
    """A node at depth d holds EOS back while the row has fewer than min_tokens - d tokens: an oracle drafting the
    min_tokens answer accepts long runs and ends where plain decoding does."""
    from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
    model = random_tiny_model(seed=11)
    eos = 26                                     # the tiny model's favourite token: it repeats it forever
    prompt = PROMPTS[0]

    def decode(dec):
        dec.min_tokens, dec.ban_ids = 9, torch.tensor([eos])
        list(run(dec, [prompt], _NoText(), 30, [eos], [], [GenerationStats()]))
        return dec.rows[0].ids, dec.rows[0].finish_reason
    params = SamplingParams(logit_bias={eos: 30.0})     # EOS first wherever allowed: it ends at exactly 9
    cache = KVCache.for_model(model.config, 1, 256, torch.float32, "cpu")
    plain = decode(PlainDecoder(model, cache, params))
    assert plain[1] == "eos" and len(plain[0]) == 9
    for seed in range(4):         # the EOS at depth 1, 2 or 3 of a step's accepted path
        heads = OracleHeads(prompt + plain[0] + [eos], 64, 3, hit=0.9, seed=seed)
        cache = KVCache.for_model(model.config, 1, 256, torch.float32, "cpu")
        dec = SpeculativeDecoder(model, cache, heads, TreeSpec("tree-16", 3, "cpu"), params)
        assert decode(dec) == plain, seed


def test_stop_token_ids_end_a_row(tiny_amphista_engine):
    eng = tiny_amphista_engine
    base = eng.generate("The quick brown fox", chat=False, max_new_tokens=10, speculative=None)
    stop_at = base.token_ids[3]
    for speculative in (None, "amphista"):
        r = eng.generate("The quick brown fox", chat=False, max_new_tokens=10, speculative=speculative,
                         stop_token_ids=[stop_at])
        cut = base.token_ids.index(stop_at)
        assert r.finish_reason == "stop" and r.token_ids == base.token_ids[:cut]
    # min_tokens holds them back too
    r = eng.generate("The quick brown fox", chat=False, max_new_tokens=10, stop_token_ids=[stop_at],
                     min_tokens=cut + 1, speculative=None)
    assert len(r.token_ids) > cut
    for bad, what in ((5, "stop_token_ids must be a list"), ([-1], "not a token id"), ([10**6], "not a token id")):
        with pytest.raises(InputError, match=what):
            eng.generate("Hi", max_new_tokens=2, stop_token_ids=bad)
