"""CPU linear layers with weights laid out for oneDNN once, not per call (bf16 and fp32 inference).

bf16: PyTorch's eager bf16 `F.linear` on the CPU reorders the weight into oneDNN's blocked layout on every call,
so a one-token decoding step runs slower in bf16 than in fp32 even on a CPU with bf16 matrix units. Packing once
(what Inductor's CPU "freezing" does) removes that, and leaves the bf16 matrix units' real advantage: a
16..64-row tree verification costs little more than one token (benchmarks/results/cpu_bf16/).

fp32: eager `F.linear` goes to MKL's sgemm, whose small-M paths are slow on AMD CPUs (MKL takes its generic
code there): on an AVX2 AMD EPYC, oneDNN's packed fp32 weights made a 16-row target forward 1.4x faster
(benchmarks/results/cpu_fp32_pack_ab.md), on an AMX Intel Xeon 1.02-1.24x. On the EPYC oneDNN also computes each
row the same bits for any row count from 1 to 64, where MKL does not (a lone row differs from the same row among 16
in most outputs), so a tree node's linear outputs equal plain decoding's for the same token; the row pieces
below keep that where a CPU's kernels change with the row count.

Used by the engine for inference only (`pack_linears` on the target and the heads on the CPU); a layer whose
weight changed, an input that needs a gradient, or anything but a bf16/fp32 CPU tensor falls back to
`F.linear`. The packed copy is a second copy of the weight, unless the weight is dropped (`drop_float_weights`,
what `Engine.from_pretrained` does to the target it loaded itself): the copy is then the only one, and the float
weight a meta tensor (shape and dtype, no memory); oneDNN's reorder only permutes elements, so `float_rows` reads
the exact values back.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from ..env_settings import env_switch

ENV_VAR = "AMPHISTA_CPU_PACK"     # 0 / off / false / no turns packing off (A/B timing, or a misbehaving oneDNN)
DTYPES = (torch.bfloat16, torch.float32)
# oneDNN computes a row identically for every row count up to 32, but not beyond (measured on AMX with 1 and 2
# threads: the MLP's up-projection and the LM head change kernels at 33 rows). Tree verifications of up to
# CHUNKED_UP_TO rows therefore run in 32-row pieces, so each node's logits equal those plain decoding computes
# for the same token (kernels/cpu_exact.py). Longer inputs are left whole: they are prefills, which every
# decoder shares, and 32-row pieces would re-read the weights for each.
ROW_CHUNK = 32
CHUNKED_UP_TO = 64
# Without AMX (AVX-512 bf16, e.g. a Zen 4 AMD EPYC) oneDNN multiplies a single row with another kernel than two or more
# rows (measured: the 1536 -> 576 down-projection rounds 1 row in ~1,000 outputs differently), so no call gets
# fewer than MIN_ROWS rows: a plain step's one row is padded to two, and a last 32-row piece of one row is
# avoided. Rows 2..32 agree bit for bit on both CPUs. fp32 depends on the CPU: on an AVX2 EPYC a lone row matched
# the same row among 2..64 bit for bit (and padding cost ~9% of a plain step there), on an AVX-512 EPYC (Zen 4,
# 2026-12-03) it did not, so `min_rows_fp32` asks oneDNN once per process.
MIN_ROWS = 2
# Set around a decode step with more rows than CHUNKED_UP_TO that must still keep each row's bits (a batch's
# trees: 3 rows x tree-32 = 96 rows, where a bf16 greedy speculative row left the batch's plain row at SmolLM2's
# 15th token): every call then runs in ROW_CHUNK pieces, whatever its row count.
_ALL_ROWS_INVARIANT: ContextVar[bool] = ContextVar("amphista_packed_all_rows", default=False)


def requested() -> bool:
    """AMPHISTA_CPU_PACK: on unless switched off (read on every call)."""
    return bool(env_switch(ENV_VAR, True))


@functools.cache
def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """oneDNN's packed linear for `dtype` (bf16 needs a CPU with bf16 support), and AMPHISTA_CPU_PACK not off
    (read once per process; a bad value is an error for every dtype, so it is read first)."""
    if not requested():
        return False
    mk = getattr(torch.ops, "mkldnn", None)
    try:
        return (dtype in DTYPES and torch.backends.mkldnn.is_available()
                and hasattr(mk, "_reorder_linear_weight") and hasattr(mk, "_linear_pointwise")
                and (dtype != torch.bfloat16 or bool(mk._is_mkldnn_bf16_supported())))
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def min_rows_fp32() -> int:
    """1 where oneDNN computes a lone fp32 row as it computes that row among others, else MIN_ROWS. Probed on
    SmolLM2's down-projection shape (K = 1536, where the bf16 difference showed), 8 rows of random inputs."""
    gen = torch.Generator().manual_seed(0)
    packed = _pack(torch.randn(576, 1536, generator=gen))
    x = 3 * torch.randn(8, 1536, generator=gen)

    def mm(rows):
        return torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")

    alone = torch.cat([mm(x[i:i + 1]) for i in range(len(x))])
    return 1 if all(torch.equal(mm(x[:m]), alone[:m]) for m in (2, 3, 8)) else MIN_ROWS


