"""Functional entry points: quantize_, quantize_model_ptq, dequantize_model, get_quantization_info."""

from __future__ import annotations

import copy
import os
from collections import Counter
from typing import Any, Dict, Iterable, Optional, Union

from torch import nn

from ..errors import ConfigError, UnsupportedFormatError
from .config import QuantizationConfig, QuantizationDtype
from .nn import QuantizedLinear
from .quantizers import QUANTIZERS, ConfigLike
from .result import QuantizationResult
from .walk import _set_module, model_size_bytes


def quantize_(
    model: nn.Module,
    config: Union[ConfigLike, str],
    *,
    calibration_data: Optional[Iterable[Any]] = None,
    imatrix: Any = None,
    protect: Any = None,
    show_progress: Optional[bool] = None,
) -> QuantizationResult:
    """Quantize `model` in place as `config` says (torchao-style); dispatches on ``config.dtype``.

    config: a ``QuantizationConfig``, a mapping of its fields, or a scheme name (``"int4-g32"``,
    ``"w8a8-dynamic"``, ... see :meth:`QuantizationConfig.from_scheme`); or a mixed-precision
    plan: a :class:`~diffulex_edge.quant.DynamicQuantizationProfile`, a preset name
    (``"attention-high-precision"``, ... see ``PRESETS``) or a ``.yaml``/``.json`` profile file. calibration_data,
    imatrix and protect: as :meth:`INT8Quantizer.quantize <diffulex_edge.quant.INT8Quantizer.quantize>`
    (activation scales for ``mode="static"``; INT4 importance weights; super weights kept exact)."""
    from .profile import PRESETS, DynamicQuantizationProfile, apply_profile

    if isinstance(config, DynamicQuantizationProfile) or (isinstance(config, str) and config in PRESETS) or (
            isinstance(config, (str, os.PathLike)) and str(config).lower().endswith((".yaml", ".yml", ".json"))):
        return apply_profile(model, config, imatrix=imatrix, calibration_data=calibration_data, protect=protect,
                             show_progress=show_progress)
    if isinstance(config, str):
        cfg = QuantizationConfig.from_scheme(config)
    else:
        cfg = config if isinstance(config, QuantizationConfig) else QuantizationConfig.from_dict(config)
    if cfg.dtype is None:
        raise ConfigError(
            f"the config has no dtype; set one of {', '.join(d.value for d in QuantizationDtype)}"
        )
    quantizer = QUANTIZERS[cfg.dtype](show_progress=show_progress)
    return quantizer.quantize(model, cfg, inplace=True, calibration_data=calibration_data, imatrix=imatrix,
                              protect=protect)


def quantize_model_ptq(
    model: nn.Module,
    quantization_bits: int = 8,
    quantization_type: str = "dynamic",
    calibration_data: Optional[Iterable[Any]] = None,
    *,
    group_size: int = 128,
    exclude_layers: Optional[list] = None,
    inplace: bool = False,
    show_progress: Optional[bool] = None,
) -> nn.Module:
    """Post-training quantization in one call; returns the quantized model.

    Args:
        quantization_bits: 8 (INT8 per-channel weights), 4 (INT4 grouped weights) or 16 (FP16).
        quantization_type: for 8 bits, ``"dynamic"`` quantizes activations per token at run
            time, ``"static"`` uses one activation scale per layer measured on
            `calibration_data`, ``"weight_only"`` keeps activations in float. 4 and 16 bits are
            weight-only (activations stay float) whatever is passed here.
        calibration_data: iterable of model inputs (tensors, tuples or dicts); needed for static.

    Use :func:`get_quantization_info` on the result to see what was done.
    """
    if quantization_type not in ("dynamic", "static", "weight_only"):
        raise ConfigError(
            f"unknown quantization_type {quantization_type!r}; supported: 'dynamic', 'static', 'weight_only'"
        )
    dtypes = {8: QuantizationDtype.INT8, 4: QuantizationDtype.INT4, 16: QuantizationDtype.FP16}
    if quantization_bits not in dtypes:
        raise ConfigError(f"quantization_bits must be 4, 8 or 16, got {quantization_bits!r}")
    dtype = dtypes[quantization_bits]
    mode = quantization_type if dtype == QuantizationDtype.INT8 else "weight_only"
    cfg = QuantizationConfig(dtype=dtype, mode=mode, group_size=group_size, exclude_layers=list(exclude_layers or []))
    quantizer = QUANTIZERS[dtype](show_progress=show_progress)
    result = quantizer.quantize(model, cfg, inplace=inplace, calibration_data=calibration_data)
    return result.model


def _quantized_layers(model: nn.Module) -> Dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def get_quantization_info(model: nn.Module) -> Dict[str, Any]:
    """What is quantized in `model`: bits, mode, affected layers and sizes.

    ``bits`` is an int when all quantized layers share one width, ``"mixed"`` otherwise, and
    ``None`` for an unquantized model. ``fp32_size_bytes`` is the size the model would have with
    every quantized layer back in float32.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedFormatError(f"expected a torch.nn.Module, got {type(model).__name__}")
    layers = _quantized_layers(model)
    size = model_size_bytes(model)
    fp32 = size
    details = {}
    for name, q in layers.items():
        dense = q.in_features * q.out_features * 4 + (q.out_features * 4 if q.bias is not None else 0)
        fp32 += dense - q.storage_bytes()
        details[name] = {**q.spec(), "size_bytes": q.storage_bytes()}
    dtypes = Counter(str(q.qdtype) for q in layers.values())
    bits = sorted({q.qdtype.bits for q in layers.values()})
    modes = sorted({q.act_mode for q in layers.values()})
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    return {
        "quantized": bool(layers),
        "bits": None if not bits else (bits[0] if len(bits) == 1 else "mixed"),
        "dtype": None if not dtypes else (next(iter(dtypes)) if len(dtypes) == 1 else "mixed"),
        "dtypes": dict(dtypes),
        "mode": None if not modes else (modes[0] if len(modes) == 1 else "mixed"),
        "num_quantized_layers": len(layers),
        "num_float_linear_layers": n_linear,
        "quantized_layers": list(layers),
        "layers": details,
        "size_bytes": size,
        "fp32_size_bytes": fp32,
        "compression_ratio": fp32 / size if size else 1.0,
    }


def dequantize_model(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every :class:`QuantizedLinear` with a plain float32 ``nn.Linear`` holding the
    dequantized weight; no quantization parameters are left. Returns the model (a copy unless
    ``inplace=True``)."""
    if not isinstance(model, nn.Module):
        raise UnsupportedFormatError(f"expected a torch.nn.Module, got {type(model).__name__}")
    layers = _quantized_layers(model)
    dense = {name: q.to_linear() for name, q in layers.items()}
    if inplace:
        out = model
        for name, lin in dense.items():
            if name == "":
                return lin
            _set_module(out, name, lin)
        return out
    if "" in dense:
        return dense[""]
    memo = {id(q): dense[name] for name, q in layers.items()}
    return copy.deepcopy(model, memo)


__all__ = ["quantize_", "quantize_model_ptq", "get_quantization_info", "dequantize_model", "QuantizationResult"]
