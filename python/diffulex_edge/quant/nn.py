"""`QuantizedLinear`: a drop-in `nn.Linear` replacement that keeps its weight quantized.

On CPU the forward pass calls a Rust kernel that reads the packed weights directly (a fused
decode-and-multiply GEMV at small batch, a blocked GEMM over cache-sized decoded panels at larger
batch; the full float weight never exists). bfloat16 activations are passed through as a uint16
view and widened in Rust. On any other
device, while tracing/compiling/exporting, or when gradients must flow to the input, it runs the
same math in torch ops (dequantize + matmul), so a quantized model works everywhere.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _native
from ..errors import ConfigError, ShapeError, UnsupportedFormatError
from . import _ops
from . import config as _config
from .config import INT4_GROUP_SIZES, MODES, QuantizationDtype
from .layer_formats import LAYER_FORMATS

_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


class QuantizedLinear(nn.Module):
    """Linear layer with quantized weight storage.

    Build one with :meth:`from_linear`; the constructor allocates empty buffers of the right
    shapes (what :func:`~diffulex_edge.quant.load_quantized` fills from a file).

    The weight's storage is a format object (``self.format``, one class per dtype in
    :mod:`diffulex_edge.quant.layer_formats`): its buffers, quantizer, dequantizers and native
    matmul. Buffers by format (all part of ``state_dict``):
        fp16/bf16: ``weight`` ``[out, in]`` float16/bfloat16.
        int8: ``qweight`` int8 ``[out, in]``, ``scales`` float32 ``[out]``, ``zero_points`` int8 ``[out]``;
        with ``act_mode="static"`` also ``act_scale`` float32 ``[]``.
        int4: ``qweight`` uint8 ``[out, ceil(in/2)]`` (two nibbles per byte, low nibble = even
        column), ``scales`` float32 ``[out, groups]``, ``zeros`` uint8 ``[out, groups]``.
        ``bias`` (if any) keeps the original layer's dtype.
        Protected weights (``n_protect > 0``, e.g. super weights): ``protect_index`` int64
        ``[2, n]`` (rows, columns) and ``protect_values`` float16 ``[n]``, a sparse side table
        that overrides the quantized values at dequantization (and in the native forward pass,
        as a correction added to the kernel's output).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: Union[QuantizationDtype, str],
        group_size: int = 128,
        symmetric: Optional[bool] = None,
        act_mode: str = "weight_only",
        kernel: str = "auto",
        bias_dtype: torch.dtype = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
        n_protect: int = 0,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.qdtype = QuantizationDtype.parse(dtype)
        self.group_size = int(group_size)
        fmt = LAYER_FORMATS[self.qdtype]
        self.symmetric = fmt.default_symmetric if symmetric is None else bool(symmetric)
        self.act_mode = act_mode
        self.kernel = kernel
        if act_mode not in MODES:
            raise ConfigError(f"unknown act_mode {act_mode!r}; supported: {', '.join(MODES)}")
        if act_mode != "weight_only" and not fmt.quantizes_activations:
            raise ConfigError(f"act_mode={act_mode!r} needs dtype int8, got {self.qdtype}")
        #: the weight format (buffers, quantize/dequantize, native matmul): see layer_formats.py
        self.format = fmt(self.qdtype, self.group_size, self.symmetric)
        n, k = self.out_features, self.in_features
        kw = {"device": device}
        for key, value in self.format.empty_buffers(n, k, device).items():
            self.register_buffer(key, value)
        if act_mode == "static":
            self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, **kw))
        if bias:
            self.register_buffer("bias", torch.zeros(n, dtype=bias_dtype, **kw))
        else:
            self.register_buffer("bias", None)
        self.n_protect = int(n_protect)
        if self.n_protect:
            self.register_buffer("protect_index", torch.zeros(2, self.n_protect, dtype=torch.int64, **kw))
            self.register_buffer("protect_values", torch.zeros(self.n_protect, dtype=torch.float16, **kw))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        dtype: Union[QuantizationDtype, str],
        *,
        group_size: int = 128,
        symmetric: Optional[bool] = None,
        act_mode: str = "weight_only",
        act_scale: Optional[float] = None,
        kernel: str = "auto",
        name: Optional[str] = None,
        importance: Optional[Any] = None,
        protect: Optional[Any] = None,
        on_indivisible: str = "error",
    ) -> "QuantizedLinear":
        """Quantize an ``nn.Linear`` (the original is not modified). Buffers end up on the
        layer's device; the quantization itself runs in Rust on CPU.

        importance: INT4 only: per-input-column importances (an imatrix row); each group's scale
            and zero point then minimise the importance-weighted squared error.
        protect: ``(row, col)`` pairs (a list or an int tensor ``[n, 2]``) kept in float16 in a
            sparse side table; they are held out (set to 0) while the rest is quantized, so an
            outlier such as a super weight does not stretch its row's or group's scale.
        on_indivisible: an in_features that is not whole INT4 groups / format blocks raises
            :class:`ShapeError` (``"error"``, as ``quantize_`` does) or, for INT4 only, gets a
            shorter last group (``"pad"``).
        """
        if not isinstance(linear, nn.Linear):
            raise UnsupportedFormatError(
                f"expected nn.Linear, got {type(linear).__name__}", layer=name
            )
        w = linear.weight
        if not w.dtype.is_floating_point:
            raise UnsupportedFormatError(
                f"weight dtype {w.dtype} is not a float type; only float weights can be quantized",
                layer=name,
            )
        if on_indivisible not in ("error", "pad"):
            raise ConfigError(f"on_indivisible must be 'error' or 'pad' for one layer, got {on_indivisible!r}", layer=name)
        err = indivisible_error(QuantizationDtype.parse(dtype), group_size, linear.in_features, name)
        if err is not None and (on_indivisible == "error" or QuantizationDtype.parse(dtype).is_packed):
            raise err
        has_bias = linear.bias is not None
        pidx = _protect_index(protect, linear.out_features, linear.in_features, name)
        q = cls(
            linear.in_features, linear.out_features, has_bias, dtype=dtype, group_size=group_size,
            symmetric=symmetric, act_mode=act_mode, kernel=kernel,
            bias_dtype=linear.bias.dtype if has_bias else torch.float32, device="meta",
            n_protect=0 if pidx is None else pidx.shape[1],
        )
        if importance is not None and not q.format.takes_importance:
            raise ConfigError(f"dtype {q.qdtype} does not use importance weights (an imatrix); "
                              f"{_config._IMATRIX_FORMATS}", layer=name)
        dev = w.device
        extra: Dict[str, torch.Tensor] = {}
        if pidx is not None:
            wf = w.detach().to(device="cpu", dtype=torch.float32)
            extra = {"protect_index": pidx, "protect_values": wf[pidx[0], pidx[1]].to(torch.float16)}
            w = wf.clone()
            w[pidx[0], pidx[1]] = 0.0
        if act_mode == "static" and (act_scale is None or not (act_scale > 0) or act_scale == float("inf")):
            raise ConfigError(
                f"static activation quantization needs a positive finite act_scale from calibration, got {act_scale!r}",
                layer=name,
            )
        buffers = q.format.quantize(w, kernel=kernel, name=name, importance=importance)
        if act_mode == "static":
            buffers["act_scale"] = torch.tensor(float(act_scale), dtype=torch.float32)
        buffers.update(extra)
        if has_bias:
            buffers["bias"] = linear.bias.detach().clone()
        for key, value in buffers.items():
            setattr(q, key, value.to(dev))
        return q

    # ---- views --------------------------------------------------------------------------
    def dequantize_weight(self) -> torch.Tensor:
        """The weight as float32 ``[out, in]`` on the layer's device (protected weights included)."""
        w = self._dequantize_stored()
        if self.n_protect:
            w = w.index_put((self.protect_index[0], self.protect_index[1]), self.protect_values.to(torch.float32))
        return w

    def _stored(self) -> Dict[str, Optional[torch.Tensor]]:
        """The layer's buffers by name, what the format reads (nn.Module's own dict: no copy per call)."""
        return self._buffers

    def _protect_correction(self, x2: torch.Tensor, out: torch.Tensor) -> None:
        """``out[:, r] += x[:, c] * (value - quantized)`` for each protected (r, c)."""
        rows, cols = self.protect_index[0], self.protect_index[1]
        delta = self.protect_values.to(torch.float32) - self.format.values_at(self._stored(), rows, cols, self.in_features)
        out.index_add_(1, rows, x2[:, cols].to(torch.float32) * delta)

    def _dequantize_stored(self) -> torch.Tensor:
        # the native decoders need real CPU tensors: not FakeTensors (export/compile) or FX proxies
        native = not _ops.is_tracing() and self._storage().device.type == "cpu"
        return self.format.dequantize(self._stored(), self.in_features, native)

    def to_linear(self) -> nn.Linear:
        """A plain float32 ``nn.Linear`` with the dequantized weight."""
        dev = self._storage().device
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=dev)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias.to(torch.float32))
        return lin

    def spec(self) -> Dict[str, Any]:
        """Constructor arguments, enough to rebuild an empty layer of this shape and format."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": str(self.qdtype),
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "act_mode": self.act_mode,
            "n_protect": self.n_protect,
            "bias_dtype": str(self.bias.dtype).replace("torch.", "") if self.bias is not None else "float32",
        }

    @classmethod
    def check_spec(cls, spec: Any) -> Dict[str, Any]:
        """Validate a :meth:`spec` dict (e.g. read from a file) and return it with defaults filled
        in and ``bias_dtype`` as a ``torch.dtype``. Raises :class:`ConfigError` naming the key
        (unknown, missing, wrong type or out of range); allocates nothing."""
        if not isinstance(spec, dict):
            raise ConfigError(f"a layer spec must be a JSON object, got {type(spec).__name__}")
        unknown = sorted(str(k) for k in spec if k not in _SPEC_DEFAULTS)
        if unknown:
            raise ConfigError(f"key {unknown[0]!r}: unknown spec key; known: {', '.join(_SPEC_DEFAULTS)}")
        missing = [k for k, d in _SPEC_DEFAULTS.items() if d is _REQUIRED and k not in spec]
        if missing:
            raise ConfigError(f"key {missing[0]!r}: missing from the layer spec")
        out = {k: spec.get(k, d) for k, d in _SPEC_DEFAULTS.items()}

        def bad(key: str, want: str) -> ConfigError:
            return ConfigError(f"key {key!r}: expected {want}, got {out[key]!r}")

        for key in ("in_features", "out_features"):
            if not _is_int(out[key]) or not 1 <= out[key] <= _MAX_FEATURES:
                raise bad(key, f"an int in 1..{_MAX_FEATURES}")
        if not isinstance(out["bias"], bool):
            raise bad("bias", "true or false")
        if not isinstance(out["dtype"], str):
            raise bad("dtype", "a format name")
        try:
            qdtype = QuantizationDtype.parse(out["dtype"])
        except ConfigError as e:
            raise ConfigError(f"key 'dtype': {e}") from None
        if qdtype == QuantizationDtype.INT4:
            if not _is_int(out["group_size"]) or out["group_size"] not in INT4_GROUP_SIZES:
                raise bad("group_size", f"one of {INT4_GROUP_SIZES}")
        elif qdtype.is_packed and out["in_features"] % qdtype.block_size:
            raise bad("in_features", f"a multiple of the {qdtype} block size ({qdtype.block_size})")
        elif not _is_int(out["group_size"]) or out["group_size"] < 1:
            raise bad("group_size", "a positive int")
        if out["symmetric"] is not None and not isinstance(out["symmetric"], bool):
            raise bad("symmetric", "true, false or null")
        if not isinstance(out["act_mode"], str) or out["act_mode"] not in MODES:
            raise bad("act_mode", f"one of {MODES}")
        if out["act_mode"] != "weight_only" and qdtype != QuantizationDtype.INT8:
            raise bad("act_mode", "'weight_only' (activation quantization needs dtype int8)")
        if not _is_int(out["n_protect"]) or not 0 <= out["n_protect"] <= out["in_features"] * out["out_features"]:
            raise bad("n_protect", "an int between 0 and in_features * out_features")
        if not isinstance(out["bias_dtype"], str) or out["bias_dtype"] not in _BIAS_DTYPES:
            raise bad("bias_dtype", f"one of {', '.join(_BIAS_DTYPES)}")
        out["bias_dtype"] = _BIAS_DTYPES[out["bias_dtype"]]
        return out

    @classmethod
    def from_spec(cls, spec: Dict[str, Any], device=None) -> "QuantizedLinear":
        """An empty layer (buffers to be filled, e.g. by ``load_state_dict``) from a :meth:`spec`
        dict; ``device="meta"`` builds it without allocating."""
        args = cls.check_spec(spec)
        return cls(args.pop("in_features"), args.pop("out_features"), args.pop("bias"), device=device, **args)

    def check_state(self, state: Dict[str, Any]) -> None:
        """Check tensors meant for this layer's buffers (``{buffer name: tensor}``, e.g. read from
        a file) before loading them: every buffer present with this layer's exact shape and dtype,
        and values the format allows (INT4 zero points < 16, finite scales, protected positions
        inside the weight). Works on a ``device="meta"`` layer. Raises :class:`ConfigError`
        naming the buffer."""
        for key, want in self.state_dict().items():
            t = state.get(key)
            if t is None:
                raise ConfigError(f"tensor {key!r}: missing")
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"tensor {key!r}: expected a tensor, got {type(t).__name__}")
            if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
                raise ConfigError(
                    f"tensor {key!r}: expected {str(want.dtype).replace('torch.', '')} {list(want.shape)} for this "
                    f"layer, got {str(t.dtype).replace('torch.', '')} {list(t.shape)}"
                )
        for key in ("scales", "act_scale", "protect_values"):
            if key in state and not bool(torch.isfinite(state[key]).all()):
                raise ConfigError(f"tensor {key!r}: holds NaN or Inf")
        if "act_scale" in state and not float(state["act_scale"]) > 0:
            raise ConfigError(f"tensor 'act_scale': must be positive, got {float(state['act_scale'])}")
        self.format.check_values(state, self.in_features)
        if self.n_protect:
            idx = state["protect_index"]
            if bool(((idx < 0).any() | (idx[0] >= self.out_features).any() | (idx[1] >= self.in_features).any())):
                raise ConfigError(
                    f"tensor 'protect_index': positions outside the [{self.out_features}, {self.in_features}] weight"
                )

    def storage_bytes(self) -> int:
        """Bytes held by this layer's buffers (quantized weight, scales, zero points, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _storage(self) -> torch.Tensor:
        return getattr(self, self.format.storage_buffer())

    # ---- forward ------------------------------------------------------------------------
    def _use_native(self, x: torch.Tensor) -> bool:
        return (
            not _ops.is_tracing()
            and x.device.type == "cpu"
            and self._storage().device.type == "cpu"
            and x.dtype in _FLOAT_INPUTS
            and not (x.requires_grad and torch.is_grad_enabled())
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.shape[-1] != self.in_features:  # not for FX proxies
            raise ShapeError(
                f"QuantizedLinear expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        if self._use_native(x):
            return self._forward_native(x)
        return self._forward_torch(x)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize_weight()
        if self.act_mode != "weight_only":
            x = _ops.fake_quantize_activations(x, self.act_scale if self.act_mode == "static" else None)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 activations cross as a uint16 view; the kernels widen them (exactly) in Rust
        x2, lead = _ops.split_rows(x, self.in_features, keep_bf16=True)
        m, n = x2.shape[0], self.out_features
        out = torch.empty(m, n, dtype=torch.float32)
        bias = None if self.bias is None else self.bias.to(torch.float32).numpy()
        xs, o = _ops.np_act(x2), out.numpy()
        if self.act_mode != "weight_only":  # W8A8 (int8 only: checked at construction)
            xq = torch.empty(m, self.in_features, dtype=torch.int8)
            xsc = torch.empty(m, dtype=torch.float32)
            static = float(self.act_scale) if self.act_mode == "static" else None
            _native.quantize_act_int8(xs, xq.numpy(), xsc.numpy(), static, self.kernel)
            if self.n_protect:  # the correction sees the same (quantized) activations as the kernel
                x2 = xq.to(torch.float32) * xsc[:, None]
            _native.linear_w8a8(
                xq.numpy(), xsc.numpy(), self.qweight.numpy(), self.scales.numpy(), self.zero_points.numpy(),
                o, bias, self.kernel,
            )
        else:
            self.format.linear_native(self._stored(), xs, o, bias, self.in_features, self.kernel)
        if self.n_protect:
            self._protect_correction(x2, out)
        out = out.reshape(*lead, n)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            *self.format.describe(),
        ]
        if self.act_mode != "weight_only":
            parts.append(f"act_mode={self.act_mode}")
        if self.n_protect:
            parts.append(f"protected={self.n_protect}")
        return ", ".join(parts)


_REQUIRED = object()
#: The keys of :meth:`QuantizedLinear.spec` and their defaults (files from before a key existed
#: lack it): everything a file may say about a layer.
_SPEC_DEFAULTS: Dict[str, Any] = {
    "in_features": _REQUIRED, "out_features": _REQUIRED, "bias": _REQUIRED, "dtype": _REQUIRED,
    "group_size": 128, "symmetric": None, "act_mode": "weight_only", "n_protect": 0, "bias_dtype": "float32",
}
_BIAS_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_MAX_FEATURES = 2**31 - 1


def indivisible_error(dtype: QuantizationDtype, group_size: int, in_features: int,
                      layer: Optional[str]) -> Optional[ShapeError]:
    """The ShapeError of a layer whose input width is not whole INT4 groups / format blocks (with
    the fixes that apply, and a short ``reason``), or None when it fits. One message for
    ``quantize_`` and ``QuantizedLinear.from_linear``."""
    if dtype == QuantizationDtype.INT4:
        if group_size not in INT4_GROUP_SIZES or in_features % group_size == 0:
            return None  # (a bad group size is the format's own ConfigError)
        smaller = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        hint = f", or use group_size={smaller[-1]}" if smaller else ""
        reason = f"in_features={in_features} is not a multiple of group_size ({group_size})"
        fixes = ("pass on_indivisible='pad' (the last group of each row is shorter) or on_indivisible='skip' "
                 f"(keep this layer in full precision){hint}")
    else:
        if in_features % dtype.block_size == 0:
            return None
        fits = [d.value for d in QuantizationDtype if d.is_packed and in_features % d.block_size == 0]
        reason = f"in_features={in_features} is not a multiple of the {dtype} block size ({dtype.block_size})"
        fixes = ("pass on_indivisible='skip' (keep this layer in full precision), exclude it, or use a format whose "
                 f"blocks fit: {', '.join(fits) or 'int8, or int4 with on_indivisible=pad'}")
    err = ShapeError(f"{reason}; {fixes}", layer=layer)
    err.reason = reason
    return err


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _protect_index(protect: Any, out_features: int, in_features: int, name: Optional[str]) -> Optional[torch.Tensor]:
    """``(row, col)`` pairs -> a deduplicated, sorted int64 ``[2, n]`` tensor (None when empty)."""
    if protect is None:
        return None
    idx = torch.as_tensor(protect, dtype=torch.int64).reshape(-1, 2) if len(protect) else torch.zeros(0, 2, dtype=torch.int64)
    if idx.numel() == 0:
        return None
    bad = (idx[:, 0] < 0) | (idx[:, 0] >= out_features) | (idx[:, 1] < 0) | (idx[:, 1] >= in_features)
    if bool(bad.any()):
        r, c = (int(v) for v in idx[bad][0])
        raise ShapeError(
            f"protected weight ({r}, {c}) is outside the [{out_features}, {in_features}] weight; "
            "pass (row, column) pairs of this layer", layer=name,
        )
    return torch.unique(idx, dim=0).t().contiguous()
