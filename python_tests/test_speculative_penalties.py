"""Speculative decoding under repetition / presence / frequency penalties. They used to need plain decoding (a
named method was refused, "auto" decoded plainly): a penalty depends on the tokens before a position, which differ
from one tree path to the next. Each tree node is now penalised for the answer so far plus its own path below the
root (sampling.tree_penalties), with plain decoding's formulas on the same floats, so greedy output equals plain
decoding's and tree rejection sampling keeps the penalised target distribution."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.generation import GenerationStats, PlainDecoder, run
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams, apply_penalties, apply_repetition_penalty, tree_penalties
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
from amphista_engine.tree import build_tree, dynamic_tree, static_tree_tokens

from conftest import random_tiny_model
from test_speculative import _NoText

PARAMS = [SamplingParams(repetition_penalty=1.7), SamplingParams(repetition_penalty=0.6),
          SamplingParams(presence_penalty=1.3), SamplingParams(frequency_penalty=-0.7),
          SamplingParams(repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.9)]


def _node_reference(logits, tokens, tree, seen, counts, params):
    """Plain decoding's penalties, node by node: the context is the answer so far plus the node's path tokens
    below the root, recorded as PlainDecoder._record would have recorded them one by one."""
    B, N, _ = logits.shape
    mask = tree.mask if tree.batched else tree.mask.expand(B, N, N)
    depth = tree.depth if tree.batched else tree.depth.expand(B, N)
    out = torch.empty(logits.shape, dtype=torch.float32)
    for b in range(B):
        for n in range(N):
            s = None if seen is None else seen[b:b + 1].clone()
            c = None if counts is None else counts[b:b + 1].clone()
            for m in range(N):
                if mask[b, n, m] and depth[b, m] > 0:
                    if s is not None:
                        s[0, tokens[b, m]] = True
                    if c is not None:
                        c[0, tokens[b, m]] += 1
            row = logits[b, n][None]
            if s is not None:
                row = apply_repetition_penalty(row, s, params.repetition_penalty)
            if c is not None:
                row = apply_penalties(row, c, params.presence_penalty, params.frequency_penalty)
            out[b, n] = row[0]
    return out


def _state(B, V, params, g):
    """seen / counts over ~30% of a small vocabulary, ~20 tokens of a large one (as an answer's few hundred in 49k)."""
    share = 0.3 if V < 50 else 20 / V
    seen = torch.rand(B, V, generator=g) < share if params.repetition_penalty != 1.0 else None
    counts = ((torch.rand(B, V, generator=g) < share) * torch.randint(1, 3, (B, V), generator=g)).int() \
        if params.penalized else None
    return seen, counts


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"r{p.repetition_penalty}p{p.presence_penalty}"
                                                       f"f{p.frequency_penalty}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V, dense", [(6, False), (6, True), (300, False), (300, True)])
def test_every_node_gets_plain_decodings_values_bit_for_bit(params, dtype, V, dense):
    """A vocabulary of 6 puts the same token on a path several times (a frequency count of 2-4, a repetition
    penalty applied once), and next to other nodes' copies of it (their writes must agree); one of 300 leaves most
    columns untouched, which a CPU skips (dense=False) and a GPU broadcasts over (dense=True, _tree_penalties_dense:
    the GPU's path, run here on the CPU)."""
    from amphista_engine.sampling import _tree_penalties_dense
    g = torch.Generator().manual_seed(3)
    B = 3
    static = build_tree("mc_sim_7b_63")
    static.tokens = static_tree_tokens(static, torch.randint(0, V, (B,), generator=g),
                                       torch.randint(0, V, (B, static.max_depth, 10), generator=g))
    dyn = dynamic_tree(torch.randint(0, V, (B,), generator=g), torch.randn(B, 4, V, generator=g), 9, topk=V)
    for tree in (static, dyn):
        N = tree.tokens.shape[1]
        logits = (torch.randn(B, N, V, generator=g) * 4).to(dtype)
        logits[0, 0, 0] = 0.0                                   # the repetition penalty's sign boundary
        seen, counts = _state(B, V, params, g)
        kept = logits.clone()
        fn = _tree_penalties_dense if dense else tree_penalties
        got = fn(logits.float(), tree.tokens, tree.path_below_root(), seen, counts, params)
        want = _node_reference(logits, tree.tokens, tree, seen, counts, params)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert not torch.equal(got, logits.float())             # the penalties did something
        assert torch.equal(logits, kept)                        # the model's logits stay its own (logprobs)


