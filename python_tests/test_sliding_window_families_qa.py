"""Sliding windows past the cache's start in the families that slide every layer (Mistral, Mixtral, Phi-3) or some
(Qwen2/Qwen3 with use_sliding_window from max_window_layers on, SmolLM3's NoPE layers): the engine refused a
max_seq_len past the window ("which this engine does not implement") and defaulted its cache to the window. Now a key
at position j is visible to a query at i iff i - window < j <= i, as transformers' masking_utils
(sliding_window_overlay: kv_idx > q_idx - sliding_window), on every path: uncached forwards, cached prefill and
decode steps, tree verification, prefill chunks, the CPU's ordered decode steps and its C++ 4-bit layer stack."""
from __future__ import annotations

import json

import pytest
import torch

from amphista_engine.engine import Engine
from amphista_engine.kernels import cpu_available, use_backend
from amphista_engine.loading import load_model

from conftest import prefill_then_decode, write_tokenizer
from model_helpers import hf_greedy, loaded_logits, plain_and_speculative, pretrained_logits, rel_err, tree_step_logits

transformers = pytest.importorskip("transformers")

V = 300
W = 8
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "mistral": ("Mistral", dict(sliding_window=W)),
    "phi3": ("Phi3", dict(sliding_window=W)),
    # layer 0 full, layers 1 and 2 sliding
    "qwen2": ("Qwen2", dict(sliding_window=W, use_sliding_window=True, max_window_layers=1)),
    "mixtral": ("Mixtral", dict(sliding_window=W, num_local_experts=3, num_experts_per_tok=2)),
    "qwen3": ("Qwen3", dict(sliding_window=W, use_sliding_window=True, max_window_layers=2, head_dim=16)),
    # every 2nd layer NoPE, and those slide
    "smollm3": ("SmolLM3", dict(sliding_window=W, use_sliding_window=True, no_rope_layer_interval=2)),
}
SLIDING = {"mistral": (0, 1, 2), "phi3": (0, 1, 2), "qwen2": (1, 2), "mixtral": (0, 1, 2), "qwen3": (2,),
           "smollm3": (1,)}
MAIN = ("mistral", "phi3", "qwen2")
IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 280, 64] * 12
BACKENDS = ("torch", "cpu") if cpu_available() else ("torch",)


def _classes(family):
    name = FAMILIES[family][0]
    return getattr(transformers, name + "Config"), getattr(transformers, name + "ForCausalLM")


def write_family(path, family, **over):
    """transformers' `family` model with random weights (q/k sharp enough that one key more or less moves the
    logits), saved with a tokenizer."""
    Config, Model = _classes(family)
    torch.manual_seed(0)
    model = Model(Config(**{**BASE, **FAMILIES[family][1], **over})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if any(k in name for k in ("q_proj", "k_proj", "qkv_proj")) else 0.1)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, V)
    return path


def hf_model(path, family):
    return _classes(family)[1].from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(path, family, ids):
    return pretrained_logits(_classes(family)[1], path, ids)


_written = {}


@pytest.fixture
def model_dir(tmp_path_factory):
    def get(family):
        if family not in _written:
            _written[family] = write_family(tmp_path_factory.mktemp(family) / "m", family)
        return _written[family]
    return get


def _edited(src, dst, **keys):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(keys)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_names_the_sliding_layers(family, model_dir):
    cfg = load_model(model_dir(family), max_seq_len=64).config
    assert cfg.sliding_window == W and cfg.sliding_layers == SLIDING[family] and cfg.real_window == W


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_past_the_window_match_transformers(family, model_dir, tmp_path):
    """One uncached forward over 60 tokens (7x the window): every position's logits, before and after the window."""
    d = model_dir(family)
    ids = IDS[:60]
    ref = hf_logits(d, family, ids)
    right = rel_err(loaded_logits(d, ids, 128), ref)
    assert right < 1e-5
    # within the window the window changes nothing; past it, attending over everything is far off
    wide = _edited(d, tmp_path / "wide", sliding_window=4096)
    assert rel_err(loaded_logits(wide, ids[:W], 128), ref[:W]) < 1e-5
    assert rel_err(loaded_logits(wide, ids, 128), ref) > max(1e-3, 100 * right)


