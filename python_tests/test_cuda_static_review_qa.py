"""Static review QA of the CUDA extension (csrc/): what a reading of the kernels and bindings found, pinned down.

CPU tests (no GPU, no CMake build): csrc/bindings.cpp is compiled by the host compiler against stub kernel entry
points (each stub counts its call and returns cudaSuccess), so every argument check of the real bindings runs
in about 6 s and a call that passes them is seen reaching the launch. The size checks multiplied sizes of up to
2^40 each in int64: the products wrapped (2^32 * 2^32 = 0) and passed their limits, so absurd sizes went on to
the kernels (a truncated grid, a wrapped shared-memory size, an int n_heads that wrapped and sent warps past
qkv). They now saturate (binding_args.h product()) and n_heads is bounded to an int.

GPU tests (skipped without a device; run them in the next GPU session): int64 addressing past 2^31 elements in
tree attention (a batch row starting past 2^31 elements) and in kv_write / kv_compact (a layer past 2^31
elements), and tree attention with 64 nodes, a row of prefix 0, more splits than chunks and +-inf (not only NaN)
in the K/V slots no row may see.
"""
from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from amphista_engine._ext import load_extension
from amphista_engine.kernels import cuda_ops, reference

from kernel_checks import DEV, TOL, gen, randn, rel_err
from test_cuda_build import BINDING_CASES
from test_cuda_review_qa import wrappers_on_cpu

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")

# Stub kernel entry points: the signatures of csrc/*.cuh's host entry points. Each counts its call.
_STUBS = r"""
#include "acceptance.cuh"
#include "head_attention.cuh"
#include "norm_rope_kv.cuh"
#include "rmsnorm.cuh"
#include "staged_adaptation.cuh"
#include "tree_attention.cuh"
static int g_launches = 0;
extern "C" int amphista_stub_launches() { return g_launches; }
namespace amphista {
cudaError_t rmsnorm(const void*, const void*, void*, int64_t, int64_t, float, DType, cudaStream_t) {
  ++g_launches; return cudaSuccess; }
cudaError_t add_rmsnorm(const void*, const void*, const void*, void*, void*, int64_t, int64_t, int64_t, float, DType,
                        cudaStream_t) { ++g_launches; return cudaSuccess; }
cudaError_t rope(const RopeParams&, DType, cudaStream_t) { ++g_launches; return cudaSuccess; }
cudaError_t kv_write(const KVWriteParams&, cudaStream_t) { ++g_launches; return cudaSuccess; }
cudaError_t kv_compact(const KVCompactParams&, cudaStream_t) { ++g_launches; return cudaSuccess; }
cudaError_t tree_attention(const TreeAttentionParams&, DType, cudaStream_t) { ++g_launches; return cudaSuccess; }
cudaError_t head_attention(const void*, void*, int64_t, int64_t, int64_t, int64_t, float, DType, cudaStream_t) {
  ++g_launches; return cudaSuccess; }
cudaError_t sal_concat(const void*, DType, const int64_t*, const void*, void*, DType, int64_t, int64_t, int64_t,
                       cudaStream_t) { ++g_launches; return cudaSuccess; }
cudaError_t greedy_accept(const GreedyAcceptParams&, DType, cudaStream_t) { ++g_launches; return cudaSuccess; }
}  // namespace amphista
"""


def _cuda_home() -> Path | None:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            home = Path(cand).resolve().parents[1]
            if (home / "include" / "cuda_runtime_api.h").is_file():
                return home
    return None


# One build per process: a second copy of the stub module loaded beside the first (another test file imports this
# fixture, and pytest runs both files in one worker) counted its launches where the first's counter did not look
_BUILT: dict = {}


@pytest.fixture(scope="module")
def stub_bindings(tmp_path_factory):
    """(module, launch counter) for csrc/bindings.cpp built against the stub kernels, host compiler only."""
    if "stub" not in _BUILT:
        _BUILT["stub"] = _build_stub(tmp_path_factory)
    return _BUILT["stub"]


