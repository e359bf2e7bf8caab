"""The calibration bindings: fast paths equal the scalar references, in-place state, typed errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffulex_edge import _native
from diffulex_edge.errors import ConfigError, ShapeError


def fresh(k):
    return np.zeros(k, np.float64), np.zeros(k, np.float32), np.full(k, np.inf, np.float32), np.full(k, -np.inf, np.float32)


@given(rows=st.integers(0, 40), cols=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_accumulate_fast_equals_reference_and_numpy(rows, cols, seed):
    rng = np.random.default_rng(seed)
    a, b = fresh(cols), fresh(cols)
    xs = [(rng.standard_normal((rows, cols)) * rng.exponential(3, cols)).astype(np.float32) for _ in range(2)]
    for x in xs:
        _native.calib_accumulate(x, *a)
        _native.calib_accumulate(x, *b, reference=True)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)
    if rows:
        allx = np.concatenate(xs)
        np.testing.assert_allclose(a[0], (allx.astype(np.float64) ** 2).sum(0), rtol=1e-12)
        assert np.array_equal(a[1], np.abs(allx).max(0)) and np.array_equal(a[2], allx.min(0))


def test_histogram_and_clip_errors():
    h = np.zeros(_native.calib_histogram_bins(), np.uint64)
    x = np.linspace(-3, 3, 600, dtype=np.float32).reshape(100, 6)
    _native.calib_histogram(x, h)
    assert int(h.sum()) == 600
    assert _native.calib_histogram_clip(h, 3.0, "percentile", percentile=100.0) == 3.0
    with pytest.raises(ConfigError, match="unknown clip method"):
        _native.calib_histogram_clip(h, 3.0, "kl")
    with pytest.raises(ShapeError):
        _native.calib_histogram(x, np.zeros(10, np.uint64))
    with pytest.raises(ConfigError, match="not finite"):
        k = 4
        _native.calib_accumulate(np.array([[1, np.inf, 0, 0]], np.float32), *fresh(k))


def test_smoothquant_and_weighted_int4_bindings():
    out = np.zeros(3, np.float32)
    _native.weight_column_absmax(np.array([[1, -5, 2], [0.5, 3, -1]], np.float32), out)
    assert out.tolist() == [1, 5, 2]
    s = _native.smoothquant_scales(np.array([16, 1, 4], np.float32), np.array([4, 1, 1], np.float32), 0.5)
    assert s.tolist() == [2, 1, 2]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    imp = rng.exponential(1, 64).astype(np.float32)
    fast = _native.quantize_int4_weighted(w, 32, imp)
    ref = _native.quantize_int4_weighted(w, 32, imp, reference=True)
    assert all(np.array_equal(a, b) for a, b in zip(fast, ref))
    with pytest.raises(ConfigError, match="group size"):
        _native.quantize_int4_weighted(w, 48, imp)
    # the kernel setting is checked like quantize_int4's, and every level gives the same bytes
    for level in _native.kernel_info()["available"]:
        got = _native.quantize_int4_weighted(w, 32, imp, kernel=level)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref)), level
    with pytest.raises(Exception) as bogus:
        _native.quantize_int4(w, 32, False, "bogus")
    with pytest.raises(type(bogus.value), match="bogus"):
        _native.quantize_int4_weighted(w, 32, imp, kernel="bogus")
