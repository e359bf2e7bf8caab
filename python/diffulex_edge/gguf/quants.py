"""GGML block formats (Q4_0 ... Q6_K, TQ1_0/TQ2_0, IQ4_NL/IQ4_XS, F16/BF16/F32) over the native core.

``quantize`` returns the GGUF byte layout, row by row (``[..., row_bytes]`` uint8), exactly what a
GGUF file stores; ``dequantize`` inverts it. ``mode="search"`` (default) picks scales by a weighted
least-squares search (using ``imatrix`` per-column importances when given); ``mode="rtn"`` is plain
round-to-nearest, byte-identical to gguf-py's quantizers for the types gguf-py can quantize.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _native
from ..errors import ShapeError, UnsupportedFormatError


@dataclass(frozen=True)
class GGMLTypeInfo:
    name: str
    id: int
    block_size: int
    type_size: int
    has_rtn: bool

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8.0 / self.block_size

    def row_bytes(self, cols: int) -> int:
        if cols % self.block_size:
            raise ShapeError(f"{self.name}: row length {cols} is not a multiple of the block size {self.block_size}")
        return cols // self.block_size * self.type_size


#: Every GGML type the native core handles, by GGUF spelling.
GGML_TYPES: Dict[str, GGMLTypeInfo] = {t[0]: GGMLTypeInfo(*t) for t in _native.ggml_types()}
GGML_TYPES_BY_ID: Dict[int, GGMLTypeInfo] = {t.id: t for t in GGML_TYPES.values()}


def type_info(qtype: Union[str, int, GGMLTypeInfo]) -> GGMLTypeInfo:
    """Look up a type by name (any case), GGUF id, or pass an info through."""
    if isinstance(qtype, GGMLTypeInfo):
        return qtype
    if isinstance(qtype, int) or hasattr(qtype, "value") and isinstance(qtype.value, int):
        key = int(getattr(qtype, "value", qtype))
        if key in GGML_TYPES_BY_ID:
            return GGML_TYPES_BY_ID[key]
        raise UnsupportedFormatError(f"unsupported GGML type id {key}; supported: {sorted(GGML_TYPES_BY_ID)}")
    name = str(getattr(qtype, "name", qtype)).upper()
    if name not in GGML_TYPES:
        raise UnsupportedFormatError(f"unknown GGML type {qtype!r}; supported: {', '.join(GGML_TYPES)}")
    return GGML_TYPES[name]


def _as_f32(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        a = a.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(a, dtype=np.float32)


def quantize(data, qtype, imatrix: Optional[np.ndarray] = None, mode: str = "search", kernel: str = "auto",
             reference: bool = False) -> np.ndarray:
    """Quantize an array (last axis = rows of weights) to ``qtype`` -> uint8 ``[..., row_bytes]``."""
    info = type_info(qtype)
    x = _as_f32(data)
    if x.ndim == 0:
        raise ShapeError("cannot quantize a scalar")
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)
    imp = None if imatrix is None else _as_f32(imatrix).reshape(-1)
    out = _native.ggml_quantize(x2, info.name, imp, mode, kernel, reference)
    return out.reshape(*x.shape[:-1], info.row_bytes(cols))


def dequantize(data: np.ndarray, qtype, shape: Optional[Sequence[int]] = None, kernel: str = "auto",
               reference: bool = False) -> np.ndarray:
    """Decode GGUF bytes of ``qtype`` to float32. ``shape`` defaults to ``data``'s with the last axis
    converted from bytes to weights."""
    info = type_info(qtype)
    raw = np.ascontiguousarray(data).view(np.uint8)
    if shape is None:
        if raw.ndim == 0 or raw.shape[-1] % info.type_size:
            raise ShapeError(f"{info.name}: last axis of {raw.shape} bytes is not a whole number of {info.type_size}-byte blocks")
        shape = (*raw.shape[:-1], raw.shape[-1] // info.type_size * info.block_size)
    shape = _checked_shape(shape)
    # Python ints: np.prod would wrap around silently for a corrupt shape
    n = math.prod(shape)
    if n != raw.size // info.type_size * info.block_size:
        raise ShapeError(f"{info.name}: {raw.size} bytes hold {raw.size // info.type_size * info.block_size} weights, "
                         f"not the {n} of shape {shape}")
    out = _native.ggml_dequantize(raw.reshape(-1), info.name, n, kernel, reference)
    return out.reshape(shape)


def _checked_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """A shape numpy can build for any item size up to 8 bytes."""
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError as e:
        raise ShapeError(f"shape {shape!r} is not a sequence of integers") from e
    # numpy refuses a shape whose dims (zeros skipped) times the item size pass 2^63, even if empty
    if any(d < 0 for d in dims) or math.prod(max(d, 1) for d in dims) >= 2**60:
        raise ShapeError(f"shape {dims} has a negative dimension or 2^60 elements or more")
    return dims


def tensor_nbytes(shape: Sequence[int], qtype) -> int:
    """Bytes a tensor of ``shape`` (GGUF order irrelevant; last axis = row) takes in ``qtype``."""
    info = type_info(qtype)
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * info.row_bytes(int(shape[-1]))


__all__ = ["GGML_TYPES", "GGML_TYPES_BY_ID", "GGMLTypeInfo", "dequantize", "quantize", "tensor_nbytes", "type_info"]