def _build_stub(tmp_path_factory):
    cxx, home = shutil.which("g++") or shutil.which("c++"), _cuda_home()
    try:
        import pybind11
    except ImportError:
        pybind11 = None
    if cxx is None or home is None or pybind11 is None:
        pytest.skip("needs g++, pybind11 and the CUDA toolkit's headers")
    libdir = next((d for d in (home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib")
                   if (d / "libcudart_static.a").is_file()), None)
    if libdir is None:
        pytest.skip("libcudart_static.a not found")
    out = tmp_path_factory.mktemp("stub_bindings")
    (out / "stubs.cpp").write_text(_STUBS)
    so = out / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cxx, "-std=c++17", "-O0", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}", f"-I{home / 'include'}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", str(ROOT / "csrc" / "bindings.cpp"),
           str(out / "stubs.cpp"), "-o", str(so), f"-L{libdir}", "-lcudart_static", "-ldl", "-lpthread", "-lrt"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("_C", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    count = ctypes.CDLL(str(so)).amphista_stub_launches
    return mod, count


def test_stub_bindings_keep_every_documented_check(stub_bindings):
    """test_cuda_build's cases (good arguments, then one bad override each) on the stub build: the good calls reach
    the launch, every bad one is a ValueError naming its argument and launches nothing. Keeps the size checks
    rewritten below from loosening or tightening what the full CMake build's test pins."""
    mod, launches = stub_bindings
    for fn, (good, bads) in BINDING_CASES.items():
        before = launches()
        getattr(mod, fn)(**good)
        assert launches() == before + 1, fn
        for bad in bads:
            arg = next(iter(bad))
            with pytest.raises(ValueError, match=f"argument '{arg}'"):
                getattr(mod, fn)(**{**good, **bad})
        assert launches() == before + 1, fn


# (binding, overrides of its good arguments, the argument the error must name). Each product of sizes below is a
# multiple of 2^64 (or wraps under a limit) in int64: before the fix the check passed and the call was launched.
WRAPPING_SIZES = [
    ("tree_attention", dict(B=2**32, H=2**32, H_kv=2**32), "B"),              # B * H_kv = 2^64 -> 0 <= 65535
    ("kv_compact", dict(L=1, B_max=1, B=1, H=1, S=1, D=2**32, M=2**32), "M"),  # M * D * 2 -> 0 <= 48 KiB of smem
    ("kv_compact", dict(L=2**20, B_max=2**20, B=1, H=16, S=2**20, D=16), "S"),  # the cache's 2^84 elements -> 0
    ("greedy_accept", dict(B=2**32, N=2**32), "N"),                           # one block per node row: 0 blocks
    ("rope", dict(B=2**20, T=2**20, H=2**20, D=2**20, rope_sb=0, x_strides=[0, 0, 0]), "B"),
    ("kv_write", dict(L=2**20, B_max=2**20, H=2**20, S=16, D=16, k_strides=[0, 0, 0], v_strides=[0, 0, 0]), "S"),
    ("sal_concat", dict(rows=2**32, d=2**32), "rows"),
    ("head_attention", dict(rows=2**20, slots=64, n_heads=2**30, head_dim=256), "n_heads"),
    # the kernel takes n_heads as an int: 2^32 + 8 became 8 there, and warps up to 2^32 + 8 read rows past qkv
    ("head_attention", dict(rows=1, slots=1, n_heads=2**32 + 8, head_dim=1), "n_heads"),
]


@pytest.mark.parametrize("fn,over,arg", WRAPPING_SIZES,
                         ids=[f"{fn}-{arg}-{i}" for i, (fn, _, arg) in enumerate(WRAPPING_SIZES)])
def test_size_products_that_wrap_int64_are_refused(stub_bindings, fn, over, arg):
    mod, launches = stub_bindings
    before = launches()
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        getattr(mod, fn)(**{**BINDING_CASES[fn][0], **over})
    assert launches() == before


def test_largest_int_head_count_still_launches(stub_bindings):
    """The new bound is the kernel's int, not tighter: n_heads = 2^31 - 1 with one slot of head dim 1 passes."""
    mod, launches = stub_bindings
    before = launches()
    good = BINDING_CASES["head_attention"][0]
    mod.head_attention(**{**good, "rows": 1, "slots": 1, "n_heads": 2**31 - 1, "head_dim": 1})
    assert launches() == before + 1


# ---- CPU: a wrapper that accepts what its binding refuses ---------------------------------------------------


def test_tree_attention_wrapper_declines_a_grid_the_kernel_cannot_launch(monkeypatch):
    """B * H_kv > 65535 (the kernel's grid y) made the binding raise ValueError instead of the op falling through
    to triton / torch: the wrapper declines it now."""
    wrappers_on_cpu(monkeypatch)
    B = 16385                                                  # x 4 KV heads = 65540 > 65535
    q = torch.zeros(B, 4, 1, 64, dtype=torch.bfloat16)
    kc = torch.zeros(B, 4, 1, 64, dtype=torch.bfloat16)
    bits = torch.ones(1, 1, dtype=torch.long)
    assert cuda_ops.tree_attention(q, kc, kc, torch.zeros(B, dtype=torch.long), bits, 1) is NotImplemented


# ---- GPU: int64 addressing past 2^31 elements --------------------------------------------------------------
def _ext_or_skip():
    if load_extension() is None:
        pytest.skip("extension not built")


def _free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30


@needs_gpu
@pytest.mark.parametrize("splits,merge", [(1, None), (3, "kernel"), (3, "launch")])
def test_tree_attention_batch_row_past_2_31_elements(splits, merge, poisoned):
    """K/V views whose second batch row starts 2^31 + 64 elements into the buffer (one 4.3 GB bf16 buffer each):
    an offset computed in 32 bits would wrap and read row 0's or foreign memory."""
    _ext_or_skip()
    if _free_gib() < 10:
        pytest.skip("needs ~9 GiB of free GPU memory")
    B, H, Hkv, N, D, S, kv_len = 2, 4, 2, 5, 128, 256, 200
    sb = 2**31 + 64                                              # batch stride (a multiple of 8 elements)
    g = gen("static-review-int64", splits, merge)
    bufs = [torch.full((sb + Hkv * S * D,), float("nan"), dtype=torch.bfloat16, device=DEV) for _ in range(2)]
    k, v = (buf.as_strided((B, Hkv, S, D), (sb, S * D, D, 1)) for buf in bufs)
    k.copy_(randn(g, B, Hkv, S, D, dtype=torch.bfloat16))
    v.copy_(randn(g, B, Hkv, S, D, dtype=torch.bfloat16))
    prefix = torch.tensor([150, 190], device=DEV)
    q = randn(g, B, N, H, D, dtype=torch.bfloat16).transpose(1, 2)
    bits = reference.mask_bits(torch.ones(N, N, dtype=torch.bool).tril()[None]).to(DEV)
    ref = reference.tree_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), prefix.cpu(), bits.cpu(),
                                   kv_len)
    out = cuda_ops.tree_attention(q, k, v, prefix, bits, kv_len, splits=splits, merge=merge)
    assert out is not NotImplemented
    torch.cuda.synchronize()
    del bufs, k, v
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref) < TOL[torch.bfloat16], rel_err(out.cpu(), ref)


