"""AEB attention (pos-emb add + RMSNorm + QKV projection + bi-directional attention over K = 4 slots).
Bytes are dominated by the [3d, d] QKV weight, read once per call."""
from __future__ import annotations

import torch

from _bench import main_for
from amphista_engine.kernels import ops

K = 4


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    for sh in bench.shapes:
        d = sh.d
        for N in ((1,) if bench.quick else (1, 8)):
            z = torch.randn(N, K, d, device=dev, dtype=dt)
            pos = torch.randn(K, d, device=dev, dtype=dt)
            w = torch.ones(d, device=dev, dtype=dt)
            wqkv = torch.randn(3 * d, d, device=dev, dtype=dt) * d ** -0.5
            fn = lambda: ops.head_attention(z, pos, w, 1e-5, wqkv, sh.n_heads)
            nbytes = esize * (3 * d * d + 2 * N * K * d + K * d + 4 * N * K * d)
            rows += bench.compare("head_attention", sh.name, f"N={N} K={K}", {"torch": fn, "triton": fn, "cuda": fn},
                                  nbytes, 2 * N * K * d * 3 * d)
    return rows


if __name__ == "__main__":
    main_for(run, "head_attention")
