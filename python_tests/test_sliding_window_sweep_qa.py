"""A seeded differential sweep of the sliding windows (Mistral, Phi-3, Qwen2/Qwen3 with use_sliding_window, Qwen3-MoE)
against transformers, kept as tests where it found a difference or where a path had no test of its own.

Found: a Qwen2/Qwen3/Qwen3-MoE config.json with use_sliding_window true and no sliding_window key slid no layer here,
while transformers' config classes default that window to 4096 (other logits from position 4096 on)."""
from __future__ import annotations

import random

import pytest
import torch

from amphista_engine.config import ModelConfig
from amphista_engine.engine import Engine

from model_helpers import rel_err

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-5, head_dim=16, tie_word_embeddings=False)
CLASSES = {"mistral": "Mistral", "phi3": "Phi3", "qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe"}
MOE = {"qwen3_moe": dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=32)}


def hf_sliding(family, cfg):
    """(window, sliding layers) of transformers' model of this config.json: Mistral, Phi-3 and Qwen3-MoE apply
    config.sliding_window (None unless use_sliding_window, for Qwen3-MoE) to every layer, Qwen2/Qwen3 to the
    layers layer_types names."""
    c = getattr(transformers, CLASSES[family] + "Config")(**cfg)
    if c.sliding_window is None:
        return None, ()
    if family in ("mistral", "phi3", "qwen3_moe"):
        return c.sliding_window, tuple(range(c.num_hidden_layers))
    layers = tuple(i for i, t in enumerate(c.layer_types) if t == "sliding_attention")
    return (c.sliding_window, layers) if layers else (None, ())


def engine_sliding(family, cfg):
    c = ModelConfig.from_hf({**cfg, "model_type": family, "architectures": [CLASSES[family] + "ForCausalLM"]})
    return c.real_window, c.sliding_layers if c.real_window else ()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe"])
def test_use_sliding_window_without_a_window_key_takes_the_default(family):
    cfg = {**BASE, **MOE.get(family, {}), "num_hidden_layers": 4, "use_sliding_window": True, "max_window_layers": 2}
    want = hf_sliding(family, dict(cfg))
    assert want[0] == 4096
    assert engine_sliding(family, cfg) == want


@pytest.mark.parametrize("family", list(CLASSES))
def test_config_keys_sweep_matches_transformers(family):
    """Keys present or left out (sliding_window null, 6 or 4096; use_sliding_window; max_window_layers below, at or
    past the layer count; layer_types): the engine's sliding layers and window are transformers'."""
    rng = random.Random(family)
    for _ in range(60):
        n = rng.choice([2, 3, 5])
        cfg = {**BASE, **MOE.get(family, {}), "num_hidden_layers": n}
        if rng.random() < 0.7:
            cfg["sliding_window"] = rng.choice([None, 6, 4096])
        if family not in ("mistral", "phi3"):
            if rng.random() < 0.7:
                cfg["use_sliding_window"] = rng.choice([True, False])
            if rng.random() < 0.5:
                cfg["max_window_layers"] = rng.randrange(0, n + 2)
            if family != "qwen3_moe" and rng.random() < 0.3:
                cfg["layer_types"] = [rng.choice(["sliding_attention", "full_attention"]) for _ in range(n)]
        assert engine_sliding(family, dict(cfg)) == hf_sliding(family, dict(cfg)), cfg


# Paths the sweep found right and no other test holds against transformers on a sliding model: multi-turn
# reuse_prefix past the window (the kept prefix's K/V from earlier turns), continuous batching joiners, prompt scoring
# in prefill chunks, `amphista perplexity`, and the hidden states `train` distils the heads from.
W = 6
IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 280, 64, 31, 200, 9, 77] * 10


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A Qwen2 with layers 1 and 2 sliding over 6 positions, layer 0 full; transformers' model of it."""
    from test_sliding_window_families_qa import write_family
    path = write_family(tmp_path_factory.mktemp("sweep") / "m", "qwen2", sliding_window=W, max_window_layers=1)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def _hf_greedy(hf, prompt, n):
    # an explicit mask: generate() would take every pad id (0) in the prompt for padding
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_reuse_prefix_turns_and_joiners_past_the_window(qwen2, monkeypatch):
    import amphista_engine.model as model_mod
    from amphista_engine.heads import random_heads
    monkeypatch.setattr(model_mod, "WINDOW_PREFILL_CHUNK", 16)       # chunks of 65: the 70-token turn takes two
    path, hf = qwen2
    eng = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=256, quant="none",
                                 max_batch_size=2, backend="torch")
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    for spec in ("none", "amphista"):
        conv = IDS[:W + 1]
        for extra in (IDS[20:23], IDS[40:110]):
            got = eng.generate(conv, chat=False, max_new_tokens=W + 2, min_tokens=W + 2, speculative=spec,
                               reuse_prefix=True).token_ids
            assert got == _hf_greedy(hf, conv, W + 2), (spec, len(conv))
            conv = conv + got + extra
    prompts = [IDS[:W - 2], IDS[3:3 + W], IDS[5:80]]
    queue = [(p, 2 * W) for p in prompts[1:]]

    def admit(free):
        out = queue[:min(free, 1)]
        del queue[:len(out)]
        return out
    list(eng.stream_batch([prompts[0]], [2 * W], chat=False, min_tokens=2 * W, admit=admit, speculative="amphista"))
    assert [r.token_ids for r in eng.last_results] == [_hf_greedy(hf, p, 2 * W) for p in prompts]


