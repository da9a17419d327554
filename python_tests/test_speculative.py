"""Speculative decoding is lossless: greedy output equals plain greedy, sampling keeps the distribution."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch

from amphista_engine.errors import ConfigError, HeadsMismatchError, InputError
from amphista_engine.generation import GenerationStats, PlainDecoder, run
from amphista_engine.heads import random_heads, save_heads, load_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.model import AttentionSpec, causal_mask
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
from amphista_engine.tree import build_tree

from conftest import needs_smollm2, random_tiny_model


class _NoText:
    """The decoding loop only needs a stream decoder; these tests compare token ids."""
    def stream_decoder(self):
        class S:
            def push(self, tok): return ""
            def flush(self): return ""
        return S()


class OracleHeads:
    """Test drafter that knows the true greedy continuation and guesses it with probability `hit`.

    Random heads almost never guess right, so on their own they would leave multi-token acceptance,
    compaction and stops inside an accepted run untested. A miss puts the right token at a lower rank
    (still in the tree sometimes) or drops it, so every branch of a tree gets exercised.
    """
    class config:
        kind = "oracle"

    def __init__(self, reference: list[int], vocab: int, num_heads: int, hit=0.7, seed=0):
        self.ref, self.V, self.num_heads, self.hit = reference, vocab, num_heads, hit
        self.g = torch.Generator().manual_seed(seed)

    def reset_cache(self, batch, max_seq_len):
        self.length = torch.zeros(batch, dtype=torch.long)

    def step(self, hidden, next_tokens, count, kv_len):
        self.length += count
        B = count.shape[0]
        logits = torch.randn(B, self.num_heads, self.V, generator=self.g)
        for b in range(B):
            root_pos = int(self.length[b])               # sequence index of the root token
            for k in range(self.num_heads):
                pos = root_pos + 1 + k
                if pos >= len(self.ref):
                    continue
                u = torch.rand(1, generator=self.g).item()
                if u < self.hit:
                    logits[b, k, self.ref[pos]] = 100.0             # rank 0
                elif u < self.hit + 0.15:
                    logits[b, k, self.ref[pos]] = 100.0             # rank 1: something else ranks above
                    logits[b, k, (self.ref[pos] + 1) % self.V] = 200.0
        return logits


def plain_ids(model, prompt, max_new, eos, max_seq_len=256):
    cache = KVCache.for_model(model.config, 1, max_seq_len, model.tok_embeddings.weight.dtype, "cpu")
    dec = PlainDecoder(model, cache, SamplingParams())
    stats = [GenerationStats()]
    list(run(dec, [prompt], _NoText(), max_new, eos, [], stats))
    return dec.rows[0].ids, dec.rows[0].finish_reason


def spec_ids(model, heads, tree, prompt, max_new, eos, max_seq_len=256, params=SamplingParams()):
    cache = KVCache.for_model(model.config, 1, max_seq_len, model.tok_embeddings.weight.dtype, "cpu")
    dec = SpeculativeDecoder(model, cache, heads, TreeSpec(tree, heads.num_heads, "cpu"), params)
    stats = [GenerationStats()]
    list(run(dec, [prompt], _NoText(), max_new, eos, [], stats))
    return dec.rows[0].ids, dec.rows[0].finish_reason, stats[0]


PROMPTS = [[5, 9, 2, 33, 17], [1], [60, 61, 62, 63, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


@functools.cache
def _tiny_plain(seed: int, prompt: tuple, max_new: int):
    """plain_ids on random_tiny_model(seed), no EOS: the reference many trees' and kinds' runs are held to, made
    once per model and prompt."""
    ids, why = plain_ids(random_tiny_model(seed=seed), list(prompt), max_new, eos=[])
    return tuple(ids), why


def tiny_plain(seed: int, prompt, max_new: int) -> tuple[list[int], str]:
    ids, why = _tiny_plain(seed, tuple(prompt), max_new)
    return list(ids), why


class OracleVocabHeads(OracleHeads):
    """The oracle drafting over a draft vocabulary: logits over slots, slot i = token vocab[i]. The vocabulary
    is a permutation (some tokens dropped), so a decoder that took slots for token ids would draft garbage."""

    def __init__(self, reference, vocab: int, num_heads: int, keep: int, seed=0):
        super().__init__(reference, vocab, num_heads, seed=seed)
        self.vocab = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed + 100))[:keep]

    def step(self, hidden, next_tokens, count, kv_len):
        return super().step(hidden, next_tokens, count, kv_len)[..., self.vocab]

    def token_ids(self, slots):
        return self.vocab[slots]


@pytest.mark.parametrize("tree", ["tree-16", "dynamic-16", "mc_sim_7b_63"])
def test_draft_vocabulary_maps_slots_to_tokens(tree):
    model = random_tiny_model(seed=11)
    prompt = PROMPTS[0]
    full, _ = tiny_plain(11, prompt, 60)
    reference = prompt + full
    for keep in (64, 40):                 # every token (permuted), and a vocabulary missing some tokens
        heads = OracleVocabHeads(reference, 64, 5 if tree == "mc_sim_7b_63" else 3, keep)
        got, why, stats = spec_ids(model, heads, tree, prompt, 60, eos=[])
        assert got == full and why == "length"
        if keep == 64:
            assert stats.tau > 1.5, stats.tau
    # the tree holds only draftable tokens below the root
    spec = TreeSpec(tree, 5 if tree == "mc_sim_7b_63" else 3, "cpu")
    vocab = torch.tensor([3, 17, 29, 41, 55, 60])
    logits = torch.randn(2, spec.max_depth, 6)
    built = spec.build(torch.tensor([1, 2]), logits, lambda slots: vocab[slots])
    assert torch.isin(built.tokens[:, 1:], vocab).all()


@pytest.mark.parametrize("kind", ["amphista", "medusa"])
@pytest.mark.parametrize("K,tree", [(1, "chain-1"), (3, "tree-16"), (3, "dynamic-16"), (5, "mc_sim_7b_63"),
                                    (5, "dynamic-64")])
def test_greedy_lossless_random_heads(kind, K, tree):
    model = random_tiny_model(seed=K)
    heads = random_heads(kind, model, num_heads=K, seed=1)
    for prompt in PROMPTS:
        ref, why = tiny_plain(K, prompt, 40)
        got, why2, _ = spec_ids(model, heads, tree, prompt, 40, eos=[])
        assert got == ref and why == why2 == "length"


@pytest.mark.parametrize("K,tree", [(1, "chain-1"), (3, "tree-16"), (4, "mc_sim_7b_63"), (5, "chain-5"),
                                    (5, "dynamic-64"), (3, "dynamic-8")])
def test_greedy_lossless_with_accepted_runs_and_stops(K, tree):
    """An oracle drafter makes long accepted runs; EOS and max_new_tokens then fall inside them."""
    model = random_tiny_model(seed=11)
    taus = []
    for i, prompt in enumerate(PROMPTS):
        full, _ = tiny_plain(11, prompt, 80)
        reference = prompt + full
        heads = OracleHeads(reference, 64, K, seed=i)
        got, why, stats = spec_ids(model, heads, tree, prompt, 80, eos=[])
        assert got == full and why == "length"
        taus.append(stats.tau)
        for max_new in (1, 2, 7, 13):                     # lengths that end inside an accepted run
            got, why, _ = spec_ids(model, OracleHeads(reference, 64, K, seed=max_new), tree, prompt, max_new, [])
            assert got == full[:max_new] and why == "length"
        # Pick an EOS id that first appears mid-continuation; output must stop right before it.
        cut = next((j for j in range(3, len(full)) if full[j] not in full[:j]), None)
        if cut is not None:
            got, why, _ = spec_ids(model, OracleHeads(reference, 64, K, seed=5), tree, prompt, 80, [full[cut]])
            assert got == full[:cut] and why == "eos"
    if K > 1:
        assert max(taus) > 1.5, taus    # the oracle really produced multi-token steps


@pytest.mark.parametrize("tree", ["chain-5", "dynamic-16"])
def test_batch_row_that_ends_first_stops_taking_cache_room(tree):
    """Row 0 (long prompt, oracle drafts: ~5 tokens a step) ends long before row 1 (wrong drafts: ~1 a step). A
    speculative batch keeps the ended row; its length must stop there, or it would go on accepting past the
    room its prompt + max_new_tokens + tree was given (an IndexError on the RoPE table at 2026-12-04)."""
    model = random_tiny_model(seed=11)
    long_prompt, short_prompt, max_new = PROMPTS[2] * 3, PROMPTS[0], 40
    full, _ = tiny_plain(11, long_prompt, max_new)
    spec = TreeSpec(tree, 5, "cpu")
    room = len(long_prompt) + max_new + spec.num_nodes + spec.max_depth      # what Engine._check_room grants
    heads = OracleHeads(long_prompt + full, 64, 5, hit=1.0)
    cache = KVCache.for_model(model.config, 2, room, torch.float32, "cpu")
    dec = SpeculativeDecoder(model, cache, heads, spec, SamplingParams())
    lengths, step = [], dec.step_device
    dec.step_device = lambda kv_len: (lengths.append(cache.length[:2].tolist()), step(kv_len))[1]
    stats = [GenerationStats(), GenerationStats()]
    list(run(dec, [long_prompt, short_prompt], _NoText(), max_new, [], [], stats))
    assert dec.rows[0].ids == full and dec.rows[1].ids == tiny_plain(11, short_prompt, max_new)[0]
    assert stats[0].tau > 3 and stats[1].tau < 1.5 and len(lengths) > 2 * stats[0].decode_steps
    assert max(n for n, _ in lengths) + spec.num_nodes <= room


def test_tree_verification_logits_equal_paths_alone():
    model = random_tiny_model(seed=4, vocab=64)
    tree = build_tree("tree-32")
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 64, (1, 9), generator=g)
    tokens = torch.randint(0, 64, (1, tree.num_nodes), generator=g)
    cache = KVCache.for_model(model.config, 1, 128, torch.float32, "cpu")
    with torch.no_grad():
        model(prefix, torch.arange(9)[None], cache, AttentionSpec(cache.length, causal_mask(9, "cpu"), 128))
        cache.length += 9
        spec = AttentionSpec(cache.length, tree.mask[None], 128)
        tree_logits = model(tokens, cache.length[:, None] + tree.depth[None], cache, spec)[0]
        for i in range(tree.num_nodes):
            path = tree.mask[i].nonzero().flatten()                  # ancestors-or-self, in depth order
            seq = torch.cat([prefix[0], tokens[0, path]])[None]
            alone = model(seq, torch.arange(seq.shape[1])[None])[0, -1]
            err = (tree_logits[i] - alone).norm() / alone.norm()
            assert err < 1e-5, (i, err)


@pytest.mark.parametrize("tree", ["tree-16", "dynamic-16"])
def test_rejection_sampling_is_lossless_end_to_end(tree):
    """Joint law of the first 3 tokens under speculative sampling equals the target's exact law."""
    V, B, T = 5, 12000, 1.0
    model = random_tiny_model(seed=7, vocab=V, dim=16, heads=2, kv_heads=1, inter=32)
    heads = random_heads("amphista", model, num_heads=3, seed=3)
    prompt = [1, 3, 0]
    # Exact probabilities of every 3-token continuation from the target itself.
    exact = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=2):
            ids = torch.tensor([prompt + list(seq)])
            p = torch.softmax(model(ids, torch.arange(ids.shape[1])[None])[0].float() / T, -1)
            p1 = p[len(prompt) - 1, seq[0]] * p[len(prompt), seq[1]]
            for x3 in range(V):
                exact[seq + (x3,)] = (p1 * p[len(prompt) + 1, x3]).item()
    # B rows as 4 independently seeded runs of B / 4 on one cache: the same sample, and a quarter of the cache to
    # zero (a CPU cache of 32 slots carries ~1500 scratch slots: ~2.4 GB at 12000 rows)
    chunk, runs, multi = B // 4, [], 0
    cache = KVCache.for_model(model.config, chunk, 32, torch.float32, "cpu")
    for c in range(4):
        params = SamplingParams(temperature=T, seed=1234 + c)
        dec = SpeculativeDecoder(model, cache, heads, TreeSpec(tree, 3, "cpu"), params)
        first = dec.prefill([prompt] * chunk)
        got = [first[:, None]]
        n = torch.ones(chunk, dtype=torch.long)
        while int(n.min()) < 3:
            out, count = dec.step()
            got.append(torch.where(torch.arange(out.shape[1])[None] < count[:, None], out, -1))
            n += count
            multi += int((count > 1).sum())
        runs.append(torch.cat(got, 1))
    seqs = torch.stack([row[row >= 0][:3] for run_ in runs for row in run_])
    counts = torch.zeros(V ** 3)
    counts.index_add_(0, seqs[:, 0] * V * V + seqs[:, 1] * V + seqs[:, 2], torch.ones(B))
    expected = torch.tensor([exact[s] for s in itertools.product(range(V), repeat=3)]) * B
    keep = expected >= 5                                  # pool sparse cells, as chi-square requires
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum().item()
    pooled_o, pooled_e = counts[~keep].sum().item(), expected[~keep].sum().item()
    if pooled_e > 0:
        chi2 += (pooled_o - pooled_e) ** 2 / pooled_e
    dof = int(keep.sum()) + (pooled_e > 0) - 1
    # 99.9% quantile of chi-square via Wilson-Hilferty: the test fails only for a real bias.
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < crit, (chi2, crit, dof)
    assert multi > B // 10       # the drafts were accepted often enough for the test to mean something


