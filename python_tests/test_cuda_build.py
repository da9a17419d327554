"""The CUDA extension: it builds with CMake wherever nvcc exists, and its kernels are right on a GPU.

Without a GPU only the build, the module's symbol table, import and argument checks can run; the
numeric tests need torch.cuda.
"""

import json
import re
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from amphista_engine import InputError
from amphista_engine._ext import extension_error, load_extension, rmsnorm_cuda

ROOT = Path(__file__).resolve().parents[1]


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([Path(home) / "bin" / "nvcc"] if home else []) + [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]:
        if cand and Path(cand).is_file():
            return str(cand)
    return None


NVCC = _nvcc()
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


def _ext_or_fail():
    ext = load_extension()
    if ext is None:
        if os.environ.get("AMPHISTA_NO_CUDA") == "1":
            pytest.skip("AMPHISTA_NO_CUDA=1")
        pytest.fail(f"CUDA device present but extension missing: {extension_error()}")
    return ext


# --- (a) build: one arch keeps it to ~30 s on 2 cores -------------------------------------------

@pytest.fixture(scope="module")
def built_so(tmp_path_factory):
    if NVCC is None or shutil.which("cmake") is None:
        pytest.skip("nvcc or cmake not found")
    build, out = tmp_path_factory.mktemp("cmake-build"), tmp_path_factory.mktemp("lib")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *gen, f"-DCMAKE_CUDA_COMPILER={NVCC}",
                    "-DAMPHISTA_CUDA_ARCH=90", f"-DPython_EXECUTABLE={sys.executable}",
                    f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}"], check=True, capture_output=True, timeout=300)
    proc = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sos = list(out.glob("_C*.so"))
    assert len(sos) == 1, f"expected one _C*.so in {out}, got {sos}"
    return sos[0]


def test_build_produces_module_exporting_only_pyinit(built_so):
    if shutil.which("nm") is None:
        pytest.skip("nm not found")
    defined = subprocess.run(["nm", "-D", "--defined-only", str(built_so)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "PyInit__C" in defined
    # The static cudart must stay private (--exclude-libs), or its symbols could interpose with torch's.
    assert not [s for s in defined if s.startswith(("cuda", "__cuda"))], defined


def test_build_links_no_libtorch_or_shared_cudart(built_so):
    if shutil.which("readelf") is None:
        pytest.skip("readelf not found")
    dyn = subprocess.run(["readelf", "-d", str(built_so)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
    assert not [n for n in needed if "torch" in n or "c10" in n or "cudart" in n or n.startswith("libcuda")], needed


_PROBE = textwrap.dedent("""
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
    try:
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    except ImportError as e:
        print(json.dumps({"import_error": str(e)})); sys.exit()
    good = dict(x_ptr=256, w_ptr=512, out_ptr=1024, rows=2, d=8, eps=1e-6, dtype=1, stream=0)
    errs = {}
    for bad in [dict(x_ptr=0), dict(w_ptr=3), dict(out_ptr=-4), dict(rows=0), dict(d=-1),
                dict(eps=float("nan")), dict(dtype=7), dict(stream="s"), dict(rows=2**31)]:
        try:
            m.rmsnorm(**{**good, **bad}); errs[next(iter(bad))] = None
        except Exception as e:
            errs[next(iter(bad))] = [type(e).__name__, str(e)]
    print(json.dumps({"cuda": m.cuda_version(), "archs": m.built_archs(), "errs": errs}))
""")


def test_built_module_imports_and_checks_arguments(built_so):
    # Static cudart needs no driver to load; if this system's loader still refuses, it must be
    # about the driver, not a missing symbol.
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(built_so)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "import_error" in res:
        assert "libcuda" in res["import_error"] or "driver" in res["import_error"], res
        pytest.skip(f"module built but not importable without a driver: {res['import_error']}")
    assert res["archs"] == ["90"]
    assert res["cuda"].split(".")[0].isdigit()
    for arg, err in res["errs"].items():  # checked before any CUDA call, so no device needed
        assert err is not None and err[0] == "ValueError" and f"'{arg}'" in err[1], (arg, err)


# --- (b) numerics against a float64 reference on fresh random inputs -------------------------------

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # ~2-3 units of final rounding


def _reference(x, w, eps):
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def _assert_close(out, ref, dtype, what):
    err = (out.double() - ref).abs()
    bound = TOL[dtype] * ref.abs() + 1e-6 * ref.abs().max()  # absolute floor for near-zero/subnormal values
    worst = (err / (ref.abs() + 1e-30)).max().item()
    assert bool((err <= bound).all()), f"{what}: worst elementwise relative error {worst:.3g} > {TOL[dtype]}"


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (3, 7), (5, 4096), (2, 3, 5120), (4, 12288), (7, 4100), (2, 1), (300, 576)])
def test_rmsnorm_matches_reference(dtype, shape):
    _ext_or_fail()
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(shape, generator=g, device="cuda") * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g, device="cuda") * 2 - 0.5).to(dtype)
    eps = 1e-5
    out = rmsnorm_cuda(x, w, eps)
    torch.cuda.synchronize()
    assert out.shape == x.shape and out.dtype == dtype
    _assert_close(out, _reference(x, w, eps), dtype, f"{dtype} {shape} seed={seed}")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rmsnorm_unaligned_and_in_place(dtype):
    _ext_or_fail()
    rows, d, eps = 6, 1024, 1e-6
    # One element past a 16-byte boundary: contiguous, but the kernel must take its scalar path.
    buf = torch.randn(rows * d + 1, device="cuda").to(dtype)
    x = buf[1:].view(rows, d)
    w = torch.randn(d + 1, device="cuda").to(dtype)[1:]
    ref = _reference(x, w, eps)
    _assert_close(rmsnorm_cuda(x, w, eps), ref, dtype, f"unaligned {dtype}")
    y = x.clone()
    assert rmsnorm_cuda(y, w, eps, out=y) is y
    torch.cuda.synchronize()
    _assert_close(y, ref, dtype, f"in place {dtype}")


