"""Tensor <-> native bridges and the device-agnostic torch implementations of the formats.

Native (Rust) calls take CPU numpy views of tensors (zero copy). The torch functions here run the
same formulas with torch ops so every format also works on CUDA/MPS and under tracing; they are
bit-identical to the Rust dequantizers (same float operations in the same order).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .. import _native
from ..errors import NonFiniteWeightError, QuantizationError

#: Largest int8 activation code (symmetric [-127, 127]), as in src/kernels/w8a8.rs.
ACT_QMAX = 127.0


def as_f32_cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 CPU copy/view of `t`, detached."""
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def np_u16(t: torch.Tensor) -> np.ndarray:
    """uint16 numpy view of a CPU float16/bfloat16/int16 tensor (bf16 has no numpy dtype)."""
    return t.view(torch.int16).numpy().view(np.uint16)


def with_layer(fn, layer: Optional[str], *args, **kwargs):
    """Call a native function, attaching the layer name to any QuantizationError it raises."""
    try:
        return fn(*args, **kwargs)
    except QuantizationError as e:
        if layer is None or e.layer is not None:
            raise
        raise type(e)(str(e), layer=layer) from e


# ---- quantization (always on CPU, in Rust) ---------------------------------------------------

def quantize_half(w: torch.Tensor, bf16: bool, layer: Optional[str] = None) -> torch.Tensor:
    src = as_f32_cpu(w)
    check_finite(src, layer)
    out = torch.empty(src.shape, dtype=torch.int16)
    with_layer(_native.f32_to_half, layer, src.reshape(-1).numpy(), np_u16(out).reshape(-1), bf16)
    return out.view(torch.bfloat16 if bf16 else torch.float16)


def quantize_int8(w: torch.Tensor, symmetric: bool, kernel: str = "auto", layer: Optional[str] = None):
    q, s, z = with_layer(_native.quantize_int8, layer, as_f32_cpu(w).numpy(), symmetric, kernel)
    return torch.from_numpy(q), torch.from_numpy(s), torch.from_numpy(z)


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool, kernel: str = "auto", layer: Optional[str] = None):
    p, s, z = with_layer(_native.quantize_int4, layer, as_f32_cpu(w).numpy(), group_size, symmetric, kernel)
    return torch.from_numpy(p), torch.from_numpy(s), torch.from_numpy(z)


def quantize_int4_weighted(w: torch.Tensor, group_size: int, symmetric: bool, importance, kernel: str = "auto",
                           layer: Optional[str] = None):
    """INT4 with each group's scale/zero point chosen for the lowest importance-weighted error."""
    imp = importance_vector(importance, w.shape[1], layer)
    p, s, z = with_layer(_native.quantize_int4_weighted, layer, as_f32_cpu(w).numpy(), group_size, imp, symmetric,
                         False, kernel)
    return torch.from_numpy(p), torch.from_numpy(s), torch.from_numpy(z)


def importance_vector(importance, cols: int, layer: Optional[str]) -> np.ndarray:
    """Per-column importances as a contiguous float32 vector of length `cols` (ShapeError otherwise)."""
    imp = np.ascontiguousarray(np.asarray(importance.detach().cpu() if isinstance(importance, torch.Tensor) else importance,
                                          dtype=np.float32).reshape(-1))
    if imp.size != cols:
        from ..errors import ShapeError

        raise ShapeError(f"importance has {imp.size} values but the weight has {cols} input columns; "
                         "was the imatrix computed on another model?", layer=layer)
    return imp


def quantize_packed(w: torch.Tensor, name: str, importance=None, kernel: str = "auto",
                    layer: Optional[str] = None) -> torch.Tensor:
    """A registry format's packed bytes ``[rows, row_bytes]`` of float weight `w` (Rust, CPU)."""
    imp = None if importance is None else importance_vector(importance, w.shape[1], layer)
    return torch.from_numpy(with_layer(_native.packed_quantize, layer, name, as_f32_cpu(w).numpy(), imp, kernel))


