"""4-bit weights on the CPU: a GGUF file's Q4_0/Q4_1 linear weights run as the 4-bit codes the file stores.

A CPU decoding step is bound by reading weights. Dequantized to fp32, SmolLM2's Q4_1 file becomes 8x the bytes
it holds; a 4-bit kernel reads the codes themselves. Two kernels serve these layers (ops.quant_linear):
- the cpu backend's (csrc/cpu/quant_matmul.h, the default where the extension is built): weights decoded once per
  tile for every row of the call, integer dot products (AVX-512 VNNI, or AVX2) on activations rounded to int8 in groups
  of 32, as llama.cpp runs GGUF files. A 4- or 16-row tree step costs ~1.3x / ~2.8x a plain step's weight
  products, against ~1.7x / ~6x with torch's kernel, whose cost grows with every row.
- torch's (`_weight_int4pack_mm_for_cpu`, as gpt-fast uses it; `_weight_int8pack_mm` for the LM head): bf16
  activations; the reference, and what runs without the extension (AMPHISTA_BACKEND=torch).

Codes: a GGUF file's Q4_0/Q4_1 layers come as their own codes, scales and minima (gguf_file.GGUFTensor.q4_codes,
loading.build_model), never dequantized. Any other float weights are quantized in groups of 32 two ways, asymmetric
from the group's min and max (Q4_1's own rule: min -> code 0, max -> code 15) and symmetric from its signed largest
magnitude (Q4_0's: that value -> code 0), keeping the one with the smaller error. For a group either GGUF quantizer
wrote, that recovers the file's values exactly (`requantization_error` is 0 for SmolLM2's Q4_1 file loaded in fp32,
and the same 4-bit levels within STORED_TOL of a step when loaded in bf16/fp16), which is how "auto" tells a Hugging
Face folder of 4-bit values; for any other weights it is a round-to-nearest 4-bit quantizer, and `quantize_linears`
reports its error.

What changes numerically: the cpu kernel stores each group's scale and zero point in fp16 (the file's own
precision: a Q4_0/Q4_1 file's values come back exactly) and rounds each row's activations to int8 per group of 32
(~5e-3 relative error of a product, against ~3e-3 for torch's kernel, which rounds activations, scales and
outputs to bf16). The LM head (8 bits in such files: Q8_0 or Q6_K) runs as int8 with one scale per row:
re-rounding 32-value blocks to one scale per row moves a weight by at most half a row step. Every kernel computes
a row the same bits whatever the row count (checked for 1..64 rows in python_tests/test_cpu_quant.py), so a tree
node's logits equal plain decoding's for the same token once attention is ordered too (the model's
`orders_decode`).

Memory: a layer's float weight is freed once its codes exist (Int4Linear.drop_float_weight; a meta tensor keeps its
shape and dtype), and loaders quantize layer by layer (cpu_quant.quantize_layer), so a 4-bit model holds about its
file's bytes: a 626 MiB Q4_0 file of Llama-3.2-1B's shapes went from 7.30 GiB peak / 5.47 GiB resident to 2.43 /
1.30 GiB (benchmarks/results/cpu_load_memory/). An untied LM head keeps only its int8 codes (quantize_head), and the
embedding table becomes int8 codes in groups of 32 (CodesEmbedding, exact for a GGUF Q8_0/Q4_0/Q4_1 table in fp32),
which a tied LM head shares: 1.30 -> 1.04 GiB resident for that file (benchmarks/results/cpu_load_memory_embedding/).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from . import cpu_ops
from ..errors import InputError

GROUP = 32
SCHEMES = ("none", "q4", "auto")
# A group counts as stored 4-bit when requantizing reproduces it to this fraction of its scale: fp32 rounding of
# d * q + m, or the rounding of the dtype the loader produced. Measured on SmolLM2's Q4_1 file: 0 in fp32, 0.008 in
# fp16, 0.043 in bf16, against 0.5 for Gaussian weights in every dtype; a code off by one would show as ~1.
EXACT_TOL = 1e-4
STORED_TOL = {torch.float32: EXACT_TOL, torch.float16: 0.02, torch.bfloat16: 0.1}


@functools.cache
def measured_here() -> bool:
    """Whether this CPU has the vector units the int4 kernel was measured with (x86 AVX-512, and AVX2 as PyTorch's
    and oneDNN's AVX2 kernels on that CPU: benchmarks/results/cpu_q4_ab_avx2_kernels/): "auto" switches to 4-bit
    only there; elsewhere (e.g. ARM) quant="q4" still works, untimed."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def available() -> bool:
    """This torch has both CPU kernels (torch >= 2.5)."""
    ops = torch.ops.aten
    try:
        return all(hasattr(ops, name) for name in
                   ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm"))
    except RuntimeError:
        return False


def _requantize(w: torch.Tensor):
    """w [N, K] float -> (codes [N, K] int32 in 0..15, scale [N, K/G], zero [N, K/G]) with
    w ~ (codes - 8) * scale + zero, and the largest error of each group over its |scale|."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // GROUP, GROUP)

    def codes_for(scale, zero):
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round((g - zero[..., None]) / safe[..., None] + 8).clamp_(0, 15)
        err = ((q - 8) * scale[..., None] + zero[..., None] - g).abs().amax(-1) / safe.abs()
        return q, err

    lo, hi = g.amin(-1), g.amax(-1)
    s1 = (hi - lo) / 15                                             # Q4_1: lo = code 0, hi = code 15
    q1, e1 = codes_for(s1, lo + 8 * s1)
    ext = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True))[..., 0]
    s0 = -ext / 8                                                   # Q4_0: the extreme = code 0, zero point 0
    q0, e0 = codes_for(s0, torch.zeros_like(s0))
    use0 = e0 < e1
    q = torch.where(use0[..., None], q0, q1).to(torch.int32).reshape(N, K)
    scale = torch.where(use0, s0, s1)
    zero = torch.where(use0, torch.zeros_like(s0), lo + 8 * s1)
    return q, scale, zero, torch.where(use0, e0, e1)


def requantization_error(w: torch.Tensor) -> float:
    """The largest error of 4-bit requantization in units of the group's scale (0: w is stored 4-bit)."""
    if w.dim() != 2 or w.shape[1] % GROUP:
        return float("inf")
    return float(_requantize(w)[3].max())


class _CodesLinear(nn.Linear):
    """An nn.Linear (same parameters) whose product runs on quantized codes, through ops.quant_linear: the cpu
    backend's kernel on its packed copy (`_packed_native`, int8 activations), else torch's kernels on theirs
    (bf16 activations; packed on first use when the cpu kernel's copy exists, so one copy is kept normally)."""

    _packed_native = None       # cpu_ops.PackedWeights, or None without the extension
    _torch_packed = None        # what torch's kernel takes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import ops
        return ops.quant_linear(x, self)

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> tuple["_CodesLinear", float]:
        """A layer holding only w's codes (its float weight a meta tensor: no memory): an MoE expert's matrix,
        whose float stack the caller frees. Returns (layer, 4-bit requantization error; 0 for int8 rows)."""
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
        layer.__class__ = cls
        return layer, layer._quantize_from(w)

    def drop_float_weight(self):
        """Frees the float weight the codes were made from (a meta tensor of its shape and dtype stays): a 4-bit
        model then holds about its file's bytes, not 8x them in fp32 besides. Not for the LM head, whose float
        weight the embedding and the heads share."""
        self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta"),
                                   requires_grad=False)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._torch_packed is None:
            self._torch_packed = self._pack_for_torch(*cpu_ops.unpack(self._packed_native))
        # torch's int4 / int8 products refuse strided rows (a transposed view of bf16 x reached them as is)
        y = self._torch_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous())
        y = y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias


