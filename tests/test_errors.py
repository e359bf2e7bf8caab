"""The exception hierarchy (diffulex_edge/errors.py) and how bad input is reported: typed errors
that name the offending layer, raised before the model is touched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffulex_edge
from diffulex_edge import (
    ConfigError,
    CorruptFileError,
    NonFiniteWeightError,
    QuantizationError,
    ShapeError,
    UnsupportedFormatError,
)
from diffulex_edge.quant import (
    BF16Quantizer,
    FP16Quantizer,
    INT4Quantizer,
    INT8Quantizer,
)

QUANTIZERS = {
    "fp16": FP16Quantizer,
    "bf16": BF16Quantizer,
    "int8": INT8Quantizer,
    "int4": INT4Quantizer,
}


def test_hierarchy():
    assert issubclass(ConfigError, (QuantizationError, ValueError))
    assert issubclass(ShapeError, QuantizationError) and issubclass(ShapeError, ValueError)
    assert issubclass(NonFiniteWeightError, QuantizationError) and issubclass(NonFiniteWeightError, ValueError)
    assert issubclass(UnsupportedFormatError, QuantizationError) and issubclass(UnsupportedFormatError, TypeError)
    assert issubclass(CorruptFileError, QuantizationError) and issubclass(CorruptFileError, OSError)
    assert issubclass(QuantizationError, Exception)
    for cls in (ConfigError, ShapeError, NonFiniteWeightError, UnsupportedFormatError, CorruptFileError):
        assert getattr(diffulex_edge, cls.__name__) is cls


def test_layer_name_is_attached_once():
    e = ShapeError("bad shape", layer="model.fc")
    assert e.layer == "model.fc" and str(e) == "layer 'model.fc': bad shape"
    again = ShapeError(str(e), layer="model.fc")
    assert str(again) == "layer 'model.fc': bad shape"
    assert QuantizationError("plain").layer is None and str(QuantizationError("plain")) == "plain"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 8)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, m) for n, m in model.named_modules()],
    )


def assert_untouched(model, snap):
    state, modules = snap
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        # NaN == NaN for this purpose: compare the raw bytes
        assert torch.equal(now[k].view(torch.int32), v.view(torch.int32)), k
    assert [(n, m) for n, m in model.named_modules()] == modules  # same module objects


@pytest.mark.parametrize("dtype", list(QUANTIZERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("inplace", [False, True])
def test_non_finite_weights_raise_and_leave_model_untouched(dtype, bad, inplace):
    model = Block()
    with torch.no_grad():
        model.b.weight[5, 7] = bad  # the second layer: the first one would already be converted
    snap = snapshot(model)
    with pytest.raises(NonFiniteWeightError) as e:
        QUANTIZERS[dtype]().quantize(model, {"group_size": 32}, inplace=inplace)
    assert e.value.layer == "b" and "layer 'b'" in str(e.value)
    assert isinstance(e.value, ValueError)
    assert_untouched(model, snap)


def test_non_finite_bias_is_not_a_weight_error():
    # only weights are quantized; a NaN bias is copied as is
    model = nn.Sequential(nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    res = INT8Quantizer().quantize(model)
    assert torch.isnan(res.model[0].bias[0])


@pytest.mark.parametrize("inplace", [False, True])
def test_fp16_overflow_raises(inplace):
    model = Block()
    with torch.no_grad():
        model.c.weight[0, 0] = 1e6
    snap = snapshot(model)
    with pytest.raises(QuantizationError, match="float16 range") as e:
        FP16Quantizer().quantize(model, inplace=inplace)
    assert e.value.layer == "c" and "bf16" in str(e.value)
    assert isinstance(e.value, ValueError)
    assert_untouched(model, snap)
    # bf16 has the float32 exponent range: fine
    res = BF16Quantizer().quantize(model)
    assert res.model.c.weight[0, 0].item() == pytest.approx(1e6, rel=2**-8)
    # 65504 is the largest float16: still fine
    with torch.no_grad():
        model.c.weight[0, 0] = 65504.0
    assert FP16Quantizer().quantize(model).model.c.weight[0, 0].item() == 65504.0
    # the overflow threshold is the rounding boundary: 65519 rounds down to 65504, 65520 ties to inf
    with torch.no_grad():
        model.c.weight[0, 0] = 65519.0
    assert FP16Quantizer().quantize(model).model.c.weight[0, 0].item() == 65504.0
    with torch.no_grad():
        model.c.weight[0, 0] = 65520.0
    with pytest.raises(NonFiniteWeightError, match="would become inf"):
        FP16Quantizer().quantize(model)


@pytest.mark.parametrize("thing", ["model", 42, None, {"fc": nn.Linear(2, 2)}, [nn.Linear(2, 2)]])
@pytest.mark.parametrize("dtype", list(QUANTIZERS))
def test_non_module_input(thing, dtype):
    with pytest.raises(UnsupportedFormatError, match="torch.nn.Module") as e:
        QUANTIZERS[dtype]().quantize(thing)
    assert isinstance(e.value, TypeError)


def test_meta_device_weights():
    with torch.device("meta"):
        model = Block()
    with pytest.raises(UnsupportedFormatError, match="meta device") as e:
        INT8Quantizer().quantize(model)
    assert e.value.layer == "a"
    assert all(p.device.type == "meta" for p in model.parameters())


def test_integer_weights():
    model = Block()
    model.b.weight = nn.Parameter(torch.ones(64, 64, dtype=torch.int32), requires_grad=False)
    snap_types = [type(m) for m in model.modules()]
    with pytest.raises(UnsupportedFormatError, match="not a float type") as e:
        INT4Quantizer().quantize(model, {"group_size": 32}, inplace=True)
    assert e.value.layer == "b"
    assert [type(m) for m in model.modules()] == snap_types


def test_errors_from_the_native_core_are_typed():
    import numpy as np

    from diffulex_edge import _native

    with pytest.raises(ShapeError):
        _native.dequantize_int8(np.zeros((2, 3), np.int8), np.ones(3, np.float32), np.zeros(2, np.int8))
    with pytest.raises(UnsupportedFormatError):
        _native.quantize_int8(np.zeros((2, 3), np.float32), True, "riscv")
    with pytest.raises(ConfigError):
        _native.quantize_int4(np.zeros((2, 64), np.float32), 48)
    with pytest.raises(NonFiniteWeightError):
        _native.quantize_int8(np.full((1, 3), np.nan, np.float32))


def test_huge_weight_range_is_reported_per_layer():
    model = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0] = torch.tensor([3.4e38, -3.4e38, 0.0, 1.0])
    with pytest.raises(ConfigError, match="overflows") as e:
        INT8Quantizer().quantize(model, {"symmetric": False})
    assert e.value.layer == "0"
