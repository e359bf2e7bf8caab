"""Saving and loading quantized models (safetensors or torch pickle files).

The file holds the model's full ``state_dict`` plus, as metadata, the spec of every quantized
layer, so ``load_quantized(path, skeleton)`` can turn a freshly built float model into the
quantized one before loading the tensors. Writes go to a temporary file that is renamed into
place, so a failed save never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Union

import torch
from torch import nn

from .. import __version__
from .._io import atomic_write
from ..errors import CorruptFileError, ShapeError, UnsupportedFormatError
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
        from safetensors.torch import save_model

        atomic_write(path, lambda tmp: save_model(model, tmp, metadata={"diffulex_edge": json.dumps(meta)}))
    else:
        payload = {"diffulex_edge": meta, "state_dict": model.state_dict()}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _read_meta_safetensors(path: str) -> Dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("diffulex_edge")
            keys = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    except Exception as e:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({e})") from e
    if raw is None:
        raise CorruptFileError(f"{path}: no diffulex-edge metadata; was it written by save_quantized?")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}: diffulex-edge metadata is not valid JSON ({e})") from e
    meta["_keys"] = keys
    meta["_shapes"] = shapes
    return meta


def load_quantized(path: PathLike, model_skeleton: nn.Module, *, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save_quantized` into `model_skeleton`.

    The skeleton is the float model's architecture (e.g. freshly constructed; its weights are
    overwritten). Every layer recorded as quantized is replaced by an empty
    :class:`QuantizedLinear` of the recorded format, then the tensors are loaded bit-exact.
    Everything is checked before the skeleton is changed; the filled skeleton is returned.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if _is_safetensors(path):
        meta = _read_meta_safetensors(path)
        state = None
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CorruptFileError(f"{path}: not a readable torch archive ({e})") from e
        if not isinstance(payload, dict) or "diffulex_edge" not in payload or "state_dict" not in payload:
            raise CorruptFileError(f"{path}: no diffulex-edge metadata; was it written by save_quantized?")
        meta, state = payload["diffulex_edge"], payload["state_dict"]
        meta["_keys"] = set(state)
        meta["_shapes"] = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    if meta.get("format") != FORMAT_TAG:
        raise CorruptFileError(f"{path}: unknown format tag {meta.get('format')!r}, expected {FORMAT_TAG!r}")

    # validate every recorded layer against the skeleton before changing anything
    replacements = {}
    for name, spec in meta.get("layers", {}).items():
        try:
            target = model_skeleton.get_submodule(name) if name else model_skeleton
        except AttributeError:
            raise ShapeError(f"the file has a quantized layer here but the skeleton has no such module", layer=name)
        if isinstance(target, QuantizedLinear):
            target_shape = (target.in_features, target.out_features)
        elif isinstance(target, nn.Linear):
            target_shape = (target.in_features, target.out_features)
        else:
            raise ShapeError(f"expected nn.Linear in the skeleton, found {type(target).__name__}", layer=name)
        if target_shape != (spec["in_features"], spec["out_features"]):
            raise ShapeError(
                f"skeleton has in/out features {target_shape}, the file has "
                f"{(spec['in_features'], spec['out_features'])}",
                layer=name,
            )
        device = next((t.device for t in target.buffers()), None) if isinstance(target, QuantizedLinear) else target.weight.device
        if device is not None and device.type == "meta":
            device = torch.device("cpu")
        replacements[name] = QuantizedLinear.from_spec(spec, device=device)

    if "" in replacements:
        model = replacements[""]
    else:
        model = model_skeleton
    # check the tensor names would load before swapping modules in (tied tensors: one name
    # of each tied group suffices, as safetensors stores shared tensors once)
    groups = _key_groups(model_skeleton, replacements)
    known = set().union(*groups) if groups else set()
    missing = sorted(min(g) for g in groups if not (g & meta["_keys"]))
    unexpected = sorted(meta["_keys"] - known)
    if strict and (missing or unexpected):
        raise ShapeError(
            f"{path} does not match the skeleton: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    # shape mismatches would only surface in load_state_dict, after modules were swapped and
    # some tensors overwritten: check them first so a failed load leaves the skeleton as it was
    expected = _expected_shapes(model_skeleton, replacements)
    wrong = sorted(k for k in meta["_shapes"].keys() & expected.keys() if meta["_shapes"][k] != expected[k])
    if wrong:
        detail = ", ".join(f"{k}: file {list(meta['_shapes'][k])} vs skeleton {list(expected[k])}" for k in wrong[:5])
        raise ShapeError(f"{path} does not match the skeleton: {detail}{'...' if len(wrong) > 5 else ''}")
    for name, q in replacements.items():
        if name:
            _set_module(model, name, q)
    _materialize_meta(model, meta["_keys"])
    try:
        if state is None:
            from safetensors.torch import load_model

            load_model(model, path, strict=strict, device="cpu")
        else:
            model.load_state_dict(state, strict=strict)
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
            ident = ("meta", id(t)) if t.device.type == "meta" else (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            groups.setdefault(ident, set()).add(k)
    out = list(groups.values())
    for name, q in replacements.items():
        prefix = f"{name}." if name else ""
        out.extend({prefix + k} for k in q.state_dict().keys())
    return out
