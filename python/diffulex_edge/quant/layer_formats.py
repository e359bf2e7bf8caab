"""The weight formats a :class:`~diffulex_edge.quant.QuantizedLinear` can hold: one class per
format, registered by :class:`~diffulex_edge.quant.QuantizationDtype` in :data:`LAYER_FORMATS`.

A format owns everything that depends on how the weight is stored: the buffers it needs (names,
shapes, dtypes), quantizing a float weight into them (in Rust), dequantizing them (native on a
real CPU tensor, torch ops otherwise: CUDA, tracing, export), reading single stored values (for
the protect table's correction), the native CPU matmul, the value checks of a loaded file and
its ``repr``. :class:`~diffulex_edge.quant.QuantizedLinear` holds one format object and calls
it; it branches on nothing but ``act_mode`` and the protect table, which every format shares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import numpy as np
import torch

from .. import _native
from ..errors import ConfigError
from . import _ops
from .config import INT4_GROUP_SIZES, QuantizationDtype


class LayerFormat(ABC):
    """Base class: how a layer's weight ``[out, in]`` is stored. Subclasses set ``dtypes``."""

    dtypes: ClassVar[Tuple[QuantizationDtype, ...]] = ()
    #: whether the format has integer codes (symmetric/asymmetric apply)
    integer: ClassVar[bool] = True
    #: ``symmetric=None`` means this
    default_symmetric: ClassVar[bool] = True
    #: whether an importance vector (imatrix row) steers the scale search
    takes_importance: ClassVar[bool] = False
    #: whether activations can be quantized too (W8A8: ``act_mode`` dynamic / static)
    quantizes_activations: ClassVar[bool] = False

    def __init__(self, dtype: QuantizationDtype, group_size: int, symmetric: bool) -> None:
        self.dtype, self.group_size, self.symmetric = dtype, group_size, symmetric

    # ---- storage -----------------------------------------------------------------------------
    @abstractmethod
    def empty_buffers(self, n: int, k: int, device: Any) -> Dict[str, torch.Tensor]:
        """Zero-filled buffers of an ``[n, k]`` weight (``device="meta"`` allocates nothing)."""

    def storage_buffer(self) -> str:
        """The buffer that holds the weight codes (its device is the layer's)."""
        return "qweight"

    # ---- quantize / dequantize ---------------------------------------------------------------
    @abstractmethod
    def quantize(self, w: torch.Tensor, *, kernel: str, name: Optional[str],
                 importance: Optional[Any] = None) -> Dict[str, torch.Tensor]:
        """The buffers of float weight `w` (CPU, Rust)."""

    @abstractmethod
    def dequantize(self, b: Dict[str, torch.Tensor], in_features: int, native: bool) -> torch.Tensor:
        """float32 ``[out, in]`` from the buffers; `native`: real CPU tensors (the Rust decoders)."""

    @abstractmethod
    def values_at(self, b: Dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor,
                  in_features: int) -> torch.Tensor:
        """Dequantized stored values at the given positions (torch ops, O(n))."""

    @abstractmethod
    def linear_native(self, b: Dict[str, torch.Tensor], xs: np.ndarray, out: np.ndarray, bias: Optional[np.ndarray],
                      in_features: int, kernel: str) -> None:
        """``out = xs @ W.T + bias`` by the Rust kernel on the packed weight."""

    # ---- checks and description ----------------------------------------------------------------
    def check_values(self, state: Dict[str, torch.Tensor], in_features: int) -> None:
        """Raise ConfigError for values the format does not allow in a loaded file (shapes and
        dtypes are checked by the layer against its own buffers; by default every value is
        allowed)."""
        return None

    def describe(self) -> List[str]:
        return [f"dtype={self.dtype}"] + ([f"symmetric={self.symmetric}"] if self.integer else [])


class HalfFormat(LayerFormat):
    """FP16 / BF16: ``weight`` ``[out, in]`` float16 / bfloat16."""

    dtypes = (QuantizationDtype.FP16, QuantizationDtype.BF16)
    integer = False

    @property
    def bf16(self) -> bool:
        return self.dtype == QuantizationDtype.BF16

    def empty_buffers(self, n, k, device):
        return {"weight": torch.zeros(n, k, dtype=torch.bfloat16 if self.bf16 else torch.float16, device=device)}

    def storage_buffer(self):
        return "weight"

    def quantize(self, w, *, kernel, name, importance=None):
        return {"weight": _ops.quantize_half(w, self.bf16, name)}

    def dequantize(self, b, in_features, native):
        return b["weight"].to(torch.float32)

    def values_at(self, b, rows, cols, in_features):
        return b["weight"][rows, cols].to(torch.float32)

    def linear_native(self, b, xs, out, bias, in_features, kernel):
        _native.linear_half(xs, _ops.np_u16(b["weight"]), out, bias, self.bf16, kernel)


class Int8Format(LayerFormat):
    """INT8 per output channel: ``qweight`` int8 ``[out, in]``, ``scales`` float32 ``[out]``,
    ``zero_points`` int8 ``[out]`` (with W8A8 static activations also ``act_scale``, added by the
    layer)."""

    dtypes = (QuantizationDtype.INT8,)
    quantizes_activations = True

    def empty_buffers(self, n, k, device):
        return {"qweight": torch.zeros(n, k, dtype=torch.int8, device=device),
                "scales": torch.ones(n, dtype=torch.float32, device=device),
                "zero_points": torch.zeros(n, dtype=torch.int8, device=device)}

    def quantize(self, w, *, kernel, name, importance=None):
        qw, s, z = _ops.quantize_int8(w, self.symmetric, kernel, name)
        return {"qweight": qw, "scales": s, "zero_points": z}

    def dequantize(self, b, in_features, native):
        if native:
            return torch.from_numpy(
                _native.dequantize_int8(b["qweight"].numpy(), b["scales"].numpy(), b["zero_points"].numpy()))
        return _ops.dequantize_int8_torch(b["qweight"], b["scales"], b["zero_points"])

    def values_at(self, b, rows, cols, in_features):
        return (b["qweight"][rows, cols].to(torch.float32) - b["zero_points"][rows].to(torch.float32)) * b["scales"][rows]

    def linear_native(self, b, xs, out, bias, in_features, kernel):
        _native.linear_int8(xs, b["qweight"].numpy(), b["scales"].numpy(), b["zero_points"].numpy(), out, bias, kernel)