@needs_gpu
def test_kv_write_and_compact_in_a_layer_past_2_31_elements():
    """A [65, 1, 8, 32768, 128] fp16 cache (2^31 + 2^25 elements each for K and V): kv_write into the last layer
    and kv_compact (every layer, one launch) land at the right bytes there."""
    _ext_or_skip()
    if _free_gib() < 10:
        pytest.skip("needs ~9 GiB of free GPU memory")
    L, H, S, D = 65, 8, 32768, 128
    kb = torch.empty(L, 1, H, S, D, dtype=torch.float16, device=DEV)
    vb = torch.empty_like(kb)
    g = gen("static-review-kv-int64")
    start = torch.tensor([S - 40], device=DEV)
    k, v = randn(g, 1, H, 8, D, dtype=torch.float16), randn(g, 1, H, 8, D, dtype=torch.float16)
    assert cuda_ops.kv_write(kb, vb, L - 1, start, k, v) is None
    torch.cuda.synchronize()
    assert torch.equal(kb[L - 1, 0, :, S - 40:S - 32], k[0]) and torch.equal(vb[L - 1, 0, :, S - 40:S - 32], v[0])
    # accepted path of the tree slots: S-40 (kept), S-37, S-33 -> contiguous from S-40 on (sources overlap dsts)
    src = torch.tensor([[S - 40, S - 37, S - 33]], device=DEV)
    want_k = kb[L - 1, 0][:, src[0]].clone()
    want_v = vb[L - 1, 0][:, src[0]].clone()
    assert cuda_ops.kv_compact(kb, vb, src, torch.tensor([S - 40], device=DEV)) is None
    torch.cuda.synchronize()
    got_k, got_v = kb[L - 1, 0, :, S - 40:S - 37].clone(), vb[L - 1, 0, :, S - 40:S - 37].clone()
    del kb, vb
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


