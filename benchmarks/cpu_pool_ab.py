"""The CPU kernels on the extension's own pool against OpenMP, on a quiet machine and beside busy processes.

A 4-bit engine's decode steps run the `cpu` backend's kernels on csrc/cpu/thread_pool.h (kernels/cpu_threads.py):
the calling thread takes over the chunks of a worker that has not started. This times the same decoder's steps
both ways in one process, in alternating blocks (median step time; a noisy VM's drifts fall on both):

- `own`: the default for these engines (torch's ops on one thread for the step, the kernels on the pool);
- `omp`: OpenMP's threads shared with torch (AMPHISTA_CPU_POOL=omp, the behaviour before the pool);
- `one thread`: everything on the calling thread (what a busy machine needed before).

`--busy N` starts N spinning processes beside it first (each takes a core while it runs).

    OMP_NUM_THREADS=2 python benchmarks/cpu_pool_ab.py [--busy 1] [--blocks 6] [--steps 40]
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.sampling import SamplingParams  # noqa: E402
from benchmarks.common import hardware, md_table, write_results  # noqa: E402

PROMPT = "Write a short story about a robot learning to paint."
WARMUP = 5          # steps of each block not timed
ARMS = ("own", "omp", "one thread")


def time_arms(engine, speculative, blocks: int, steps: int) -> dict:
    tree = None if speculative is None else "mix-4"
    dec = engine._decoder(1, SamplingParams(), speculative, tree, None if speculative is None else "greedy")[0]
    prompt = engine.encode_prompt(PROMPT)
    threads = torch.get_num_threads()
    times = {a: [] for a in ARMS}
    for block in range(blocks):
        for arm in ARMS if block % 2 == 0 else ARMS[::-1]:
            dec._runs_on_pool = arm == "own"            # decided once per decoder; set here for the A/B
            torch.set_num_threads(1 if arm == "one thread" else threads)
            try:
                dec.prefill([prompt])
                for i in range(steps):
                    t = time.perf_counter()
                    dec.step()[1].tolist()
                    if i >= WARMUP:
                        times[arm].append(time.perf_counter() - t)
            finally:
                torch.set_num_threads(threads)
    return {a: statistics.median(v) * 1e3 for a, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=0, help="spinning processes to run beside it")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=None, help="results name (default: cpu_pool_ab[_busyN])")
    args = ap.parse_args()
    if args.steps <= WARMUP or args.blocks < 1:     # else a StatisticsError after loading the model
        ap.error(f"--steps must be more than {WARMUP} (each block's first {WARMUP} are warm-up) and --blocks >= 1")
    torch.set_grad_enabled(False)
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=1024, heads="default")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        rows = []
        for spec in (None, "amphista"):
            ms = time_arms(engine, spec, args.blocks, args.steps)
            rows.append({"decoding": "plain" if spec is None else "amphista mix-4",
                         **{f"{a} ms/step": ms[a] for a in ARMS},
                         "omp / own": ms["omp"] / ms["own"], "one thread / own": ms["one thread"] / ms["own"]})
    finally:
        for p in busy:
            p.kill()
    cols = list(rows[0])
    meta = {"hardware": hardware("cpu"), "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "busy processes beside it": args.busy,
            "model": "smollm2-135m (GGUF Q4_1), quant auto (4-bit layers, int8 LM head), shipped amphista heads",
            "what": f"median step time over {args.blocks} alternating blocks of {args.steps} steps (first {WARMUP} of "
                    "each block dropped), greedy, one decoder"}
    write_results(args.out or ("cpu_pool_ab" + (f"_busy{args.busy}" if args.busy else "")), rows, meta,
                  md_table(rows, cols))


if __name__ == "__main__":
    main()
