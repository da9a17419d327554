"""Greedy acceptance over the 64-node mc_sim_7b_63 tree: argmax of every node's logits + path selection."""
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
            logits = torch.randn(B, N, sh.vocab, device=dev, dtype=dt)
            tokens = torch.randint(0, sh.vocab, (B, N), device=dev)
            fn = lambda: ops.greedy_accept(tokens, logits, tree.retrieve)
            rows += bench.compare("greedy_accept", sh.name, f"B={B} N={N}", {"torch": fn, "triton": fn, "cuda": fn},
                                  esize * B * N * sh.vocab)
    return rows


if __name__ == "__main__":
    main_for(run, "greedy_accept")
