"""QuantizedLinear: native CPU kernels against the torch reference on every kernel level, the torch
path (autograd, tracing, export), W8A8 activation quantization, buffers and construction errors.

Kernel tolerance: the native kernels compute the same dot products as ``F.linear`` on the
dequantized weight, in float32 with a different summation order, so each output may differ from
the exact (float64) value by at most ``(k + 2) * eps32 * sum_k |x_k * w_k|`` (the classic bound for
a k-term float32 dot product, with the bias add). For float16/bfloat16 inputs the output is
additionally rounded to the input dtype: half an ulp, 2^-11 / 2^-8 relative.
"""

from __future__ import annotations

import warnings

import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from diffulex_edge import ConfigError, ShapeError, UnsupportedFormatError, kernel_info
from diffulex_edge.quant import QuantizationConfig, QuantizedLinear, quantize_

LEVELS = kernel_info()["available"]
FORMATS = [
    ("fp16", {}),
    ("bf16", {}),
    ("int8", {"symmetric": True}),
    ("int8", {"symmetric": False}),
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 128, "symmetric": True}),
]
FORMAT_IDS = ["fp16", "bf16", "int8sym", "int8asym", "int4g32", "int4g128sym"]
OUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def reference_weight(q: QuantizedLinear) -> torch.Tensor:
    """Decode the layer's buffers with the independent reference (not the package)."""
    if q.qdtype.is_float:
        return q.weight.float()
    if str(q.qdtype) == "int8":
        return ref.int8_dequantize(q.qweight, q.scales, q.zero_points)
    return ref.int4_dequantize(q.qweight, q.scales, q.zeros, q.group_size, q.in_features)


def quantized_layer(k: int, n: int, dtype: str, kernel: str = "auto", bias: bool = True, **opts) -> tuple:
    """(float layer, its QuantizedLinear) built through the public API with `kernel` chosen in the config."""
    lin = nn.Linear(k, n, bias=bias)
    model = nn.Sequential(lin)
    cfg = QuantizationConfig(dtype=dtype, kernel=kernel, on_indivisible="pad", **opts)
    quantize_(model, cfg)
    q = model[0]
    assert isinstance(q, QuantizedLinear) and q.kernel == kernel
    return lin, q


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias, what: str = ""):
    want, bound = ref.linear_f64(x.float(), w, None if bias is None else bias.float())
    rel = OUT_ROUNDING[y.dtype]
    tol = bound + rel * want.abs() + 1e-30
    err = (y.double() - want).abs()
    assert bool((err <= tol).all()), f"{what}: max excess {(err - tol).max().item():.3e}"


def check_weight_bytes(lin: nn.Linear, q: QuantizedLinear, opts: dict) -> None:
    w = lin.weight.detach()
    if q.qdtype.is_float:
        half = torch.float16 if str(q.qdtype) == "fp16" else torch.bfloat16
        assert torch.equal(q.weight.view(torch.int16), w.to(half).view(torch.int16))
    elif str(q.qdtype) == "int8":
        for got, want in zip((q.qweight, q.scales, q.zero_points), ref.int8_quantize(w, q.symmetric)):
            assert torch.equal(got, want)
    else:
        p, s, z, _ = ref.int4_quantize(w, q.group_size, q.symmetric)
        assert torch.equal(q.qweight, p) and torch.equal(q.scales, s) and torch.equal(q.zeros, z)


