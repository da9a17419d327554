"""Drafting heads: Amphista's AEB is bi-directional and its SAL causal, parallel training equals incremental
decoding, batched heads equal a per-head loop, checkpoints round-trip and refuse other targets, Medusa loads."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from amphista_engine.config import ModelConfig
from amphista_engine.errors import ConfigError, HeadsMismatchError, ModelLoadError
from amphista_engine.heads import (AmphistaHeads, HeadsConfig, MedusaHeads, lm_head_fingerprint, load_heads,
                                   load_medusa_checkpoint, random_heads, save_heads)
from amphista_engine.heads.checkpoint import SKETCH_KEY, SKETCH_ROWS
from amphista_engine.model import Transformer, causal_mask, rope_table
from model_helpers import rel_err

KINDS = ("amphista", "medusa")


def tiny_target(seed=0, vocab=64, dim=32) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2,
                                    intermediate_size=64, max_position_embeddings=128))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:   # norms stay at 1
                torch.nn.init.normal_(p, std=0.02)
    model.setup_rope(128)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def target_states(target, B=2, T=24, seed=0):
    """The target's final-norm hidden states and its greedy next tokens on random prompts."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, target.config.vocab_size, (B, T), generator=g)
    with torch.no_grad():
        logits, hidden = target(tokens, torch.arange(T)[None].expand(B, T), return_hidden=True)
    return hidden, logits.argmax(-1)


# ---- config -------------------------------------------------------------------------------------------------
def test_config_defaults_roundtrip_and_validation(target):
    cfg = HeadsConfig.for_target(target.config)
    assert cfg.stage_of_head == [0, 0, 1, 1] and cfg.head_dim == 8 and cfg.aeb_heads == 4
    assert HeadsConfig.for_target(target.config, num_heads=5, n_stages=3).stage_of_head == [0, 0, 2, 2, 2]
    assert HeadsConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (dict(kind="eagle"), dict(num_heads=0), dict(stage_of_head=[0, 1]), dict(stage_of_head=[0, 0, 0, 2]),
                dict(aeb_heads=5), dict(dtype="int8"), dict(n_kv_heads=3), dict(fusion="sum")):
        with pytest.raises(ConfigError):
            HeadsConfig.for_target(target.config, **bad)
    with pytest.raises(ConfigError, match="unknown field"):
        HeadsConfig.from_dict({**cfg.to_dict(), "typo_field": 1})
    with pytest.raises(ConfigError, match="vocab_size"):
        HeadsConfig.from_dict({"dim": 32})


def test_smollm2_amphista_checkpoint_fits_32mb():
    smol = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                       head_dim=64, tie_word_embeddings=True)
    cfg = HeadsConfig.for_target(smol)
    assert cfg.sal_intermediate_size == cfg.aeb_intermediate_size == 1536
    with torch.device("meta"):
        heads = AmphistaHeads(cfg)
    state = heads.state_dict()
    nbytes = sum(v.numel() for v in state.values()) * 2          # bf16 on disk (+ a small JSON header)
    assert not any(v.shape[0] == 49152 for v in state.values())   # no embedding / LM head copies
    assert nbytes <= 32_000_000, nbytes
    print(f"SmolLM2-135M Amphista heads: {nbytes / 1e6:.2f} MB in bf16")


# ---- structure ----------------------------------------------------------------------------------------------
def test_bind_keeps_target_out_of_parameters(target):
    for kind in KINDS:
        heads = random_heads(kind, target)
        names = set(heads.state_dict())
        assert not any("output" in n or "tok_embeddings" in n for n in names)
        target_ids = {id(p) for p in target.parameters()}
        assert not any(id(p) in target_ids for p in heads.parameters())
        heads.to(torch.float64)
        assert target.output.weight.dtype == torch.float32


