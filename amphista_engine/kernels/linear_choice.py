"""Which GEMM runs a routed decode-step product on CUDA, the Triton kernel or cuBLAS: per weight shape and row
count, whichever measured faster on this GPU.

Neither wins everywhere. On an H200 (2026-12-04, benchmarks/results/gpu/h200_2026-12-04b_suite, kernels.json)
the kernel beat cuBLAS on the 7B layers: wo 1.21x, w2 1.12x, and a graphed decode step took 4.18 ms against 4.40.
It lost on the 13B ones (wqkv 0.81x) and on SmolLM2's LM head (49152x576: 0.66x). So under
AMPHISTA_TRITON_LINEAR=auto (the default), the first product of each (weight shape, dtype, rows <= 64) times
both in CUDA graphs of a few calls, alternating, and keeps the faster. The kernel must win by MARGIN: within
noise, cuBLAS. Over 16 rows (tree verification) the kernel takes the rows in 16-row blocks that share each
weight tile it loads (triton_kernels/linear.py, ROW_BLOCKS); cuBLAS reads the weights once there too, and which
is faster is untimed so far. The row-invariant products of the exact path (kernels/gpu_exact.py) never ask:
they need the kernel.

With programmatic dependent launch (the default on Hopper and newer, triton_kernels/common.py) the step's
Triton kernels overlap each other's start and end, and a cuBLAS product between two of them breaks that chain on
both sides. So there a tie goes to the kernel: cuBLAS must win by MARGIN. On an H100 (2026-12-05) the 7B step with
every product on the kernel and PDL took 5.18 ms; routed without PDL, ties to cuBLAS (w2 34.6 vs 34.7 us), it
took 5.37-5.45. The kernel is still timed without PDL: a graph of one product repeated is a chain of that
kernel alone, which PDL made up to 1.26x slower on the same H100 (w13) while the step it sits in gained.

Choices persist (timing_cache.py: linear_choices.json beside the CPU's step times; AMPHISTA_CACHE_DIR=off keeps
them in memory), keyed by GPU model and software versions. A process on the same machine then picks the same
GEMMs, so its output is the same bits: a near-tie shape would otherwise flip between runs.
A product first seen while a CUDA graph is being captured cannot be timed; it takes the kernel and is asked
again on the next eager call (decode loops warm every step up eagerly before capturing it).
"""
from __future__ import annotations

import functools
import statistics
import warnings

import torch
import torch.nn.functional as F

from .. import timing_cache
from . import backend, routed_linear     # (which imports this module: names are looked up at call time)

FILE = "linear_choices.json"
# Part of every key: bump it when the few-row kernel or its launch heuristics change, so choices measured
# against older code are measured again (1: 2026-12-04, ROW_BLOCKS and the 64-wide tiles' (128, 3) first).
REVISION = 1
MARGIN = 0.97         # the GEMM that wins must take less than this fraction of the other's time (else: a tie)
REPS, ROUNDS = 8, 5   # calls per graph, alternating replays per GEMM

_choices: dict[str, bool] | None = None    # key -> the kernel is faster; None: the file not read yet
_failed: dict[str, bool] = {}              # keys whose timing raised: cuBLAS, not saved


def kernel_for(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x @ w.T should go to the kernel backends (ops.linear) rather than straight to cuBLAS."""
    m = routed_linear.mode()
    rows = x.numel() // max(1, x.shape[-1])
    if m != "auto" or x.device.type != "cuda":
        return m != "off" and rows <= routed_linear.MAX_ROWS    # "on", or off CUDA: the few-row products
    if rows == 0 or rows > routed_linear.CHOICE_ROWS:
        return False
    served = backend.resolve("linear", x.device)
    if served == "torch":
        return False        # ops.linear would be cuBLAS too
    chained = served == "triton" and _pdl(x.device)
    return choose(f"{_key(w, rows)}|{served}" + ("|pdl" if chained else ""), lambda: measure(x, w),
                  prefer_kernel=chained)


def _pdl(device: torch.device) -> bool:
    from .triton_kernels.common import pdl
    return pdl(device)


def choose(key: str, timer, prefer_kernel: bool = False) -> bool:
    """The saved choice for `key`, else timer() -> (kernel ms, cuBLAS ms) decides it and it is saved. A tie (within
    MARGIN) goes to cuBLAS, or with prefer_kernel (its calls chained by PDL) to the kernel."""
    choices = _load()
    hit = choices.get(key, _failed.get(key))
    if hit is not None:
        return hit
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    try:
        kernel_ms, cublas_ms = timer()
    except Exception as e:   # never fail a forward over a timing: cuBLAS for this process, nothing saved
        warnings.warn(f"linear_choice: timing {key} failed ({type(e).__name__}: {e}); using cuBLAS", stacklevel=3)
        _failed[key] = False
        return False
    choices[key] = bool(cublas_ms >= MARGIN * kernel_ms if prefer_kernel else kernel_ms < MARGIN * cublas_ms)
    _save(choices)
    return choices[key]


def measure(x: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """(kernel ms, cuBLAS ms) per call of x @ w.T: medians over ROUNDS alternating replays of a graph of REPS
    calls each, on a copy of x (launch overhead out, as in a graphed decode step)."""
    from . import ops
    xs = x.detach().reshape(-1, x.shape[-1]).clone()
    blocks = xs.shape[0] > routed_linear.MAX_ROWS          # as RoutedLinear calls it
    with backend.without_pdl():       # captured without PDL: chained to itself it says nothing of the step
        graphs = [_graph(lambda: ops.linear(xs, w, batch_invariant=blocks)), _graph(lambda: F.linear(xs, w))]
    times = [[], []]
    for _ in range(ROUNDS):
        for g, t in zip(graphs, times):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            t.append(start.elapsed_time(end) / REPS)
    return statistics.median(times[0]), statistics.median(times[1])


def _graph(fn) -> "torch.cuda.CUDAGraph":
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()                                  # compiles / picks the kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    return g


def _key(w: torch.Tensor, rows: int) -> str:
    return _shape_key(w.device.index, w.dtype, w.shape[0], w.shape[1], rows)


@functools.cache              # asked on every routed product of an eager step: built once per shape
def _shape_key(index, dtype: torch.dtype, n: int, k: int, rows: int) -> str:
    import triton
    return (f"{torch.cuda.get_device_name(index)}|torch {torch.__version__}|triton {triton.__version__}|"
            f"revision {REVISION}|{str(dtype)[6:]}|{n}x{k}|rows {rows}")


def _load() -> dict[str, bool]:
    global _choices
    if _choices is None:
        file = timing_cache.path(FILE)
        _choices = {k: v for k, v in (timing_cache.read(file) if file else {}).items() if isinstance(v, bool)}
    return _choices


def _save(choices: dict[str, bool]) -> None:
    file = timing_cache.path(FILE)
    if file is not None:
        timing_cache.write(file, choices)


def clear() -> None:
    """Forget the choices held in memory (the file is read again on the next product)."""
    global _choices
    _choices = None
    _failed.clear()
