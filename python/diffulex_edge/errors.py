"""The exception hierarchy. Every error the package raises on bad input is a
:class:`QuantizationError`; each subclass also derives from the matching builtin so that
``except ValueError`` keeps working. Errors carry the offending layer/tensor name in ``.layer``.
The native core maps its error enum onto these classes (``src/python/errors.rs``)."""

from __future__ import annotations

from typing import Optional


class QuantizationError(Exception):
    """Base class for every error diffulex-edge raises on bad input."""

    def __init__(self, message: str, *, layer: Optional[str] = None):
        self.layer = layer
        if layer is not None and not message.startswith(f"layer '{layer}'"):
            message = f"layer '{layer}': {message}"
        super().__init__(message)


class ConfigError(QuantizationError, ValueError):
    """An unknown configuration key or an invalid value."""


class ShapeError(QuantizationError, ValueError):
    """Shapes that do not fit the format (e.g. in_features not divisible by the group size)."""


class NonFiniteWeightError(QuantizationError, ValueError):
    """NaN or Inf in a tensor that is to be quantized."""


class UnsupportedFormatError(QuantizationError, TypeError):
    """A dtype, device, module type or format that is not supported."""


class CorruptFileError(QuantizationError, OSError):
    """A file that cannot be read as what it claims to be."""


__all__ = [
    "ConfigError",
    "CorruptFileError",
    "NonFiniteWeightError",
    "QuantizationError",
    "ShapeError",
    "UnsupportedFormatError",
]
