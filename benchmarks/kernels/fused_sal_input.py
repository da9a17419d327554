"""Amphista fusion input u = W_fuse [h ; E(x)] for the positions accepted in one step (M rows).
Bytes are dominated by W_fuse [d, 2d]."""
from __future__ import annotations

import torch

from _bench import main_for
from amphista_engine.kernels import ops


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    for sh in bench.shapes:
        d = sh.d
        for B, M in (((1, 5),) if bench.quick else ((1, 1), (1, 5), (8, 5))):
            hidden = torch.randn(B, M, d, device=dev, dtype=dt)
            tokens = torch.randint(0, sh.vocab, (B, M), device=dev)
            emb = torch.randn(sh.vocab, d, device=dev, dtype=dt)
            w = torch.randn(d, 2 * d, device=dev, dtype=dt) * (2 * d) ** -0.5
            fn = lambda: ops.fused_sal_input(hidden, tokens, emb, w)
            nbytes = esize * (2 * d * d + 3 * B * M * d)
            rows += bench.compare("fused_sal_input", sh.name, f"B={B} M={M}", {"torch": fn, "triton": fn, "cuda": fn},
                                  nbytes, 2 * B * M * 2 * d * d)
    return rows


if __name__ == "__main__":
    main_for(run, "fused_sal_input")
