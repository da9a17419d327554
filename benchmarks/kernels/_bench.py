"""Shared pieces of the kernel microbenchmarks: model shapes, timing, device ceilings, the command line.

Timing on CUDA, cold L2 (the default since 2026-12-07, as triton.testing.do_bench): one call is captured into a
CUDA graph; before each of `reps` replays a buffer of at least 4x the L2 (>= 256 MiB) is written, and each replay
alone is timed by CUDA events; the median is the kernel time without Python launch overhead (what a
graph-captured decode step pays: the flush keeps the GPU busy while the host queues the replay). In a decode step
a layer's weights and K/V were evicted by the other layers' traffic, so inputs replayed back to back, which stay
in L2 (H100 50 MB, H200 60 MB), overstated bandwidth: 144% of the copy ceiling for a same-bytes copy at prefix
1024, 132% for the 7B `wo` linear. --warm-l2 restores that older timing, for comparison with the rows before
2026-12-07: `iters` calls captured into one graph, replayed `reps` times, median replay / iters. Every row and
the JSON meta record the mode ("l2"). `eager_us` is the median of single eager calls timed by events, Python
dispatch and launch included (what an uncaptured step pays), after the same flush unless --warm-l2. On the CPU
only wall clock is available and nothing is flushed (rows say "l2": "n/a").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from amphista_engine.kernels import backend, ops, use_backend  # noqa: E402

# A kernel's own row times it launched alone, as before PDL became the decode step's default on Hopper: its
# ":pdl" variants (with_pdl) time it chained to itself. AMPHISTA_PDL set by the caller is kept.
os.environ.setdefault(backend.PDL_ENV, "0")


@dataclass(frozen=True)
class Shape:
    name: str
    d: int           # model width
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    n_layers: int
    intermediate_size: int   # the MLP's width (SwiGLU gate and up are each this wide)


SHAPES = {
    "llama-7b": Shape("llama-7b", 4096, 32, 32, 128, 32000, 32, 11008),
    "llama-13b": Shape("llama-13b", 5120, 40, 40, 128, 32000, 40, 13824),
    "smollm2-135m": Shape("smollm2-135m", 576, 9, 3, 64, 49152, 30, 1536),
}
TINY = Shape("tiny", 256, 4, 2, 64, 512, 2, 512)          # --quick: checks that the scripts run, nothing more
PREFIXES = (128, 512, 1024, 2048, 4096)
QUICK_PREFIXES = (128,)


def linear_bytes(esize: int, n: int, k: int, x_numel: int, rows: int, norm: bool = False,
                 residual: bool = False) -> int:
    """Bytes one (fused) product y [rows, n] = a(x) @ w.T (+ residual) moves: w [n, k] once, x, the RMSNorm
    prologue's weight, the residual read and y written. The residual and the norm weight only where the call
    has them: counting 2 * n * rows for every call overstated the bare 64-row GB/s by 1.5% (7B w13)."""
    return esize * (n * k + x_numel + norm * k + (1 + residual) * n * rows)


def with_pdl(fn):
    """fn with AMPHISTA_PDL=1 around each call: the Triton kernels it launches (also into a CUDA graph being
    captured) use programmatic dependent launch, so back-to-back calls overlap one's start with the last one's
    end, as consecutive kernels of a decode step would (triton_kernels/common.py)."""
    from amphista_engine.evaluation.env import env_var

    def call():
        with env_var(backend.PDL_ENV, "1"):
            return fn()
    return call


def parse_args(description: str, argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (CPU smoke run)")
    ap.add_argument("--json", type=Path, help="write the result rows here")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--prefixes", default=",".join(map(str, PREFIXES)), help="prefix lengths")
    ap.add_argument("--backends", default="", type=_backend_list,
                    help="comma-separated subset of torch,triton,cuda,cpu (default: all that run here; on a CPU: "
                         "torch and cpu; triton there only with TRITON_INTERPRET=1)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--reps", type=int, default=0, help="timed repeats (default 50 on GPU, 3 with --quick)")
    ap.add_argument("--warm-l2", action="store_true",
                    help="GPU: replay the inputs back to back without flushing L2 between calls (the timing before "
                         "2026-12-07; inputs that fit in L2 overstate GB/s); no effect on a CPU")
    return ap.parse_args(argv)


def _backend_list(text: str) -> str:
    """--backends checked at parse time: a misspelt name failed once per benchmark, deep in its traceback."""
    from amphista_engine.errors import ConfigError
    try:
        return ",".join(backend._check(b, "--backends") for b in text.split(",") if b.strip())
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _backend_of(name: str) -> str | None:
    """The backend a row's name runs under: "triton", or "triton:unfused" (the same backend timing the op
    sequence a fused kernel replaced, side by side with it); None for a non-backend baseline ("sdpa")."""
    be = name.split(":", 1)[0]
    return be if be in ("torch", "triton", "cuda", "cpu") else None


class Bench:
    """Run context: device, dtype, shapes, backends and timing settings from the command line."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, args.dtype)
        self.quick = args.quick
        self.shapes = [TINY] if self.quick else [SHAPES[s] for s in args.shapes.split(",") if s]
        self.prefixes = QUICK_PREFIXES if self.quick else tuple(int(p) for p in args.prefixes.split(",") if p)
        self.reps = args.reps or (3 if self.quick else 50)
        self.iters = 1 if self.quick else 20
        self.backends = self._backends(args.backends)
        self.cold = self.cuda and not getattr(args, "warm_l2", False)
        self._flush_buf = None
        self._ceiling = None
        self._served: dict[tuple[str, str], bool] = {}
        if not self.cuda:
            torch.set_num_threads(1)          # tiny CPU ops: thread wake-ups would dominate the timings

    def _backends(self, wanted: str) -> list[str]:
        if wanted:
            # A backend that cannot run on this device falls back to another one's code: its rows would time that
            # code under its name (e.g. "triton" on a CPU without the interpreter timed torch's ops).
            names = []
            for b in dict.fromkeys(b for b in wanted.split(",") if b):
                with use_backend(b):
                    why = backend.unmet_choice(self.device)
                if why is None:
                    names.append(b)
                else:
                    print(f"# --backends {b}: {why}; its rows are left out", file=sys.stderr)
            if not names:
                raise SystemExit(f"--backends {wanted}: none of them runs on {self.device.type} here")
            return names
        if not self.cuda:          # compiled Triton needs a GPU; the interpreter would time Python
            return ["torch"] + (["cpu"] if backend.cpu_available() else [])
        names = ["torch"]
        if backend.triton_available():
            names.append("triton")
        if backend.cuda_available():
            names.append("cuda")
        return names

    # ---- timing ------------------------------------------------------------------------------------
    def time_us(self, fn, name: str) -> tuple[float, float]:
        """(graph_us, eager_us) per call of fn() under backend `name`; graph_us = eager_us on the CPU."""
        with use_backend(name):
            if not self.cuda:
                fn()
                times = []
                for _ in range(self.reps):
                    t = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t) * 1e6)
                us = statistics.median(times)
                return us, us
            return self._graph_us(fn), self._eager_us(fn)

    @property
    def l2_mode(self) -> str:
        """What the rows' "l2" says: "cold" (flushed before each timed call), "warm" (--warm-l2), "n/a" (CPU)."""
        return "n/a" if not self.cuda else "cold" if self.cold else "warm"

    def flush_bytes(self) -> int:
        """The flush buffer's size: 4x this GPU's L2 where torch reports it, 256 MiB at least (do_bench's)."""
        l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) if self.cuda else 0
        return max(256 * 2**20, 4 * l2)

    def flush_l2(self) -> None:
        """Evicts the inputs of the last call from L2 by writing a buffer several times its size."""
        if self._flush_buf is None:
            self._flush_buf = torch.empty(self.flush_bytes(), dtype=torch.uint8, device=self.device)
        self._flush_buf.zero_()

    # Seams the CPU tests replace with fakes (no CUDA there).
    def _event(self):
        return torch.cuda.Event(enable_timing=True)

    def _sync(self) -> None:
        torch.cuda.synchronize()

    def _cold_us(self, call, host_idle: bool = False) -> float:
        """Median device time of `call`, L2 flushed before each call and each call timed alone. Without
        host_idle the host queues the events and the call while the flush runs, so launch overhead stays out; with
        it (eager timing) the device idles after the flush and the host's dispatch counts, as in _eager_us."""
        pairs = []
        for _ in range(self.reps):
            self.flush_l2()
            if host_idle:
                self._sync()
            start, end = self._event(), self._event()
            start.record()
            call()
            end.record()
            pairs.append((start, end))
        self._sync()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in pairs)

    def _eager_us(self, fn) -> float:
        for _ in range(3):
            fn()
        if self.cold:
            return self._cold_us(fn, host_idle=True)
        start, end = self._event(), self._event()
        times = []
        for _ in range(self.reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    def _capture(self, fn, calls: int):
        """A CUDA graph of `calls` calls of fn (warmed up, so Triton compiles off the capture), or None where the
        capture fails (an op that syncs or allocates oddly)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
        except Exception:
            self._sync()
            return None
        return graph

    def _graph_us(self, fn) -> float:
        # Cold: one call a graph, the flush between replays; a graph of several calls would time all but the
        # first with their inputs in L2.
        graph = self._capture(fn, 1 if self.cold else self.iters)
        if graph is None:
            return self._loop_us(fn)
        graph.replay()
        if self.cold:
            return self._cold_us(graph.replay)
        start, end = self._event(), self._event()
        times = []
        for _ in range(self.reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / self.iters)
        return statistics.median(times)

    def _loop_us(self, fn, cold: bool | None = None) -> float:
        if self.cold if cold is None else cold:
            return self._cold_us(fn)
        start, end = self._event(), self._event()
        times = []
        for _ in range(self.reps):
            start.record()
            for _ in range(self.iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / self.iters)
        return statistics.median(times)

    # ---- ceilings ----------------------------------------------------------------------------------
    def copy_bandwidth_gbs(self) -> float:
        """Measured device memory bandwidth: a large device-to-device copy (read + write bytes / time).
        On a GPU it needs no flush in either L2 mode: source and destination (1 GiB each; --quick: the flush size,
        >= 4x L2) are far larger than L2, so back-to-back copies find none of their bytes there. --quick used
        16 MiB before 2026-12-07, which fits in L2: a quick GPU run's ceiling was L2's, not DRAM's."""
        if self._ceiling is None:
            n = (1024 * 2**20 if not self.quick else self.flush_bytes()) if self.cuda else 16 * 2**20
            src = torch.empty(n, dtype=torch.uint8, device=self.device)
            dst = torch.empty_like(src)
            fn = lambda: dst.copy_(src)
            us = self._loop_us(fn, cold=False) if self.cuda else self.time_us(fn, "torch")[0]
            self._ceiling = 2 * n / (us * 1e-6) / 1e9
            del src, dst
        return self._ceiling

    def row(self, kernel: str, shape: str, case: str, name: str, fn, bytes_moved: float, flops: float = 0.0,
            baseline_us: float | None = None) -> dict:
        be = _backend_of(name)
        us, eager = self.time_us(fn, be) if be else self._other(fn)
        gbs = bytes_moved / (us * 1e-6) / 1e9
        r = {"kernel": kernel, "shape": shape, "case": case, "backend": name, "ms": us / 1e3, "us": round(us, 2),
             "eager_us": round(eager, 2), "GB/s": round(gbs, 1),
             "%bw": round(100 * gbs / self.copy_bandwidth_gbs(), 1), "l2": self.l2_mode}
        if name.startswith("copy:"):          # a bandwidth yardstick: it does none of the kernel's math
            return r
        if flops:
            r["TFLOP/s"] = round(flops / (us * 1e-6) / 1e12, 2)
        if baseline_us:
            r["speedup_vs_torch"] = round(baseline_us / us, 2)
        return r

    def serves(self, name: str, kernel: str) -> bool:
        """Whether backend `name` has its own kernel for op `kernel` here. Where it lacks one, the op falls back down
        the chain (cpu -> torch, cuda -> triton): a row under its name timed the other backend's code, with a
        speedup that was only noise (the cpu backend's head_attention or typical_accept "faster" than torch).
        Variants ("triton:unfused") and ops that are not one of kernels.ops' always run."""
        if name not in backend.BACKENDS or name == "torch" or not hasattr(ops, kernel):
            return True
        key = (name, kernel)
        if key not in self._served:
            with use_backend(name):
                self._served[key] = backend.resolve(kernel, self.device) == name
            if not self._served[key]:
                print(f"# {kernel}: the {name} backend has no kernel for it here (the op falls back down its chain); "
                      f"its {name} rows are left out", file=sys.stderr)
        return self._served[key]

    def _other(self, fn):
        """A non-backend baseline (e.g. SDPA): timed like the torch backend."""
        return self.time_us(fn, "torch")

    def compare(self, kernel: str, shape: str, case: str, fns: dict, bytes_moved: float, flops: float = 0.0):
        """Rows for each backend (+ extra baselines in fns), with speedups against the torch reference."""
        rows, base = [], None
        if "cpu" not in fns and "cuda" in fns:
            fns = {**fns, "cpu": fns["cuda"]}          # the kernels' call (ops it lacks run the reference there)
        for name, fn in fns.items():
            if _backend_of(name) and _backend_of(name) not in self.backends:
                continue                               # baselines (e.g. "sdpa") always run
            if not self.serves(name, kernel):
                continue
            r = self.row(kernel, shape, case, name, fn, bytes_moved, flops, base)
            if name == "torch":
                base = r["us"]
            rows.append(r)
        return rows


def accept_cases(bench: "Bench", scale: float = 1.0):
    """The acceptance kernels' inputs over the 64-node mc_sim_7b_63 tree, for every model shape and batch size:
    (shape, case name, tokens [B, N], logits [B, N, vocab] drawn N(0, scale^2), retrieve, B, N)."""
    from amphista_engine.tree import build_tree
    dev, dt = bench.device, bench.dtype
    tree = build_tree("mc_sim_7b_63").to(dev)
    N = tree.num_nodes
    for sh in bench.shapes:
        for B in ((1,) if bench.quick else (1, 8)):
            logits = torch.randn(B, N, sh.vocab, device=dev, dtype=dt)
            if scale != 1.0:
                logits = logits * scale
            tokens = torch.randint(0, sh.vocab, (B, N), device=dev)
            yield sh, f"B={B} N={N}", tokens, logits, tree.retrieve, B, N


COLS = ["kernel", "shape", "case", "backend", "us", "eager_us", "GB/s", "%bw", "TFLOP/s", "speedup_vs_torch", "l2"]


def emit(rows: list[dict], args: argparse.Namespace, title: str, bench: "Bench | None" = None,
         errors: list[str] | None = None) -> None:
    """Print a table; write the rows as JSON (with the device and its measured ceiling) if --json."""
    cols = [c for c in COLS if any(c in r for r in rows)]
    print(f"## {title}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if args.json:
        write_json(rows, args, bench, errors)


def write_json(rows: list[dict], args: argparse.Namespace, bench: "Bench | None" = None,
               errors: list[str] | None = None) -> None:
    """--json's file: the rows so far, the run's meta and, where some benchmark failed or was cut short, why."""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta(bench), "rows": rows, **({"errors": errors} if errors else {})}
    args.json.write_text(json.dumps(doc, indent=1))


def meta(bench: "Bench | None") -> dict:
    from datetime import date
    m = {"date": str(date.today()), "torch": torch.__version__}
    try:
        import triton
        m["triton"] = triton.__version__
    except Exception:
        pass
    if bench is not None:
        m["device"] = torch.cuda.get_device_name() if bench.cuda else "cpu"
        m["dtype"] = str(bench.dtype).removeprefix("torch.")
        m["copy_bandwidth_GBs"] = round(bench.copy_bandwidth_gbs(), 1)
        m["quick"] = bench.quick
        m["l2"] = bench.l2_mode
        if bench.cold:
            m["timing"] = ("CUDA graph of 1 call, median of %d replays, each after writing %d MiB (cold L2)"
                           % (bench.reps, bench.flush_bytes() // 2**20))
        elif bench.cuda:
            m["timing"] = "CUDA graph of %d calls, median of %d replays (warm L2: inputs replayed back to back)" \
                % (bench.iters, bench.reps)
        else:
            m["timing"] = "wall clock, median of %d" % bench.reps
    return m


def main_for(module_run, description: str, argv=None) -> list[dict]:
    args = parse_args(description, argv)
    bench = Bench(args)
    torch.manual_seed(0)
    with torch.inference_mode():
        rows = module_run(bench)
    emit(rows, args, description, bench)
    return rows
