"""Access to the optional CUDA extension `amphista_engine._C` and typed wrappers around it.

The extension never links libtorch: wrappers check tensors here, then pass raw device addresses,
sizes, a dtype code and the current CUDA stream handle. torch is imported lazily so that the
package imports (and falls back to pure-torch paths) when the extension or CUDA is absent.
"""

from __future__ import annotations

import math

from .errors import AmphistaError, InputError

# dtype name -> code shared with csrc/common.cuh (enum class DType).
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}

_optional: dict[str, tuple] = {}
_CUDA_HINT = ("build it on a machine with nvcc: `pip install -e . --no-build-isolation` "
              "(AMPHISTA_CUDA_ARCH=\"80;90\" picks targets)")


class ExtensionUnavailableError(AmphistaError, RuntimeError):
    """The CUDA extension is not built or cannot load here; extension_error() says why."""


def optional_module(name: str, how_to_build: str):
    """(module, None) for the compiled amphista_engine.<name>, or (None, why) when it is not built or cannot load
    (no compiler at install time, AMPHISTA_NO_CUDA=1 / AMPHISTA_NO_CPU_EXT=1, or a broken build). Cached."""
    if name not in _optional:
        import importlib
        try:
            _optional[name] = (importlib.import_module(f"{__package__}.{name}"), None)
        except ImportError as err:
            _optional[name] = (None, f"{__package__}.{name} cannot be imported ({err}); {how_to_build}")
    return _optional[name]


def load_extension():
    """The `_C` module, or None when it is not built or cannot load (cached after the first call)."""
    return optional_module("_C", _CUDA_HINT)[0]


def extension_error() -> str | None:
    """Why load_extension() returns None; None when the extension loaded."""
    return optional_module("_C", _CUDA_HINT)[1]


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_tensor(name: str, t, torch) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if _dtype_name(t) not in DTYPE_CODES:
        raise InputError(f"{name} has dtype {_dtype_name(t)}; supported: {', '.join(DTYPE_CODES)}")
    if not t.is_contiguous():
        raise InputError(f"{name} must be contiguous (got shape {tuple(t.shape)}, stride {t.stride()}); "
                         "call .contiguous()")


def rmsnorm_cuda(x, w, eps: float = 1e-6, out=None):
    """Fused RMSNorm on the GPU: x * rsqrt(mean(x**2, -1) + eps) * w, computed in fp32, rounded once.

    x: CUDA tensor (..., d) of float32/float16/bfloat16, contiguous; w: (d,) same dtype and device;
    out: optional preallocated result like x (may be x itself for in place). Returns out.
    Raises InputError naming the bad argument, ExtensionUnavailableError without the extension.
    """
    import torch

    _check_tensor("x", x, torch)
    _check_tensor("w", w, torch)
    if x.dim() < 1:
        raise InputError("x must have at least one dimension (..., d), got a 0-d tensor")
    d = x.shape[-1]
    if w.dtype != x.dtype:
        raise InputError(f"w has dtype {_dtype_name(w)} but x has {_dtype_name(x)}; they must match")
    if tuple(w.shape) != (d,):
        raise InputError(f"w must have shape ({d},) to match x's last dimension, got {tuple(w.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
    if out is not None:
        _check_tensor("out", out, torch)
        if out.dtype != x.dtype or out.shape != x.shape:
            raise InputError(f"out must match x (shape {tuple(x.shape)}, dtype {_dtype_name(x)}), "
                             f"got shape {tuple(out.shape)}, dtype {_dtype_name(out)}")
    for name, t in (("x", x), ("w", w), ("out", out)):
        if t is not None and t.device.type != "cuda":
            raise InputError(f"{name} must be a CUDA tensor, got device {t.device}")
        if t is not None and t.device != x.device:
            raise InputError(f"{name} is on {t.device} but x is on {x.device}; move both to one GPU")

    if out is None:
        out = torch.empty_like(x)
    if x.numel() == 0:  # nothing to launch; the kernel requires rows, d > 0
        return out
    ext = load_extension()
    if ext is None:
        raise ExtensionUnavailableError(extension_error())
    # The launch goes to x's device and the stream torch is using there, so it orders correctly
    # with surrounding torch ops (and with CUDA graphs being captured on that stream).
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        ext.rmsnorm(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() // d, d, float(eps),
                    DTYPE_CODES[_dtype_name(x)], stream)
    return out