def test_bad_speculative_inputs(tmp_path):
    model = random_tiny_model()
    heads = random_heads("amphista", model, num_heads=3)
    with pytest.raises(ConfigError, match="unknown tree 'no-such-tree'; choose a shipped tree .*tree-16.*dynamic-N"
                                          ".*fitted to the loaded heads \\(mix-8\\)"):
        TreeSpec("no-such-tree", 3, "cpu", heads_trees={"mix-8": [[0], [0, 0]]})
    with pytest.raises(ConfigError, match="4 deep.*3 tokens"):
        TreeSpec("mc_sim_7b_63", 3, "cpu")
    with pytest.raises(ConfigError, match="dynamic"):
        TreeSpec("dynamic-x", 3, "cpu")
    with pytest.raises(ConfigError, match=r"tree '\[\]' has no draft nodes"):
        TreeSpec("[]", 3, "cpu")
    with pytest.raises(ConfigError, match="JSON"):
        TreeSpec("[[0], [0, 0]", 3, "cpu")
    assert TreeSpec("[[0], [1], [0, 0]]", 3, "cpu").num_nodes == 4        # path lists from a command line
    save_heads(heads, tmp_path / "h")
    other = random_tiny_model(seed=99)
    with pytest.raises(HeadsMismatchError, match="fingerprint"):
        load_heads(tmp_path / "h", other)