@pytest.mark.parametrize("kernel", LEVELS)
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("k, n", [(1, 3), (7, 5), (33, 9), (64, 17), (4095, 3)])
def test_native_kernel_matches_reference(kernel, fmt, k, n):
    dtype, opts = fmt
    lin, q = quantized_layer(k, n, dtype, kernel, **opts)
    check_weight_bytes(lin, q, opts)
    w = reference_weight(q)
    assert torch.equal(q.dequantize_weight(), w)
    for shape in [(1, k), (5, k), (2, 3, k)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            y = q(x)
        assert y.shape == (*shape[:-1], n) and y.dtype == torch.float32
        assert_close_to_reference(y, x, w, q.bias, f"{kernel} {dtype} {shape}")
    # a single vector, and a non-contiguous (transposed) batch
    x = torch.randn(k)
    with torch.no_grad():
        y = q(x)
    assert y.shape == (n,)
    assert_close_to_reference(y[None], x[None], w, q.bias, "1-D input")
    x = torch.randn(k, 4).T
    assert k == 1 or not x.is_contiguous()
    with torch.no_grad():
        y = q(x)
    assert_close_to_reference(y, x, w, q.bias, "non-contiguous input")


@pytest.mark.parametrize("kernel", LEVELS)
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(kernel, fmt, xdtype):
    dtype, opts = fmt
    lin, q = quantized_layer(96, 6, dtype, kernel, **opts)
    x = torch.randn(2, 4, 96).to(xdtype)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == xdtype and y.shape == (2, 4, 6)
    assert_close_to_reference(y, x, reference_weight(q), q.bias, f"{kernel} {dtype} {xdtype}")


@pytest.mark.parametrize("kernel", LEVELS)
@given(
    k=st.integers(1, 300),
    n=st.integers(1, 12),
    m=st.integers(1, 6),
    fmt=st.sampled_from(FORMATS),
    bias=st.booleans(),
    xscale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_kernel_property(kernel, k, n, m, fmt, bias, xscale):
    dtype, opts = fmt
    _, q = quantized_layer(k, n, dtype, kernel, bias=bias, **opts)
    x = torch.randn(m, k) * xscale
    with torch.no_grad():
        y = q(x)
    assert_close_to_reference(y, x, reference_weight(q), q.bias, f"{kernel} {dtype}")


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_torch_path_has_gradients_and_agrees_with_native(fmt):
    dtype, opts = fmt
    _, q = quantized_layer(40, 7, dtype, **opts)
    x = torch.randn(3, 40)
    with torch.no_grad():
        y_native = q(x)
    xg = x.clone().requires_grad_(True)
    y = q(xg)
    assert y.requires_grad
    g = torch.randn_like(y)
    y.backward(g)
    w = reference_weight(q)
    # dL/dx = g @ W: a float32 matmul over 7 outputs
    want, bound = ref.linear_f64(g, w.T)
    assert bool(((xg.grad.double() - want).abs() <= bound + 1e-30).all())
    # the two paths compute the same function up to summation order (each within the bound)
    assert_close_to_reference(y.detach(), x, w, q.bias, "torch path")
    assert_close_to_reference(y_native, x, w, q.bias, "native path")
    # buffers are not parameters: nothing in the layer trains
    assert list(q.parameters()) == []


def test_wrong_last_dimension_raises():
    _, q = quantized_layer(16, 4, "int8")
    for shape in [(2, 15), (16, 2), (1, 2, 17)]:
        with pytest.raises(ShapeError, match="last dimension 16"):
            q(torch.randn(*shape))


def test_empty_batch():
    _, q = quantized_layer(32, 4, "int4", group_size=32)
    with torch.no_grad():
        y = q(torch.randn(0, 32))
    assert y.shape == (0, 4)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_tracing_and_export_use_torch_ops(fmt):
    dtype, opts = fmt
    _, q = quantized_layer(64, 5, dtype, **opts)
    model = nn.Sequential(q, nn.ReLU())
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
    w = reference_weight(q)
    gm = torch.fx.symbolic_trace(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    exported = torch.export.export(model, (x,)).module()
    for name, m in [("fx", gm), ("jit", traced), ("export", exported)]:
        with torch.no_grad():
            got = m(x)
        # ReLU is 1-Lipschitz, so the pre-activation bound carries over
        pre, bound = ref.linear_f64(x, w, q.bias)
        assert bool(((got.double() - pre.clamp_min(0)).abs() <= bound + 1e-30).all()), name
        assert bool(((got - want).abs() <= 2 * bound.float() + 1e-30).all()), name


# ---- W8A8 -------------------------------------------------------------------------------------

def w8a8_layer(k, n, mode, symmetric=True, kernel="auto", act_scale=None, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    q = QuantizedLinear.from_linear(
        lin, "int8", symmetric=symmetric, act_mode=mode, act_scale=act_scale, kernel=kernel, name="w8a8"
    )
    return lin, q


@pytest.mark.parametrize("kernel", LEVELS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("k, n", [(1, 2), (33, 7), (256, 5), (4095, 3)])
def test_w8a8_dynamic_is_bit_exact_with_reference(kernel, symmetric, k, n):
    lin, q = w8a8_layer(k, n, "dynamic", symmetric, kernel)
    x = torch.randn(4, k) * 3
    x[1] = 0.0  # an all-zero token: scale 1
    with torch.no_grad():
        y = q(x)
    xq, xs = ref.act_quantize(x)
    assert xs[1].item() == 1.0
    want = ref.linear_w8a8(xq, xs, *ref.int8_quantize(lin.weight.detach(), symmetric), lin.bias.detach())
    assert torch.equal(y, want), f"max diff {(y - want).abs().max().item()}"
    # the torch fake-quant path (used off CPU / for autograd) computes the same up to float rounding
    xg = x.clone().requires_grad_(True)
    y_torch = q(xg).detach()
    x_fq = xq.float() * xs[:, None]
    assert_close_to_reference(y_torch, x_fq, reference_weight(q), q.bias, "fake-quant path")


@pytest.mark.parametrize("kernel", LEVELS)
def test_w8a8_static_clamps_to_the_calibrated_range(kernel):
    scale = 0.01  # calibrated absmax 1.27
    lin, q = w8a8_layer(48, 6, "static", kernel=kernel, act_scale=scale)
    assert q.act_scale.item() == pytest.approx(scale)
    x = torch.randn(3, 48)
    x[0, 0] = 50.0  # far outside the calibrated range: clamps to 127 * scale
    with torch.no_grad():
        y = q(x)
    xq, xs = ref.act_quantize(x, float(q.act_scale))
    assert xq[0, 0].item() == 127
    want = ref.linear_w8a8(xq, xs, *ref.int8_quantize(lin.weight.detach(), True), lin.bias.detach())
    assert torch.equal(y, want)
    y_torch = q(x.clone().requires_grad_(True)).detach()
    assert_close_to_reference(y_torch, xq.float() * xs[:, None], reference_weight(q), q.bias, "fake-quant path")


def test_w8a8_activation_error_bound_vs_float():
    # per token |x - x_deq| <= s/2 with s = absmax/127, so |y - y_float| <= sum_k |w_k| * s/2 (+ weight error)
    lin, q = w8a8_layer(128, 8, "dynamic", bias=False)
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = q(x)
    w = reference_weight(q).double()
    s = x.abs().amax(dim=1, keepdim=True).double() / 127
    bound = 0.5 * s * w.abs().sum(dim=1)[None, :] * (1 + 1e-5) + 1e-5
    assert bool(((y.double() - x.double() @ w.T).abs() <= bound).all())


@pytest.mark.parametrize("bad", [None, 0.0, -1.0, float("inf"), float("nan")])
def test_static_needs_positive_finite_scale(bad):
    with pytest.raises(ConfigError, match="act_scale"):
        w8a8_layer(8, 2, "static", act_scale=bad)


# ---- construction, buffers, spec ---------------------------------------------------------------

def test_buffers_shapes_dtypes_and_storage_bytes():
    n, k = 6, 70
    lin = nn.Linear(k, n)
    cases = {
        "fp16": ({"weight": ((n, k), torch.float16)}, 2 * n * k),
        "bf16": ({"weight": ((n, k), torch.bfloat16)}, 2 * n * k),
        "int8": (
            {"qweight": ((n, k), torch.int8), "scales": ((n,), torch.float32), "zero_points": ((n,), torch.int8)},
            n * k + 4 * n + n,
        ),
        "int4": (
            {"qweight": ((n, 35), torch.uint8), "scales": ((n, 3), torch.float32), "zeros": ((n, 3), torch.uint8)},
            n * 35 + 3 * n * 4 + 3 * n,
        ),
    }
    for dtype, (buffers, weight_bytes) in cases.items():
        q = QuantizedLinear.from_linear(lin, dtype, group_size=32, on_indivisible="pad")  # 70: a short last group
        got = {k_: (tuple(v.shape), v.dtype) for k_, v in q.named_buffers() if k_ != "bias"}
        assert got == buffers, dtype
        assert q.bias.dtype == torch.float32 and torch.equal(q.bias, lin.bias.detach())
        assert q.storage_bytes() == weight_bytes + 4 * n
        assert set(q.state_dict()) == set(buffers) | {"bias"}


def test_static_layer_has_act_scale_buffer():
    _, q = w8a8_layer(8, 2, "static", act_scale=0.5)
    assert "act_scale" in q.state_dict() and q.act_scale.shape == ()


def test_from_linear_refuses_indivisible_widths_as_quantize_does():
    lin = nn.Linear(70, 4)
    with pytest.raises(ShapeError, match="on_indivisible='pad'") as e:
        QuantizedLinear.from_linear(lin, "int4", group_size=32, name="odd")
    model = nn.Sequential(lin)
    with pytest.raises(ShapeError) as e2:
        quantize_(model, QuantizationConfig(dtype="int4", group_size=32))
    assert str(e.value).split(": ", 1)[1] == str(e2.value).split(": ", 1)[1]  # one message, the layer name aside
    with pytest.raises(ShapeError, match="block size"):
        QuantizedLinear.from_linear(lin, "q4_0", on_indivisible="pad")  # block formats cannot pad
    with pytest.raises(ConfigError, match="on_indivisible"):
        QuantizedLinear.from_linear(lin, "int4", group_size=32, on_indivisible="skip")


def test_original_layer_is_not_modified():
    lin = nn.Linear(32, 8)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    QuantizedLinear.from_linear(lin, "int4", group_size=32)
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())


def test_bias_keeps_its_dtype_and_no_bias():
    lin = nn.Linear(32, 4).to(torch.bfloat16)
    q = QuantizedLinear.from_linear(lin, "int8")
    assert q.bias.dtype == torch.bfloat16
    assert q.spec()["bias_dtype"] == "bfloat16"
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == torch.bfloat16
    assert_close_to_reference(y, x, reference_weight(q), q.bias, "bf16 layer")
    q2 = QuantizedLinear.from_linear(nn.Linear(32, 4, bias=False), "int4", group_size=32)
    assert q2.bias is None and q2.spec()["bias"] is False and "bias" not in q2.state_dict()


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_spec_round_trip_and_to_linear(fmt):
    dtype, opts = fmt
    lin, q = quantized_layer(50, 3, dtype, **opts)
    empty = QuantizedLinear.from_spec(q.spec())
    assert empty.spec() == q.spec()
    empty.load_state_dict(q.state_dict())
    x = torch.randn(4, 50)
    with torch.no_grad():
        assert torch.equal(empty(x), q(x))
    dense = q.to_linear()
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32
    assert torch.equal(dense.weight.detach(), reference_weight(q))
    assert torch.equal(dense.bias.detach(), lin.bias.detach())


def test_extra_repr():
    _, q = quantized_layer(64, 4, "int4", group_size=32)
    r = repr(q)
    assert "in_features=64" in r and "out_features=4" in r and "dtype=int4" in r
    assert "group_size=32" in r and "symmetric=False" in r
    _, q = w8a8_layer(8, 2, "dynamic")
    assert "act_mode=dynamic" in repr(q) and "symmetric=True" in repr(q)
    _, q = quantized_layer(8, 2, "fp16")
    assert "symmetric" not in repr(q) and "group_size" not in repr(q)


def test_constructor_validation():
    with pytest.raises(ConfigError, match="act_mode"):
        QuantizedLinear(8, 2, dtype="int8", act_mode="always")
    with pytest.raises(ConfigError, match="int8"):
        QuantizedLinear(8, 2, dtype="int4", act_mode="dynamic")
    with pytest.raises(ConfigError, match="group_size"):
        QuantizedLinear(64, 2, dtype="int4", group_size=48)
    with pytest.raises(ConfigError):
        QuantizedLinear(8, 2, dtype="int2")


def test_from_linear_rejects_non_linear_and_int_weights():
    with pytest.raises(UnsupportedFormatError, match="layer 'c'"):
        QuantizedLinear.from_linear(nn.Conv1d(2, 2, 1), "int8", name="c")
    lin = nn.Linear(4, 2)
    lin.weight = nn.Parameter(torch.ones(2, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(UnsupportedFormatError, match="not a float type"):
        QuantizedLinear.from_linear(lin, "int8", name="lin")


def test_fp64_layers_are_quantized_and_run():
    lin = nn.Linear(32, 4).double()
    q = QuantizedLinear.from_linear(lin, "int8")
    x = torch.randn(2, 32, dtype=torch.float64)
    with torch.no_grad():
        y = q(x)  # not a native input dtype: the torch path, in float64
    assert y.dtype == torch.float64
    want, bound = ref.linear_f64(x, reference_weight(q), q.bias)
    assert bool(((y - want).abs() <= bound).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", FORMATS + [("int8", {"mode": "dynamic"})], ids=FORMAT_IDS + ["w8a8dyn"])
def test_cuda_runs_the_same_math_in_torch_ops(fmt):  # pragma: no cover - needs a GPU
    dtype, opts = fmt
    _, q = quantized_layer(64, 5, dtype, **opts)
    x = torch.randn(3, 64)
    qc = q.to("cuda")
    assert qc.dequantize_weight().device.type == "cuda"
    with torch.no_grad():
        y = qc(x.cuda()).cpu()
    if opts.get("mode") == "dynamic":
        xq, xs = ref.act_quantize(x)
        x = xq.float() * xs[:, None]
    assert_close_to_reference(y, x, reference_weight(q.cpu()), q.bias.cpu(), "cuda")
