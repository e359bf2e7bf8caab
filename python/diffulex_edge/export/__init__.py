"""Exporters: GGUF for llama.cpp (:func:`export_gguf`, or :func:`plan_gguf` then :func:`write_gguf`
to inspect or change the per-tensor types before anything is encoded), and
:func:`export_gguf_checkpoint` for checkpoint folders larger than memory (resumable, optionally on
a Ray cluster)."""

from .checkpoint import Checkpoint, TensorRef
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
from .stream import export_gguf_checkpoint, plan_gguf_checkpoint, write_gguf_resumable

__all__ = ["Checkpoint", "ExportPlan", "ExportReport", "MIXES", "PlannedTensor", "TensorReport", "TensorRef",
           "export_gguf", "export_gguf_checkpoint", "load_gguf_weights", "plan_gguf", "plan_gguf_checkpoint",
           "write_gguf", "write_gguf_resumable"]
