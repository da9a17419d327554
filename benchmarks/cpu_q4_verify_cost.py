"""What verifying a tree costs on 4-bit weights on the CPU: one target forward of T = 1, 2, 4, 8, 16 new tokens
(a chain, all logits) over a 256-token prefix, as a multiple of the plain step (T = 1), on the cpu backend's
products and decoder stack and on torch's int4 kernels (the torch backend), side by side in rotating order.

A speculative step pays this ratio for tau tokens; the heads' pass comes on top. SmolLM2 runs its own GGUF codes;
`llama-1b` is a random Llama of ~1.2B parameters (d 2048, 16 layers, GQA 32/8, SwiGLU 8192, vocabulary 32000)
quantized to 4 bits by round to nearest: its times, not its outputs, are what counts.

    OMP_NUM_THREADS=2 python benchmarks/cpu_q4_verify_cost.py [--models smollm2-135m,llama-1b] [--reps 15]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from amphista_engine.config import ModelConfig  # noqa: E402
from amphista_engine.kernels import cpu_quant, use_backend  # noqa: E402
from amphista_engine.kv_cache import KVCache  # noqa: E402
from amphista_engine.model import AttentionSpec, Transformer, causal_mask  # noqa: E402
from amphista_engine.speculation_check import SETTLE_MS  # noqa: E402
from benchmarks.common import hardware, md_table, write_results  # noqa: E402

PREFIX = 256
ROWS = (1, 2, 4, 8, 16)


def model_for(name: str) -> Transformer:
    if name == "smollm2-135m":
        from amphista_engine.engine import Engine
        return Engine.from_pretrained(name, device="cpu", dtype="fp32", max_seq_len=1024, quant="q4").model
    cfg = ModelConfig(vocab_size=32000, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192)
    torch.manual_seed(0)
    model = Transformer(cfg, max_seq_len=1024).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    for layer in model.layers:
        layer.attention_norm.weight.data.fill_(1.0)
        layer.ffn_norm.weight.data.fill_(1.0)
    model.norm.weight.data.fill_(1.0)
    cpu_quant.quantize_linears(model)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,llama-1b")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for name in args.models.split(","):
        model = model_for(name)
        cfg = model.config
        cache = KVCache.for_model(cfg, 1, 1024, torch.float32, "cpu")
        tokens = torch.randint(0, cfg.vocab_size, (1, PREFIX + max(ROWS)), generator=torch.Generator().manual_seed(1))
        model(tokens[:, :PREFIX], torch.arange(PREFIX)[None], cache,
              AttentionSpec(torch.zeros(1, dtype=torch.long), causal_mask(PREFIX, "cpu"), PREFIX))
        prefix = torch.tensor([PREFIX])

        def forward(T):
            spec = AttentionSpec(prefix, causal_mask(T, "cpu"), PREFIX + T, decode=True)
            return model(tokens[:, PREFIX:PREFIX + T], torch.arange(PREFIX, PREFIX + T)[None], cache, spec)

        configs = [(b, T) for b in ("torch", "cpu") for T in ROWS]
        times = {c: [] for c in configs}
        for rep in range(args.reps + 1):
            for c in configs[rep % len(configs):] + configs[:rep % len(configs)]:
                with use_backend(c[0]):
                    # untimed forwards first, SETTLE_MS of them: right after other work a 4-bit step ran up to 1.4x
                    # slower on the AMX Xeon (speculation_check.SETTLE_MS); before 2026-12-07 every time here was
                    # taken right after another configuration's forward
                    began = time.perf_counter()
                    while time.perf_counter() - began < SETTLE_MS / 1e3:
                        forward(c[1])
                    t = time.perf_counter()
                    forward(c[1])
                    if rep:                       # the first round warms up
                        times[c].append((time.perf_counter() - t) * 1e3)
        for b, T in configs:
            ms = statistics.median(times[(b, T)])
            one = statistics.median(times[(b, 1)])
            rows.append({"model": name, "kernels": {"cpu": "cpu backend", "torch": "torch int4/int8"}[b], "rows": T,
                         "ms": ms, "x plain step": ms / one})
        print(md_table(rows[-len(configs):], ["model", "kernels", "rows", "ms", "x plain step"]), file=sys.stderr)
    meta = {"hardware": hardware("cpu"), "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "prefix": PREFIX,
            "what": "one target forward of T chain tokens with all logits (4-bit layers, int8 LM head, fp32 between)"}
    write_results("cpu_q4_verify_cost", rows, meta, md_table(rows, ["model", "kernels", "rows", "ms", "x plain step"]),
                  args.out)


if __name__ == "__main__":
    main()