def test_engine_speculative_api(tiny_hf_dir, tmp_path):
    from amphista_engine import Engine
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=256)
    with pytest.raises(InputError, match='needs drafting heads: Engine.from_pretrained\\(..., heads="default"\\)'):
        engine.generate("The quick brown fox", chat=False, speculative="amphista")
    heads = random_heads("medusa", engine.model, num_heads=4, seed=2)
    save_heads(heads, tmp_path / "medusa")
    engine.load_heads(str(tmp_path / "medusa"))
    with pytest.raises(InputError, match="medusa heads"):
        engine.generate("The quick brown fox", chat=False, speculative="amphista")
    plain = engine.generate("The quick brown fox", chat=False, max_new_tokens=30)
    for tree in ["mc_sim_7b_63", "dynamic-32", [[0], [1], [0, 0], [0, 0, 0]]]:
        res = engine.generate("The quick brown fox", chat=False, max_new_tokens=30, speculative="medusa", tree=tree)
        assert res.token_ids == plain.token_ids and res.text == plain.text
        st = res.stats.to_dict()
        assert st["tau"] >= 1.0 and sum(st["accept_hist"]) == st["decode_steps"] and "time_ms" in st


@pytest.fixture(scope="module")
def smollm2_haiku(smollm2):
    """(prompt, plain greedy answer of 16 tokens) on the fp32 SmolLM2: the reference every tree below is held to."""
    from amphista_engine.chat import render_chat
    prompt = smollm2.tokenizer.encode(render_chat(smollm2.tokenizer, "Write a haiku about the sea."))
    return prompt, plain_ids(smollm2.model, prompt, 16, eos=[], max_seq_len=512)[0]


