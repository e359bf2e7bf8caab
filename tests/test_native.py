"""The native module (diffulex_edge._native) used directly: argument checks and error mapping,
kernel selection, empty inputs, and the kernels against tests/reference.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import reference as ref
import torch

import diffulex_edge
from diffulex_edge import ConfigError, ShapeError, UnsupportedFormatError, _native, kernel_info

LEVELS = kernel_info()["available"]
ALL_LEVELS = ["scalar", "avx2", "avx512", "avx_vnni", "avx512_vnni"]
MISSING = [lvl for lvl in ALL_LEVELS if lvl not in LEVELS]
f32, i8, u8, u16 = np.float32, np.int8, np.uint8, np.uint16


def test_kernel_info_and_version():
    info = kernel_info()
    assert set(info) >= {"detected", "available", "selected", "num_threads"}
    assert info["available"][0] == "scalar" and info["detected"] == info["available"][-1]
    assert set(info["available"]) <= set(ALL_LEVELS)
    assert info["selected"] in info["available"] and info["num_threads"] >= 1
    assert diffulex_edge.__version__ == _native.__version__
    assert all(c.isdigit() for c in _native.__version__.split(".")[0])


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("DIFFULEX_KERNEL", "scalar")
    assert kernel_info()["selected"] == "scalar"
    monkeypatch.setenv("DIFFULEX_KERNEL", "bogus")
    with pytest.raises(UnsupportedFormatError, match="bogus"):
        _native.quantize_int8(np.ones((2, 2), f32))
    # an explicit kernel wins over the environment
    _native.quantize_int8(np.ones((2, 2), f32), True, "scalar")


def matrices(n=5, k=70, m=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)).astype(f32), rng.standard_normal((n, k)).astype(f32), rng.standard_normal(n).astype(f32)


def within_bound(y, x, w, b):
    want, bound = ref.linear_f64(torch.from_numpy(x), w, None if b is None else torch.from_numpy(b))
    return bool(((torch.from_numpy(y).double() - want).abs() <= bound + 1e-30).all())


@pytest.mark.parametrize("kernel", LEVELS)
def test_linear_kernels_directly(kernel):
    x, w, b = matrices()
    n, k = w.shape
    # half
    for bf16, half in ((False, torch.float16), (True, torch.bfloat16)):
        wh = torch.from_numpy(w).to(half)
        out = np.empty((3, n), f32)
        _native.linear_half(x, wh.view(torch.int16).numpy().view(u16), out, b, bf16, kernel)
        assert within_bound(out, x, wh.float(), b)
    # int8
    q, s, z = ref.int8_quantize(torch.from_numpy(w), False)
    out = np.empty((3, n), f32)
    _native.linear_int8(x, q.numpy(), s.numpy(), z.numpy(), out, None, kernel)
    assert within_bound(out, x, ref.int8_dequantize(q, s, z), None)
    # int4
    p, s4, z4, _ = ref.int4_quantize(torch.from_numpy(w), 32, False)
    out = np.empty((3, n), f32)
    _native.linear_int4(x, p.numpy(), s4.numpy(), z4.numpy(), 32, k, out, b, kernel)
    assert within_bound(out, x, ref.int4_dequantize(p, s4, z4, 32, k), b)
    # w8a8
    xq = np.empty((3, k), i8)
    xs = np.empty(3, f32)
    _native.quantize_act_int8(x, xq, xs, None, kernel)
    rq, rs = ref.act_quantize(torch.from_numpy(x))
    assert np.array_equal(xq, rq.numpy()) and np.array_equal(xs, rs.numpy())
    out = np.empty((3, n), f32)
    _native.linear_w8a8(xq, xs, q.numpy(), s.numpy(), z.numpy(), out, b, kernel)
    assert np.array_equal(out, ref.linear_w8a8(rq, rs, q, s, z, torch.from_numpy(b)).numpy())
    _native.quantize_act_int8(x, xq, xs, 0.02, kernel)
    rq, rs = ref.act_quantize(torch.from_numpy(x), 0.02)
    assert np.array_equal(xq, rq.numpy()) and np.all(xs == np.float32(0.02))


def test_empty_inputs():
    q, s, z = _native.quantize_int8(np.zeros((3, 0), f32))
    assert q.shape == (3, 0) and s.tolist() == [1.0, 1.0, 1.0] and z.tolist() == [0, 0, 0]
    q, s, z = _native.quantize_int8(np.zeros((0, 5), f32))
    assert q.shape == (0, 5) and s.shape == (0,)
    p, s, z = _native.quantize_int4(np.zeros((2, 0), f32), 32)
    assert p.shape == (2, 0) and s.shape == (2, 0)
    assert _native.dequantize_int4(p, s, z, 32, 0).shape == (2, 0)
    out = np.empty((0, 4), f32)
    _native.linear_int8(np.zeros((0, 8), f32), np.zeros((4, 8), i8), np.ones(4, f32), np.zeros(4, i8), out)
    xq, xs = np.empty((2, 0), i8), np.empty(2, f32)
    _native.quantize_act_int8(np.zeros((2, 0), f32), xq, xs)
    assert xs.tolist() == [1.0, 1.0]


def test_half_conversions_check_lengths():
    with pytest.raises(ShapeError, match="destination"):
        _native.f32_to_half(np.zeros(4, f32), np.zeros(3, u16))
    with pytest.raises(ShapeError, match="destination"):
        _native.half_to_f32(np.zeros(4, u16), np.zeros(5, f32), True)


def test_dequantize_shape_mismatches():
    q, s, z = _native.quantize_int8(np.ones((3, 4), f32))
    with pytest.raises(ShapeError, match="zero_points"):
        _native.dequantize_int8(q, s, z[:2])
    with pytest.raises(ShapeError):
        _native.dequantize_int8(q, s[:2], z)
    p, s, z = _native.quantize_int4(np.ones((2, 64), f32), 32)
    with pytest.raises(ShapeError, match="scales"):
        _native.dequantize_int4(p, s[:, :1].copy(), z, 32, 64)
    with pytest.raises(ShapeError, match="packed"):
        _native.dequantize_int4(p, s, z, 32, 66)  # in_features disagrees with the packed width
    with pytest.raises(ShapeError, match="zeros"):
        _native.dequantize_int4(p, s, z[:, :1].copy(), 32, 64)
    with pytest.raises(ConfigError, match="group size"):
        _native.dequantize_int4(p, s, z, 16, 64)


def test_linear_shape_mismatches():
    x, w, b = matrices(n=4, k=64, m=2)
    wh = torch.from_numpy(w).half().view(torch.int16).numpy().view(u16)
    good_out = np.empty((2, 4), f32)
    with pytest.raises(ShapeError, match="input"):
        _native.linear_half(x[:, :63].copy(), wh, good_out)
    with pytest.raises(ShapeError, match="output"):
        _native.linear_half(x, wh, np.empty((2, 5), f32))
    with pytest.raises(ShapeError, match="bias"):
        _native.linear_half(x, wh, good_out, b[:3].copy())
    q, s, z = _native.quantize_int8(w)
    with pytest.raises(ShapeError):
        _native.linear_int8(x, q, s[:3].copy(), z, good_out)
    with pytest.raises(ShapeError, match="input"):
        _native.linear_int8(np.zeros((2, 65), f32), q, s, z, good_out)
    p, s4, z4 = _native.quantize_int4(w, 32)
    with pytest.raises(ShapeError):
        _native.linear_int4(x, p, s4, z4, 32, 62, good_out)
    with pytest.raises(ShapeError, match="output"):
        _native.linear_int4(x, p, s4, z4, 32, 64, np.empty((3, 4), f32))
    with pytest.raises(ConfigError):
        _native.linear_int4(x, p, s4, z4, 100, 64, good_out)
    xq, xs = np.empty((2, 64), i8), np.empty(2, f32)
    with pytest.raises(ShapeError, match="q"):
        _native.quantize_act_int8(x, np.empty((2, 63), i8), xs)
    with pytest.raises(ShapeError, match="scales"):
        _native.quantize_act_int8(x, xq, np.empty(3, f32))
    _native.quantize_act_int8(x, xq, xs)
    with pytest.raises(ShapeError, match="activations"):
        _native.linear_w8a8(xq[:, :60].copy(), xs, q, s, z, good_out)
    with pytest.raises(ShapeError, match="output"):
        _native.linear_w8a8(xq, xs, q, s, z, np.empty((2, 3), f32))
    with pytest.raises(ShapeError, match="bias"):
        _native.linear_w8a8(xq, xs, q, s, z, good_out, np.zeros(2, f32))


def test_w8a8_rejects_k_beyond_int32_accumulation():
    k = 1 << 17
    with pytest.raises(ShapeError, match="int32"):
        _native.linear_w8a8(np.zeros((1, k), i8), np.ones(1, f32), np.zeros((1, k), i8), np.ones(1, f32),
                            np.zeros(1, i8), np.empty((1, 1), f32))


@pytest.mark.parametrize("bad", [0.0, -0.5, float("inf"), float("nan")])
def test_static_activation_scale_must_be_positive(bad):
    with pytest.raises(ConfigError, match="static activation scale"):
        _native.quantize_act_int8(np.ones((1, 4), f32), np.empty((1, 4), i8), np.empty(1, f32), bad)


@pytest.mark.parametrize("kernel", ["neon", "AVX3", "", "gpu"])
def test_unknown_kernel(kernel):
    x, w, _ = matrices(n=4, k=64, m=1)
    q, s, z = _native.quantize_int8(w)
    p, s4, z4 = _native.quantize_int4(w, 32)
    out = np.empty((1, 4), f32)
    calls = [
        lambda: _native.quantize_int8(w, True, kernel),
        lambda: _native.quantize_int4(w, 32, False, kernel),
        lambda: _native.linear_half(x, np.zeros((4, 64), u16), out, None, False, kernel),
        lambda: _native.linear_int8(x, q, s, z, out, None, kernel),
        lambda: _native.linear_int4(x, p, s4, z4, 32, 64, out, None, kernel),
        lambda: _native.quantize_act_int8(x, np.empty((1, 64), i8), np.empty(1, f32), None, kernel),
        lambda: _native.linear_w8a8(np.zeros((1, 64), i8), np.ones(1, f32), q, s, z, out, None, kernel),
    ]
    for call in calls:
        with pytest.raises(UnsupportedFormatError, match="choose one of auto, scalar, avx2, avx512, avx_vnni, avx512_vnni"):
            call()


@pytest.mark.skipif(not MISSING, reason="this CPU supports every kernel level")
def test_kernel_the_cpu_lacks_is_an_error():
    with pytest.raises(UnsupportedFormatError, match="not supported by this CPU"):
        _native.quantize_int8(np.ones((2, 2), f32), True, MISSING[0])


@pytest.mark.parametrize("group", [0, 1, 16, 48, 100, 255, 1024])
def test_bad_group_sizes(group):
    with pytest.raises(ConfigError, match="group size"):
        _native.quantize_int4(np.ones((2, 64), f32), group)


def test_arrays_of_the_wrong_kind_are_type_errors():
    with pytest.raises(TypeError):
        _native.quantize_int8(np.ones((2, 2), np.float64))
    with pytest.raises(TypeError):
        _native.quantize_int8(np.ones(4, f32))
    with pytest.raises(TypeError):
        _native.quantize_int8(np.ones((4, 6), f32)[:, ::2])  # not contiguous


def test_concurrent_calls_agree():
    # the kernels release the GIL; concurrent calls must not interfere
    x, w, b = matrices(n=64, k=512, m=16)
    p, s, z = _native.quantize_int4(w, 64)

    def run(_):
        out = np.empty((16, 64), f32)
        _native.linear_int4(x, p, s, z, 64, 512, out, b)
        return out

    first = run(0)
    with ThreadPoolExecutor(4) as pool:
        for out in pool.map(run, range(8)):
            assert np.array_equal(out, first)