@torch.library.custom_op("diffulex_edge::dequantize_packed", mutates_args=())
def dequantize_packed(packed: torch.Tensor, name: str, cols: int) -> torch.Tensor:
    """float32 ``[rows, cols]`` from a registry format's packed bytes, on `packed`'s device.

    A torch custom op, so it also runs where plain Python cannot: under ``torch.export`` /
    ``torch.compile`` it appears in the graph as ``diffulex_edge.dequantize_packed`` (its shape
    comes from the fake implementation below). The decoders are Rust: tensors on another device
    are decoded on the CPU and moved back."""
    cpu = packed.detach().to("cpu").contiguous()
    out = torch.from_numpy(_native.packed_dequantize(name, cpu.numpy(), cols))
    return out.to(packed.device)


@dequantize_packed.register_fake
def _dequantize_packed_fake(packed: torch.Tensor, name: str, cols: int) -> torch.Tensor:
    return packed.new_empty((packed.shape[0], cols), dtype=torch.float32)


def check_finite(w: torch.Tensor, layer: Optional[str],
                 fix: str = "fix or exclude this layer (exclude_layers=[...])") -> None:
    """Raise NonFiniteWeightError naming the first NaN/Inf position (used where Rust does not
    check); `fix` is the advice the message ends with."""
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise NonFiniteWeightError(
            f"weight contains {int(bad.sum())} NaN/Inf value(s), first at index {idx} (value {w[idx].item()}); {fix}",
            layer=layer,
        )


# ---- dequantization in torch ops (any device) -----------------------------------------------

def dequantize_int8_torch(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    return (q.to(torch.float32) - zero_points.to(torch.float32)[:, None]) * scales[:, None]


def unpack_int4_torch(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """`[n, ceil(k/2)]` uint8 -> `[n, k]` nibble values (low nibble = even column)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


def dequantize_int4_torch(packed, scales, zeros, group_size: int, in_features: int) -> torch.Tensor:
    u = unpack_int4_torch(packed, in_features).to(torch.float32)
    s = scales.repeat_interleave(group_size, dim=1)[:, :in_features]
    z = zeros.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :in_features]
    return (u - z) * s


def fake_quantize_activations(x: torch.Tensor, static_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Torch twin of the native activation quantizer: per-row absmax/127 (or a fixed scale)."""
    xf = x.to(torch.float32)
    if static_scale is None:
        s = xf.abs().amax(dim=-1, keepdim=True) / ACT_QMAX
        s = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))
    else:
        s = static_scale.to(torch.float32)
    return (torch.round(xf / s).clamp(-ACT_QMAX, ACT_QMAX) * s).to(x.dtype)


def is_tracing() -> bool:
    """True under TorchScript, FX, dynamo/torch.compile or torch.export: use torch ops only."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return True
    import torch.fx._symbolic_trace as fx_trace

    # newer torch: is_fx_symbolic_tracing (is_fx_tracing warns that it also covers export)
    check = getattr(fx_trace, "is_fx_symbolic_tracing", None) or getattr(fx_trace, "is_fx_tracing", None)
    return bool(check()) if check is not None else False


def split_rows(x: torch.Tensor, in_features: int, keep_bf16: bool = False) -> Tuple[torch.Tensor, torch.Size]:
    """Flatten leading dims: `[..., k]` -> contiguous float32 `[m, k]` CPU tensor (bfloat16 kept
    as is with `keep_bf16`: the native kernels widen it themselves)."""
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, in_features)
    if x2.dtype != torch.float32 and not (keep_bf16 and x2.dtype == torch.bfloat16):
        x2 = x2.to(torch.float32)
    return x2.contiguous(), lead


def np_act(x2: torch.Tensor) -> np.ndarray:
    """What the native kernels take as activations: float32, or bfloat16 as a uint16 view."""
    return np_u16(x2) if x2.dtype == torch.bfloat16 else x2.numpy()
