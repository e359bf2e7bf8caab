"""Super weights (Yu et al., "The Super Weight in Large Language Models", 2024) and outlier
protection.

A super weight is a single weight of an MLP down projection that creates a "super activation": a
huge value in one input channel (column) meets a large weight in one row, and the output channel
(row) spikes at the same time. Found from calibration statistics: for each down projection, the
input channel with the largest |x| and the output channel with the largest |y|, both far above the
typical channel (``threshold`` times the median channel absmax), give (layer, row, column).

Protecting a weight keeps it in float16 in a sparse side table of the quantized layer and holds
it out of the scale computation, so one outlier neither loses precision nor stretches its group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..quant.act_stats import collect_stats, linear_names

#: Module-name endings of MLP down projections (Llama/Mistral/Qwen, OPT, Falcon/GPT-NeoX, Mixtral).
DOWN_PROJ = ("down_proj", "fc2", "dense_4h_to_h", "w2")


@dataclass
class SuperWeight:
    layer: str
    row: int
    col: int
    weight: float
    input_absmax: float
    output_absmax: float
    input_ratio: float
    output_ratio: float

    def __str__(self) -> str:
        return (f"{self.layer}[{self.row}, {self.col}] = {self.weight:.4g} (input channel {self.col}: |x| {self.input_absmax:.4g}, "
                f"{self.input_ratio:.0f}x median; output channel {self.row}: |y| {self.output_absmax:.4g}, "
                f"{self.output_ratio:.0f}x median)")


class SuperWeights(List[SuperWeight]):
    """The found super weights; :meth:`as_protect` gives the ``protect=`` table for quantizers."""

    def as_protect(self) -> Dict[str, List[Tuple[int, int]]]:
        out: Dict[str, List[Tuple[int, int]]] = {}
        for s in self:
            out.setdefault(s.layer, []).append((s.row, s.col))
        return out

    def __str__(self) -> str:
        return "\n".join([f"{len(self)} super weight(s)"] + [f"  {s}" for s in self])


def _ratio(v: np.ndarray, i: int) -> float:
    med = float(np.median(v))
    return float(v[i]) / med if med > 0 else float("inf")


def _spikes(v: np.ndarray, threshold: float) -> np.ndarray:
    """Channels whose absmax is at least `threshold` times the median channel's, largest first."""
    med = float(np.median(v))
    idx = np.nonzero(v >= threshold * med)[0] if med > 0 else np.nonzero(v > 0)[0]
    return idx[np.argsort(-v[idx], kind="stable")]


def find_super_weights(
    model: nn.Module,
    calibration: Any,
    *,
    layers: Optional[Iterable[str]] = None,
    threshold: float = 20.0,
    max_per_layer: int = 1,
) -> SuperWeights:
    """Locate super weights from activation spikes at the MLP down projections.

    Args:
        layers: Linear layers to inspect (default: names ending in ``down_proj``, ``fc2``,
            ``dense_4h_to_h`` or ``w2``).
        threshold: a spike is a channel absmax at least this many times the median channel absmax
            (on both the input and the output side).
        max_per_layer: how many spiking input channels to follow per layer.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 1:
        raise ConfigError(f"threshold must be a number > 1, got {threshold!r}")
    if isinstance(max_per_layer, bool) or not isinstance(max_per_layer, int) or max_per_layer < 1:
        raise ConfigError(f"max_per_layer must be a positive int, got {max_per_layer!r}")
    names = [n for n in linear_names(model) if n.endswith(DOWN_PROJ)] if layers is None else list(layers)
    if not names:
        raise ConfigError("no MLP down projections found; pass layers=[...] (GPT-2's Conv1D layers can be converted "
                          "with diffulex_edge.calib.conv1d_to_linear first)")
    stats = collect_stats(model, calibration, names, outputs=True, desc="super weights")
    found = SuperWeights()
    for n in names:
        si, so = stats.inputs[n], stats.outputs[n]
        if si.calls == 0:
            continue
        out_spikes = _spikes(so.absmax, threshold)
        in_spikes = _spikes(si.absmax, threshold)[:max_per_layer]
        if out_spikes.size == 0 or in_spikes.size == 0:
            continue
        w = model.get_submodule(n).weight.detach().to("cpu", torch.float32)
        for col in in_spikes.tolist():
            # of the spiking output channels, the one this input channel drives hardest
            row = int(out_spikes[int(torch.argmax(w[torch.from_numpy(out_spikes), col].abs()))])
            found.append(SuperWeight(n, row, col, float(w[row, col]), float(si.absmax[col]), float(so.absmax[row]),
                                     _ratio(si.absmax, col), _ratio(so.absmax, row)))
    return found


def outlier_weights(model: nn.Module, imatrix: Mapping[str, Any], top_k: int,
                    layers: Optional[Iterable[str]] = None) -> Dict[str, List[Tuple[int, int]]]:
    """Per layer, the `top_k` weights with the largest ``|W_ij| * sqrt(importance_j)`` (their
    typical contribution to the output), as a ``protect=`` table."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be a positive int, got {top_k!r}")
    out: Dict[str, List[Tuple[int, int]]] = {}
    for n in (linear_names(model) if layers is None else list(layers)):
        if n not in imatrix:
            continue
        w = model.get_submodule(n).weight.detach().to("cpu", torch.float32)
        imp = torch.as_tensor(np.asarray(imatrix[n], np.float32))
        if imp.numel() != w.shape[1]:
            raise ConfigError(f"importance has {imp.numel()} values for {w.shape[1]} input columns", layer=n)
        score = (w.abs() * imp.clamp_min(0).sqrt()[None, :]).reshape(-1)
        idx = torch.topk(score, min(top_k, score.numel())).indices
        out[n] = [(int(i) // w.shape[1], int(i) % w.shape[1]) for i in idx]
    return out


def protect_table(*tables: Any) -> Dict[str, List[Tuple[int, int]]]:
    """Merge ``protect=`` tables (mappings or `SuperWeights`) into one."""
    out: Dict[str, List[Tuple[int, int]]] = {}
    for t in tables:
        t = t.as_protect() if hasattr(t, "as_protect") else t
        for k, v in t.items():
            out.setdefault(k, []).extend((int(r), int(c)) for r, c in v)
    return out