# ---- GPU: 64 nodes, prefix 0, splits past the chunks, +-inf where no row may look ------------------------------
@needs_gpu
@pytest.mark.parametrize("dtype,D", [(torch.float16, 64), (torch.bfloat16, 128)])
@pytest.mark.parametrize("splits", [1, 3, 9])                   # kv_len 390: 7 chunks, so 9 leaves 2 splits empty
def test_tree_attention_64_nodes_prefix_0_and_inf_past_the_rows(dtype, D, splits, poisoned):
    _ext_or_skip()
    B, H, Hkv, N, kv_len = 2, 8, 2, 64, 390                      # GQA 4: 256 rows, 4 row tiles
    g = gen("static-review-64", dtype, D, splits)
    prefixes = [0, 300]
    k = randn(g, B, Hkv, kv_len, D, dtype=dtype)
    v = randn(g, B, Hkv, kv_len, D, dtype=dtype)
    q = randn(g, B, N, H, D, dtype=dtype).transpose(1, 2)
    rows = torch.stack([torch.ones(N, N, dtype=torch.bool).tril(), torch.rand(N, N, generator=g) < 0.3])
    rows[1] |= torch.eye(N, dtype=torch.bool)
    rows[0, 0] = False                                           # row 0 (prefix 0), node 0: no key at all
    bits = reference.mask_bits(rows).to(DEV)                     # node 63's bit 63: a negative int64
    prefix = torch.tensor(prefixes, device=DEV)
    ref = reference.tree_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), prefix.cpu(), bits.cpu(),
                                   kv_len)
    for b, p in enumerate(prefixes):                              # K may be read past a row's end, never used
        k[b, :, p + N:], v[b, :, p + N:] = float("inf"), float("-inf")
    outs = []
    for merge in ("kernel", "launch"):
        out = cuda_ops.tree_attention(q, k, v, prefix, bits, kv_len, splits=splits, merge=merge)
        assert out is not NotImplemented
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), merge
        assert rel_err(out.cpu(), ref) < TOL[dtype], (merge, rel_err(out.cpu(), ref))
        assert (out[0, :, 0] == 0).all(), merge
        outs.append(out)
    assert torch.equal(*outs)


def test_gpus_older_than_sm80_fall_through_to_the_other_backends(monkeypatch):
    """The kernels are built for sm_80+ (cp.async, bf16 mma): on a T4 (sm_75) the cuda backend raised "no kernel
    image" instead of declining; it declines there now, and takes 8.0 and later."""
    monkeypatch.setattr(cuda_ops, "load_extension", lambda: object())
    for capability, ready in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(cuda_ops, "_capable", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx, c=capability: c)
        assert cuda_ops._ready(torch.device("cuda", 0)) is ready
    assert cuda_ops._ready(torch.device("cpu")) is False
