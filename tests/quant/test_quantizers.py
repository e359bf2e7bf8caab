"""The quantizer classes and the module walk: which layers get quantized, memory, accuracy,
INT4 group handling, layer selection, calibration."""

from __future__ import annotations

import copy
import logging

import pytest
import reference as ref
import torch
from torch import nn

from diffulex_edge import ConfigError, QuantizationError, ShapeError
from diffulex_edge.quant import (
    QUANTIZERS,
    BF16Quantizer,
    FP16Quantizer,
    INT4Quantizer,
    INT8Quantizer,
    QuantizationConfig,
    QuantizationDtype,
    QuantizedLinear,
    is_int4_available,
    model_size_bytes,
)

EPS32 = float(torch.finfo(torch.float32).eps)


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def emulate(model: nn.Module, decode) -> nn.Module:
    """A float32 copy of `model` whose Linear weights are replaced by decode(weight)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(decode(m.weight.detach()))
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- FP16 / BF16 ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "quantizer, half, unit",
    [
        (FP16Quantizer(), torch.float16, 2.0**-11),
        (BF16Quantizer(), torch.bfloat16, 2.0**-8),
        (FP16Quantizer(bf16=True), torch.bfloat16, 2.0**-8),
    ],
    ids=["fp16", "bf16", "fp16(bf16=True)"],
)
def test_half_quantizers_memory_accuracy_and_exclusions(make_mlp, quantizer, half, unit):
    model = make_mlp(d_in=256, d_hidden=256, d_out=64)
    x = torch.randn(8, 256)
    with torch.no_grad():
        y_ref = model(x)
    result = quantizer.quantize(model)
    assert result.dtype == QuantizationDtype.parse(str(half).replace("torch.", ""))
    assert result.num_quantized_layers == 3
    # Linear weights are > 99% of the parameters; 2 of 4 bytes saved per weight -> ~50%
    assert result.memory_reduction_pct >= 45.0
    assert result.compression_ratio == pytest.approx(
        result.original_size_bytes / result.quantized_size_bytes
    )
    assert result.original_size_bytes == model_size_bytes(model)
    assert result.quantized_size_bytes == model_size_bytes(result.model)
    for name in ("fc1", "fc2", "head"):
        q = result.model.get_submodule(name)
        assert isinstance(q, QuantizedLinear) and q.weight.dtype == half
    with torch.no_grad():
        y = result.model(x)
    assert bool(torch.isfinite(y).all())
    # 1) exactly the float model with rounded weights (only float32 summation order differs)
    with torch.no_grad():
        y_emul = emulate(model, lambda w: w.to(half).float())(x)
    assert rel_err(y, y_emul) <= 100 * EPS32
    # 2) vs float32: each weight is off by <= half an ulp (`unit` relative), so each of the 3
    # chained layers perturbs its output by <= unit relative; LayerNorm/GELU gain a factor < 2.
    err = rel_err(y, y_ref)
    assert err <= 3 * 2 * unit, err
    assert result.max_weight_rel_error <= unit

    # excluded layers stay float32 nn.Linear with the original weights
    result = quantizer.quantize(model, {"exclude_layers": ["head", "fc1"]})
    assert [r.name for r in result.layers] == ["fc2"]
    for name in ("fc1", "head"):
        m = result.model.get_submodule(name)
        assert type(m) is nn.Linear and m.weight.dtype == torch.float32
        assert torch.equal(m.weight, model.get_submodule(name).weight)
        assert "excluded by" in result.skipped[name]


def test_fp16_single_layer_error_bound():
    lin = nn.Linear(300, 20)
    res = FP16Quantizer().quantize(nn.Sequential(lin))
    x = torch.randn(6, 300)
    with torch.no_grad():
        y = res.model(x)
    # |(W - fp16(W)) x| <= 2^-11 * |W| |x|, plus the float32 summation bound
    exact, sum_bound = ref.linear_f64(x, lin.weight.detach(), lin.bias.detach())
    mag = x.double().abs() @ lin.weight.detach().double().abs().T
    assert bool(((y.double() - exact).abs() <= 2.0**-11 * mag + 2 * sum_bound).all())


def test_fp16_half_precision_model_inputs():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    res = FP16Quantizer().quantize(model)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = res.model(x)
        y_ref = model(x)
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    assert rel_err(y, y_ref) <= 4 * 2.0**-8  # bf16 activations dominate the error


def test_quantizer_dtype_resolution():
    assert FP16Quantizer().resolve_config().dtype is QuantizationDtype.FP16
    assert FP16Quantizer().resolve_config({"dtype": "bf16"}).dtype is QuantizationDtype.BF16
    assert BF16Quantizer().resolve_config().dtype is QuantizationDtype.BF16
    assert INT4Quantizer({"group_size": 32}).resolve_config().group_size == 32
    with pytest.raises(ConfigError, match="INT4Quantizer"):
        INT8Quantizer().resolve_config({"dtype": "int4"})
    with pytest.raises(ConfigError, match="FP16Quantizer"):
        INT4Quantizer().quantize(nn.Linear(4, 4), QuantizationConfig(dtype="fp16"))
    # disabled without a dtype stays disabled
    assert not INT8Quantizer().resolve_config({"enabled": False}).is_enabled
    assert {d: q.__name__ for d, q in QUANTIZERS.items()} == {
        QuantizationDtype.FP16: "FP16Quantizer",
        QuantizationDtype.BF16: "BF16Quantizer",
        QuantizationDtype.INT8: "INT8Quantizer",
        QuantizationDtype.INT4: "INT4Quantizer",
        **{d: "BlockQuantizer" for d in QuantizationDtype if d.is_packed},
    }
    assert is_int4_available()


# ---- INT8 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_model_matches_emulation(mlp, symmetric):
    x = torch.randn(4, 64)
    res = INT8Quantizer().quantize(mlp, {"symmetric": symmetric})
    for name in linear_names(mlp):
        q = res.model.get_submodule(name)
        want = ref.int8_quantize(mlp.get_submodule(name).weight.detach(), symmetric)
        assert torch.equal(q.qweight, want[0]) and torch.equal(q.scales, want[1])
        assert torch.equal(q.zero_points, want[2])
    with torch.no_grad():
        y = res.model(x)
        y_emul = emulate(mlp, lambda w: ref.int8_dequantize(*ref.int8_quantize(w, symmetric)))(x)
    assert rel_err(y, y_emul) <= 100 * EPS32
    assert res.memory_reduction_pct > 70  # 1 byte + 5/k per weight instead of 4
    assert res.layers[0].format == ("int8 sym" if symmetric else "int8 asym")


# ---- INT4 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [None, True])
def test_int4_group_sizes(make_mlp, group, symmetric):
    model = make_mlp(d_in=256, d_hidden=256, d_out=32)
    res = INT4Quantizer().quantize(model, {"group_size": group, "symmetric": symmetric})
    assert res.num_quantized_layers == 3
    sym = bool(symmetric)
    for name in linear_names(model):
        q = res.model.get_submodule(name)
        assert q.group_size == group and q.symmetric is sym
        p, s, z, _ = ref.int4_quantize(model.get_submodule(name).weight.detach(), group, sym)
        assert torch.equal(q.qweight, p) and torch.equal(q.scales, s) and torch.equal(q.zeros, z)
    x = torch.randn(3, 256)
    with torch.no_grad():
        y = res.model(x)
        y_emul = emulate(model, lambda w: ref.int4_dequantize(*ref.int4_quantize(w, group, sym)[:3], group, w.shape[1]))(x)
    assert rel_err(y, y_emul) <= 100 * EPS32
    # 4 bits + (4-byte scale + 1-byte zero point) per group: at least 4 / (0.5 + 5/32) = 6.1x on the weights
    assert res.memory_reduction_pct > 80


@pytest.mark.parametrize("group", [16, 48, 100, "64", True])
def test_int4_invalid_group_sizes(group):
    with pytest.raises(ConfigError):
        INT4Quantizer().quantize(nn.Linear(64, 4), {"group_size": group})
    with pytest.raises(ConfigError):
        INT4Quantizer(QuantizationConfig.from_dict({"group_size": group}))


class Indivisible(nn.Module):
    def __init__(self):
        super().__init__()
        self.ok = nn.Linear(64, 100)
        self.odd = nn.Linear(100, 8)  # 100 = 3 * 32 + 4

    def forward(self, x):
        return self.odd(torch.relu(self.ok(x)))


def test_int4_indivisible_error_names_the_layer():
    model = Indivisible()
    with pytest.raises(ShapeError) as e:
        INT4Quantizer().quantize(model, {"group_size": 32})
    assert e.value.layer == "odd" and "layer 'odd'" in str(e.value)
    assert "in_features=100" in str(e.value) and "on_indivisible" in str(e.value)
    with pytest.raises(ShapeError, match="group_size=64"):  # hint: a group size that divides
        INT4Quantizer().quantize(nn.Sequential(nn.Linear(192, 4)), {"group_size": 128})


def test_int4_indivisible_skip_keeps_layer_float_with_warning(caplog):
    model = Indivisible()
    with caplog.at_level(logging.WARNING, logger="diffulex_edge.quant"):
        res = INT4Quantizer().quantize(model, {"group_size": 32, "on_indivisible": "skip"})
    assert type(res.model.odd) is nn.Linear and res.model.odd.weight.dtype == torch.float32
    assert isinstance(res.model.ok, QuantizedLinear)
    assert "not a multiple of group_size (32)" in res.skipped["odd"]
    assert any("odd" in w and "full precision" in w for w in res.warnings)
    assert any("odd" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_indivisible_pad_matches_reference(symmetric):
    model = Indivisible()
    res = INT4Quantizer().quantize(model, {"group_size": 32, "on_indivisible": "pad", "symmetric": symmetric})
    q = res.model.odd
    assert isinstance(q, QuantizedLinear) and q.qweight.shape == (8, 50) and q.scales.shape == (8, 4)
    p, s, z, nib = ref.int4_quantize(model.odd.weight.detach(), 32, symmetric)
    assert torch.equal(q.qweight, p) and torch.equal(q.scales, s) and torch.equal(q.zeros, z)
    # the short last group (4 columns) gets its own range
    last = model.odd.weight.detach()[:, 96:]
    if not symmetric:
        lo, hi = last.amin(1).clamp(max=0), last.amax(1).clamp(min=0)
        assert torch.equal(q.scales[:, 3], (hi - lo) / torch.full_like(hi, 15.0))
    rec = {r.name: r for r in res.layers}
    assert rec["odd"].padded and not rec["ok"].padded
    x = torch.randn(5, 64)
    with torch.no_grad():
        h = torch.relu(res.model.ok(x))
        y = res.model(x)
    want, bound = ref.linear_f64(h, ref.int4_dequantize(p, s, z, 32, 100), model.odd.bias.detach())
    assert bool(((y.double() - want).abs() <= bound).all())


# ---- layer selection ---------------------------------------------------------------------------

class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"attn": nn.Linear(32, 32), "mlp": nn.Linear(32, 32)}) for _ in range(3)
        )
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b["mlp"](b["attn"](x))
        return self.head(x)


@pytest.mark.parametrize(
    "patterns, excluded",
    [
        (["head"], {"head"}),
        (["blocks.1"], {"blocks.1.attn", "blocks.1.mlp"}),  # prefix at a dot
        (["*.mlp"], {"blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"}),  # glob
        (["re:blocks\\.[02]\\.attn$"], {"blocks.0.attn", "blocks.2.attn"}),  # regex
        (["blocks.1.att"], set()),  # not a prefix at a dot boundary
    ],
)
def test_exclude_patterns(patterns, excluded):
    model = Nested()
    res = INT8Quantizer().quantize(model, {"exclude_layers": patterns})
    got = {n for n, m in res.model.named_modules() if type(m) is nn.Linear}
    assert got == excluded
    assert set(res.skipped) == excluded
    if not excluded:
        assert any("matched no Linear layer" in w for w in res.warnings)


def test_multihead_attention_out_proj_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    model = M().eval()
    res = INT8Quantizer().quantize(model)
    assert type(res.model.attn.out_proj) is not QuantizedLinear
    assert "MultiheadAttention" in res.skipped["attn.out_proj"]
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert res.model(x).shape == (2, 5, 16)


def test_tied_linear_is_skipped_or_forced(tied_lm):
    res = INT8Quantizer().quantize(tied_lm)
    assert type(res.model.lm_head) is nn.Linear
    assert "tied to embed.weight" in res.skipped["lm_head"]
    assert res.model.lm_head.weight is res.model.embed.weight  # the copy keeps the tie
    forced = INT8Quantizer().quantize(tied_lm, {"skip_tied": False})
    assert isinstance(forced.model.lm_head, QuantizedLinear)


def test_already_quantized_layers_are_left_alone(mlp):
    once = INT8Quantizer().quantize(mlp).model
    twice = INT4Quantizer().quantize(once, {"group_size": 32})
    assert twice.num_quantized_layers == 0
    assert set(twice.skipped.values()) == {"already quantized"}
    assert all(str(m.qdtype) == "int8" for m in twice.model.modules() if isinstance(m, QuantizedLinear))


def test_progress_bar_and_default_config(mlp):
    q = INT8Quantizer({"exclude_layers": ["head"]}, show_progress=True)
    res = q.quantize(mlp)
    assert [r.name for r in res.layers] == ["fc1", "fc2"]
    res = INT8Quantizer(show_progress=False).quantize(mlp)
    assert res.num_quantized_layers == 3


# ---- calibration / static -------------------------------------------------------------------------

def test_static_calibration_sets_input_absmax_scales(mlp):
    batches = [torch.randn(4, 64) * s for s in (0.5, 3.0, 1.0)]
    res = INT8Quantizer().quantize(mlp, {"mode": "static"}, calibration_data=batches)
    want = max(float(b.abs().max()) for b in batches) / 127.0
    assert res.model.fc1.act_scale.item() == pytest.approx(want, rel=1e-6)
    with torch.no_grad():  # fc2 sees GELU(fc1(x)) of the float model
        want2 = max(float(mlp.act(mlp.fc1(b)).abs().max()) for b in batches) / 127.0
    assert res.model.fc2.act_scale.item() == pytest.approx(want2, rel=1e-6)
    assert res.layers[0].format == "w8a8-static sym"
    assert mlp.training is False  # calibration restores the mode
    x = batches[0]
    with torch.no_grad():
        y = res.model(x)
    scales = {n: float(res.model.get_submodule(n).act_scale) for n in ("fc1", "fc2", "head")}
    assert rel_err(y, w8a8_mlp_reference(mlp, x, scales)) <= 100 * EPS32


def test_static_calibration_input_forms():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x, y=None):
            return self.a(x) + (self.b(y) if y is not None else 0)

    model = KW()
    data = [{"x": torch.randn(2, 8), "y": torch.randn(2, 8)}, (torch.randn(2, 8), torch.randn(2, 8))]
    res = INT8Quantizer().quantize(model, {"mode": "static"}, calibration_data=iter(data))
    assert res.num_quantized_layers == 2
    # a layer that never sees input cannot get a static scale
    with pytest.warns(UserWarning, match="saw no input"):
        with pytest.raises(QuantizationError, match="calibrated activation scales"):
            INT8Quantizer().quantize(model, {"mode": "static"}, calibration_data=[torch.randn(2, 8)])
    with pytest.raises(QuantizationError, match="empty"):
        INT8Quantizer().quantize(model, {"mode": "static"}, calibration_data=[])


def test_static_without_calibration_is_a_config_error(mlp):
    with pytest.raises(ConfigError, match="calibration_data"):
        INT8Quantizer().quantize(mlp, {"mode": "static"})


def test_dynamic_mode(mlp):
    res = INT8Quantizer().quantize(mlp, {"mode": "dynamic"})
    assert all(m.act_mode == "dynamic" for m in res.model.modules() if isinstance(m, QuantizedLinear))
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = res.model(x)
        y_float = mlp(x)
    assert rel_err(y, w8a8_mlp_reference(mlp, x, None)) <= 100 * EPS32
    # per-token activation steps absmax/127 and per-channel weight steps absmax/127.5: the
    # rms rounding error is ~1/(127 * sqrt(12)) of the largest value per layer -> ~1e-2 after 3 layers
    assert rel_err(y, y_float) < 0.03


def w8a8_mlp_reference(mlp, x, static_scales):
    """The conftest MLP with every Linear as fake-quantized int8 activations (tests/reference.py)
    times the reference-dequantized int8 weights."""

    def lin(name, h):
        layer = mlp.get_submodule(name)
        w = ref.int8_dequantize(*ref.int8_quantize(layer.weight.detach(), True))
        xq, xs = ref.act_quantize(h, None if static_scales is None else static_scales[name])
        return torch.nn.functional.linear(xq.float() * xs[:, None], w, layer.bias.detach())

    with torch.no_grad():
        return lin("head", mlp.norm(lin("fc2", mlp.act(lin("fc1", x)))))
