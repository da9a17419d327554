"""Products with 4-bit layers and the int8 LM head (kernels/cpu_quant.py, CPU only): torch's int4 / int8 kernels
(the reference, bf16 activations) vs the cpu backend's (csrc/cpu/quant_matmul.h, int8 activations) for each
linear of a decoder layer and the LM head, at 1 row (plain decoding), 4 and 16 (trees) and 64 rows.

Bytes: the packed codes and scales (the cpu kernel's layout). A GPU run has no rows here.
"""
from __future__ import annotations

import torch

from _bench import main_for
from amphista_engine.kernels import cpu_quant, ops


def layer(cls, n: int, k: int, dtype):
    lin = torch.nn.Linear(k, n, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.02)
    lin = lin.to(dtype)
    lin.__class__ = cls
    lin._quantize()
    return lin


def run(bench):
    rows = []
    if bench.cuda or not cpu_quant.available():
        return rows
    for sh in bench.shapes:
        attn = sh.n_heads * sh.head_dim
        shapes = {"wqkv": (attn + 2 * sh.n_kv_heads * sh.head_dim, sh.d), "wo": (sh.d, attn),
                  "w13": (2 * sh.intermediate_size, sh.d), "w2": (sh.d, sh.intermediate_size),
                  "lm_head (int8)": (sh.vocab, sh.d)}
        for name, (n, k) in shapes.items():
            lin = layer(cpu_quant.Int8Linear if "int8" in name else cpu_quant.Int4Linear, n, k, bench.dtype)
            p = lin._packed_native
            nbytes = (p.codes.numel() + p.scales.numel() * p.scales.element_size()) if p is not None else n * k / 2
            for m in ((1, 4) if bench.quick else (1, 4, 16, 64)):
                x = torch.randn(m, k, dtype=bench.dtype)
                fn = lambda: ops.quant_linear(x, lin)
                rows += bench.compare("quant_linear", sh.name, f"{name} {n}x{k} M={m}", {"torch": fn, "cpu": fn},
                                      nbytes, 2.0 * m * n * k)
    return rows


if __name__ == "__main__":
    main_for(run, "quant_linear")
