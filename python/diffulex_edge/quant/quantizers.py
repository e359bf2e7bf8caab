"""The quantizer classes: one per weight format, all driven by `walk.quantize_model`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Iterable, Mapping, Optional, Tuple, Type, Union

from torch import nn

from .. import _native
from ..errors import ConfigError
from .config import _IMATRIX_FORMATS, QuantizationConfig, QuantizationDtype
from .result import QuantizationResult
from .walk import plan_layers, quantize_model

ConfigLike = Union[QuantizationConfig, Mapping[str, Any], None]


class BaseQuantizer:
    """Common driver. Subclasses set `dtypes`, the formats they produce (the first is the default).

    Args:
        config: default config for :meth:`quantize` (a ``QuantizationConfig`` or a mapping).
        show_progress: ``True``/``False`` to force the progress bar on/off; ``None`` lets tqdm
            decide (on in terminals and notebooks).
    """

    dtypes: ClassVar[Tuple[QuantizationDtype, ...]] = ()

    def __init__(self, config: ConfigLike = None, *, show_progress: Optional[bool] = None) -> None:
        self.config = self._as_config(config) if config is not None else None
        if self.config is not None:
            self.resolve_config(self.config)  # checked now for this quantizer's format, not at the first call
        self.show_progress = show_progress

    @staticmethod
    def _as_config(config: ConfigLike) -> QuantizationConfig:
        if isinstance(config, QuantizationConfig):
            return config
        return QuantizationConfig.from_dict(config)

    def resolve_config(self, config: ConfigLike = None) -> QuantizationConfig:
        """The config a call would use: the argument, else the quantizer's default; a missing
        dtype becomes this quantizer's format."""
        cfg = self._as_config(config) if config is not None else (self.config or QuantizationConfig())
        if cfg.dtype is None:
            if cfg.enabled is False:
                return cfg
            return dataclasses.replace(cfg, dtype=self.dtypes[0])
        if cfg.dtype not in self.dtypes:
            raise ConfigError(
                f"{type(self).__name__} produces {', '.join(str(d) for d in self.dtypes)}, but the config asks for "
                f"{cfg.dtype}; use {QUANTIZERS[cfg.dtype].__name__} or quantize_(model, config)"
            )
        return cfg

    def quantize(
        self,
        model: nn.Module,
        config: ConfigLike = None,
        *,
        inplace: bool = False,
        calibration_data: Optional[Iterable[Any]] = None,
        imatrix: Any = None,
        protect: Any = None,
    ) -> QuantizationResult:
        """Quantize `model` and return a :class:`QuantizationResult` (``result.model`` is the
        quantized model). The input model is left unmodified unless ``inplace=True``.

        Args:
            calibration_data: model inputs (a ``CalibrationDataset`` or any iterable); required by
                ``mode="static"``, whose activation scales come from ``config.observer``.
            imatrix: INT4 and the importance-aware packed formats: an ``ImportanceMatrix``, a
                ``{layer: importances}`` mapping or an imatrix file path (overrides
                ``config.imatrix``); each group's (block's) scales then minimise the
                importance-weighted error.
            protect: weights kept in float16 in a sparse side table: a ``SuperWeights`` result of
                ``find_super_weights`` or a ``{layer: [(row, col), ...]}`` mapping.
        """
        cfg = self.resolve_config(config)
        act_scales: Optional[Dict[str, float]] = None
        if cfg.is_enabled and cfg.mode == "static":
            if calibration_data is None:
                raise ConfigError(
                    "mode='static' fixes activation scales from calibration: pass calibration_data "
                    "(an iterable of model inputs), or use mode='dynamic'"
                )
            from .observers import activation_scales

            names = [n for n, _ in plan_layers(model, cfg).layers]
            act_scales = activation_scales(model, names, calibration_data, cfg.observer, cfg.percentile)
        importance = None
        if cfg.is_enabled and (imatrix is not None or cfg.imatrix is not None):
            if not cfg.dtype.takes_importance:
                raise ConfigError(f"dtype {cfg.dtype} does not use an imatrix; {_IMATRIX_FORMATS}")
            from .importance import resolve_imatrix

            importance = resolve_imatrix(imatrix if imatrix is not None else cfg.imatrix, model)
        table = None
        if protect is not None:
            table = protect.as_protect() if hasattr(protect, "as_protect") else protect
            if not isinstance(table, Mapping):
                raise ConfigError(
                    f"protect must map layer names to (row, col) pairs or be a find_super_weights result, got {type(protect).__name__}"
                )
        return quantize_model(model, cfg, inplace=inplace, act_scales=act_scales, importance=importance, protect=table,
                              show_progress=self.show_progress, calibration_data=calibration_data)


class FP16Quantizer(BaseQuantizer):
    """Linear weights stored as float16 (or bfloat16 with ``bf16=True`` / ``dtype='bf16'``);
    inputs and outputs keep their dtype. Excluded layers stay as they are."""

    dtypes = (QuantizationDtype.FP16, QuantizationDtype.BF16)

    def __init__(self, config: ConfigLike = None, *, bf16: bool = False, show_progress: Optional[bool] = None) -> None:
        super().__init__(config, show_progress=show_progress)
        if bf16:
            self.dtypes = (QuantizationDtype.BF16, QuantizationDtype.FP16)


class BF16Quantizer(FP16Quantizer):
    """Linear weights stored as bfloat16 (the float32 exponent range; no overflow risk)."""

    dtypes = (QuantizationDtype.BF16, QuantizationDtype.FP16)


class INT8Quantizer(BaseQuantizer):
    """INT8 per-output-channel weights (symmetric by default). ``mode='dynamic'`` or ``'static'``
    also quantizes activations to int8 and runs the int8 x int8 kernel."""

    dtypes = (QuantizationDtype.INT8,)


class INT4Quantizer(BaseQuantizer):
    """INT4 grouped weights (group 32/64/128/256 along in_features), asymmetric with 4-bit zero
    points by default, two values per byte."""

    dtypes = (QuantizationDtype.INT4,)


class BlockQuantizer(BaseQuantizer):
    """Any packed format of the native registry: the GGML block types (``q8_0``, ``q4_K``,
    ``iq4_xs``, ``q2_K``, ``tq2_0``, ...) and ``nf4``. The layers store exactly the bytes a GGUF
    tensor of that type holds (for GGML types), and ``export_gguf`` writes them unchanged.
    Without a dtype in the config it produces ``q4_K``. Formats with ``dtype.takes_importance``
    use an imatrix when given one."""

    dtypes = tuple(sorted((d for d in QuantizationDtype if d.is_packed), key=lambda d: d != QuantizationDtype.Q4_K))


#: One registry: format -> quantizer class (what ``quantize_`` dispatches on).
QUANTIZERS: Dict[QuantizationDtype, Type[BaseQuantizer]] = {
    QuantizationDtype.FP16: FP16Quantizer,
    QuantizationDtype.BF16: BF16Quantizer,
    QuantizationDtype.INT8: INT8Quantizer,
    QuantizationDtype.INT4: INT4Quantizer,
    **{d: BlockQuantizer for d in BlockQuantizer.dtypes},
}


def is_int4_available() -> bool:
    """True: INT4 is implemented natively (no torchao or GPU needed)."""
    return hasattr(_native, "quantize_int4") and hasattr(_native, "linear_int4")
