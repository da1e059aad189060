"""Safetensors files: a validating header reader, lazy tensor access, and a streaming atomic writer.

We parse the header ourselves (8-byte little-endian length, JSON, data offsets) so a truncated or damaged
file is reported with its name and what is wrong before anything is built from it, and so `inspect` can
describe a 28 GB checkpoint without reading its data.  Tensors are read one at a time through safetensors'
memory map.  The writer streams tensor by tensor into `<name>.tmp` and renames it at the end, so peak memory
is one tensor and a failed write leaves no half-written file behind.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Dict, Iterable, List, Optional, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 256 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file (and tensor) and what to do."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str                 # safetensors dtype name, e.g. "BF16", "I8"
    shape: Tuple[int, ...]
    begin: int                 # byte offsets inside the data section
    end: int

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return DTYPES.get(self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclasses.dataclass
class Header:
    path: str
    tensors: Dict[str, TensorInfo]
    metadata: Dict[str, str]
    data_start: int
    file_size: int

    def keys(self) -> List[str]:
        return list(self.tensors)


def read_header(path: str) -> Header:
    """Parse and validate a safetensors header. Raises CheckpointError naming the file and the problem."""
    name = os.fspath(path)
    try:
        size = os.path.getsize(name)
        with open(name, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{name}: not a safetensors file (only {size} bytes); re-download or re-export it")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or length > size - 8:
                raise CheckpointError(
                    f"{name}: not a safetensors file, or truncated: the header claims {length} bytes but the file has "
                    f"{size}; re-download or re-export it")
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name}: damaged safetensors header ({exc}); re-download or re-export it") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{name}: damaged safetensors header (not a JSON object)")
    metadata = parsed.pop("__metadata__", None) or {}
    data_start = 8 + length
    data_len = size - data_start
    tensors: Dict[str, TensorInfo] = {}
    for key, entry in parsed.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{name}: tensor {key!r} has a damaged header entry: {entry!r}") from None
        info = TensorInfo(dtype, shape, int(begin), int(end))
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{name}: tensor {key!r} has dtype {dtype}, which this tool cannot read")
        if info.end > data_len or info.begin > info.end or info.nbytes != info.numel * _ITEMSIZE[dtype]:
            raise CheckpointError(
                f"{name}: tensor {key!r} ({dtype} {list(shape)}) lies outside the file or has the wrong size "
                f"(bytes {begin}..{end} of {data_len}): the file is truncated or damaged; re-download it")
        tensors[key] = info
    return Header(name, tensors, {str(k): str(v) for k, v in metadata.items()}, data_start, size)


class SafetensorsFile:
    """Lazy, validated access to one safetensors file: `header` now, tensors on demand (memory-mapped)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.header = read_header(self.path)
        self._handle = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handle = None

    def keys(self) -> List[str]:
        return self.header.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.header.tensors

    def info(self, key: str) -> TensorInfo:
        try:
            return self.header.tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {key!r}") from None

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (a private copy: the file is not kept mapped by the result)."""
        self.info(key)
        if self._handle is None:
            from safetensors import safe_open
            try:
                self._handle = safe_open(self.path, framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{self.path}: cannot open: {exc}") from None
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class OutEntry:
    key: str
    dtype: torch.dtype
    shape: Tuple[int, ...]


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the order the entries were declared, atomically.

    with StreamingWriter(path, entries, metadata) as w:
        for e in entries: w.write(e.key, tensor)
    The file appears under `path` only if every declared tensor was written and the block exits cleanly.
    """

    def __init__(self, path: str, entries: Iterable[OutEntry], metadata: Optional[Dict[str, str]] = None):
        self.path = os.fspath(path)
        self.entries = list(entries)
        keys = [e.key for e in self.entries]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"duplicate tensor names in output: {dup[:5]}")
        header: Dict[str, object] = {}
        offset = 0
        for e in self.entries:
            if e.dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {e.key!r}: dtype {e.dtype} cannot be stored in safetensors")
            n = 1
            for d in e.shape:
                n *= d
            nbytes = n * _ITEMSIZE[DTYPE_NAMES[e.dtype]]
            header[e.key] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes like safetensors does
        self._header = struct.pack("<Q", len(raw)) + raw
        self._next = 0
        self._tmp = f"{self.path}.tmp-{os.getpid()}"
        self._f = None

    def __enter__(self) -> "StreamingWriter":
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._f = open(self._tmp, "wb")
        self._f.write(self._header)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.entries):
            raise ValueError(f"tensor {key!r} was not declared")
        e = self.entries[self._next]
        if key != e.key:
            raise ValueError(f"tensors must be written in declared order: expected {e.key!r}, got {key!r}")
        if tensor.dtype != e.dtype or tuple(tensor.shape) != tuple(e.shape):
            raise ValueError(f"tensor {key!r}: declared {e.dtype} {list(e.shape)}, got {tensor.dtype} {list(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self._f = self._f, None
        try:
            if exc_type is None and self._next != len(self.entries):
                missing = [e.key for e in self.entries[self._next:]]
                raise ValueError(f"{len(missing)} declared tensors were not written (first: {missing[0]!r})")
            if exc_type is None:
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            f.close()
            _remove(self._tmp)
            raise
        f.close()
        if exc_type is not None:
            _remove(self._tmp)
            return
        os.replace(self._tmp, self.path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def save_tensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Atomic `safetensors.torch.save_file` equivalent (small files, tests)."""
    entries = [OutEntry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(path, entries, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