# --- (c) bad arguments fail early with errors that name the argument --------------------------------

@pytest.mark.parametrize("call, names", [
    (lambda t: rmsnorm_cuda([1.0], t), "x must be a torch.Tensor"),
    (lambda t: rmsnorm_cuda(t.double(), t.double()[0]), "x has dtype float64"),
    (lambda t: rmsnorm_cuda(t, t.half()[0]), "w has dtype float16"),
    (lambda t: rmsnorm_cuda(t, t[0, :3]), "w must have shape (8,)"),
    (lambda t: rmsnorm_cuda(t.t(), t[:, 0]), "x must be contiguous"),
    (lambda t: rmsnorm_cuda(t, t[0], eps=-1.0), "eps must be a finite number"),
    (lambda t: rmsnorm_cuda(t, t[0], eps=math.nan), "eps must be a finite number"),
    (lambda t: rmsnorm_cuda(t, t[0], out=t[:2]), "out must match x"),
    (lambda t: rmsnorm_cuda(t.cpu(), t[0].cpu()), "x must be a CUDA tensor"),
])
def test_rmsnorm_rejects_bad_arguments(call, names):
    # Runs anywhere: every check here fires before the device is touched.
    t = torch.randn(4, 8, device="cuda" if HAS_GPU else "cpu")
    with pytest.raises(InputError, match=re.escape(names)):
        call(t)


@needs_gpu
@pytest.mark.gpu
def test_rmsnorm_rejects_mixed_devices():
    _ext_or_fail()
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(InputError, match="w must be a CUDA tensor"):
        rmsnorm_cuda(x, torch.ones(8))
    with pytest.raises(InputError, match="out must be a CUDA tensor"):
        rmsnorm_cuda(x, torch.ones(8, device="cuda"), out=torch.empty(4, 8))


def test_installed_binding_rejects_bad_arguments():
    ext = load_extension()
    if ext is None:
        pytest.skip(f"extension not built: {extension_error()}")
    good = dict(x_ptr=256, w_ptr=512, out_ptr=1024, rows=2, d=8, eps=1e-6, dtype=0, stream=0)
    for bad in [dict(x_ptr=0), dict(w_ptr=2), dict(out_ptr=None), dict(rows=-3), dict(d=0), dict(dtype=3),
                dict(eps=-1e-6), dict(stream=-1)]:
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"argument '{name}'"):
            ext.rmsnorm(**{**good, **bad})
