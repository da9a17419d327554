"""A seeded differential sweep of the engine's model against transformers' over the config space of every family it
loads: each case draws a tiny random config (sizes, GQA, head_dim apart from dim / heads, biases, tied embeddings,
norm eps, RoPE base and scaling, partial rotary, sliding windows, experts), builds transformers' model with random
weights, saves it, loads it with Engine.from_pretrained in fp32 on the torch and the cpu backends, and holds the
logits of a prefill and of decode steps over the cache against transformers' forward over the same tokens. A config
the engine refuses must be refused by name (an AmphistaError at load), never loaded to other logits.

The suite runs SEEDS; the sweep behind it ran check_seed over seeds 0..2999 (transformers 5.25, torch and cpu
backends): 2409 cases held, 420 refused by name, 171 that transformers itself cannot build or run."""
from __future__ import annotations

import json
import random

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.errors import AmphistaError
from amphista_engine.kernels import cpu_available, use_backend
from conftest import TINY_HF, prefill_then_decode, write_tokenizer
from model_helpers import rel_err

transformers = pytest.importorskip("transformers")

# positions past the trained length on purpose (scaled RoPE kicks in there): the engine's warning of it is expected
pytestmark = pytest.mark.filterwarnings("ignore:max_seq_len=.* is past the .* positions the model was trained on")

VOCAB = TINY_HF["vocab_size"]       # write_tokenizer's vocabulary
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "gemma3_text", "qwen3_moe", "mixtral")
_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "smollm3": "SmolLM3",
            "phi3": "Phi3", "gemma3_text": "Gemma3Text", "qwen3_moe": "Qwen3Moe", "mixtral": "Mixtral"}
_ROPES = {"llama": ("linear", "dynamic", "yarn", "llama3", "longrope"),
          "mistral": ("linear", "dynamic", "yarn", "llama3", "longrope"),
          "qwen2": ("linear", "dynamic", "yarn", "longrope"),
          "qwen3": ("linear", "yarn", "dynamic", "llama3", "longrope"), "smollm3": ("yarn", "linear", "longrope"),
          "phi3": ("longrope",), "gemma3_text": ("linear", "yarn", "dynamic", "llama3"),
          "qwen3_moe": ("yarn", "linear", "longrope"), "mixtral": ("linear", "yarn", "llama3", "dynamic")}


