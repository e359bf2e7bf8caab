"""Exporters: GGUF for llama.cpp (:func:`export_gguf`, or :func:`plan_gguf` then :func:`write_gguf`
to inspect or change the per-tensor types before anything is encoded)."""

from .gguf_export import (
    ExportPlan,
    ExportReport,
    PlannedTensor,
    TensorReport,
    export_gguf,
    load_gguf_weights,
    plan_gguf,
    write_gguf,
)
from .gguf_mixes import MIXES

__all__ = ["ExportPlan", "ExportReport", "MIXES", "PlannedTensor", "TensorReport", "export_gguf", "load_gguf_weights",
           "plan_gguf", "write_gguf"]
