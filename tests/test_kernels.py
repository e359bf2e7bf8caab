"""Native quantized-linear kernels through the Python API: every kernel level this CPU offers,
batch sizes on both sides of the GEMV / GEMM switch, and bfloat16 activations passed through
as a uint16 view (the kernels widen them exactly, so the reference is the f32 of the same values)."""

import numpy as np
import pytest
import torch
from torch import nn

from diffulex_edge import _native
from diffulex_edge.errors import UnsupportedFormatError
from diffulex_edge.quant.nn import QuantizedLinear

LEVELS = _native.kernel_info()["available"]
ALL_LEVELS = ["scalar", "avx2", "avx512", "avx_vnni", "avx512_vnni"]


def reference(q: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """float64 x @ W_deq^T + b (W8A8: on the fake-quantized activations)."""
    w = q.dequantize_weight().double()
    xf = x.float()
    if q.act_mode != "weight_only":
        from diffulex_edge.quant import _ops

        xf = _ops.fake_quantize_activations(xf, None)
    y = xf.double() @ w.T
    return y + q.bias.double() if q.bias is not None else y


def test_levels_and_names():
    assert LEVELS[0] == "scalar"
    assert set(LEVELS) <= set(ALL_LEVELS)
    for name in ALL_LEVELS:
        if name in LEVELS:
            QuantizedLinear.from_linear(nn.Linear(8, 4), "int8", kernel=name)(torch.randn(2, 8))
        else:
            # naming a level this CPU lacks is an error, never a silent fallback
            with pytest.raises(UnsupportedFormatError, match="not supported by this CPU"):
                QuantizedLinear.from_linear(nn.Linear(8, 4), "int8", kernel=name)(torch.randn(2, 8))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("m", [1, 3, 8, 16, 37])
@pytest.mark.parametrize("fmt", ["int8", "int8_asym", "int4_g32", "int4_g128", "w8a8"])
def test_native_matches_reference(level, m, fmt):
    torch.manual_seed(m)
    k, n = 4095 if m < 8 else 300, 33
    lin = nn.Linear(k, n)
    kw = {
        "int8": dict(dtype="int8"),
        "int8_asym": dict(dtype="int8", symmetric=False),
        "int4_g32": dict(dtype="int4", group_size=32, on_indivisible="pad"),  # 4095 / 300: a short last group
        "int4_g128": dict(dtype="int4", group_size=128, on_indivisible="pad"),
        "w8a8": dict(dtype="int8", act_mode="dynamic"),
    }[fmt]
    q = QuantizedLinear.from_linear(lin, kernel=level, **kw)
    x = torch.randn(m, k)
    with torch.no_grad():
        got = q(x).double()
    want = reference(q, x)
    # summation error bound: (k + 2) * eps * sum |x * w| (+ the bias)
    mag = x.double().abs() @ q.dequantize_weight().double().abs().T
    bound = (k + 2) * torch.finfo(torch.float32).eps * mag + 1e-5
    assert torch.all((got - want).abs() <= bound), (got - want).abs().max()


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16"])
def test_bf16_activations_pass_through(m, fmt):
    torch.manual_seed(0)
    lin = nn.Linear(200, 17)
    q = QuantizedLinear.from_linear(lin, fmt, on_indivisible="pad")  # 200 = 1.56 INT4 groups of 128
    xb = torch.randn(m, 200).to(torch.bfloat16)
    with torch.no_grad():
        yb = q(xb)
        yf = q(xb.float())
    assert yb.dtype == torch.bfloat16
    # same kernel on the same (exactly widened) values; only the final bf16 rounding differs
    assert torch.equal(yb, yf.to(torch.bfloat16))


def test_bf16_view_goes_to_native_unconverted():
    x = torch.randn(4, 64).to(torch.bfloat16)
    q, s, z = _native.quantize_int8(torch.randn(8, 64).numpy())
    out_b = np.empty((4, 8), np.float32)
    out_f = np.empty((4, 8), np.float32)
    _native.linear_int8(x.view(torch.int16).numpy().view(np.uint16), q, s, z, out_b)
    _native.linear_int8(x.float().numpy(), q, s, z, out_f)
    assert np.array_equal(out_b, out_f)