@pytest.mark.parametrize("family", MAIN)
def test_the_window_boundary(family, model_dir):
    """A query at position i sees keys i - W + 1 .. i: W keys, its own included. At n = W + 1 tokens the last one
    no longer sees position 0 (a `>=` would still show it, and logits at that position part from transformers')."""
    d = model_dir(family)
    m = load_model(d, max_seq_len=64).model
    for n in (W - 1, W, W + 1, W + 2):
        ids = IDS[3:3 + n]
        ref = hf_logits(d, family, ids)
        assert rel_err(loaded_logits(d, ids, 64), ref) < 1e-5, n
        got, _ = prefill_then_decode(m, ids, W - 2, max_len=64)
        assert rel_err(got, ref) < 1e-5, n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("family", MAIN)
def test_cached_prefill_and_decode_past_the_window(family, exact, backend, model_dir, monkeypatch):
    """A 70-token prompt (CAUSAL_PREFILL for full layers, the window mask for sliding ones), then token by token
    far past the window. exact: fp32 decode steps on the CPU's ordered path (AMPHISTA_EXACT_GREEDY=1: cpu_exact's
    layout, windowed for the sliding layers), what bf16 decode steps always take."""
    monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", "1" if exact else "0")
    d = model_dir(family)
    ids = IDS[:90]
    ref = hf_logits(d, family, ids)
    with use_backend(backend):
        m = load_model(d, max_seq_len=128).model
        got, _ = prefill_then_decode(m, ids, 70)
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_fused_decode_layers_past_the_window(family, model_dir):
    """Block.forward_fused (routed linears, few-row steps; qkv biases decline it, so not Qwen2) with each layer's
    mask: the sliding layers' WindowMask goes through Attention.core as in the unfused layers."""
    from amphista_engine.kernels.routed_linear import route_linears
    d = model_dir(family)
    ids = IDS[:60]
    with use_backend("torch"):
        m = load_model(d, max_seq_len=128).model
        route_linears(m)
        m.fuse_decode_layers = True
        assert m.fuses_layers(torch.zeros(1, 1, m.config.dim))
        got, _ = prefill_then_decode(m, ids, 20)
    assert rel_err(got, hf_logits(d, family, ids)) < 1e-5


@pytest.mark.parametrize("family", MAIN)
def test_long_message_after_a_kept_prefix(family, model_dir):
    """A chat turn's long message after a kept prefix (AttentionSpec.kept_prefix past 64 new tokens:
    CAUSAL_AFTER_PREFIX for full layers, the window mask for sliding ones)."""
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import CAUSAL_AFTER_PREFIX, AttentionSpec, causal_mask, prefill_mask_args
    d = model_dir(family)
    m = load_model(d, max_seq_len=128).model
    ids, r = IDS[:100], 30
    cache = KVCache.for_model(m.config, 1, 128, torch.float32, "cpu")
    with torch.no_grad():
        spec = AttentionSpec(torch.zeros(1, dtype=torch.long), causal_mask(r, "cpu"), r, empty_prefix=True)
        first = m(torch.tensor([ids[:r]]), torch.arange(r)[None], cache, spec)[0]
        spec = AttentionSpec(torch.tensor([r]), causal_mask(len(ids) - r, "cpu"), len(ids), kept_prefix=r)
        assert prefill_mask_args(spec, torch.float32) == CAUSAL_AFTER_PREFIX
        rest = m(torch.tensor([ids[r:]]), torch.arange(r, len(ids))[None], cache, spec)[0]
    assert rel_err(torch.cat([first, rest]), hf_logits(d, family, ids)) < 1e-5


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("family", MAIN)
def test_tree_verification_past_the_window(family, exact, model_dir, monkeypatch):
    """A speculative step's tree after a 30-token prefix: each node's logits are transformers' for the prefix plus
    the node's path (siblings in other slots, positions by depth)."""
    monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", "1" if exact else "0")
    d = model_dir(family)
    m = load_model(d, max_seq_len=128).model
    prefix = IDS[:30]
    out, paths = tree_step_logits(m, prefix)
    hf = hf_model(d, family)
    for i, path in enumerate(paths):
        with torch.no_grad():
            ref = hf(torch.tensor([prefix + path])).logits[0, -1]
        assert rel_err(out[i], ref) < 1e-5, (i, path)


