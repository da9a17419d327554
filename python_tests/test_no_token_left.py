"""A step where allowed_token_ids, bad_words, logit_bias, min_tokens or a grammar rule out every token is refused by
name (an InputError at that token), never answered: sampling drew any token of the vocabulary there (NaN
probabilities, allowed_token_ids broken) and greedy decoding took token 0, silently. Plain and speculative decoding,
greedy and sampled, through the graph stand-in, and the server."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.errors import InputError
from amphista_engine.generation import NO_TOKEN, PlainDecoder, flag_no_token
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec

from conftest import random_tiny_model
from graph_standin import CPUGraphs
from test_cuda_graphs import decode
from test_speculative_penalties_qa import answers

pytestmark = pytest.mark.usefixtures("one_thread_module")

# token 11 is the only one allowed (7 ends answers() rows), and twice in a row is a bad word: the second token has
# nothing left
STUCK = dict(allowed_token_ids=[11], bad_words_ids=[[11, 11]])


def test_flag_marks_rows_with_nothing_left_and_only_accepted_nodes_count():
    toks = torch.tensor([[3], [4]])
    logits = torch.tensor([[0.0, float("-inf")], [float("-inf"), float("-inf")]])
    assert flag_no_token(toks, logits).tolist() == [[3], [NO_TOKEN]]
    tree = torch.full((1, 3, 2), 1.0)
    tree[0, 2] = float("-inf")                        # node 2 has nothing left
    assert flag_no_token(torch.tensor([[5, 6, 0]]), tree, torch.tensor([[0, 1, -1]])).tolist() == [[5, 6, 0]]
    # token j is chosen at accepted node j: those before the ruled-out node stand (a row may end in them)
    assert flag_no_token(torch.tensor([[5, 6, 0]]), tree, torch.tensor([[0, 2, -1]])).tolist() == [[5] + [NO_TOKEN] * 2]


@pytest.mark.parametrize("make", ["plain", "amphista"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_step_with_nothing_left_is_refused_by_name(make, temperature):
    model = random_tiny_model(seed=3)
    cache = KVCache.for_model(model.config, 2, 128, torch.float32, "cpu")
    params = SamplingParams(temperature, seed=1, **STUCK)
    if make == "plain":
        dec = PlainDecoder(model, cache, params)
    else:
        heads = random_heads("amphista", model, num_heads=3, seed=2)
        dec = SpeculativeDecoder(model, cache, heads, TreeSpec("tree-16", 3, "cpu"), params,
                                 acceptance="greedy" if temperature == 0 else "rejection")
    with pytest.raises(InputError, match=r"no token is left to choose at new token 2 of prompt 0.*allowed_token_ids"):
        answers(dec, [[3, 5, 9]], 6)


def test_rows_with_tokens_left_are_untouched():
    """Two allowed tokens, pairs of each banned: answers alternate, never refused (a tree's nodes past a banned pair
    have nothing left, but no row accepts them)."""
    model = random_tiny_model(seed=3)
    cache = KVCache.for_model(model.config, 2, 128, torch.float32, "cpu")
    params = SamplingParams(allowed_token_ids=[11, 9], bad_words_ids=[[11, 11], [9, 9]])
    plain, _ = answers(PlainDecoder(model, cache, params), [[3, 5, 9], [1, 2]], 10)
    heads = random_heads("amphista", model, num_heads=3, seed=2)
    dec = SpeculativeDecoder(model, cache, heads, TreeSpec("tree-16", 3, "cpu"), params)
    spec, _ = answers(dec, [[3, 5, 9], [1, 2]], 10)
    assert spec == plain and all(len(r) == 10 and all(a != b for a, b in zip(r, r[1:])) for r in plain)


def test_the_graph_standin_flags_it_too(one_thread):
    """chosen_from is rebound each step: a replayed graph flags the row as the eager step does."""
    model = random_tiny_model(seed=3)
    cache = KVCache.for_model(model.config, 1, 256, torch.float32, "cpu")
    graphs = CPUGraphs()
    for _ in range(2):                          # the second run replays what the first captured
        toks, _ = decode(PlainDecoder(model, cache, SamplingParams(**STUCK)), [[3, 5, 9]], 6, graphs=graphs)
        assert toks[0][:2] == [11, NO_TOKEN], toks
    assert graphs.stats.replays > 0


def test_the_server_answers_400(tiny_amphista_engine):
    from conftest import serving
    from test_serve import call, error_of
    engine = tiny_amphista_engine
    the = engine.tokenizer.encode(" the")[-1]
    with serving(engine, model_id="tiny", defaults=dict(max_new_tokens=32)) as httpd:
        # a JSON object cannot start with " the", the only token allowed
        body = {"prompt": "The quick brown fox", "max_tokens": 8, "allowed_token_ids": [the],
                "response_format": {"type": "json_object"}}
        error_of(call(httpd.url, "/v1/completions", body), 400, "no token is left to choose at new token 1")