@needs_smollm2
@pytest.mark.parametrize("kind,tree", [("amphista", "mc_sim_7b_63"), ("medusa", "dynamic-32")])
def test_smollm2_greedy_lossless(smollm2, smollm2_haiku, kind, tree):
    model = smollm2.model
    heads = random_heads(kind, model, num_heads=4, seed=0)
    prompt, full = smollm2_haiku
    # random heads: nearly every draft refused, each step the same full-tree verification; 3 steps show it
    got, _, _ = spec_ids(model, heads, tree, prompt, 4, eos=[], max_seq_len=512)
    assert got == full[:4]
    # Oracle drafts on the real model: long accepted runs, EOS inside one.
    oracle = OracleHeads(prompt + full, model.config.vocab_size, 4, hit=0.8)
    got, _, stats = spec_ids(model, oracle, tree, prompt, 16, eos=[], max_seq_len=512)
    assert got == full and stats.tau > 1.5
    got, why, _ = spec_ids(model, OracleHeads(prompt + full, model.config.vocab_size, 4), tree, prompt, 16,
                           eos=[full[10]], max_seq_len=512)
    assert got == full[:full.index(full[10])] and why == "eos"


def test_reuse_prefix_resumes_the_heads_cache():
    """Prefilling a prompt after a kept prefix drafts what a fresh prefill drafts: the SAL entries of the kept
    positions come from the previous run, the rest are appended after them."""
    from kernel_checks import rel_err
    model = random_tiny_model(seed=5)
    heads = random_heads("amphista", model, num_heads=3, seed=2)
    full = list(range(3, 23))
    tree, params = TreeSpec("tree-16", 3, torch.device("cpu")), SamplingParams()

    def decoder(cache):
        return SpeculativeDecoder(model, cache, heads, tree, params)

    fresh = decoder(KVCache.for_model(model.config, 1, 128, torch.float32, "cpu"))
    root = fresh.prefill([full])
    want = fresh.draft.clone()
    cache = KVCache.for_model(model.config, 1, 128, torch.float32, "cpu")
    decoder(cache).prefill([full[:10]])               # the previous turn: the SAL holds entries 0..9
    resumed = decoder(cache)
    resumed.prefix_reuse = 9                          # entry 9 paired position 9 with that turn's own next token
    assert torch.equal(resumed.prefill([full]), root)
    assert int(cache.length[0]) == len(full) and int(heads.sal_cache.length[0]) == len(full)
    assert rel_err(resumed.draft, want) < 1e-4


