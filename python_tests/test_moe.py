"""Mixture-of-experts targets: Qwen3-MoE (Qwen3MoeForCausalLM, llama.cpp `qwen3moe` GGUF files) and Mixtral
(MixtralForCausalLM, `llama` GGUF files with llama.expert_count). Logits (prefill on both MoE paths, cached decode
and a tree step) and greedy answers equal transformers' on the same random weights; GGUF files load as their
checkpoint; speculative answers equal plain ones (fp32, bf16, 4-bit linears and experts); other MoE
families are refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from amphista_engine.engine import Engine
from amphista_engine.errors import AmphistaError, ConfigError
from amphista_engine.loading import load_model

from conftest import (_add_gguf_tensor, _close_gguf, _permute_rope_rows, add_gguf_bpe_vocab, add_gguf_keys,
                      prefill_then_decode, write_tokenizer)
from model_helpers import hf_forward_logits, hf_greedy, plain_and_speculative, rel_err

transformers = pytest.importorskip("transformers")

V = 300
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=False)
# Qwen3-MoE: 8 experts, top-2 without renormalising (transformers' default), layer 1 a dense MLP (mlp_only_layers)
QWEN = dict(COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=False, mlp_only_layers=[1])
MIXTRAL = dict(COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
FAMILIES = {"qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", QWEN),
            "mixtral": ("MixtralForCausalLM", "MixtralConfig", MIXTRAL)}
IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 280, 64] * 12


def _randomize(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.1)
            if name.endswith("norm.weight"):
                p.add_(1.0)
            if name.endswith("gate.weight"):        # routers: spread probabilities, so the top-k choice matters
                p.mul_(10.0)
    return model


def write_hf(path, family, **over):
    arch, conf, base = FAMILIES[family]
    model = _randomize(getattr(transformers, arch)(getattr(transformers, conf)(**{**base, **over})))
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, V)
    return path


def hf_model(path):
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(path, ids):
    return hf_forward_logits(hf_model(path), ids)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: write_hf(root / f, f) for f in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(dirs, family, tmp_path):
    """Uncached forwards on both MoE paths: 40 tokens (each token's experts gathered) and 100 (every expert over
    every token, model.MOE_GATHER_ROWS); and the routing options matter: flipped, the logits are far off."""
    d = dirs[family]
    cfg = load_model(d, max_seq_len=256).config
    assert cfg.n_experts == (8 if family == "qwen3_moe" else 4) and cfg.experts_per_token == 2
    assert cfg.moe_layers == ((0, 2) if family == "qwen3_moe" else (0, 1, 2))
    m = load_model(d, max_seq_len=256).model
    for n in (40, 100):
        ids = IDS[:n]
        with torch.no_grad():
            ours = m(torch.tensor([ids]), torch.arange(n)[None])[0]
        right = rel_err(ours, hf_logits(d, ids))
        assert right < 1e-5, (n, right)
    # Qwen3-MoE without renormalised top-k weights and with a dense layer: each, changed, moves the logits
    edits = (({"norm_topk_prob": True}, {"mlp_only_layers": []}) if family == "qwen3_moe"
             else ({"num_experts_per_tok": 1},))
    for edit in edits:
        e = tmp_path / "edited"
        e.mkdir(exist_ok=True)
        for f in d.iterdir():
            (e / f.name).write_bytes(f.read_bytes())
        c = json.loads((e / "config.json").read_text())
        c.update(edit)
        (e / "config.json").write_text(json.dumps(c))
        if "mlp_only_layers" in edit:       # layer 1 is dense in the checkpoint: the config has no place for it
            with pytest.raises(ConfigError, match="lacks"):
                load_model(e, max_seq_len=64)
            continue
        em = load_model(e, max_seq_len=64).model
        with torch.no_grad():
            other = em(torch.tensor([IDS[:40]]), torch.arange(40)[None])[0]
        assert rel_err(other, hf_logits(d, IDS[:40])) > 1e-3, edit


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers5_fused_expert_layout_loads(dirs, family, tmp_path):
    """A checkpoint in transformers 5's in-memory layout (the model's own state_dict: experts.gate_up_proj
    [E, 2I, d], experts.down_proj [E, d, I], Mixtral's block as `mlp`) loads as the Hub's per-expert one."""
    from safetensors.torch import save_file
    hf = hf_model(dirs[family])
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    d = tmp_path / "fused"
    d.mkdir()
    for f in dirs[family].iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.tensor([IDS[:30]])
    with torch.no_grad():
        a = load_model(d, max_seq_len=64).model(ids, torch.arange(30)[None])
        b = load_model(dirs[family], max_seq_len=64).model(ids, torch.arange(30)[None])
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_prefill_decode_and_tree_match_transformers(dirs, family):
    """A 70-token prefill into the cache (the dense path), then token by token (gathered experts), then a tree
    step: each position's logits are transformers' full forward over the same tokens."""
    from amphista_engine.model import AttentionSpec
    d = dirs[family]
    m = load_model(d, max_seq_len=128).model
    ids, T = IDS[:80], 70
    ref = hf_logits(d, ids)
    got, cache = prefill_then_decode(m, ids, T)
    assert rel_err(got, ref) < 1e-5
    with torch.no_grad():
        # a tree after the 80 tokens: node (token, parent)
        nodes = [(42, -1), (7, 0), (99, 0), (5, 1)]
        anc = torch.zeros(4, 4, dtype=torch.bool)
        for i, (_, parent) in enumerate(nodes):
            anc[i, i] = True
            if parent >= 0:
                anc[i] |= anc[parent]
        P = len(ids)
        spec = AttentionSpec(torch.tensor([P]), anc[None], P + 4, decode=True)
        tree = m(torch.tensor([[t for t, _ in nodes]]), (P + anc.sum(-1) - 1)[None], cache, spec)[0]
    for i in range(4):
        path = [nodes[j][0] for j in range(4) if anc[i, j]]
        assert rel_err(tree[i], hf_logits(d, ids + path)[-1]) < 1e-5, i


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_greedy_equals_transformers_generate(dirs, family):
    eng = Engine.from_pretrained(str(dirs[family]), device="cpu", dtype="fp32", max_seq_len=256)
    prompt = IDS[:20]
    want = hf_greedy(hf_model(dirs[family]), prompt, 30)
    got = eng.generate(prompt, chat=False, max_new_tokens=30, min_tokens=30, speculative="none").token_ids
    assert got == want


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype,quant", [("fp32", "none"), ("bf16", "none"), ("fp32", "q4")])
def test_speculative_equals_plain(dirs, family, dtype, quant):
    """Random Amphista heads: greedy speculative answers are the plain ones. q4: the attention linears, experts and
    LM head run 4-bit, the routers stay float (cpu_quant.quantize_linears), the C++ layer stack declines."""
    from amphista_engine.heads import random_heads
    from amphista_engine.kernels import cpu_ops
    from amphista_engine.kernels.cpu_quant import on_codes
    eng = Engine.from_pretrained(str(dirs[family]), device="cpu", dtype=dtype, max_seq_len=256, quant=quant)
    assert eng.quant == quant
    if quant == "q4":
        layer = eng.model.layers[0]
        assert on_codes(layer.attention.wqkv) and not on_codes(layer.feed_forward.gate)
        assert on_codes(layer.feed_forward.experts_q4[0][0]) and layer.feed_forward.w13.numel() == 0
        assert not cpu_ops.stack_runs(eng.model.layers, eng.model.norm, eng.config, torch.float32, eng.model)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    for prompt in (IDS[:5], IDS[:30]):
        plain, spec = plain_and_speculative(eng, prompt, 30)
        assert len(plain) == 30 and spec == plain


@pytest.mark.parametrize("family", list(FAMILIES))
def test_q4_equals_its_float_path_within_int8_rounding(dirs, family):
    """4-bit attention, dense MLP, experts and LM head, float routers. With the float model's linears put on the
    4-bit grid first (so that quantizing loses nothing), the 4-bit model differs only by its int8-rounded
    activations (~2e-2 on these random weights; unrounded Gaussian weights move it ~0.3, dense models alike)."""
    import copy
    from amphista_engine.kernels import cpu_quant
    from amphista_engine.kernels.linear_setup import LinearSetup
    f = load_model(dirs[family], max_seq_len=128).model
    with torch.no_grad():
        for m in f.layers.modules():
            if isinstance(m, torch.nn.Linear):
                codes, scale, zero, _ = cpu_quant._requantize(m.weight)
                N, K = m.weight.shape
                grid = (codes.float() - 8).reshape(N, K // 32, 32) * scale[..., None] + zero[..., None]
                m.weight.copy_(grid.reshape(N, K))
        for b in f.layers:          # the experts run 4-bit too (cpu_quant.quantize_experts): on the grid as well
            if b.moe:
                for w in (b.feed_forward.w13, b.feed_forward.w2):
                    for e in range(w.shape[0]):
                        codes, scale, zero, _ = cpu_quant._requantize(w[e])
                        N, K = w[e].shape
                        w[e].copy_(((codes.float() - 8).reshape(N, K // 32, 32) * scale[..., None]
                                    + zero[..., None]).reshape(N, K))
        codes, scale = cpu_quant._int8_rows(f.output.weight)
        f.output.weight.copy_(codes.float() * scale[:, None])
    q = LinearSetup.for_device("cpu", torch.float32, "q4").apply(copy.deepcopy(f))
    assert q.rounds_linear_inputs
    for a, b in zip(f.layers, q.layers):
        assert cpu_quant.on_codes(b.attention.wqkv)
        if a.moe:       # 4-bit experts, float stacks freed; the router stays float
            assert b.feed_forward.experts_q4 is not None and b.feed_forward.w13.numel() == 0
            assert torch.equal(a.feed_forward.gate.weight, b.feed_forward.gate.weight)
    ids = torch.tensor([IDS[:40]])
    with torch.no_grad():
        err = rel_err(q(ids, torch.arange(40)[None]), f(ids, torch.arange(40)[None]))
    assert 1e-5 < err < 0.05, err


# ---- GGUF ----------------------------------------------------------------------------------------------

def write_moe_gguf(hf_dir, out, family, qtype="F32", qtypes=None):
    """The tiny checkpoint as llama.cpp's converter writes it: `qwen3moe` (Q/K rows as stored, q/k norms, every
    layer sparse: expert_feed_forward_length) or Mixtral as `llama` (Q/K rows permuted for its RoPE, expert_count);
    routers as blk.N.ffn_gate_inp, experts as 3-D blk.N.ffn_{gate,up,down}_exps (one slice per expert). qtypes:
    {GGUF name: type} where a tensor differs from qtype."""
    import gguf
    from safetensors.numpy import load_file
    w = load_file(str(hf_dir / "model.safetensors"))
    c = json.loads((hf_dir / "config.json").read_text())
    arch = "qwen3moe" if family == "qwen3_moe" else "llama"
    n = c["num_hidden_layers"]
    wr = gguf.GGUFWriter(str(out), arch)
    add_gguf_keys(wr, block_count=n, context_length=512, embedding_length=64,
                  feed_forward_length=c["intermediate_size"], head_count=4, head_count_kv=2, key_length=16,
                  value_length=16, rope_dimension_count=16, layer_norm_rms_eps=1e-6,
                  rope_freq_base=c["rope_parameters"]["rope_theta"])
    wr.add_expert_count(c["num_local_experts"])
    wr.add_expert_used_count(c["num_experts_per_tok"])
    if arch == "qwen3moe":
        wr.add_expert_feed_forward_length(c["moe_intermediate_size"])
    add_gguf_bpe_vocab(wr, hf_dir, V, "default")
    t = {"token_embd.weight": w["model.embed_tokens.weight"], "output_norm.weight": w["model.norm.weight"],
         "output.weight": w["lm_head.weight"]}
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for i in range(n):
        p = f"model.layers.{i}."
        for h, g in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                     ("self_attn.o_proj", "attn_output"), ("input_layernorm", "attn_norm"),
                     ("post_attention_layernorm", "ffn_norm"), ("self_attn.q_norm", "attn_q_norm"),
                     ("self_attn.k_norm", "attn_k_norm")):
            if p + h + ".weight" in w:
                x = w[p + h + ".weight"]
                if arch == "llama" and g in ("attn_q", "attn_k"):
                    x = _permute_rope_rows(x, 4 if g == "attn_q" else 2)
                t[f"blk.{i}.{g}.weight"] = x
        t[f"blk.{i}.ffn_gate_inp.weight"] = w[f"{p}{moe}.gate.weight"]
        for name, g in zip(names, ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
            t[f"blk.{i}.{g}.weight"] = np.stack([w[f"{p}{moe}.experts.{j}.{name}.weight"]
                                                 for j in range(c["num_local_experts"])])
    for g, x in t.items():
        x, its = x.astype(np.float32), (qtypes or {}).get(g, qtype)
        if x.ndim == 3 and its != "F32":          # llama.cpp quantizes the expert stacks too
            qt = gguf.GGMLQuantizationType[its]
            wr.add_tensor(g, gguf.quants.quantize(x, qt), raw_dtype=qt)
        else:       # llama.cpp's quantize keeps the routers (ffn_gate_inp) in F32
            _add_gguf_tensor(wr, g, x, "F32" if "gate_inp" in g else its)
    _close_gguf(wr)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_matches_transformers(tmp_path, family):
    # llama.cpp's graphs renormalise the top-k weights and make every layer sparse: the checkpoint too
    over = dict(norm_topk_prob=True, mlp_only_layers=[]) if family == "qwen3_moe" else {}
    d = write_hf(tmp_path / "hf", family, **over)
    g = write_moe_gguf(d, tmp_path / "m.gguf", family)
    loaded = load_model(g, max_seq_len=128)
    assert loaded.config.moe_layers == (0, 1, 2) and loaded.config.norm_topk_prob
    assert loaded.config.moe_weights_fp32 == (family == "mixtral")
    ids = IDS[:40]
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]), torch.arange(40)[None])[0]
    assert rel_err(ours, hf_logits(d, ids)) < 1e-5
    # Q8_0 expert stacks dequantize slice by slice: the same model within 8-bit rounding (a few tokens routed
    # otherwise: ~3e-2; expert slices or rows mixed up would be ~1)
    q = load_model(write_moe_gguf(d, tmp_path / "q8.gguf", family, "Q8_0"), max_seq_len=128).model
    with torch.no_grad():
        assert 1e-5 < rel_err(q(torch.tensor([ids]), torch.arange(40)[None])[0], ours) < 0.1


def test_gguf_refusals(tmp_path, dirs):
    import gguf
    g = write_moe_gguf(dirs["mixtral"], tmp_path / "m.gguf", "mixtral")
    # an expert count in an architecture without MoE layers here
    out = tmp_path / "qwen2.gguf"
    wr = gguf.GGUFWriter(str(out), "qwen2")
    for k, v in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 32), ("head_count", 4),
                 ("expert_count", 4), ("expert_used_count", 2)):
        wr.add_uint32(f"qwen2.{k}", v)
    _add_gguf_tensor(wr, "token_embd.weight", np.zeros((V, 64), np.float32), "F32")
    _close_gguf(wr)
    with pytest.raises(ConfigError, match="mixture-of-experts layers are supported in llama and qwen3moe"):
        load_model(out)
    assert load_model(g, max_seq_len=64).config.n_experts == 4
    # a Mixtral file without routers (older conversions: one tensor per expert) and one without expert_used_count
    from amphista_engine.gguf_file import read_gguf
    for drop, match in (("ffn_gate_inp", "no layer has one"), ("expert_used_count", "expert_used_count")):
        reader = read_gguf(g)
        w = tmp_path / f"no_{drop}.gguf"
        wr = gguf.GGUFWriter(str(w), "llama")
        for k, v in reader.meta.items():
            if k.startswith("llama.") and drop not in k and isinstance(v, (int, float)):
                (wr.add_uint32 if isinstance(v, int) else wr.add_float32)(k, v)
        for t in reader.tensors:
            if drop not in t.name:
                _add_gguf_tensor(wr, t.name, np.asarray(t.dequantize(), np.float32), "F32")
        _close_gguf(wr)
        with pytest.raises(ConfigError, match=match):
            load_model(w)


# ---- refusals and shapes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,match", [
    ({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": 60,
      "shared_expert_intermediate_size": 5632}, "shared expert"),
    ({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "n_routed_experts": 256},
     "multi-head latent attention"),
    ({"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "num_experts": 64}, "OLMoE"),
    ({"architectures": ["SomeNewMoeForCausalLM"], "model_type": "some_new_moe"}, "mixture-of-experts"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "shared_expert_intermediate_size": 64},
     "shared expert"),
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 2,
      "num_experts_per_tok": 3}, "experts per token"),
])
def test_unsupported_moe_configs_are_refused_by_name(cfg, match):
    from amphista_engine.config import ModelConfig
    full = dict(vocab_size=V, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                **cfg)
    with pytest.raises(AmphistaError, match=match) as e:
        ModelConfig.from_hf(full)
    assert isinstance(e.value, ConfigError)
    if "qwen3_moe" not in str(cfg) and "mixtral" not in str(cfg):
        assert "Qwen3-MoE" in str(e.value) and "Mixtral" in str(e.value)


def test_bench_shapes_without_allocating():
    from amphista_engine.evaluation.shapes import param_count, shape_config
    q = shape_config("qwen3-30b-a3b")
    assert q.n_experts == 128 and q.experts_per_token == 8 and q.moe_layers == tuple(range(48))
    assert 30.0e9 < param_count(q) < 31.0e9              # Qwen3-30B-A3B: 30.5B
    m = shape_config("mixtral-8x7b")
    assert m.n_experts == 8 and m.experts_per_token == 2 and m.moe_weights_fp32
    assert 46.0e9 < param_count(m) < 47.5e9              # Mixtral-8x7B: 46.7B
    # the count is the module's: a scaled-down Qwen3-30B-A3B (one dense layer) built from random weights
    import dataclasses
    from amphista_engine.evaluation.shapes import random_model
    small = dataclasses.replace(q, n_layers=3, moe_layers=(0, 2), dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                                intermediate_size=96, n_experts=8, moe_intermediate_size=32, vocab_size=V)
    model = random_model(small, max_seq_len=64)
    assert sum(p.numel() for p in model.parameters()) == param_count(small)
    assert [layer.moe for layer in model.layers] == [True, False, True]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([IDS[:8]]), torch.arange(8)[None])).all()
