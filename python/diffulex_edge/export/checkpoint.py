"""Hugging Face checkpoint folders read one tensor at a time (out of core).

A folder holds ``config.json`` and the weights as one ``model.safetensors`` or as shards listed by
``model.safetensors.index.json``. :class:`Checkpoint` parses every shard's header (the
safetensors format: an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the data) and hands out :class:`TensorRef` s; a ref memory-maps
its own byte range only while it is being converted, so reading a model costs the memory of its
largest tensor, not of the model.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import CorruptFileError, UnsupportedFormatError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: safetensors dtype -> (bytes per element, numpy dtype of the stored bits)
_DTYPES = {"F32": (4, np.float32), "F16": (2, np.float16), "BF16": (2, np.uint16), "F64": (8, np.float64)}
#: the largest header safetensors itself accepts (100 MB), so a corrupt length cannot ask for more
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: file, absolute byte offset, dtype (safetensors spelling) and
    shape. Picklable, so it can travel to another process or machine that sees the same path."""

    name: str
    file: str
    offset: int
    dtype: str
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPES[self.dtype][0]

    def load(self) -> np.ndarray:
        """The tensor as float32 in its shape. F32 comes back as a read-only memory map of the
        file (no copy); F16/BF16/F64 are converted into a new array and their map is released."""
        _, stored = _DTYPES[self.dtype]
        if self.numel == 0:
            return np.zeros(self.shape, np.float32)
        try:
            m = np.memmap(self.file, dtype=stored, mode="r", offset=self.offset, shape=self.shape)
        except (OSError, ValueError) as e:  # the file shrank or vanished since its header was read
            raise CorruptFileError(f"{self.file}: tensor {self.name!r}: cannot map its {self.nbytes} bytes ({e})",
                                   layer=self.name) from e
        if self.dtype == "F32":
            return m
        if self.dtype == "BF16":  # bfloat16 is the top half of a float32
            out = np.empty(self.shape, np.uint32)
            np.left_shift(m, 16, out=out, dtype=np.uint32)
            del m
            return out.view(np.float32)
        out = m.astype(np.float32)
        del m
        return out

    def load_torch(self):
        """:meth:`load` as a float32 torch tensor (sharing the memory; read it, do not write it)."""
        return _torch_view(self.load())


def _torch_view(a: np.ndarray):
    """`a` as a torch tensor that is only read from (an F32 tensor is the read-only map of its
    file; torch's warning about non-writable arrays does not apply)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def read_safetensors_header(path: str) -> Tuple[Dict[str, TensorRef], Dict[str, str]]:
    """({name: TensorRef}, __metadata__) of one .safetensors file, every entry checked against the
    file's size; raises :class:`CorruptFileError` naming the file (and tensor) otherwise."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path}: {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CorruptFileError(f"{path}: header length {n} does not fit the file ({size} bytes); "
                                   "the file is truncated or not safetensors")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    refs: Dict[str, TensorRef] = {}
    for name, e in header.items():
        try:
            dtype, shape, (begin, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{path}: tensor {name!r}: malformed header entry {e!r}", layer=name) from None
        if dtype not in _DTYPES:
            raise UnsupportedFormatError(
                f"{path}: tensor {name!r} is {dtype}; checkpoints are read as F32, F16, BF16 or F64 "
                "(dequantize pre-quantized checkpoints with their library first)", layer=name)
        ref = TensorRef(name, path, base + begin, dtype, shape)
        if min(shape, default=1) < 0 or end - begin != ref.nbytes or begin < 0 or base + end > size:
            raise CorruptFileError(f"{path}: tensor {name!r}: bytes {begin}..{end} do not hold a {dtype} "
                                   f"{list(shape)} inside the file's {size - base} data bytes", layer=name)
        refs[name] = ref
    return refs, meta


class Checkpoint(Mapping[str, TensorRef]):
    """The tensors of a Hugging Face model folder, by parameter name (a read-only mapping of
    :class:`TensorRef`), plus its ``config.json`` as a dict. Nothing is loaded until
    :meth:`TensorRef.load`."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder not found: {path}")
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model folder")
        self.path = path
        with open(cfg, encoding="utf-8") as fh:
            self.config_dict = json.load(fh)
        self._refs: Dict[str, TensorRef] = {}
        for shard in self.shards():
            refs, _ = read_safetensors_header(shard)
            for name, ref in refs.items():
                if name in self._refs:
                    raise CorruptFileError(f"{path}: tensor {name!r} is in both {self._refs[name].file} and {shard}",
                                           layer=name)
                self._refs[name] = ref
        index = self._index()
        if index is not None:
            missing = sorted(set(index) - set(self._refs))
            if missing:
                raise CorruptFileError(f"{path}: {INDEX} lists {len(missing)} tensors its shards do not hold, "
                                       f"e.g. {missing[0]!r} (in {index[missing[0]]})", layer=missing[0])

    def _index(self) -> Optional[Dict[str, str]]:
        p = os.path.join(self.path, INDEX)
        if not os.path.isfile(p):
            return None
        try:
            with open(p, encoding="utf-8") as fh:
                wm = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptFileError(f"{p}: not a safetensors index (no weight_map): {e}") from None
        return {str(k): str(v) for k, v in wm.items()}

    def shards(self) -> List[str]:
        """The .safetensors files: those the index names, else model.safetensors, else every
        ``*.safetensors`` of the folder (sorted)."""
        index = self._index()
        if index is not None:
            files = sorted(set(index.values()))
            for f in files:
                if os.path.basename(f) != f:
                    raise CorruptFileError(f"{self.path}/{INDEX}: shard name {f!r} is not a file of the folder")
                if not os.path.isfile(os.path.join(self.path, f)):
                    raise FileNotFoundError(f"{self.path}: shard {f} listed in {INDEX} is missing")
            return [os.path.join(self.path, f) for f in files]
        if os.path.isfile(os.path.join(self.path, SINGLE)):
            return [os.path.join(self.path, SINGLE)]
        found = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not found:
            other = [f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth"))]
            hint = (" It holds PyTorch pickles (" + ", ".join(other[:3]) + "): load the model with transformers "
                    "and save_pretrained(safe_serialization=True), or export it in memory with export_gguf"
                    if other else "")
            raise FileNotFoundError(f"{self.path} has no .safetensors weights.{hint}")
        return [os.path.join(self.path, f) for f in found]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data over all shards."""
        return sum(r.nbytes for r in self._refs.values())

    def __getitem__(self, name: str) -> TensorRef:
        return self._refs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return (f"Checkpoint({self.path!r}: {len(self)} tensors in {len(self.shards())} shard(s), "
                f"{self.nbytes / 2**30:.2f} GiB)")

    def hf_config(self):
        """The folder's transformers config (no weights read)."""
        try:
            import transformers
        except ImportError as e:  # pragma: no cover - transformers is a test dependency
            raise UnsupportedFormatError("reading model folders needs `transformers`: pip install 'diffulex-edge[hf]'") from e
        return transformers.AutoConfig.from_pretrained(self.path, local_files_only=True)

    def skeleton(self):
        """The model built from the config on the ``meta`` device: every module and parameter
        name and shape, no memory for weights."""
        import torch
        import transformers

        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(self.hf_config())


__all__ = ["Checkpoint", "TensorRef", "read_safetensors_header"]
