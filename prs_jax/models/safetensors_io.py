"""Minimal, strict safetensors reader/writer on NumPy (memory-mapped; bfloat16 and float8 via ml_dtypes).

The `safetensors` package's NumPy backend cannot represent bfloat16, and its errors do not say which file
was bad; this reader maps the file, validates the header, and returns one tensor at a time so that loading a
sharded checkpoint never holds more than one tensor on the host.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from prs_jax.errors import CheckpointError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A validated, memory-mapped safetensors file; `get(name)` returns a read-only NumPy view."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open safetensors file: {e}") from e
        size = self.path.stat().st_size
        if size < 8:
            raise CheckpointError(f"{self.path}: corrupt safetensors file: {size} bytes, shorter than the 8-byte header")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(
                f"{self.path}: corrupt safetensors header: header length {n} exceeds the file size {size}. "
                "The file is truncated or not a safetensors file; re-download or re-export it.")
        try:
            header = json.loads(self._fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: not valid JSON ({e}).") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: expected a JSON object.")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors header entry for tensor {name!r}: {info!r} ({e!r}).") from e
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if not (0 <= begin <= end <= data_len) or end - begin != expected:
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors header: tensor {name!r} has offsets [{begin}, {end}) for "
                    f"{expected} bytes of {info['dtype']}{list(shape)} in a data section of {data_len} bytes.")
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a NumPy array backed by the mapped file (no copy)."""
        dtype, shape, begin, end = self._entries[name]
        return np.frombuffer(self._mmap, dtype=dtype, count=(end - begin) // dtype.itemsize,
                             offset=self._data_start + begin).reshape(shape)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_file(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` in the safetensors format (header padded to 8 bytes)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for arr in arrays:
            fh.write(arr.tobytes())


def iter_checkpoint_files(model_dir: str | Path) -> Iterator[Path]:
    """The safetensors files of a checkpoint dir: those named by the index if present, else all *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index (expected a 'weight_map' object): {e}") from e
        for name in sorted(set(weight_map.values())):
            file = model_dir / name
            if not file.is_file():
                raise CheckpointError(f"{index}: names shard {name!r}, which is missing from {model_dir}.")
            yield file
        return
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        other = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = (f" Found {other}: pickle-based weights are never loaded; convert them to safetensors first."
                if other else "")
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files.{hint}")
    yield from files
