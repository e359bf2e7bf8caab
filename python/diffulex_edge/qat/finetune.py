"""Fine-tuning a quantized model while it stays quantized.

Two ways, both leaving every ``QuantizedLinear``'s codes frozen and its memory quantized:

* :func:`add_lora`: low-rank adapters (LoRA, Hu et al. 2021; on quantized bases as QLoRA, Dettmers
  et al. 2023) on top of the frozen quantized layers: ``y = Wq x + (alpha / r) B A x``, with A and
  B float and trainable (B starts at zero, so training starts from the quantized model exactly).
  :func:`merge_lora` folds them into the weights and re-quantizes each layer in its own format, so
  the result is again a plain quantized model.
* :func:`train_scales`: the per-channel (INT8) or per-group (INT4) scales become trainable
  parameters (the integer codes stay), the layer computing ``(q - z) * s`` in torch; the updated
  scales are written back into the layers by :func:`merge_scales`. The model stays the same size.
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..quant import _ops
from ..quant.config import QuantizationDtype
from ..quant.nn import QuantizedLinear
from ..quant.walk import _set_module


class LoRAQuantizedLinear(nn.Module):
    """A frozen :class:`QuantizedLinear` plus a trainable low-rank update."""

    def __init__(self, base: QuantizedLinear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        dev = base._storage().device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises a weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the base is frozen: its (native) matmul needs no graph
            y = self.base(x.detach())
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged(self) -> QuantizedLinear:
        """The base layer with the adapter folded in, re-quantized in the base's format."""
        b = self.base
        if not bool(self.lora_B.detach().any()) or not bool(self.lora_A.detach().any()):
            return b  # a zero update: the layer as it was (a re-quantization would only add error)
        return requantized_with(b, (self.lora_B @ self.lora_A) * self.scaling)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def requantized_with(base: QuantizedLinear, delta: torch.Tensor) -> QuantizedLinear:
    """A new layer in `base`'s format (dtype, group size, symmetry, activation mode) holding
    ``base``'s dequantized weight plus `delta`, quantized again."""
    lin = base.to_linear()
    with torch.no_grad():
        lin.weight += delta.detach().to(lin.weight)
    if not bool(torch.isfinite(lin.weight).all()):
        raise ConfigError("NaN/Inf in the merged weight: the update is broken")
    return QuantizedLinear.from_linear(lin, base.qdtype, group_size=base.group_size, symmetric=base.symmetric,
                                       act_mode=base.act_mode, kernel=base.kernel)


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target: str = "*") -> List[str]:
    """Wrap every QuantizedLinear whose name matches `target` (fnmatch) in a LoRA adapter and
    freeze everything but the adapters. Returns the wrapped layer names."""
    import fnmatch

    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and fnmatch.fnmatch(n, target)]
    if not names:
        raise ConfigError("add_lora found no QuantizedLinear layers to adapt; quantize the model first (quantize_)")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _set_module(model, n, LoRAQuantizedLinear(model.get_submodule(n), rank, alpha, dropout))
    return names


def _merge_all(model: nn.Module, kind: type) -> int:
    """Replace every `kind` wrapper by its ``merged()`` layer (in place); returns how many."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
    for name, m in found:
        _set_module(model, name, m.merged())
    return len(found)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer (re-quantized in the layer's format); in place. Returns
    the number merged."""
    return _merge_all(model, LoRAQuantizedLinear)


class ScaleTunedLinear(nn.Module):
    """A QuantizedLinear (INT8 or INT4) whose scales train: ``W = (q - z) * scales`` in torch."""

    def __init__(self, base: QuantizedLinear) -> None:
        super().__init__()
        if base.qdtype not in (QuantizationDtype.INT8, QuantizationDtype.INT4) or base.act_mode != "weight_only" \
                or base.n_protect:
            raise ConfigError(f"trainable scales need an int8/int4 weight-only layer without a protect table, got "
                              f"{base.qdtype} ({base.act_mode})")
        self.base = base
        self.scales = nn.Parameter(base.scales.detach().clone().to(torch.float32))

    def weight(self) -> torch.Tensor:
        b = self.base
        if b.qdtype == QuantizationDtype.INT8:
            return _ops.dequantize_int8_torch(b.qweight, self.scales, b.zero_points)
        return _ops.dequantize_int4_torch(b.qweight, self.scales, b.zeros, b.group_size, b.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.base.bias is None else self.base.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    def merged(self) -> QuantizedLinear:
        with torch.no_grad():
            self.base.scales.copy_(self.scales)
        return self.base


def train_scales(model: nn.Module) -> List[str]:
    """Make the scales of every INT8/INT4 weight-only QuantizedLinear trainable (everything else
    frozen). Returns the layer names."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)
             and m.qdtype in (QuantizationDtype.INT8, QuantizationDtype.INT4) and m.act_mode == "weight_only"
             and not m.n_protect]
    if not names:
        raise ConfigError("train_scales found no int8/int4 weight-only QuantizedLinear layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _set_module(model, n, ScaleTunedLinear(model.get_submodule(n)))
    return names


def merge_scales(model: nn.Module) -> int:
    """Write the trained scales back into the QuantizedLinear layers (in place)."""
    return _merge_all(model, ScaleTunedLinear)


__all__ = ["LoRAQuantizedLinear", "ScaleTunedLinear", "add_lora", "merge_lora", "merge_scales", "requantized_with",
           "train_scales"]
