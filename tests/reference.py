"""An independent pure-torch reference of the weight formats.

Written from the format definitions in the module docs of ``src/formats/int8.rs``,
``src/formats/int4.rs`` and ``src/kernels/w8a8.rs``; it does not import diffulex_edge. Every step is
a float32 torch op in the order the definition states, and ``torch.round`` rounds half to even,
so the native quantizers must produce exactly the same bytes.

INT8 per output channel (row), ``w ~ (q - zp) * scale``:
    symmetric:  scale = absmax / 127.5, q = clamp(round(w / scale), -128, 127), zp = 0
    asymmetric: lo = min(min(w), 0), hi = max(max(w), 0), scale = (hi - lo) / 255,
                zp = clamp(-128 - round(lo / scale), -128, 127), q = clamp(round(w / scale) + zp, -128, 127)
    a zero scale (all-zero row) is replaced by 1.

INT4 grouped (groups of ``g`` consecutive columns, the last one may be shorter), ``w ~ (u - zp) * scale``:
    asymmetric: lo/hi widened to include 0, scale = (hi - lo) / 15, zp = clamp(-round(lo / scale), 0, 15)
    symmetric:  scale = absmax / 7.5, zp = 8
    u = clamp(round(w / scale) + zp, 0, 15); a zero scale is replaced by 1.
    Packing: byte j of a row = column 2j (low nibble) | column 2j+1 (high nibble); ceil(cols/2) bytes.

W8A8 activations: one symmetric scale per row, absmax / 127 (1 for an all-zero row) or a fixed
static scale; xq = clamp(round(x / s), -127, 127).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

F32 = torch.float32


def _div_const(t: torch.Tensor, c: float) -> torch.Tensor:
    # an element-wise float32 division by a float32 constant (not a multiplication by 1/c)
    return t / torch.full_like(t, c)


def _nonzero_scale(s: torch.Tensor) -> torch.Tensor:
    """1 for an all-zero range, else at least the smallest normal float32 (src/formats/int8.rs
    `usable_step`: a subnormal step has too few significant bits for the half-step bound)."""
    return torch.where(s == 0, torch.ones_like(s), s.clamp(min=torch.finfo(torch.float32).tiny))


# ---- INT8 per channel ----------------------------------------------------------------------

def int8_quantize(w: torch.Tensor, symmetric: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n, k] float32 -> (q int8 [n, k], scales float32 [n], zero_points int8 [n])."""
    w = w.to(F32)
    n, k = w.shape
    if k == 0:
        return torch.zeros(n, 0, dtype=torch.int8), torch.ones(n, dtype=F32), torch.zeros(n, dtype=torch.int8)
    if symmetric:
        absmax = w.abs().amax(dim=1)
        s = _nonzero_scale(_div_const(absmax, 127.5))
        zp = torch.zeros(n, dtype=F32)
    else:
        lo = torch.minimum(w.amin(dim=1), torch.zeros(n, dtype=F32))
        hi = torch.maximum(w.amax(dim=1), torch.zeros(n, dtype=F32))
        s = _nonzero_scale(_div_const(hi - lo, 255.0))
        zp = (-128.0 - torch.round(lo / s)).clamp(-128, 127)
    q = (torch.round(w / s[:, None]) + zp[:, None]).clamp(-128, 127)
    return q.to(torch.int8), s, zp.to(torch.int8)


