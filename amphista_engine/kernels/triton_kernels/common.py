"""Helpers shared by the Triton launchers (host side only)."""
from __future__ import annotations

import functools
from typing import Callable, Hashable, Sequence

import torch
import triton
import triton.language as tl

from ..backend import pdl_wanted     # AMPHISTA_PDL is read there: benchmarks set it without importing Triton

next_pow2 = triton.next_power_of_2
cdiv = triton.cdiv


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; a small stand-in on the CPU (interpreter) so grids stay small."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


_fitting: dict[Hashable, int] = {}


def launch_first_fitting(launch: Callable[..., None], options: Sequence[dict], key: Hashable) -> None:
    """launch(**options[i]) for the first i whose kernel fits the GPU, remembered per `key`.

    The options are ordered fastest first (as measured on an H200); a deep pipeline that fits there can need
    more shared memory than a smaller GPU has (seen on the H200 itself with fp32 operands: 288 KiB asked,
    227 KiB there). Triton raises OutOfResources before anything is launched, so falling back is safe, also
    while a CUDA graph is captured (the decode loop warms every step up eagerly first)."""
    from triton.runtime.errors import OutOfResources
    i = _fitting.get(key, 0)
    while True:
        try:
            launch(**options[i])
        except OutOfResources:
            if i + 1 >= len(options):
                raise
            i += 1
            continue
        _fitting[key] = i
        return


def stream_block_n(n_cols: int, row_tiles: int, device: torch.device) -> int:
    """Column tile of a few-row GEMM that streams its weight once: 64 when that still gives ~2 programs per
    SM, else 32 (narrow tiles keep every SM reading a share of W)."""
    return 64 if cdiv(n_cols, 64) * row_tiles >= 2 * sm_count(device) else 32


def num_warps_for(block: int) -> int:
    """Warps for a program that streams `block` elements per step: enough lanes to cover it in ~16 B loads."""
    return max(1, min(16, block // 256))


def interpreting() -> bool:
    """Kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def exact_dot(dtype: torch.dtype) -> bool:
    """The EXACT flag for `dot`: fp32 inputs must not silently drop to TF32, and the interpreter (Triton
    3.x) computes bf16 dots on the raw 16-bit patterns, so there the operands go through fp32 too (the
    product of two bf16/fp16 numbers is exact in fp32: same result as the tensor-core MMA)."""
    return dtype == torch.float32 or interpreting()


@triton.jit
def dot(a, b, EXACT: tl.constexpr):
    """a @ b with fp32 accumulation; EXACT: in fp32 with IEEE precision (see exact_dot)."""
    if EXACT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


# ---- programmatic dependent launch (Hopper and newer) ---------------------------------------------------
# A decode step is ~300 dependent launches (9 a layer, all Triton once the products are routed); on an H200 the
# gaps between them and each kernel's ramp-up cost ~0.2-0.5 ms of a 4.2 ms 7B step. With PDL a kernel is
# launched while its predecessor drains: every program first waits (griddepcontrol.wait, at the very top, before
# any early exit, so completion stays transitive along the chain) and then lets the next kernel launch. The
# few-row GEMM prefetches its first weight tiles into L2 before it waits: weights are never written during
# decoding. CUDA graphs capture the programmatic edges. On by default (AMPHISTA_PDL=0 turns it off): on an H100
# the all-Triton 7B step took 5.18 ms with it, 5.35-5.41 without, two runs (results/gpu/h100_2026-12-05_*); with
# cuBLAS products around it, which never trigger their dependents early, it timed within noise.


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA device of compute capability >= 9, compiled kernels
    (the interpreter has no grid dependencies), and AMPHISTA_PDL not 0."""
    if device.type != "cuda" or interpreting() or not pdl_wanted():
        return False
    return _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch(on: bool) -> dict:
    """The launch keyword for a PDL kernel (none at all otherwise, so older Tritons and the interpreter never
    see it)."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First statement of a kernel in the decode chain: with PDL, wait for the previous kernel's writes, then let
    the next kernel launch (its programs wait in turn)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
