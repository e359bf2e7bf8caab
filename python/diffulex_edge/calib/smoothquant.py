"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, then W8A8.

For a norm feeding Linear layers that share its output X, per channel j
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (computed in Rust, ``src/calib/smooth.rs``); the
norm's weight (and bias) are divided by s, every consumer's weight column j multiplied by s_j. The
model computes the same function (up to float rounding), but X's channels are now comparable in
range, so per-token int8 activations lose far less. Mappings:

* Llama / Mistral / Qwen2 (and ``testing.TinyTransformerLM``): ``input_layernorm`` -> q/k/v_proj,
  ``post_attention_layernorm`` -> gate/up_proj.
* OPT (pre-norm): ``self_attn_layer_norm`` -> q/k/v_proj, ``final_layer_norm`` -> fc1.
* GPT-2: ``ln_1`` -> ``attn.c_attn``, ``ln_2`` -> ``mlp.c_fc``. GPT-2's ``Conv1D`` layers (weight
  ``[in, out]``) are replaced by equivalent ``nn.Linear`` layers so the int8 kernel can run them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import _native
from ..errors import ConfigError, QuantizationError, UnsupportedFormatError
from ..quant.act_stats import collect_stats
from ..quant.calib_data import as_calibration

#: (norm child, consumer children) per decoder-block layout, matched on each module's children.
LAYOUTS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("final_layer_norm", ("fc1",)),
    ("ln_1", ("attn.c_attn",)),
    ("ln_2", ("mlp.c_fc",)),
)


@dataclass
class SmoothQuantConfig:
    """Args:
        alpha: migration strength in [0, 1] (0.5 balances activations and weights; the paper uses
            0.5 for most models, up to 0.75-0.85 for models with stronger outliers).
        outlier_ratio: after smoothing, a group whose largest channel absmax exceeds this many
            times the median channel absmax is reported as still having outliers.
        mappings: explicit ``[(norm module, [linear modules...]), ...]`` instead of detection.
    """

    alpha: float = 0.5
    outlier_ratio: float = 20.0
    mappings: Optional[List[Tuple[str, List[str]]]] = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if isinstance(self.outlier_ratio, bool) or not isinstance(self.outlier_ratio, (int, float)) or not self.outlier_ratio > 1:
            raise ConfigError(f"outlier_ratio must be a number > 1, got {self.outlier_ratio!r}")
        if self.mappings is not None:
            ok = isinstance(self.mappings, (list, tuple)) and all(
                isinstance(m, (list, tuple)) and len(m) == 2 and isinstance(m[0], str)
                and isinstance(m[1], (list, tuple)) and m[1] and all(isinstance(x, str) for x in m[1])
                for m in self.mappings
            )
            if not ok:
                raise ConfigError("mappings must be a list of (norm name, [linear names...]) pairs")


@dataclass
class SmoothedGroup:
    """One norm and the layers that read it: migration scales and the outlier picture."""

    norm: str
    layers: List[str]
    scales: np.ndarray
    outlier_ratio_before: float
    outlier_ratio_after: float
    flagged: bool

    @property
    def scale_range(self) -> Tuple[float, float]:
        return float(self.scales.min()), float(self.scales.max())


@dataclass
class SmoothQuantReport:
    model: nn.Module
    config: SmoothQuantConfig
    groups: List[SmoothedGroup] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def flagged(self) -> List[SmoothedGroup]:
        return [g for g in self.groups if g.flagged]

    def __str__(self) -> str:
        lines = [f"SmoothQuant alpha={self.config.alpha}: {len(self.groups)} norm(s) smoothed, "
                 f"{len(self.flagged)} with outliers left"]
        for g in self.groups:
            lo, hi = g.scale_range
            mark = "  <- outliers remain" if g.flagged else ""
            lines.append(f"  {g.norm} -> {', '.join(n.rsplit('.', 1)[-1] for n in g.layers)}: scales {lo:.3g}..{hi:.3g}, "
                         f"max/median |X| {g.outlier_ratio_before:.1f} -> {g.outlier_ratio_after:.1f}{mark}")
        return "\n".join(lines + self.warnings)


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None and m.weight.dim() == 2


def conv1d_to_linear(model: nn.Module) -> List[str]:
    """Replace every Hugging Face ``Conv1D`` (GPT-2; ``y = x @ W + b`` with W ``[in, out]``) by the
    equivalent ``nn.Linear`` (weight transposed), in place. Returns the replaced names."""
    names = [n for n, m in model.named_modules() if _is_conv1d(m)]
    for n in names:
        conv = model.get_submodule(n)
        w = conv.weight.detach()
        lin = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if conv.bias is not None:
                lin.bias.copy_(conv.bias.detach())
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return names


