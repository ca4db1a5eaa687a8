"""A GGUF file's metadata and tensor index, read in one pass over the header.

`gguf.GGUFReader` builds a numpy view for every part of every metadata value: a 49 152-token
vocabulary plus its merges is ~1.2 million views, seconds of every start (`benchmarks/RESULTS.md`).
This reads the header with `struct` straight from the file's bytes (string arrays decoded in one
loop, number arrays with one `numpy.frombuffer`) and yields the same values as the reader's
`ReaderField.contents()`. The tensors are `gguf`'s own `ReaderTensor` records, their `data` a view
of one read-only memory map of the file, shaped and typed as `GGUFReader` shapes them, so any code
written against the reader's tensors works unchanged.

Layout (the GGUF spec, versions 2 and 3): magic `GGUF`, u32 version, u64 tensor count, u64 key/value
count, the key/values (string key, u32 value type, value), the tensor infos (string name, u32 dims,
u64 per dim, u32 ggml type, u64 offset), padding to `general.alignment` (32), the tensor data.
Strings are a u64 byte length and UTF-8 bytes; arrays a u32 item type, a u64 count and the items.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value type -> struct format (STRING = 8 and ARRAY = 9 are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8", 12: "f8"}
STRING, ARRAY = 8, 9


class GGUFIndexError(ValueError):
    """The file is not a GGUF file this reader understands (the message says where it stopped)."""


@dataclass
class GGUFIndex:
    """`metadata`: key -> Python value (str, int, float, bool, or a list of them); `tensors`:
    `gguf.gguf_reader.ReaderTensor` records in file order; `data_offset`: where tensor data starts."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[Any] = field(repr=False)
    alignment: int
    data_offset: int


class _Cursor:
    def __init__(self, buf: Any, order: str, path: str):
        self.buf, self.pos, self.order, self.path = buf, 0, order, path

    def take(self, fmt: str) -> Any:
        fmt = self.order + fmt
        try:
            value = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFIndexError(f"{self.path}: the GGUF header ends early (at byte {self.pos})") from None
        self.pos += struct.calcsize(fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise GGUFIndexError(f"{self.path}: a string at byte {self.pos} runs past the end of the file")
        raw = self.buf[self.pos : end]
        self.pos = end
        return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else bytes(raw).decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item == STRING:
                return self._strings(count)
            if item not in _NUMPY:
                if item == ARRAY:
                    return [self.value(ARRAY) for _ in range(count)]
                raise GGUFIndexError(f"{self.path}: unknown GGUF array item type {item} at byte {self.pos}")
            dt = np.dtype(_NUMPY[item]).newbyteorder(self.order)
            end = self.pos + count * dt.itemsize
            if end > len(self.buf):
                raise GGUFIndexError(f"{self.path}: an array at byte {self.pos} runs past the end of the file")
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos = end
            return arr.tolist()
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise GGUFIndexError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")
        return self.take(fmt)

    def _strings(self, count: int) -> list[str]:
        buf, pos, out = self.buf, self.pos, []
        length = struct.Struct(self.order + "Q").unpack_from
        size = len(buf)
        append = out.append
        for _ in range(count):
            if pos + 8 > size:  # (its length itself cut off: struct.error)
                raise GGUFIndexError(f"{self.path}: a string at byte {pos} runs past the end of the file")
            n = length(buf, pos)[0]
            pos += 8
            if pos + n > size:
                raise GGUFIndexError(f"{self.path}: a string at byte {pos} runs past the end of the file")
            append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out


def read_gguf_index(path: str | os.PathLike) -> GGUFIndex:
    """Metadata and tensor index of the GGUF file at `path` (the tensor data stays on disk)."""

    path = os.fspath(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise GGUFIndexError(f"{path}: not a GGUF file (shorter than a GGUF header)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _read(path, buf)
    finally:
        buf.close()


def _read(path: str, buf: mmap.mmap) -> GGUFIndex:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.gguf_reader import ReaderField, ReaderTensor
    from gguf.quants import quant_shape_to_byte_shape

    if buf[:4] != MAGIC:
        raise GGUFIndexError(f"{path}: not a GGUF file (it starts with {buf[:4]!r})")
    order = "<"
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        order = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in SUPPORTED_VERSIONS:
        raise GGUFIndexError(f"{path}: GGUF version {version}; supported: {SUPPORTED_VERSIONS}")
    cur = _Cursor(buf, order, path)
    cur.pos = 8
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        dims = [cur.take("Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.take("I"), cur.take("Q")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFIndexError(f"{path}: general.alignment={alignment!r} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    data = np.memmap(path, mode="r")

    plain = {
        GGMLQuantizationType.F16: np.float16,
        GGMLQuantizationType.F32: np.float32,
        GGMLQuantizationType.F64: np.float64,
        GGMLQuantizationType.I8: np.int8,
        GGMLQuantizationType.I16: np.int16,
        GGMLQuantizationType.I32: np.int32,
        GGMLQuantizationType.I64: np.int64,
    }
    tensors, seen = [], set()
    for name, dims, raw_type, offset in infos:
        if name in seen:
            raise GGUFIndexError(f"{path}: the tensor {name!r} appears twice")
        seen.add(name)
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFIndexError(f"{path}: tensor {name!r} has an unknown ggml type {raw_type}") from None
        n_elems = int(np.prod(dims, dtype=np.int64)) if dims else 1
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = n_elems * type_size // block
        np_dims = tuple(reversed(dims))
        item = plain.get(ggml_type)
        if item is None:
            item, count, np_dims = np.uint8, n_bytes, quant_shape_to_byte_shape(np_dims, ggml_type)
        else:
            count = n_elems
        start = data_offset + offset
        dt = np.dtype(item).newbyteorder(order)
        if start + count * dt.itemsize > len(data):
            raise GGUFIndexError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        view = data[start : start + count * dt.itemsize].view(dt).reshape(np_dims)
        shape = np.array(dims, dtype=np.uint64)
        info = ReaderField(offset=0, name=name, parts=[], data=[], types=[])
        tensors.append(ReaderTensor(name, ggml_type, shape, n_elems, n_bytes, start, view, info))
    return GGUFIndex(path, version, metadata, tensors, alignment, data_offset)


__all__ = ["GGUFIndex", "GGUFIndexError", "read_gguf_index"]