def test_default_tree_per_device():
    """Untimed defaults: on a GPU the heads' fitted 64-node tree (mix-64) where they carry one, else mc_sim_7b_63;
    on a CPU tree-16, or with 4-bit weights the heads' mix-4, else a chain; shallow heads get a chain."""
    from amphista_engine.speculative import default_tree
    fitted = {"mix-64": [[0]], "mix-4": [[0]]}
    assert default_tree(4, "cuda", fitted) == "mix-64" and default_tree(4, "cuda:1", None) == "mc_sim_7b_63"
    assert default_tree(4, "cpu", fitted) == "tree-16"
    assert default_tree(4, "cpu", fitted, four_bit=True) == "mix-4"
    assert default_tree(4, "cpu", {}, four_bit=True) == "chain-3"
    assert default_tree(2, "cuda", fitted) == "chain-2"


def test_a_gpu_batch_gets_a_tree_whose_rows_stay_within_the_weight_bound():
    """A GPU batch of B rows verifies B x N tree rows; past a few hundred rows its products turn compute-bound and
    the step no longer costs about a plain step (roofline: speculative.GPU_ROWS). The untimed GPU tree shrinks with
    the batch: the heads' fitted mix-N where they carry one, else dynamic-N; the CPU's default is the batch's
    business of speculation_check (timed), not of the tree."""
    from amphista_engine.speculative import GPU_ROWS, default_tree
    fitted = {f"mix-{n}": [[0]] for n in (4, 8, 16, 32, 64)}
    picks = {b: default_tree(4, "cuda", fitted, batch=b) for b in (1, 4, 5, 8, 16, 32, 64, 65, 512)}
    assert picks == {1: "mix-64", 4: "mix-64", 5: "mix-32", 8: "mix-32", 16: "mix-16", 32: "mix-8", 64: "mix-4",
                     65: "mix-4", 512: "mix-4"}
    assert all(b * int(t.split("-")[1]) <= GPU_ROWS for b, t in picks.items() if b <= 64)
    assert default_tree(4, "cuda", None, batch=16) == "dynamic-16" and default_tree(4, "cuda", None) == "mc_sim_7b_63"
    assert default_tree(4, "cpu", fitted, batch=64) == "tree-16"
    # and the spec a speculative run builds follows it (the engine resolves tree=None per batch)
    spec = TreeSpec(default_tree(4, "cuda", None, batch=32), 4, "cpu")
    assert spec.num_nodes == 8 and spec.max_depth == 4


