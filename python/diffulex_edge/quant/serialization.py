"""Saving and loading quantized models (safetensors or torch pickle files).

The file holds the model's full ``state_dict`` plus, as metadata, the spec of every quantized
layer, so ``load_quantized(path, skeleton)`` can turn a freshly built float model into the
quantized one before loading the tensors. Writes go to a temporary file that is renamed into
place, so a failed save never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .. import __version__
from .._io import atomic_write
from ..errors import ConfigError, CorruptFileError, ShapeError, UnsupportedFormatError
from .nn import QuantizedLinear
from .walk import _set_module

FORMAT_TAG = "diffulex-edge/quantized-model/1"
PathLike = Union[str, os.PathLike]


def _is_safetensors(path: PathLike) -> bool:
    return os.fspath(path).endswith(".safetensors")


def save_quantized(model: nn.Module, path: PathLike) -> None:
    """Write `model` (quantized or not) to `path`: ``.safetensors`` -> safetensors, anything else
    -> a ``torch.save`` archive. Tied tensors are stored once."""
    if not isinstance(model, nn.Module):
        raise UnsupportedFormatError(f"expected a torch.nn.Module, got {type(model).__name__}")
    specs = {n: m.spec() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    meta = {"format": FORMAT_TAG, "version": __version__, "layers": specs}
    if _is_safetensors(path):
        tensors, aliases = _unique_tensors(model.state_dict())
        metadata = {**aliases, "diffulex_edge": json.dumps(meta)}
        atomic_write(path, lambda tmp: _write_safetensors(tmp, tensors, metadata))
    else:
        payload = {"diffulex_edge": meta, "state_dict": model.state_dict()}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))


# torch dtype -> safetensors dtype tag (the safetensors format: https://github.com/huggingface/safetensors,
# "Format": 8-byte little-endian header size N, N bytes of JSON, then the tensors' bytes)
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
for _name, _tag in [("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"),
                    ("uint64", "U64")]:
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _tag


def _unique_tensors(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The state dict with each set of identical views (tied weights) kept once, under its first
    name in sorted order, and {dropped name: kept name} (what safetensors' ``save_model`` records
    too). Tensors that overlap without being the same view are stored separately."""
    kept: Dict[tuple, str] = {}
    out: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    for name in sorted(state):
        view = _view_key(state[name])
        if view in kept:
            aliases[name] = kept[view]
        else:
            kept[view] = name
            out[name] = state[name]
    return out, aliases


