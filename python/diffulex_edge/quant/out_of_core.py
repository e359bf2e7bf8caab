"""Quantize a checkpoint folder larger than memory to diffulex-edge's quantized safetensors.

:func:`quantize_checkpoint` never holds the model: it plans the layers on a ``meta``-device
skeleton (the checks of :func:`~.walk.plan_layers`), then reads one tensor at a time from the
checkpoint (:class:`~diffulex_edge.export.checkpoint.Checkpoint`), quantizes each planned
``nn.Linear`` exactly as ``quantize_`` does (:meth:`QuantizedLinear.from_linear`), and appends
the resulting tensors to a staging file. A journal records each finished unit (a layer or a
plain tensor) after its bytes are fsynced, so an interrupted run resumes after the last one. At
the end the staging data is laid out as :func:`~.serialization.save_quantized` lays out the same
model (header, tensor order, tied-weight aliases, metadata) into ``quantized.safetensors``, written
atomically; the folder then loads with :func:`diffulex_edge.hf.load_model` like one written by
``diffulex-quant quantize``, and its bytes equal those of the in-memory path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import __version__
from .._io import atomic_write
from .._progress import byte_progress
from ..errors import ConfigError
from .config import QuantizationConfig, QuantizationDtype
from .nn import QuantizedLinear
from .result import LayerRecord, QuantizationResult
from .serialization import _ST_DTYPES, FORMAT_TAG, safetensors_header
from .walk import check_weight_values, layer_format, model_size_bytes, plan_layers

log = logging.getLogger(__name__)

STAGING = ".quantized.safetensors.partial"
JOURNAL_FORMAT = "diffulex-edge/quantize-partial/1"
_DTYPE_OF_TAG = {v: k for k, v in _ST_DTYPES.items()}


def _config(config: Union[QuantizationConfig, str, dict]) -> QuantizationConfig:
    from .profile import PRESETS, DynamicQuantizationProfile

    if isinstance(config, DynamicQuantizationProfile) or (isinstance(config, str) and (
            config in PRESETS or config.lower().endswith((".yaml", ".yml", ".json")))):
        raise ConfigError("quantize_checkpoint takes one format (a QuantizationConfig or scheme); for a per-layer "
                          "plan, load the model (quantize_) or export GGUF out of core (export_gguf_checkpoint(..., "
                          "profile=...))")
    if isinstance(config, str):
        cfg = QuantizationConfig.from_scheme(config)
    else:
        cfg = config if isinstance(config, QuantizationConfig) else QuantizationConfig.from_dict(config)
    if cfg.dtype is None:
        raise ConfigError(f"the config has no dtype; set one of {', '.join(d.value for d in QuantizationDtype)}")
    if cfg.mode == "static":
        raise ConfigError("mode='static' calibrates activation scales by running the model; quantize the loaded model "
                          "(quantize_) instead, or use mode='dynamic' / 'weight_only' out of core")
    return cfg


class _Staging:
    """Append-only data file + journal of finished units (resumable)."""

    def __init__(self, out_dir: str, fingerprint: str, resume: bool):
        self.data = os.path.join(out_dir, STAGING)
        self.journal = self.data + ".json"
        self.units: Dict[str, dict] = {}
        end = 0
        if resume and os.path.isfile(self.data) and os.path.isfile(self.journal):
            with open(self.journal, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
            try:
                head = json.loads(lines[0]) if lines else {}
            except json.JSONDecodeError:
                head = {}
            if head.get("format") == JOURNAL_FORMAT and head.get("fingerprint") == fingerprint:
                for line in lines[1:]:
                    try:
                        u = json.loads(line)
                        self.units[u["unit"]] = u
                        end = max([end] + [t[3] + t[4] for t in u["tensors"]])
                    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                        continue  # a record torn by a crash: that unit is redone
            else:
                log.warning("%s belongs to another run (model, config or imatrix differ); starting over", self.data)
        if self.units and os.path.getsize(self.data) >= end:
            log.info("resuming %s: %d units already quantized", self.data, len(self.units))
            self.fh = open(self.data, "r+b")
            self.fh.truncate(end)  # anything after the last recorded unit is from the interrupted one
            self.fh.seek(end)
            self.jfh = open(self.journal, "a", encoding="utf-8")
        else:
            self.units = {}
            self.fh = open(self.data, "w+b")
            self.jfh = open(self.journal, "w", encoding="utf-8")
            self._record({"format": JOURNAL_FORMAT, "fingerprint": fingerprint})

    def _record(self, obj: dict) -> None:
        self.jfh.write(json.dumps(obj) + "\n")
        self.jfh.flush()
        os.fsync(self.jfh.fileno())

    def add(self, unit: str, tensors: List[Tuple[str, torch.Tensor]], extra: dict) -> dict:
        rows = []
        for name, t in tensors:
            t = t.detach().to("cpu").contiguous()
            off = self.fh.tell()
            if t.numel():
                self.fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
            rows.append([name, _ST_DTYPES[t.dtype], list(t.shape), off, t.numel() * t.element_size()])
        self.fh.flush()
        os.fsync(self.fh.fileno())
        u = {"unit": unit, "tensors": rows, **extra}
        self._record(u)
        self.units[unit] = u
        return u

    def close(self) -> None:
        self.fh.close()
        self.jfh.close()

    def discard(self) -> None:
        self.close()
        for p in (self.data, self.journal):
            if os.path.exists(p):
                os.unlink(p)


def _fingerprint(ckpt, cfg: QuantizationConfig, plan_names: List[str], importance) -> str:
    h = hashlib.sha256(f"{__version__}|{json.dumps(cfg.to_dict(), sort_keys=True, default=str)}|".encode())
    for name in sorted(ckpt):
        r = ckpt[name]
        h.update(f"{name}:{r.dtype}:{r.shape}:{os.path.basename(r.file)}:{r.offset};".encode())
    h.update("|".join(plan_names).encode())
    if importance is not None:
        for n in plan_names:
            if n in importance:
                h.update(n.encode() + np.ascontiguousarray(np.asarray(importance[n], np.float32)).tobytes())
    return h.hexdigest()


def quantize_checkpoint(model_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                        config: Union[QuantizationConfig, str, dict], *, imatrix: Any = None, resume: bool = True,
                        show_progress: Optional[bool] = None) -> QuantizationResult:
    """Quantize the Hugging Face folder `model_dir` (safetensors) into `out_dir` with one tensor in
    memory at a time: ``out_dir/quantized.safetensors`` plus the folder's config and tokenizer
    files and ``quantization.json``, the same files ``diffulex-quant quantize`` writes.

    config: a :class:`QuantizationConfig`, its dict or a scheme name (weight-only or dynamic
    activation modes; static needs the model run on calibration data). imatrix: as ``quantize_``.
    resume: continue an interrupted run found in `out_dir` (its staging file and journal); False
    starts over. Returns the :class:`QuantizationResult` without a model (``model`` is None: load
    the folder with :func:`diffulex_edge.hf.load_model`)."""
    from .. import hf
    from ..export.checkpoint import Checkpoint
    from .importance import resolve_imatrix

    t0 = time.perf_counter()
    cfg = _config(config)
    model_dir, out_dir = os.fspath(model_dir), os.fspath(out_dir)
    if os.path.abspath(out_dir) == os.path.abspath(model_dir):
        raise ConfigError("the output folder must differ from the model folder (the original would be overwritten)")
    ckpt = Checkpoint(model_dir)
    model = ckpt.skeleton()
    plan = plan_layers(model, cfg, weights_later=True)
    importance = None
    if imatrix is not None or cfg.imatrix is not None:
        if not cfg.dtype.takes_importance:
            raise ConfigError(f"dtype {cfg.dtype} does not use an imatrix")
        importance = resolve_imatrix(imatrix if imatrix is not None else cfg.imatrix, model)
    planned = dict(plan.layers)
    os.makedirs(out_dir, exist_ok=True)
    staging = _Staging(out_dir, _fingerprint(ckpt, cfg, list(planned), importance), resume)
    fmt = layer_format(cfg)
    # tied parameters (e.g. lm_head <-> embed_tokens): one tensor in the file, the other an alias
    owners: Dict[int, List[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    tied_to = {n: sorted(ns) for ns in owners.values() if len(ns) > 1 for n in ns}
    units: List[Tuple[str, Optional[str]]] = []  # (unit name, planned layer or None)
    seen_layers = set()
    for key in model.state_dict():
        owner = key.rpartition(".")[0]
        if owner in planned:
            if owner not in seen_layers:
                seen_layers.add(owner)
                units.append((owner, owner))
        else:
            units.append((key, None))
    def src_bytes(unit: str, layer: Optional[str]) -> int:
        keys = [f"{layer}.weight", f"{layer}.bias"] if layer else [unit]
        return sum(ckpt[k].nbytes for k in keys if k in ckpt)

    sizes = [src_bytes(u, layer) for u, layer in units]
    bar = byte_progress(sum(sizes), f"quantize {fmt}", show_progress)
    try:
        for (unit, layer), nbytes in zip(units, sizes):
            if unit in staging.units:
                bar.update(nbytes)
                continue
            if layer is None:
                first = tied_to.get(unit, [unit])[0]
                if first != unit and first.rpartition(".")[0] not in planned:
                    bar.update(nbytes)
                    continue  # tied to `first`, which is stored: an alias in the file
                src = unit if unit in ckpt else next((n for n in tied_to.get(unit, []) if n in ckpt), None)
                if src is None:
                    raise ConfigError(f"{model_dir}: the checkpoint has no tensor {unit!r}", layer=unit)
                staging.add(unit, [(unit, ckpt[src].load_torch().to(torch.float32))], {})
                bar.update(nbytes)
                continue
            lin = _load_linear(ckpt, layer, planned[layer])
            check_weight_values(lin.weight, cfg, layer)
            imp = importance[layer] if (importance is not None and layer in importance) else None
            q = QuantizedLinear.from_linear(
                lin, cfg.dtype, group_size=cfg.group_size, symmetric=cfg.resolved_symmetric, act_mode=cfg.mode,
                kernel=cfg.kernel, name=layer, importance=imp, on_indivisible="pad" if layer in plan.padded else "error")
            w = lin.weight.detach()
            err = float((q.dequantize_weight() - w).norm() / w.norm().clamp_min(torch.finfo(torch.float32).tiny))
            orig = sum(t.numel() * t.element_size() for t in (lin.weight, lin.bias) if t is not None)
            rec = LayerRecord(layer, lin.in_features, lin.out_features, "float32", fmt, orig, q.storage_bytes(), err,
                              layer in plan.padded)
            staging.add(unit, [(f"{layer}.{k}", v) for k, v in q.state_dict().items()],
                        {"spec": q.spec(), "record": rec.to_dict()})
            bar.update(nbytes)
            del lin, q, w
        result = _assemble(staging, model, out_dir, cfg, plan, tied_to, t0)
    except BaseException as e:
        bar.close()
        from ..errors import QuantizationError

        if isinstance(e, QuantizationError):
            staging.discard()  # bad data: a rerun would fail the same way
        else:
            staging.close()
            log.warning("quantize_checkpoint interrupted: %d of %d units are in %s; rerun to resume",
                        len(staging.units), len(units), staging.data)
        raise
    bar.close()
    staging.discard()
    hf.copy_model_files(model_dir, out_dir)
    info = result.to_dict()
    info["out_of_core"] = True

    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)

    atomic_write(os.path.join(out_dir, hf.QUANTIZATION_INFO), dump)
    return result


def _load_linear(ckpt, name: str, meta: nn.Linear) -> nn.Linear:
    """The nn.Linear `name` with its weights from the checkpoint, in float32 (as load_model gives)."""
    lin = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
    lin.to_empty(device="cpu")
    with torch.no_grad():
        for k in ("weight", "bias"):
            if getattr(lin, k) is None:
                continue
            ref = ckpt.get(f"{name}.{k}")
            if ref is None:
                raise ConfigError(f"{ckpt.path}: the checkpoint has no tensor {name}.{k!r}", layer=name)
            if tuple(ref.shape) != tuple(getattr(lin, k).shape):
                raise ConfigError(f"{ckpt.path}: {name}.{k} is {list(ref.shape)}, the config makes it "
                                  f"{list(getattr(lin, k).shape)}", layer=name)
            getattr(lin, k).copy_(ref.load_torch())
    return lin


def _assemble(staging: _Staging, model: nn.Module, out_dir: str, cfg: QuantizationConfig, plan, tied_to,
              t0: float) -> QuantizationResult:
    """Write quantized.safetensors from the staging data, laid out as save_quantized would."""
    from ..hf import QUANTIZED_WEIGHTS

    entries: Dict[str, Tuple[str, List[int], int, int]] = {}
    specs, records = {}, []
    for u in staging.units.values():
        for name, tag, shape, off, n in u["tensors"]:
            entries[name] = (tag, shape, off, n)
        if "spec" in u:
            specs[u["unit"]] = u["spec"]
            records.append(LayerRecord(**{k: v for k, v in u["record"].items() if k != "compression_ratio"}))
    # tied tensors once, under the first name in sorted order (as save_quantized's _unique_tensors)
    aliases = {n: tied_to[n][0] for n in sorted(model.state_dict()) if n in tied_to and tied_to[n][0] != n
               and tied_to[n][0] in entries and n.rpartition(".")[0] not in specs}
    for name in aliases:
        entries.pop(name, None)
    order_layers = [n for n, m in model.named_modules() if n in specs]
    meta = {"format": FORMAT_TAG, "version": __version__, "layers": {n: specs[n] for n in order_layers}}
    metadata = {**dict(sorted(aliases.items())), "diffulex_edge": json.dumps(meta)}
    raw, order = safetensors_header({n: (_DTYPE_OF_TAG[e[0]], tuple(e[1])) for n, e in entries.items()}, metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            for name in order:
                _, _, off, n = entries[name]
                staging.fh.seek(off)
                left = n
                while left:
                    chunk = staging.fh.read(min(left, 1 << 24))
                    if not chunk:
                        raise ConfigError(f"{staging.data}: staging data of {name!r} is truncated; delete it and rerun")
                    out.write(chunk)
                    left -= len(chunk)

    atomic_write(os.path.join(out_dir, QUANTIZED_WEIGHTS), write)
    records.sort(key=lambda r: order_layers.index(r.name))
    # sizes as quantize_ reports them: every parameter and buffer once, in float32 before
    original = model_size_bytes(model)
    state = model.state_dict()
    computed = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in state)
    quantized = sum(e[3] for e in entries.values()) + computed
    return QuantizationResult(None, cfg, original, quantized, time.perf_counter() - t0, records, plan.skipped,
                              plan.warnings)


__all__ = ["quantize_checkpoint"]
