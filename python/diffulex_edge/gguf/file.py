"""The GGUF v3 container: :class:`GGUFFile` reads (validated in Rust; tensor bytes memory-mapped),
:class:`GGUFWriter` writes (atomically: temp file + fsync + rename, in Rust)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _native
from ..errors import ConfigError, CorruptFileError, ShapeError, UnsupportedFormatError
from .quants import GGML_TYPES_BY_ID, dequantize, quantize, type_info


class ValueType(IntEnum):
    """GGUF metadata value types (`gguf_type`)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


TypePath = Tuple[int, ...]


def infer_type(value: Any) -> TypePath:
    """gguf-py's inference: bool, int -> INT32 (INT64/UINT64 when out of range), float -> FLOAT32,
    str, sequences -> ARRAY of the first element's type (ints widened to fit all)."""
    if isinstance(value, (bool, np.bool_)):
        return (ValueType.BOOL,)
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if -(2**31) <= v < 2**31:
            return (ValueType.INT32,)
        return (ValueType.INT64,) if -(2**63) <= v < 2**63 else (ValueType.UINT64,)
    if isinstance(value, (float, np.floating)):
        return (ValueType.FLOAT32,)
    if isinstance(value, str):
        return (ValueType.STRING,)
    if isinstance(value, (bytes, bytearray)):
        raise ConfigError("GGUF strings are UTF-8 text; decode bytes first")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            return (ValueType.ARRAY, ValueType.INT32)
        first = infer_type(value[0])
        if first[0] in (ValueType.INT32, ValueType.INT64, ValueType.UINT64):
            first = max((infer_type(v) for v in value), key=lambda t: (t[0] != ValueType.INT32, t[0] == ValueType.UINT64))
        return (ValueType.ARRAY, *first)
    raise ConfigError(f"cannot store a {type(value).__name__} in GGUF metadata")


@dataclass
class TensorInfo:
    name: str
    #: numpy order (rows first); ``dims`` is GGUF order (row length first).
    shape: Tuple[int, ...]
    dims: Tuple[int, ...]
    type_id: int
    offset: int
    nbytes: int

    @property
    def ggml_type(self) -> str:
        info = GGML_TYPES_BY_ID.get(self.type_id)
        return info.name if info else f"type{self.type_id}"


@dataclass
class GGUFFile:
    path: Optional[str]
    version: int
    alignment: int
    data_offset: int
    metadata: Dict[str, Any]
    metadata_types: Dict[str, TypePath]
    tensors: Dict[str, TensorInfo] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> "GGUFFile":
        """Parse and validate ``path``; raises :class:`CorruptFileError` on any inconsistency."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no GGUF file at {path!r}")
        h = _native.gguf_read_header(path)
        metadata = {k: v for k, _, v in h["metadata"]}
        types = {k: tuple(t) for k, t, _ in h["metadata"]}
        tensors = {}
        for name, dims, tid, off, nbytes in h["tensors"]:
            # the native reader refuses these too; checked again so no numpy shape can overflow
            if math.prod(max(int(d), 1) for d in dims) >= 2**60:
                raise CorruptFileError(f"{path}: tensor {name!r}: dims {list(dims)} multiply to 2^60 elements or more "
                                       "(no numpy shape can hold them)", layer=name)
            tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(dims)), tuple(dims), tid, off, nbytes)
        return cls(path, h["version"], h["alignment"], h["data_offset"], metadata, types, tensors)

    def __getitem__(self, key: str) -> Any:
        return self.metadata[key]

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw (encoded) bytes of a tensor, memory-mapped read-only."""
        t = self.tensors[name]
        if self.path is None:
            raise CorruptFileError("this GGUFFile has no backing file")
        if t.nbytes == 0:
            return np.zeros(0, np.uint8)
        try:
            return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_offset + t.offset, shape=(t.nbytes,))
        except (OSError, ValueError) as e:  # the file shrank or vanished since it was read
            raise CorruptFileError(f"{self.path}: tensor {name!r}: cannot map its {t.nbytes} bytes ({e})", layer=name) from e

    def tensor(self, name: str) -> np.ndarray:
        """A tensor decoded to float32 in numpy shape."""
        t = self.tensors[name]
        try:
            return dequantize(np.asarray(self.tensor_bytes(name)), t.ggml_type, shape=t.shape)
        except (ShapeError, UnsupportedFormatError) as e:
            raise type(e)(f"{self.path}: tensor {name!r} ({t.ggml_type}, shape {t.shape}): {e}") from e

    def to_writer(self) -> "GGUFWriter":
        """A writer holding this file's metadata and (raw) tensors, e.g. to edit and re-save."""
        w = GGUFWriter()
        for k, v in self.metadata.items():
            w.add(k, v, self.metadata_types[k])
        for t in self.tensors.values():
            w.add_raw_tensor(t.name, np.asarray(self.tensor_bytes(t.name)), t.type_id, t.shape)
        return w


