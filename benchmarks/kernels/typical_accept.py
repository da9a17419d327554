"""Typical acceptance over the 64-node tree: softmax statistics of every node + paths + bonus sample."""
from __future__ import annotations

import torch

from _bench import main_for
from amphista_engine.kernels import ops
from amphista_engine.tree import build_tree


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    tree = build_tree("mc_sim_7b_63").to(dev)
    N = tree.num_nodes
    for sh in bench.shapes:
        for B in ((1,) if bench.quick else (1, 8)):
            logits = torch.randn(B, N, sh.vocab, device=dev, dtype=dt) * 3
            tokens = torch.randint(0, sh.vocab, (B, N), device=dev)
            fn = lambda: ops.typical_accept(tokens, logits, tree.retrieve, 0.7)
            # two passes over the logits (statistics), the noise row and the last node's row
            rows += bench.compare("typical_accept", sh.name, f"B={B} N={N}", {"torch": fn, "triton": fn, "cuda": fn},
                                  esize * 2 * B * N * sh.vocab + 4 * B * sh.vocab)
    return rows


if __name__ == "__main__":
    main_for(run, "typical_accept")
