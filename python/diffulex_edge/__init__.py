"""diffulex-edge: quantize PyTorch models for edge and CPU deployment, with a Rust core.

Start with :mod:`diffulex_edge.quant`::

    from diffulex_edge.quant import INT4Quantizer, QuantizationConfig, QuantizationDtype
    result = INT4Quantizer().quantize(model, QuantizationConfig(dtype=QuantizationDtype.INT4, group_size=64))
    print(result)
"""

from . import _native
from .errors import (
    ConfigError,
    CorruptFileError,
    NonFiniteWeightError,
    QuantizationError,
    ShapeError,
    UnsupportedFormatError,
)

__version__ = _native.__version__


def kernel_info() -> dict:
    """CPU features the native kernels detected, the kernel level in use and the thread count."""
    return dict(_native.kernel_info())


__all__ = [
    "ConfigError",
    "CorruptFileError",
    "NonFiniteWeightError",
    "QuantizationError",
    "ShapeError",
    "UnsupportedFormatError",
    "__version__",
    "kernel_info",
]
