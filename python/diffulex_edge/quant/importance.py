"""Importance matrices as data: per Linear input column, the mean of x^2 over calibration tokens
(:class:`ImportanceMatrix`), read from and written to llama.cpp's two imatrix file formats, and
the resolution of a quantizer's ``imatrix=`` argument. Computing one from calibration data is
:func:`diffulex_edge.calib.compute_imatrix`.

For Hugging Face Llama/Mistral/Qwen2 models the file uses llama.cpp's tensor names
(``blk.0.attn_q.weight``, via ``arch.gguf_tensor_name``); for other models, module names.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
from torch import nn

from ..arch import detect, gguf_tensor_name
from ..errors import ConfigError
from ..gguf.imatrix import ImatrixEntry, ImatrixFile, read_imatrix, write_imatrix
from .act_stats import linear_names

PathLike = Union[str, os.PathLike]


def file_name(module_name: str, model: Optional[nn.Module]) -> str:
    """The name a layer's entry gets in an imatrix file."""
    if detect(model) is not None:
        g = gguf_tensor_name(module_name + ".weight")
        if g is not None:
            return g
    return module_name


class ImportanceMatrix(Mapping[str, np.ndarray]):
    """Per-layer importances, a read-only mapping ``{module name: float32 [in_features]}``.

    Entries keep the raw sums and counts (``entries``), so matrices merge and round-trip exactly.
    Lookups also accept the llama.cpp tensor name of a layer (``blk.0.ffn_down.weight``) and the
    ``.weight`` parameter name. ``export_gguf(model, ..., imatrix=im)`` and
    ``INT4Quantizer().quantize(model, imatrix=im)`` take it directly.
    """

    def __init__(self, entries: Mapping[str, ImatrixEntry], *, chunk_count: int = 0, chunk_size: int = 0,
                 datasets: Iterable[str] = (), file_names: Optional[Mapping[str, str]] = None) -> None:
        self.entries: Dict[str, ImatrixEntry] = dict(entries)
        self.chunk_count, self.chunk_size, self.datasets = int(chunk_count), int(chunk_size), list(datasets)
        self.file_names: Dict[str, str] = dict(file_names or {n: n for n in self.entries})
        self._alias = {f: n for n, f in self.file_names.items()}
        for n in self.entries:
            self._alias.setdefault(n + ".weight", n)

    # -- mapping ---------------------------------------------------------------------------------
    def _key(self, name: str) -> Optional[str]:
        if name in self.entries:
            return name
        return self._alias.get(name)

    def __getitem__(self, name: str) -> np.ndarray:
        k = self._key(name)
        if k is None:
            raise KeyError(name)
        e = self.entries[k]
        return (e.sum_sq / (e.count if e.count > 0 else 1.0)).astype(np.float32)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"ImportanceMatrix({len(self)} layers, {self.chunk_count} chunks)"

    # -- files -----------------------------------------------------------------------------------
    def to_file(self) -> ImatrixFile:
        return ImatrixFile({self.file_names.get(n, n): e for n, e in self.entries.items()},
                           self.chunk_count, self.chunk_size, self.datasets)

    def save(self, path: PathLike, format: str = "auto") -> None:
        """Write a llama.cpp imatrix file: ``format="gguf"``, ``"dat"`` (legacy), or ``"auto"``
        (``.dat`` suffix -> legacy, anything else GGUF). The write is atomic."""
        fmt = format
        if fmt == "auto":
            fmt = "dat" if os.fspath(path).endswith(".dat") else "gguf"
        if fmt not in ("gguf", "dat"):
            raise ConfigError(f"unknown imatrix format {format!r}; supported: 'auto', 'gguf', 'dat'")
        write_imatrix(path, self.to_file(), fmt)

    @classmethod
    def load(cls, path: PathLike, model: Optional[nn.Module] = None) -> "ImportanceMatrix":
        """Read a llama.cpp imatrix file (GGUF or legacy .dat). With `model`, entries are keyed by
        its module names (llama.cpp tensor names are mapped back); otherwise by the file's names."""
        f = read_imatrix(path)
        names: Dict[str, str] = {}
        if model is not None:
            names = {file_name(n, model): n for n in linear_names(model)}
        entries = {names.get(k, k): e for k, e in f.entries.items()}
        fnames = {names.get(k, k): k for k in f.entries}
        return cls(entries, chunk_count=f.chunk_count, chunk_size=f.chunk_size, datasets=f.datasets, file_names=fnames)

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any], model: Optional[nn.Module], *, chunk_size: int = 0,
                   datasets: Iterable[str] = ()) -> "ImportanceMatrix":
        entries = {n: ImatrixEntry(s.sum_sq.copy(), float(s.tokens), int(s.calls)) for n, s in stats.items() if s.tokens > 0}
        calls = max((e.calls for e in entries.values()), default=0)
        return cls(entries, chunk_count=calls, chunk_size=chunk_size, datasets=datasets,
                   file_names={n: file_name(n, model) for n in entries})


def resolve_imatrix(imatrix: Any, model: Optional[nn.Module] = None) -> Optional[Mapping[str, np.ndarray]]:
    """An imatrix argument as a mapping: an ImportanceMatrix or mapping as is, a path loaded."""
    if imatrix is None or isinstance(imatrix, ImportanceMatrix):
        return imatrix
    if isinstance(imatrix, Mapping):
        if model is None:
            return imatrix
        # a plain mapping may use llama.cpp tensor names or parameter names: key it by module name
        out = dict(imatrix)
        for n in linear_names(model):
            for alias in (file_name(n, model), n + ".weight"):
                if n not in out and alias in imatrix:
                    out[n] = imatrix[alias]
        return out
    if isinstance(imatrix, (str, os.PathLike)):
        return ImportanceMatrix.load(imatrix, model)
    raise ConfigError(f"imatrix must be an ImportanceMatrix, a mapping or a file path, got {type(imatrix).__name__}")