def _pack(w: torch.Tensor) -> torch.Tensor:
    # The layout hint is the row count oneDNN should favour: 16 = a CPU tree verification; one-token steps
    # measured the same as with the default layout (within this VM's noise), tree steps faster.
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)


def _applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """CPU inference: both bf16 or both fp32 on the CPU, a dtype oneDNN packs on this CPU (a bf16 model made by
    .to() on a CPU without bf16 support failed in the reorder), and no gradient to track."""
    return (x.dtype == w.dtype and available(w.dtype) and x.device.type == "cpu"
            and w.device.type == "cpu" and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)))


def _stamp(w: torch.Tensor):
    """What identifies w's current values: storage and version (inference tensors have no version counter;
    they cannot be edited outside inference mode, so their storage identifies them)."""
    return w.data_ptr(), (None if w.is_inference() else w._version)


class PackedLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) that multiplies with a pre-packed copy of its weight."""

    _packed = None
    _packed_of = None     # (data_ptr, version) of the weight the copy was packed from

    def _pack(self):
        w = self.weight
        self._packed = _pack(w)
        self._packed_of = _stamp(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.is_meta and self._packed is not None:              # the packed copy is the weight (drop_float_weight)
            if _applies(x, self._packed):
                return _packed_linear(x, self._packed, self.bias)
            return F.linear(x, self.float_rows(), self.bias)    # a gradient to carry, or another dtype: rare
        if not _applies(x, w):
            return F.linear(x, w, self.bias)
        if self._packed_of != _stamp(w):                       # weights loaded or edited since packing
            self._pack()
        return _packed_linear(x, self._packed, self.bias)

    def drop_float_weight(self):
        """Frees the float weight, keeping the packed copy as the only one (a meta tensor of the weight's shape and
        dtype stays, as cpu_quant's layers keep). Only for a model nobody edits or trains afterwards: the engine's
        own target."""
        if self._packed is None or self._packed_of != _stamp(self.weight):
            self._pack()
        self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta"),
                                   requires_grad=False)

    def float_rows(self, rows: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ([out, in], or the rows `rows` picks) in `dtype` (the weight's): the float weight where it
        is kept, else read back from the packed copy, exactly (a transient dense copy of the whole weight)."""
        dtype = dtype or self.weight.dtype
        w = self.weight.detach() if not self.weight.is_meta else self._packed.to_dense()
        return (w if rows is None else w.index_select(0, rows.to(w.device))).to(dtype)

    def _freed(self) -> bool:
        return self.weight.is_meta and self._packed is not None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the same state dict as an nn.Linear's: a freed weight's values, read back (a meta tensor saved nothing)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._freed():
            destination[prefix + "weight"] = self.float_rows()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # loading into a meta weight was a no-op (torch only warned): take the values, then hold them packed again
        freed = self._freed()
        if freed:
            self.weight = nn.Parameter(self.float_rows(), requires_grad=self.weight.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if freed:
            self.drop_float_weight()

    def _apply(self, fn, recurse=True):
        # .to(dtype / device), .half(), .cuda(): a freed weight's values go along (a meta weight only changed its
        # dtype, and every forward then densified the stale packed copy, or met another device's input); the
        # float weight is kept from then on, as for a model nobody freed
        if self._freed():
            probe = fn(torch.empty(0, dtype=self.weight.dtype, device="cpu"))
            if probe.dtype != self.weight.dtype or probe.device.type != "cpu":
                self.weight = nn.Parameter(self.float_rows(), requires_grad=self.weight.requires_grad)
                self._packed = self._packed_of = None
        return super()._apply(fn, recurse)


@contextlib.contextmanager
def invariant_rows(on: bool = True):
    """Within the block (on=True), packed products of any row count keep each row's bits (ROW_CHUNK pieces)."""
    token = _ALL_ROWS_INVARIANT.set(on)
    try:
        yield
    finally:
        _ALL_ROWS_INVARIANT.reset(token)


def _row_pieces(rows: int, min_rows: int = MIN_ROWS) -> list[int]:
    """Row counts of the oneDNN calls for rows >= min_rows: each min_rows..ROW_CHUNK up to CHUNKED_UP_TO rows
    (any count inside invariant_rows())."""
    if rows <= ROW_CHUNK or (rows > CHUNKED_UP_TO and not _ALL_ROWS_INVARIANT.get()):
        return [rows]
    pieces = [ROW_CHUNK] * (rows // ROW_CHUNK) + ([rows % ROW_CHUNK] if rows % ROW_CHUNK else [])
    if pieces[-1] < min_rows:
        pieces[-2:] = [pieces[-2] - (min_rows - pieces[-1]), min_rows]
    return pieces


def _mm(x: torch.Tensor, packed: torch.Tensor, bias) -> torch.Tensor:
    """One oneDNN call (the unit whose row count decides the rounding)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    min_rows = min_rows_fp32() if x.dtype == torch.float32 else MIN_ROWS
    if rows < min_rows:
        padded = torch.cat([flat, flat.new_zeros(min_rows - rows, flat.shape[-1])])
        out = _mm(padded, packed, bias)[:rows]
    else:
        pieces = _row_pieces(rows, min_rows)
        if len(pieces) == 1:
            return _mm(x, packed, bias)
        out = torch.cat([_mm(c, packed, bias) for c in flat.split(pieces)])
    return out.view(*x.shape[:-1], out.shape[-1])


_weights: dict[int, tuple] = {}    # id(weight) -> (weakref, _stamp, packed copy)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for a weight that is not an nn.Linear's (the drafting heads' shared LM head rows): CPU
    inference uses a packed copy, made on first use and remade when w changes or is freed."""
    if not (_applies(x, w) and available(w.dtype)):
        return F.linear(x, w)
    entry = _weights.get(id(w))
    if entry is None or entry[0]() is not w or entry[1] != _stamp(w):
        for k in [k for k, e in _weights.items() if e[0]() is None]:
            del _weights[k]
        entry = _weights[id(w)] = (weakref.ref(w), _stamp(w), _pack(w))
    return _packed_linear(x, entry[2], None)


def pack_linears(module: nn.Module, free_floats: bool = False) -> int:
    """Turns every bf16/fp32 CPU nn.Linear inside `module` into a PackedLinear (where oneDNN packs that
    dtype); returns how many. free_floats (a target nobody else holds: Engine.from_pretrained's): each layer's float
    weight is freed as soon as its copy is packed, so the weights are held once and the load never holds both
    copies of the whole model; an LM head tied to the embedding keeps it (the embedding reads it), and an untied
    one first records what the heads' checkpoint check reads (its fingerprint and sketch rows), as
    cpu_quant.quantize_head does."""
    head = getattr(module, "output", None)
    tied = head is not None and head.weight is getattr(getattr(module, "tok_embeddings", None), "weight", None)
    if free_floats and type(head) is nn.Linear and not tied and not head.weight.is_meta:
        from ..heads.checkpoint import CHECKPOINT_FINGERPRINT, lm_head_fingerprint, lm_head_sketch
        setattr(head, CHECKPOINT_FINGERPRINT, lm_head_fingerprint(head))     # the loader's, or of these values
        head.sketch = lm_head_sketch(head)
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and available(m.weight.dtype):
            m.__class__ = PackedLinear
            m._pack()
            n += 1
            if free_floats and not (m is head and tied):
                m.drop_float_weight()
    if free_floats and n:
        from ..loading import trim_heap
        trim_heap()
    return n