def _gguf_dims(shape: Sequence[int]) -> Tuple[int, ...]:
    """numpy shape -> GGUF dims (innermost first)."""
    return tuple(int(d) for d in reversed(tuple(shape)))


def _type_id(ggml_type) -> int:
    # an int id may name any ggml type (sizes are checked in Rust); names must be ones we know
    return int(ggml_type) if isinstance(ggml_type, (int, np.integer)) else type_info(ggml_type).id


class GGUFWriter:
    """Collect metadata and tensors, then :meth:`write` them as one GGUF v3 file."""

    def __init__(self, path: Optional[Union[str, os.PathLike]] = None):
        self.path = None if path is None else os.fspath(path)
        self._metadata: Dict[str, Tuple[TypePath, Any]] = {}
        self._tensors: Dict[str, Tuple[Tuple[int, ...], int, np.ndarray]] = {}

    def add(self, key: str, value: Any, vtype: Union[None, int, Sequence[int]] = None) -> None:
        """Set a metadata key. ``vtype``: a :class:`ValueType`, a type path such as
        ``(ValueType.ARRAY, ValueType.STRING)``, or None to infer it like gguf-py."""
        if vtype is None:
            path = infer_type(value)
        elif isinstance(vtype, (int, np.integer)):
            path = (int(vtype),) if int(vtype) != ValueType.ARRAY else infer_type(value)
        else:
            path = tuple(int(t) for t in vtype)
        if isinstance(value, np.ndarray):
            value = value.tolist()
        self._metadata[key] = (tuple(int(t) for t in path), value)

    def add_raw_tensor(self, name: str, data: np.ndarray, ggml_type, shape: Sequence[int]) -> None:
        """Add already-encoded bytes of ``ggml_type`` for a tensor of numpy ``shape``."""
        tid = _type_id(ggml_type)
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        self._tensors[name] = (_gguf_dims(shape), tid, raw)

    def add_tensor(self, name: str, array, ggml_type="F32", imatrix: Optional[np.ndarray] = None,
                   mode: str = "search") -> None:
        """Encode a float array as ``ggml_type`` and add it."""
        a = np.asarray(array.detach().cpu().float().numpy() if hasattr(array, "detach") else array, dtype=np.float32)
        self.add_raw_tensor(name, quantize(a, ggml_type, imatrix=imatrix, mode=mode), ggml_type, a.shape)

    def _native_metadata(self) -> List[Tuple[str, List[int], Any]]:
        return [(k, list(t), v) for k, (t, v) in self._metadata.items()]

    def stream(self, tensors: Sequence[Tuple[str, Sequence[int], Any]],
               path: Optional[Union[str, os.PathLike]] = None) -> "GGUFStreamWriter":
        """Start a file that receives its tensors one at a time: ``tensors`` announces
        ``(name, numpy shape, ggml type)`` of each, in order; the metadata is this writer's.
        Use as a context manager: it renames the finished file into place on success and deletes
        the temporary file on an exception. Tensors added with ``add_tensor`` are not included."""
        target = os.fspath(path) if path is not None else self.path
        if target is None:
            raise ConfigError("GGUFWriter.stream needs a path")
        specs = [(name, list(_gguf_dims(shape)), _type_id(ggml_type)) for name, shape, ggml_type in tensors]
        return GGUFStreamWriter(_native.GGUFStreamWriter(target, self._native_metadata(), specs), target)

    def write(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        target = os.fspath(path) if path is not None else self.path
        if target is None:
            raise ConfigError("GGUFWriter.write needs a path")
        md = self._native_metadata()
        ts = [(n, list(dims), tid, raw) for n, (dims, tid, raw) in self._tensors.items()]
        _native.gguf_write(target, md, ts)
        return target


class GGUFStreamWriter:
    """A GGUF file being written tensor by tensor (from :meth:`GGUFWriter.stream`); at most one
    encoded tensor is in memory at a time. ``write_tensor`` in the announced order, then
    ``finish()`` (fsync + atomic rename); ``abort()`` deletes the temporary file."""

    def __init__(self, native, path: str):
        self._w = native
        self.path = path

    @property
    def next_tensor(self) -> Optional[str]:
        return self._w.next_tensor()

    def write_tensor(self, name: str, data: np.ndarray) -> None:
        """The encoded bytes of tensor ``name`` (any dtype; its raw bytes are written)."""
        self._w.write_tensor(name, np.ascontiguousarray(data).view(np.uint8).reshape(-1))

    def finish(self) -> str:
        self._w.finish()
        return self.path

    def abort(self) -> None:
        self._w.abort()

    def __enter__(self) -> "GGUFStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


__all__ = ["GGUFFile", "GGUFStreamWriter", "GGUFWriter", "TensorInfo", "ValueType", "infer_type"]
