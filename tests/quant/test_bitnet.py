"""The BitNet b1.58 ternary layer format ("ternary", src/formats/bitnet.rs) against the paper's
definition written in torch: W~ = RoundClip(W / (gamma + eps), -1, 1), gamma = mean |W| (per row
here), dequantized as W~ * gamma."""

from __future__ import annotations

import numpy as np
import torch

from diffulex_edge import _native
from diffulex_edge.quant import QuantizedLinear, quantize_

EPS = 1e-5


def test_matches_the_paper_formula_per_row():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 10)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.1, 10, 10)[:, None])  # rows of very different scales
    q = QuantizedLinear.from_linear(lin, "ternary")
    rows = q.qweight.numpy()
    gamma = rows[:, -4:].copy().view("<f4").reshape(-1)
    w = lin.weight.detach()
    # gamma is each row's mean |w| (summed in float64, rounded once to float32)
    want_gamma = w.double().abs().mean(1).float().numpy()
    assert np.allclose(gamma, want_gamma, rtol=2**-23, atol=0)
    g = torch.from_numpy(gamma)[:, None]
    codes = torch.round(w / (g + EPS)).clamp(-1, 1)  # torch.round: half to even, as the paper's Round
    assert torch.equal(q.dequantize_weight(), codes * g)
    # 2 bits per weight plus one float32 per row
    assert rows.shape[1] == 96 // 4 + 4 == _native.packed_row_bytes("ternary", 96)


def test_ternary_model_runs_and_is_about_16x_smaller():
    model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False), torch.nn.ReLU(), torch.nn.Linear(512, 512, bias=False))
    result = quantize_(model, "ternary")
    x = torch.randn(3, 512)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, 512) and torch.isfinite(y).all()
    # float32 (32 bits) -> 2 bits + 32 bits per 512-weight row
    assert result.compression_ratio == 32 / (2 + 32 / 512)
