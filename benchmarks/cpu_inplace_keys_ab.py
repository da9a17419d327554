"""The CPU's ordered attention reading the KV cache in place against copying its keys out, end to end.

Until 2026-12-03 every ordered decode step (bf16, and 4-bit weights in any dtype: kernels/cpu_exact.py) copied
each layer's K and V prefix, rounded up to 512 slots, into a new tensor with the step's key windows after it,
and wrote the new tokens' K/V with an index_put. Now the windows go to scratch slots past the prefix in the
cache itself (`cpu_exact.scratch_slots`) and flash reads the cache in place; a single-row write is one
index_copy_. "copy" below is that old code (`cpu_exact.copied_keys`, index_put writes), "in place" the new,
in one process on the same engines, question by question in a rotating order. Both give the same bits: the
greedy answers are compared too.

    OMP_NUM_THREADS=2 python benchmarks/cpu_inplace_keys_ab.py [--engines q4,bf16] [--trees mix-4] [--questions 16]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.evaluation.questions import read_questions  # noqa: E402
from amphista_engine.kernels import cpu_exact, reference, set_backend  # noqa: E402
from amphista_engine.shipped_heads import shipped_heads  # noqa: E402
from benchmarks.common import ab_parser, engines_here, hardware, md_table, rotating_runs, write_results  # noqa: E402

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"
IN_PLACE = (cpu_exact._keys, reference.kv_write)


def _indexed_kv_write(k_buf, v_buf, layer, start, k, v):
    """reference.kv_write before its single-row index_copy_ path."""
    B, H, T, D = k.shape
    rows = torch.arange(B, device=k.device)[:, None]
    slots = start[:, None] + torch.arange(T, device=k.device)
    k_buf[layer][rows, :, slots] = k.transpose(1, 2)
    v_buf[layer][rows, :, slots] = v.transpose(1, 2)


def _copied_keys(k_cache, v_cache, lay):
    return cpu_exact.copied_keys(k_cache, lay), cpu_exact.copied_keys(v_cache, lay)


COPY = (_copied_keys, _indexed_kv_write)


def _use(mode):
    cpu_exact._keys, reference.kv_write = IN_PLACE if mode == "in place" else COPY


def main():
    ap = ab_parser(__doc__)
    ap.add_argument("--engines", default="q4,bf16", help="q4 (4-bit layers, fp32 between), bf16 (dequantized)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    set_backend("torch")       # the ops this A/B timed on 2026-12-03 (the cpu backend's came after)
    setups = {"q4": ("fp32", "q4"), "bf16": ("bf16", "none")}
    names = engines_here(args.engines)
    heads = shipped_heads("smollm2-135m", "amphista")
    engines = {n: Engine.from_pretrained("smollm2-135m", device="cpu", dtype=setups[n][0], max_seq_len=1024,
                                         heads=heads, quant=setups[n][1]) for n in names}
    configs = [(n, t, m) for n in names for t in [None] + args.trees.split(",") for m in ("copy", "in place")]
    qs = read_questions(MT_BENCH, per_category=-(-args.questions // 8), limit=args.questions)

    def run(c, q):
        name, tree, mode = c
        _use(mode)
        return engines[name].generate(q["turns"][0], max_new_tokens=args.max_new_tokens,
                                      speculative=None if tree is None else "amphista", tree=tree)

    toks, secs, steps, outs = rotating_runs(qs, configs, run, lambda c: f"{c[0]}/{c[1] or 'plain'}/{c[2]}")
    _use("in place")
    rows = []
    for name, tree, mode in configs:
        c = (name, tree, mode)
        ms = secs[c] / toks[c] * 1e3
        rows.append({"weights": {"q4": "4-bit layers, fp32", "bf16": "bf16 (dequantized)"}[name],
                     "decoding": "plain" if tree is None else f"amphista {tree}", "keys": mode,
                     "tau": toks[c] / steps[c], "ms/token": ms, "tok/s": 1e3 / ms,
                     "in place vs copy": secs[(name, tree, "copy")] / toks[(name, tree, "copy")] * 1e3 / ms,
                     "answers equal copy's": sum(outs[c + (i,)] == outs[(name, tree, "copy", i)]
                                                 for i in range(len(qs))),
                     "equal own plain": "" if tree is None else sum(
                         outs[c + (i,)] == outs[(name, None, mode, i)] for i in range(len(qs)))})
    meta = {"hardware": hardware("cpu"), "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "model": "smollm2-135m (GGUF Q4_1)", "heads": "shipped amphista",
            "questions": f"{len(qs)} MT-Bench first turns, greedy, {args.max_new_tokens} new tokens"}
    write_results("cpu_inplace_keys_ab", rows, meta,
                  md_table(rows, ["weights", "decoding", "keys", "tau", "ms/token", "tok/s", "in place vs copy",
                                  "answers equal copy's", "equal own plain"]), args.out)


if __name__ == "__main__":
    main()
