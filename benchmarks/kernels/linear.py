"""The decode step's weight products at 1 and 4 rows: the few-row Triton GEMM against cuBLAS through torch
(the torch row), for each linear layer of a transformer block and the LM head. Weight-bound: GB/s counts the
weight bytes read once. The fused forms (ops.fused_linear: RMSNorm or SwiGLU in the prologue, the residual add
in the epilogue) are timed beside the same layer's unfused ops on each backend, at one row: a graphed decode
step with them (AMPHISTA_TRITON_LINEAR=1) measured 10.3 ms of GEMV on an H200 where the unfused GEMVs took 3.5
(benchmarks/results/gpu/h200_2026-12-04_suite), and these rows say which prologue or epilogue costs it."""
from __future__ import annotations

import torch

from _bench import linear_bytes, main_for
from amphista_engine.kernels import ops


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    for sh in bench.shapes:
        q, kv = sh.n_heads * sh.head_dim, sh.n_kv_heads * sh.head_dim
        layers = {"wqkv": (q + 2 * kv, sh.d), "wo": (sh.d, q), "w13": (2 * sh.intermediate_size, sh.d),
                  "w2": (sh.d, sh.intermediate_size), "lm_head": (sh.vocab, sh.d)}
        for name, (n, k) in layers.items():
            w = torch.randn(n, k, device=dev, dtype=dt) * k ** -0.5
            for m in ((1,) if bench.quick else (1, 4)):
                x = torch.randn(1, m, k, device=dev, dtype=dt)
                fn = lambda x=x, w=w: ops.linear(x, w)   # binds this w: the loop deletes it after
                rows += bench.compare("linear", sh.name, f"{name} {n}x{k} M={m}",
                                      {"torch": fn, "triton": fn, "cuda": fn}, esize * (n * k + m * (n + k)),
                                      flops=2 * m * n * k)
            if name in FUSED:
                rows += fused_rows(bench, sh.name, name, w)
            del w
    return rows


# layer -> (prologue, residual): how Block.forward_fused calls each of a block's linears
FUSED = {"wqkv": ("norm", False), "wo": (None, True), "w13": ("norm", False), "w2": ("silu", True)}


def fused_rows(bench, shape: str, name: str, w: torch.Tensor) -> list[dict]:
    n, k = w.shape
    prologue, residual = FUSED[name]
    dev, dt = w.device, w.dtype
    x = torch.randn(1, 1, 2 * k if prologue == "silu" else k, device=dev, dtype=dt)
    g = torch.rand(k, device=dev, dtype=dt) + 0.5 if prologue == "norm" else None
    r = torch.randn(1, 1, n, device=dev, dtype=dt) if residual else None
    fused = lambda: ops.fused_linear(x, w, g, 1e-5, silu=prologue == "silu", residual=r)

    def unfused():
        a = ops.rmsnorm(x, g, 1e-5) if prologue == "norm" else ops.silu_mul(x) if prologue == "silu" else x
        out = ops.linear(a, w)
        return out if r is None else r + out

    case = f"{name} {n}x{k} +{prologue or ''}{'+residual' if residual else ''} M=1".replace("++", "+")
    esize = w.element_size()
    return bench.compare("fused_linear", shape, case, {"torch": fused, "triton": fused, "cuda": fused,
                                                       "triton:unfused": unfused},
                         linear_bytes(esize, n, k, x.numel(), 1, g is not None, residual), flops=2 * n * k)


if __name__ == "__main__":
    main_for(run, "linear")
