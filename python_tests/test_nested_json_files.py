"""JSON nested thousands deep in any file a load reads (a corrupt or hostile download) is named as not valid JSON,
never a raw RecursionError from json's decoder: config.json was (loading fuzz, 2026-12-07); the heads' config,
generation_config.json, the shard index, tokenizer_config.json and a safetensors header were not."""
from __future__ import annotations

import shutil

import pytest

from amphista_engine import Engine
from amphista_engine.errors import AmphistaError
from amphista_engine.heads.checkpoint import check_heads_folder

DEEP = "[" * 100_000 + "]" * 100_000


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json",
                                  "model.safetensors.index.json"])
def test_a_model_file_nested_too_deep_is_named(tiny_hf_dir, tmp_path, name):
    path = _copy(tiny_hf_dir, tmp_path / "m")
    (path / name).write_text(DEEP)
    with pytest.raises(AmphistaError, match=rf"{name}.*not valid JSON"):
        Engine.from_pretrained(str(path), device="cpu", max_seq_len=64)


def test_a_safetensors_header_nested_too_deep_is_named(tiny_hf_dir, tmp_path):
    path = _copy(tiny_hf_dir, tmp_path / "m")
    header = DEEP.encode()
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(AmphistaError, match="model.safetensors"):
        Engine.from_pretrained(str(path), device="cpu", max_seq_len=64)


def test_a_heads_config_nested_too_deep_is_named(tiny_amphista_engine, tiny_amphista_heads_dir, tmp_path):
    path = _copy(tiny_amphista_heads_dir, tmp_path / "h")
    (path / "config.json").write_text(DEEP)
    with pytest.raises(AmphistaError, match="config.json is not valid JSON"):
        tiny_amphista_engine.load_heads(str(path))
    check_heads_folder(path)         # a save over it: nothing there a heads save would destroy


def test_a_gguf_header_of_arrays_nested_too_deep_is_named(tmp_path):
    """A GGUF metadata value of arrays of arrays, thousands deep (12 bytes a level), recursed into the reader."""
    import struct

    from amphista_engine.gguf_file import read_gguf
    key = b"general.deep"
    body = struct.pack("<QQ", 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)
    body += struct.pack("<IQ", 9, 1) * 20_000 + struct.pack("<IQ", 4, 0)
    path = tmp_path / "deep.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + body)
    with pytest.raises(AmphistaError, match="corrupt GGUF header"):
        read_gguf(path)