@pytest.mark.parametrize("family", MAIN)
def test_engine_takes_a_cache_past_the_window(family, model_dir, capsys):
    """The engine refused max_seq_len > window and defaulted its cache to the window (Phi-3-mini-4k: 2047)."""
    from amphista_engine.cli import main
    from amphista_engine.engine import DEFAULT_MAX_SEQ_LEN
    d = model_dir(family)
    eng = Engine.from_pretrained(str(d), device="cpu", dtype="fp32", max_seq_len=256)
    assert eng.max_seq_len == 256
    assert Engine.from_pretrained(str(d), device="cpu", dtype="fp32").max_seq_len == DEFAULT_MAX_SEQ_LEN
    # the CLI's default cache too (it was the window: here 8 tokens, fewer than this prompt and answer)
    rc = main(["generate", "The quick brown fox jumps over the lazy dog", "--no-chat", "--model", str(d),
               "--device", "cpu", "--max-new-tokens", "12", "--min-tokens", "12", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert len(json.loads(cap.out)["token_ids"]) == 12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", MAIN)
def test_engine_greedy_equals_transformers_generate(family, backend, model_dir):
    d = model_dir(family)
    eng = Engine.from_pretrained(str(d), device="cpu", dtype="fp32", max_seq_len=256, backend=backend, quant="none")
    prompt = IDS[:20]
    want = hf_greedy(hf_model(d, family), prompt, 40)
    got = eng.generate(prompt, chat=False, max_new_tokens=40, min_tokens=40, speculative="none").token_ids
    assert got == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_batch_rows_of_other_lengths_past_the_window(family, backend, model_dir):
    """A batch's rows sit at other positions (prompts of 5, 17 and 30 tokens): each row's window follows its own
    positions, plain and speculative, and each answer is transformers'."""
    from amphista_engine.heads import random_heads
    d = model_dir(family)
    eng = Engine.from_pretrained(str(d), device="cpu", dtype="fp32", max_seq_len=128, backend=backend, quant="none",
                                 max_batch_size=3)
    hf = hf_model(d, family)
    prompts = [IDS[:5], IDS[7:24], IDS[:30]]
    want = [hf_greedy(hf, p, 24) for p in prompts]
    got = eng.generate_batch(prompts, chat=False, max_new_tokens=24, min_tokens=24, speculative="none")
    assert [r.token_ids for r in got] == want
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    got = eng.generate_batch(prompts, chat=False, max_new_tokens=24, min_tokens=24, speculative="amphista")
    assert [r.token_ids for r in got] == want


@pytest.mark.parametrize("family", MAIN)
def test_long_prompt_in_prefill_chunks_equals_transformers(family, model_dir, monkeypatch):
    """A prompt longer than a prefill chunk (Transformer.prefill_chunk: past a window a prompt prefills in chunks
    so the sliding layers' masks stay [chunk, kv_len]), chunks of 65 here."""
    import amphista_engine.model as model_mod
    from amphista_engine.kv_cache import KVCache
    monkeypatch.setattr(model_mod, "WINDOW_PREFILL_CHUNK", 16)
    d = model_dir(family)
    eng = Engine.from_pretrained(str(d), device="cpu", dtype="fp32", max_seq_len=256, quant="none")
    assert eng.model.prefill_chunk(KVCache.for_model(eng.config, 1, 256, torch.float32, "cpu")) == 65
    assert eng.model.prefill_chunk(KVCache.for_model(eng.config, 1, W, torch.float32, "cpu")) is None
    prompt = IDS[:100]
    want = hf_greedy(hf_model(d, family), prompt, 12)
    got = eng.generate(prompt, chat=False, max_new_tokens=12, min_tokens=12, speculative="none").token_ids
    assert got == want


# 4-bit linears on the cpu backend only (its C++ layer stack)
@pytest.mark.parametrize("dtype,quant,backend", [(d, "none", b) for d in ("fp32", "bf16") for b in BACKENDS]
                         + [(d, "q4", "cpu") for d in ("fp32", "bf16") if "cpu" in BACKENDS])
@pytest.mark.parametrize("family", MAIN)
def test_speculative_equals_plain_past_the_window(family, dtype, quant, backend, model_dir):
    """Random Amphista heads on a window of 8: greedy speculative answers are the plain ones, in fp32, in bf16 (the
    CPU's ordered decode steps, windowed for the sliding layers) and with 4-bit linears (on the cpu backend the C++
    layer stack, its tree attention windowed per layer)."""
    from amphista_engine.heads import random_heads
    from amphista_engine.kernels import cpu_ops
    eng = Engine.from_pretrained(str(model_dir(family)), device="cpu", dtype=dtype, max_seq_len=256, quant=quant,
                                 backend=backend)
    assert eng.quant == quant
    if quant == "q4":
        with use_backend(backend):
            m = eng.model
            assert cpu_ops.stack_runs(m.layers, m.norm, m.config, eng.dtype, m)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    for prompt in (IDS[:5], IDS[:30]):
        plain, spec = plain_and_speculative(eng, prompt, 20)
        assert len(plain) == 20 and spec == plain


@pytest.mark.parametrize("family", [*MAIN, "qwen3", "smollm3"])      # SmolLM3: the stack in runs of NoPE layers
def test_4bit_stack_windows_like_the_python_loop(family, model_dir, monkeypatch):
    """The C++ layer stack's windowed attention (4-bit, cpu backend) against the Python layer loop over the same
    4-bit products on a cache past the window (the stack declined): the same logits up to the attention's order.
    The prompt goes in two chunks (as Transformer.prefill_chunk sends a long one), the second after a prefix."""
    if not cpu_available():
        pytest.skip("the cpu extension is not built")
    from amphista_engine.kernels import cpu_ops
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import AttentionSpec, causal_mask
    ids = IDS[:60]

    def chunked_then_decode(m, first=12, second=40):
        cache = KVCache.for_model(m.config, 1, 128, torch.float32, "cpu")
        out, at = [], 0
        with torch.no_grad():
            for n in (first, second):
                spec = AttentionSpec(torch.tensor([at]), causal_mask(n, "cpu"), at + n, empty_prefix=at == 0)
                out.append(m(torch.tensor([ids[at:at + n]]), torch.arange(at, at + n)[None], cache, spec)[0])
                at += n
            for t in range(at, len(ids)):
                spec = AttentionSpec(torch.tensor([t]), causal_mask(1, "cpu"), t + 1, decode=True)
                out.append(m(torch.tensor([[ids[t]]]), torch.tensor([[t]]), cache, spec)[0])
        return torch.cat(out)
    eng = Engine.from_pretrained(str(model_dir(family)), device="cpu", dtype="fp32", max_seq_len=128, quant="q4",
                                 backend="cpu")
    out, ran, real = {}, [], cpu_ops.decoder_layers

    def counted(*a, **k):
        r = real(*a, **k)
        ran.append(r is not NotImplemented)
        return r
    monkeypatch.setattr(cpu_ops, "decoder_layers", counted)
    with use_backend("cpu"):
        out["stack"] = chunked_then_decode(eng.model)
        assert ran and all(ran)
        monkeypatch.setattr(cpu_ops, "decoder_layers", lambda *a, **k: NotImplemented)
        out["loop"] = chunked_then_decode(eng.model)
    # an int8-rounded activation may flip at a position or two (~1e-3 there); a window missing or off by one moves
    # every position past it
    errs = sorted(rel_err(a, b) for a, b in zip(out["stack"], out["loop"]))
    assert errs[-3] < 1e-5 and errs[-1] < 1e-2, errs[-3:]


def test_phi3_gguf_window_slides_every_layer(tmp_path):
    """A phi3 GGUF's attention.sliding_window: every layer slides, as transformers' Phi-3 of the same weights."""
    from test_phi3 import write_phi3, write_phi3_gguf
    d = write_phi3(tmp_path / "hf", sliding_window=W)
    f = write_phi3_gguf(d, tmp_path / "phi3.gguf", window=W)
    m = load_model(f, max_seq_len=128).model
    assert m.config.sliding_layers == (0, 1) and m.config.real_window == W
    ids = IDS[:40]
    ref = pretrained_logits(transformers.Phi3ForCausalLM, d, ids)
    assert rel_err(loaded_logits(f, ids, 128), ref) < 1e-5
    got, _ = prefill_then_decode(m, ids, 20)
    assert rel_err(got, ref) < 1e-5
    assert Engine.from_pretrained(str(f), device="cpu", max_seq_len=128).max_seq_len == 128
