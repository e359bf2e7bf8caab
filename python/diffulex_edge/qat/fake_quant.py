"""Fake quantization for quantization-aware training.

The weight of a :class:`QATLinear` goes, in the forward pass, through exactly the quantizer that
post-training quantization uses for its format (``LAYER_FORMATS[dtype].quantize`` then
``dequantize``: the Rust round trip, for every format: INT8, INT4 groups, the GGUF block types, NF4,
ternary), so what the network trains against is what :func:`convert` will store. The rounding has
no useful gradient; the straight-through estimator (Bengio et al., 2013) passes the gradient to the
float weight unchanged. Activations of W8A8 layers are fake-quantized per token (symmetric int8,
the kernel's dynamic scheme), also with a straight-through gradient.

Options: ``noise`` (Quant-Noise, Fan et al. 2020: during training only a random fraction of the
weight's rows is quantized in each forward pass, the others stay float, so gradients also see
the unquantized weights) and ``enabled`` (off: the layer is a plain float Linear; gradual
quantization switches layers on one by one).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..quant import _ops
from ..quant.config import QuantizationConfig
from ..quant.layer_formats import LAYER_FORMATS


class _WeightRoundTrip(torch.autograd.Function):
    """forward: the format's quantize + dequantize of `w`; backward: identity (straight through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, fmt, importance: Optional[Any]) -> torch.Tensor:
        with torch.no_grad():
            w32 = w.detach().to("cpu", torch.float32).contiguous()
            buffers = fmt.quantize(w32, kernel="auto", name=None, importance=importance)
            return fmt.dequantize(buffers, w32.shape[1], True).to(w.device, w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class _ActRoundTrip(torch.autograd.Function):
    """Per-token symmetric int8 fake quantization (as the W8A8 dynamic kernels), straight through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _ops.fake_quantize_activations(x, None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def fake_quantize_weight(w: torch.Tensor, config: QuantizationConfig, importance: Optional[Any] = None) -> torch.Tensor:
    """`w` as the layer format of `config` stores it (values of the PTQ quantizer), with a
    straight-through gradient."""
    fmt = LAYER_FORMATS[config.dtype](config.dtype, config.group_size, config.resolved_symmetric)
    return _WeightRoundTrip.apply(w, fmt, importance)


class QATLinear(nn.Module):
    """An ``nn.Linear`` trained with its weight (and, for W8A8 modes, its input) fake-quantized as
    `config` quantizes it. Holds the float ``weight``/``bias`` parameters of the original layer (the
    same tensors: an optimizer built before :func:`prepare_qat` keeps working)."""

    def __init__(self, linear: nn.Linear, config: QuantizationConfig, *, name: str = "",
                 importance: Optional[Any] = None, noise: float = 1.0) -> None:
        super().__init__()
        if config.mode == "static":
            raise ConfigError("QAT with static activation scales is not simulated: train with mode='dynamic' (the same "
                              "int8 grid, per-token scales), then calibrate static scales with "
                              "quantize_(..., calibration_data=...) on the trained model", layer=name)
        if not 0.0 < noise <= 1.0:
            raise ConfigError(f"noise is the fraction of rows quantized per step, in (0, 1]; got {noise}", layer=name)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.config = config
        self.name = name
        self.importance = importance
        self.noise = float(noise)
        self.enabled = True
        self._fmt = LAYER_FORMATS[config.dtype](config.dtype, config.group_size, config.resolved_symmetric)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as it would be stored now (fake-quantized, straight-through gradient)."""
        return _WeightRoundTrip.apply(self.weight, self._fmt, self.importance)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.enabled:
            wq = self.quantized_weight()
            if self.training and self.noise < 1.0:
                rows = torch.rand(self.out_features, 1, device=w.device) < self.noise
                wq = torch.where(rows, wq, w)
            w = wq
            if self.config.mode == "dynamic":
                x = _ActRoundTrip.apply(x)
        return F.linear(x, w, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the trained (float) parameters."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.config.dtype}, "
                f"mode={self.config.mode}, enabled={self.enabled}" + (f", noise={self.noise}" if self.noise < 1 else ""))


__all__ = ["QATLinear", "fake_quantize_weight"]
