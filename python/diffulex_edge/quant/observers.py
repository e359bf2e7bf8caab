"""Activation-range observers for static INT8: one clip value per layer from calibration.

* ``minmax``: the largest |x| seen (no clipping).
* ``percentile``: the p-th percentile of |x| over all tokens and channels (clips rare outliers).
* ``mse``: the clip that minimises the squared error of symmetric int8 quantization (rounding
  noise inside the range plus clipping error outside it) over the |x| histogram.

The histograms and the searches run in Rust (``src/calib/histogram.rs``); the scale is
``clip / 127`` (the symmetric int8 activation grid of the W8A8 kernel).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable

from torch import nn

from .. import _native
from ..errors import ConfigError
from ._ops import ACT_QMAX
from .act_stats import ActivationStats, collect_stats
from .config import OBSERVERS


def clip_value(stats: ActivationStats, observer: str = "minmax", percentile: float = 99.99) -> float:
    """The activation clip value of one layer's statistics."""
    if observer not in OBSERVERS:
        raise ConfigError(f"unknown observer {observer!r}; supported: {', '.join(OBSERVERS)}")
    amax = stats.tensor_absmax
    if observer == "minmax" or amax == 0.0:
        return amax
    if stats.hist is None:
        raise ConfigError(f"observer={observer!r} needs histograms; collect with histogram=True")
    return float(_native.calib_histogram_clip(stats.hist, amax, observer, percentile=percentile, qmax=ACT_QMAX))


def activation_scales(
    model: nn.Module, names: Iterable[str], calibration: Any, observer: str = "minmax", percentile: float = 99.99,
) -> Dict[str, float]:
    """Static int8 activation scales ``{layer: clip / 127}`` for the named Linear layers. Layers
    that saw no input are left out."""
    names = list(names)
    stats = collect_stats(model, calibration, names, histogram=observer != "minmax", desc=f"calibrate ({observer})")
    out: Dict[str, float] = {}
    for n in names:
        st = stats.inputs[n]
        if st.calls == 0:
            continue
        c = clip_value(st, observer, percentile)
        out[n] = c / ACT_QMAX if c > 0 else 1.0
    return out

