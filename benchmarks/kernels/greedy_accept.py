"""Greedy acceptance over the 64-node mc_sim_7b_63 tree: argmax of every node's logits + path selection."""
from __future__ import annotations

import torch

from _bench import accept_cases, main_for
from amphista_engine.kernels import ops


def run(bench):
    rows = []
    esize = torch.tensor([], dtype=bench.dtype).element_size()
    for sh, case, tokens, logits, retrieve, B, N in accept_cases(bench):
        fn = lambda: ops.greedy_accept(tokens, logits, retrieve)
        rows += bench.compare("greedy_accept", sh.name, case, {"torch": fn, "triton": fn, "cuda": fn},
                              esize * B * N * sh.vocab)
    return rows


if __name__ == "__main__":
    main_for(run, "greedy_accept")