def draw_case(seed: int) -> tuple[str, dict, int, int, str | None]:
    """(family, transformers config kwargs, prompt length, decode steps, config.json's form) of case `seed`. The
    form: None, as transformers 5 writes it; "type" or "rope_type", as transformers 4 did (rope_theta and a
    rope_scaling under that key at the top, the Hub's); "trimmed", every key at its class's default left out."""
    r = random.Random(seed)
    family = FAMILIES[seed % len(FAMILIES)]
    heads = r.choice((1, 2, 3, 4, 6))
    kv = r.choice([k for k in range(1, heads + 1) if heads % k == 0])
    # transformers' Gemma 3 wants hidden_size a multiple of the heads; RoPE an even width
    # and transformers' grouped expert products rows of a multiple of 16 bytes
    moe = family in ("qwen3_moe", "mixtral")
    dim = r.choice([d for d in range(32, 97, 2) if d % (2 * heads) == 0 and (d % 4 == 0 or not moe)])
    head_dim = r.choice((dim // heads, 8, 16, 24, 32) if not moe else (dim // heads, 8, 16, 32))
    prompt, steps = r.randint(2, 12), r.randint(3, 6)
    cfg = dict(vocab_size=VOCAB, hidden_size=dim, intermediate_size=r.choice((32, 48, 64, 96)),
               num_hidden_layers=r.randint(1, 3), num_attention_heads=heads, num_key_value_heads=kv,
               rms_norm_eps=r.choice((1e-6, 1e-5, 1e-3, 0.1)), tie_word_embeddings=r.random() < 0.4,
               max_position_embeddings=r.choice((8, 12, 16, 64)), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # transformers' Phi3Config sizes LongRoPE's lists by dim / heads, its model by a head_dim key
    if r.random() < 0.5:
        cfg["head_dim"] = head_dim
    if r.random() < 0.4:
        cfg["attention_bias"] = True            # read by Llama, Qwen3, SmolLM3, Gemma 3 and Qwen3-MoE only
    if family in ("llama", "smollm3") and r.random() < 0.1:
        cfg["mlp_bias"] = True                                       # refused
    rope = {"rope_type": "default", "rope_theta": r.choice((10.0, 100.0, 10000.0, 1e6))}
    if r.random() < 0.6:
        kind = r.choice(_ROPES[family])
        if kind == "longrope" and family == "phi3":
            cfg.pop("head_dim", None)
        rope["rope_type"] = kind
        rope["factor"] = r.choice((1.5, 2.0, 4.0, 8.0))
        if kind in ("yarn", "llama3", "longrope") and r.random() < 0.7:
            rope["original_max_position_embeddings"] = r.choice((4, 8, 16))
        if kind == "yarn":
            for key, values in (("beta_fast", (8.0, 32.0)), ("beta_slow", (0.5, 1.0, 2.0)),
                                ("attention_factor", (0.8, 1.3)), ("truncate", (False,)),
                                ("mscale", (0.707, 1.0)), ("mscale_all_dim", (0.5, 1.0))):
                # transformers' Gemma 3 reads truncate from the top of rope_parameters, never the layer type's
                if r.random() < 0.3 and not (key == "truncate" and family == "gemma3_text"):
                    rope[key] = r.choice(values)
        if kind == "llama3":
            rope["low_freq_factor"], rope["high_freq_factor"] = r.choice(((1.0, 4.0), (0.5, 2.0), (2.0, 8.0)))
    if r.random() < (0.4 if family == "phi3" else 0.05):        # refused where not Phi-3
        rope["partial_rotary_factor"] = r.choice((0.5, 0.75, 0.25))
    if rope["rope_type"] == "longrope":
        rot = int((cfg.get("head_dim") or dim // heads) * rope.get("partial_rotary_factor", 1.0))
        for key in ("short_factor", "long_factor"):
            rope[key] = [round(r.uniform(1.0, 6.0), 3) for _ in range(rot // 2)]
        if family == "phi3":
            cfg["original_max_position_embeddings"] = r.choice((4, 8, 16))
        if r.random() < 0.3:
            rope["attention_factor"] = r.choice((0.9, 1.2))
    cfg["rope_parameters"] = rope
    total = prompt + steps
    if family in ("mistral", "qwen2", "qwen3", "smollm3", "phi3", "mixtral", "qwen3_moe") and r.random() < 0.4:
        # windows below the sequence's length too: the engine's logits past them must be transformers'
        cfg["sliding_window"] = r.choice((total - 3, total, total + 5, 64))
        if r.random() < 0.7:                  # a key only some families' transformers classes read
            cfg["use_sliding_window"] = r.random() < 0.7
        if family in ("qwen2", "qwen3", "qwen3_moe") and r.random() < 0.7:
            cfg["max_window_layers"] = r.randint(0, 3)
    if family == "smollm3":
        cfg["no_rope_layer_interval"] = r.choice((1, 2, 3, 4))
    if r.random() < 0.03:
        cfg["hidden_act"] = r.choice(("gelu", "relu", "gelu_pytorch_tanh"))        # refused but Gemma's
    if family == "gemma3_text":
        cfg.update(attn_logit_softcapping=r.choice((None,) * 9 + (20.0,)),       # refused where set
                   query_pre_attn_scalar=r.choice((8, 16, 64)), sliding_window=r.choice((2, 3, 5, 64)),
                   rope_local_base_freq=r.choice((10.0, 10000.0)), final_logit_softcapping=r.choice((None, 5.0, 30.0)))
        cfg["layer_types"] = [r.choice(("sliding_attention", "full_attention"))
                              for _ in range(cfg["num_hidden_layers"])]
        local = {"rope_type": "default", "rope_theta": cfg.pop("rope_local_base_freq")}
        if r.random() < 0.1:
            local.update(rope_type="linear", factor=2.0)       # refused: the engine scales full layers only
        cfg["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    if family == "qwen3_moe":
        experts = r.randint(2, 6)
        cfg.update(num_experts=experts, num_experts_per_tok=r.randint(1, experts), norm_topk_prob=r.random() < 0.5,
                   moe_intermediate_size=r.choice((16, 32)), decoder_sparse_step=r.randint(1, 2),
                   mlp_only_layers=r.sample(range(3), r.randint(0, 1)))
    if family == "mixtral":
        experts = r.randint(2, 6)
        cfg.update(num_local_experts=experts, num_experts_per_tok=r.randint(1, experts))
    # transformers 5 reads a Gemma 3 rope_scaling's old "type" key as no scaling at all (its own slip: 4 scaled)
    formats = (None, None, "rope_type", "trimmed") + (() if family == "gemma3_text" else ("type",))
    return family, cfg, prompt, steps, r.choice(formats)


def _as_transformers4(cfg: dict, key: str) -> dict:
    """config.json as transformers 4 wrote it: rope_theta (rope_local_base_freq) and partial_rotary_factor at the
    top, a rope_scaling dict whose kind is under `key`, or null; None where it has no such form."""
    cfg = dict(cfg)
    rp = cfg.pop("rope_parameters")
    if "full_attention" in rp:
        if rp["sliding_attention"].get("rope_type") != "default":
            return None
        cfg["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
        rp = rp["full_attention"]
    rp = dict(rp)
    cfg["rope_theta"] = rp.pop("rope_theta")
    if "partial_rotary_factor" in rp:
        cfg["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    kind = rp.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {key: kind, **rp}
    return cfg


def write_case(family: str, cfg: dict, path, seed: int, form: str | None = None):
    """transformers' model of `cfg` with random weights (q/k sharp enough for RoPE to move the logits, norms
    around 1 as trained ones are), saved to path with its config.json in `form` (draw_case), read back from there;
    returned in eval mode."""
    Config = getattr(transformers, _CLASSES[family] + "Config")
    Model = getattr(transformers, ("Gemma3" if family == "gemma3_text" else _CLASSES[family]) + "ForCausalLM")
    torch.manual_seed(seed)
    model = Model(Config(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.4 if "q_proj" in name or "k_proj" in name or "qkv_proj" in name else 0.1)
            if name.endswith("norm.weight") and family != "gemma3_text":
                p.add_(1.0)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, VOCAB)
    saved = json.loads((path / "config.json").read_text())
    if form == "trimmed":
        defaults = json.loads(Config().to_json_string())
        saved = {k: v for k, v in saved.items()
                 if k in ("model_type", "architectures") or k not in defaults or defaults[k] != v}
    elif form:
        saved = _as_transformers4(saved, form)
    if form and saved:
        (path / "config.json").write_text(json.dumps(saved))
        model = Model.from_pretrained(path, dtype=torch.float32).eval()
    return model


def check_seed(seed: int, root) -> str:
    """check_case of draw_case(seed)."""
    return check_case(*draw_case(seed), root / f"case{seed}", seed)


BACKENDS = ("torch", "cpu") if cpu_available() else ("torch",)      # the cpu one where its extension is built


def check_case(family: str, cfg: dict, prompt: int, steps: int, form: str | None, path, seed: int = 0,
               backends=BACKENDS, tol=1e-4) -> str:
    """Hold the engine on transformers' `family` model of `cfg` (written to path, random weights of `seed`) over a
    random prompt of `prompt` tokens and `steps` greedy ones: 'ok', 'refused: <message>' where the engine refuses the
    config by name, or 'transformers fails: ...' where transformers cannot build or run it either. Fails
    (AssertionError) where the engine's logits part from transformers', or its greedy answer does."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (prompt,), generator=g).tolist()
    clear_steps = None        # how many of transformers' greedy steps have no near tie (and no EOS)
    try:
        hf = write_case(family, cfg, path, seed, form)
        with torch.no_grad():
            for i in range(steps):                   # transformers' greedy continuation
                top2 = hf(torch.tensor([ids])).logits[0, -1].topk(2)
                ids.append(int(top2.indices[0]))
                if clear_steps is None and (top2.values[0] - top2.values[1] < 1e-3 or ids[-1] == 2):
                    clear_steps = i
            want = hf(torch.tensor([ids])).logits[0]
    except Exception as e:        # transformers' own validators and shape errors: no case to hold
        return f"transformers fails: {type(e).__name__}: {str(e)[:150]}"
    clear_steps = steps if clear_steps is None else clear_steps
    for backend in backends:
        try:
            engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", backend=backend,
                                            max_seq_len=len(ids))
        except AmphistaError as e:
            return f"refused: {type(e).__name__}: {e}"
        with use_backend(backend):
            got, _ = prefill_then_decode(engine.model, ids, prompt, max_len=len(ids))
        err = rel_err(got, want)
        assert err < tol, f"seed {seed} {family} {backend}: logits {err:.2e} apart; config {cfg}"
        # greedy tokens where transformers' top two are not a near tie (over the whole sequence: LongRoPE's logits
        # at a position change once the sequence passes the trained length)
        top2 = want.topk(2)
        clear = (top2.values[:, 0] - top2.values[:, 1]) > 1e-3
        assert (got.argmax(-1) == top2.indices[:, 0])[clear].all(), f"seed {seed} {family} {backend}: greedy tokens"
        # and the engine's own plain decoding of the prompt (LongRoPE's transformers answer switches factors as it
        # grows, which one table for the whole cache does not follow)
        if clear_steps and cfg["rope_parameters"].get("rope_type") != "longrope":
            answer = engine.generate(ids[:prompt], chat=False, max_new_tokens=clear_steps,
                                     speculative="none").token_ids
            assert answer == ids[prompt:prompt + clear_steps], f"seed {seed} {family} {backend}: greedy answer"
    return "ok"


# 50 of seeds 0..161 (18 per family), picked so that together they draw everything those 162 draw, per family: each
# RoPE kind, config.json form, optional key (head_dim, biases, windows, max_window_layers), tied embeddings, a
# refused activation / MLP bias / partial rotary / softcap
SEEDS = (1, 2, 3, 5, 7, 8, 9, 10, 11, 12, 13, 16, 18, 19, 23, 28, 29, 31, 32, 35, 36, 39, 41, 42, 43, 48, 51, 53, 54,
         57, 62, 73, 79, 80, 83, 84, 87, 90, 94, 101, 105, 108, 109, 116, 124, 127, 136, 139, 148, 159)


@pytest.mark.parametrize("seed", SEEDS)
def test_seeded_config_matches_transformers(seed, tmp_path):
    check_seed(seed, tmp_path)


# ---- sliding windows transformers applies whatever use_sliding_window / max_window_layers say -------------------

_TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             rope_parameters={"rope_type": "default", "rope_theta": 100.0})


@pytest.mark.parametrize("family,over", [
    # transformers' Mistral, Mixtral and Phi-3 read no use_sliding_window (nor layer_types): they slide every layer
    ("mistral", {"use_sliding_window": False}),
    ("mistral", {"layer_types": ["full_attention"] * 2}),
    ("mixtral", {"use_sliding_window": False, "num_local_experts": 3, "num_experts_per_tok": 2}),
    ("phi3", {"use_sliding_window": False}),
    # transformers' Qwen3-MoE has no max_window_layers: use_sliding_window slides every layer
    ("qwen3_moe", {"use_sliding_window": True, "max_window_layers": 2, "num_experts": 3, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 16}),
])
def test_a_window_transformers_applies_is_never_ignored(family, over, tmp_path):
    """These loaded with no window at all: a cache past it attended over every position, logits ~0.4-0.7 relative
    from transformers' once the sequence passed the window. (Then the engine refused a cache past the window; since
    it implements the window, the logits past it are transformers'.)"""
    cfg = {**_TINY, "sliding_window": 5, **over}
    assert check_case(family, cfg, 6, 4, None, tmp_path / "past") == "ok"
    assert check_case(family, {**cfg, "sliding_window": 10}, 6, 4, None, tmp_path / "within") == "ok"


# ---- keys a config.json leaves out take their family's transformers default ------------------------------------

@pytest.mark.parametrize("family,over,left_out", [
    ("mixtral", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "rms_norm_eps": 1e-5,
                 "num_local_experts": 3, "num_experts_per_tok": 2}, "rope_parameters"),   # ran base 10000, eps 1e-6
    ("phi3", {"rms_norm_eps": 1e-5}, "rms_norm_eps"),                                       # ran eps 1e-6
    ("smollm3", {"rope_parameters": {"rope_type": "default", "rope_theta": 2e6}, "tie_word_embeddings": True},
     "tie_word_embeddings"),                               # refused: "lacks lm_head.weight" (tied is its default)
    ("qwen3", {"head_dim": 128}, "head_dim"),              # refused: q_proj's shape against hidden / heads
])
def test_a_key_left_out_takes_the_familys_transformers_default(family, over, left_out, tmp_path):
    cfg = {**_TINY, "max_position_embeddings": 16, **over}
    assert check_case(family, cfg, 6, 4, "trimmed", tmp_path / "m") == "ok"
    assert left_out not in json.loads((tmp_path / "m" / "config.json").read_text())


def test_a_left_out_window_or_trained_length_is_transformers_default():
    """transformers' MistralConfig slides over 4096 positions where config.json has no sliding_window (null: none);
    LlamaConfig's max_position_embeddings is 2048, YaRN's trained length where the rope dict names none (it was
    4096 here: other angles at every position)."""
    from amphista_engine.config import ModelConfig
    raw = {k: v for k, v in TINY_HF.items() if k not in ("max_position_embeddings", "rope_theta")}
    mistral = {**raw, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    assert ModelConfig.from_hf(mistral).sliding_window == 4096
    assert ModelConfig.from_hf({**mistral, "sliding_window": None}).sliding_window is None
    yarn = ModelConfig.from_hf({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert yarn.rope_scaling["original_max_position_embeddings"] == yarn.max_position_embeddings == 2048


def test_gemma3_partial_rotary_in_a_layer_types_rope_dict_is_refused(tmp_path):
    """A partial_rotary_factor inside rope_parameters' full_attention dict loaded (the top-level key was refused)
    and the sliding layers rotated only part of each head: logits ~7e-2 relative from transformers'."""
    cfg = {**_TINY, "head_dim": 16, "sliding_window": 3, "layer_types": ["sliding_attention"] * 2,
           "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0,
                                                  "partial_rotary_factor": 0.5},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}}
    out = check_case("gemma3_text", cfg, 6, 4, None, tmp_path / "m")
    assert out.startswith("refused: ConfigError") and "partial_rotary_factor=0.5" in out, out


@pytest.mark.parametrize("family", ["qwen2", "mistral", "mixtral", "phi3"])
def test_attention_bias_is_read_only_where_transformers_reads_it(family, tmp_path):
    """transformers' Qwen2 (q/k/v biases always, none on o), Mistral, Mixtral and Phi-3 ignore attention_bias: a
    config with it true was refused ("checkpoint lacks ... o_proj.bias") though transformers runs it."""
    cfg = {**_TINY, "attention_bias": True}
    if family == "mixtral":
        cfg.update(num_local_experts=3, num_experts_per_tok=2)
    assert check_case(family, cfg, 6, 4, None, tmp_path / "m") == "ok"
