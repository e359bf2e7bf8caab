"""`prepare_qat` swaps the Linear layers that PTQ would quantize for :class:`QATLinear`;
`convert` swaps them back and runs PTQ on the trained weights: the stored bytes are exactly those
``quantize_`` gives for the same float weights (the forward pass trained against those values)."""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError
from ..quant.config import QuantizationConfig
from ..quant.importance import resolve_imatrix
from ..quant.result import QuantizationResult
from ..quant.walk import _set_module, plan_layers
from .fake_quant import QATLinear

log = logging.getLogger(__name__)


def _as_config(config: Union[QuantizationConfig, str, dict]) -> QuantizationConfig:
    if isinstance(config, str):
        cfg = QuantizationConfig.from_scheme(config)
    else:
        cfg = config if isinstance(config, QuantizationConfig) else QuantizationConfig.from_dict(config)
    if cfg.dtype is None:
        raise ConfigError("the QAT config has no dtype; give a format (e.g. 'int4-g128', 'ternary', 'q4_K')")
    return cfg


def prepare_qat(model: nn.Module, config: Union[QuantizationConfig, str, dict], *, imatrix: Any = None,
                noise: float = 1.0, learn_scales: bool = False) -> nn.Module:
    """Make `model` (in place) train with its Linear layers fake-quantized as `config` quantizes
    them (the same layers ``quantize_`` would pick: exclusions, tied weights and indivisible
    shapes as there). imatrix: importances the quantizer uses (as in PTQ). noise: fraction of each
    weight's rows quantized per training step (Quant-Noise; 1 = all). learn_scales: INT8/INT4 only:
    the scales train too (LSQ, initialised with PTQ's), and :func:`convert` stores the learned ones.
    Returns `model`."""
    cfg = _as_config(config)
    if qat_layers(model):
        raise ConfigError("the model is already prepared for QAT (it has QATLinear layers)")
    plan = plan_layers(model, cfg)
    for w in plan.warnings:
        log.warning(w)
    imp = resolve_imatrix(imatrix if imatrix is not None else cfg.imatrix, model) if cfg.dtype.takes_importance else None
    for name, lin in plan.layers:
        if name in plan.padded:
            raise ConfigError(f"{name}: in_features {lin.in_features} is not whole groups of {cfg.group_size}; "
                              "QAT simulates whole groups only: exclude the layer or pick a group size", layer=name)
        q = QATLinear(lin, cfg, name=name, importance=imp[name] if (imp is not None and name in imp) else None,
                      noise=noise, learn_scales=learn_scales)
        if name:
            _set_module(model, name, q)
        else:
            raise ConfigError("prepare_qat needs a model that contains Linear layers, not a bare nn.Linear")
    model._diffulex_qat_config = cfg
    log.info("prepare_qat: %d layers fake-quantized as %s", len(plan.layers), cfg.dtype)
    return model


def qat_layers(model: nn.Module) -> List[QATLinear]:
    return [m for m in model.modules() if isinstance(m, QATLinear)]


def set_qat_enabled(model: nn.Module, fraction: float = 1.0) -> int:
    """Gradual quantization: fake-quantize the first `fraction` of the QAT layers (in model order;
    the rest train in float). Returns how many are enabled."""
    layers = qat_layers(model)
    k = int(round(max(0.0, min(1.0, fraction)) * len(layers)))
    for i, m in enumerate(layers):
        m.enabled = i < k
    return k


def unwrap_qat(model: nn.Module) -> nn.Module:
    """Replace every QATLinear by a plain nn.Linear holding its trained parameters (in place)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QATLinear):
            _set_module(model, name, m.to_linear())
    if hasattr(model, "_diffulex_qat_config"):
        del model._diffulex_qat_config
    return model


def convert(model: nn.Module, *, imatrix: Any = None, show_progress: Optional[bool] = None) -> QuantizationResult:
    """The trained QAT model quantized (in place) with the config it was prepared with: every
    QATLinear becomes the ``QuantizedLinear`` PTQ makes of its trained weight (same bytes as
    ``quantize_`` on the same float weights). Returns the PTQ result."""
    from ..quant.api import quantize_

    cfg = getattr(model, "_diffulex_qat_config", None)
    if cfg is None:
        raise ConfigError("the model was not prepared with prepare_qat (no QATLinear layers)")
    layers = qat_layers(model)
    if any(m.learn_scales for m in layers):
        return _convert_learned(model, cfg, layers)
    if imatrix is None:
        imp = {m.name: m.importance for m in layers if m.importance is not None}
        imatrix = imp or None
    unwrap_qat(model)
    model.eval()
    return quantize_(model, cfg, imatrix=imatrix, show_progress=show_progress)


def _convert_learned(model: nn.Module, cfg: QuantizationConfig, layers: List[QATLinear]) -> QuantizationResult:
    """Layers with learned scales become QuantizedLinear layers holding those scales."""
    import time

    from ..quant.result import LayerRecord
    from ..quant.walk import layer_format, model_size_bytes

    t0 = time.perf_counter()
    before = model_size_bytes(model)
    records = []
    for name, m in list(model.named_modules()):
        if isinstance(m, QATLinear):
            q = m.to_quantized()
            w = m.weight.detach().to(torch.float32)
            err = float((q.dequantize_weight().to(w.device) - w).norm() / w.norm().clamp_min(1e-30))
            records.append(LayerRecord(name, m.in_features, m.out_features, str(m.weight.dtype).replace("torch.", ""),
                                       layer_format(cfg), m.weight.numel() * m.weight.element_size(), q.storage_bytes(),
                                       err, False))
            _set_module(model, name, q)
    del model._diffulex_qat_config
    model.eval()
    return QuantizationResult(model, cfg, before, model_size_bytes(model), time.perf_counter() - t0, records, {}, [])


__all__ = ["convert", "prepare_qat", "qat_layers", "set_qat_enabled", "unwrap_qat"]
