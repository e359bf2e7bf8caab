"""Walking a module tree: which Linear layers to quantize, validation before any change, module
swapping, size accounting and calibration hooks. Shared by every quantizer."""

from __future__ import annotations

import copy
import fnmatch
import logging
import re
import time
import warnings as _warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .._progress import progress
from ..errors import NonFiniteWeightError, QuantizationError, UnsupportedFormatError
from .config import QuantizationConfig, QuantizationDtype
from .nn import QuantizedLinear, indivisible_error
from .result import LayerRecord, QuantizationResult

log = logging.getLogger("diffulex_edge.quant")

#: Largest finite float16 value (IEEE 754 binary16); magnitudes from FP16_OVERFLOW up round to inf
#: (65520 is halfway between 65504 and the next step, 65536, and ties round to the even inf).
FP16_MAX = 65504.0
FP16_OVERFLOW = 65520.0


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied weights once)."""
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            total += t.numel() * t.element_size()
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _match(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@dataclass
class Plan:
    layers: List[Tuple[str, nn.Linear]]
    skipped: Dict[str, str]
    warnings: List[str]
    padded: set


def plan_layers(model: nn.Module, cfg: QuantizationConfig, *, weights_later: bool = False) -> Plan:
    """Decide which layers to quantize and validate them all before anything is changed.
    Raises a typed error naming the first bad layer. weights_later: the model is a skeleton on the
    meta device whose weights are read later, one layer at a time (the checks of weight values
    are then the caller's, per layer: :func:`check_weight_values`)."""
    if not isinstance(model, nn.Module):
        raise UnsupportedFormatError(f"expected a torch.nn.Module, got {type(model).__name__}")
    layers: List[Tuple[str, nn.Linear]] = []
    skipped: Dict[str, str] = {}
    warns: List[str] = []
    padded = set()
    used_patterns = set()
    # parameters reachable under more than one name are tied (e.g. lm_head <-> embed_tokens)
    owners: Dict[int, List[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    mha_children = {
        f"{n}.{c}" if n else c
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_children()
    }
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLinear):
            skipped[name] = "already quantized"
            continue
        if not isinstance(mod, nn.Linear):
            continue
        hit = [p for p in cfg.exclude_layers if _match(name, p)]
        if hit:
            used_patterns.update(hit)
            skipped[name] = f"excluded by {hit[0]!r}"
            continue
        if name in mha_children:
            skipped[name] = "output projection of nn.MultiheadAttention, which reads .weight directly"
            continue
        tied = owners.get(id(mod.weight), [])
        if cfg.skip_tied and len(tied) > 1:
            others = [t for t in tied if t != f"{name}.weight"]
            skipped[name] = f"weight is tied to {', '.join(others)} (quantizing would add a copy; set skip_tied=False to force)"
            continue
        w = mod.weight
        if w.device.type == "meta" and not weights_later:
            raise UnsupportedFormatError(
                "weights are on the meta device and have no values; load the weights before quantizing",
                layer=name,
            )
        if not w.dtype.is_floating_point:
            raise UnsupportedFormatError(
                f"weight dtype {w.dtype} is not a float type; only float weights can be quantized", layer=name
            )
        err = indivisible_error(cfg.dtype, cfg.group_size, mod.in_features, name)
        if err is not None:
            if cfg.on_indivisible == "skip":
                skipped[name] = err.reason
                warns.append(f"{name}: kept in full precision ({skipped[name]})")
                continue
            if cfg.on_indivisible == "error" or cfg.dtype.is_packed:  # block formats cannot pad
                raise err
            padded.add(name)
        if not weights_later:
            check_weight_values(w, cfg, name)
        layers.append((name, mod))
    for p in cfg.exclude_layers:
        if p not in used_patterns:
            warns.append(f"exclude_layers entry {p!r} matched no Linear layer")
    if not layers:
        warns.append("no Linear layers to quantize were found; the model is returned unchanged")
    return Plan(layers, skipped, warns, padded)


def check_weight_values(w: torch.Tensor, cfg: QuantizationConfig, name: str) -> None:
    """The checks of a layer's weight values that precede quantizing it (FP16: no overflow)."""
    if cfg.dtype == QuantizationDtype.FP16:
        wmax = float(w.detach().abs().max()) if w.numel() else 0.0
        if wmax >= FP16_OVERFLOW and wmax != float("inf"):
            raise NonFiniteWeightError(
                f"weight magnitude {wmax:.4g} exceeds the float16 range ({FP16_MAX}) and would become inf; use dtype='bf16' "
                "or exclude this layer",
                layer=name,
            )


def layer_format(cfg: QuantizationConfig) -> str:
    d = cfg.dtype
    if d is None:
        return "none"
    if d.is_float or d.is_packed:
        return str(d)
    sym = "sym" if cfg.resolved_symmetric else "asym"
    base = f"int4_g{cfg.group_size}" if d == QuantizationDtype.INT4 else "int8"
    if cfg.mode != "weight_only":
        base = f"w8a8-{cfg.mode}"
    return f"{base} {sym}"


def _lookup(table: Optional[Mapping[str, Any]], name: str) -> Any:
    if table is None or name not in table:
        return None
    return table[name]


def quantize_model(
    model: nn.Module,
    cfg: QuantizationConfig,
    *,
    inplace: bool = False,
    act_scales: Optional[Dict[str, float]] = None,
    importance: Optional[Mapping[str, Any]] = None,
    protect: Optional[Mapping[str, Any]] = None,
    show_progress: Optional[bool] = None,
    calibration_data: Optional[Any] = None,
) -> QuantizationResult:
    """Quantize every eligible Linear layer of `model` as `cfg` says.

    All layers are validated first and quantized into new modules; the model is changed only when
    everything succeeded, so a failure leaves it untouched. Without `inplace` the model is copied
    (the quantized layers are put straight into the copy; the float weights are not duplicated).
    """
    t0 = time.perf_counter()
    original_size = model_size_bytes(model) if isinstance(model, nn.Module) else 0
    if not cfg.is_enabled:
        plan = Plan([], {}, ["quantization is disabled in this config (enabled=False or no dtype); model unchanged"], set())
        out = model if inplace else copy.deepcopy(model)
        return QuantizationResult(out, cfg, original_size, original_size, time.perf_counter() - t0, [], {}, plan.warnings)
    plan = plan_layers(model, cfg)
    if cfg.mode == "static":
        missing = [n for n, _ in plan.layers if not act_scales or n not in act_scales]
        if missing:
            raise QuantizationError(
                f"mode='static' needs calibrated activation scales; none for {missing[:3]}"
                " — pass calibration_data so the layers see inputs during calibration"
            )
    fmt = layer_format(cfg)
    if importance is None and cfg.dtype.is_packed and cfg.dtype.value.startswith(("iq1", "iq2")):
        msg = (f"{cfg.dtype.value} without an importance matrix: llama.cpp refuses this format without one; here "
               "the scales are fitted with magnitude weights sqrt(sigma^2 + w^2) instead. Pass imatrix= (from "
               "compute_imatrix on calibration text) for a lower error.")
        log.warning(msg)
        plan.warnings.append(msg)
    if importance is not None and cfg.dtype.takes_importance:
        missing = [n for n, _ in plan.layers if n not in importance]
        if missing:
            _warnings.warn(f"the importance matrix has no entry for {len(missing)} layer(s), e.g. {missing[:3]}; "
                           "they are quantized round-to-nearest", stacklevel=2)
    new_modules: Dict[str, QuantizedLinear] = {}
    records: List[LayerRecord] = []
    for name, lin in progress(plan.layers, f"quantize {fmt}", show_progress, unit="layer"):
        q = QuantizedLinear.from_linear(
            lin, cfg.dtype, group_size=cfg.group_size, symmetric=cfg.resolved_symmetric,
            act_mode=cfg.mode, act_scale=(act_scales or {}).get(name), kernel=cfg.kernel, name=name,
            importance=_lookup(importance, name) if cfg.dtype.takes_importance else None,
            protect=_lookup(protect, name), on_indivisible="pad" if name in plan.padded else "error",
        )
        w = lin.weight.detach().to(torch.float32)
        err = (q.dequantize_weight().to(w.device) - w).norm() / w.norm().clamp_min(torch.finfo(torch.float32).tiny)
        orig_bytes = sum(t.numel() * t.element_size() for t in (lin.weight, lin.bias) if t is not None)
        records.append(
            LayerRecord(name, lin.in_features, lin.out_features, str(lin.weight.dtype).replace("torch.", ""),
                        fmt, orig_bytes, q.storage_bytes(), float(err), name in plan.padded)
        )
        new_modules[name] = q
        log.debug("quantized %s (%dx%d) to %s: weight rel. error %.3e", name, lin.out_features, lin.in_features, fmt, float(err))
    coherence = _Coherence(cfg, model, calibration_data, bool(new_modules) and "" not in new_modules)
    if inplace:
        out = new_modules.get("", model)  # a bare nn.Linear cannot be replaced in place
        for name, q in new_modules.items():
            if name:
                _set_module(out, name, q)
    else:
        memo = {id(lin): new_modules[name] for name, lin in plan.layers}
        try:
            out = copy.deepcopy(model, memo)
        except Exception as e:  # pragma: no cover - depends on exotic user modules
            raise QuantizationError(
                f"could not copy the model ({e}); pass inplace=True to quantize it in place"
            ) from e
    report = coherence.finish(out, fmt, plan.warnings)
    for w in plan.warnings:
        log.warning(w)
    result = QuantizationResult(
        out, cfg, original_size, model_size_bytes(out), time.perf_counter() - t0, records, plan.skipped, plan.warnings,
        report,
    )
    log.info("%s", result._headline())
    return result


class _Coherence:
    """The coherence check of quant/coherence.py around the module swap: the original's outputs
    before, the quantized model's after. A model that cannot be run on the inputs (or gives no
    tensor output) skips the check with a log line; it never fails the quantization."""

    def __init__(self, cfg: QuantizationConfig, model: nn.Module, calibration_data: Any, possible: bool) -> None:
        from . import coherence as co

        self.co, self.ref, self.inputs, self.source = co, None, None, ""
        on = cfg.check_coherence if cfg.check_coherence is not None else float(cfg.dtype.bits) < co.LOW_BITS
        if not (on and possible):
            return
        found = co.check_inputs(model, calibration_data)
        if found is None:
            log.info("coherence check skipped: no calibration_data and the model has no config.vocab_size")
            return
        self.inputs, self.source = found
        self.ref = self._run(model)

    def _run(self, model: nn.Module) -> Optional[List[torch.Tensor]]:
        was = model.training
        model.eval()
        try:
            return self.co.model_outputs(model, self.inputs)
        except Exception as e:  # the check is advice: a model it cannot run is not an error
            log.info("coherence check skipped: the model could not be run on %s (%s: %s)", self.source,
                     type(e).__name__, e)
            return None
        finally:
            model.train(was)

    def finish(self, out: nn.Module, fmt: str, warns: List[str]) -> Optional[Any]:
        if self.ref is None:
            return None
        got = self._run(out)
        if got is None:
            return None
        report = self.co.compare(self.ref, got, self.source)
        log.info("%r", report)
        if report.degraded:
            msg = self.co.advice(report, fmt)
            warns.append(msg)
            _warnings.warn(msg, stacklevel=3)
        return report


# ---- calibration ---------------------------------------------------------------------------

def run_model(model: nn.Module, batch: Any) -> Any:
    """Feed one calibration item: a tensor is a positional input, a dict keyword inputs, a
    tuple/list positional inputs."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
