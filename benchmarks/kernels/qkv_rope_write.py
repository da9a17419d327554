"""The cached attention's input: RoPE on q and k of the fused QKV output and the K/V cache write, one layer.
The triton:unfused row times the three launches it replaced (rope, rope, kv_write) on the same backend."""
from __future__ import annotations

import torch

from _bench import main_for
from amphista_engine.kernels import ops


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    for sh in bench.shapes:
        H, Hkv, D = sh.n_heads, sh.n_kv_heads, sh.head_dim
        S = max(bench.prefixes) + 256
        kb = torch.zeros(2, 1, Hkv, S, D, device=dev, dtype=dt)
        vb = torch.zeros_like(kb)
        start = torch.full((1,), max(bench.prefixes), device=dev)
        for T in ((64,) if bench.quick else (1, 64)):
            qkv = torch.randn(1, T, (H + 2 * Hkv) * D, device=dev, dtype=dt)
            rope_rows = torch.randn(1, T, D, device=dev)
            fn = lambda: ops.qkv_rope_write(qkv, rope_rows, kb, vb, 1, start, H, Hkv)
            q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)

            def unfused():                       # what Attention.forward launched before the fusion
                ops.rope(q.view(1, T, H, D), rope_rows)
                kr = ops.rope(k.view(1, T, Hkv, D), rope_rows).transpose(1, 2)
                ops.kv_write(kb, vb, 1, start, kr, v.view(1, T, Hkv, D).transpose(1, 2))

            # read q, k, v and the rope rows; write q and the two cache rows
            nbytes = esize * 2 * T * (H + 2 * Hkv) * D + 4 * T * D
            fns = {"torch": fn, "triton": fn, "cuda": fn, "triton:unfused": unfused}
            rows += bench.compare("qkv_rope_write", sh.name, f"T={T}", fns, nbytes)
    return rows


if __name__ == "__main__":
    main_for(run, "qkv_rope_write")
