"""The drafting heads see the same inputs and give the same logits in training as when decoding.

Speculative greedy output equals plain output whatever the heads draft, so a train/inference mismatch (an
off-by-one between h_t and the token fused with it, another position for the SAL cache, another RoPE table, a
head order, a draft-vocabulary mapping) only lowers acceptance, silently. These tests capture the heads' drafts at
every step of real decodes (prefill, then steps whose accepted paths are compacted into the SAL cache, batches whose
ended rows are dropped) and hold them against what the trainer computes its loss from (pad_batch, HiddenSource,
loss_rows, head_features, heads.logits) on prompt + answer; they check that the trainer's targets for head k are
what the tree's depth k+1 node must be to be accepted, and that trained heads saved and loaded draft the same.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from conftest import greedy_records, random_tiny_model, train_cfg
from amphista_engine.config import ModelConfig
from amphista_engine.generation import GenerationStats, run
from amphista_engine.heads import load_heads, random_heads, save_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.model import Transformer
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
from amphista_engine.training.data import Sequence, ShardWriter
from amphista_engine.training.hidden_cache import HiddenSource, pad_batch
from amphista_engine.training.trainer import LossComputer, head_features, loss_rows, train_heads
from test_speculative import _NoText

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPTS = [[3, 9, 27, 1, 5, 8], [40, 2, 2, 2, 17, 60, 11, 12, 13, 50, 7], [1, 2]]


def decode_drafts(model, heads, prompts, limits, tree):
    """Greedy speculative decode of the prompts (a batch); returns (prompt + answer per row, [(row, t, draft
    logits [D, V'])]): what the heads drafted from position t (h_t fused with the token at t + 1) of each row."""
    cache = KVCache.for_model(model.config, len(prompts), 256, model.tok_embeddings.weight.dtype, "cpu")
    dec = SpeculativeDecoder(model, cache, heads, TreeSpec(tree, heads.num_heads, "cpu"), SamplingParams())
    rows, drafts = list(range(len(prompts))), []
    real_step, real_keep = heads.step, dec.keep_rows

    def step(hidden, next_tokens, count, kv_len, depth=None):
        out = real_step(hidden, next_tokens, count, kv_len, depth)
        for i in range(out.shape[0]):
            if dec.ongoing[i]:          # the draft of an ended row is never read
                drafts.append((rows[i], int(dec.cache.length[i]) - 1, out[i].float().clone()))
        return out

    def keep_rows(keep):               # the batch drops ended rows: row i of the next steps is row keep[i]
        rows[:] = [rows[i] for i in keep]
        return real_keep(keep)
    heads.step, dec.keep_rows = step, keep_rows
    stats = [GenerationStats() for _ in prompts]
    try:
        list(run(dec, prompts, _NoText(), limits, [], [], stats))
    finally:
        del heads.step
    return [p + dec.rows[b].ids for b, p in enumerate(prompts)], drafts, stats


def trainer_logits(target, heads, seqs, prompt_lens) -> dict:
    """{(row, t): head logits [K, V']} at the positions the trainer takes its loss at, computed as it does (one
    padded batch, grad on, heads in train mode)."""
    batch = [Sequence(f"s{i}", s, p) for i, (s, p) in enumerate(zip(seqs, prompt_lens))]
    x, lengths, plen = pad_batch(batch, "cpu")
    hidden = HiddenSource(target, None, "").get(batch, x)
    nxt = torch.zeros_like(x)
    nxt[:, :-1] = x[:, 1:]
    rows = loss_rows(lengths, plen, x.shape[1], heads.num_heads)[..., 0].nonzero()
    heads.train().requires_grad_(True)
    try:
        logits = heads.logits(head_features(heads, hidden, nxt, rows)).detach()
    finally:
        heads.eval().requires_grad_(False)
    return {(b, t): logits[i] for i, (b, t) in enumerate(rows.tolist())}


def assert_parity(model, heads, tree, prompts=PROMPTS, limits=(30, 12, 30), tol=1e-4):
    fresh = copy.deepcopy(heads).bind(model)     # the trainer's heads have never decoded (no tables made for a cache)
    seqs, drafts, stats = decode_drafts(model, heads, prompts, list(limits), tree)
    train = trainer_logits(model, fresh, seqs, [len(p) for p in prompts])
    compared = 0
    for row, t, draft in drafts:
        want = train.get((row, t))
        if want is None:                # past the answer's end (the trainer takes no loss there)
            continue
        err = float((draft - want[:draft.shape[0]]).abs().max())
        assert err < tol, f"row {row} position {t}: drafts differ from the trainer's by {err:.3g}"
        compared += 1
    assert compared >= sum(limits) // 4, compared
    return stats


@pytest.fixture(scope="module")
def trained(tmp_path_factory, target):
    """Heads trained 40 steps on the tiny target's greedy answers, saved in fp32 and loaded back: (in memory,
    loaded), per kind."""
    root = tmp_path_factory.mktemp("parity")
    with ShardWriter(root / "s.jsonl") as w:
        for r in greedy_records(target, 16, 6, 16):
            w.write(r)
    out = {}
    for kind, extra in (("amphista", dict(draft_vocab=24, layers_per_stage=2, stage_of_head="1,0,1")),
                        ("medusa", {})):
        res = train_heads(train_cfg(root / "s.jsonl", root / kind, kind=kind, steps=40, lr=1e-2, save_dtype="fp32",
                                    **extra), target=target)
        out[kind] = res["heads"].eval().requires_grad_(False), load_heads(root / kind, target)
    return out


@pytest.mark.parametrize("kind", ["amphista", "medusa"])
def test_trained_heads_draft_what_the_trainer_scores(trained, target, kind):
    """Trained heads accept several tokens a step, so the SAL cache takes compacted accepted paths; the loaded
    heads (the checkpoint format) draft as those in memory, and both as the trainer computes."""
    mem, loaded = trained[kind]
    for heads in (mem, loaded):
        stats = assert_parity(target, heads, "dynamic-8")
        assert max(s.tau for s in stats) > 1.3, [s.tau for s in stats]     # multi-token steps were exercised


@pytest.mark.parametrize("kind,over,tree", [
    ("amphista", {}, "chain-3"),
    ("amphista", dict(n_stages=3, stage_of_head=[2, 0, 1, 2]), "dynamic-8"),
    ("amphista", dict(draft_vocab_size=40, aeb_layers=2), "tree-16"),
    ("medusa", dict(draft_vocab_size=40), "dynamic-8"),
])
def test_random_heads_draft_what_the_trainer_scores(kind, over, tree):
    model = random_tiny_model(seed=7)
    K = len(over.get("stage_of_head", [0] * 3))
    heads = random_heads(kind, model, num_heads=K, seed=1, **over)
    if over.get("draft_vocab_size"):
        heads.set_draft_vocab(torch.randperm(64, generator=torch.Generator().manual_seed(5))[:40])
    assert_parity(model, heads, tree)


def longrope_target(rotary_dim: int = 0) -> Transformer:
    """A tiny LongRoPE target (Phi-3 style) whose table is past original_max_position_embeddings: long factors."""
    g = torch.Generator().manual_seed(0)
    n = (rotary_dim or 8) // 2
    rs = {"rope_type": "longrope", "factor": 8.0, "original_max_position_embeddings": 32,
          "short_factor": (1 + torch.rand(n, generator=g)).tolist(),
          "long_factor": (4 + 8 * torch.rand(n, generator=g)).tolist()}
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, head_dim=8,
                      max_position_embeddings=256, eos_token_id=[63], rope_scaling=rs, rotary_dim=rotary_dim)
    model = Transformer(cfg, 256)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "embeddings" in name or "output" in name else 0.08))
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("rotary_dim", [0, 6])
def test_longrope_target_sal_rotates_positions_as_in_training(rotary_dim):
    """LongRoPE picks its factors by the table's length: the SAL's table was a training batch's length (short
    factors) but the cache's when decoding (long factors past original_max_position_embeddings), so the heads drafted
    up to 5 logits off what they were trained on. Partial rotation (Phi-4-mini) failed to build the heads at all."""
    model = longrope_target(rotary_dim)
    heads = random_heads("amphista", model, num_heads=3, seed=1, std=0.2)
    assert_parity(model, heads, "chain-3", prompts=PROMPTS[:2], limits=(16, 12))


def teacher_rows(t: torch.Tensor, K: int) -> torch.Tensor:
    """The design's target of head k (0-based) drafting from position t: the target's own distribution at t + k + 1
    (it predicts x_{t+k+2}, the tree's depth k+1 node below the root x_{t+1})."""
    return t[..., None] + torch.arange(K) + 1


class TeacherDrafter:
    """Drafts, at each decoding position t, exactly the trainer's target for every head: teacher_rows' logits."""
    class config:
        kind = "amphista"
        draft_vocab_size = 0

    def __init__(self, logits: torch.Tensor, num_heads: int):
        self.logits, self.num_heads = logits, num_heads

    def reset_cache(self, batch, max_seq_len):
        self.length = torch.zeros(batch, dtype=torch.long)

    def step(self, hidden, next_tokens, count, kv_len):
        self.length += count
        return self.logits[teacher_rows(self.length - 1, self.num_heads).clamp(max=len(self.logits) - 1)]


@pytest.mark.parametrize("draft_vocab", [0, 48])
def test_trainer_targets_are_the_nodes_the_tree_accepts(draft_vocab):
    """Head k's loss is zero (and its top-1 always right) exactly for features giving the target's logits at
    teacher_rows, and a drafter giving those logits has every chain node accepted: the trainer's labels are the
    decoder's depth k+1 tokens."""
    K, n = 3, 24
    model = random_tiny_model(seed=4)
    prompt = PROMPTS[0]
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n + K + 1):        # the plain greedy continuation
            x = torch.cat([x, model(x, torch.arange(x.shape[1])[None])[:, -1].argmax(-1, keepdim=True)], 1)
        logits, hidden = model(x, torch.arange(x.shape[1])[None], return_hidden=True)

    # decoding: the drafter of the trainer's targets gets every node of a chain accepted
    cache = KVCache.for_model(model.config, 1, 128, torch.float32, "cpu")
    dec = SpeculativeDecoder(model, cache, TeacherDrafter(logits[0], K), TreeSpec(f"chain-{K}", K, "cpu"),
                             SamplingParams())
    stats = [GenerationStats()]
    list(run(dec, [prompt], _NoText(), n, [], [], stats))
    assert dec.rows[0].ids == x[0, len(prompt):len(prompt) + n].tolist()
    assert stats[0].accept_hist[K + 1] >= stats[0].decode_steps - 1, stats[0].accept_hist   # K drafts + the bonus

    # training: those are the teacher's distributions (KL 0) and the data tokens' argmax (top-1 100%)
    heads = random_heads("medusa", model, num_heads=K, seed=1, draft_vocab_size=draft_vocab)
    if draft_vocab:
        heads.set_draft_vocab(torch.randperm(64, generator=torch.Generator().manual_seed(2))[:draft_vocab])
    T = x.shape[1]
    valid = loss_rows(torch.tensor([T]), torch.tensor([len(prompt)]), T, K)
    rows = valid[..., 0].nonzero()
    feats = hidden[0, teacher_rows(rows[:, 1], K).clamp(max=T - 1)]
    for kind in ("kl", "ce"):
        lossf = LossComputer(model, kind, 0.8, K, 256, contextlib.nullcontext)
        loss, _, st = lossf(heads, feats, hidden, x, rows, valid[rows[:, 0], rows[:, 1]], False)
        if kind == "kl":
            assert float(loss) < 1e-5, float(loss)
        in_vocab = heads.slots_of(x[0, (teacher_rows(rows[:, 1], K) + 1).clamp(max=T - 1)]) >= 0
        hits = (valid[rows[:, 0], rows[:, 1]] & in_vocab).sum(0)
        assert st["top1"].tolist() == hits.tolist() and int(hits.min()) > 0


