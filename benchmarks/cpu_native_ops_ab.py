"""The `cpu` kernel backend (csrc/cpu: RMSNorm with the residual add, RoPE with the cache write, KV compaction and
tree attention as single C++ calls) against the torch reference ops, end to end on the CPU.

`--backends` picks what runs side by side: `torch`, `cpu`, `cpu-flash` (the cpu backend without its
attention kernel: decode steps then take kernels/cpu_exact.py's layout around torch's flash attention, as the
cpu backend did before it had one), and `cpu-torchmm` (the cpu backend without its 4-bit / 8-bit products: torch's
int4 and int8 kernels instead, the model's Python layer loop and the heads' float draft scores, as before
csrc/cpu/quant_matmul.h and decoder.h).

Both backends run in one process on the same engines, question by question in a rotating order. Their answers
may differ from each other after a near-tie (the RMSNorm sums in another order, and the 4-bit path rounds every
matmul input to bf16), so the table counts how many equal the other backend's; within a backend, speculative
greedy answers must equal that backend's plain ones.

    OMP_NUM_THREADS=2 python benchmarks/cpu_native_ops_ab.py [--engines q4,bf16] [--trees mix-4] [--questions 16]
        [--backends torch,cpu]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.evaluation.questions import read_questions  # noqa: E402
from amphista_engine.kernels import backend, cpu_ops, use_backend  # noqa: E402
from amphista_engine.shipped_heads import shipped_heads  # noqa: E402
from benchmarks.common import ab_parser, engines_here, hardware, md_table, rotating_runs, write_results  # noqa: E402

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"
# what each cpu-backend variant runs without (the dispatcher then falls through to the torch reference)
DROPPED = {"cpu": (), "cpu-flash": ("tree_attention",), "cpu-torchmm": ("quant_linear",)}
NATIVE = {op: getattr(cpu_ops, op) for ops in DROPPED.values() for op in ops}


def _use(which: str):
    """The backend name for use_backend, with the cpu backend's ops set up for the variant `which`."""
    for op, fn in NATIVE.items():
        if op in DROPPED.get(which, ()):
            if hasattr(cpu_ops, op):
                delattr(cpu_ops, op)
        else:
            setattr(cpu_ops, op, fn)
    return "cpu" if which in DROPPED else which


def main():
    ap = ab_parser(__doc__)
    ap.add_argument("--engines", default="q4,bf16", help="q4 (4-bit layers, fp32 between), bf16 (dequantized)")
    ap.add_argument("--backends", default="torch,cpu",
                    help="two of torch, cpu, cpu-flash, cpu-torchmm; the first is the baseline")
    ap.add_argument("--name", default="cpu_native_ops_ab")
    args = ap.parse_args()
    kinds = args.backends.split(",")
    if len(kinds) != 2 or not set(kinds) <= {"torch", *DROPPED}:
        sys.exit(f"--backends: two of torch, {', '.join(DROPPED)}, got {args.backends!r}")
    base = kinds[0]
    if not backend.cpu_available():
        from amphista_engine.kernels.cpu_ops import extension_error
        sys.exit(f"the cpu backend is not available: {extension_error()}")
    torch.set_grad_enabled(False)
    setups = {"q4": ("fp32", "q4"), "bf16": ("bf16", "none")}
    names = engines_here(args.engines)
    heads = shipped_heads("smollm2-135m", "amphista")
    engines = {n: Engine.from_pretrained("smollm2-135m", device="cpu", dtype=setups[n][0], max_seq_len=1024,
                                         heads=heads, quant=setups[n][1]) for n in names}
    configs = [(n, t, b) for n in names for t in [None] + args.trees.split(",") for b in kinds]
    qs = read_questions(MT_BENCH, per_category=-(-args.questions // 8), limit=args.questions)

    def run(c, q):
        name, tree, which = c
        with use_backend(_use(which)):
            return engines[name].generate(q["turns"][0], max_new_tokens=args.max_new_tokens,
                                          speculative=None if tree is None else "amphista", tree=tree)

    toks, secs, steps, outs = rotating_runs(qs, configs, run, lambda c: f"{c[0]}/{c[1] or 'plain'}/{c[2]}")
    rows = []
    for name, tree, which in configs:
        c = (name, tree, which)
        ms = secs[c] / toks[c] * 1e3
        base_ms = secs[(name, tree, base)] / toks[(name, tree, base)] * 1e3
        rows.append({"weights": {"q4": "4-bit layers, fp32", "bf16": "bf16 (dequantized)"}[name],
                     "decoding": "plain" if tree is None else f"amphista {tree}", "backend": which,
                     "tau": toks[c] / steps[c], "ms/token": ms, "tok/s": 1e3 / ms, f"vs {base}": base_ms / ms,
                     "answers equal the other backend's": sum(
                         outs[c + (i,)] == outs[(name, tree, kinds[which == base], i)] for i in range(len(qs))),
                     "equal own plain": "" if tree is None else sum(
                         outs[c + (i,)] == outs[(name, None, which, i)] for i in range(len(qs)))})
    meta = {"hardware": hardware("cpu"), "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "model": "smollm2-135m (GGUF Q4_1)", "heads": "shipped amphista",
            "questions": f"{len(qs)} MT-Bench first turns, greedy, {args.max_new_tokens} new tokens"}
    _use("cpu")
    write_results(args.name, rows, meta,
                  md_table(rows, ["weights", "decoding", "backend", "tau", "ms/token", "tok/s", f"vs {base}",
                                  "answers equal the other backend's", "equal own plain"]), args.out)


if __name__ == "__main__":
    main()