def test_aeb_is_bidirectional(target):
    heads = random_heads("amphista", target, num_heads=5)
    z = torch.randn(3, 5, 32)
    base = heads.mix(z)
    for j in range(5):
        z2 = z.clone()
        z2[:, j] += torch.randn(3, 32)
        out = heads.mix(z2)
        for i in range(5):
            assert (out[:, i] - base[:, i]).abs().max() > 1e-4, (i, j)   # i < j and i > j both see head j


def test_sal_is_causal(target):
    heads = random_heads("amphista", target)
    hidden, nxt = target_states(target, B=1, T=16)
    base = heads.forward_train(hidden, nxt)
    for t in (0, 5, 15):
        h2, n2 = hidden.clone(), nxt.clone()
        h2[:, t] += torch.randn(32)
        n2[:, t] = (n2[:, t] + 1) % 64
        out = heads.forward_train(h2, n2)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)   # the past never sees the future
        assert (out[:, t:] - base[:, t:]).abs().amax(dim=(0, 2, 3)).min() > 1e-5     # the future sees the past


# ---- parallel training == incremental decoding ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_forward_train_equals_incremental_steps(target, kind):
    heads = random_heads(kind, target, seed=3)
    B, T = 2, 24
    hidden, nxt = target_states(target, B, T, seed=1)
    full = heads.forward_train(hidden, nxt)                        # [B, T, K, V]
    counts = [[7, 1, 3, 2, 5, 1, 4, 1], [3, 4, 1, 1, 6, 2, 5, 2]]   # prefill, then accepted-path lengths
    heads.reset_cache(B, 48)
    done = [0, 0]
    g = torch.Generator().manual_seed(0)
    for s in range(len(counts[0])):
        c = [counts[b][s] for b in range(B)]
        M = max(c) + 1                                             # at least one padding entry in every row
        h = torch.randn(B, M, 32, generator=g)                     # garbage padding must not matter
        x = torch.randint(0, 64, (B, M), generator=g)
        for b in range(B):
            h[b, :c[b]], x[b, :c[b]] = hidden[b, done[b]:done[b] + c[b]], nxt[b, done[b]:done[b] + c[b]]
        kv_len = 8 * math.ceil((max(done) + M) / 8)                 # a bucketed upper bound, as the decoder does
        out = heads.step(h, x, torch.tensor(c), kv_len)
        done = [done[b] + c[b] for b in range(B)]
        ref = torch.stack([full[b, done[b] - 1] for b in range(B)])
        assert out.shape == (B, heads.num_heads, 64)
        assert rel_err(out, ref) < 1e-5, (s, rel_err(out, ref))
    if kind == "amphista":
        assert heads.sal_cache.length.tolist() == done


def test_step_in_bf16(target):
    t16 = copy.deepcopy(target).to(torch.bfloat16)
    heads = random_heads("amphista", t16)
    assert heads.norm.weight.dtype == torch.bfloat16
    hidden, nxt = target_states(t16, 1, 8)
    heads.reset_cache(1, 32)
    out = heads.step(hidden, nxt, torch.tensor([8]), 16)
    full = heads.forward_train(hidden, nxt)[:, -1]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and rel_err(out, full) < 2e-2


