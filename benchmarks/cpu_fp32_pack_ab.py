"""A/B on the CPU in fp32: the engine's linears through F.linear (MKL) vs oneDNN-packed weights (cpu_packed).

Measures, interleaved in one process so drift hits both alike:
- one target forward over N new tokens after a PREFIX-token cache (what a tree verification of N nodes costs);
- the engine's real decode steps: a plain step and a speculative step with the shipped Amphista heads on TREE;
- end to end, with --questions N: tok/s over the first turns of N MT-Bench questions, plain and Amphista on
  TREE with each engine, the four runs of a question back to back;
and checks that greedy speculative decoding still emits plain decoding's tokens with packed weights.
Writes benchmarks/results/cpu_fp32_pack_ab.{json,md} (or --out DIR).

    OMP_NUM_THREADS=2 python benchmarks/cpu_fp32_pack_ab.py [--tree tree-16] [--repeats 9] [--questions 8]
"""
import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.generation import PlainDecoder  # noqa: E402
from amphista_engine.kernels import cpu_packed  # noqa: E402
from amphista_engine.kv_cache import KVCache  # noqa: E402
from amphista_engine.model import AttentionSpec, causal_mask  # noqa: E402
from amphista_engine.sampling import SamplingParams  # noqa: E402
from amphista_engine.shipped_heads import shipped_heads  # noqa: E402
from amphista_engine.speculative import SpeculativeDecoder  # noqa: E402
from benchmarks.common import hardware, md_table, write_results  # noqa: E402

PREFIX = 300
MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"
SIZES = (1, 4, 16, 32, 64)


@contextlib.contextmanager
def packing(on: bool):
    """AMPHISTA_CPU_PACK for the block: decides whether new engines pack, and the heads' bare-weight linears."""
    old = os.environ.get(cpu_packed.ENV_VAR)
    os.environ[cpu_packed.ENV_VAR] = "1" if on else "0"
    cpu_packed.available.cache_clear()
    try:
        yield
    finally:
        if old is None:
            del os.environ[cpu_packed.ENV_VAR]
        else:
            os.environ[cpu_packed.ENV_VAR] = old
        cpu_packed.available.cache_clear()


def forward(e: Engine, n: int):
    cache = e._cache_for(1)         # the forwards' own cache: the timed decoders get theirs
    cache.length[:1] = PREFIX
    toks = torch.arange(n)[None] * 37 + 5
    pos = (PREFIX + torch.arange(n))[None]
    return e.model(toks, pos, cache, AttentionSpec(cache.length[:1], causal_mask(n, "cpu"), 512),
                   return_hidden=True)[0]


class Steps:
    """A decoder kept mid-generation on a random prompt, re-prefilled before the cache runs out."""

    def __init__(self, dec, max_seq_len: int):
        self.dec, self.limit = dec, max_seq_len - 80
        self.prompt = torch.randint(0, 49152, (128,), generator=torch.Generator().manual_seed(0)).tolist()
        self.used = self.limit

    def __call__(self):
        if self.used >= self.limit:
            self.dec.prefill([self.prompt])
            self.used = len(self.prompt)
        out, count = self.dec.step()
        self.used += int(count.max())
        out.tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default="tree-16")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--questions", type=int, default=0, help="MT-Bench first turns to decode end to end")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    heads = shipped_heads("smollm2-135m", "amphista")
    engs = {}
    for name, on in (("F.linear", False), ("packed", True)):
        with packing(on):
            engs[name] = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=1024,
                                                heads=heads, quant="none")
            assert engs[name].cpu_packed == on
    a, b = (forward(e, 16) for e in engs.values())
    rel = float((a - b).norm() / a.norm())
    same = {}
    for name, e in engs.items():
        with packing(name == "packed"):
            prompt = "Explain how a hash table handles collisions."
            plain = e.generate(prompt, max_new_tokens=64).token_ids
            spec = e.generate(prompt, max_new_tokens=64, speculative="amphista", tree=args.tree)
            same[name] = plain == spec.token_ids
    jobs = {}
    for name, e in engs.items():
        def cache(e=e):
            return KVCache.for_model(e.config, 1, e.max_seq_len, e.dtype, e.device)
        jobs[(name, "plain step")] = Steps(PlainDecoder(e.model, cache(), SamplingParams()), e.max_seq_len)
        jobs[(name, f"{args.tree} step")] = Steps(
            SpeculativeDecoder(e.model, cache(), e.heads, e._tree_spec(args.tree), SamplingParams()), e.max_seq_len)
        for n in SIZES:
            jobs[(name, f"forward N={n}")] = lambda e=e, n=n: forward(e, n)
    times = {}
    for _ in range(args.repeats + 2):          # interleaved; the first two rounds are warm-up
        for (name, what), fn in jobs.items():
            with packing(name == "packed"):
                t = time.perf_counter()
                fn()
                times.setdefault((name, what), []).append((time.perf_counter() - t) * 1e3)
    rows = []
    for what in dict.fromkeys(w for _, w in jobs):
        r, p = (sorted(times[(n, what)][2:])[args.repeats // 2] for n in engs)
        rows.append({"what": what, "F.linear ms": r, "packed ms": p, "speedup": r / p})
    ratio = {n: (sorted(times[(n, f"{args.tree} step")][2:])[args.repeats // 2]
                 / sorted(times[(n, "plain step")][2:])[args.repeats // 2]) for n in engs}
    if args.questions:
        rows += end_to_end(engs, args)
    meta = {"hardware": hardware("cpu"), "threads": torch.get_num_threads(), "model": "smollm2-135m fp32",
            "heads": "shipped amphista", "tree": args.tree, "repeats": args.repeats, "prefix (forwards)": PREFIX,
            "logits rel diff (N=16)": f"{rel:.1e}",
            "greedy speculative == plain (64 tokens)": same,
            "tree step / plain step": {k: round(v, 2) for k, v in ratio.items()}}
    write_results("cpu_fp32_pack_ab", rows, meta, md_table(rows, ["what", "F.linear ms", "packed ms", "speedup"]),
                  args.out)


def end_to_end(engs: dict, args) -> list[dict]:
    from amphista_engine.evaluation.questions import read_questions
    qs = read_questions(MT_BENCH, per_category=-(-args.questions // 8), limit=args.questions)
    toks, secs, steps = {}, {}, {}
    for q in qs:
        for name, e in engs.items():
            with packing(name == "packed"):
                for method in (None, "amphista"):
                    r = e.generate(q["turns"][0], max_new_tokens=args.max_new_tokens, speculative=method,
                                   tree=method and args.tree)
                    key = (name, method)
                    toks[key] = toks.get(key, 0) + r.stats.step_tokens
                    secs[key] = secs.get(key, 0) + r.stats.decode_ms / 1e3
                    steps[key] = steps.get(key, 0) + r.stats.decode_steps
    rows = []
    for method in (None, "amphista"):
        tau = toks[("packed", method)] / steps[("packed", method)]
        label = (f"MT-Bench x{len(qs)} end to end, ms per token: "
                 + (f"amphista {args.tree} (tau {tau:.2f})" if method else "plain"))
        r, p = (secs[(n, method)] / toks[(n, method)] * 1e3 for n in engs)
        rows.append({"what": label, "F.linear ms": r, "packed ms": p, "speedup": r / p})
    rows += [{"what": f"MT-Bench speculative speedup over plain, {n} engine", "F.linear ms": "", "packed ms": "",
              "speedup": secs[(n, None)] / toks[(n, None)] / (secs[(n, "amphista")] / toks[(n, "amphista")])}
             for n in engs]
    return rows


if __name__ == "__main__":
    main()
