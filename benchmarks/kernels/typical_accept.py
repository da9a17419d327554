"""Typical acceptance over the 64-node tree: softmax statistics of every node + paths + bonus sample."""
from __future__ import annotations

import torch

from _bench import accept_cases, main_for
from amphista_engine.kernels import ops


def run(bench):
    rows = []
    esize = torch.tensor([], dtype=bench.dtype).element_size()
    for sh, case, tokens, logits, retrieve, B, N in accept_cases(bench, scale=3):
        fn = lambda: ops.typical_accept(tokens, logits, retrieve, 0.7)
        # two passes over the logits (statistics), the last node's row again for the bonus token, and its fp32
        # noise row, drawn (written) and read inside the call
        rows += bench.compare("typical_accept", sh.name, case, {"torch": fn, "triton": fn, "cuda": fn},
                              esize * (2 * N + 1) * B * sh.vocab + 2 * 4 * B * sh.vocab)
    return rows


if __name__ == "__main__":
    main_for(run, "typical_accept")