# ---- batched over heads == a naive per-head loop -------------------------------------------------------------
def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def naive_amphista(heads: AmphistaHeads, target, hidden, nxt):
    c, (B, T, d), K = heads.config, hidden.shape, heads.num_heads
    u = torch.cat([hidden, target.tok_embeddings.weight[nxt]], -1) @ heads.fuse.weight.T
    rope, mask = rope_table(heads.sal_config, T)[None], causal_mask(T, "cpu").expand(B, T, T)
    x, stages = u, []
    for i, layer in enumerate(heads.sal):                          # model.Block is tested against HF elsewhere
        x = layer(x, rope, None, None, mask)
        if (i + 1) % c.layers_per_stage == 0:
            stages.append(x)
    H, hd = c.aeb_heads, d // c.aeb_heads
    out = torch.empty(B, T, K, c.vocab_size)
    for b in range(B):
        for t in range(T):
            zs = []
            for k in range(K):
                a = stages[c.stage_of_head[k]][b, t]
                zs.append(a + F.silu(heads.res.weight[0, k] @ a + heads.res.bias[0, k]) + heads.pos_emb[k])
            Z = torch.stack(zs)
            for layer in heads.aeb:
                q, kk, v = (rms(Z, layer.attention_norm.weight, c.norm_eps) @ layer.wqkv.weight.T).split(d, -1)
                o = []
                for hh in range(H):
                    sl = slice(hh * hd, (hh + 1) * hd)
                    att = torch.softmax(q[:, sl] @ kk[:, sl].T / math.sqrt(hd), dim=-1)   # no mask
                    o.append(att @ v[:, sl])
                Z = Z + torch.cat(o, -1) @ layer.wo.weight.T
                gate, up = (rms(Z, layer.ffn_norm.weight, c.norm_eps) @ layer.feed_forward.w13.weight.T).chunk(2, -1)
                Z = Z + (F.silu(gate) * up) @ layer.feed_forward.w2.weight.T
            Z = rms(Z, heads.norm.weight, c.norm_eps)
            for k in range(K):
                W = heads.lm_heads[k] if c.per_head_lm_head else target.output.weight
                out[b, t, k] = W @ Z[k]
    return out


@pytest.mark.parametrize("overrides", [{}, dict(per_head_lm_head=True, n_stages=3, layers_per_stage=2,
                                                  stage_of_head=[2, 0, 1], aeb_layers=2, aeb_heads=2)])
def test_amphista_batched_equals_naive_loop(target, overrides):
    heads = random_heads("amphista", target, num_heads=3 if overrides else 4, seed=5, **overrides)
    if heads.config.per_head_lm_head:   # make the per-head LM heads really differ from the target's
        with torch.no_grad():
            heads.lm_heads.add_(torch.randn_like(heads.lm_heads) * 0.02)
    hidden, nxt = target_states(target, 2, 6)
    with torch.no_grad():
        assert rel_err(heads.forward_train(hidden, nxt), naive_amphista(heads, target, hidden, nxt)) < 1e-5


def test_medusa_batched_equals_naive_loop(target):
    heads = random_heads("medusa", target, num_heads=3, medusa_layers=2)
    hidden, _ = target_states(target, 2, 5)
    ref = torch.empty(2, 5, 3, 64)
    for k in range(3):
        x = hidden
        for j in range(2):
            x = x + F.silu(x @ heads.res.weight[j, k].T + heads.res.bias[j, k])
        ref[:, :, k] = x @ target.output.weight.T
    assert rel_err(heads.forward_train(hidden, None), ref) < 1e-6
    logits = heads.forward_train(hidden, None)
    assert (logits[:, :, 0] - logits[:, :, 1]).abs().max() > 1e-3   # random heads draft differently


# ---- checkpoints ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip(target, kind, tmp_path):
    heads = random_heads(kind, target, per_head_lm_head=(kind == "medusa"))
    hidden, nxt = target_states(target, 2, 10)
    ref = heads.forward_train(hidden, nxt)
    save_heads(heads, tmp_path / "fp32", dtype="float32")
    loaded = load_heads(tmp_path / "fp32", target)
    assert type(loaded) is type(heads) and loaded.config.target_fingerprint == lm_head_fingerprint(target)
    assert torch.equal(loaded.forward_train(hidden, nxt), ref)
    # Default: bf16 on disk; of the target, only a few LM-head rows (to tell a quantized copy of it from another
    # model); loading into fp32 equals the heads rounded to bf16.
    save_heads(heads, tmp_path / "bf16")
    state = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    sketch = state.pop(SKETCH_KEY)
    assert sketch.shape == (min(SKETCH_ROWS, target.config.vocab_size), target.config.dim)
    assert all(v.dtype == torch.bfloat16 for v in state.values()) and set(state) == set(heads.state_dict())
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["kind"] == kind and cfg["dtype"] == "bfloat16" and cfg["target_fingerprint"].startswith("V64-d32-")
    rounded = copy.deepcopy(heads).bind(target)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    loaded = load_heads(tmp_path / "bf16" / "config.json", target, dtype=torch.float32)
    assert torch.equal(loaded.forward_train(hidden, nxt), rounded.forward_train(hidden, nxt))
    if kind == "amphista":   # and decoding from a loaded checkpoint works
        loaded.reset_cache(2, 32)
        assert rel_err(loaded.step(hidden, nxt, torch.tensor([10, 10]), 16), ref[:, -1]) < 2e-2


