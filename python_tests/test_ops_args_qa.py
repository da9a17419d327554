"""Every hot op in kernels.ops refuses a wrong input on the host with an error naming the op and the argument,
before any backend runs (a raw torch error, an opaque kernel error, an out-of-bounds access or a silent broadcast
otherwise); valid calls still equal the reference."""
from __future__ import annotations

import pytest
import torch

from amphista_engine.errors import ConfigError, InputError
from amphista_engine.kernels import ops, reference

F32, BF16, LONG = torch.float32, torch.bfloat16, torch.long


def _r(*shape, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ---- valid arguments, one builder per op (small CPU tensors) ------------------------------------------------
def head_attention_args():
    return dict(z=_r(2, 3, 8), pos_emb=_r(3, 8, seed=1), norm_w=_r(8, seed=2), eps=1e-5, wqkv=_r(24, 8, seed=3),
                n_heads=2)


def fused_sal_input_args():
    return dict(hidden=_r(2, 3, 8), tokens=torch.tensor([[1, 2, 3], [4, 5, 9]]), emb_weight=_r(10, 8, seed=1),
                w_fuse=_r(8, 16, seed=2))


def rmsnorm_args():
    return dict(x=_r(2, 3, 8), w=_r(8, seed=1), eps=1e-5)


def add_rmsnorm_args():
    return dict(x=_r(2, 3, 8), residual=_r(2, 3, 8, seed=1), w=_r(8, seed=2), eps=1e-5)


def rope_args():
    return dict(x=_r(2, 3, 2, 8), rope_rows=_r(2, 3, 8, seed=1))


def linear_args():
    return dict(x=_r(2, 3, 8), w=_r(5, 8, seed=1))


def fused_linear_args():
    return dict(x=_r(2, 3, 8), w=_r(5, 8, seed=1), norm_weight=_r(8, seed=2), eps=1e-5, residual=_r(2, 3, 5, seed=3))


def silu_mul_args():
    return dict(x=_r(2, 6))


def _cache(L=2, B_max=3, H=2, S=6, D=4, dtype=F32):
    return torch.zeros(L, B_max, H, S, D, dtype=dtype), torch.zeros(L, B_max, H, S, D, dtype=dtype)


def kv_write_args():
    k_buf, v_buf = _cache()
    return dict(k_buf=k_buf, v_buf=v_buf, layer=1, start=torch.tensor([0, 2]), k=_r(2, 2, 3, 4),
                v=_r(2, 2, 3, 4, seed=1))


def qkv_rope_write_args():
    k_buf, v_buf = _cache()
    return dict(qkv=_r(2, 3, 24), rope_rows=_r(2, 3, 4, seed=1), k_buf=k_buf, v_buf=v_buf, layer=0,
                start=torch.tensor([1, 0]), n_heads=2, n_kv_heads=2)


def kv_compact_args():
    k_buf, v_buf = _cache()
    k_buf.copy_(_r(*k_buf.shape))
    v_buf.copy_(_r(*v_buf.shape, seed=1))
    return dict(k_buf=k_buf, v_buf=v_buf, src=torch.tensor([[3, 4, 5], [1, 2, 0]]), dst_start=torch.tensor([1, 0]))


def _accept_args():
    # root 0 with children 1, 2; node 3 under 1, node 4 under 2
    return dict(tokens=torch.tensor([[7, 3, 5, 1, 2], [7, 4, 5, 0, 6]]), logits=_r(2, 5, 11),
                retrieve=torch.tensor([[0, 1, 3], [0, 2, 4]]))


def greedy_accept_args():
    return _accept_args()


def typical_accept_args():
    return dict(_accept_args(), temperature=0.7)


def dynamic_tree_args():
    values = _r(2, 3, 4).log_softmax(-1).sort(-1, descending=True).values
    indices = torch.randint(0, 50, (2, 3, 4), generator=torch.Generator().manual_seed(5))
    return dict(root=torch.tensor([1, 2]), values=values, indices=indices, num_nodes=6)


def _with(builder, **changes):
    return dict(builder(), **changes)


# ---- wrong inputs: (op, arguments, error, what the message names) -------------------------------------------
BAD = [
    ("head_attention", lambda: _with(head_attention_args, z=_r(3, 8)), ConfigError, "z must be"),
    ("head_attention", lambda: _with(head_attention_args, pos_emb=_r(1, 8)), ConfigError, "pos_emb"),
    ("head_attention", lambda: _with(head_attention_args, norm_w=_r(1)), ConfigError, "norm_w"),
    ("head_attention", lambda: _with(head_attention_args, wqkv=_r(24, 4)), ConfigError, "wqkv"),
    ("head_attention", lambda: _with(head_attention_args, n_heads=3), ConfigError, "n_heads"),
    ("fused_sal_input", lambda: _with(fused_sal_input_args, tokens=torch.zeros(2, 4, dtype=LONG)), ConfigError,
     "tokens"),
    ("fused_sal_input", lambda: _with(fused_sal_input_args, tokens=torch.zeros(2, 3)), ConfigError, "tokens"),
    ("fused_sal_input", lambda: _with(fused_sal_input_args, emb_weight=_r(10, 4)), ConfigError, "emb_weight"),
    ("fused_sal_input", lambda: _with(fused_sal_input_args, w_fuse=_r(8, 8)), ConfigError, "w_fuse"),
    ("rmsnorm", lambda: _with(rmsnorm_args, w=_r(1)), ConfigError, "w must be"),
    ("rmsnorm", lambda: _with(rmsnorm_args, w=_r(4)), ConfigError, "w must be"),
    ("rmsnorm", lambda: _with(rmsnorm_args, x=torch.ones(2, 8, dtype=LONG)), ConfigError, "x must be a floating"),
    ("add_rmsnorm", lambda: _with(add_rmsnorm_args, residual=_r(2, 3, 1)), ConfigError, "residual"),
    ("add_rmsnorm", lambda: _with(add_rmsnorm_args, residual=_r(4, 2, 3, 8)), ConfigError, "residual"),
    ("add_rmsnorm", lambda: _with(add_rmsnorm_args, w=_r(4)), ConfigError, "w must be"),
    ("rope", lambda: _with(rope_args, x=_r(2, 3, 8)), ConfigError, "x must be"),
    ("rope", lambda: _with(rope_args, x=_r(2, 3, 2, 7), rope_rows=_r(2, 3, 7)), ConfigError, "even"),
    ("rope", lambda: _with(rope_args, rope_rows=_r(3, 3, 8)), ConfigError, "rope_rows"),
    ("rope", lambda: _with(rope_args, rope_rows=_r(2, 3, 4)), ConfigError, "rope_rows"),
    ("rope", lambda: _with(rope_args, rope_rows=torch.ones(2, 3, 8, dtype=LONG)), ConfigError, "rope_rows"),
    ("linear", lambda: _with(linear_args, w=_r(5, 4)), ConfigError, "x must be"),
    ("linear", lambda: _with(linear_args, w=_r(8)), ConfigError, "w must be"),
    ("linear", lambda: _with(linear_args, w=_r(5, 8, dtype=BF16)), ConfigError, "dtype"),
    ("fused_linear", lambda: _with(fused_linear_args, norm_weight=None, silu=True), ConfigError, "x must be"),
    ("fused_linear", lambda: _with(fused_linear_args, norm_weight=_r(5)), ConfigError, "norm_weight"),
    ("fused_linear", lambda: _with(fused_linear_args, residual=_r(2, 3, 4)), ConfigError, "residual"),
    ("fused_linear", lambda: _with(fused_linear_args, residual=_r(4, 2, 3, 5)), ConfigError, "residual"),
    ("fused_linear", lambda: _with(fused_linear_args, norm_weight=None, w=_r(5, 8, dtype=BF16)), ConfigError,
     "dtype"),
    ("silu_mul", lambda: dict(x=_r(2, 5)), ConfigError, "x must be"),
    ("silu_mul", lambda: dict(x=torch.ones(2, 6, dtype=LONG)), ConfigError, "x must be a floating"),
    ("kv_write", lambda: _with(kv_write_args, layer=2), InputError, "layer"),
    ("kv_write", lambda: _with(kv_write_args, layer=-1), InputError, "layer"),
    ("kv_write", lambda: _with(kv_write_args, k=_r(2, 3, 3, 4), v=_r(2, 3, 3, 4)), ConfigError, "does not fit"),
    ("kv_write", lambda: _with(kv_write_args, k=_r(2, 2, 7, 4), v=_r(2, 2, 7, 4)), ConfigError, "S = 6"),
    ("kv_write", lambda: _with(kv_write_args, k=_r(4, 2, 3, 4), v=_r(4, 2, 3, 4), start=torch.zeros(4, dtype=LONG)),
     ConfigError, "B <= B_max"),
    ("kv_write", lambda: _with(kv_write_args, v=_r(2, 2, 2, 4)), ConfigError, "k and v"),
    ("kv_write", lambda: _with(kv_write_args, start=torch.tensor([0, 2], dtype=torch.int32)), ConfigError, "start"),
    ("kv_write", lambda: _with(kv_write_args, start=torch.tensor([0])), ConfigError, "start"),
    ("kv_write", lambda: _with(kv_write_args, k=_r(2, 2, 3, 4, dtype=BF16)), ConfigError, "dtype"),
    ("qkv_rope_write", lambda: _with(qkv_rope_write_args, n_kv_heads=1), ConfigError, "n_kv_heads"),
    ("qkv_rope_write", lambda: _with(qkv_rope_write_args, n_heads=3), ConfigError, "qkv's width"),
    ("qkv_rope_write", lambda: _with(qkv_rope_write_args, layer=5), InputError, "layer"),
    ("qkv_rope_write", lambda: _with(qkv_rope_write_args, start=torch.tensor([1, 0, 0])), ConfigError, "start"),
    ("qkv_rope_write", lambda: _with(qkv_rope_write_args, rope_rows=_r(2, 3, 8)), ConfigError, "rope_rows"),
    ("qkv_rope_write", lambda: _with(qkv_rope_write_args, qkv=_r(2, 7, 24), rope_rows=_r(2, 7, 4)), ConfigError,
     "S = 6"),
    ("qkv_rope_write", lambda: _with(qkv_rope_write_args, qkv=_r(2, 3, 24, dtype=BF16)), ConfigError, "dtype"),
    ("kv_compact", lambda: _with(kv_compact_args, src=torch.tensor([3, 4])), ConfigError, "src"),
    ("kv_compact", lambda: _with(kv_compact_args, src=torch.tensor([[3, 4], [1, 2]], dtype=torch.int32)),
     ConfigError, "src"),
    ("kv_compact", lambda: _with(kv_compact_args, dst_start=torch.tensor([1, 0, 0])), ConfigError, "dst_start"),
    ("kv_compact", lambda: _with(kv_compact_args, src=torch.zeros(4, 2, dtype=LONG),
                                 dst_start=torch.zeros(4, dtype=LONG)), ConfigError, "B_max"),
    ("kv_compact", lambda: _with(kv_compact_args, v_buf=torch.zeros(2, 3, 2, 5, 4)), ConfigError, "k_buf and v_buf"),
    ("greedy_accept", lambda: _with(greedy_accept_args, logits=_r(2, 4, 11)), ConfigError, "logits"),
    ("greedy_accept", lambda: _with(greedy_accept_args, retrieve=torch.tensor([[0, 1, 3]], dtype=torch.int32)),
     ConfigError, "retrieve"),
    ("greedy_accept", lambda: _with(greedy_accept_args, retrieve=torch.zeros(3, 2, 3, dtype=LONG)), ConfigError,
     "retrieve"),
    ("greedy_accept", lambda: _with(greedy_accept_args, retrieve=torch.zeros(0, 3, dtype=LONG)), ConfigError,
     "retrieve"),
    ("greedy_accept", lambda: _with(greedy_accept_args, tokens=torch.zeros(2, 5, dtype=torch.int32)), ConfigError,
     "tokens"),
    ("greedy_accept", lambda: _with(greedy_accept_args, tokens=torch.zeros(5, dtype=LONG)), ConfigError, "tokens"),
    ("typical_accept", lambda: _with(typical_accept_args, logits=_r(2, 4, 11)), ConfigError, "logits"),
    ("typical_accept", lambda: _with(typical_accept_args, retrieve=torch.tensor([[0, 1, 3]], dtype=torch.int32)),
     ConfigError, "retrieve"),
    ("dynamic_tree", lambda: _with(dynamic_tree_args, root=torch.tensor([1, 2, 3])), ConfigError, "root"),
    ("dynamic_tree", lambda: _with(dynamic_tree_args, values=torch.zeros(2, 3, 4, dtype=LONG)), ConfigError,
     "values"),
    ("dynamic_tree", lambda: _with(dynamic_tree_args, indices=torch.zeros(2, 3, 4)), ConfigError, "indices"),
    ("dynamic_tree", lambda: _with(dynamic_tree_args, num_nodes=6.0), ConfigError, "num_nodes"),
]


@pytest.mark.parametrize("op, make, err, what", BAD,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_wrong_input_is_named(op, make, err, what):
    with pytest.raises(err, match=f"^{op}: .*{what}"):
        getattr(ops, op)(**make())


def _quant_layer():
    from amphista_engine.kernels import cpu_quant
    lin = torch.nn.Linear(32, 8, bias=True)
    with torch.no_grad():
        lin.weight.copy_(_r(8, 32) * 0.1)
    lin.__class__ = cpu_quant.Int8Linear
    lin._quantize()
    return lin


def test_quant_linear_wrong_input_is_named():
    layer = _quant_layer()
    with pytest.raises(ConfigError, match="^quant_linear: x must be .*32"):
        ops.quant_linear(_r(2, 16), layer)
    with pytest.raises(ConfigError, match="^quant_linear: layer must be"):
        ops.quant_linear(_r(2, 32), torch.nn.Linear(32, 8))
    with pytest.raises(ConfigError, match="^quant_linear: x must be a floating"):
        ops.quant_linear(torch.ones(2, 32, dtype=LONG), layer)
    with torch.inference_mode():
        torch.testing.assert_close(ops.quant_linear(_r(3, 32), layer), layer.torch_forward(_r(3, 32)),
                                   atol=0.05, rtol=0.05)


# ---- valid calls: the same result as the reference ----------------------------------------------------------
def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif hasattr(a, "accept_len"):
        _same(tuple(vars(a).values()), tuple(vars(b).values()))
    elif a is None:
        assert b is None
    else:
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


IN_PLACE = {"kv_write": ("k_buf", "v_buf"), "qkv_rope_write": ("k_buf", "v_buf"), "kv_compact": ("k_buf", "v_buf")}
VALID = {
    "head_attention": [head_attention_args, lambda: _with(head_attention_args, pos_emb=None)],
    "fused_sal_input": [fused_sal_input_args,
                        lambda: _with(fused_sal_input_args, tokens=torch.tensor([[1, 2, 3], [4, 5, 9]],
                                                                                dtype=torch.int32))],
    "rmsnorm": [rmsnorm_args, lambda: _with(rmsnorm_args, x=_r(2, 3, 8, dtype=BF16))],
    "add_rmsnorm": [add_rmsnorm_args, lambda: _with(add_rmsnorm_args, residual=_r(3, 8))],
    "rope": [rope_args, lambda: _with(rope_args, rope_rows=_r(1, 3, 8)), lambda: _with(rope_args, rope_rows=_r(3, 8))],
    "linear": [linear_args],
    "fused_linear": [fused_linear_args, lambda: dict(x=_r(2, 3, 16), w=_r(5, 8, seed=1), silu=True)],
    "silu_mul": [silu_mul_args],
    "kv_write": [kv_write_args],
    "qkv_rope_write": [qkv_rope_write_args, lambda: _with(qkv_rope_write_args, rope_rows=_r(1, 3, 4))],
    "kv_compact": [kv_compact_args],
    "greedy_accept": [greedy_accept_args, lambda: _with(greedy_accept_args, retrieve=_accept_args()["retrieve"][None])],
    "typical_accept": [typical_accept_args],
    "dynamic_tree": [dynamic_tree_args],
}


@pytest.mark.parametrize("op, make", [(op, m) for op, ms in VALID.items() for m in ms],
                         ids=[f"{op}-{i}" for op, ms in VALID.items() for i in range(len(ms))])
def test_valid_call_equals_reference(op, make):
    got_args, want_args = make(), make()
    if op == "typical_accept":
        got_args["generator"] = torch.Generator().manual_seed(3)
        want_args["generator"] = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        got = getattr(ops, op)(**got_args)
        want = getattr(reference, op)(**want_args)
    _same(got, want)
    for name in IN_PLACE.get(op, ()):
        _same(got_args[name], want_args[name])


def test_linear_mixed_dtypes_stay_legal_under_autocast():
    x, w = _r(2, 8), _r(5, 8, dtype=BF16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        torch.testing.assert_close(ops.linear(x, w), torch.nn.functional.linear(x, w))


def test_tree_attention_masks_must_fit_n():
    """A new_mask or dense_mask of another N (or batch) was broadcast by the reference or misread by the kernels."""
    B, H, N, D, S = 2, 4, 3, 8, 16
    q, k, v = _r(B, H, N, D), _r(B, 2, S, D, seed=1), _r(B, 2, S, D, seed=2)
    prefix = torch.tensor([4, 6])
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    good = ops.tree_attention(q, k, v, prefix, causal[None], 10)
    torch.testing.assert_close(good, reference.tree_attention(q, k, v, prefix, causal[None], 10))
    for mask in (causal, ops.mask_bits(causal[None]), ops.mask_bits(causal[None])[0]):   # the other accepted forms
        torch.testing.assert_close(ops.tree_attention(q, k, v, prefix, mask, 10), good)
    for bad in (torch.ones(1, 4, 4, dtype=torch.bool), torch.ones(3, N, N, dtype=torch.bool),
                torch.ones(1, N, N), torch.ones(1, 4, dtype=LONG), torch.ones(3, N, dtype=LONG)):
        with pytest.raises(ConfigError, match="^tree_attention: new_mask must be"):
            ops.tree_attention(q, k, v, prefix, bad, 10)
    with pytest.raises(ConfigError, match="dense_mask None or \\[B, N, kv_len\\]"):
        ops.tree_attention(q, k, v, prefix, causal[None], 10, dense_mask=torch.ones(B, N, 9, dtype=torch.bool))
