"""Forward hooks that hand Linear-layer activations to the Rust accumulators.

A hook flattens its tensor to float32 CPU ``[tokens, features]`` (a zero-copy numpy view when it
already is one) and calls into `_native`, which reduces it with the GIL released; Python never
touches individual elements. Per-layer state is a handful of numpy arrays, so it can be saved,
merged and resumed exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn

from .. import _native
from ..errors import ConfigError, QuantizationError
from .calib_data import CalibrationDataset, as_calibration, run_batch
from .nn import QuantizedLinear


def as_rows(x: torch.Tensor, features: int) -> np.ndarray:
    """``[..., features]`` -> contiguous float32 numpy ``[tokens, features]`` on CPU."""
    t = x.detach()
    if t.shape[-1] != features:
        raise QuantizationError(f"expected activations with last dimension {features}, got shape {tuple(t.shape)}")
    return t.reshape(-1, features).to(device="cpu", dtype=torch.float32).contiguous().numpy()


@dataclass
class ActivationStats:
    """Running statistics of one activation tensor (a Linear layer's input or output).

    ``sum_sq`` (float64) / ``tokens`` is the imatrix importance; ``calls`` counts forward passes
    (llama.cpp's ``ncall``); ``hist`` (optional) is the |x| histogram of the range observers.
    """

    features: int
    sum_sq: np.ndarray = None
    absmax: np.ndarray = None
    min: np.ndarray = None
    max: np.ndarray = None
    tokens: int = 0
    calls: int = 0
    hist: Optional[np.ndarray] = None
    with_hist: bool = False

    def __post_init__(self) -> None:
        n = self.features
        if self.sum_sq is None:
            self.sum_sq = np.zeros(n, np.float64)
            self.absmax = np.zeros(n, np.float32)
            self.min = np.full(n, np.inf, np.float32)
            self.max = np.full(n, -np.inf, np.float32)
        if self.with_hist and self.hist is None:
            self.hist = np.zeros(_native.calib_histogram_bins(), np.uint64)

    def update(self, rows: np.ndarray, name: Optional[str] = None) -> None:
        try:
            if self.hist is not None:
                _native.calib_histogram(rows, self.hist)
            _native.calib_accumulate(rows, self.sum_sq, self.absmax, self.min, self.max)
        except QuantizationError as e:
            raise type(e)(str(e), layer=name) from e
        self.tokens += rows.shape[0]
        self.calls += 1

    @property
    def mean_sq(self) -> np.ndarray:
        """Mean of x^2 per column (the importance), float32."""
        return (self.sum_sq / max(self.tokens, 1)).astype(np.float32)

    @property
    def tensor_absmax(self) -> float:
        return float(self.absmax.max()) if self.features else 0.0

    def state(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ("features", "sum_sq", "absmax", "min", "max", "tokens", "calls", "hist")}

    @classmethod
    def from_state(cls, s: Dict[str, Any]) -> "ActivationStats":
        return cls(**s, with_hist=s.get("hist") is not None)


@dataclass
class CollectedStats:
    """Statistics per Linear layer name: ``inputs`` always, ``outputs`` when asked for."""

    inputs: Dict[str, ActivationStats] = field(default_factory=dict)
    outputs: Dict[str, ActivationStats] = field(default_factory=dict)


def linear_names(model: nn.Module) -> List[str]:
    """Names of the float ``nn.Linear`` layers of `model` (not already quantized ones)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantizedLinear)]


class StatsHooks:
    """Context manager: forward(-pre) hooks on the named Linear layers feeding `stats`."""

    def __init__(self, model: nn.Module, names: Iterable[str], stats: CollectedStats, *, histogram: bool = False,
                 outputs: bool = False) -> None:
        self.model, self.names, self.stats = model, list(names), stats
        self.histogram, self.outputs = histogram, outputs
        self._handles: List[Any] = []

    def __enter__(self) -> "StatsHooks":
        for n in self.names:
            mod = self.model.get_submodule(n)
            if not isinstance(mod, nn.Linear):
                raise ConfigError(f"expected an nn.Linear, got {type(mod).__name__}", layer=n)
            inp = self.stats.inputs.setdefault(n, ActivationStats(mod.in_features, with_hist=self.histogram))

            def pre(_m, args, n=n, st=inp, k=mod.in_features):
                st.update(as_rows(args[0], k), n)

            self._handles.append(mod.register_forward_pre_hook(pre))
            if self.outputs:
                out = self.stats.outputs.setdefault(n, ActivationStats(mod.out_features))

                def post(_m, _args, y, n=n, st=out, k=mod.out_features):
                    st.update(as_rows(y, k), n)

                self._handles.append(mod.register_forward_hook(post))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def collect_stats(
    model: nn.Module,
    calibration: Any,
    names: Optional[Iterable[str]] = None,
    *,
    histogram: bool = False,
    outputs: bool = False,
    desc: str = "calibrate",
) -> CollectedStats:
    """Run `calibration` through `model` (eval mode, no grad) and return per-layer statistics of
    the inputs (and outputs) of the named Linear layers (default: all of them)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    calib: CalibrationDataset = as_calibration(calibration)
    names = linear_names(model) if names is None else list(names)
    stats = CollectedStats()
    was_training = model.training
    model.eval()
    try:
        with StatsHooks(model, names, stats, histogram=histogram, outputs=outputs), torch.no_grad():
            for batch in calib.progress(desc):
                run_batch(model, batch)
    finally:
        model.train(was_training)
    unseen = [n for n in names if stats.inputs[n].calls == 0]
    if unseen:
        warnings.warn(f"{len(unseen)} layer(s) saw no input during calibration, e.g. {unseen[:3]}", stacklevel=2)
    return stats
