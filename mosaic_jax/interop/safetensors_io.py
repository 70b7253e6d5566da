"""Reading and writing the safetensors format with numpy, tensor by tensor.

Our own reader because it must (a) handle bf16 and fp8 through ml_dtypes without torch, and (b) read
one tensor at a time from a memory map, converting straight to the target dtype, so that loading a
12B-parameter checkpoint never holds a float32 copy of it. Format: 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the raw bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np
from etils import epath

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
  pass


class SafetensorsFile:
  """A memory-mapped safetensors file: `keys()`, `shape(k)`, `read(k, dtype)`, `metadata`."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    try:
      self._file = open(self.path, "rb")
    except OSError as e:
      raise SafetensorsError(f"{self.path}: cannot open ({e.strerror}).") from e
    size = os.fstat(self._file.fileno()).st_size
    head = self._file.read(8)
    if len(head) < 8:
      raise SafetensorsError(f"{self.path}: not a safetensors file (only {size} bytes).")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(size - 8, _MAX_HEADER):
      raise SafetensorsError(
          f"{self.path}: not a safetensors file (header length {header_len} does not fit the "
          f"{size}-byte file).")
    try:
      header = json.loads(self._file.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{self.path}: not a safetensors file (header is not JSON: {e}).") from e
    if not isinstance(header, dict):
      raise SafetensorsError(f"{self.path}: not a safetensors file (header is not a JSON object).")
    self.metadata = header.pop("__metadata__", None) or {}
    self._entries = header
    self._data_start = 8 + header_len
    for name, entry in header.items():
      if entry.get("dtype") not in _DTYPES:
        raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}.")
      begin, end = entry["data_offsets"]
      expected = int(np.prod(entry["shape"], dtype=np.int64)) * _DTYPES[entry["dtype"]].itemsize
      if end - begin != expected or self._data_start + end > size:
        raise SafetensorsError(f"{self.path}: tensor {name!r} has inconsistent offsets (truncated file?).")
    self._map = (mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None)

  def keys(self):
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _DTYPES[self._entries[name]["dtype"]]

  def read(self, name: str, dtype=None) -> np.ndarray:
    """One tensor; a view of the map when no conversion is needed, else a converted copy."""
    entry = self._entries[name]
    begin, end = entry["data_offsets"]
    src = np.frombuffer(self._map, dtype=_DTYPES[entry["dtype"]], count=(end - begin) // _DTYPES[
        entry["dtype"]].itemsize, offset=self._data_start + begin).reshape(entry["shape"])
    return src if dtype is None or np.dtype(dtype) == src.dtype else src.astype(dtype)

  def close(self):
    if self._map is not None:
      try:
        self._map.close()
      except BufferError:  # a caller still holds a view: the map closes when it is collected
        pass
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _header_blob(header: dict, reserve: int = 0) -> bytes:
  blob = json.dumps(header, separators=(",", ":")).encode()
  if reserve:
    if len(blob) > reserve:
      raise SafetensorsError(f"safetensors header of {len(blob)} bytes exceeds the {reserve} reserved.")
    return blob + b" " * (reserve - len(blob))  # the format allows trailing spaces in the header
  return blob + b" " * (-len(blob) % 8)  # keep the data 8-byte aligned


class RowWriter:
  """One tensor [rows, *row_shape] filled row by row through a memory map, for outputs too large to hold
  (cached encoder features). Space for `max_rows` is reserved (sparse on disk); `close(rows)` rewrites
  the header to the rows actually written and truncates, leaving an ordinary safetensors file."""

  _RESERVED = 1024

  def __init__(self, path: str, name: str, dtype, row_shape: tuple[int, ...], max_rows: int):
    self.path, self.name, self.row_shape = os.fspath(path), name, tuple(int(d) for d in row_shape)
    self.dtype = np.dtype(dtype)
    if self.dtype not in _NAMES:
      raise SafetensorsError(f"{self.path}: cannot store tensor {name!r} of dtype {self.dtype}.")
    self._row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
    with open(self.path, "wb") as f:
      f.write(self._header(max_rows))
      f.truncate(8 + self._RESERVED + max(max_rows, 1) * self._row_bytes)
    self.rows = np.memmap(self.path, self.dtype, "r+", offset=8 + self._RESERVED,
                          shape=(max(max_rows, 1),) + self.row_shape)

  def _header(self, rows: int) -> bytes:
    entry = {"dtype": _NAMES[self.dtype], "shape": [rows, *self.row_shape],
             "data_offsets": [0, rows * self._row_bytes]}
    return struct.pack("<Q", self._RESERVED) + _header_blob({self.name: entry}, self._RESERVED)

  def close(self, rows: int) -> None:
    self.rows.flush()
    del self.rows
    with open(self.path, "r+b") as f:
      f.write(self._header(rows))
      f.truncate(8 + self._RESERVED + rows * self._row_bytes)


def save_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Writes tensors (numpy arrays, bf16 via ml_dtypes) in sorted key order, like safetensors does."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(np.asarray(tensors[name]))
    if arr.dtype not in _NAMES:
      raise SafetensorsError(f"{path}: cannot store tensor {name!r} of dtype {arr.dtype}.")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  blob = _header_blob(header)
  # Through etils.epath (orbax's path library), so a gs:// destination works like a local one; the
  # rename makes the file appear whole or not at all.
  tmp = epath.Path(f"{path}.tmp")
  with tmp.open("wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())
  tmp.replace(epath.Path(path))
