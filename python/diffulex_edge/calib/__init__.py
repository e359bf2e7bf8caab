"""Calibration: datasets, activation statistics, importance matrices, SmoothQuant, super weights.

The data a quantizer consumes (calibration datasets, activation statistics and observers,
ImportanceMatrix) lives in :mod:`diffulex_edge.quant` (which never imports this package) and is
re-exported here; this package holds the analyses built on quantization (computing imatrices,
SmoothQuant, super weights, block-sequential runs).

>>> from diffulex_edge.calib import CalibrationDataset, compute_imatrix
>>> calib = CalibrationDataset("wiki.valid.txt", tokenizer, n_samples=128, seq_len=256)
>>> im = compute_imatrix(model, calib)
>>> im.save("imatrix.gguf")          # llama.cpp reads it; ImportanceMatrix.load reads llama.cpp's
"""

from ..quant.act_stats import ActivationStats, CollectedStats, collect_stats, linear_names
from ..quant.calib_data import DEFAULT_SAMPLES, MAX_SAMPLES, MIN_SAMPLES, CalibrationDataset
from ..quant.importance import ImportanceMatrix
from ..quant.observers import activation_scales, clip_value
from .imatrix import compute_imatrix
from .offload import load_offloaded
from .smoothquant import (
    SmoothedGroup,
    SmoothQuantConfig,
    SmoothQuantReport,
    conv1d_to_linear,
    smooth_model,
    smoothquant_w8a8,
)
from .super_weights import SuperWeight, SuperWeights, find_super_weights, outlier_weights, protect_table

__all__ = [
    "ActivationStats",
    "load_offloaded",
    "CalibrationDataset",
    "CollectedStats",
    "DEFAULT_SAMPLES",
    "ImportanceMatrix",
    "SmoothQuantConfig",
    "SmoothQuantReport",
    "SmoothedGroup",
    "SuperWeight",
    "SuperWeights",
    "find_super_weights",
    "outlier_weights",
    "protect_table",
    "activation_scales",
    "clip_value",
    "conv1d_to_linear",
    "smooth_model",
    "smoothquant_w8a8",
    "MAX_SAMPLES",
    "MIN_SAMPLES",
    "collect_stats",
    "compute_imatrix",
    "linear_names",
]
