"""GGUF files: the header read with `struct`, the tensors as numpy views of one memory map.

gguf.GGUFReader maps every metadata item, each string of a vocabulary included, as its own numpy view: opening
SmolLM2's file (49k tokens, 48k merges) took ~7 s of the CLI's ~10 s start on the dev VM (2026-12-03). This
reads the same header in a fraction of a second; the gguf package still supplies the tensor types, their block
sizes and the dequantizers (`dequantize`).
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelLoadError
from .values import is_int

# Metadata value types -> struct format (8 = string and 9 = array are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# Tensor types stored as plain arrays; every other type is blocks of bytes that `dequantize` decodes.
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}
DEFAULT_ALIGNMENT = 32
DEQUANT_ROWS = 4096


@dataclass
class GGUFTensor:
    name: str
    qtype: Any                  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]      # numpy order, rows first (GGUF stores dimensions fastest first)
    data: np.ndarray            # read-only view: the array for plain types, rows of bytes for block types

    def dequantize(self) -> np.ndarray:
        """A writable float32 copy. Block types go to gguf's per-type dequantizer DEQUANT_ROWS rows at a
        time: gguf.dequantize feeds it 16 rows per call, which cost SmolLM2's Q4_1 file ~2 s instead of ~0.8 s."""
        import gguf

        if self.qtype.name in _PLAIN:
            return np.array(self.data, dtype=np.float32)
        quant = getattr(gguf.quants, self.qtype.name, None)
        try:
            if quant is None or not hasattr(quant, "dequantize_rows"):
                return np.array(gguf.dequantize(self.data, self.qtype), dtype=np.float32)
            rows = self.data.reshape(-1, self.data.shape[-1])
            return np.concatenate([quant.dequantize_rows(rows[i:i + DEQUANT_ROWS])
                                   for i in range(0, len(rows), DEQUANT_ROWS)]).reshape(self.shape)
        except NotImplementedError:     # an older gguf package than the type (its own words say only "not yet")
            from importlib.metadata import version
            raise ModelLoadError(f"tensor {self.name} has type {self.qtype.name}, which the installed gguf package "
                                 f"({version('gguf')}) cannot dequantize: pip install -U gguf") from None


    def q4_codes(self):
        """A Q4_0/Q4_1/Q4_K matrix as its own 4-bit codes, unpacked but not dequantized: (codes [rows, K] uint8 in
        0..15, s, z [rows, K/32] float32) with value = code * s + z per group of 32 (Q4_0: s = d, z = -8 d; Q4_1:
        s = d, z = m; Q4_K: s = d * scale, z = -dmin * min, each group's 6-bit scale and min). gguf's dequantizers'
        layouts: a Q4_0/Q4_1 block holds fp16 d (and m), then 16 bytes whose low nibbles are values 0..15 and high
        nibbles 16..31; a Q4_K block of 256 holds fp16 d and dmin, 12 bytes of packed 6-bit scales and mins, then
        4 x 32 bytes whose low nibbles are group 2j and high nibbles group 2j + 1."""
        import gguf

        rows, K = self.shape
        data = np.ascontiguousarray(self.data)
        if self.qtype.name == "Q4_K":
            b = data.reshape(rows, K // 256, 144)
            d, dmin = (b[..., i:i + 2].copy().view(np.float16)[..., 0].astype(np.float32) for i in (0, 2))
            sc, mn = gguf.quants.Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))
            s = (d[..., None] * sc.reshape(rows, K // 256, 8).astype(np.float32)).reshape(rows, K // 32)
            z = -(dmin[..., None] * mn.reshape(rows, K // 256, 8).astype(np.float32)).reshape(rows, K // 32)
            qs = b[..., 16:].reshape(rows, K // 256, 4, 1, 32)
            return np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(rows, K), s, z
        head = {"Q4_0": 2, "Q4_1": 4}[self.qtype.name]
        b = data.reshape(rows, K // 32, head + 16)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        z = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if head == 4 else -8 * d
        qs = b[..., head:]
        return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, K), d, z


Q4_TYPES = ("Q4_0", "Q4_1", "Q4_K")     # q4_codes reads these


@dataclass
class GGUFFile:
    path: str
    meta: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos = buf, path, 0
        if bytes(buf[:4]) != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        # Files written on big-endian hosts store the version byte-swapped.
        self.endian = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"
        self.pos = 4
        version = self.read("I")[0]
        if version < 2:
            raise ModelLoadError(f"{path}: GGUF version {version} is too old (need 2 or later)")

    def read(self, fmt: str, count: int = 1):
        fmt = f"{self.endian}{count}{fmt}"
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (n,) = self.read("Q")
        self.pos += n
        if self.pos > len(self.buf):
            raise struct.error("string runs past the end of the file")
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", "replace")

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, n = self.read("I")[0], self.read("Q")[0]
            if itype == 8:
                return [self.string() for _ in range(n)]
            if itype == 9:  # each element is itself (type, count, items)
                return [self.value(9) for _ in range(n)]
            return list(self.read(_SCALARS[itype], n))
        return self.read(_SCALARS[vtype])[0]


def read_gguf(path, tensors: bool = True) -> GGUFFile:
    """The metadata of a GGUF file and, with `tensors`, its tensors as views of a read-only memory map. A shard of
    a split GGUF (llama.cpp's gguf-split: NAME-00001-of-0000N.gguf) stands for the whole model: the metadata of its
    first shard, the tensors of all of them."""
    path = str(path)
    meta, infos, data_start, endian = _read_file(path, tensors)
    shards = split_shards(path, meta)
    if shards is None:
        return GGUFFile(path, meta, _map_tensors(path, infos, data_start, endian) if tensors else [])
    # The first shard alone met "GGUF file lacks blk.0.attn_output.weight" and any other shard "architecture None":
    # as if the file were broken, when llama.cpp loads the set from any of them.
    parts = [(s, *_read_file(s, tensors)) for s in shards]
    meta = parts[0][1]
    if not tensors:
        return GGUFFile(shards[0], meta, [])
    out, seen = [], set()
    for shard, _, shard_infos, shard_start, shard_endian in parts:
        for t in _map_tensors(shard, shard_infos, shard_start, shard_endian):
            if t.name in seen:
                raise ModelLoadError(f"{shard}: tensor {t.name} appears in two shards of the split GGUF")
            seen.add(t.name)
            out.append(t)
    expected = meta.get("split.tensors.count")
    if is_int(expected) and expected != len(out):
        raise ModelLoadError(f"{shards[0]}: the {len(shards)} shards of this split GGUF hold {len(out)} tensors, "
                             f"but split.tensors.count says {expected}: shards from different conversions?")
    return GGUFFile(shards[0], meta, out)


_SPLIT_NAME = re.compile(r"(.+)-(\d{5})-of-(\d{5})(\.gguf)", re.IGNORECASE)


def split_shards(path: str, meta: dict[str, Any]) -> list[str] | None:
    """The files of the split GGUF `path` belongs to (llama.cpp's naming), first shard first; None for a whole file."""
    count = meta.get("split.count", 0)
    if not is_int(count) or count <= 1:
        return None
    no = meta.get("split.no", 0)
    m = _SPLIT_NAME.fullmatch(os.path.basename(path))
    if m is None or int(m.group(3)) != count:
        raise ModelLoadError(f"{path}: shard {no + 1 if is_int(no) else '?'} of a GGUF split into {count} files, "
                             f"but not named NAME-NNNNN-of-{count:05d}.gguf, so the other shards cannot be found: "
                             "rename the shards so, or merge them (llama-gguf-split --merge FIRST_SHARD OUT.gguf)")
    prefix = os.path.join(os.path.dirname(path), m.group(1))
    shards = [f"{prefix}-{i:05d}-of-{count:05d}{m.group(4)}" for i in range(1, count + 1)]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise ModelLoadError(f"{path}: a GGUF split into {count} files, but shard(s) "
                             f"{', '.join(os.path.basename(s) for s in missing[:3])} are missing: an unfinished "
                             "download?")
    return shards


def _read_file(path: str, tensors: bool):
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read_header(buf, path, tensors)
    except ModelLoadError:              # an OSError too, but one that already names the file and the problem
        raise
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise ModelLoadError(f"{path}: cannot read GGUF file ({e})") from e


def read_gguf_metadata(path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (not its tensors)."""
    return read_gguf(path, tensors=False).meta


def _read_header(buf, path: str, tensors: bool):
    try:
        c = _Cursor(buf, path)
        n_tensors, n_kv = c.read("Q", 2)
        meta = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.read("I")[0])
        infos = []
        if tensors:
            for _ in range(n_tensors):
                name = c.string()
                (n_dims,) = c.read("I")
                dims = c.read("Q", n_dims)
                qtype, offset = c.read("I")[0], c.read("Q")[0]
                infos.append((name, dims, qtype, offset))
    except (struct.error, KeyError, RecursionError) as e:     # RecursionError: arrays of arrays nested thousands deep
        raise ModelLoadError(f"{path}: corrupt GGUF header ({e!r})") from None
    align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not is_int(align) or align <= 0:
        raise ModelLoadError(f"{path}: corrupt GGUF header (general.alignment is {align!r}, not a positive integer)")
    return meta, infos, -(-c.pos // align) * align, c.endian


def _map_tensors(path: str, infos, data_start: int, endian: str = "<") -> list[GGUFTensor]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    out, seen = [], set()
    for name, dims, raw_type, offset in infos:
        if name in seen:
            raise ModelLoadError(f"{path}: tensor {name} appears twice")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelLoadError(f"{path}: tensor {name} has unknown GGML type {raw_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        shape = tuple(int(d) for d in reversed(dims))
        # Python integers: np.prod wrapped a corrupt header's huge dimensions around int64 to a size that fit the
        # file, and the reshape below failed with numpy's ValueError instead of naming the tensor
        n_elems = math.prod(shape)
        n_bytes = n_elems * type_size // block
        start = data_start + offset
        if start + n_bytes > mapped.size:
            raise ModelLoadError(f"{path}: tensor {name} ends at byte {start + n_bytes}, past the end of the file "
                                 f"({mapped.size} bytes): truncated download?")
        raw = mapped[start:start + n_bytes]
        if qtype.name in _PLAIN:
            # A big-endian file (converted for s390x) stores its arrays big-endian too: read as little-endian, its
            # F32/F16 weights came out as denormal garbage, silently.
            data = raw.view(np.dtype(_PLAIN[qtype.name]).newbyteorder(endian)).reshape(shape)
        elif endian == ">":
            # gguf's dequantizers read block scales little-endian; a big-endian file's blocks would decode wrong
            raise ModelLoadError(f"{path}: big-endian GGUF file with {qtype.name} tensor {name}: only its F32/F16 "
                                 "tensors can be read; convert it to little-endian (gguf's gguf_convert_endian.py "
                                 "little) or use the little-endian release")
        else:
            if not shape or shape[-1] % block:
                raise ModelLoadError(f"{path}: tensor {name} rows of {shape[-1:]} do not fill {qtype.name} blocks "
                                     f"of {block}")
            data = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
        out.append(GGUFTensor(name, qtype, shape, data))
    return out


def dequantize_all(tensors: list[GGUFTensor]) -> dict[str, np.ndarray]:
    """name -> float32 array for every tensor, on a few threads (numpy releases the GIL on big blocks)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        return dict(zip((t.name for t in tensors), pool.map(GGUFTensor.dequantize, tensors)))
