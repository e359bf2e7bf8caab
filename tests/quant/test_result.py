"""QuantizationResult / LayerRecord: the figures and the text/HTML reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffulex_edge.quant import INT4Quantizer, INT8Quantizer, LayerRecord, QuantizationConfig, quantize_
from diffulex_edge.quant.result import format_bytes


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder_proj_in = nn.Linear(64, 128)
        self.mlp_up_proj = nn.Linear(128, 128)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x):
        return self.classifier(self.mlp_up_proj(self.encoder_proj_in(x)))


def test_figures_are_consistent():
    model = Named()
    res = INT4Quantizer().quantize(model, {"group_size": 32})
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert res.original_size_bytes == fp32
    q = sum(m.storage_bytes() for m in res.model.modules() if hasattr(m, "storage_bytes"))
    assert res.quantized_size_bytes == q
    assert res.compression_ratio == pytest.approx(fp32 / q)
    assert res.memory_reduction_pct == pytest.approx(100 * (1 - q / fp32))
    assert res.conversion_time_s >= 0 and res.mode == "weight_only" and str(res.dtype) == "int4"
    rec = {r.name: r for r in res.layers}
    up = rec["mlp_up_proj"]
    assert (up.in_features, up.out_features, up.original_dtype, up.format) == (128, 128, "float32", "int4_g32 asym")
    assert up.original_bytes == 128 * 128 * 4 + 128 * 4
    assert up.quantized_bytes == 128 * (64 + 4 * 5) + 128 * 4
    assert up.compression_ratio == pytest.approx(up.original_bytes / up.quantized_bytes)
    # relative Frobenius weight error of 4-bit rounding: below the worst case 1/2 step everywhere
    w = model.mlp_up_proj.weight.detach()
    deq = res.model.mlp_up_proj.dequantize_weight()
    assert up.weight_rel_error == pytest.approx(((deq - w).norm() / w.norm()).item(), rel=1e-5)
    assert res.max_weight_rel_error == max(r.weight_rel_error for r in res.layers)
    d = res.to_dict()
    assert d["num_quantized_layers"] == 3 and d["config"]["dtype"] == "int4"
    assert d["layers"][0]["name"] == "encoder_proj_in" and d["layers"][0]["compression_ratio"] > 4
    assert d["compression_ratio"] == res.compression_ratio


def test_repr_and_html_name_layers_and_compression():
    model = Named()
    res = quantize_(model, QuantizationConfig(dtype="int8", exclude_layers=["classifier", "nothing_here"]))
    text = repr(res)
    html = res._repr_html_()
    ratio = f"{res.compression_ratio:.2f}x"
    assert ratio in text and ratio in html
    assert f"{res.memory_reduction_pct:.1f}% less memory" in text
    for name in ("encoder_proj_in", "mlp_up_proj"):
        assert name in text and f"<code>{name}</code>" in html
    assert "skipped classifier: excluded by 'classifier'" in text
    assert "<code>classifier</code>" in html and "1 skipped layer(s)" in html
    assert "matched no Linear layer" in text and "Warnings:" in html
    assert "128x128" in text and "128&times;128" in html
    assert "int8 sym" in text and "int8 sym" in html
    assert text == res.summary()


def test_summary_truncates_and_html_escapes():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])
    res = INT8Quantizer().quantize(model)
    s = res.summary(max_layers=2)
    assert "... 3 more layer(s)" in s
    rec = LayerRecord("<script>", 1, 1, "float32", "int8 sym", 8, 0, 0.0)
    assert rec.compression_ratio == float("inf")
    res.layers.append(rec)
    assert "<script>" not in res._repr_html_() and "&lt;script&gt;" in res._repr_html_()


def test_nothing_quantized_reports():
    res = INT8Quantizer().quantize(nn.Sequential(nn.ReLU()))
    assert "0 layer(s) quantized" in repr(res)
    assert "No layers were quantized" in res._repr_html_()
    res = INT8Quantizer().quantize(nn.Sequential(nn.ReLU()), QuantizationConfig(enabled=False))
    assert "no quantization" in repr(res)


@pytest.mark.parametrize(
    "n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536 * 1024, "1.50 MiB"), (3 * 1024**3, "3.00 GiB"), (5 * 1024**4, "5120.00 GiB")]
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_weight_error_is_zero_for_zero_weights():
    lin = nn.Linear(32, 4)
    with torch.no_grad():
        lin.weight.zero_()
    res = INT8Quantizer().quantize(nn.Sequential(lin))
    assert res.layers[0].weight_rel_error == 0.0
