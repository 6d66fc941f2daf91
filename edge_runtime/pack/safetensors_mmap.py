"""Zero-copy reading of safetensors files as numpy views over an mmap.

The safetensors package copies tensors when asked for numpy and cannot give bf16 to numpy at all; a
runtime that must keep peak memory at the weight size maps the file instead. Writing stays with the
safetensors package. Layout: 8-byte little-endian header length, JSON header, then the byte buffer.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct

import numpy as np

from edge_runtime.errors import ModelFormatError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # bf16 kept raw
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_entry(path: str, name: str, e, data_size: int) -> None:
    """One header entry: a known dtype, a shape of non-negative ints, 0 <= begin <= end <= data_size and
    end - begin == prod(shape) * itemsize, computed in Python ints (no overflow). Raises naming it."""
    if not isinstance(e, dict):
        raise ModelFormatError(f"{path}: header entry {name!r} is not a mapping")
    if not isinstance(e.get("dtype"), str) or e["dtype"] not in _DTYPES:
        raise ModelFormatError(f"{path}: tensor {name} has unsupported dtype {e.get('dtype')!r}")
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
        raise ModelFormatError(f"{path}: tensor {name} has a malformed shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise ModelFormatError(f"{path}: tensor {name} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ModelFormatError(f"{path}: tensor {name} has data_offsets {offsets} outside its data section")
    if end > data_size:
        raise ModelFormatError(f"{path} is truncated: tensor {name} ends past the end of the file")
    expected = math.prod(shape) * np.dtype(_DTYPES[e["dtype"]]).itemsize
    if end - begin != expected:
        raise ModelFormatError(f"{path}: tensor {name} has {end - begin} bytes, shape needs {expected}")


class SafetensorsFile:
    """Open one file; `tensor(name)` returns a read-only view, `dtype_of(name)` the stored dtype tag.

    The whole header is checked when the file is opened, before any view exists: every tensor lies in
    the data section (after the header, inside the file) and has exactly the bytes its shape needs."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except (OSError, ValueError) as e:  # ValueError: mmap of a special file
            raise ModelFormatError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        if size < 8 or self._map is None:
            raise ModelFormatError(f"{path} is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", self._map[:8])
        if header_len > min(_MAX_HEADER, size - 8):
            raise ModelFormatError(f"{path} is truncated or not a safetensors file (header length {header_len})")
        try:
            header = json.loads(bytes(self._map[8:8 + header_len]))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ModelFormatError(f"{path} has a corrupt safetensors header") from None
        if not isinstance(header, dict):
            raise ModelFormatError(f"{path} has a corrupt safetensors header (not a mapping)")
        metadata = header.pop("__metadata__", None) or {}
        self.metadata = metadata if isinstance(metadata, dict) else {}
        self._entries = header
        self._base = 8 + header_len
        for name, e in header.items():
            check_entry(path, name, e, size - self._base)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype_of(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise ModelFormatError(f"{self.path} has no tensor {name!r}")
        e = self._entries[name]
        begin, end = e["data_offsets"]
        dtype = np.dtype(_DTYPES[e["dtype"]])
        arr = np.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                            offset=self._base + begin)
        return arr.reshape(e["shape"])

    def tensor_f32(self, name: str) -> np.ndarray:
        """A float32 copy, bf16 widened by a 16-bit shift (exact)."""
        t = self.tensor(name)
        if self.dtype_of(name) == "BF16":
            return (t.astype(np.uint32) << 16).view(np.float32)
        return t.astype(np.float32)