class RowOracles:
    """One OracleHeads per batch row (its own reference and random draws, so a row drafts as it would alone),
    following the rows when the batch drops its ended ones (keep_rows): a row moved to another index keeps its
    own oracle."""
    config = OracleHeads.config

    def __init__(self, refs: list[list[int]], vocab: int, num_heads: int, seeds: list[int]):
        self.rows = [OracleHeads(ref, vocab, num_heads, hit=0.9, seed=s) for ref, s in zip(refs, seeds)]
        self.num_heads, self.kept = num_heads, []

    def reset_cache(self, batch, max_seq_len):
        for o in self.rows:
            o.reset_cache(1, max_seq_len)

    def step(self, hidden, next_tokens, count, kv_len):
        return torch.cat([o.step(hidden[b:b + 1], next_tokens[b:b + 1], count[b:b + 1], kv_len)
                          for b, o in enumerate(self.rows[:count.shape[0]])])

    def keep_rows(self, keep):
        self.kept.append(keep.tolist())
        self.rows = [self.rows[i] for i in keep.tolist()]


@pytest.mark.parametrize("tree", ["chain-5", "dynamic-16"])
def test_speculative_batch_drops_ended_rows_and_moved_rows_keep_their_drafts(tree):
    """A speculative batch stops verifying trees for rows that ended (each costs a tree of rows a step): the rows
    left move down, with their cache, drafts and the heads' state. Every row's tokens and steps equal its own run
    alone, and a moved row goes on drafting its own continuation (tau stays high)."""
    model = random_tiny_model(seed=11)
    prompts, max_new = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[2] * 2], 40
    fulls = [tiny_plain(11, p, max_new)[0] for p in prompts]
    eos = [fulls[0][6]]                 # ends row 0 early (and any row that says it)
    alone = []
    for p, full in zip(prompts, fulls):
        cache = KVCache.for_model(model.config, 1, 256, torch.float32, "cpu")
        dec = SpeculativeDecoder(model, cache, RowOracles([p + full], 64, 5, [len(alone)]),
                                 TreeSpec(tree, 5, "cpu"), SamplingParams())
        stats = [GenerationStats()]
        list(run(dec, [p], _NoText(), max_new, eos, [], stats))
        alone.append((dec.rows[0].ids, dec.rows[0].finish_reason, stats[0].decode_steps))
    heads = RowOracles([p + f for p, f in zip(prompts, fulls)], 64, 5, list(range(4)))
    cache = KVCache.for_model(model.config, 4, 256, torch.float32, "cpu")
    dec = SpeculativeDecoder(model, cache, heads, TreeSpec(tree, 5, "cpu"), SamplingParams())
    stats = [GenerationStats() for _ in prompts]
    list(run(dec, prompts, _NoText(), max_new, eos, [], stats))
    assert [(r.ids, r.finish_reason, s.decode_steps) for r, s in zip(dec.rows, stats)] == alone
    lengths = sorted(range(4), key=lambda b: alone[b][2])
    assert heads.kept and heads.kept[0] != list(range(len(heads.kept[0]))), heads.kept      # a row moved down
    assert stats[lengths[-1]].tau > 2.5, [s.tau for s in stats]
    assert dec.next.shape[0] < 4 and dec.draft.shape[0] == dec.next.shape[0]


