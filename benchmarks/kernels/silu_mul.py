"""SwiGLU's activation silu(gate) * up over the fused gate | up projection of T tokens (FeedForward). The torch
row is what every backend ran before the kernel (F.silu, then the product: two launches)."""
from __future__ import annotations

import torch

from _bench import main_for
from amphista_engine.kernels import ops


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    for sh in bench.shapes:
        inter = sh.intermediate_size
        for T in ((64,) if bench.quick else (1, 64, 2048)):
            x = torch.randn(1, T, 2 * inter, device=dev, dtype=dt)
            fn = lambda: ops.silu_mul(x)
            rows += bench.compare("silu_mul", sh.name, f"T={T}", {"torch": fn, "triton": fn, "cuda": fn},
                                  esize * 3 * T * inter)
    return rows


if __name__ == "__main__":
    main_for(run, "silu_mul")
