"""Hypothesis strategies shared by the format and kernel tests."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def f32(lo: float, hi: float, **kw):
    return st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False, **kw)


@st.composite
def weight_matrices(draw, max_rows: int = 6, max_cols: int = 300, magnitude: float = 1e4, min_cols: int = 1):
    """A float32 [rows, cols] tensor: mostly gaussian rows at a random scale, sometimes with
    arbitrary hypothesis floats (ties, subnormals, repeated values) mixed in."""
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(min_cols, max_cols))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 37.0, magnitude]))
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    if draw(st.booleans()):
        special = draw(hnp.arrays(np.float32, (rows, cols), elements=f32(-magnitude, magnitude)))
        mask = rng.random((rows, cols)) < draw(st.sampled_from([0.1, 0.5, 1.0]))
        w = np.where(mask, special, w).astype(np.float32)
    kind = draw(st.sampled_from(["plain", "zero_row", "constant_row", "positive", "negative"]))
    r = draw(st.integers(0, rows - 1))
    if kind == "zero_row":
        w[r] = 0.0
    elif kind == "constant_row":
        w[r] = np.float32(draw(f32(-magnitude, magnitude)))
    elif kind == "positive":
        w = np.abs(w)
    elif kind == "negative":
        w = -np.abs(w)
    return torch.from_numpy(np.ascontiguousarray(w))


group_sizes = st.sampled_from([32, 64, 128, 256])