class Int4Format(LayerFormat):
    """INT4 grouped: ``qweight`` uint8 ``[out, ceil(in/2)]`` (two nibbles per byte, low nibble =
    even column), ``scales`` float32 ``[out, groups]``, ``zeros`` uint8 ``[out, groups]``."""

    dtypes = (QuantizationDtype.INT4,)
    default_symmetric = False
    takes_importance = True

    def __init__(self, dtype, group_size, symmetric):
        if group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        super().__init__(dtype, group_size, symmetric)

    def empty_buffers(self, n, k, device):
        groups = -(-k // self.group_size)
        return {"qweight": torch.zeros(n, -(-k // 2), dtype=torch.uint8, device=device),
                "scales": torch.ones(n, groups, dtype=torch.float32, device=device),
                "zeros": torch.zeros(n, groups, dtype=torch.uint8, device=device)}

    def quantize(self, w, *, kernel, name, importance=None):
        if importance is not None:
            p, s, z = _ops.quantize_int4_weighted(w, self.group_size, self.symmetric, importance, kernel, name)
        else:
            p, s, z = _ops.quantize_int4(w, self.group_size, self.symmetric, kernel, name)
        return {"qweight": p, "scales": s, "zeros": z}

    def dequantize(self, b, in_features, native):
        if native:
            return torch.from_numpy(_native.dequantize_int4(
                b["qweight"].numpy(), b["scales"].numpy(), b["zeros"].numpy(), self.group_size, in_features))
        return _ops.dequantize_int4_torch(b["qweight"], b["scales"], b["zeros"], self.group_size, in_features)

    def values_at(self, b, rows, cols, in_features):
        byte = b["qweight"][rows, cols // 2]
        nib = torch.where(cols % 2 == 0, byte & 0x0F, byte >> 4).to(torch.float32)
        g = cols // self.group_size
        return (nib - b["zeros"][rows, g].to(torch.float32)) * b["scales"][rows, g]

    def linear_native(self, b, xs, out, bias, in_features, kernel):
        _native.linear_int4(xs, b["qweight"].numpy(), b["scales"].numpy(), b["zeros"].numpy(), self.group_size,
                            in_features, out, bias, kernel)

    def check_values(self, state, in_features):
        if bool((state["zeros"] > 15).any()):
            raise ConfigError("tensor 'zeros': INT4 zero points must be 0..15")

    def describe(self):
        return [f"dtype={self.dtype}", f"group_size={self.group_size}", f"symmetric={self.symmetric}"]


class PackedFormat(LayerFormat):
    """Every format of the native registry (``formats/registry.rs``: the GGML block types, NF4,
    ...): ``qweight`` uint8 ``[out, row_bytes]``, each row the format's blocks as the native
    quantizer writes them (for a GGML type, the bytes of that GGUF tensor row). Quantizing,
    decoding and the matmul are the registry's generic Rust functions, selected by name; other
    devices and tracing decode through the ``diffulex_edge::dequantize_packed`` custom op."""

    dtypes = tuple(d for d in QuantizationDtype if d.is_packed)
    integer = False

    def __init__(self, dtype, group_size, symmetric):
        super().__init__(dtype, group_size, symmetric)
        self.name = dtype.value
        self.takes_importance = dtype.takes_importance

    def empty_buffers(self, n, k, device):
        return {"qweight": torch.zeros(n, _native.packed_row_bytes(self.name, k), dtype=torch.uint8, device=device)}

    def quantize(self, w, *, kernel, name, importance=None):
        return {"qweight": _ops.quantize_packed(w, self.name, importance, kernel, name)}

    def dequantize(self, b, in_features, native):
        if native:
            return torch.from_numpy(_native.packed_dequantize(self.name, b["qweight"].numpy(), in_features))
        return _ops.dequantize_packed(b["qweight"], self.name, in_features)

    def values_at(self, b, rows, cols, in_features):
        # decode only the rows that hold protected weights
        uniq, inv = torch.unique(rows, return_inverse=True)
        w = _ops.dequantize_packed(b["qweight"][uniq].contiguous(), self.name, in_features)
        return w[inv, cols]

    def linear_native(self, b, xs, out, bias, in_features, kernel):
        _native.packed_linear(self.name, xs, b["qweight"].numpy(), in_features, out, bias, kernel)

    def check_values(self, state, in_features):
        bad = _native.packed_first_non_finite(self.name, state["qweight"].numpy(), in_features)
        if bad is not None:
            raise ConfigError(f"tensor 'qweight': the {self.name} weight at {bad} decodes to NaN or Inf (corrupt scales)")

    def describe(self):
        return [f"dtype={self.dtype}"]


#: dtype -> the class of its layer format. A new packed format needs nothing here: it is a
#: registry entry in Rust, and PackedFormat serves it.
LAYER_FORMATS: Dict[QuantizationDtype, Type[LayerFormat]] = {
    d: cls for cls in (HalfFormat, Int8Format, Int4Format, PackedFormat) for d in cls.dtypes}

