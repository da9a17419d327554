"""How tree attention's split-K partials become one output: the one switch for the triton and cuda backends.

A split-K launch leaves one partial output per split; they are merged either by a second small kernel
("launch") or, in the same launch, by whichever split of a program group finishes last ("kernel": an arrival
counter per group, as stream-K GEMMs do; it saves a launch and the merge kernel's start-up, a fixed cost that
dominates at short prefixes). "auto", the default, merges in the kernel for programs of at most
AUTO_KERNEL_MERGE_ROWS query rows (plain steps, small trees) and by launch for large trees.

Measured on an H200 with the Triton kernel (benchmarks/results/gpu/h200_2026-12-04_tune, 7B shape): in-kernel
merge 1.21x / 1.24x at N=1 (prefix 1024 / 4096), 1.14x at N=16 (prefix 2048), but 0.83x / 0.91x at N=64, where
the last split merges 64 rows alone; the graphed plain 7B step 4.50 vs 4.57 ms.

And not over many splits: the last split's merge walks them one by one. On an H100 (benchmarks/results/gpu/
h100_2026-12-05_suite, kernels.json) the SmolLM2 shape at prefix 4096, one node, 32 splits (3 KV heads), merged in
the kernel took 13.04 us against 11.28 by launch (the cuda backend: 15.92 against 13.83), while every case of at
most 9 splits (the 7B shape; SmolLM2 at 1024, 8 splits) was as fast or faster in the kernel. So "auto" merges in the
kernel for at most AUTO_KERNEL_MERGE_SPLITS splits.
"""
from __future__ import annotations

import contextlib

import torch

from ..env_settings import env_choice
from ..errors import ConfigError

MERGE_ENV = "AMPHISTA_TREE_MERGE"
MERGE_MODES = ("auto", "launch", "kernel")
AUTO_KERNEL_MERGE_ROWS = 16
AUTO_KERNEL_MERGE_SPLITS = 16

_merge_default: str | None = None       # set by merge_mode(); None: the environment, else "auto"


def default_merge() -> str:
    return _merge_default or env_choice(MERGE_ENV, MERGE_MODES, "auto")


@contextlib.contextmanager
def merge_mode(mode: str):
    """Within the block, tree_attention merges splits this way by default (benchmarks' A/B rows). Graphs
    captured inside keep the mode they were captured with."""
    global _merge_default
    if mode not in MERGE_MODES:
        raise ConfigError(f"merge mode {mode!r}: expected one of {', '.join(MERGE_MODES)}")
    prev, _merge_default = _merge_default, mode
    try:
        yield
    finally:
        _merge_default = prev


def resolve(mode: str | None, program_rows: int, where: str = "tree_attention", splits: int | None = None) -> str:
    """"kernel" or "launch" for a launch whose programs hold program_rows query rows over `splits` splits (None:
    not known, not weighed); mode None = default_merge()."""
    mode = default_merge() if mode is None else mode
    if mode not in MERGE_MODES:
        raise ConfigError(f"{where}: merge={mode!r}, expected one of {', '.join(MERGE_MODES)}")
    if mode == "auto":
        few_splits = splits is None or splits <= AUTO_KERNEL_MERGE_SPLITS
        return "kernel" if program_rows <= AUTO_KERNEL_MERGE_ROWS and few_splits else "launch"
    return mode


_counters: dict[tuple[str, int | None], torch.Tensor] = {}
_retired: list[torch.Tensor] = []       # outgrown counter buffers: a captured graph may still point at one


def arrival_counters(device: torch.device, groups: int) -> torch.Tensor | None:
    """Zeroed int32 counters, one per program group, for merge="kernel"; each launch leaves them zero again
    (the last split re-arms its group). One buffer per device, shared by both backends' launches in stream
    order: the engine's decode steps run on one stream. None while a CUDA graph is being captured and the
    buffer is too small: a new buffer's zeroing memset would only run at replay, so that launch merges with a
    second kernel."""
    key = (device.type, device.index if device.index is not None or device.type != "cuda"
           else torch.cuda.current_device())
    buf = _counters.get(key)
    if buf is None or buf.numel() < groups:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _retired.append(buf)
        buf = torch.zeros(max(4096, 1 << max(groups - 1, 0).bit_length()), dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf
