"""The functional API: quantize_, quantize_model_ptq, get_quantization_info, dequantize_model."""

from __future__ import annotations

import logging

import pytest
import reference as ref
import torch
from torch import nn

from diffulex_edge import ConfigError, UnsupportedFormatError
from diffulex_edge.quant import (
    QUANTIZERS,
    INT4Quantizer,
    INT8Quantizer,
    QuantizationConfig,
    QuantizedLinear,
    dequantize_model,
    get_quantization_info,
    model_size_bytes,
    quantize_,
    quantize_model_ptq,
)

EPS32 = float(torch.finfo(torch.float32).eps)


def qlayers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


# ---- quantize_model_ptq ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "bits, qtype, dtype, mode",
    [
        (8, "dynamic", "int8", "dynamic"),
        (8, "weight_only", "int8", "weight_only"),
        (4, "dynamic", "int4", "weight_only"),  # 4 and 16 bits are weight-only whatever is asked
        (4, "weight_only", "int4", "weight_only"),
        (16, "dynamic", "fp16", "weight_only"),
    ],
)
def test_quantize_model_ptq(mlp, snapshot, assert_unchanged, bits, qtype, dtype, mode):
    before = snapshot(mlp)
    out = quantize_model_ptq(mlp, bits, qtype, group_size=32, show_progress=False)
    assert out is not mlp
    assert_unchanged(mlp, before)
    assert all(type(m) is nn.Linear for n, m in mlp.named_modules() if n in ("fc1", "fc2", "head"))
    layers = qlayers(out)
    assert set(layers) == {"fc1", "fc2", "head"}
    assert {str(m.qdtype) for m in layers.values()} == {dtype}
    assert {m.act_mode for m in layers.values()} == {mode}
    if dtype == "int4":
        assert {m.group_size for m in layers.values()} == {32}
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert bool(torch.isfinite(out(x)).all())


def test_quantize_model_ptq_static(mlp):
    with pytest.raises(ConfigError, match="calibration_data"):
        quantize_model_ptq(mlp, 8, "static")
    calib = [torch.randn(4, 64) for _ in range(3)]
    out = quantize_model_ptq(mlp, 8, "static", calib)
    layers = qlayers(out)
    assert {m.act_mode for m in layers.values()} == {"static"}
    absmax = max(float(b.abs().max()) for b in calib)
    assert layers["fc1"].act_scale.item() == pytest.approx(absmax / 127, rel=1e-6)


def test_quantize_model_ptq_defaults_exclusions_and_inplace(mlp):
    out = quantize_model_ptq(mlp, exclude_layers=["head"], inplace=True)
    assert out is mlp
    assert {m.act_mode for m in qlayers(out).values()} == {"dynamic"}  # defaults: 8 bits, dynamic
    assert type(mlp.head) is nn.Linear and isinstance(mlp.fc1, QuantizedLinear)


@pytest.mark.parametrize("bits, qtype", [(2, "dynamic"), (32, "dynamic"), ("8", "dynamic"), (8, "qat"), (8, "Dynamic")])
def test_quantize_model_ptq_bad_arguments(mlp, bits, qtype):
    with pytest.raises(ConfigError):
        quantize_model_ptq(mlp, bits, qtype)


def test_quantize_model_ptq_rejects_non_modules():
    with pytest.raises(UnsupportedFormatError, match="torch.nn.Module"):
        quantize_model_ptq({"weight": torch.zeros(2, 2)}, 8)


# ---- quantize_ --------------------------------------------------------------------------------

def test_quantize_in_place(mlp):
    fc1 = mlp.fc1
    res = quantize_(mlp, QuantizationConfig(dtype="int4", group_size=64))
    assert res.model is mlp
    assert isinstance(mlp.fc1, QuantizedLinear) and mlp.fc1 is not fc1
    assert res.num_quantized_layers == 3
    res = quantize_(nn.Sequential(nn.Linear(8, 8)), {"dtype": "bf16"})
    assert str(res.model[0].qdtype) == "bf16"


