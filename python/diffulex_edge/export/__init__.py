"""Exporters: GGUF for llama.cpp (:func:`export_gguf`)."""

from .gguf_export import ExportReport, TensorReport, export_gguf, load_gguf_weights
from .gguf_mixes import MIXES

__all__ = ["ExportReport", "MIXES", "TensorReport", "export_gguf", "load_gguf_weights"]
