"""Compile every Triton kernel for a GPU architecture without a GPU: `python -m amphista_engine.kernels.compile_check`.

The interpreter (how CI runs the kernels) ignores what only the compiler checks: types of loop-carried
values, layouts, shared-memory use, tl.dot shape limits. This runs each launcher on small CPU tensors with
kernel launches intercepted, takes the exact arguments and constexprs each launch would get, and compiles
them through Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for the target architecture.
Must run WITHOUT TRITON_INTERPRET=1 (interpreted functions cannot be compiled).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl")
_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32", "bool": "i1"}


def _sig(value) -> str:
    import torch
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def capture(run_launchers):
    """Calls run_launchers() with every JITFunction launch recorded instead of run: [(fn, bound args, opts)]."""
    from triton.runtime.jit import JITFunction
    calls = []
    orig = JITFunction.run

    def fake_run(self, *args, grid, warmup, **kwargs):
        opts = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        calls.append((self, bound, opts))

    JITFunction.run = fake_run
    try:
        run_launchers()
    finally:
        JITFunction.run = orig
    return calls


def compile_call(fn, bound, opts, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, consts = {}, {}
    for p in fn.params:
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        else:
            sig[p.name] = _sig(v)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def _launchers(dtypes, with_pdl: bool = True):
    """Every launcher at shapes that reach each kernel variant (per dtype, split and single, ...); the first
    dtype also with programmatic dependent launch (AMPHISTA_PDL=1, which CPU tensors never get by themselves)
    where the target has it (with_pdl: sm_90 and newer; `common.pdl` never asks for it below)."""
    import torch
    from .triton_kernels import (acceptance, activation, fused_input, head_attention, kv_cache, linear,
                                 norm_rope, tree_attention)
    pdl_modules = (activation, linear, norm_rope, tree_attention)

    def run():
        for dt, forced in [(d, False) for d in dtypes] + [(dtypes[0], True)] * with_pdl:
            for m in pdl_modules:
                m.pdl = (lambda device: True) if forced else common_pdl
            try:
                one_dtype(dt)
            finally:
                for m in pdl_modules:
                    m.pdl = common_pdl
        logits = torch.zeros(2, 8, 100, dtype=torch.bfloat16)
        tokens = torch.zeros(2, 8, dtype=torch.long)
        retrieve = torch.zeros(4, 4, dtype=torch.long)
        acceptance.accept(tokens, logits, retrieve, typical=False)
        acceptance.accept(tokens, logits, retrieve, typical=True, temperature=0.7)

    from .triton_kernels.common import pdl as common_pdl

    def one_dtype(dt):
        B, H, Hkv, N, D, S = 1, 8, 2, 8, 128, 256
        q = torch.zeros(B, H, N, D, dtype=dt)
        kc = torch.zeros(B, Hkv, S, D, dtype=dt)
        bits = torch.zeros(1, N, dtype=torch.long)
        pl = torch.zeros(B, dtype=torch.long)
        tree_attention.tree_attention(q, kc, kc, pl, bits, S, num_splits=1)
        tree_attention.tree_attention(q, kc, kc, pl, bits, S, num_splits=2)
        tree_attention.tree_attention(q, kc, kc, pl, bits, S, num_splits=2, merge="kernel")
        # the opt-in window-bounded loads: the GPU suite's kernel benchmarks and the tune sweeps launch them
        tree_attention.tree_attention(q, kc, kc, pl, bits, S, num_splits=2, merge="kernel", window=True)
        tree_attention.tree_attention(q, kc, kc, pl, bits, S, num_splits=1, window=True)
        # a sliding layer past its window (ops.tree_attention's `window`): the model's path on the kernel backends
        pos = torch.zeros(B, N, dtype=torch.long)
        tree_attention.tree_attention(q, kc, kc, pl, bits, S, num_splits=2, merge="kernel", sliding=64, positions=pos)
        tree_attention.tree_attention(q, kc, kc, pl, bits, S, num_splits=1, sliding=64, positions=pos)
        tree_attention.tree_attention_ordered(q, kc, kc, torch.zeros(B, N, dtype=torch.int32),
                                              torch.zeros(B, N, 16, dtype=torch.int32), S, 128)
        x = torch.zeros(3, 4, 256, dtype=dt)
        w = torch.zeros(256, dtype=dt)
        norm_rope.rmsnorm(x, w, 1e-5)
        norm_rope.rmsnorm(x, w, 1e-5, residual=torch.zeros(4, 256, dtype=dt))
        norm_rope.rope(torch.zeros(1, 3, 4, 64, dtype=dt), torch.zeros(1, 3, 64))
        head_attention.slot_attention(torch.zeros(2, 4, 3 * 256, dtype=dt), 2)
        fused_input.fused_sal_input(torch.zeros(1, 3, 256, dtype=dt), torch.zeros(1, 3, dtype=torch.long),
                                    torch.zeros(50, 256, dtype=dt), torch.zeros(256, 512, dtype=dt))
        buf = torch.zeros(2, 1, 2, 32, 64, dtype=dt)
        kv_cache.kv_write(buf, buf, 0, torch.zeros(1, dtype=torch.long), torch.zeros(1, 2, 3, 64, dtype=dt),
                          torch.zeros(1, 2, 3, 64, dtype=dt))
        kv_cache.kv_compact(buf, buf, torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        norm_rope.qkv_rope_write(torch.zeros(1, 3, 8 * 64, dtype=dt), torch.zeros(1, 3, 64), buf, buf, 0,
                                 torch.zeros(1, dtype=torch.long), 4, 2)
        activation.silu_mul(torch.zeros(3, 3000, dtype=dt))
        linear.linear(torch.zeros(1, 3, 320, dtype=dt), torch.zeros(300, 320, dtype=dt))
        lw = torch.zeros(300, 320, dtype=dt)                  # the fused layers' prologues and epilogue
        linear.linear(torch.zeros(40, 320, dtype=dt), lw, norm_weight=torch.zeros(320, dtype=dt), eps=1e-5)
        linear.linear(torch.zeros(2, 640, dtype=dt), lw, silu=True, residual=torch.zeros(2, 300, dtype=dt))
        # 20 and 40 bare rows: two and four 16-row blocks a program (ROW_BLOCKS, the exact path's trees)
        linear.linear(torch.zeros(20, 320, dtype=dt), lw)
        linear.linear(torch.zeros(40, 320, dtype=dt), lw)
        # one row: the prologues on that row alone (ONE_ROW)
        linear.linear(torch.zeros(1, 320, dtype=dt), lw, norm_weight=torch.zeros(320, dtype=dt), eps=1e-5)
        linear.linear(torch.zeros(1, 640, dtype=dt), lw, silu=True, residual=torch.zeros(1, 300, dtype=dt))
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="SM architecture, e.g. 80 (A100), 90 (H100/H200)")
    ap.add_argument("--quick", action="store_true",
                    help="bf16 variants only (fp32 ones compile slowly), and programmatic dependent launch on one "
                         "variant of each kernel (its wait/launch code does not depend on the variant)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    import torch
    dtypes = (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float16, torch.float32)
    calls = capture(_launchers(dtypes, with_pdl=args.arch >= 90))
    seen, pdl_done, failures = set(), set(), 0
    for fn, bound, opts in calls:
        if args.quick and opts.get("launch_pdl"):
            if fn.__name__ in pdl_done:
                continue
            pdl_done.add(fn.__name__)
        key = (fn.__name__, tuple((p.name, _sig(bound[p.name]) if not p.is_constexpr else repr(bound[p.name]))
                                  for p in fn.params), tuple(sorted(opts.items())))
        if key in seen:
            continue
        seen.add(key)
        t0 = time.perf_counter()
        try:
            k = compile_call(fn, bound, opts, args.arch)
            regs = getattr(k, "n_regs", None)
            print(f"ok   {fn.__name__:24s} {time.perf_counter() - t0:5.1f}s shared={k.metadata.shared} "
                  f"{'regs=' + str(regs) if regs is not None else ''}{' pdl' if opts.get('launch_pdl') else ''}")
        except Exception as e:  # report every failing kernel, not only the first
            failures += 1
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"{len(seen)} kernel variants, {failures} failed (sm_{args.arch})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