def test_quantize_in_place_takes_scheme_names_imatrix_and_protect(mlp):
    ref_model = __import__("copy").deepcopy(mlp)
    w = mlp.fc1.weight.detach().clone()
    imp = {"fc1": torch.rand(w.shape[1]) + 0.1}
    with pytest.warns(UserWarning, match="no entry for 2 layer"):  # fc2 and head are not in imp
        res = quantize_(mlp, "int4-g32-sym", imatrix=imp, protect={"fc1": [(0, 1)]})
    assert res.model is mlp and mlp.fc1.group_size == 32 and mlp.fc1.symmetric and mlp.fc1.n_protect == 1
    assert mlp.fc1.dequantize_weight()[0, 1] == w[0, 1].half().float()  # the protected weight kept (as fp16)
    # the same call through the quantizer gives the same bytes
    from diffulex_edge.quant import INT4Quantizer

    with pytest.warns(UserWarning, match="no entry for 2 layer"):
        other = INT4Quantizer().quantize(ref_model, QuantizationConfig.from_scheme("int4-g32-sym"), imatrix=imp,
                                         protect={"fc1": [(0, 1)]}).model
    assert torch.equal(other.fc1.qweight, mlp.fc1.qweight) and torch.equal(other.fc1.scales, mlp.fc1.scales)
    with pytest.raises(ConfigError, match="unknown scheme"):
        quantize_(ref_model, "int5")


def test_quantize_in_place_needs_a_dtype(mlp):
    with pytest.raises(ConfigError, match="no dtype"):
        quantize_(mlp, QuantizationConfig())
    with pytest.raises(ConfigError, match="valid keys"):
        quantize_(mlp, {"dtype": "int8", "bitz": 8})


def test_bare_linear_model():
    lin = nn.Linear(64, 8)
    res = INT8Quantizer().quantize(lin)
    assert isinstance(res.model, QuantizedLinear) and type(lin) is nn.Linear
    res = INT8Quantizer().quantize(lin, inplace=True)  # a root Linear cannot be swapped in place
    assert isinstance(res.model, QuantizedLinear)
    back = dequantize_model(res.model)
    assert type(back) is nn.Linear
    assert torch.equal(back.weight.detach(), ref.int8_dequantize(*ref.int8_quantize(lin.weight.detach(), True)))
    assert type(dequantize_model(res.model, inplace=True)) is nn.Linear


# ---- input not modified; disabled; empty -------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "int4"])
def test_input_model_unmodified_unless_inplace(make_mlp, snapshot, assert_unchanged, dtype):
    model = make_mlp()
    before = snapshot(model)
    modules_before = dict(model.named_modules())
    res = quantize_model_ptq(model, {"fp16": 16, "bf16": 16, "int8": 8, "int4": 4}[dtype], "weight_only", group_size=32)
    assert_unchanged(model, before)
    assert dict(model.named_modules()) == modules_before
    # inplace: the same object, layers swapped
    cfg = QuantizationConfig(dtype=dtype, group_size=32)
    res = QUANTIZERS[cfg.dtype]().quantize(model, cfg, inplace=True)
    assert res.model is model and set(qlayers(model)) == {"fc1", "fc2", "head"}


def test_disabled_config_leaves_model_unchanged(mlp, snapshot, assert_unchanged):
    before = snapshot(mlp)
    for cfg in (QuantizationConfig(dtype="int8", enabled=False), QuantizationConfig(enabled=False)):
        res = INT8Quantizer().quantize(mlp, cfg)
        assert res.num_quantized_layers == 0 and not qlayers(res.model)
        assert res.model is not mlp
        assert_unchanged(res.model, before)
        assert any("disabled" in w for w in res.warnings)
        assert res.compression_ratio == 1.0 and res.memory_reduction_pct == 0.0
    res = INT8Quantizer().quantize(mlp, QuantizationConfig.from_yaml(""), inplace=True)
    assert res.model is mlp
    assert_unchanged(mlp, before)


def test_empty_model_warns_and_quantizes_nothing(no_linear, caplog):
    with caplog.at_level(logging.WARNING, logger="diffulex_edge.quant"):
        res = INT8Quantizer().quantize(no_linear)
    assert res.num_quantized_layers == 0
    assert any("no Linear layers" in w for w in res.warnings)
    assert any("no Linear layers" in r.getMessage() for r in caplog.records)
    assert res.compression_ratio == 1.0
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        assert torch.equal(res.model(x), no_linear(x))
    empty = nn.Module()
    res = INT4Quantizer().quantize(empty)
    assert res.memory_reduction_pct == 0.0 and res.compression_ratio == 1.0


# ---- get_quantization_info -------------------------------------------------------------------------