def _view_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors that are the same view of the same memory (tied weights). A tensor
    with no memory to share (on the meta device, or empty) is only equal to itself."""
    if t.device.type == "meta" or t.numel() == 0:
        return ("self", id(t))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def safetensors_header(tensors: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]],
                       metadata: Dict[str, str]) -> Tuple[bytes, List[str]]:
    """(header bytes with the length prefix's payload, tensor order) of a safetensors file of
    `tensors` (name -> (dtype, shape)) as :func:`save_quantized` lays it out: largest items first
    (so every tensor's data is aligned to its item size, as safetensors does), then by name."""
    order: List[str] = sorted(tensors, key=lambda n: (-tensors[n][0].itemsize, n))
    header: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        dtype, shape = tensors[name]
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned
    return raw, order


def _write_safetensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Stream `tensors` to `path` as a safetensors file, one tensor in memory at a time (on the
    CPU, contiguous). Written here rather than by ``safetensors.torch.save_model`` because that one
    makes its own sibling temporary file and renames it, which a kill -9 leaves behind, and it
    needs the whole state dict contiguous in memory at once."""
    if sys.byteorder != "little":
        raise UnsupportedFormatError("safetensors files are little-endian; save_quantized to a .pt file on this machine")
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise UnsupportedFormatError(f"tensor {name!r}: dtype {t.dtype} has no safetensors type; save to a .pt file")
    raw, order = safetensors_header({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, metadata)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in order:
            t = tensors[name]
            if t.numel():
                fh.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)


_META_KEYS = ("format", "version", "layers")


def _corrupt(path: str, what: str, *, layer: Optional[str] = None) -> CorruptFileError:
    return CorruptFileError(f"{path}: {what}", layer=layer)


def _read_safetensors(path: str, tensors: bool = True) -> Tuple[Any, Dict[str, Any]]:
    """(metadata as parsed JSON, tensors) of a safetensors file (with ``tensors=False``, tensor
    names -> shapes from the header); every failure is CorruptFileError."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("diffulex_edge")
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise _corrupt(path, f"not a readable safetensors file ({e})") from e
    if raw is None:
        raise _corrupt(path, "no diffulex-edge metadata (key 'diffulex_edge'); was it written by save_quantized?")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _corrupt(path, f"metadata key 'diffulex_edge' is not valid JSON ({e})") from e
    if not tensors:
        return meta, shapes
    try:  # safetensors checks every tensor's extent against the file before reading it
        state = load_file(path, device="cpu")
    except Exception as e:
        raise _corrupt(path, f"tensor data unreadable ({e})") from e
    return meta, state


def _read_archive(path: str) -> Tuple[Any, Dict[str, torch.Tensor]]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _corrupt(path, f"not a readable torch archive ({e})") from e
    if not isinstance(payload, dict) or "diffulex_edge" not in payload or "state_dict" not in payload:
        raise _corrupt(path, "no diffulex-edge metadata (keys 'diffulex_edge', 'state_dict'); was it written by save_quantized?")
    state = payload["state_dict"]
    if not isinstance(state, dict):
        raise _corrupt(path, f"key 'state_dict': expected a dict of tensors, got {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise _corrupt(path, f"key 'state_dict': entry {k!r} is a {type(v).__name__}, expected a tensor")
    return payload["diffulex_edge"], state


def _check_meta(path: str, meta: Any) -> Dict[str, Dict[str, Any]]:
    """The metadata schema: {format: FORMAT_TAG, version: str, layers: {module name: spec}}.
    Returns the (validated) layer specs."""
    if not isinstance(meta, dict):
        raise _corrupt(path, f"diffulex-edge metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_TAG:
        raise _corrupt(path, f"key 'format': unknown format tag {meta.get('format')!r}, expected {FORMAT_TAG!r}")
    version = meta.get("version", "")
    if not isinstance(version, str):
        raise _corrupt(path, f"key 'version': expected a string, got {version!r}")
    unknown = sorted(str(k) for k in meta if k not in _META_KEYS)
    if unknown:
        raise _corrupt(path, f"key {unknown[0]!r}: not part of the metadata (written by diffulex-edge {version or '?'}; "
                             f"this is {__version__}, which knows {', '.join(_META_KEYS)})")
    layers = meta.get("layers", {})
    if not isinstance(layers, dict):
        raise _corrupt(path, f"key 'layers': expected an object of layer specs, got {type(layers).__name__}")
    for name, spec in layers.items():
        try:
            QuantizedLinear.check_spec(spec)
        except ConfigError as e:
            raise _corrupt(path, f"key 'layers.{name}': {e}", layer=name) from None
    return layers


def read_quantized_metadata(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, tuple]]:
    """The checked metadata of a :func:`save_quantized` file (``format``, ``version``, ``layers``:
    module name -> spec) and its tensor names -> shapes, without building a model (a safetensors
    file's tensors are not even read). Bad files raise :class:`CorruptFileError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if _is_safetensors(path):
        meta, shapes = _read_safetensors(path, tensors=False)
    else:
        meta, state = _read_archive(path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    _check_meta(path, meta)
    return meta, shapes


def load_quantized(path: PathLike, model_skeleton: nn.Module, *, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save_quantized` into `model_skeleton`.

    The skeleton is the float model's architecture (e.g. freshly constructed; its weights are
    overwritten). Every layer recorded as quantized is replaced by a :class:`QuantizedLinear` of
    the recorded format, then the tensors are loaded bit-exact. The file's metadata is checked
    as a schema (keys, types, values) and every quantized layer's tensors against the shapes,
    dtypes and value ranges of its format before anything is allocated for it or the skeleton
    is changed: a bad file raises :class:`CorruptFileError` naming the file and the key, a
    file that does not fit the skeleton :class:`ShapeError`. The filled skeleton is returned.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    meta, state = (_read_safetensors if _is_safetensors(path) else _read_archive)(path)
    layers = _check_meta(path, meta)

    # validate every recorded layer against the skeleton and the file before changing anything;
    # the layers are built on the meta device (no memory) until everything has passed
    replacements: Dict[str, QuantizedLinear] = {}
    devices: Dict[str, Optional[torch.device]] = {}
    for name, spec in layers.items():
        args = QuantizedLinear.check_spec(spec)
        try:
            target = model_skeleton.get_submodule(name) if name else model_skeleton
        except AttributeError:
            raise ShapeError("the file has a quantized layer here but the skeleton has no such module", layer=name) from None
        if not isinstance(target, (nn.Linear, QuantizedLinear)):
            raise ShapeError(f"expected nn.Linear in the skeleton, found {type(target).__name__}", layer=name)
        target_shape = (target.in_features, target.out_features)
        if target_shape != (args["in_features"], args["out_features"]):
            raise ShapeError(
                f"skeleton has in/out features {target_shape}, the file has {(args['in_features'], args['out_features'])}",
                layer=name,
            )
        device = next((t.device for t in target.buffers()), None) if isinstance(target, QuantizedLinear) else target.weight.device
        devices[name] = torch.device("cpu") if device is not None and device.type == "meta" else device
        q = QuantizedLinear.from_spec(spec, device="meta")
        prefix = f"{name}." if name else ""
        try:
            q.check_state({k: state[prefix + k] for k in q.state_dict() if prefix + k in state})
        except ConfigError as e:
            raise _corrupt(path, f"layer {name!r}: {e}", layer=name) from None
        replacements[name] = q

    model = replacements[""] if "" in replacements else model_skeleton
    # check the tensor names would load before swapping modules in (tied tensors: one name
    # of each tied group suffices, as safetensors stores shared tensors once)
    keys = set(state)
    groups = _key_groups(model_skeleton, replacements)
    known = set().union(*groups) if groups else set()
    missing = sorted(min(g) for g in groups if not (g & keys))
    unexpected = sorted(keys - known)
    if strict and (missing or unexpected):
        raise ShapeError(
            f"{path} does not match the skeleton: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    # shape mismatches would only surface in load_state_dict, after modules were swapped and
    # some tensors overwritten: check them first so a failed load leaves the skeleton as it was
    expected = _expected_shapes(model_skeleton, replacements)
    wrong = sorted(k for k in keys & expected.keys() if tuple(state[k].shape) != expected[k])
    if wrong:
        detail = ", ".join(f"{k}: file {list(state[k].shape)} vs skeleton {list(expected[k])}" for k in wrong[:5])
        raise ShapeError(f"{path} does not match the skeleton: {detail}{'...' if len(wrong) > 5 else ''}")
    for name in replacements:
        replacements[name] = QuantizedLinear.from_spec(layers[name], device=devices[name])
    model = replacements[""] if "" in replacements else model_skeleton
    for name, q in replacements.items():
        if name:
            _set_module(model, name, q)
    _materialize_meta(model, keys)
    try:  # names were checked above, with tied groups stored once (which strict=True would reject)
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ShapeError(f"{path}: tensors do not fit the skeleton ({e})") from e
    return model


def _materialize_meta(model: nn.Module, file_keys: set) -> None:
    """Give meta-device tensors that the file will fill real (uninitialized) CPU storage, as
    copying into a meta tensor is a silent no-op. Shared tensors stay shared; tensors the file
    does not hold (e.g. non-persistent buffers) stay on meta rather than become garbage."""
    loaded = {id(t) for k, t in model.state_dict(keep_vars=True).items() if k in file_keys}
    new: Dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for key, t in list(store.items()):
                if t is None or not t.is_meta or id(t) not in loaded:
                    continue
                if id(t) not in new:
                    e = torch.empty_like(t, device="cpu")
                    new[id(t)] = nn.Parameter(e, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else e
                store[key] = new[id(t)]


def _expected_shapes(skeleton: nn.Module, replacements: Dict[str, QuantizedLinear]) -> Dict[str, tuple]:
    """Shape of every state-dict entry the loaded model will have."""
    shapes: Dict[str, tuple] = {}
    if "" not in replacements:
        for k, t in skeleton.state_dict(keep_vars=True).items():
            if not any(n and k.startswith(n + ".") for n in replacements):
                shapes[k] = tuple(t.shape)
    for name, q in replacements.items():
        prefix = f"{name}." if name else ""
        shapes.update({prefix + k: tuple(t.shape) for k, t in q.state_dict().items()})
    return shapes


def _key_groups(skeleton: nn.Module, replacements: Dict[str, QuantizedLinear]) -> list:
    """State-dict keys the loaded model will have, grouped by shared storage."""
    groups: Dict[Any, set] = {}
    if "" not in replacements:
        for k, t in skeleton.state_dict(keep_vars=True).items():
            if any(n and k.startswith(n + ".") for n in replacements):
                continue
            groups.setdefault(_view_key(t), set()).add(k)
    out = list(groups.values())
    for name, q in replacements.items():
        prefix = f"{name}." if name else ""
        out.extend({prefix + k} for k in q.state_dict().keys())
    return out