def _decode(decoder_cls, model, prompts, max_new, params, **kw):
    cache = KVCache.for_model(model.config, len(prompts), 256, model.tok_embeddings.weight.dtype, "cpu")
    dec = decoder_cls(model, cache, params=params, **kw)
    list(run(dec, prompts, _NoText(), max_new, [], [], [GenerationStats() for _ in prompts]))
    return dec


@pytest.mark.parametrize("tree", ["tree-16", "dynamic-8", "chain-3"])
def test_greedy_batches_equal_plain_decoding_and_keep_the_same_counts(tree):
    """Rows of a batch accept different counts a step: only a row's own accepted tokens may enter its seen /
    counts (a padded entry counted would penalise a token it never produced, and the answers would part)."""
    model = random_tiny_model(seed=5, vocab=24)
    heads = random_heads("amphista", model, num_heads=3, seed=2)
    prompts = [[5, 9, 2, 3, 17], [1, 4]]
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.6)
    spec = _decode(lambda m, c, params: SpeculativeDecoder(m, c, heads, TreeSpec(tree, 3, "cpu"), params),
                   model, prompts, 30, params)
    for b, prompt in enumerate(prompts):
        plain = _decode(PlainDecoder, model, [prompt], 30, params)
        assert spec.rows[b].ids == plain.rows[0].ids
        unpenalised = _decode(PlainDecoder, model, [prompt], 30, SamplingParams())
        assert plain.rows[0].ids != unpenalised.rows[0].ids
    assert spec.forwards < 30                                   # it did speculate


def test_drafts_are_ranked_under_the_penalties():
    """Heads that learnt unpenalised text guess the tokens a penalty pushes down: their guesses are ranked under
    the answer's penalties (the same for every head), so the tree holds what the target may still pick."""
    model = random_tiny_model(seed=5, vocab=24)
    heads = random_heads("amphista", model, num_heads=3, seed=2)
    cache = KVCache.for_model(model.config, 1, 64, torch.float32, "cpu")
    params = SamplingParams(repetition_penalty=50.0)
    dec = SpeculativeDecoder(model, cache, heads, TreeSpec("chain-3", 3, "cpu"), params)
    dec.prefill([[3, 4, 5]])
    draft = torch.zeros(1, 3, 24)
    draft[..., 4] = 5.0                                       # every head's favourite: a prompt token
    draft[..., 7] = 4.0
    assert (dec._penalised_draft(draft).argmax(-1) == 7).all()
    assert (SpeculativeDecoder(model, cache, heads, TreeSpec("chain-3", 3, "cpu"), SamplingParams())
            ._penalised_draft(draft).argmax(-1) == 4).all()
    # heads with a draft vocabulary score its slots: slot i is token vocab[i], penalised as that token
    sub = random_heads("amphista", model, num_heads=3, seed=2, draft_vocab_size=8)
    vocab = torch.tensor([20, 4, 11, 7, 3, 2, 9, 1])
    sub.set_draft_vocab(vocab)
    dec = SpeculativeDecoder(model, cache, sub, TreeSpec("chain-3", 3, "cpu"), params)
    dec.prefill([[3, 4, 5]])
    draft = torch.zeros(1, 3, 8)
    draft[..., 1] = 5.0                                       # token 4: a prompt token
    draft[..., 4] = 4.5                                       # token 3: a prompt token too
    draft[..., 3] = 4.0                                       # token 7
    assert (dec._penalised_draft(draft).argmax(-1) == 3).all()


def test_graph_replays_follow_each_runs_penalties(tiny_hf_dir):
    """Under CUDA graphs (the CPU stand-in) seen / counts are state copied into the captured step and the penalty
    values key the graphs: runs in turn with other penalties, and a batch, give eager decoding's answers."""
    from test_graph_replay_state_qa import _engines

    eager, graphed = _engines(tiny_hf_dir)           # the stand-in graphs on the second
    prompts = ["The quick brown fox jumps", "def f(x):"]
    for kw in (dict(repetition_penalty=1.5), dict(frequency_penalty=0.8), dict(repetition_penalty=1.5),
               dict(presence_penalty=1.2, temperature=0.8, seed=3)):
        want = [r.token_ids for r in eager.generate_batch(prompts, 24, chat=False, speculative="amphista", **kw)]
        got = [r.token_ids for r in graphed.generate_batch(prompts, 24, chat=False, speculative="amphista", **kw)]
        assert got == want, kw
        if "temperature" not in kw:
            assert want == [r.token_ids for r in eager.generate_batch(prompts, 24, chat=False, **kw)]
    st = graphed.graphs.stats
    assert st.replays > 0 and st.failed_captures == 0 and not graphed.graphs.built_in_capture
