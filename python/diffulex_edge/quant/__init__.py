"""The quantization API.

>>> from diffulex_edge.quant import INT4Quantizer, QuantizationConfig, QuantizationDtype
>>> result = INT4Quantizer().quantize(model, QuantizationConfig(dtype=QuantizationDtype.INT4, group_size=64))
>>> result.model, result.compression_ratio

Quantizers never modify the model they are given unless ``inplace=True``.
"""

from ..errors import (
    ConfigError,
    CorruptFileError,
    NonFiniteWeightError,
    QuantizationError,
    ShapeError,
    UnsupportedFormatError,
)
from .api import dequantize_model, get_quantization_info, quantize_, quantize_model_ptq
from .calib_data import CalibrationDataset
from .config import INT4_GROUP_SIZES, PACKED_FORMATS, QuantizationConfig, QuantizationDtype
from .importance import ImportanceMatrix
from .nn import QuantizedLinear
from .out_of_core import quantize_checkpoint
from .profile import PRESETS, DynamicQuantizationProfile, LayerQuantizationConfig, apply_profile
from .quantizers import (
    QUANTIZERS,
    BaseQuantizer,
    BF16Quantizer,
    BlockQuantizer,
    FP16Quantizer,
    INT4Quantizer,
    INT8Quantizer,
    is_int4_available,
)
from .result import LayerRecord, QuantizationResult
from .serialization import load_quantized, read_quantized_metadata, save_quantized
from .walk import model_size_bytes

__all__ = [
    "DynamicQuantizationProfile",
    "LayerQuantizationConfig",
    "PRESETS",
    "apply_profile",
    "BF16Quantizer",
    "BaseQuantizer",
    "CalibrationDataset",
    "BlockQuantizer",
    "ConfigError",
    "CorruptFileError",
    "FP16Quantizer",
    "INT4Quantizer",
    "INT4_GROUP_SIZES",
    "INT8Quantizer",
    "ImportanceMatrix",
    "LayerRecord",
    "NonFiniteWeightError",
    "PACKED_FORMATS",
    "QUANTIZERS",
    "QuantizationConfig",
    "QuantizationDtype",
    "QuantizationError",
    "QuantizationResult",
    "QuantizedLinear",
    "ShapeError",
    "UnsupportedFormatError",
    "dequantize_model",
    "get_quantization_info",
    "is_int4_available",
    "load_quantized",
    "read_quantized_metadata",
    "model_size_bytes",
    "quantize_",
    "quantize_checkpoint",
    "quantize_model_ptq",
    "save_quantized",
]
