"""Computing importance matrices: per Linear input column, the mean of x^2 over calibration tokens
(the data class and its files are :mod:`diffulex_edge.quant.importance`).

The same quantity llama.cpp's ``llama-imatrix`` computes, saved in both of its file formats so
files move between this project and llama.cpp in either direction. For Hugging Face
Llama/Mistral/Qwen2 models the file uses llama.cpp's tensor names (``blk.0.attn_q.weight``, via
``arch.gguf_tensor_name``); for other models, module names.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

from torch import nn

from ..errors import ConfigError
from ..quant.act_stats import collect_stats, linear_names
from ..quant.calib_data import as_calibration
from ..quant.importance import ImportanceMatrix, PathLike, file_name, resolve_imatrix

__all__ = ["ImportanceMatrix", "compute_imatrix", "file_name", "resolve_imatrix"]

def compute_imatrix(
    model: nn.Module,
    calibration: Any,
    *,
    layers: Optional[List[str]] = None,
    checkpoint_dir: Optional[PathLike] = None,
    dataset_name: str = "",
    show_progress: Optional[bool] = None,
) -> ImportanceMatrix:
    """Mean of x^2 per input column of every Linear layer (or of `layers`) over `calibration`.

    Args:
        calibration: a :class:`CalibrationDataset` or an iterable of model inputs.
        checkpoint_dir: run block by block and checkpoint after each decoder block; a run that was
            interrupted resumes from the last completed block with identical results.
        dataset_name: recorded in the file (``imatrix.datasets``).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    calib = as_calibration(calibration, show_progress)
    names = linear_names(model) if layers is None else list(layers)
    if not names:
        raise ConfigError("the model has no nn.Linear layers to compute an importance matrix for")
    for n in names:
        try:
            m = model.get_submodule(n)
        except AttributeError as e:
            raise ConfigError(f"no module named {n!r} in the model", layer=n) from e
        if not isinstance(m, nn.Linear):
            raise ConfigError(f"expected an nn.Linear, got {type(m).__name__}", layer=n)
    from .offload import offload_of

    if checkpoint_dir is None and offload_of(model) is not None:
        raise ConfigError("this model's decoder blocks are offloaded (load_offloaded): give a checkpoint_dir, so the "
                          "blocks run one at a time, each loaded from the model folder when it is needed")
    if checkpoint_dir is not None:
        from .sequential import run_sequential

        stats = run_sequential(model, calib, names, os.fspath(checkpoint_dir), extra="imatrix", show_progress=show_progress)
    else:
        stats = collect_stats(model, calib, names, desc="imatrix")
    seq = 0
    first = calib[0]
    if hasattr(first, "shape") and len(first.shape) == 2:
        seq = int(first.shape[1])
    return ImportanceMatrix.from_stats(stats.inputs, model, chunk_size=seq, datasets=[dataset_name] if dataset_name else [])
