"""The weight formats: error bounds (property tests), byte-exact cross-checks against the
independent torch reference in tests/reference.py, and hand-computed golden vectors.

Error-bound tolerances come from the format: a round-to-nearest quantizer with step ``scale`` is off
by at most ``scale / 2``; the only slack is float32 rounding of ``w / scale`` and of
``(q - zp) * scale`` (a couple of ulps of |w| and of the scale), plus one float32 subnormal step.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import weight_matrices

from diffulex_edge import ConfigError, NonFiniteWeightError, _native, kernel_info
from diffulex_edge.quant import _ops

EPS32 = float(torch.finfo(torch.float32).eps)
TINY32 = 2.0**-149  # smallest float32 subnormal
LEVELS = kernel_info()["available"]


def quant_bound(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """|w - dequant(quant(w))| <= step/2 + float32 rounding of w/step and (q - zp)*step."""
    w64, s64 = w.double().abs(), step.double()
    return 0.5 * s64 + 2 * EPS32 * (w64 + s64) + TINY32


def native_int8(w: torch.Tensor, symmetric: bool, kernel: str = "auto"):
    q, s, z = _native.quantize_int8(w.numpy(), symmetric, kernel)
    return torch.from_numpy(q), torch.from_numpy(s), torch.from_numpy(z)


def native_int4(w: torch.Tensor, group: int, symmetric: bool, kernel: str = "auto"):
    p, s, z = _native.quantize_int4(w.numpy(), group, symmetric, kernel)
    return torch.from_numpy(p), torch.from_numpy(s), torch.from_numpy(z)


# ---- INT8 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@given(w=weight_matrices())
def test_int8_round_trip_within_half_step(w, symmetric):
    q, s, z = native_int8(w, symmetric)
    deq = torch.from_numpy(_native.dequantize_int8(q.numpy(), s.numpy(), z.numpy()))
    err = (w.double() - deq.double()).abs()
    bound = quant_bound(w, s[:, None].expand_as(w))
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"
    if symmetric:
        assert bool((z == 0).all())
    # the torch twin used on non-CPU devices decodes to the same floats
    assert torch.equal(_ops.dequantize_int8_torch(q, s, z), deq)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@given(w=weight_matrices())
def test_int8_bytes_match_reference_on_every_kernel(w, symmetric):
    want = ref.int8_quantize(w, symmetric)
    for level in LEVELS:
        got = native_int8(w, symmetric, level)
        for name, g, r in zip(("q", "scales", "zero_points"), got, want):
            assert g.dtype == r.dtype, name
            assert torch.equal(g, r), f"{level}: {name} differs from the reference"
    assert torch.equal(ref.int8_dequantize(*want), _ops.dequantize_int8_torch(*want))


def edge_matrices():
    big, tiny = 3.0e37, 1.0e-40
    return {
        "zero_rows": torch.zeros(3, 17),
        "constant": torch.full((2, 40), -2.75),
        "positive_only": torch.rand(4, 33) + 0.5,
        "negative_only": -torch.rand(4, 33) - 0.5,
        "huge": torch.randn(3, 65) * big / 4,
        "tiny_subnormal": torch.randn(3, 65) * tiny,
        "mixed_magnitudes": torch.tensor([[1e30, -1e-30, 0.0, 5.0] * 8, [0.0] * 31 + [1e-20]]),
        "ties": torch.arange(-64, 64, dtype=torch.float32).reshape(2, 64) + 0.5,
        "single_column": torch.tensor([[3.0], [-1.0], [0.0]]),
        "odd_width": torch.randn(5, 4095),
    }


@pytest.mark.parametrize("case", list(edge_matrices()))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int8_edge_cases_match_reference(case, symmetric):
    w = edge_matrices()[case]
    want = ref.int8_quantize(w, symmetric)
    got = native_int8(w, symmetric)
    for g, r in zip(got, want):
        assert torch.equal(g, r)
    deq = torch.from_numpy(_native.dequantize_int8(*(t.numpy() for t in got)))
    assert bool(((w.double() - deq.double()).abs() <= quant_bound(w, got[1][:, None].expand_as(w))).all())


def test_int8_golden_symmetric():
    # absmax 127.5 -> scale exactly 1.0; rounding is half to even, then clamp to [-128, 127]
    w = torch.tensor([[127.5, -127.5, 2.5, 3.5, -2.5, 0.49, -0.5, 100.2], [0.0] * 8])
    q, s, z = native_int8(w, True)
    assert s.tolist() == [1.0, 1.0]  # an all-zero row gets scale 1
    assert z.tolist() == [0, 0]
    assert q.tolist() == [[127, -128, 2, 4, -2, 0, 0, 100], [0] * 8]
    deq = _native.dequantize_int8(q.numpy(), s.numpy(), z.numpy())
    assert deq[0].tolist() == [127.0, -128.0, 2.0, 4.0, -2.0, 0.0, 0.0, 100.0]


def test_int8_golden_asymmetric():
    w = torch.tensor(
        [
            [0.0, 255.0, 10.0, 128.0],  # lo 0, hi 255: scale 1, zp = -128
            [1.5, 2.75, 127.5, 0.25],  # positive only: range widened to 0, scale 0.5, zp = -128
            [-127.5, -0.25, -3.0, -64.25],  # negative only: scale 0.5, zp = -128 - round(-255) = 127
            [-63.75, 63.75, 0.75, -0.25],  # scale 0.5, zp = -128 - round(-127.5) = -128 + 128 = 0
        ]
    )
    q, s, z = native_int8(w, False)
    assert s.tolist() == [1.0, 0.5, 0.5, 0.5]
    assert z.tolist() == [-128, -128, 127, 0]
    assert q.tolist() == [
        [-128, 127, -118, 0],
        [-125, -122, 127, -128],  # 2.75/0.5 = 5.5 -> 6 (even); 0.25/0.5 = 0.5 -> 0
        [-128, 127, 121, -1],  # -0.5 -> -0 -> 127; -128.5 -> -128 -> -1
        [-128, 127, 2, 0],  # 127.5 -> 128 -> clamped to 127; 1.5 -> 2
    ]


def test_int8_overflowing_range_is_a_config_error():
    w = torch.tensor([[3.4e38, -3.4e38]])
    with pytest.raises(ConfigError, match="overflows"):
        native_int8(w, False)
    # the symmetric scale only needs absmax / 127.5: fine
    for got, want in zip(native_int8(w, True), ref.int8_quantize(w, True)):
        assert torch.equal(got, want)


# ---- INT4 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@given(w=weight_matrices(max_rows=4, max_cols=600))
def test_int4_round_trip_within_half_step(w, group, symmetric):
    n, k = w.shape
    p, s, z = native_int4(w, group, symmetric)
    groups = -(-k // group)
    assert p.shape == (n, (k + 1) // 2) and s.shape == (n, groups) and z.shape == (n, groups)
    assert int(z.max()) <= 15
    if symmetric:
        assert bool((z == 8).all())
    deq = torch.from_numpy(_native.dequantize_int4(p.numpy(), s.numpy(), z.numpy(), group, k))
    step = s[:, torch.arange(k) // group]
    err = (w.double() - deq.double()).abs()
    bound = quant_bound(w, step)
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"
    assert torch.equal(_ops.dequantize_int4_torch(p, s, z, group, k), deq)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@given(w=weight_matrices(max_rows=4, max_cols=600))
def test_int4_bytes_match_reference_on_every_kernel(w, group, symmetric):
    packed, scales, zeros, nibbles = ref.int4_quantize(w, group, symmetric)
    for level in LEVELS:
        p, s, z = native_int4(w, group, symmetric, level)
        assert torch.equal(p, packed), f"{level}: packed nibbles differ"
        assert torch.equal(s, scales), f"{level}: scales differ"
        assert torch.equal(z, zeros), f"{level}: zero points differ"
    assert torch.equal(_ops.unpack_int4_torch(packed, w.shape[1]), nibbles)
    assert torch.equal(ref.unpack_nibbles(packed, w.shape[1]), nibbles)
    if w.shape[1] % 2:
        assert bool((packed[:, -1] >> 4 == 0).all()), "the unused high nibble of an odd row must be 0"


@pytest.mark.parametrize("case", list(edge_matrices()))
@pytest.mark.parametrize("group", [32, 256])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int4_edge_cases_match_reference(case, group, symmetric):
    w = edge_matrices()[case]
    packed, scales, zeros, _ = ref.int4_quantize(w, group, symmetric)
    p, s, z = native_int4(w, group, symmetric)
    assert torch.equal(p, packed) and torch.equal(s, scales) and torch.equal(z, zeros)
    k = w.shape[1]
    deq = torch.from_numpy(_native.dequantize_int4(p.numpy(), s.numpy(), z.numpy(), group, k))
    assert torch.equal(deq, ref.int4_dequantize(packed, scales, zeros, group, k))


def test_int4_golden_packing_asymmetric():
    # 66 columns, group 32: groups [0, 32), [32, 64), [64, 66)
    w = torch.zeros(1, 66)
    w[0, :4] = torch.tensor([-3.0, 12.0, 2.5, 3.5])  # lo -3, hi 12: scale 1, zp 3
    w[0, 32:36] = torch.tensor([7.5, 0.25, 1.0, 0.75])  # lo 0 (widened), hi 7.5: scale 0.5, zp 0
    w[0, 64:66] = torch.tensor([-1.0, 0.5])  # lo -1, hi 0.5: scale 0.1, zp = -round(-10) = 10
    p, s, z = native_int4(w, 32, False)
    assert s[0, :2].tolist() == [1.0, 0.5]
    assert s[0, 2].item() == np.float32(1.5) / np.float32(15.0)
    assert z.tolist() == [[3, 0, 10]]
    # nibbles: group 0: [-3, 12, 2.5, 3.5, 0...] -> round + 3 -> [0, 15, 5 (2.5 -> 2), 7 (3.5 -> 4), 3...]
    # group 1: [7.5, .25, 1, .75, 0...] / 0.5 -> [15, 0 (0.5 -> 0), 2, 2 (1.5 -> 2), 0...]
    # group 2: [-1, 0.5] / 0.1 + 10 -> [0, 15]
    expected = [0xF0, 0x75] + [0x33] * 14 + [0x0F, 0x22] + [0x00] * 14 + [0xF0]
    assert p.shape == (1, 33)
    assert p[0].tolist() == expected
    deq = _native.dequantize_int4(p.numpy(), s.numpy(), z.numpy(), 32, 66)[0]
    assert deq[:4].tolist() == [-3.0, 12.0, 2.0, 4.0]
    assert deq[32:36].tolist() == [7.5, 0.0, 1.0, 1.0]


def test_int4_golden_packing_symmetric_and_odd_width():
    # 33 columns, group 32: absmax 15 -> scale 2, zp 8; last group is column 32 alone
    w = torch.zeros(2, 33)
    w[0, :5] = torch.tensor([15.0, -15.0, 3.0, 1.0, -5.0])
    w[0, 32] = 4.0  # absmax 4: scale 4/7.5, u = round(7.5) + 8 = 16 -> 15
    p, s, z = native_int4(w, 32, True)
    assert s[0, 0].item() == 2.0 and s[1].tolist() == [1.0, 1.0]
    assert z.tolist() == [[8, 8], [8, 8]]
    # 15/2 = 7.5 -> 8 -> 16 -> clamp 15; -7.5 -> -8 -> 0; 1.5 -> 2 -> 10; 0.5 -> 0 -> 8; -2.5 -> -2 -> 6
    assert p[0, :3].tolist() == [0x0F, 0x8A, 0x86]
    assert p[0, 3:16].tolist() == [0x88] * 13
    assert p[0, 16].item() == 0x0F  # column 32 in the low nibble, high nibble unused (0)
    assert p[1].tolist() == [0x88] * 16 + [0x08]


def test_int4_rejects_bad_group_sizes():
    w = np.zeros((2, 64), dtype=np.float32)
    for g in (0, 1, 16, 48, 100, 512):
        with pytest.raises(ConfigError):
            _native.quantize_int4(w, g)


# ---- non-finite weights ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_name_the_position(bad):
    w = torch.ones(3, 40)
    w[2, 37] = bad
    for fn in (lambda: native_int8(w, True), lambda: native_int8(w, False), lambda: native_int4(w, 32, False)):
        with pytest.raises(NonFiniteWeightError, match="row 2, column 37"):
            fn()


# ---- FP16 / BF16 -------------------------------------------------------------------------------

def to_half_native(x: torch.Tensor, bf16: bool) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.int16)
    _native.f32_to_half(x.reshape(-1).numpy(), _ops.np_u16(out).reshape(-1), bf16)
    return out


def from_half_native(bits: torch.Tensor, bf16: bool) -> torch.Tensor:
    out = torch.empty(bits.shape, dtype=torch.float32)
    _native.half_to_f32(_ops.np_u16(bits).reshape(-1), out.reshape(-1).numpy(), bf16)
    return out


@pytest.mark.parametrize("bf16", [False, True], ids=["fp16", "bf16"])
@given(v=st.lists(st.floats(width=32), min_size=1, max_size=300))
def test_half_conversion_is_bit_identical_to_torch(v, bf16):
    x = torch.tensor(v, dtype=torch.float32)
    half = torch.bfloat16 if bf16 else torch.float16
    got = to_half_native(x, bf16)
    want = x.to(half).view(torch.int16)
    nan = torch.isnan(x)
    assert torch.equal(got[~nan], want[~nan])
    assert bool(torch.isnan(got.view(half)[nan]).all())
    # widening back is exact and equals torch's (NaN payloads aside)
    wide, torch_wide = from_half_native(want, bf16), want.view(half).float()
    assert torch.equal(wide[~nan], torch_wide[~nan])
    assert bool(torch.isnan(wide[nan]).all())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp16", "bf16"])
@given(v=st.lists(st.floats(-65504.0, 65504.0, width=32), min_size=1, max_size=300))
def test_half_round_trip_within_half_an_ulp(v, bf16):
    x = torch.tensor(v, dtype=torch.float32)
    back = _ops.quantize_half(x, bf16).float()
    # 10 (f16) / 7 (bf16) stored mantissa bits: half a step is 2^-11 / 2^-8 of |x|; below the
    # normal range the step is absolute: f16 subnormals 2^-24, bf16 (f32 exponent range) 2^-133
    rel, tiny = (2.0**-8, 2.0**-134) if bf16 else (2.0**-11, 2.0**-25)
    err = (x.double() - back.double()).abs()
    assert bool((err <= torch.maximum(x.double().abs() * rel, torch.tensor(tiny))).all())


def test_half_golden_values():
    src = torch.tensor([1.0, -2.0, 65504.0, 0.1, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2.0**-24, 1e-8])
    assert [b & 0xFFFF for b in to_half_native(src, False).tolist()] == [
        0x3C00, 0xC000, 0x7BFF, 0x2E66, 0x3C00, 0x3C02, 0x0001, 0x0000
    ]
    src = torch.tensor([1.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 0.1, 3.0e38])
    assert [b & 0xFFFF for b in to_half_native(src, True).tolist()] == [0x3F80, 0x3F80, 0x3F82, 0x3DCD, 0x7F62]


def test_quantize_half_rejects_non_finite():
    with pytest.raises(NonFiniteWeightError, match="layer 'blk'"):
        _ops.quantize_half(torch.tensor([[1.0, float("nan")]]), False, "blk")


def test_ops_wrappers_attach_the_layer_name_once():
    w = torch.ones(2, 64)
    w[1, 3] = float("nan")
    with pytest.raises(NonFiniteWeightError) as e:
        _ops.quantize_int8(w, True)  # no layer name to attach
    assert e.value.layer is None
    with pytest.raises(NonFiniteWeightError) as e:
        _ops.quantize_int4(w, 32, False, "auto", "blocks.0.fc")
    assert e.value.layer == "blocks.0.fc" and str(e.value).count("blocks.0.fc") == 1
    # a native error that already names a layer is passed through unchanged
    from diffulex_edge.errors import ShapeError

    def named():
        raise ShapeError("bad", layer="inner")

    with pytest.raises(ShapeError) as e:
        _ops.with_layer(named, "outer")
    assert e.value.layer == "inner"


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_subnormal_weights_keep_the_half_step_bound(symmetric):
    # found by hypothesis: absmax / 127.5 of a subnormal row is a subnormal step with a few
    # significant bits, and w / step overshot the clamp; steps are floored at the smallest normal
    tiny = torch.finfo(torch.float32).tiny
    w = torch.tensor([[3.0646e-42, -1.0e-44, 0.0, 2.0e-40], [tiny * 3.0, -tiny, tiny / 7, 0.0]], dtype=torch.float32)
    q, s, z = native_int8(w, symmetric)
    assert bool((s >= tiny).all())
    deq = torch.from_numpy(_native.dequantize_int8(q.numpy(), s.numpy(), z.numpy()))
    assert bool(((w.double() - deq.double()).abs() <= quant_bound(w, s[:, None].expand_as(w))).all())
    p, s4, z4 = native_int4(torch.cat([w] * 8, dim=1), 32, symmetric)
    assert bool((s4 >= tiny).all())
    deq4 = torch.from_numpy(_native.dequantize_int4(p.numpy(), s4.numpy(), z4.numpy(), 32, 32))
    w4 = torch.cat([w] * 8, dim=1)
    assert bool(((w4.double() - deq4.double()).abs() <= quant_bound(w4, s4.repeat_interleave(32, dim=1))).all())
