"""Our GGUF reader (amphista_engine/gguf_file.py) against the gguf package's own GGUFReader and dequantizer."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import needs_smollm2

from amphista_engine import gguf_file
from amphista_engine.errors import ModelLoadError
from amphista_engine.gguf_file import read_gguf


def write_gguf(path, tensors: dict, meta_strings=()):
    """tensors: name -> (float32 array, type name); written with gguf's own writer."""
    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_block_count(1)
    wr.add_token_list(list(meta_strings) or ["a", "b"])
    wr.add_array("test.ints", [3, 1, 4])
    for name, (arr, qname) in tensors.items():
        qt = gguf.GGMLQuantizationType[qname]
        if qname == "F32":
            wr.add_tensor(name, arr)
        elif qname == "F16":
            wr.add_tensor(name, arr.astype(np.float16))
        elif qname.endswith("_K"):         # gguf cannot quantize k-quants: random blocks decode all the same
            raw = np.random.default_rng(0).integers(0, 256, gguf.quant_shape_to_byte_shape(arr.shape, qt))
            raw.reshape(-1, gguf.GGML_QUANT_SIZES[qt][1])[:, :4] = [0, 60, 0, 60]   # Q4_K: d, dmin = 1.0, not inf/NaN
            wr.add_tensor(name, raw.astype(np.uint8), raw_dtype=qt)
        else:
            wr.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


def assert_same_as_gguf_reader(path):
    ours, ref = read_gguf(path), gguf.GGUFReader(str(path))
    assert set(ours.meta) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for k, f in ref.fields.items():
        if not k.startswith("GGUF."):
            assert ours.meta[k] == f.contents(), k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.qtype == b.tensor_type and a.shape == tuple(reversed(b.shape.tolist()))
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
        got, want = a.dequantize(), gguf.dequantize(b.data, b.tensor_type)
        assert got.dtype == np.float32 and got.flags.writeable and got.shape == a.shape
        assert np.array_equal(got, want, equal_nan=True), a.name


@pytest.mark.parametrize("qtypes", [("F32", "F16", "Q8_0"), ("Q4_0", "Q4_1", "Q5_0"), ("Q5_1", "Q4_K", "Q6_K")])
def test_matches_gguf_reader_and_dequantizer(tmp_path, monkeypatch, qtypes):
    monkeypatch.setattr(gguf_file, "DEQUANT_ROWS", 5)        # several row chunks, a short last one
    rng = np.random.default_rng(len(qtypes[0]))
    tensors = {f"t.{q}": (rng.standard_normal((13, 512)).astype(np.float32), q) for q in qtypes}
    tensors["norm"] = (rng.standard_normal(7).astype(np.float32), "F32")
    assert_same_as_gguf_reader(write_gguf(tmp_path / "m.gguf", tensors, ["x", "yé", ""] * 5))


@needs_smollm2
def test_matches_gguf_reader_on_smollm2():
    from amphista_engine.loading import resolve_model_path
    path = resolve_model_path("smollm2-135m")
    ours, ref = read_gguf(path), gguf.GGUFReader(str(path))
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "general.name",
              "llama.rope.freq_base", "tokenizer.chat_template"):
        assert ours.meta[k] == ref.fields[k].contents(), k
    for a, b in list(zip(ours.tensors, ref.tensors))[:12]:
        assert a.name == b.name and np.array_equal(a.dequantize(), gguf.dequantize(b.data, b.tensor_type))


def test_bad_files_raise_clear_errors(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"w": (np.ones((4, 64), np.float32), "Q8_0")})
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-64])          # past the data's alignment padding
    with pytest.raises(ModelLoadError, match=r"cut.gguf: tensor w ends at byte .* truncated"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:40])
    with pytest.raises(ModelLoadError, match="head.gguf: corrupt GGUF header"):
        read_gguf(tmp_path / "head.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_gguf(tmp_path / "junk.gguf")
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF\x03")
    with pytest.raises(ModelLoadError, match="tiny.gguf: corrupt GGUF header"):
        read_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.gguf: cannot read"):
        read_gguf(tmp_path / "empty.gguf")
