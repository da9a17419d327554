"""bf16 CPU linears with pre-packed weights (kernels/cpu_packed.py) against fp32 F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amphista_engine.kernels import cpu_packed

pytestmark = pytest.mark.skipif(not cpu_packed.available(), reason="oneDNN without bf16 support on this CPU")


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(1, 1), (1, 16), (2, 64), (3, 37)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_reference(shape, bias):
    torch.manual_seed(sum(shape) + bias)
    lin = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    ref_w = lin.weight.float().clone()
    ref_b = lin.bias.float().clone() if bias else None
    assert cpu_packed.pack_linears(lin) == 1 and isinstance(lin, cpu_packed.PackedLinear)
    x = torch.randn(*shape, 96).to(torch.bfloat16)
    with torch.no_grad():
        y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (*shape, 160)
    assert rel_err(y, F.linear(x.float(), ref_w, ref_b)) < 1e-2
    assert "weight" in lin.state_dict() and len(lin.state_dict()) == 1 + bias     # same parameters


def test_non_contiguous_input_and_weight_updates_repack():
    lin = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    cpu_packed.pack_linears(lin)
    x = torch.randn(4, 5, 128).to(torch.bfloat16)[:, :, ::2]          # strided view
    with torch.no_grad():
        assert rel_err(lin(x), F.linear(x.float(), lin.weight.float())) < 1e-2
        lin.weight.copy_(torch.randn(48, 64))                           # edited in place after packing
        assert rel_err(lin(x), F.linear(x.float(), lin.weight.float())) < 1e-2
    lin.load_state_dict({"weight": torch.randn(48, 64).to(torch.bfloat16)})
    with torch.no_grad():
        assert rel_err(lin(x), F.linear(x.float(), lin.weight.float())) < 1e-2


def test_fallbacks_keep_autograd_and_other_dtypes():
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    cpu_packed.pack_linears(lin)
    x = torch.randn(3, 32, dtype=torch.bfloat16, requires_grad=True)
    lin(x).float().sum().backward()                                    # grad path: plain F.linear
    assert x.grad is not None and lin.weight.grad is not None
    assert cpu_packed.pack_linears(nn.Linear(8, 8)) == 0               # fp32 layers are left alone


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
    assert not Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128).cpu_packed    # fp32


def test_linear_on_a_bare_weight_caches_and_follows_changes():
    w = torch.randn(40, 24).to(torch.bfloat16)
    x = torch.randn(2, 4, 24).to(torch.bfloat16)
    with torch.no_grad():
        assert rel_err(cpu_packed.linear(x, w), F.linear(x.float(), w.float())) < 1e-2
        first = cpu_packed._weights[id(w)][2]
        cpu_packed.linear(x, w)
        assert cpu_packed._weights[id(w)][2] is first                   # packed once
        w.mul_(-2)                                                       # edited in place: repacked
        assert rel_err(cpu_packed.linear(x, w), F.linear(x.float(), w.float())) < 1e-2
    y = cpu_packed.linear(x.float(), w.float())                          # fp32: plain F.linear
    assert y.dtype == torch.float32


def test_inference_tensors_are_packed_too():
    with torch.inference_mode():
        w = torch.randn(40, 24).to(torch.bfloat16)          # an inference tensor: no version counter
        lin = nn.Linear(24, 40, bias=False).to(torch.bfloat16)
        cpu_packed.pack_linears(lin)
        x = torch.randn(3, 24).to(torch.bfloat16)
        assert rel_err(cpu_packed.linear(x, w), F.linear(x.float(), w.float())) < 1e-2
        assert rel_err(lin(x), F.linear(x.float(), lin.weight.float())) < 1e-2