def int8_dequantize(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    return (q.to(F32) - zero_points.to(F32)[:, None]) * scales[:, None]


# ---- INT4 grouped --------------------------------------------------------------------------

def int4_groups(k: int, group: int) -> int:
    return -(-k // group)


def int4_quantize(w: torch.Tensor, group: int, symmetric: bool):
    """[n, k] float32 -> (packed uint8 [n, ceil(k/2)], scales float32 [n, G], zeros uint8 [n, G])
    and the unpacked nibble values [n, k] (uint8) as a fourth element for inspection."""
    w = w.to(F32)
    n, k = w.shape
    g = int4_groups(k, group)
    scales = torch.empty(n, g, dtype=F32)
    zeros = torch.empty(n, g, dtype=F32)
    u = torch.empty(n, k, dtype=F32)
    zero = torch.zeros(n, dtype=F32)
    for gi in range(g):
        sl = slice(gi * group, min((gi + 1) * group, k))
        vals = w[:, sl]
        if symmetric:
            s = _nonzero_scale(_div_const(vals.abs().amax(dim=1), 7.5))
            zp = torch.full((n,), 8.0, dtype=F32)
        else:
            lo = torch.minimum(vals.amin(dim=1), zero)
            hi = torch.maximum(vals.amax(dim=1), zero)
            s = _nonzero_scale(_div_const(hi - lo, 15.0))
            zp = (-torch.round(lo / s)).clamp(0, 15)
        scales[:, gi] = s
        zeros[:, gi] = zp
        u[:, sl] = (torch.round(vals / s[:, None]) + zp[:, None]).clamp(0, 15)
    u8 = u.to(torch.uint8)
    return pack_nibbles(u8), scales, zeros.to(torch.uint8), u8


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """[n, k] values 0..15 -> [n, ceil(k/2)] bytes, low nibble = even column."""
    n, k = u.shape
    if k % 2:
        u = torch.cat([u, torch.zeros(n, 1, dtype=u.dtype)], dim=1)
    even, odd = u[:, 0::2].to(torch.int32), u[:, 1::2].to(torch.int32)
    return (even | (odd << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    p = packed.to(torch.int32)
    out = torch.empty(p.shape[0], 2 * p.shape[1], dtype=torch.int32)
    out[:, 0::2] = p & 0x0F
    out[:, 1::2] = (p >> 4) & 0x0F
    return out[:, :k].to(torch.uint8)


def int4_dequantize(packed, scales, zeros, group: int, k: int) -> torch.Tensor:
    u = unpack_nibbles(packed, k).to(F32)
    idx = torch.arange(k) // group
    return (u - zeros.to(F32)[:, idx]) * scales[:, idx]


# ---- W8A8 --------------------------------------------------------------------------------

def act_quantize(x: torch.Tensor, static_scale: Optional[float] = None):
    """[m, k] float32 -> (xq int8 [m, k], scales float32 [m])."""
    x = x.to(F32)
    m = x.shape[0]
    if static_scale is None:
        s = _div_const(x.abs().amax(dim=1), 127.0) if x.shape[1] else torch.zeros(m, dtype=F32)
        s = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))
    else:
        s = torch.full((m,), static_scale, dtype=F32)
    xq = torch.round(x / s[:, None]).clamp(-127, 127)
    return xq.to(torch.int8), s


def linear_w8a8(xq, x_scales, wq, w_scales, w_zero, bias=None) -> torch.Tensor:
    """y[m, n] = (sx[m] * sw[n]) * float32(sum_k xq * (wq - zw)) + b[n], integer sums exact."""
    acc = xq.to(torch.int64) @ (wq.to(torch.int64) - w_zero.to(torch.int64)[:, None]).T
    y = (x_scales[:, None] * w_scales[None, :]) * acc.to(F32)
    if bias is not None:
        y = y + bias.to(F32)[None, :]
    return y


# ---- float linear and its error bound -----------------------------------------------------

def linear_f64(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """Exact-ish reference y = x @ w.T + b in float64, and the float32 summation error bound
    (k + 2) * eps32 * sum_k |x * w| (+ |b| rounding) for a k-term float32 dot product."""
    x64, w64 = x.to(torch.float64), w.to(torch.float64)
    y = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if bias is not None:
        b64 = bias.to(torch.float64)
        y = y + b64
        mag = mag + b64.abs()
    k = x.shape[-1]
    bound = (k + 2) * torch.finfo(F32).eps * mag
    return y, bound
