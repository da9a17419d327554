"""RoPE at explicit positions on the query heads of T tokens (x is a strided view of the fused QKV output)."""
from __future__ import annotations

import torch

from _bench import main_for
from amphista_engine.kernels import ops


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    for sh in bench.shapes:
        H, Hkv, D = sh.n_heads, sh.n_kv_heads, sh.head_dim
        for T in ((64,) if bench.quick else (1, 64, 2048)):
            qkv = torch.randn(1, T, (H + 2 * Hkv) * D, device=dev, dtype=dt)
            q = qkv[..., :H * D].view(1, T, H, D)
            rows_ = torch.randn(1, T, D, device=dev)
            fn = lambda: ops.rope(q, rows_)
            rows += bench.compare("rope", sh.name, f"T={T}", {"torch": fn, "triton": fn, "cuda": fn},
                                  esize * 2 * T * H * D + 4 * T * D)
    return rows


if __name__ == "__main__":
    main_for(run, "rope")
