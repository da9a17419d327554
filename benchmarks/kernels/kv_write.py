"""KV-cache write of T new tokens' K and V at explicit slots (one layer)."""
from __future__ import annotations

import torch

from _bench import main_for
from amphista_engine.kernels import ops


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    for sh in bench.shapes:
        Hkv, D = sh.n_kv_heads, sh.head_dim
        S = max(bench.prefixes) + 256
        kb = torch.zeros(2, 1, Hkv, S, D, device=dev, dtype=dt)
        vb = torch.zeros_like(kb)
        for T in ((64,) if bench.quick else (1, 64)):
            k = torch.randn(1, T, Hkv, D, device=dev, dtype=dt).transpose(1, 2)
            v = torch.randn(1, T, Hkv, D, device=dev, dtype=dt).transpose(1, 2)
            start = torch.full((1,), max(bench.prefixes), device=dev)
            fn = lambda: ops.kv_write(kb, vb, 1, start, k, v)
            rows += bench.compare("kv_write", sh.name, f"T={T}", {"torch": fn, "triton": fn, "cuda": fn},
                                  esize * 2 * 2 * Hkv * T * D)
    return rows


if __name__ == "__main__":
    main_for(run, "kv_write")
