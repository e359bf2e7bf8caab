"""Read and write llama.cpp importance matrices.

Two on-disk formats (llama.cpp tools/imatrix, read for reference):
* GGUF: ``general.type = "imatrix"``, ``imatrix.datasets`` (strings), ``imatrix.chunk_count``,
  ``imatrix.chunk_size``; per weight ``<name>.in_sum2`` (F32 ``[n_mat, n_per_row]`` in numpy order:
  the sum of x^2 per input column) and ``<name>.counts`` (F32 ``[n_mat, 1]``: tokens seen); the
  importance is ``in_sum2 / counts``.
* legacy ``.dat``: ``int32 n_entries``, then per entry ``int32 len, name, int32 ncall, int32 nval,
  f32[nval]``, then a trailer ``int32 last_chunk, int32 len, dataset name``; the values are the
  mean of x^2 times ``ncall`` and the importance is ``values / ncall`` (as llama-quantize does).

`load_imatrix` returns ``{tensor name: float32 [n_per_row]}`` (for 3-D expert tensors, the mean
over experts); `read_imatrix` keeps sums and counts; `write_imatrix` writes either format.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Union

import numpy as np

from .._io import atomic_write
from ..errors import CorruptFileError
from .file import GGUFFile, GGUFWriter, ValueType

PathLike = Union[str, os.PathLike]


@dataclass
class ImatrixEntry:
    """One weight's accumulated statistics: ``sum_sq / count`` is its importance per column."""

    sum_sq: np.ndarray  # float64 [n_per_row]
    count: float  # tokens (GGUF counts) or calls (legacy .dat, whose values are pre-normalised)
    calls: int = 0


@dataclass
class ImatrixFile:
    entries: Dict[str, ImatrixEntry] = field(default_factory=dict)
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: List[str] = field(default_factory=list)


def _meta_uint(path: str, md: Mapping[str, object], key: str) -> int:
    v = md.get(key, 0)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
        raise CorruptFileError(f"{path}: metadata {key} must be a non-negative integer, got {v!r}")
    return int(v)


def _f32_tensor(path: str, f: GGUFFile, name: str) -> np.ndarray:
    t = f.tensors[name]
    # llama.cpp writes and reads these as F32 only; checking the type also bounds the decoded size
    if t.type_id != 0:
        raise CorruptFileError(f"{path}: imatrix tensor {name} has ggml type {t.ggml_type}, expected F32", layer=name)
    if not 1 <= len(t.shape) <= 2 or 0 in t.shape:
        raise CorruptFileError(f"{path}: imatrix tensor {name} has shape {t.shape}; expected [n_mat, n] "
                               "with no empty dimension", layer=name)
    return f.tensor(name).reshape(-1, t.shape[-1]).astype(np.float64)


def _read_gguf(path: str) -> ImatrixFile:
    f = GGUFFile.read(path)
    md = f.metadata
    datasets = md.get("imatrix.datasets") or []
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise CorruptFileError(f"{path}: metadata imatrix.datasets must be an array of strings, got {datasets!r:.80}")
    out = ImatrixFile(chunk_count=_meta_uint(path, md, "imatrix.chunk_count"),
                      chunk_size=_meta_uint(path, md, "imatrix.chunk_size"), datasets=list(datasets))
    for name in f.tensors:
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        cname = base + ".counts"
        if cname not in f.tensors:
            raise CorruptFileError(f"{path}: {name} has no matching {cname}", layer=name)
        s2 = _f32_tensor(path, f, name)
        counts = _f32_tensor(path, f, cname).reshape(-1)
        if counts.size != s2.shape[0]:
            raise CorruptFileError(f"{path}: {cname} has {counts.size} values for {s2.shape[0]} matrices", layer=cname)
        if not np.all(np.isfinite(counts)) or np.any(counts < 0):
            raise CorruptFileError(f"{path}: {cname} holds a negative or non-finite token count", layer=cname)
        if s2.shape[0] == 1:
            out.entries[base] = ImatrixEntry(s2[0], float(counts[0]), out.chunk_count)
        else:  # experts: keep the mean importance
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(counts[:, None] > 0, s2 / counts[:, None], 0.0)
            out.entries[base] = ImatrixEntry(v.mean(axis=0), 1.0, out.chunk_count)
    return out


