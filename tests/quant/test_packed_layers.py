"""Every packed format of the native registry as a QuantizedLinear: the layer's bytes decode (by
gguf-py, an independent implementation, for the GGML types) to the weights it computes with;
the native kernel on every SIMD level, at GEMV and GEMM batch sizes, matches the float64
product with those weights within the float32 dot-product bound (``reference.linear_f64``, the
bound every kernel test uses); the torch path, tracing and ``torch.export`` agree; files round
trip bit-exactly; protected weights and imatrices work; corrupt scales are refused on load."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq
from torch import nn

from diffulex_edge import CorruptFileError, ShapeError, _native, kernel_info
from diffulex_edge.quant import (
    PACKED_FORMATS,
    QuantizationConfig,
    QuantizedLinear,
    load_quantized,
    quantize_,
    save_quantized,
)

NAMES = list(PACKED_FORMATS)
LEVELS = kernel_info()["available"]
K = 512  # two 256-weight super-blocks, 8 or 16 small blocks


def gaussian_linear(k: int = K, n: int = 24, seed: int = 0, bias: bool = True) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin


def independent_decode(name: str, qweight: torch.Tensor, k: int) -> torch.Tensor:
    """The layer's bytes decoded by gguf-py (GGML types) or by the scalar reference (others)."""
    t = PACKED_FORMATS[name]["ggml_type"]
    if t is None:
        return torch.from_numpy(_native.packed_dequantize(name, qweight.numpy(), k, reference=True))
    return torch.from_numpy(gq.dequantize(qweight.numpy(), GGMLQuantizationType[t]).reshape(qweight.shape[0], k).copy())


@pytest.fixture(scope="module", params=NAMES)
def layer(request):
    lin = gaussian_linear()
    return lin, QuantizedLinear.from_linear(lin, request.param)


def test_bytes_decode_independently_to_the_layer_weight(layer):
    lin, q = layer
    assert q.qweight.dtype == torch.uint8
    assert tuple(q.qweight.shape) == (lin.out_features, _native.packed_row_bytes(str(q.qdtype), K))
    w = q.dequantize_weight()
    assert torch.equal(independent_decode(str(q.qdtype), q.qweight, K), w)
    # the scalar reference quantizer writes the same bytes as the fast path
    again = _native.packed_quantize(str(q.qdtype), lin.weight.detach().numpy(), reference=True)
    assert np.array_equal(again, q.qweight.numpy())


@pytest.mark.parametrize("m", [1, 5, 20])  # 20: the decoded-panel GEMM
@pytest.mark.parametrize("kernel", LEVELS)
def test_native_kernel_matches_float64_reference(layer, kernel, m):
    _, q = layer
    q.kernel = kernel
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
    with torch.no_grad():
        y = q(x)
    want, bound = ref.linear_f64(x, q.dequantize_weight(), q.bias)
    assert bool(((y.double() - want).abs() <= bound + 1e-30).all())
    q.kernel = "auto"


def test_bf16_inputs_and_torch_path(layer):
    _, q = layer
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(7))
    w = q.dequantize_weight()
    with torch.no_grad():
        y16 = q(x.to(torch.bfloat16))
    want, bound = ref.linear_f64(x.to(torch.bfloat16).float(), w, q.bias)
    # the output is rounded to bfloat16: half an ulp, 2^-8 relative
    assert bool(((y16.double() - want).abs() <= bound + 2.0**-8 * want.abs() + 1e-30).all())
    xg = x.clone().requires_grad_(True)
    y = q(xg)  # gradients to the input: the torch path (the custom-op decode, then F.linear)
    y.sum().backward()
    want_g, bound_g = ref.linear_f64(torch.ones(3, q.out_features), w.T)
    assert bool(((xg.grad.double() - want_g).abs() <= bound_g + 1e-30).all())