def test_load_errors(target, tmp_path):
    heads = random_heads("amphista", target)
    save_heads(heads, tmp_path / "h")
    other = tiny_target(seed=1)
    with pytest.raises(HeadsMismatchError) as e:
        load_heads(tmp_path / "h", other)
    assert lm_head_fingerprint(target) in str(e.value) and lm_head_fingerprint(other) in str(e.value)
    with pytest.raises(HeadsMismatchError, match="d=48"):
        load_heads(tmp_path / "h", tiny_target(dim=48))
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_heads(tmp_path / "nowhere", target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_heads(tmp_path / "empty", target)
    (tmp_path / "h" / "notes.jsonl").write_text("{}\n")      # a file beside real heads: named, not its folder
    with pytest.raises(ModelLoadError, match=r"heads path .*notes.jsonl is a file; expected a heads directory"):
        load_heads(tmp_path / "h" / "notes.jsonl", target)
    assert load_heads(tmp_path / "h" / "config.json", target) is not None   # the checkpoint's own files still do
    with pytest.raises(ConfigError, match="3 were requested"):
        load_heads(tmp_path / "h", target, num_heads=3)
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    (tmp_path / "h" / "config.json").write_text(json.dumps({**cfg, "num_heads": 3, "stage_of_head": None}))
    with pytest.raises(ConfigError, match="num_heads=3"):   # K in the config disagrees with the tensors
        load_heads(tmp_path / "h", target)


def test_fingerprint_stable_across_dtypes(target):
    for born in (torch.bfloat16, torch.float16):      # checkpoints are stored in bf16 or fp16
        model = copy.deepcopy(target)
        with torch.no_grad():
            model.output.weight.copy_(model.output.weight.to(born).float())
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
        fps = {lm_head_fingerprint(copy.deepcopy(model).to(dt)) for dt in dtypes}
        assert len(fps) == 1, fps
    fp = lm_head_fingerprint(target)
    assert fp == lm_head_fingerprint(copy.deepcopy(target).to(torch.bfloat16))   # fp32 weights, bf16 copy
    assert fp.startswith("V64-d32-")
    assert fp != lm_head_fingerprint(tiny_target(seed=1))


def test_fingerprint_of_fp32_born_checkpoint_loaded_as_fp16(target, tmp_path):
    # A GGUF file's dequantized weights are fp32 values: cast to fp16 and then rounded to bf16 for the hash, they
    # land elsewhere than rounded to bf16 directly. The loaders record the checkpoint's own fingerprint instead.
    from amphista_engine.loading import build_model
    weights = {k: v.clone() for k, v in target.state_dict().items()}
    fp32 = build_model(target.config, weights, torch.float32, "cpu")
    fp16 = build_model(target.config, weights, torch.float16, "cpu")
    assert lm_head_fingerprint(fp32.output.weight) != lm_head_fingerprint(fp16.output.weight)   # the double rounding
    assert lm_head_fingerprint(fp16) == lm_head_fingerprint(fp32) == lm_head_fingerprint(target)
    save_heads(random_heads("amphista", fp32), tmp_path / "h")
    assert load_heads(tmp_path / "h", fp16).output_weight().dtype == torch.float16


@pytest.mark.parametrize("layers,shared", [(1, False), (2, False), (2, True)])
def test_public_medusa_checkpoint(target, tmp_path, layers, shared):
    class ResBlock(torch.nn.Module):   # FasterDecoding/Medusa's ResBlock
        def __init__(self, d):
            super().__init__()
            self.linear = torch.nn.Linear(d, d)

        def forward(self, x):
            return x + F.silu(self.linear(x))

    def head():   # Medusa repeats one ResBlock object ([ResBlock(d)] * layers); test both forms
        blocks = [ResBlock(32)] * layers if shared else [ResBlock(32) for _ in range(layers)]
        return torch.nn.Sequential(*blocks, torch.nn.Linear(32, 64, bias=False))

    torch.manual_seed(7)
    medusa = torch.nn.ModuleList(head() for _ in range(5))
    with torch.no_grad():
        for p in medusa.parameters():
            p.normal_(0, 0.1)
    torch.save(medusa.half().state_dict(), tmp_path / "medusa_lm_head.pt")
    medusa.float()
    heads = load_medusa_checkpoint(tmp_path, target, num_heads=4)
    assert isinstance(heads, MedusaHeads) and heads.num_heads == 4 and heads.config.per_head_lm_head
    hidden, nxt = target_states(target, 2, 6)
    with torch.no_grad():
        ref = torch.stack([medusa[k](hidden) for k in range(4)], dim=2)
    assert rel_err(heads.forward_train(hidden, nxt), ref) < 1e-6
    out = heads.step(hidden, nxt, torch.tensor([6, 2]), 8)
    assert rel_err(out, torch.stack([ref[0, 5], ref[1, 1]])) < 1e-6
    with pytest.raises(HeadsMismatchError):
        load_medusa_checkpoint(tmp_path / "medusa_lm_head.pt", tiny_target(dim=48))
    with pytest.raises(ModelLoadError):
        load_medusa_checkpoint(tmp_path / "missing.pt", target)


@pytest.mark.parametrize("kind", KINDS)
def test_draft_vocabulary_heads(kind, tmp_path):
    """Heads with a draft vocabulary score exactly the full-vocabulary heads' logits at those token ids, and
    the ids survive a bf16 checkpoint (ids above 256 would not survive a cast to bf16)."""
    t = tiny_target(vocab=1000)
    ids = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:300]
    full = random_heads(kind, t, seed=4)
    sub = random_heads(kind, t, seed=4, draft_vocab_size=300).set_draft_vocab(ids)
    assert sub.token_ids(torch.tensor([0, 299])).tolist() == [int(ids[0]), int(ids[299])]
    hidden, nxt = target_states(t, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(sub.forward_train(hidden, nxt), full.forward_train(hidden, nxt)[..., ids],
                                   rtol=1e-6, atol=1e-6)
    save_heads(sub, tmp_path / "h")
    state = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert state["draft_vocab"].dtype == torch.int64 and torch.equal(state["draft_vocab"], ids)
    loaded = load_heads(tmp_path / "h", t, dtype=torch.float32)
    assert loaded.config.draft_vocab_size == 300 and torch.equal(loaded.draft_vocab, ids)
    with torch.no_grad():
        assert rel_err(loaded.forward_train(hidden, nxt), sub.forward_train(hidden, nxt)) < 2e-2
    # clear errors: bad sets, a size beyond V, a corrupted vocabulary tensor on disk
    with pytest.raises(ConfigError, match="300 distinct"):
        sub.set_draft_vocab(torch.zeros(300, dtype=torch.long))
    with pytest.raises(ConfigError, match="300 distinct"):
        sub.set_draft_vocab(ids[:10])
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        HeadsConfig.for_target(t.config, kind=kind, draft_vocab_size=1001)
    with pytest.raises(ConfigError, match="full vocabulary"):
        full.set_draft_vocab(ids)
    from safetensors.torch import save_file
    save_file({**state, "draft_vocab": torch.full((300,), 5000)}, str(tmp_path / "h" / "model.safetensors"))
    with pytest.raises(ConfigError, match="bad draft_vocab"):
        load_heads(tmp_path / "h", t)