def test_saved_heads_in_bf16_draft_as_their_rounded_weights(trained, target, tmp_path):
    """The default save (bf16) loads as the in-memory heads with their weights rounded to bf16, the draft
    vocabulary and head-to-stage order kept."""
    mem = trained["amphista"][0]
    loaded = load_heads(save_heads(mem, tmp_path / "h"), target)
    rounded = copy.deepcopy(mem)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert torch.equal(loaded.draft_vocab, mem.draft_vocab)
    assert loaded.config.stage_of_head == mem.config.stage_of_head == [1, 0, 1]
    x = torch.tensor([PROMPTS[1] * 2])
    with torch.no_grad():
        _, hidden = target(x, torch.arange(x.shape[1])[None], return_hidden=True)
        nxt = torch.roll(x, -1, 1)
        got, want = loaded.forward_train(hidden, nxt), rounded.bind(target).forward_train(hidden, nxt)
    assert float((got - want).abs().max()) < 1e-5


@pytest.mark.parametrize("kind", ["amphista", "medusa"])
def test_heads_that_drafted_can_still_be_trained(kind):
    """Decoding made the SAL's RoPE table, its stage index and the draft vocabulary's LM-head rows in inference mode,
    and a training pass on the same heads then failed in backward ("Inference tensors cannot be saved for
    backward"): heads tried in an engine could not be fine-tuned further."""
    model = random_tiny_model(seed=7)
    heads = random_heads(kind, model, num_heads=3, seed=1, draft_vocab_size=40)
    decode_drafts(model, heads, PROMPTS[:1], [6], "chain-3")
    x = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        _, hidden = model(x, torch.arange(x.shape[1])[None], return_hidden=True)
    heads.train().requires_grad_(True)
    heads.forward_train(hidden, torch.roll(x, -1, 1)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in heads.parameters())