def find_mappings(model: nn.Module) -> List[Tuple[str, List[str]]]:
    """Detect (norm, consumers) pairs for the supported block layouts."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "do_layer_norm_before", True) is False:
        raise UnsupportedFormatError("this OPT model normalises after attention (do_layer_norm_before=False); "
                                     "SmoothQuant needs the norm before the projections")
    if "gemma" in type(model).__name__.lower():
        raise UnsupportedFormatError("Gemma's RMSNorm scales by (1 + weight); folding is not supported, pass mappings=... for other norms")
    out: List[Tuple[str, List[str]]] = []
    for name, mod in model.named_modules():
        children = dict(mod.named_modules())
        for norm, consumers in LAYOUTS:
            if norm in children and all(c in children for c in consumers):
                pre = f"{name}." if name else ""
                out.append((pre + norm, [pre + c for c in consumers]))
    return out


def _check_group(model: nn.Module, norm_name: str, layers: Sequence[str]) -> Tuple[nn.Module, List[nn.Linear]]:
    try:
        norm = model.get_submodule(norm_name)
        lins = [model.get_submodule(n) for n in layers]
    except AttributeError as e:
        raise ConfigError(f"mapping names a module the model does not have ({e})", layer=norm_name) from e
    for n, lin in zip(layers, lins):
        if not isinstance(lin, nn.Linear):
            raise UnsupportedFormatError(f"expected an nn.Linear consumer, got {type(lin).__name__}", layer=n)
    k = lins[0].in_features
    if any(lin.in_features != k for lin in lins):
        raise ConfigError(f"the layers {list(layers)} read different widths; they cannot share one norm", layer=norm_name)
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.numel() != k:
        raise UnsupportedFormatError(
            f"{type(norm).__name__} has no per-channel weight of size {k} to fold the scales into "
            "(an affine LayerNorm/RMSNorm is needed)", layer=norm_name,
        )
    return norm, lins


def _ratio(v: np.ndarray) -> float:
    med = float(np.median(v))
    return float(v.max()) / med if med > 0 else float("inf")


def smooth_model(model: nn.Module, calibration: Any, config: Optional[SmoothQuantConfig] = None, *,
                 inplace: bool = False, show_progress: Optional[bool] = None) -> SmoothQuantReport:
    """Fold SmoothQuant scales into `model` (a copy unless ``inplace=True``); the result computes
    the same function. Returns a report with the smoothed model, per-group scales and the groups
    whose activation outliers remain large."""
    config = config or SmoothQuantConfig()
    if not isinstance(config, SmoothQuantConfig):
        raise ConfigError(f"config must be a SmoothQuantConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    calib = as_calibration(calibration, show_progress)
    out = model if inplace else copy.deepcopy(model)
    conv1d_to_linear(out)
    mappings = config.mappings if config.mappings is not None else find_mappings(out)
    if not mappings:
        raise UnsupportedFormatError(
            "no norm -> projection pairs found (Llama/Mistral/Qwen2, OPT and GPT-2 layouts are detected); "
            "pass SmoothQuantConfig(mappings=[(norm, [linears])])"
        )
    groups = [(n, list(ls), *_check_group(out, n, ls)) for n, ls in mappings]
    stats = collect_stats(out, calib, [ls[0] for _, ls, _, _ in groups], desc="smoothquant")
    report = SmoothQuantReport(out, config)
    with torch.no_grad():
        for norm_name, layers, norm, lins in groups:
            st = stats.inputs[layers[0]]
            if st.calls == 0:
                report.warnings.append(f"{norm_name}: its layers saw no input during calibration; left unsmoothed")
                continue
            wmax = np.zeros(lins[0].in_features, np.float32)
            for n, lin in zip(layers, lins):
                try:
                    _native.weight_column_absmax(lin.weight.detach().to("cpu", torch.float32).contiguous().numpy(), wmax)
                except QuantizationError as e:
                    raise type(e)(str(e), layer=n) from e
            s_np = _native.smoothquant_scales(st.absmax, wmax, config.alpha)
            s = torch.from_numpy(s_np)
            norm.weight.div_(s.to(norm.weight.device, norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s.to(norm.bias.device, norm.bias.dtype))
            for lin in lins:
                lin.weight.mul_(s.to(lin.weight.device, lin.weight.dtype)[None, :])
            before, after = _ratio(st.absmax), _ratio(st.absmax / s_np)
            flagged = after > config.outlier_ratio
            report.groups.append(SmoothedGroup(norm_name, layers, s_np, before, after, flagged))
            if flagged:
                report.warnings.append(
                    f"{norm_name}: activation outliers remain after smoothing (max/median |X| = {after:.1f} > "
                    f"{config.outlier_ratio:g}); try a larger alpha, keep {', '.join(layers)} out of W8A8 "
                    "(exclude_layers), or use weight-only/per-channel INT8 for them"
                )
    return report


def smoothquant_w8a8(model: nn.Module, calibration: Any, config: Optional[SmoothQuantConfig] = None,
                     quant_config: Any = None, *, inplace: bool = False,
                     show_progress: Optional[bool] = None) -> Tuple[Any, SmoothQuantReport]:
    """Smooth `model`, then quantize it to INT8 weights x INT8 activations (the W8A8 kernel).

    quant_config: a ``QuantizationConfig`` (or mapping) with dtype int8; default
    ``mode="dynamic"`` (per-token activation scales). ``mode="static"`` calibrates the activation
    scales on the smoothed model with ``quant_config.observer``. Returns
    ``(QuantizationResult, SmoothQuantReport)``.
    """
    from ..quant import INT8Quantizer, QuantizationConfig

    qc = quant_config if quant_config is not None else QuantizationConfig(dtype="int8", mode="dynamic")
    if not isinstance(qc, QuantizationConfig):
        qc = QuantizationConfig.from_dict(qc)
    if qc.mode == "weight_only" or (qc.dtype is not None and str(qc.dtype) != "int8"):
        raise ConfigError("SmoothQuant targets W8A8: use dtype='int8' with mode='dynamic' or 'static'")
    calib = as_calibration(calibration, show_progress)
    report = smooth_model(model, calib, config, inplace=inplace, show_progress=show_progress)
    result = INT8Quantizer(show_progress=show_progress).quantize(
        report.model, qc, inplace=True, calibration_data=calib if qc.mode == "static" else None,
    )
    report.model = result.model
    return result, report

