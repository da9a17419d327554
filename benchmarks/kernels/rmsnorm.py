"""Fused RMSNorm (and add + RMSNorm) over rows of width d: 64 rows (a verified tree) and 2048 (prefill)."""
from __future__ import annotations

import torch

from _bench import main_for
from amphista_engine.kernels import ops


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    for sh in bench.shapes:
        d = sh.d
        for n in ((64,) if bench.quick else (1, 64, 2048)):
            x = torch.randn(n, d, device=dev, dtype=dt)
            res = torch.randn(n, d, device=dev, dtype=dt)
            w = torch.randn(d, device=dev, dtype=dt)
            fn = lambda: ops.rmsnorm(x, w, 1e-5)
            rows += bench.compare("rmsnorm", sh.name, f"rows={n}", {"torch": fn, "triton": fn, "cuda": fn},
                                  esize * (2 * n * d + d))
            fn2 = lambda: ops.add_rmsnorm(x, res, w, 1e-5)
            unfused = lambda: ops.rmsnorm(x + res, w, 1e-5)        # the model's add, then its norm
            rows += bench.compare("add_rmsnorm", sh.name, f"rows={n}",
                                  {"torch": fn2, "triton": fn2, "cuda": fn2, "triton:unfused": unfused},
                                  esize * (4 * n * d + d))
    return rows


if __name__ == "__main__":
    main_for(run, "rmsnorm")
