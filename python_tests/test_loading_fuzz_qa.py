"""Seeded fuzz of loading bad files (config.json, safetensors, GGUF, heads folders): every case ends in a clean
AmphistaError or a model that computes what the valid file does, never a raw exception, a hang or silent garbage.
Each case runs in a forked child under a timeout, so a hang is caught as such. Plus one regression test per bug the
fuzzer found."""
import json
import multiprocessing as mp
import random
import shutil
import struct
import sys
import traceback

import numpy as np
import pytest
import torch

from amphista_engine.errors import AmphistaError, ConfigError

from conftest import write_tiny_gguf, write_tiny_hf

TOKENS = torch.tensor([[1, 5, 7, 9, 11]])
WEIRD = [None, True, 0, -1, 3, 63, 65, 2 ** 63, 0.5, 64.5, float("nan"), float("inf"), "64", "", [], [64], {"a": 1}]
FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "architectures", "model_type",
          "tie_word_embeddings", "head_dim", "rope_scaling", "rope_parameters", "hidden_act"]


def _logits(path):
    from amphista_engine import Engine
    e = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64, quant="none")
    with torch.no_grad():
        return e.model(TOKENS, torch.arange(TOKENS.shape[1])[None]).float().numpy()


def _child(path, conn):
    import warnings
    warnings.simplefilter("ignore")
    try:
        conn.send(("ok", _logits(path)))
    except AmphistaError as e:
        conn.send(("clean", f"{type(e).__name__}: {e}"))
    except BaseException as e:      # noqa: BLE001 -- the raw exception is the finding
        conn.send(("raw", f"{type(e).__name__}: {e}"[:300] + "".join(traceback.format_tb(e.__traceback__)[-2:])))


def _run(path, timeout=20):
    a, b = mp.Pipe(False)
    p = mp.get_context("fork").Process(target=_child, args=(path, b))
    p.start()
    b.close()
    try:
        r = a.recv() if a.poll(timeout) else ("hang", f"no result in {timeout}s")
    except EOFError:
        r = ("raw", "the loader's process died")
    p.join(2)
    if p.is_alive():
        p.kill()
        p.join()
    return r


def _verdict(r, ref, may_differ: bool):
    kind, value = r
    if kind != "ok":
        return kind, value
    if not np.isfinite(value).all():
        return "garbage", "loaded, logits not finite"
    same = value.shape == ref.shape and np.abs(value - ref).max() < 1e-4
    return ("ok", "") if same or may_differ else ("garbage", f"loaded, logits differ by {np.abs(value - ref).max()}")