def test_amphista_heads_keep_rows_draft_as_a_batch_of_the_kept_rows():
    """keep_rows moves the SAL cache's rows (and lengths): the kept rows then draft as a fresh batch of them."""
    from kernel_checks import rel_err
    model = random_tiny_model(seed=3)
    heads = random_heads("amphista", model, num_heads=3, seed=1)
    g = torch.Generator().manual_seed(0)
    d, V = model.config.dim, model.config.vocab_size
    hidden, toks, count = torch.randn(3, 7, d, generator=g), torch.randint(0, V, (3, 7), generator=g), \
        torch.tensor([7, 5, 6])
    h2, t2, c2 = torch.randn(2, 4, d, generator=g), torch.randint(0, V, (2, 4), generator=g), torch.tensor([4, 2])
    keep = torch.tensor([2, 0])
    with torch.inference_mode():
        heads.reset_cache(3, 64)
        heads.step(hidden, toks, count, 64)
        heads.keep_rows(keep)
        got = heads.step(h2, t2, c2, 64)
        heads.reset_cache(2, 64)
        heads.step(hidden[keep], toks[keep], count[keep], 64)
        want = heads.step(h2, t2, c2, 64)
    assert heads.sal_cache.length[:2].tolist() == [10, 9]
    assert rel_err(got, want) < 1e-5


def test_dynamic_tree_depth_is_the_depth_it_can_reach():
    """dynamic-N puts N - 1 nodes below the root, so it is at most N - 1 deep whatever the heads' count. Recorded as
    the heads' count, dynamic-8 on 8 heads (7 deep) was refused by the CPU's bf16 exactness limit of 7 levels, and
    a step's width and cache room were sized for depths it never reaches."""
    from amphista_engine.kernels import cpu_exact
    spec = TreeSpec("dynamic-8", 8, "cpu")
    assert (spec.max_depth, TreeSpec("dynamic-3", 4, "cpu").max_depth, TreeSpec("dynamic-64", 4, "cpu").max_depth) \
        == (7, 2, 4)
    model = random_tiny_model(seed=2, dtype=torch.bfloat16)
    heads = random_heads("medusa", model, num_heads=8, seed=3).to(torch.bfloat16)
    cache = KVCache.for_model(model.config, 1, 128, torch.bfloat16, "cpu")
    dec = SpeculativeDecoder(model, cache, heads, spec, SamplingParams())      # within the 7 levels: taken
    assert dec.tokens_per_step == 8 and cpu_exact.MAX_DEPTH == 7
    stats = [GenerationStats()]
    list(run(dec, [PROMPTS[0]], _NoText(), 12, [], [], stats))
    cache = KVCache.for_model(model.config, 1, 128, torch.bfloat16, "cpu")
    plain = PlainDecoder(model, cache, SamplingParams())
    list(run(plain, [PROMPTS[0]], _NoText(), 12, [], [], [GenerationStats()]))
    assert dec.rows[0].ids == plain.rows[0].ids