def test_tracing_and_export(layer):
    _, q = layer
    model = nn.Sequential(q, nn.ReLU())
    x = torch.randn(2, K)
    with torch.no_grad():
        want = model(x)
    exported = torch.export.export(model, (x,))
    assert "diffulex_edge.dequantize_packed" in str(exported.graph)
    for m in (torch.fx.symbolic_trace(model), exported.module()):
        with torch.no_grad():
            got = m(x)
        pre, bound = ref.linear_f64(x, q.dequantize_weight(), q.bias)
        assert bool(((got - want).abs() <= 2 * bound.float() + 1e-30).all())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = gaussian_linear(256, 512, seed=1)
        self.down = gaussian_linear(512, 256, seed=2, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
@pytest.mark.parametrize("name", ["q4_K", "iq4_xs", "nf4", "tq1_0"])
def test_files_round_trip_and_corrupt_scales_are_refused(tmp_path, ext, name):
    model = Net()
    quantize_(model, name)
    path = tmp_path / f"m{ext}"
    save_quantized(model, path)
    loaded = load_quantized(path, Net())
    assert torch.equal(loaded.up.qweight, model.up.qweight) and loaded.up.qdtype == model.up.qdtype
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a NaN scale in row 3's first block: f16 0x7E00 at the block's scale offset (ggml-common.h:
    # q4_K and iq4_xs start with d, tq1_0 ends its 54 bytes with d); NF4 ends its row with the f32
    # offset (0x7FC00000)
    bad = Net()
    quantize_(bad, name)
    offset, nan = {"q4_K": (0, [0x00, 0x7E]), "iq4_xs": (0, [0x00, 0x7E]), "tq1_0": (52, [0x00, 0x7E]),
                   "nf4": (bad.down.qweight.shape[1] - 4, [0x00, 0x00, 0xC0, 0x7F])}[name]
    with torch.no_grad():
        bad.down.qweight[3, offset:offset + len(nan)] = torch.tensor(nan, dtype=torch.uint8)
    save_quantized(bad, tmp_path / f"bad{ext}")
    with pytest.raises(CorruptFileError, match="qweight.*NaN or Inf"):
        load_quantized(tmp_path / f"bad{ext}", Net())


def test_protected_weights_survive_packed_storage():
    lin = gaussian_linear(256, 16)
    with torch.no_grad():
        lin.weight[3, 17] = 4.0  # a super weight: 80x the others
    q = QuantizedLinear.from_linear(lin, "q4_K", protect=[(3, 17)])
    w = q.dequantize_weight()
    assert float(w[3, 17]) == float(torch.tensor(4.0, dtype=torch.float16))
    x = torch.randn(2, 256)
    with torch.no_grad():
        y = q(x)
    want, bound = ref.linear_f64(x, w, q.bias)
    assert bool(((y.double() - want).abs() <= bound + 1e-30).all())
    # the held-out outlier no longer stretches its block: the rest of row 3 is as accurate as without it
    others = torch.ones_like(lin.weight, dtype=torch.bool)
    others[3, 17] = False
    err_protected = (w - lin.weight.detach())[3][others[3]].abs().max()
    plain = QuantizedLinear.from_linear(lin, "q4_K").dequantize_weight()
    err_plain = (plain - lin.weight.detach())[3][others[3]].abs().max()
    assert err_protected < err_plain


def test_imatrix_lowers_the_weighted_error_of_importance_aware_formats():
    lin = gaussian_linear(256, 64)
    imp = torch.ones(256)
    imp[:16] = 1000.0  # a few columns matter much more (as an imatrix of real activations says)
    w = lin.weight.detach()
    for name in [n for n, f in PACKED_FORMATS.items() if f["takes_importance"]]:
        plain = QuantizedLinear.from_linear(lin, name).dequantize_weight()
        weighted = QuantizedLinear.from_linear(lin, name, importance=imp).dequantize_weight()

        def werr(v):
            return float((((v - w) ** 2) * imp).sum())

        assert werr(weighted) <= werr(plain), name


def test_bad_shapes_and_arguments_name_the_layer():
    model = nn.Sequential(nn.Linear(96, 8))
    with pytest.raises(ShapeError, match="block size \\(256\\)") as e:
        quantize_(model, "q4_K")
    assert e.value.layer == "0" and "q8_0" in str(e.value)
    result = quantize_(model, QuantizationConfig(dtype="q4_K", on_indivisible="skip"))
    assert type(model[0]) is nn.Linear and "0" in result.skipped
    with pytest.raises(Exception, match="does not use importance"):
        QuantizedLinear.from_linear(gaussian_linear(256, 4), "nf4", importance=torch.ones(256))



@pytest.mark.parametrize("name", ["iq1_s", "iq2_xxs"])
def test_lowest_bit_formats_without_imatrix_say_so(name, caplog):
    model = nn.Sequential(gaussian_linear())
    with caplog.at_level("WARNING", logger="diffulex_edge.quant"):
        res = quantize_(model, QuantizationConfig(dtype=name))
    assert any("without an importance matrix" in w for w in res.warnings)
    assert "llama.cpp refuses" in caplog.text
