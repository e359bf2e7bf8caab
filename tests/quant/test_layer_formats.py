"""The layer-format registry (quant/layer_formats.py): every dtype has a format, and each format's
pieces agree with each other: the buffers it quantizes into are the buffers it declares, its
native and torch dequantizers give the same bits, and its single-value reader matches both."""

from __future__ import annotations

import pytest
import reference as ref
import torch

from diffulex_edge.quant import QuantizationDtype
from diffulex_edge.quant.layer_formats import LAYER_FORMATS

# symmetric only exists for the integer formats
CASES = [(d, sym) for d in QuantizationDtype for sym in ((True, False) if d in ("int8", "int4") else (True,))]


def test_every_dtype_has_a_layer_format():
    assert set(LAYER_FORMATS) == set(QuantizationDtype)


@pytest.mark.parametrize("dtype,symmetric", CASES, ids=[f"{d.value}-{'sym' if s else 'asym'}" for d, s in CASES])
def test_format_pieces_agree(dtype, symmetric):
    fmt = LAYER_FORMATS[dtype](dtype, 32, symmetric)
    # 80 columns: a shorter last INT4 group; packed formats take whole blocks (up to 256)
    n, k = 24, (512 if dtype.is_packed else 80)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    got = fmt.quantize(w, kernel="auto", name="t")
    empty = fmt.empty_buffers(n, k, "meta")
    assert {key: (v.dtype, tuple(v.shape)) for key, v in got.items()} == {
        key: (v.dtype, tuple(v.shape)) for key, v in empty.items()}
    assert fmt.storage_buffer() in got
    native, torch_ops = fmt.dequantize(got, k, native=True), fmt.dequantize(got, k, native=False)
    assert native.dtype == torch.float32 and native.shape == (n, k)
    assert torch.equal(native, torch_ops)
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(k), indexing="ij")
    assert torch.equal(fmt.values_at(got, rows.reshape(-1), cols.reshape(-1), k).reshape(n, k), native)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    out = torch.empty(3, n)
    fmt.linear_native(got, x.numpy(), out.numpy(), None, k, "auto")
    want, bound = ref.linear_f64(x, native)  # the float32 dot-product bound every kernel test uses
    assert bool(((out.double() - want).abs() <= bound + 1e-30).all())
    fmt.check_values(got, k)  # what it made itself passes its own checks
