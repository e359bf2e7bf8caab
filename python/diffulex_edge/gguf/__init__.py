"""GGUF support: GGML block formats (:mod:`.quants`) and the GGUF v3 container (:mod:`.file`)."""

from .file import GGUFFile, GGUFStreamWriter, GGUFWriter, TensorInfo, ValueType
from .imatrix import load_imatrix
from .quants import GGML_TYPES, GGMLTypeInfo, dequantize, quantize, tensor_nbytes, type_info

__all__ = ["GGML_TYPES", "GGMLTypeInfo", "GGUFFile", "GGUFStreamWriter", "GGUFWriter", "TensorInfo", "ValueType", "dequantize", "load_imatrix",
           "quantize", "tensor_nbytes", "type_info"]
