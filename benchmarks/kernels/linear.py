"""The decode step's weight products at 1 and 4 rows: the few-row Triton GEMM against cuBLAS through torch
(the torch row), for each linear layer of a transformer block and the LM head. Weight-bound: GB/s counts the
weight bytes read once."""
from __future__ import annotations

import torch

from _bench import main_for
from amphista_engine.kernels import ops


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    for sh in bench.shapes:
        q, kv = sh.n_heads * sh.head_dim, sh.n_kv_heads * sh.head_dim
        layers = {"wqkv": (q + 2 * kv, sh.d), "wo": (sh.d, q), "w13": (2 * sh.intermediate_size, sh.d),
                  "w2": (sh.d, sh.intermediate_size), "lm_head": (sh.vocab, sh.d)}
        for name, (n, k) in layers.items():
            w = torch.randn(n, k, device=dev, dtype=dt) * k ** -0.5
            for m in ((1,) if bench.quick else (1, 4)):
                x = torch.randn(1, m, k, device=dev, dtype=dt)
                fn = lambda x=x, w=w: ops.linear(x, w)   # binds this w: the loop deletes it after
                rows += bench.compare("linear", sh.name, f"{name} {n}x{k} M={m}",
                                      {"torch": fn, "triton": fn, "cuda": fn}, esize * (n * k + m * (n + k)),
                                      flops=2 * m * n * k)
            del w
    return rows


if __name__ == "__main__":
    main_for(run, "linear")
