"""bf16 and fp32 CPU linears with pre-packed weights (kernels/cpu_packed.py) against fp32 F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amphista_engine.kernels import cpu_packed

needs_bf16_packing = pytest.mark.skipif(not cpu_packed.available(), reason="oneDNN without bf16 support on this CPU")
needs_fp32_packing = pytest.mark.skipif(not cpu_packed.available(torch.float32), reason="no oneDNN packed linear")
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
PACKED_DTYPES = pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_bf16_packing),
                                                  pytest.param(torch.float32, marks=needs_fp32_packing)])


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@PACKED_DTYPES
@pytest.mark.parametrize("shape", [(1, 1), (1, 16), (2, 64), (3, 37)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_reference(shape, bias, dtype):
    torch.manual_seed(sum(shape) + bias)
    lin = nn.Linear(96, 160, bias=bias).to(dtype)
    ref_w = lin.weight.double().clone()
    ref_b = lin.bias.double().clone() if bias else None
    assert cpu_packed.pack_linears(lin) == 1 and isinstance(lin, cpu_packed.PackedLinear)
    x = torch.randn(*shape, 96).to(dtype)
    with torch.no_grad():
        y = lin(x)
    assert y.dtype == dtype and y.shape == (*shape, 160)
    assert rel_err(y.double(), F.linear(x.double(), ref_w, ref_b)) < TOL[dtype]
    assert "weight" in lin.state_dict() and len(lin.state_dict()) == 1 + bias     # same parameters


def ref_linear(x, w):
    return F.linear(x.double(), w.double())


@PACKED_DTYPES
def test_non_contiguous_input_and_weight_updates_repack(dtype):
    lin = nn.Linear(64, 48, bias=False).to(dtype)
    cpu_packed.pack_linears(lin)
    x = torch.randn(4, 5, 128).to(dtype)[:, :, ::2]                    # strided view
    with torch.no_grad():
        assert rel_err(lin(x), ref_linear(x, lin.weight)) < TOL[dtype]
        lin.weight.copy_(torch.randn(48, 64))                           # edited in place after packing
        assert rel_err(lin(x), ref_linear(x, lin.weight)) < TOL[dtype]
    lin.load_state_dict({"weight": torch.randn(48, 64).to(dtype)})
    with torch.no_grad():
        assert rel_err(lin(x), ref_linear(x, lin.weight)) < TOL[dtype]


@needs_bf16_packing
def test_fallbacks_keep_autograd_and_other_dtypes():
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    cpu_packed.pack_linears(lin)
    x = torch.randn(3, 32, dtype=torch.bfloat16, requires_grad=True)
    lin(x).float().sum().backward()                                    # grad path: plain F.linear
    assert x.grad is not None and lin.weight.grad is not None
    assert cpu_packed.pack_linears(nn.Linear(8, 8).half()) == 0        # fp16 layers are left alone
    fp32 = nn.Linear(8, 8)
    if cpu_packed.pack_linears(fp32):                                  # fp32: packed, yet trains through F.linear
        x = torch.randn(2, 8, requires_grad=True)
        fp32(x).sum().backward()
        assert x.grad is not None and fp32.weight.grad is not None


@needs_bf16_packing
def test_bf16_cpu_engine_packs_target_and_heads(tmp_path, tiny_hf_dir):
    from amphista_engine.engine import Engine
    from amphista_engine.heads import new_heads, save_heads
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="bf16", max_seq_len=128)
    assert engine.cpu_packed
    assert all(type(m) is not nn.Linear for m in engine.model.modules())
    save_heads(new_heads("amphista", engine.model, num_heads=2, dtype=torch.float32), tmp_path / "h")
    engine.load_heads(tmp_path / "h")
    assert any(isinstance(m, cpu_packed.PackedLinear) for m in engine.heads.modules())
    ids = torch.tensor([[1, 5, 9, 3]])
    pos = torch.arange(4)[None]
    with torch.no_grad():
        packed = engine.model(ids, pos).float()
        ref = engine.model.float()(ids, pos)          # fp32 weights: every PackedLinear falls back to F.linear
    assert rel_err(packed, ref) < 3e-2


@needs_fp32_packing
def test_fp32_cpu_engine_packs_and_agrees_with_f_linear(tiny_hf_dir, monkeypatch):
    from amphista_engine.engine import Engine
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)       # fp32 by default
    assert engine.cpu_packed and all(type(m) is not nn.Linear for m in engine.model.modules())
    monkeypatch.setenv(cpu_packed.ENV_VAR, "0")
    cpu_packed.available.cache_clear()
    try:
        plain = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128)
    finally:
        monkeypatch.undo()
        cpu_packed.available.cache_clear()
    assert not plain.cpu_packed and any(type(m) is nn.Linear for m in plain.model.modules())
    ids, pos = torch.tensor([[1, 5, 9, 3]]), torch.arange(4)[None]
    with torch.no_grad():
        assert rel_err(engine.model(ids, pos), plain.model(ids, pos)) < 1e-5


@PACKED_DTYPES
def test_linear_on_a_bare_weight_caches_and_follows_changes(dtype):
    w = torch.randn(40, 24).to(dtype)
    x = torch.randn(2, 4, 24).to(dtype)
    with torch.no_grad():
        assert rel_err(cpu_packed.linear(x, w), ref_linear(x, w)) < TOL[dtype]
        first = cpu_packed._weights[id(w)][2]
        cpu_packed.linear(x, w)
        assert cpu_packed._weights[id(w)][2] is first                   # packed once
        w.mul_(-2)                                                       # edited in place: repacked
        assert rel_err(cpu_packed.linear(x, w), ref_linear(x, w)) < TOL[dtype]
        assert cpu_packed._weights[id(w)][2] is not first
    y = cpu_packed.linear(x.half(), w.half())                            # fp16: plain F.linear
    assert y.dtype == torch.float16


@PACKED_DTYPES
def test_inference_tensors_are_packed_too(dtype):
    with torch.inference_mode():
        w = torch.randn(40, 24).to(dtype)                   # an inference tensor: no version counter
        lin = nn.Linear(24, 40, bias=False).to(dtype)
        cpu_packed.pack_linears(lin)
        x = torch.randn(3, 24).to(dtype)
        assert rel_err(cpu_packed.linear(x, w), ref_linear(x, w)) < TOL[dtype]
        assert id(w) in cpu_packed._weights
        assert rel_err(lin(x), ref_linear(x, lin.weight)) < TOL[dtype]
