"""A fast reader of GGUF's header: metadata and tensor directory, tensor bytes memory-mapped.

`gguf.GGUFReader` builds a numpy view per array element, which costs ~10 s for the 100k token
and merge strings of a small model's tokenizer. This reads the same layout with `struct` in
well under a second; dequantization still goes through the `gguf` package.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian v2/v3).
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from typing import Any

import numpy as np

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (ne0 first: the contiguous dimension)
    type_name: str  # GGMLQuantizationType name, e.g. "Q4_1"
    data: np.ndarray  # uint8 [rows, row_bytes] view into the file


@dataclasses.dataclass
class GGUFContents:
    path: str
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


def read_gguf(path: str) -> GGUFContents:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # empty file
            raise ValueError(f"{path}: not a GGUF file (empty)") from e
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    version = struct.unpack_from("<I", buf, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    try:
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        off = 24

        def string(o):
            n = struct.unpack_from("<Q", buf, o)[0]
            return bytes(buf[o + 8:o + 8 + n]).decode("utf-8", errors="replace"), o + 8 + n

        def value(t, o):
            if t == _STRING:
                return string(o)
            if t == _ARRAY:
                at, n = struct.unpack_from("<IQ", buf, o)
                o += 12
                if at in _SCALARS:
                    fmt = "<%d%s" % (n, _SCALARS[at])
                    return list(struct.unpack_from(fmt, buf, o)), o + struct.calcsize(fmt)
                items = []
                for _ in range(n):
                    v, o = value(at, o)
                    items.append(v)
                return items, o
            if t not in _SCALARS:
                raise ValueError(f"unknown metadata value type {t}")
            fmt = "<" + _SCALARS[t]
            return struct.unpack_from(fmt, buf, o)[0], o + struct.calcsize(fmt)

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, off = string(off)
            t = struct.unpack_from("<I", buf, off)[0]
            meta[key], off = value(t, off + 4)

        infos = []
        for _ in range(n_tensors):
            name, off = string(off)
            n_dims = struct.unpack_from("<I", buf, off)[0]
            dims = struct.unpack_from("<%dQ" % n_dims, buf, off + 4)
            kind, offset = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            infos.append((name, tuple(int(d) for d in dims), kind, offset))
    except struct.error as e:
        raise ValueError(f"{path}: truncated GGUF header ({e})") from e

    align = int(meta.get("general.alignment", 32))
    data_start = -(-off // align) * align
    file_bytes = np.frombuffer(buf, dtype=np.uint8)
    tensors = {}
    for name, dims, kind, offset in infos:
        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError:
            raise ValueError(f"{path}: tensor {name} has unknown GGML type {kind}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims and dims[0] % block:
            raise ValueError(f"{path}: tensor {name} ({qtype.name}, shape {list(dims)}): row "
                             f"length {dims[0]} is not a multiple of the block size {block}")
        row_bytes = dims[0] // block * type_size
        rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        start = data_start + offset
        if start + rows * row_bytes > len(file_bytes):
            raise ValueError(f"{path}: tensor {name} ({qtype.name}, shape {list(dims)}) runs past "
                             f"the end of the file ({len(file_bytes)} bytes): truncated file?")
        data = file_bytes[start:start + rows * row_bytes].reshape(*dims[:0:-1], row_bytes)
        tensors[name] = TensorInfo(name, dims, qtype.name, data)
    return GGUFContents(path, meta, tensors)