def _read_dat(path: str) -> ImatrixFile:
    with open(path, "rb") as fh:
        data = fh.read()
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
    out = ImatrixFile()
    for i in range(n_entries):
        (n,) = struct.unpack("<i", take(4))
        name = take(n).decode("utf-8", errors="replace")
        ncall, nval = struct.unpack("<ii", take(8))
        if nval <= 0:
            raise CorruptFileError(f"{path}: entry {i} ({name!r}) has {nval} values", layer=name)
        if name in out.entries:
            raise CorruptFileError(f"{path}: entry {name!r} appears twice", layer=name)
        vals = np.frombuffer(take(4 * nval), dtype="<f4").astype(np.float64)
        out.entries[name] = ImatrixEntry(vals, float(ncall) if ncall > 0 else 1.0, max(ncall, 0))
    if pos + 4 <= len(data):  # optional trailer: last chunk, dataset name
        (out.chunk_count,) = struct.unpack("<i", take(4))
        if pos + 4 <= len(data):
            (n,) = struct.unpack("<i", take(4))
            if 0 <= n <= len(data) - pos:
                out.datasets = [take(n).decode("utf-8", errors="replace")]
    return out


def read_imatrix(path: PathLike) -> ImatrixFile:
    """Read a llama.cpp imatrix file (GGUF or legacy .dat) keeping sums and counts."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def load_imatrix(path: PathLike) -> Dict[str, np.ndarray]:
    """Load a llama.cpp imatrix (GGUF or legacy .dat) as `{tensor name: importance per column}`."""
    f = read_imatrix(path)
    return {k: (e.sum_sq / e.count if e.count > 0 else e.sum_sq).astype(np.float32) for k, e in f.entries.items()}


def write_imatrix(path: PathLike, imatrix: ImatrixFile, fmt: str = "gguf") -> None:
    """Write `imatrix` as llama.cpp's GGUF imatrix (``fmt="gguf"``) or legacy ``.dat`` (``"dat"``)."""
    if fmt == "dat":
        blob = [struct.pack("<i", len(imatrix.entries))]
        for name, e in imatrix.entries.items():
            ncall = max(int(e.calls), 1)
            # legacy files hold mean(x^2) * ncall (llama.cpp's save_imatrix_legacy)
            vals = (e.sum_sq / (e.count if e.count > 0 else 1.0) * ncall).astype("<f4")
            raw = name.encode("utf-8")
            blob += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, vals.size), vals.tobytes()]
        ds = (imatrix.datasets[0] if imatrix.datasets else "").encode("utf-8")
        blob += [struct.pack("<i", int(imatrix.chunk_count)), struct.pack("<i", len(ds)), ds]
        data = b"".join(blob)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                fh.write(data)

        atomic_write(path, write)
        return
    w = GGUFWriter()
    w.add("general.type", "imatrix")
    w.add("imatrix.datasets", list(imatrix.datasets), (ValueType.ARRAY, ValueType.STRING))
    w.add("imatrix.chunk_count", int(imatrix.chunk_count), ValueType.UINT32)
    w.add("imatrix.chunk_size", int(imatrix.chunk_size), ValueType.UINT32)
    for name, e in imatrix.entries.items():
        w.add_tensor(f"{name}.in_sum2", np.asarray(e.sum_sq, np.float32).reshape(1, -1), "F32")
        w.add_tensor(f"{name}.counts", np.array([[e.count]], np.float32), "F32")
    atomic_write(path, w.write)


def entries_from_means(means: Mapping[str, np.ndarray]) -> ImatrixFile:
    """An `ImatrixFile` holding plain importances (count 1)."""
    return ImatrixFile({k: ImatrixEntry(np.asarray(v, np.float64).reshape(-1), 1.0, 1) for k, v in means.items()})


__all__ = ["ImatrixEntry", "ImatrixFile", "atomic_write", "load_imatrix", "read_imatrix", "write_imatrix"]
