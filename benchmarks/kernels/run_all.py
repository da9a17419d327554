"""Runs every kernel microbenchmark in this folder and collects one table.

    python benchmarks/kernels/run_all.py                 # GPU: all shapes, writes benchmarks/results/kernels.*
    python benchmarks/kernels/run_all.py --quick --json /tmp/k.json    # CPU smoke run (< 60 s)

Every option of the single benchmarks applies (see _bench.parse_args). On a GPU without --quick the table
is also recorded in benchmarks/results/ as kernels_<card>.{json,md} with card and date (kernels_<card>_warm-l2.*
with --warm-l2, the timing before 2026-12-07, so that a comparison run leaves the cold-L2 table alone).
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench import COLS, Bench, emit, meta, parse_args, write_json  # noqa: E402

KERNELS = ["tree_attention", "head_attention", "fused_sal_input", "rmsnorm", "rope", "silu_mul", "linear", "quant_linear",
           "qkv_rope_write", "kv_write", "kv_compact", "greedy_accept", "typical_accept"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"kernel_bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    import torch
    args = parse_args("all kernel microbenchmarks", argv)
    bench = Bench(args)
    torch.manual_seed(0)
    rows, failed = [], []
    # The GPU suite stops this with SIGINT at its stage's time limit, and one benchmark's error must not cost
    # the others' rows: --json is rewritten after each benchmark, and a failing one is named and skipped.
    for name in KERNELS:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                rows += load(name).run(bench)
        except KeyboardInterrupt:
            print(f"# {name}: interrupted after {time.perf_counter() - t0:.1f}s; {len(rows)} rows kept",
                  file=sys.stderr)
            emit(rows, args, "kernel microbenchmarks (interrupted)", bench, failed + [f"{name}: interrupted"])
            return 130
        except Exception as err:           # noqa: BLE001 - recorded, and the exit status says so
            traceback.print_exc()
            failed.append(f"{name}: {type(err).__name__}: {err}"[:500])
        print(f"# {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        if bench.cuda:
            torch.cuda.empty_cache()
        if args.json:
            write_json(rows, args, bench, failed)
    emit(rows, args, "kernel microbenchmarks", bench, failed)
    if bench.cuda and not bench.quick:
        results = HERE.parent / "results"
        results.mkdir(exist_ok=True)
        card = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
        card += "" if bench.cold else "_warm-l2"
        m = meta(bench)
        (results / f"kernels_{card}.json").write_text(json.dumps({"meta": m, "rows": rows}, indent=1))
        cols = [c for c in COLS if any(c in r for r in rows)]
        lines = [f"# Kernel microbenchmarks, {m['device']}, {m['date']}", "",
                 *(f"- {k}: {v}" for k, v in m.items()), "",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
        (results / f"kernels_{card}.md").write_text("\n".join(lines) + "\n")
    if failed:
        print("run_all: failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
