"""The heads' guesses are ranked under the bias row plain decoding applies (logit_bias, allowed_token_ids, one-token
bad words) before the tree is built: a banned token is no draft while allowed ones are left, so a tree does not spend
its nodes on tokens the target can never choose. Output stays plain decoding's."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec

from conftest import needs_smollm2, random_tiny_model
from test_speculative_penalties_qa import answers

pytestmark = pytest.mark.usefixtures("one_thread_module")

ALLOWED = list(range(8, 40)) + [63]            # 63: the tiny model's EOS


@pytest.mark.parametrize("tree", ["dynamic-16", "tree-16"])
@pytest.mark.parametrize("params", [SamplingParams(allowed_token_ids=ALLOWED),
                                    SamplingParams(1.0, seed=2, logit_bias={t: -100 for t in range(8)},
                                                   bad_words_ids=[[t] for t in range(40, 63)])],
                         ids=["allowed", "bias+bad-words"])
def test_trees_hold_only_tokens_the_target_may_choose(tree, params):
    model = random_tiny_model(seed=5)
    heads = random_heads("amphista", model, num_heads=4, seed=1)          # random heads guess anything
    cache = KVCache.for_model(model.config, 2, 128, torch.float32, "cpu")
    dec = SpeculativeDecoder(model, cache, heads, TreeSpec(tree, 4, "cpu"), params,
                             acceptance="greedy" if params.greedy else "rejection")
    built = []
    build = dec.tree.build

    def spy(root, draft, ids):
        t = build(root, draft, ids)
        built.append(t.tokens[:, 1:])              # the drafted nodes (the root is the target's own token)
        return t
    dec.tree.build = spy
    rows, _ = answers(dec, [[3, 5, 7], [9, 9, 2, 4]], 12)
    drafted = torch.cat([b.flatten() for b in built])
    assert len(built) > 3 and drafted.numel() > 40
    assert set(drafted.tolist()) <= set(ALLOWED), sorted(set(drafted.tolist()) - set(ALLOWED))
    assert all(set(r) <= set(ALLOWED) for r in rows)


@pytest.fixture(scope="module")
def smol():
    from amphista_engine import Engine
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=384)
    engine.load_heads("default")
    return engine


@needs_smollm2
def test_smollm2_greedy_under_a_ban_equals_plain_decoding(smol):
    """Banning a common token (every "," spelling the tokenizer has) changes the answer; speculation still gives
    plain decoding's, drafts ranked under the ban."""
    tok = smol.tokenizer
    commas = sorted({i for i in range(smol.config.vocab_size) if tok.decode([i]).strip() == ","})
    kw = dict(max_new_tokens=40, chat=False, logit_bias={i: -100 for i in commas})
    prompt = "List five fruits, separated by commas: apple,"
    plain = smol.generate(prompt, **kw)
    assert plain.token_ids != smol.generate(prompt, max_new_tokens=40, chat=False).token_ids
    spec = smol.generate(prompt, speculative="amphista", tree="tree-16", **kw)
    assert spec.token_ids == plain.token_ids
    assert not set(spec.token_ids) & set(commas)