def test_scores_and_perplexity_past_the_window(qwen2, monkeypatch):
    """Engine.prompt_logprobs in prefill chunks (generation._score_cache: a cache past the window prefills in
    chunks) and `amphista perplexity`'s chunks: transformers' log-probabilities."""
    import math

    import amphista_engine.model as model_mod
    from amphista_engine.evaluation.perplexity import perplexity
    monkeypatch.setattr(model_mod, "WINDOW_PREFILL_CHUNK", 16)
    path, hf = qwen2
    eng = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=256, quant="none")
    ids = IDS[:150]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    lp = eng.prompt_logprobs(ids)[0]
    assert max(abs(lp[i] - ref[i - 1, ids[i]].item()) for i in range(1, len(ids))) < 1e-4
    text = eng.tokenizer.decode(IDS[1:120])
    res = perplexity(eng, text, ctx=3 * W + 2)
    toks, ctx, nll = eng.tokenizer.encode(text), 3 * W + 2, []
    for c in range(res.chunks):
        chunk = list(toks[c * ctx:(c + 1) * ctx])
        if getattr(eng.tokenizer, "add_bos", False):
            chunk[0] = eng.tokenizer.bos_id
        with torch.no_grad():
            lps = torch.log_softmax(hf(torch.tensor([chunk])).logits[0].double(), -1)
        nll += [-lps[j - 1, chunk[j]].item() for j in range(ctx // 2 + 1, ctx)]
    assert res.tokens == len(nll) and res.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_training_hidden_states_are_the_windowed_models(qwen2):
    """train's HiddenSource (the target's final-norm states the heads distil from) over a padded batch of sequences
    longer and shorter than the window: transformers' last hidden states."""
    from amphista_engine.loading import load_model
    from amphista_engine.training.data import Sequence
    from amphista_engine.training.hidden_cache import HiddenSource, pad_batch
    path, hf = qwen2
    target = load_model(path, max_seq_len=128).model.eval()
    seqs = [Sequence("a", IDS[:5 * W], 3), Sequence("b", IDS[7:7 + W - 1], 2)]
    x, _, _ = pad_batch(seqs, "cpu")
    h = HiddenSource(target, None, "x").get(seqs, x)
    for b, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf(torch.tensor([s.ids]), output_hidden_states=True).hidden_states[-1][0]
        assert rel_err(h[b, :len(s.ids)], ref) < 1e-5, b


def test_a_gemma3_gguf_pattern_of_zero_slides_every_layer(tmp_path):
    """llama.cpp's set_swa_pattern reads a sliding_window_pattern of 0 as every layer sliding; it was refused as
    "not a period"."""
    from test_gemma3 import IDS, hf_logits, ours_logits, write_gemma3, write_gemma3_gguf
    from amphista_engine.loading import load_model
    n = 3
    d = write_gemma3(tmp_path / "hf", num_hidden_layers=n, sliding_window=8, sliding_window_pattern=None,
                     layer_types=["sliding_attention"] * n,
                     rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})
    f = write_gemma3_gguf(d, tmp_path / "g.gguf", dict(num_hidden_layers=n, rope_theta=100000.0,
                                                       rope_local_theta=1000.0, sliding_window=8, pattern=0))
    cfg = load_model(f, max_seq_len=64).config
    assert cfg.sliding_layers == tuple(range(n)) and cfg.real_window == 8
    ids = IDS[:40]
    assert rel_err(ours_logits(f, ids), hf_logits(d, ids)) < 1e-5
