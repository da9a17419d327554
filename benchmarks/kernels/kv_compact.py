"""KV compaction after acceptance: M accepted slots moved into place for every layer, K and V."""
from __future__ import annotations

import torch

from _bench import main_for
from amphista_engine.kernels import ops

M = 5            # mc_sim_7b_63: root + 4 accepted at most


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    for sh in bench.shapes:
        Hkv, D, L = sh.n_kv_heads, sh.head_dim, sh.n_layers
        P = max(bench.prefixes)
        for B in ((1,) if bench.quick else (1, 8)):
            kb = torch.zeros(L, B, Hkv, P + 128, D, device=dev, dtype=dt)
            vb = torch.zeros_like(kb)
            src = P + torch.tensor([[0, 1, 4, 13, 40]], device=dev).expand(B, M)
            dst = torch.full((B,), P, device=dev)
            def fn(kb=kb, vb=vb, src=src, dst=dst):    # bind now: the buffers are deleted after the row
                ops.kv_compact(kb, vb, src, dst)
            rows += bench.compare("kv_compact", sh.name, f"B={B} L={L} M={M}", {"torch": fn, "triton": fn, "cuda": fn},
                                  esize * 2 * 2 * L * B * Hkv * M * D)
            del kb, vb
    return rows


if __name__ == "__main__":
    main_for(run, "kv_compact")
