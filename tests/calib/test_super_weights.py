import warnings

import numpy as np
import pytest
import torch
from torch import nn

from diffulex_edge.calib import compute_imatrix, find_super_weights, outlier_weights, protect_table
from diffulex_edge.errors import ConfigError, ShapeError
from diffulex_edge.quant import (
    INT4Quantizer,
    INT8Quantizer,
    QuantizationConfig,
    QuantizedLinear,
    load_quantized,
    save_quantized,
)
from diffulex_edge.testing import tiny_transformer

EPS32 = float(np.finfo(np.float32).eps)
ROW, COL = 17, 101


def planted(seed=0):
    """A tiny Llama-style model with a super weight planted in layer 1's down projection: channel
    COL of the MLP activations spikes (gate/up rows scaled up) and meets a weight 30x larger than
    any other of the layer, so output channel ROW spikes too."""
    m = tiny_transformer(seed=seed, vocab_size=64, dim=64, layers=4, heads=4)
    with torch.no_grad():
        mlp = m.layers[1].mlp
        mlp.gate_proj.weight[COL] *= 6
        mlp.up_proj.weight[COL] *= 6
        w = mlp.down_proj.weight
        w[ROW, COL] = 30 * w.abs().max()
    return m


def data(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 32), generator=g) for _ in range(n)]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_detects_the_planted_super_weight_and_protecting_it_helps():
    m = planted()
    sw = find_super_weights(m, data(0))
    assert [(s.layer, s.row, s.col) for s in sw] == [("layers.1.mlp.down_proj", ROW, COL)]
    assert sw[0].weight == float(m.layers[1].mlp.down_proj.weight.detach()[ROW, COL])
    assert sw[0].input_ratio > 20 and sw[0].output_ratio > 20 and "super weight" in str(sw)
    x = torch.cat(data(1))
    only = ["re:^(?!layers\\.1\\.mlp\\.down_proj$)"]  # quantize just the layer holding it
    with torch.no_grad():
        y = m(x)
        cfg = QuantizationConfig(dtype="int4", group_size=256, exclude_layers=only)
        plain, prot = INT4Quantizer().quantize(m, cfg).model, INT4Quantizer().quantize(m, cfg, protect=sw).model
        e_plain, e_prot = rel(plain(x), y), rel(prot(x), y)
        full = QuantizationConfig(dtype="int4", group_size=64)
        e_full, e_full_prot = (rel(INT4Quantizer().quantize(m, full, protect=p).model(x), y) for p in (None, sw))
    print(f"INT4 g256 down_proj only: logits rel. error {e_plain:.4f} -> {e_prot:.4f} protected; "
          f"whole model g64: {e_full:.4f} -> {e_full_prot:.4f}")
    assert e_prot < 0.7 * e_plain
    assert e_full_prot < e_full
    q = prot.layers[1].mlp.down_proj
    assert q.n_protect == 1 and "protected=1" in repr(q)
    # the held-out weight comes back exactly (float16 of the original value)
    want = m.layers[1].mlp.down_proj.weight[ROW, COL].half().float()
    assert q.dequantize_weight()[ROW, COL] == want


def test_no_spikes_no_super_weights_and_validation():
    m = tiny_transformer(vocab_size=64, dim=64, layers=2, heads=4)
    assert list(find_super_weights(m, data(0))) == []
    with pytest.raises(ConfigError, match="threshold"):
        find_super_weights(m, data(0), threshold=1)
    with pytest.raises(ConfigError, match="max_per_layer"):
        find_super_weights(m, data(0), max_per_layer=0)
    with pytest.raises(ConfigError, match="down projections"):
        find_super_weights(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)])
    with pytest.raises(ConfigError, match="protect"):
        INT8Quantizer().quantize(m, protect=[(0, 0)])


@pytest.mark.parametrize("dtype,mode", [("int4", "weight_only"), ("int8", "weight_only"), ("int8", "dynamic"), ("fp16", "weight_only")])
def test_native_and_torch_paths_agree_and_serialization_keeps_the_table(tmp_path, dtype, mode):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight[5, 9] = 25.0
        lin.weight[40, 63] = -12.0
    q = QuantizedLinear.from_linear(lin, dtype, group_size=32, act_mode=mode, protect=[(5, 9), (40, 63), (5, 9)])
    assert q.n_protect == 2 and q.protect_values.dtype == torch.float16
    x = torch.randn(7, 64)
    with torch.no_grad():
        native, ref = q(x), q._forward_torch(x)
    # the native kernel adds a correction; the torch path multiplies by the patched weight: the
    # same sum in a different order (k = 64 products per output)
    bound = 64 * EPS32 * float((x.abs() @ q.dequantize_weight().abs().t()).max()) + 1e-6
    assert float((native - ref).abs().max()) <= bound
    model = nn.Sequential(q)
    path = tmp_path / "m.safetensors"
    save_quantized(model, path)
    back = load_quantized(path, nn.Sequential(nn.Linear(64, 48)))
    assert torch.equal(back[0].protect_index, q.protect_index) and torch.equal(back[0].protect_values, q.protect_values)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_outlier_weights_by_importance_and_bad_indices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    calib = [torch.randn(64, 32) * torch.linspace(0.1, 5, 32)]
    im = compute_imatrix(model, calib)
    table = outlier_weights(model, im, top_k=3)
    assert set(table) == {"0", "2"} and all(len(v) == 3 for v in table.values())
    w, imp = model[0].weight.detach(), torch.from_numpy(im["0"])
    score = w.abs() * imp.sqrt()
    r, c = table["0"][0]
    assert score[r, c] == score.max()
    merged = protect_table(table, {"0": [(0, 0)]})
    assert len(merged["0"]) == 4
    res = INT8Quantizer().quantize(model, QuantizationConfig(dtype="int8"), protect=merged).model
    assert res[0].n_protect == 4 and res[2].n_protect == 3
    with pytest.raises(ConfigError, match="top_k"):
        outlier_weights(model, im, top_k=0)
    with pytest.raises(ConfigError, match="input columns"):
        outlier_weights(model, {"0": np.ones(3, np.float32)}, top_k=1)
    with pytest.raises(ShapeError, match="outside"):
        INT8Quantizer().quantize(model, QuantizationConfig(dtype="int8"), protect={"0": [(16, 0)]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert QuantizedLinear.from_linear(model[0], "int8", protect=[]).n_protect == 0