def _config_case(rng, base):
    d = dict(base)
    key, value = rng.choice(FIELDS), rng.choice(WEIRD)
    op = rng.choice(["set", "set", "del", "raw"])
    if op == "del":
        d.pop(key, None)
        return f"del {key}", json.dumps(d), True
    if op == "set":
        d[key] = value
        # a plain number in a size field is a real other model: may load and differ (it then has no bad weights)
        return f"{key}={value!r:.30}", json.dumps(d), key in ("rms_norm_eps", "rope_theta", "rope_scaling")
    text = json.dumps(d)
    return "raw", rng.choice(["\ufeff" + text, text + "}x", json.dumps([d]), "null", "", text[:len(text) // 2],
                              "[" * 50000 + "]" * 50000]), False


def _safetensors_case(rng, data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    name = rng.choice([k for k in header if k != "__metadata__"])

    def build(h):
        raw = json.dumps(h).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + body
    op = rng.choice(["trunc", "hdrlen", "drop", "shape", "dtype", "shift", "nan"])
    if op == "trunc":
        return op, data[:rng.randrange(len(data))]
    if op == "hdrlen":
        return op, struct.pack("<Q", rng.choice([0, n - 1, n + 1, 2 ** 40])) + data[8:]
    if op == "drop":
        header.pop(name)
    elif op == "shape":
        header[name]["shape"] = header[name]["shape"][::-1] + [1]
    elif op == "dtype":
        header[name]["dtype"] = rng.choice(["F16", "I32", "U8", "XX"])
    elif op == "shift":
        header[name]["data_offsets"] = [o + 4 for o in header[name]["data_offsets"]]
    else:
        start = header[name]["data_offsets"][0]
        body = body[:start] + struct.pack("<f", float("nan")) + body[start + 4:]
    return f"{op} {name}", build(header)


def _gguf_case(rng, data: bytes):
    op = rng.choice(["trunc", "trunc", "magic", "version", "count", "flip"])
    if op == "trunc":
        return op, data[:rng.randrange(len(data))]
    if op == "magic":
        return op, b"GGUG" + data[4:]
    if op == "version":
        return op, data[:4] + struct.pack("<I", rng.choice([0, 1, 2 ** 31])) + data[8:]
    if op == "count":
        at = rng.choice([8, 16])
        return op, data[:at] + struct.pack("<Q", rng.choice([2 ** 32, 2 ** 63])) + data[at + 8:]
    b = bytearray(data)
    at = rng.randrange(8, min(len(b), 20000))
    b[at] = rng.randrange(256)
    return f"flip@{at}", bytes(b)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading_fuzz")
    hf = write_tiny_hf(root / "hf")
    gguf = write_tiny_gguf(hf, root / "tiny.gguf")
    return root, hf, gguf, _logits(hf)


def test_seeded_sweep_of_bad_files_gives_clean_errors(tiny):
    root, hf, gguf, ref = tiny
    rng = random.Random(20261207)
    base = json.loads((hf / "config.json").read_text())
    weights = (hf / "model.safetensors").read_bytes()
    gguf_bytes = gguf.read_bytes()
    bad = []
    for i in range(30):
        surface = ("config", "safetensors", "gguf")[i % 3]
        case = root / f"case{i}"
        if surface == "gguf":
            desc, data = _gguf_case(rng, gguf_bytes)
            case = root / f"case{i}.gguf"
            case.write_bytes(data)
            may_differ = desc.startswith("flip")    # a flipped metadata byte may be a valid other value
        else:
            shutil.copytree(hf, case)
            if surface == "config":
                desc, text, may_differ = _config_case(rng, base)
                (case / "config.json").write_text(text, encoding="utf-8")
            else:
                desc, data = _safetensors_case(rng, weights)
                (case / "model.safetensors").write_bytes(data)
                may_differ = False
        verdict, info = _verdict(_run(case), ref, may_differ)
        if verdict not in ("ok", "clean"):
            bad.append(f"{surface} {desc}: {verdict}: {info}")
    assert not bad, "\n".join(bad)


# ---- regressions: one per bug the fuzzer found ----------------------------------------------------------------

@pytest.mark.parametrize("field, value, named", [
    ("model_type", 1.5, "model_type must be a string"),
    ("architectures", {"a": 1}, "architectures must be a list"),
    ("architectures", [3], "architectures must be a list"),
    ("rope_parameters", 63, "rope_parameters must be an object"),
    ("rope_scaling", "linear", "rope_scaling must be an object"),
    ("max_position_embeddings", "4096", "max_position_embeddings must be a positive integer"),
])
def test_config_field_of_the_wrong_type_is_named(tmp_path, tiny, field, value, named):
    """model_type 1.5 met TypeError ("argument of type 'float' is not iterable"), architectures {"a": 1} KeyError 0,
    rope_parameters 63 TypeError, max_position_embeddings "4096" a TypeError in the engine after the load."""
    from amphista_engine.config import ModelConfig
    cfg = json.loads((tiny[1] / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=named):
        ModelConfig.from_json(tmp_path / "config.json")


@pytest.mark.parametrize("layers", [2 ** 63, 10 ** 6])
def test_huge_layer_count_is_refused_at_once(tmp_path, tiny, layers):
    """num_hidden_layers 2**63 looped over its layers' tensor names forever; 10**6 took 15 s to say tensors were
    missing."""
    shutil.copytree(tiny[1], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    verdict, info = _run(tmp_path / "m", timeout=10)
    assert verdict == "clean" and "num_hidden_layers" in info and "at most" in info, info


def test_deeply_nested_config_json_is_not_valid_json(tmp_path):
    """json's decoder recursed into it and raised RecursionError, a raw trace."""
    from amphista_engine.config import ModelConfig
    (tmp_path / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "config.json")


def test_safetensors_offsets_into_a_neighbour_are_refused(tmp_path, tiny):
    """A header whose data_offsets for one tensor were shifted (same length, inside the file) loaded the
    neighbouring bytes as that tensor, silently: logits off by ~6e-4."""
    shutil.copytree(tiny[1], tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["model.layers.0.self_attn.k_proj.weight"]["data_offsets"] = [
        o + 4 for o in header["model.layers.0.self_attn.k_proj.weight"]["data_offsets"]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    verdict, info = _run(tmp_path / "m")
    assert verdict == "clean" and "model.safetensors" in info, info


@pytest.mark.parametrize("gguf", [False, True])
def test_nan_weights_are_refused_by_name(tmp_path, tiny, gguf):
    """A NaN in a checkpoint's weights loaded silently: NaN logits, or finite wrong ones (a NaN key under the
    attention mask)."""
    if gguf:
        def edit(t):
            t["blk.0.attn_v.weight"] = t["blk.0.attn_v.weight"].copy()
            t["blk.0.attn_v.weight"].flat[0] = np.nan
        path = write_tiny_gguf(tiny[1], tmp_path / "nan.gguf", edit=edit)
    else:
        path = tmp_path / "m"
        shutil.copytree(tiny[1], path)
        from safetensors.torch import load_file, save_file
        state = load_file(str(path / "model.safetensors"))
        state["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("nan")
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    verdict, info = _run(path)
    assert verdict == "clean" and "NaN" in info and "layers." in info, info


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
