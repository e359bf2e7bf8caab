"""Calibration: datasets, activation statistics, importance matrices, SmoothQuant, super weights.

>>> from diffulex_edge.calib import CalibrationDataset, compute_imatrix
>>> calib = CalibrationDataset("wiki.valid.txt", tokenizer, n_samples=128, seq_len=256)
>>> im = compute_imatrix(model, calib)
>>> im.save("imatrix.gguf")          # llama.cpp reads it; ImportanceMatrix.load reads llama.cpp's
"""

from .collect import ActivationStats, CollectedStats, collect_stats, linear_names
from .dataset import DEFAULT_SAMPLES, MAX_SAMPLES, MIN_SAMPLES, CalibrationDataset
from .imatrix import ImportanceMatrix, compute_imatrix
from .observers import activation_scales, clip_value
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
