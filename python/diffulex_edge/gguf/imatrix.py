"""Read llama.cpp importance matrices for GGUF quantization.

Two on-disk formats (llama.cpp tools/imatrix, read for reference):
* GGUF: per weight `<name>.in_sum2` (F32 `[n_mat, n_per_row]` in numpy order) and `<name>.counts`
  (F32, one per matrix); the importance is `in_sum2 / counts`.
* legacy `.dat`: `int32 n_entries`, then per entry `int32 len, name, int32 ncall, int32 nval,
  f32[nval]`, then a trailer (ignored); the importance is `values / ncall` (as llama-quantize does).

Both return `{tensor name: float32 [n_per_row]}` (for 3-D expert tensors, the mean over experts).
"""

from __future__ import annotations

import os
import struct
from typing import Dict, Union

import numpy as np

from ..errors import CorruptFileError
from .file import GGUFFile


def _load_gguf(path: str) -> Dict[str, np.ndarray]:
    f = GGUFFile.read(path)
    out: Dict[str, np.ndarray] = {}
    for name in f.tensors:
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        s2 = f.tensor(name).reshape(-1, f.tensors[name].shape[-1])
        cname = base + ".counts"
        if cname not in f.tensors:
            raise CorruptFileError(f"{path}: {name} has no matching {cname}")
        counts = f.tensor(cname).reshape(-1)
        if counts.size != s2.shape[0]:
            raise CorruptFileError(f"{path}: {cname} has {counts.size} values for {s2.shape[0]} matrices")
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(counts[:, None] > 0, s2 / counts[:, None], 0.0)
        out[base] = v.mean(axis=0).astype(np.float32)
    return out


def _load_dat(path: str) -> Dict[str, np.ndarray]:
    data = open(path, "rb").read()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise CorruptFileError(f"{path}: truncated imatrix (.dat) at byte {pos}")
        b = data[pos: pos + n]
        pos += n
        return b

    (n_entries,) = struct.unpack("<i", take(4))
    if n_entries < 0 or n_entries * 12 > len(data):
        raise CorruptFileError(f"{path}: implausible entry count {n_entries}")
    out: Dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (n,) = struct.unpack("<i", take(4))
        name = take(n).decode("utf-8", errors="replace")
        ncall, nval = struct.unpack("<ii", take(8))
        vals = np.frombuffer(take(4 * nval), dtype="<f4").astype(np.float32)
        out[name] = vals / ncall if ncall > 0 else vals
    return out


def load_imatrix(path: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """Load a llama.cpp imatrix (GGUF or legacy .dat) as `{tensor name: importance per column}`."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return _load_gguf(path) if magic == b"GGUF" else _load_dat(path)


__all__ = ["load_imatrix"]
