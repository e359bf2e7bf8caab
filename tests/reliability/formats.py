"""The quantized layer formats the reliability tests cover, built the same way in every process."""

from __future__ import annotations

import torch
from torch import nn

from diffulex_edge.quant import QuantizedLinear

# name -> from_linear keyword arguments
FORMATS = {
    "fp16": dict(dtype="fp16"),
    "bf16": dict(dtype="bf16"),
    "int8": dict(dtype="int8"),
    "int8_asym": dict(dtype="int8", symmetric=False),
    "w8a8_dynamic": dict(dtype="int8", act_mode="dynamic"),
    "w8a8_static": dict(dtype="int8", act_mode="static", act_scale=0.05),
    "int4_g32": dict(dtype="int4", group_size=32),
    "int4_g128": dict(dtype="int4", group_size=128),
    "int4_g128_sym": dict(dtype="int4", group_size=128, symmetric=True),
}


def protected_positions(out_features: int, in_features: int, n: int = 6):
    g = torch.Generator().manual_seed(7)
    return torch.stack([torch.randint(0, out_features, (n,), generator=g),
                        torch.randint(0, in_features, (n,), generator=g)], dim=1)


def quantized_layer(fmt: str, protect: bool, in_features: int = 256, out_features: int = 512, seed: int = 0) -> QuantizedLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features)
    kw = dict(FORMATS[fmt])
    if protect:
        p = protected_positions(out_features, in_features)
        with torch.no_grad():
            lin.weight[p[:, 0], p[:, 1]] = 3.0  # outliers worth protecting
        kw["protect"] = p
    return QuantizedLinear.from_linear(lin, **kw).eval()


def quantized_model(fmt: str, protect: bool, d: int = 256) -> nn.Module:
    """Two quantized layers with float ops between them (GELU, LayerNorm)."""
    return nn.Sequential(
        quantized_layer(fmt, protect, d, 2 * d, seed=1), nn.GELU(),
        quantized_layer(fmt, protect, 2 * d, d, seed=2), nn.LayerNorm(d),
    ).eval()


def inputs(seed: int, d: int = 256, rows=(1, 3, 8, 33), dtypes=(torch.float32, torch.bfloat16)):
    """Inputs of several batch sizes (GEMV and GEMM paths; serial and parallel) and dtypes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in rows:
        for dt in dtypes:
            out.append(torch.randn(m, d, generator=g).to(dt))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, for bit-exact comparisons (NaN == NaN, -0.0 != 0.0)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)
