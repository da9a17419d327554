"""A/B: target forwards over N rows on the CPU in fp32, F.linear vs oneDNN-packed fp32 weights.

Question: is the fp32 tree verification slow on the CPU because of MKL's small-M sgemm, and does packing the
weights for oneDNN once (what kernels/cpu_packed.py does for bf16) fix it? Result on the dev machine
(benchmarks/results/cpu_fp32_pack_ab.md): 0.98-1.24x, so the engine does not pack fp32 weights.

    OMP_NUM_THREADS=2 python benchmarks/cpu_fp32_pack_ab.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.model import AttentionSpec, causal_mask  # noqa: E402

mk = torch.ops.mkldnn
PREFIX = 300


class OneDNNLinear(nn.Linear):
    """fp32 weight reordered once for oneDNN; one row keeps F.linear (MKL's GEMV is faster there)."""

    def forward(self, x):
        if x.numel() == x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        return mk._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def make(pack: bool) -> Engine:
    e = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=1024)
    if pack:
        for m in e.model.modules():
            if type(m) is nn.Linear:
                m.__class__ = OneDNNLinear
                m._packed = mk._reorder_linear_weight(m.weight.detach(), 16)
    return e


def forward(e: Engine, n: int):
    """One target forward over n new tokens after a PREFIX-token cache (fixed tokens: both engines see the same)."""
    cache = e._cache_for(1)
    cache.length[:1] = PREFIX
    toks = torch.arange(n)[None] * 37 + 5
    pos = (PREFIX + torch.arange(n))[None]
    spec = AttentionSpec(cache.length[:1], causal_mask(n, "cpu"), 512)
    return e.model(toks, pos, cache, spec, return_hidden=True)


def main():
    torch.set_grad_enabled(False)
    engs = {"F.linear": make(False), "packed": make(True)}
    a, b = forward(engs["F.linear"], 8)[0], forward(engs["packed"], 8)[0]
    print("max rel diff logits", ((a - b).abs().max() / a.abs().max()).item())
    sizes, times = (1, 4, 8, 16, 32, 64), {}
    for _ in range(9):                     # interleaved, so drift hits both alike
        for n in sizes:
            for k, e in engs.items():
                t = time.perf_counter()
                forward(e, n)
                times.setdefault((k, n), []).append(time.perf_counter() - t)
    print("| N | F.linear | packed | ratio |\n|---|---|---|---|")
    for n in sizes:
        r, c = (sorted(times[(k, n)])[4] * 1e3 for k in engs)
        print(f"| {n} | {r:.1f} ms | {c:.1f} ms | {r / c:.2f}x |")


if __name__ == "__main__":
    main()
