"""Plain decoding latency: our engine vs Hugging Face transformers' `generate`, same weights, dtype, device.

    python benchmarks/ar_latency.py [--model smollm2-135m] [--device cpu] [--dtype fp32] [--new-tokens 64]

transformers gets the very same dequantized tensors (converted to its layout), so only the engines differ.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import hardware, md_table, median_ms, write_results  # noqa: E402

from amphista_engine.generation import PlainDecoder  # noqa: E402
from amphista_engine.kernels.linear_setup import LinearSetup  # noqa: E402
from amphista_engine.kv_cache import KVCache  # noqa: E402
from amphista_engine.loading import load_model, parse_dtype  # noqa: E402
from amphista_engine.sampling import SamplingParams  # noqa: E402

PROMPT = ("Explain, step by step, how a speculative decoder drafts several tokens with extra heads and then "
          "verifies them with the target model in a single forward pass. ") * 3


def require_transformers(prog: str):
    """Stops with one line when Hugging Face transformers does not import (the engine does not depend on it)."""
    try:
        import transformers  # noqa: F401
    except Exception as err:     # ImportError, or a broken install raising anything at import
        sys.exit(f"{prog}: needs Hugging Face transformers, which does not import here "
                 f"({type(err).__name__}: {err}); pip install transformers")


def to_transformers(loaded, dtype, device):
    """A transformers LlamaForCausalLM holding exactly our weights (unfused back to its layout)."""
    import transformers
    c, m = loaded.config, loaded.model
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim

    def weight(linear):
        # An Engine's own target on the CPU holds its linears packed for oneDNN and frees the float weight (a meta
        # tensor: "Cannot copy out of meta tensor"); float_rows reads the exact values back.
        return linear.float_rows() if hasattr(linear, "float_rows") else linear.weight

    sd = {"model.embed_tokens.weight": m.tok_embeddings.weight, "model.norm.weight": m.norm.weight,
          "lm_head.weight": weight(m.output)}
    for i, layer in enumerate(m.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = weight(layer.attention.wqkv).split([q, kv, kv])
        gate, up = weight(layer.feed_forward.w13).chunk(2)
        sd.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": weight(layer.attention.wo),
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": weight(layer.feed_forward.w2),
                   p + "input_layernorm.weight": layer.attention_norm.weight,
                   p + "post_attention_layernorm.weight": layer.ffn_norm.weight})
    hf.load_state_dict({k: v.detach().clone().to(device, dtype) for k, v in sd.items()}, strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg).to(device)   # meta buffers -> real
    return hf.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    require_transformers("ar_latency")
    dtype = parse_dtype(args.dtype)
    loaded = load_model(args.model, dtype=dtype, device=args.device, max_seq_len=1024)
    ids = loaded.tokenizer.encode(PROMPT)
    n = args.new_tokens

    cache = KVCache.for_model(loaded.config, 1, 1024, dtype, args.device)

    def ours(new):
        dec = PlainDecoder(loaded.model, cache, SamplingParams())
        with torch.inference_mode():
            dec.prefill([ids])
            for _ in range(new - 1):
                dec.step()
            dec.next.cpu()   # the host needs the token anyway: count that sync

    hf = to_transformers(loaded, dtype, args.device)
    LinearSetup.for_device(args.device, dtype).apply(loaded.model)   # our linears as the Engine runs them
    x = torch.tensor([ids], device=args.device)

    def theirs(new):
        with torch.inference_mode():
            hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    rows = []
    for name, fn in [("amphista-engine", ours), ("transformers generate", theirs)]:
        prefill = median_ms(lambda: fn(1), args.device, args.repeats)
        total = median_ms(lambda: fn(n + 1), args.device, args.repeats, warmup=1)
        per_tok = (total - prefill) / n
        rows.append({"engine": name, "prompt_tokens": len(ids), "prefill_ms": prefill, "decode_ms_per_token": per_tok,
                     "decode_tokens_per_s": 1e3 / per_tok})
    rows[0]["speedup_vs_transformers"] = rows[1]["decode_ms_per_token"] / rows[0]["decode_ms_per_token"]
    rows[1]["speedup_vs_transformers"] = 1.0
    table = md_table(rows, ["engine", "prompt_tokens", "prefill_ms", "decode_ms_per_token", "decode_tokens_per_s",
                            "speedup_vs_transformers"])
    import transformers
    write_results(f"ar_latency_{Path(str(args.model)).stem}_{args.device}_{args.dtype}", rows,
                  {"hardware": hardware(args.device), "model": args.model, "dtype": args.dtype,
                   "new_tokens": n, "transformers": transformers.__version__}, table, args.out)


if __name__ == "__main__":
    main()
