"""NF4 with double quantization (src/formats/nf4.rs) against bitsandbytes: golden vectors written
by bitsandbytes (tests/quant/golden/, never skipped) and, where bitsandbytes is installed, the
same checks live on fresh random tensors.

NF4 rows decode on their own (a per-row mean offset, absmax groups inside a row), so a one-row
tensor is where our bytes and bitsandbytes' (a per-tensor offset) are the same format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffulex_edge import _native
from diffulex_edge.quant import QuantizedLinear, quantize_

GOLDEN = Path(__file__).with_name("golden") / "nf4_bitsandbytes.npz"
BLOCK, GROUP = 64, 256


def our_row(packed_hi_lo: np.ndarray, absmax_codes: np.ndarray, group_scales: np.ndarray, offset: float) -> np.ndarray:
    """Our one-row layout from bitsandbytes' state: nibbles, absmax codes, group scales, offset."""
    return np.concatenate([packed_hi_lo, absmax_codes, group_scales.astype("<f4").view(np.uint8),
                           np.array([offset], dtype="<f4").view(np.uint8)])[None, :]


def split_row(row: np.ndarray, cols: int):
    nb = cols // BLOCK
    ng = -(-nb // GROUP)
    r = row.reshape(-1)
    return (r[: cols // 2], r[cols // 2: cols // 2 + nb], r[cols // 2 + nb: cols // 2 + nb + 4 * ng].view("<f4"),
            r[-4:].view("<f4")[0])


def code_value(absmax_code: int) -> float:
    """The dynamic-code value of an absmax code (our decoder's): a one-block row with group
    scale 1, offset 0 and every nibble 15 (NF4 value 1.0) decodes to it."""
    row = our_row(np.full(32, 0xFF, np.uint8), np.array([absmax_code], np.uint8), np.ones(1, np.float32), 0.0)
    return float(_native.packed_dequantize("nf4", row, BLOCK)[0, 0])


def check_against(x: np.ndarray, packed, absmax_codes, group_scales, offset, dequantized, code, dynamic_code) -> None:
    cols = x.shape[1]
    # the 16 values: nibbles 0..15 with absmax 1 (code 255 = 1.0, scale 1, offset 0) decode to the NF4 code
    nibbles = (np.arange(16, dtype=np.uint8)[0::2] << 4 | np.arange(16, dtype=np.uint8)[1::2]).repeat(1)
    row = our_row(np.tile(nibbles, 4), np.array([255], np.uint8), np.ones(1, np.float32), 0.0)
    assert np.array_equal(_native.packed_dequantize("nf4", row, BLOCK)[0, :16], code)
    # 1. our decoder on bitsandbytes' own bytes gives bitsandbytes' floats, bit for bit
    row = our_row(packed, absmax_codes, group_scales, offset)
    assert row.shape[1] == _native.packed_row_bytes("nf4", cols)
    assert np.array_equal(_native.packed_dequantize("nf4", row, cols).reshape(-1), dequantized)
    # 2. our quantizer, step by step as bitsandbytes defines it: the same nibbles (nearest NF4 code
    #    of x / absmax); the offset is the mean of the absmaxes (bitsandbytes' torch mean may sum in
    #    another order: one ulp apart at most); each group scale is max |absmax - offset| and each
    #    absmax code the nearest dynamic-code value of (absmax - offset) / scale. Where the offsets
    #    agree the scales are bitsandbytes'; the codes are bitsandbytes' except where its binary
    #    search returns a neighbour of the nearest code (rare).
    mine = _native.packed_quantize("nf4", np.ascontiguousarray(x, dtype=np.float32))
    nib, codes, scales, off = split_row(mine, cols)
    assert np.array_equal(nib, packed)
    assert abs(off - offset) <= np.spacing(np.float32(offset))
    absmax = np.abs(x.reshape(-1, BLOCK)).max(1).astype(np.float32)
    centred = absmax - off
    want_scales = np.array([np.abs(c).max() for c in np.array_split(centred, range(GROUP, centred.size, GROUP))])
    assert np.array_equal(scales, want_scales)
    if off == offset:
        assert np.array_equal(scales, group_scales)
    dyn = np.array([code_value(c) for c in range(256)], dtype=np.float32)
    assert np.array_equal(dyn, dynamic_code)  # bitsandbytes' create_dynamic_map(signed=True)
    normed = centred / np.repeat(scales, GROUP)[: centred.size]
    assert np.array_equal(codes, np.abs(normed[:, None] - dyn[None, :]).argmin(1))
    differ = int((codes != absmax_codes).sum())
    assert differ <= max(2, codes.size // 100), f"{differ} of {codes.size} absmax codes differ from bitsandbytes'"


def test_golden_vectors_from_bitsandbytes():
    g = np.load(GOLDEN)
    check_against(g["x"].astype(np.float32), g["packed"], g["absmax_codes"], g["group_scales"], float(g["offset"]),
                  g["dequantized"], g["code"], g["dynamic_code"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_live_against_bitsandbytes(seed):
    F = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(1, 64 * 512 + 64 * 7, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
    q, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    check_against(x.numpy(), q.numpy().reshape(-1), st.absmax.numpy(), st.state2.absmax.numpy(), float(st.offset),
                  F.dequantize_4bit(q, st).numpy().reshape(-1), F.get_4bit_type("nf4", device="cpu").numpy(),
                  F.create_dynamic_map(signed=True).numpy())


def test_nf4_layer_end_to_end():
    """A model quantized to nf4 through the generic registry path: every layer holds packed
    rows, the CPU kernel agrees with the torch path, and the weight error is NF4's (Gaussian
    weights: the 16-value code's relative RMS error is about 0.1, bitsandbytes' dequantization of
    the same weights gives the same)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 192), torch.nn.ReLU(), torch.nn.Linear(192, 64, bias=False))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.normal_(0, 0.02)
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    result = quantize_(model, "nf4")
    x = torch.randn(4, 128)
    for layer, w in zip((model[0], model[2]), weights):
        assert isinstance(layer, QuantizedLinear) and layer.qweight.dtype == torch.uint8
        assert tuple(layer.qweight.shape) == (w.shape[0], _native.packed_row_bytes("nf4", w.shape[1]))
        rel = float((layer.dequantize_weight() - w).norm() / w.norm())
        assert 0.05 < rel < 0.15, rel
    native = model(x)
    with torch.no_grad():
        y = model[0]._forward_torch(x)
        torch_path = model[2]._forward_torch(torch.relu(y))
    assert torch.allclose(native, torch_path, rtol=1e-5, atol=1e-6)
    # the layers hold their packed rows and the float32 bias, nothing else
    row_bytes = [_native.packed_row_bytes("nf4", k) for k in (128, 192)]
    assert result.quantized_size_bytes == 192 * row_bytes[0] + 192 * 4 + 64 * row_bytes[1]
