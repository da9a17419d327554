"""Model shapes for `amphista bench --random-weights`: the architecture of a real target without its weights.

Step latency depends on the shapes, not the values, so random weights of the right shape time a 7B/13B/33B
target without downloading it. Shapes follow the checkpoints the Medusa and Amphista papers evaluate
(Vicuna v1.3 = LLaMA-1 7B/13B/33B), the model we ship (SmolLM2-135M-Instruct), Qwen2.5 / Qwen3 (q/k/v biases,
per-head q/k norms, GQA groups of 7 and 4), SmolLM3 (every 4th layer without RoPE), Gemma 3 (sliding layers) and the
mixture-of-experts Qwen3-30B-A3B and Mixtral-8x7B (too large for a CPU run without --allow-large).
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import InputError
from ..model import Transformer

SHAPES: dict[str, dict] = {
    "llama-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008,
                     norm_eps=1e-6, max_position_embeddings=2048),
    "llama-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, intermediate_size=13824,
                      norm_eps=1e-6, max_position_embeddings=2048),
    "vicuna-33b": dict(vocab_size=32000, dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, intermediate_size=17920,
                       norm_eps=1e-6, max_position_embeddings=2048),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                         norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, intermediate_size=4864,
                         norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
                         qkv_bias=True),
    "qwen2.5-7b": dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, intermediate_size=18944,
                       norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, qkv_bias=True),
    "qwen3-0.6b": dict(vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                       intermediate_size=3072, norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                       tie_word_embeddings=True, qk_norm=True),
    "qwen3-8b": dict(vocab_size=151936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
                     intermediate_size=12288, norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                     qk_norm=True),
    "smollm3-3b": dict(vocab_size=128256, dim=2048, n_layers=36, n_heads=16, n_kv_heads=4, intermediate_size=11008,
                       norm_eps=1e-6, rope_theta=5000000.0, max_position_embeddings=65536, tie_word_embeddings=True,
                       nope_layers=tuple(range(3, 36, 4))),
    # Gemma 3 (Gemma3ForCausalLM): 5 of every 6 layers slide over a 512-token window (past it the kernels take the
    # window; the torch backend and long prefill chunks a dense mask), GELU MLPs, four (1 + w) norms a layer, q/k norms, a 262k vocabulary
    "gemma3-270m": dict(vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
                        intermediate_size=2048, norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                        tie_word_embeddings=True, qk_norm=True, gemma=True, query_pre_attn_scalar=256,
                        sliding_window=512, sliding_layers=tuple(i for i in range(18) if (i + 1) % 6),
                        rope_local_theta=10000.0),
    "gemma3-1b": dict(vocab_size=262144, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256,
                      intermediate_size=6912, norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                      tie_word_embeddings=True, qk_norm=True, gemma=True, query_pre_attn_scalar=256,
                      sliding_window=512, sliding_layers=tuple(i for i in range(26) if (i + 1) % 6),
                      rope_local_theta=10000.0),
    # Mixture of experts (model.MoEFeedForward): Qwen3-30B-A3B, 128 experts of 768, 8 a token (3.3B active of
    # 30.5B), q/k norms; Mixtral-8x7B, 8 experts of 14336, 2 a token (12.9B active of 46.7B), fp32 routing weights
    "qwen3-30b-a3b": dict(vocab_size=151936, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
                          intermediate_size=6144, norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                          qk_norm=True, n_experts=128, experts_per_token=8, moe_intermediate_size=768,
                          moe_layers=tuple(range(48)), norm_topk_prob=True),
    "mixtral-8x7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                         norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768, n_experts=8,
                         experts_per_token=2, moe_intermediate_size=14336, moe_layers=tuple(range(32)),
                         norm_topk_prob=True, moe_weights_fp32=True),
    # Not a real model: a few-MB shape so smoke tests and CI can exercise the random-weights path.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                 max_position_embeddings=4096),
}

# Refuse on CPU above this many bytes of weights unless --allow-large: a 7B model in fp32 is 27 GB and
# would push a shared machine into swap before a single step was timed.
CPU_LIMIT_BYTES = 4 << 30


def shape_config(shape: str) -> ModelConfig:
    if shape not in SHAPES:
        raise InputError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    return ModelConfig(**SHAPES[shape], name=f"random-{shape}", eos_token_id=[])


def param_count(cfg: ModelConfig) -> int:
    d, q, kv = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = (d * (q + 2 * kv) + q * d + 3 * d * cfg.intermediate_size + 2 * d + cfg.qkv_bias * (q + 2 * kv)
                 + cfg.o_bias * d + cfg.qk_norm * 2 * cfg.head_dim + cfg.gemma * 2 * d)
    # an MoE layer: a router and n_experts SwiGLU experts in place of the dense MLP
    moe = cfg.n_experts * (d + 3 * d * cfg.moe_intermediate_size) - 3 * d * cfg.intermediate_size
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return cfg.n_layers * per_layer + len(cfg.moe_layers) * moe + cfg.vocab_size * d + head + d


def check_fits(cfg: ModelConfig, device, dtype: torch.dtype, allow_large: bool, what: str):
    """Raise before allocating a model too large for a CPU run (GPUs report their own OOM quickly)."""
    nbytes = param_count(cfg) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type == "cpu" and nbytes > CPU_LIMIT_BYTES and not allow_large:
        raise InputError(f"{what} needs {nbytes / 2**30:.1f} GiB of weights in {str(dtype).removeprefix('torch.')}; "
                         f"that is too large for a CPU benchmark (limit {CPU_LIMIT_BYTES / 2**30:.0f} GiB). "
                         f"Use --device cuda, a smaller --shape, or pass --allow-large if the machine has the memory")


def random_model(shape: str | ModelConfig, device="cpu", dtype: torch.dtype = torch.float32, max_seq_len: int = 2048,
                 seed: int = 0, allow_large: bool = False) -> Transformer:
    """A Transformer of `shape` (a name or a config) with N(0, 0.02) weights, allocated directly on `device`.

    Built on the meta device and materialised in place: a default nn.Linear init (kaiming, fp32, on the host)
    would take minutes and twice the memory for 33B parameters.
    """
    cfg = shape if isinstance(shape, ModelConfig) else shape_config(shape)
    check_fits(cfg, device, dtype, allow_large, f"--shape {cfg.name}")
    with torch.device("meta"):
        model = Transformer(cfg, max_seq_len)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(0.0 if cfg.gemma else 1.0)      # Gemma's norms scale by 1 + w
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.tie_weights()
    model.setup_rope(max_seq_len)          # to_empty left the RoPE buffer uninitialised
    return model.eval().requires_grad_(False)


def random_heads(kind: str, model: Transformer, num_heads: int = 4, seed: int = 1, draft_vocab: int = 0):
    """Random drafting heads for `model`, built directly on its device and dtype (heads.random_heads builds
    them on the host in fp32 first: for a 7B target several GB and tens of seconds)."""
    from ..heads import HeadsConfig, build_heads
    cfg = HeadsConfig.for_target(model.config, kind=kind, num_heads=num_heads, draft_vocab_size=draft_vocab)
    with torch.device("meta"):
        heads = build_heads(cfg)
    # the model's device and dtype (its embedding and LM head weights may be meta tensors: cpu_quant)
    heads = heads.to_empty(device=model.device).to(model.tok_embeddings.weight.dtype)
    g = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:   # ResBlocks N(0, 1/d) so the K drafts differ; the rest small
                p.normal_(0.0, p.shape[-1] ** -0.5 if name.startswith("res.") else 0.02, generator=g)
    heads = heads.eval().requires_grad_(False).bind(model)
    if draft_vocab:   # to_empty left the id buffer uninitialised; any distinct ids time the same
        heads.set_draft_vocab(torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(0))
                              [:draft_vocab])
    return heads
