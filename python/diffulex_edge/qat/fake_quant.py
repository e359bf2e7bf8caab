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


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


#: integer code range of the formats whose step sizes can be learned
_CODE_RANGE = {"int8": (-128, 127), "int4": (0, 15)}


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
                 importance: Optional[Any] = None, noise: float = 1.0, learn_scales: bool = False) -> None:
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
        self.learn_scales = bool(learn_scales)
        if self.learn_scales:
            self._init_learned_scales()

    # ---- learned step sizes (as LSQ, Esser et al. 2020: the rounding straight through, the step
    # size trained by its gradient; here through its logarithm, which suits Adam) -----------------
    def _init_learned_scales(self) -> None:
        """INT8 (per channel) / INT4 (per group): the scales become parameters, initialised with
        PTQ's; the zero points stay PTQ's. The forward pass then rounds with the learned scales
        (straight-through rounding, LSQ's scaled step-size gradient), and `convert` stores them."""
        kind = self.config.dtype.value
        if kind not in _CODE_RANGE:
            raise ConfigError(f"learned scales are for int8 / int4 layers; {kind} keeps its PTQ quantizer "
                              "(its scales live inside packed blocks)", layer=self.name)
        if kind == "int4" and self.in_features % self.config.group_size:
            raise ConfigError(f"in_features {self.in_features} is not whole groups of {self.config.group_size}",
                              layer=self.name)
        with torch.no_grad():
            b = self._fmt.quantize(self.weight.detach().to("cpu", torch.float32).contiguous(), kernel="auto", name=None,
                                   importance=self.importance)
        zero = b["zero_points"] if kind == "int8" else b["zeros"]
        dev = self.weight.device
        # the logarithm trains: the step stays positive, and an optimizer step of size lr (Adam's,
        # whatever the gradient's scale) changes it by a factor ~exp(lr), not by lr itself
        scales = b["scales"].to(dev, torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
        self.log_scale = nn.Parameter(scales.log())
        self.register_buffer("zero", zero.to(dev, torch.float32).clone())

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def _learned(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(codes, dequantized weight) with the learned scales; codes float in the format's range."""
        lo, hi = _CODE_RANGE[self.config.dtype.value]
        if self.config.dtype.value == "int8":
            s, z, wg = scale[:, None], self.zero[:, None], w
        else:
            g = self.config.group_size
            wg = w.reshape(self.out_features, self.in_features // g, g)
            s, z = scale[..., None], self.zero[..., None]
        q = torch.clamp(_round_ste(wg / s) + z, lo, hi)
        return q, ((q - z) * s).reshape(self.out_features, self.in_features)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as it would be stored now (fake-quantized, straight-through gradient)."""
        if self.learn_scales:
            return self._learned(self.weight.to(torch.float32), self.scale)[1].to(self.weight.dtype)
        return _WeightRoundTrip.apply(self.weight, self._fmt, self.importance)

    def to_quantized(self):
        """The QuantizedLinear of the trained weight with the learned scales (learn_scales only)."""
        from ..quant.nn import QuantizedLinear

        if not self.learn_scales:
            raise ConfigError("to_quantized is for learned scales; other layers convert through PTQ", layer=self.name)
        c = self.config
        q = QuantizedLinear(self.in_features, self.out_features, self.bias is not None, dtype=c.dtype,
                            group_size=c.group_size, symmetric=c.resolved_symmetric, act_mode=c.mode, kernel=c.kernel,
                            device="cpu")
        with torch.no_grad():
            codes, _ = self._learned(self.weight.detach().to("cpu", torch.float32), self.scale.detach().cpu())
            if c.dtype.value == "int8":
                q.qweight.copy_(codes.to(torch.int8))
                q.scales.copy_(self.scale.detach().cpu())
                q.zero_points.copy_(self.zero.cpu().to(torch.int8))
            else:
                u = codes.reshape(self.out_features, self.in_features).to(torch.uint8)
                if self.in_features % 2:
                    u = torch.nn.functional.pad(u, (0, 1))
                q.qweight.copy_(u[:, 0::2] | (u[:, 1::2] << 4))
                q.scales.copy_(self.scale.detach().cpu())
                q.zeros.copy_(self.zero.cpu().to(torch.uint8))
            if self.bias is not None:
                q.bias.copy_(self.bias.detach().cpu().to(q.bias.dtype))
        return q.to(self.weight.device)

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
                f"mode={self.config.mode}, enabled={self.enabled}" + (f", noise={self.noise}" if self.noise < 1 else "")
                + (", learned scales" if self.learn_scales else ""))


__all__ = ["QATLinear", "fake_quantize_weight"]