def on_codes(module: nn.Module) -> bool:
    """Whether a linear layer multiplies quantized codes (so callers use the layer, not its float weight)."""
    return isinstance(module, _CodesLinear)


class Int4Linear(_CodesLinear):
    """4-bit codes in groups of 32 along the input, a scale and a zero point each."""

    def _quantize(self):
        return self._quantize_from(self.weight)

    def _quantize_from(self, w: torch.Tensor) -> float:
        q, scale, zero, err = _requantize(w)
        self._set_codes(q, scale, zero - 8 * scale)
        return float(err.max())

    def _set_codes(self, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor):
        """w = code * s + z per group (the cpu kernel's form; torch's is (code - 8) * s + zero)."""
        self._packed_native = cpu_ops.pack_int4(q, s, z)
        self._torch_packed = None if self._packed_native is not None else self._pack_for_torch(q, s, z)

    @classmethod
    def codes_into(cls, layer: nn.Linear, codes: "Codes4", dtype: torch.dtype):
        """A linear built on the meta device runs on a file's 4-bit codes as they are, its weight a meta tensor of
        the model's dtype (no float weight ever made: loading.build_model's GGUF Q4_0/Q4_1/Q4_K layers)."""
        layer.__class__ = cls
        layer._set_codes(codes.q, codes.s, codes.z)
        layer.weight = nn.Parameter(torch.empty(codes.shape, dtype=dtype, device="meta"), requires_grad=False)


    @staticmethod
    def _pack_for_torch(q, s, z):
        codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # [K/G, N, 2]: the kernel's layout of (scale, zero point) per group and output
        scale_zero = torch.stack([s, z + 8 * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return codes, scale_zero

    def _torch_mm(self, flat: torch.Tensor) -> torch.Tensor:
        codes, scale_zero = self._torch_packed
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, codes, GROUP, scale_zero)


class Int8Linear(_CodesLinear):
    """int8 weights, one scale per output row."""

    sketch = None       # the float rows heads.checkpoint.lm_head_sketch reads, where the float weight was freed

    def _quantize(self):
        self._quantize_from(self.weight)

    def float_rows(self, rows: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows of the weight ([V, K], or those `rows` pick) in `dtype` (the weight's): the float weight where it is
        kept, else codes x scale (within half a row step of it)."""
        dtype = dtype or self.weight.dtype
        if not self.weight.is_meta:
            w = self.weight.detach()
            return (w if rows is None else w.index_select(0, rows.to(w.device))).to(dtype)
        codes, scale = (cpu_ops.unpack(self._packed_native) if self._packed_native is not None
                        else (self._torch_packed[0], self._torch_packed[1].float()))
        if rows is not None:
            codes, scale = codes[rows.to(codes.device)], scale[rows.to(scale.device)]
        return (codes.float() * scale.float()[:, None]).to(dtype)

    def _quantize_from(self, w: torch.Tensor) -> float:
        codes, scale = _int8_rows(w)
        self._packed_native = cpu_ops.pack_int8(codes, scale)
        self._torch_packed = None if self._packed_native is not None else self._pack_for_torch(codes, scale)
        return 0.0

    @staticmethod
    def _pack_for_torch(codes, scale):
        return codes, scale.to(torch.bfloat16)

    def _torch_mm(self, flat: torch.Tensor) -> torch.Tensor:
        codes, scale = self._torch_packed
        return torch.ops.aten._weight_int8pack_mm(flat, codes, scale)


def quantize_linears(model, only_stored_4bit: bool = False) -> float | None:
    """The target's layer linears -> Int4Linear, its LM head -> Int8Linear (inference on the CPU only); the
    layers' float weights are freed once they run on codes.

    Returns the largest requantization error over the 4-bit layers, in units of a group's scale. With
    `only_stored_4bit` ("auto") it changes nothing and returns None unless every layer linear holds 4-bit groups
    already (a GGUF Q4_0/Q4_1 file's), so that the codes are the file's. Mixture-of-experts layers
    (model.MoEFeedForward): each expert's w13 and w2 become an Int4Linear of their own (quantize_experts) and the
    float expert stacks are freed; the routers stay float (a rounding there moves which experts a token takes).
    Layers a loader quantized already (loading.build_model, quantize_layer) are left as they are."""
    if not shapes_fit(model.layers, refuse=not only_stored_4bit):
        return None
    if not only_stored_4bit:            # each layer's floats go as soon as it runs on codes (peak memory)
        worst = max((quantize_layer(layer) for layer in model.layers), default=0.0)
        quantize_head(model)
        return worst
    # "auto": every layer checked before any float goes, so that a layer not stored 4-bit undoes them all
    linears, moes = _float_linears(model.layers)
    quantized, packed, worst = [], [], 0.0

    def undo():
        for q, cls in quantized:
            q.__class__ = cls
            q.__dict__.pop("_packed_native", None)
            q.__dict__.pop("_torch_packed", None)
        return None

    for m in linears:
        old_class, w = m.__class__, _float_weight(m)
        m.__class__ = Int4Linear
        err = m._quantize_from(w)
        quantized.append((m, old_class))
        if err > STORED_TOL.get(m.weight.dtype, EXACT_TOL):
            return undo()
        worst = max(worst, err)
    for moe in moes:
        experts, err = quantize_experts(moe)
        if err > STORED_TOL.get(moe.w13.dtype, EXACT_TOL):
            return undo()
        worst = max(worst, err)
        packed.append((moe, experts))
    for m, _ in quantized:
        m.drop_float_weight()
        _drop_packed(m)
    for moe, experts in packed:
        moe.use_packed_experts(experts)
    quantize_head(model)
    return worst


def _float_weight(m: nn.Linear) -> torch.Tensor:
    """A float linear's weight: its own, or where an engine that loaded the model itself freed it (cpu_packed.
    PackedLinear.drop_float_weight: a meta tensor), the values read back from the oneDNN copy, so that a model of a
    quant='none' engine handed to Engine(loaded, quant='q4') quantizes its real weights."""
    if m.weight.is_meta and getattr(m, "_packed", None) is not None:
        return m.float_rows()
    return m.weight


def _drop_packed(m: nn.Module):
    """A layer that runs on codes now: a PackedLinear's oneDNN copy of its float weight is no longer read."""
    m.__dict__.pop("_packed", None)
    m.__dict__.pop("_packed_of", None)


def _float_linears(layers: nn.Module):
    linears = [m for m in layers.modules() if isinstance(m, nn.Linear) and not isinstance(m, _CodesLinear)]
    moes = [m for m in layers.modules() if hasattr(m, "experts_q4") and m.experts_q4 is None]
    return linears, moes


def shapes_fit(layers: nn.Module, refuse: bool = True) -> bool:
    """Whether every float layer linear (and MoE expert matrix) has a shape the 4-bit kernels take: input a
    multiple of GROUP, output of 16 (torch's int4 product, the reference and the fp16 fallback, packs output rows
    by 16). A misfit is a ConfigError naming the shape, or with refuse=False, False. Shapes only: runs on a model
    still on the meta device (a loader, before it reads any weight)."""
    from ..errors import ConfigError
    linears, moes = _float_linears(layers)
    expert = " (an MoE layer's expert matrix: moe_intermediate_size and dim)"
    shapes = [(m.weight.shape, "") for m in linears] + [(w.shape[1:], expert) for m in moes for w in (m.w13, m.w2)]
    for shape, what in shapes:
        if len(shape) != 2 or shape[1] % GROUP or shape[0] % 16:
            if not refuse:
                return False
            raise ConfigError(f"4-bit weights need input sizes that are multiples of {GROUP} and output sizes "
                              f"that are multiples of 16; a linear of shape {tuple(shape)} is not: load it with "
                              f"quant='none' (--quant none), or 'auto' to fall back to floats by itself{what}")
    return True


def quantize_layer(layer: nn.Module, int8: frozenset[str] = frozenset()) -> float:
    """One decoder layer's float linears -> Int4Linear and its MoE experts -> 4-bit experts, each float weight
    freed as soon as its codes exist: what a loader calls right after assigning a layer, so that the float
    model never exists whole (a 1B Q4_0 file: 7.30 GiB peak before, benchmarks/results/cpu_load_memory/). `int8`:
    names within the layer that go int8 rows (Int8Linear) instead, a linear's ("attention.wqkv") or an MoE
    stack's ("feed_forward.w2": every expert's slice). Returns the largest 4-bit requantization error. Shapes are
    the caller's to check first (shapes_fit)."""
    worst = 0.0
    for name, m in list(layer.named_modules()):
        if isinstance(m, nn.Linear) and not isinstance(m, _CodesLinear):
            w = _float_weight(m)
            m.__class__ = Int8Linear if name in int8 else Int4Linear
            worst = max(worst, m._quantize_from(w))
            m.drop_float_weight()
            _drop_packed(m)
        elif hasattr(m, "experts_q4") and m.experts_q4 is None:
            experts, err = quantize_experts(m, frozenset(w for w in ("w13", "w2") if f"{name}.{w}" in int8))
            m.use_packed_experts(experts)
            worst = max(worst, err)
    return worst


def quantize_head(model):
    """The LM head -> Int8Linear, and the model marked as rounding its linears' inputs (model.py). An untied head's
    float weight is freed then (Llama-3-8B's is 2 GiB in fp32, a fifth of its 4-bit engine): the drafting heads
    read its rows from the int8 codes (Int8Linear.float_rows), and the 64 rows the heads' checkpoint check compares
    (heads.checkpoint.lm_head_sketch) are kept first. A tied head's weight is the embedding, which stays."""
    head = model.output
    if type(head) is not Int8Linear:
        w = _float_weight(head)
        head.__class__ = Int8Linear
        head._quantize_from(w)
        _drop_packed(head)
    model.rounds_linear_inputs = True
    if head.weight is not model.tok_embeddings.weight and not head.weight.is_meta:
        from ..heads.checkpoint import CHECKPOINT_FINGERPRINT, lm_head_fingerprint, lm_head_sketch
        setattr(head, CHECKPOINT_FINGERPRINT, lm_head_fingerprint(head))     # the loader's, or of these values
        head.sketch = lm_head_sketch(head)
        head.drop_float_weight()
    quantize_embedding(model)


class CodesEmbedding(nn.Embedding):
    """An embedding table as int8 codes in groups of GROUP along each row, with an fp32 scale and zero point per
    group (value = code * scale + zero): 1.25 bytes a value instead of fp32's 4 (Llama-3.2-1B's 128256 x 2048
    table: 1.0 GiB -> 0.31 GiB). Each group keeps the closer of two grids: 16 levels from its min and max or its
    signed extreme (a GGUF Q4_0/Q4_1 table's, as _requantize finds them) and 255 symmetric levels of amax / 127 (a
    Q8_0 table's); a table of either kind comes back exactly in fp32 (SmolLM2's Q8_0 table: every value), any
    other (Q6_K, floats, a bf16 model's rounded values) within half a step of the 255-level grid. The float weight
    is a meta tensor of its shape and dtype; lookups give that dtype."""

    max_error = 0.0         # the largest |value - weight| over the table when it was quantized

    @classmethod
    def quantize(cls, emb: nn.Embedding, chunk: int | None = None) -> "CodesEmbedding":
        """emb becomes a CodesEmbedding in place (its float weight freed), `chunk` rows at a time (default: 2M
        values, whose temporaries stay in cache; 8192 rows of 2048 took 4.6x longer, and ~0.5 GiB of peak)."""
        w = emb.weight.detach()
        V, K = w.shape
        chunk = chunk or max(1, 2 ** 21 // K)
        # [V, groups, GROUP] and [V, groups, 1]: a lookup is one addcmul over the gathered rows (24 us a decode step
        # on SmolLM2's table, against 63 us with unflatten, mul and add; nn.Embedding's float gather took 10)
        codes = torch.empty(V, K // GROUP, GROUP, dtype=torch.int8)
        scales = torch.empty(V, K // GROUP, 1)
        zeros = torch.empty(V, K // GROUP, 1)
        worst = 0.0
        for a in range(0, V, chunk):
            g = w[a:a + chunk].float().reshape(-1, K // GROUP, GROUP)
            s8 = g.abs().amax(-1) / 127
            q8 = torch.round(g / torch.where(s8 == 0, torch.ones_like(s8), s8)[..., None]).clamp_(-127, 127)
            zero = torch.zeros_like(s8)
            e8 = (torch.addcmul(zero[..., None], q8, s8[..., None]) - g).abs().amax(-1)   # the lookup's arithmetic
            if not e8.any():            # a Q8_0 table: exact on the int8 grid, no 4-bit candidate to weigh
                codes[a:a + chunk] = q8.to(torch.int8)
                scales[a:a + chunk], zeros[a:a + chunk] = s8[..., None], 0.0
                continue
            q4, s4, z4, _ = _requantize(g.reshape(-1, K))
            q4, z4 = q4.reshape(g.shape).float(), z4 - 8 * s4
            e4 = (torch.addcmul(z4[..., None], q4, s4[..., None]) - g).abs().amax(-1)
            use4 = e4 < e8
            codes[a:a + chunk] = torch.where(use4[..., None], q4, q8).to(torch.int8)
            scales[a:a + chunk] = torch.where(use4, s4, s8)[..., None]
            zeros[a:a + chunk] = torch.where(use4, z4, zero)[..., None]
            worst = max(worst, float(torch.minimum(e4, e8).max()))
        emb.__class__ = cls
        emb.register_buffer("codes", codes, persistent=False)
        emb.register_buffer("scales", scales, persistent=False)
        emb.register_buffer("zeros", zeros, persistent=False)
        emb.max_error = worst
        emb.weight = nn.Parameter(torch.empty(V, K, dtype=w.dtype, device="meta"), requires_grad=False)
        return emb

    def float_rows(self, rows: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows of the table ([V, K], or those `rows` picks) in `dtype` (the weight's)."""
        c, s, z = ((self.codes, self.scales, self.zeros) if rows is None else
                   (self.codes[rows], self.scales[rows], self.zeros[rows]))
        return torch.addcmul(z, c.float(), s).flatten(-2).to(dtype or self.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # nn.Embedding refuses an id outside the table; indexing the codes would wrap a negative one to a row
        # from the end without a word
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InputError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.numel():
            lo, hi = torch.aminmax(ids)
            if int(lo) < 0 or int(hi) >= self.num_embeddings:
                bad = int(lo) if int(lo) < 0 else int(hi)
                raise InputError(f"token id {bad} is outside the model's vocabulary: ids go from 0 to "
                                 f"{self.num_embeddings - 1}")
        return self.float_rows(ids)

    def _apply(self, fn, recurse=True):
        # .to(dtype) casts floating buffers: the scales and zero points stay fp32 (their values in bf16 moved every
        # lookup), only the rows a lookup returns take the new dtype (the meta weight's)
        scales, zeros = self.scales, self.zeros
        super()._apply(fn, recurse)
        self.scales, self.zeros = scales.to(self.scales.device), zeros.to(self.zeros.device)
        return self


def quantize_embedding(model) -> CodesEmbedding | None:
    """A 4-bit target's embedding -> CodesEmbedding (on the CPU, rows a multiple of GROUP wide). A tied LM head
    (an Int8Linear already: quantize_head) shares the freed weight: it multiplies its own codes, drafting heads read
    its rows from them (Int8Linear.float_rows), and the rows the heads' checkpoint check compares are kept first."""
    emb, head = model.tok_embeddings, model.output
    w = emb.weight
    if type(emb) is not nn.Embedding or w.is_meta or w.device.type != "cpu" or w.shape[1] % GROUP:
        return None
    tied = head.weight is w
    if tied:
        from ..heads.checkpoint import CHECKPOINT_FINGERPRINT, lm_head_fingerprint, lm_head_sketch
        setattr(head, CHECKPOINT_FINGERPRINT, lm_head_fingerprint(head))     # the loader's, or of these values
        head.sketch = lm_head_sketch(head)
    CodesEmbedding.quantize(emb)
    if tied:
        head.weight = emb.weight        # still tied: one meta Parameter
    return emb


def weight_bytes(module: nn.Module) -> int:
    """The bytes a module's weights hold in memory: its parameters and buffers (a tied or shared tensor once, meta
    tensors not at all), the codes of its 4-bit / int8 layers and experts (the cpu kernel's or torch's copy, as
    made) and oneDNN's packed copies of float weights. What `amphista generate` reports next to how the linears
    run."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.is_meta or not t.numel():
            return
        if t.is_mkldnn:                 # oneDNN's packed layout: an opaque tensor of the weight's elements
            total += t.numel() * t.element_size()
            return
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    for t in [*module.parameters(), *module.buffers()]:
        add(t)
    for m in module.modules():
        for layer in [m] + [x for pair in getattr(m, "experts_q4", None) or () for x in pair]:
            packed = getattr(layer, "_packed_native", None)
            for t in (packed.codes, packed.scales) if packed is not None else ():
                add(t)
            for t in getattr(layer, "_torch_packed", None) or ():
                add(t)
            add(getattr(layer, "_packed", None))        # cpu_packed.PackedLinear's oneDNN copy of a float weight
    return total


@dataclass
class Codes4:
    """A linear's 4-bit codes as a GGUF Q4_0/Q4_1 tensor stores them (gguf_file.GGUFTensor.q4_codes): w = q * s + z
    per group of GROUP along the input. What loading hands build_model for such layers, so that their floats are
    never made."""
    q: torch.Tensor     # [N, K] uint8 in 0..15
    s: torch.Tensor     # [N, K / GROUP] float32
    z: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def rows(self, fn) -> "Codes4":
        """The same row permutation or selection applied to codes, scales and zero points."""
        return Codes4(fn(self.q), fn(self.s), fn(self.z))

    @staticmethod
    def cat(parts: list["Codes4"]) -> "Codes4":
        return Codes4(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "s", "z")))

    def dequantize(self) -> torch.Tensor:
        N, K = self.q.shape
        w = self.q.float().view(N, K // GROUP, GROUP) * self.s[..., None] + self.z[..., None]
        return w.view(N, K)


@dataclass
class Int8Rows:
    """A float weight a loader hands build_model to run as int8 with a scale per row (Int8Linear): a GGUF layer
    stored with more than 4 bits (Q5_*, Q6_K) or fewer (Q2_K, Q3_K), in a file "auto" runs on codes. Re-rounding
    such values to int8 rows moved SmolLM2's weights by 0.85% (relative RMS), against 2.3% for a Q6_K-like 6-bit
    quantizer: the file's precision stays, where 4 bits would have lost it."""
    w: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.w.shape


def quantize_experts(moe, int8: frozenset[str] = frozenset()) -> tuple[list[tuple[_CodesLinear, _CodesLinear]],
                                                                       float]:
    """An MoE layer's experts (w13 [E, 2I, d], w2 [E, d, I]) -> per expert (w13, w2) as Int4Linear layers holding
    only their codes (the dense linears' packed layout and ops.quant_linear products; Int8Linear for the stacks
    named in `int8`, a GGUF's Q6_K ffn_down_exps), and the largest 4-bit requantization error. The caller hands
    them to moe.use_packed_experts, which frees the float stacks."""
    experts, worst = [], 0.0
    c13, c2 = (Int8Linear if n in int8 else Int4Linear for n in ("w13", "w2"))
    with torch.no_grad():
        for e in range(moe.w13.shape[0]):
            a, ea = c13.from_weight(moe.w13[e])
            b, eb = c2.from_weight(moe.w2[e])
            experts.append((a, b))
            worst = max(worst, ea, eb)
    return experts, worst


def _int8_rows(w: torch.Tensor, rows: int = 4096):
    """w [N, K] float -> (int8 codes, a scale per row): the row's largest magnitude -> 127. By blocks of rows: an
    LM head's float temporaries whole were ~3x its fp32 bytes, the peak of loading a 4-bit model."""
    codes, scale = torch.empty(w.shape, dtype=torch.int8, device=w.device), torch.empty(w.shape[0], device=w.device)
    for i in range(0, w.shape[0], rows):
        x = w[i:i + rows].detach().float()
        s = scale[i:i + rows]
        torch.clamp_min(x.abs().amax(1) / 127, torch.finfo(torch.float32).tiny, out=s)
        codes[i:i + rows] = torch.round(x / s[:, None]).clamp_(-127, 127)
    return codes, scale


def pack_int8_rows(w: torch.Tensor):
    """w [N, K] float -> (the cpu kernel's int8 copy, one scale per row, None without the extension; the largest
    rounding error in units of a row's scale, at most 0.5)."""
    codes, scale = _int8_rows(w)
    err = (codes.float() * scale[:, None] - w.detach().float()).abs().amax(1) / scale
    return cpu_ops.pack_int8(codes, scale), float(err.max())


def quantize_heads(heads: nn.Module) -> float:
    """Drafting heads next to a 4-bit target: their layer linears (fusion, SAL, AEB; inputs a multiple of GROUP,
    outputs a multiple of 16, as torch's int4 product, the reference, needs)
    -> Int4Linear by round to nearest in groups of 32, and the ResBlocks' weights to int8 codes, one scale per row
    (`use_codes`; 4 bits moved their output by ~8% of what they add). A draft only proposes tokens the target then
    verifies, so this moves tau, never the output. Measured on the shipped SmolLM2 heads (16 MT-Bench turns): the
    4-bit layers kept tau, mix-4 1.10x and mix-8 1.00x per token, within the VM's ±6% noise (benchmarks/results/
    cpu_heads_4bit_ab.md), a quarter of the bytes; the int8 ResBlocks moved tau by -0.4% (cpu_heads_native_ab).
    Returns the largest requantization error."""
    worst = 0.0
    for m in heads.modules():
        if (isinstance(m, nn.Linear) and not isinstance(m, _CodesLinear) and m.weight.dim() == 2
                and m.weight.shape[1] % GROUP == 0 and m.weight.shape[0] % 16 == 0     # quantize_linears' rule
                and m.weight.device.type == "cpu"):
            m.__dict__.pop("_packed", None)         # a PackedLinear's oneDNN copy: no longer read
            m.__class__ = Int4Linear
            worst = max(worst, m._quantize())
        elif hasattr(m, "use_codes"):
            worst = max(worst, m.use_codes(pack_int8_rows))
    return worst