def test_info_of_a_float_model(mlp):
    info = get_quantization_info(mlp)
    assert info["quantized"] is False and info["bits"] is None and info["dtype"] is None
    assert info["mode"] is None and info["num_quantized_layers"] == 0 and info["quantized_layers"] == []
    assert info["num_float_linear_layers"] == 3
    assert info["size_bytes"] == info["fp32_size_bytes"] == model_size_bytes(mlp)
    assert info["compression_ratio"] == 1.0


def test_info_fields(mlp):
    fp32_bytes = model_size_bytes(mlp)
    out = quantize_model_ptq(mlp, 4, group_size=32, exclude_layers=["head"])
    info = get_quantization_info(out)
    assert info["quantized"] is True and info["bits"] == 4 and info["dtype"] == "int4"
    assert info["dtypes"] == {"int4": 2} and info["mode"] == "weight_only"
    assert info["num_quantized_layers"] == 2 and info["quantized_layers"] == ["fc1", "fc2"]
    assert info["num_float_linear_layers"] == 1
    assert info["size_bytes"] == model_size_bytes(out)
    assert info["fp32_size_bytes"] == fp32_bytes
    assert info["compression_ratio"] == pytest.approx(fp32_bytes / info["size_bytes"])
    fc1 = info["layers"]["fc1"]
    assert fc1["in_features"] == 64 and fc1["out_features"] == 128 and fc1["group_size"] == 32
    assert fc1["dtype"] == "int4" and fc1["symmetric"] is False and fc1["bias"] is True
    # 128 rows x (32 bytes of nibbles + 2 groups x 5 bytes) + 128 x 4 bias bytes
    assert fc1["size_bytes"] == 128 * (32 + 2 * 5) + 128 * 4


def test_info_mixed():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model = quantize_model_ptq(model, 8, "dynamic", exclude_layers=["1"])
    quantize_(model, QuantizationConfig(dtype="int4", group_size=32))
    info = get_quantization_info(model)
    assert info["bits"] == "mixed" and info["dtype"] == "mixed" and info["mode"] == "mixed"
    assert info["dtypes"] == {"int8": 1, "int4": 1}
    with pytest.raises(UnsupportedFormatError):
        get_quantization_info("model")


# ---- dequantize_model ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "int4"])
@pytest.mark.parametrize("inplace", [False, True])
def test_dequantize_model(make_tied_lm, dtype, inplace):
    model = make_tied_lm()
    quantize_(model, QuantizationConfig(dtype=dtype, group_size=32))
    assert qlayers(model)
    ids = torch.randint(0, 50, (3, 7))
    x = model.embed(ids).detach()
    with torch.no_grad():
        y_native = model(ids)
    y_torch = model.lm_head(model.body(x.clone().requires_grad_(True))).detach()  # torch ops path
    weights = {n: m.dequantize_weight() for n, m in qlayers(model).items()}
    out = dequantize_model(model, inplace=inplace)
    assert (out is model) == inplace
    assert not qlayers(out)
    for m in out.modules():
        if isinstance(m, nn.Linear):
            assert type(m) is nn.Linear and m.weight.dtype == torch.float32
    for n, w in weights.items():
        assert torch.equal(out.get_submodule(n).weight.detach(), w)
    assert out.lm_head.weight is out.embed.weight  # the tie survives the copy
    if not inplace:
        assert qlayers(model)  # the quantized model itself is untouched
    with torch.no_grad():
        y = out(ids)
    # same weights, float32 F.linear: equal to the quantized model's torch path up to summation order
    assert ((y - y_torch).norm() / y_torch.norm()).item() <= 100 * EPS32
    assert ((y - y_native).norm() / y_native.norm()).item() <= 100 * EPS32


def test_dequantize_model_rejects_non_modules():
    with pytest.raises(UnsupportedFormatError):
        dequantize_model("model")


def test_model_size_counts_shared_storage_once():
    a = nn.Linear(16, 16, bias=False)
    b = nn.Linear(16, 16, bias=False)
    b.weight = nn.Parameter(a.weight.data)  # another Parameter object over the same storage
    model = nn.Sequential(a, b)
    assert model_size_bytes(model) == 16 * 16 * 4
    with torch.device("meta"):
        meta = nn.Linear(16, 16)
    assert model_size_bytes(meta) == (16 * 16 + 16) * 4
