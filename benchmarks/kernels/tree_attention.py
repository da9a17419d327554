"""Tree-masked verification attention: the kernel backends vs the torch reference (which builds the dense
mask per call) vs F.scaled_dot_product_attention with a prebuilt dense mask (the engine's per-layer cost).
"triton" and "cuda" merge split-K partials as the engine does by default (merge="auto", kernels/split_merge.py:
in the same launch for program blocks of <= 16 query rows, else by a second launch); "<backend>:merge-by-launch"
always launches the merge (Triton's default before 2026-12-04; CUDA's only way before 2026-12-04c), so the N = 1
and 16 rows keep the A/B that chose "auto". "triton:pdl" launches
with programmatic dependent launch (AMPHISTA_PDL=1, Hopper and newer; elsewhere the same as "triton"): in the
timed chain of calls each one starts while the last drains, as after the step's RoPE + cache-write kernel.
"triton:window" bounds the loads by the host's window kv_len instead of the prefix length (opt-in, see the
launcher's `window`): no load waits for the length, the window's tail is read too.
The "window" rows: a sliding layer past its window (Mistral-7B's shapes, window 4096 at prefix 8192, and
Gemma-3-270M's, window 512 at prefix 2048; --quick: the tiny shape, window 64 at prefix 256),
ops.tree_attention(..., window=W) on the triton, cuda and cpu backends; "sdpa_window_mask" is what such a layer
ran on every backend before the kernels took the window (the cpu backend's before 2026-12-07): SDPA over a
prebuilt dense window mask. Bytes: the window's keys only. `--prefixes ""` runs these rows alone.
"copy:same-bytes" is a device-to-device copy that moves the kernel's bytes (half read, half written), timed the
same way: what plain memory traffic of this size reaches, launch and ramp included (the 70% target is against a
1 GiB copy, whose fixed costs vanish).

Bytes: K/V of the prefix + tree slots, Q and the output. FLOPs: 4 * H * N * (prefix + N) * D (QK^T and PV,
masked entries included). Target on an H100: >= 70% of copy bandwidth for prefix >= 1024, >= 2x SDPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _bench import main_for, with_pdl
from amphista_engine.kernels import ops, split_merge
from amphista_engine.kernels.reference import window_keep
from amphista_engine.model import AttentionSpec
from amphista_engine.tree import build_tree

NODES = (1, 16, 64)            # plain decoding, tree-16, mc_sim_7b_63
TREES = {1: "chain-1", 16: "tree-16", 64: "mc_sim_7b_63"}


def by_launch(fn):
    """fn with its split-K partials merged by a second launch."""
    def call():
        with split_merge.merge_mode("launch"):
            return fn()
    return call


def run(bench):
    rows, dev, dt = [], bench.device, bench.dtype
    if "triton" in bench.backends:
        from amphista_engine.kernels.triton_kernels.tree_attention import tree_attention as windowed
    esize = torch.tensor([], dtype=dt).element_size()
    for sh in bench.shapes:
        H, Hkv, D = sh.n_heads, sh.n_kv_heads, sh.head_dim
        for P in bench.prefixes:
            for N in (NODES[:2] if bench.quick else NODES):
                tree = build_tree(TREES[N]).to(dev) if N > 1 else None
                mask = tree.mask[None] if tree is not None else torch.ones(1, 1, 1, dtype=torch.bool, device=dev)
                bits = tree.ancestor_bits[None] if tree is not None else torch.ones(1, 1, dtype=torch.long, device=dev)
                kv_len = -(-(P + N) // 128) * 128                       # the engine's bucketed window
                q = torch.randn(1, N, H, D, device=dev, dtype=dt).transpose(1, 2)
                k = torch.randn(1, Hkv, kv_len, D, device=dev, dtype=dt)
                v = torch.randn(1, Hkv, kv_len, D, device=dev, dtype=dt)
                prefix = torch.full((1,), P, device=dev)
                dense = AttentionSpec(prefix, mask, kv_len).dense_mask()
                kernel = lambda: ops.tree_attention(q, k, v, prefix, bits, kv_len)
                fns = {
                    "torch": lambda: ops.tree_attention(q, k, v, prefix, mask, kv_len),
                    "triton": kernel,
                    "cuda": kernel,
                    "triton:merge-by-launch": by_launch(kernel),
                    "cuda:merge-by-launch": by_launch(kernel),
                    "triton:pdl": with_pdl(kernel),
                    "triton:window": lambda: windowed(q, k, v, prefix, bits, kv_len, window=True),
                    "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None],
                                                                         enable_gqa=True),
                    "copy:same-bytes": lambda: dst.copy_(src),
                }
                nbytes = esize * (2 * Hkv * (P + N) * D + 2 * H * N * D)
                src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
                dst = torch.empty_like(src)
                flops = 4 * H * N * (P + N) * D
                rows += bench.compare("tree_attention", sh.name, f"P={P} N={N}", fns, nbytes, flops)
    return rows + window_rows(bench)


# (query heads, KV heads, head dim), (window, prefix), name
WINDOW_CASES = [((32, 8, 128), (4096, 8192), "mistral-7b"), ((4, 1, 256), (512, 2048), "gemma3-270m")]


def window_rows(bench):
    """A sliding layer past its window: plain decoding and tree-16 with the window in the kernel."""
    tiny = bench.shapes[0]
    cases = [((tiny.n_heads, tiny.n_kv_heads, tiny.head_dim), (64, 256), "tiny")] if bench.quick else WINDOW_CASES
    return [row for case in cases for row in window_case_rows(bench, *case)]


def window_case_rows(bench, heads, window_prefix, name):
    rows, dev, dt = [], bench.device, bench.dtype
    esize = torch.tensor([], dtype=dt).element_size()
    (H, Hkv, D), (W, P) = heads, window_prefix
    for N in NODES[:2]:
        tree = build_tree(TREES[N]).to(dev) if N > 1 else None
        mask = tree.mask[None] if tree is not None else torch.ones(1, 1, 1, dtype=torch.bool, device=dev)
        bits = tree.ancestor_bits[None] if tree is not None else torch.ones(1, 1, dtype=torch.long, device=dev)
        pos = (P + mask[0].sum(-1) - 1)[None]                           # position = prefix + depth
        kv_len = -(-(P + N) // 128) * 128
        q = torch.randn(1, N, H, D, device=dev, dtype=dt).transpose(1, 2)
        k = torch.randn(1, Hkv, kv_len, D, device=dev, dtype=dt)
        v = torch.randn(1, Hkv, kv_len, D, device=dev, dtype=dt)
        prefix = torch.full((1,), P, device=dev)
        dense = AttentionSpec(prefix, mask, kv_len).dense_mask() & window_keep(prefix, pos, W, N, kv_len)
        bias = torch.zeros(dense.shape, dtype=dt, device=dev).masked_fill_(~dense, float("-inf"))
        kernel = lambda: ops.tree_attention(q, k, v, prefix, bits, kv_len, window=W, positions=pos)
        fns = {
            "torch": lambda: ops.tree_attention(q, k, v, prefix, mask, kv_len, window=W, positions=pos),
            "triton": kernel,
            "cuda": kernel,
            "sdpa_window_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None],
                                                                       enable_gqa=True),
            "copy:same-bytes": lambda: dst.copy_(src),
        }
        keys = min(P, W) + N
        nbytes = esize * (2 * Hkv * keys * D + 2 * H * N * D)
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        rows += bench.compare("tree_attention", name, f"P={P} N={N} window={W}", fns, nbytes, 4 * H * N * keys * D)
    return rows


if __name__ == "__main__":
    main_for(run, "tree_attention")
