"""`compare_schemes`: run every quantization scheme on the same model in one process and measure
size, perplexity, agreement with the original, and CPU latency."""

from __future__ import annotations

import copy
import platform
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import ConfigError
from ..quant import QUANTIZERS, QuantizationConfig, model_size_bytes
from .latency import measure_latency, measure_speedup
from .perplexity import perplexity, tokenize
from .report import BenchmarkReport, SchemeResult

#: What `compare_schemes` runs when no schemes are given.
DEFAULT_SCHEMES = ("fp32", "fp16", "int8", "w8a8-dynamic", "int4-g128", "int4-g32")

SchemeLike = Union[str, QuantizationConfig, Tuple[str, Optional[QuantizationConfig]]]


def parse_scheme(scheme: SchemeLike, exclude_layers: Sequence[str] = ()) -> Tuple[str, Optional[QuantizationConfig]]:
    """`"fp32"` (the unquantized reference), `"fp16"`, `"bf16"`, `"int8"` (weight-only),
    `"w8a8-dynamic"`, `"w8a8-static"`, `"int4-g32"` ... `"int4-g256"`, each optionally suffixed
    `-sym`/`-asym`, or a packed format (`"q4_K"`, `"iq4_xs"`, `"nf4"`, ...); or a
    QuantizationConfig; or a (label, config) pair; or a mixed-precision plan: a
    DynamicQuantizationProfile, a preset name or a .yaml/.json profile (labelled ``plan:<name>``)."""
    from ..quant.profile import PRESETS, DynamicQuantizationProfile, as_profile

    if isinstance(scheme, tuple):
        label, cfg = scheme
        return str(label), cfg
    if isinstance(scheme, DynamicQuantizationProfile):
        return f"plan:{scheme.name}", scheme
    if isinstance(scheme, str) and (scheme in PRESETS or scheme.lower().endswith((".yaml", ".yml", ".json"))):
        prof = as_profile(scheme)
        return f"plan:{prof.name}", prof
    if isinstance(scheme, QuantizationConfig):
        label = f"{scheme.dtype}" + (f"-g{scheme.group_size}" if str(scheme.dtype) == "int4" else "")  # q4_K, nf4, ...
        if scheme.mode != "weight_only":
            label = f"w8a8-{scheme.mode}"
        return label, scheme
    label = str(scheme).strip().lower()
    if label == "fp32":
        return label, None
    try:
        cfg = QuantizationConfig.from_scheme(label, exclude_layers=list(exclude_layers))
        return (cfg.dtype.value if cfg.dtype.is_packed else label), cfg
    except ConfigError as e:
        raise ConfigError(f"{e}; or fp32 (the unquantized reference), or pass a QuantizationConfig") from None


def _calibration_batches(calibration: Any, tokenizer: Any, seq_len: int, n: int = 16) -> Optional[List[Any]]:
    if calibration is None:
        return None
    if isinstance(calibration, (list, tuple)) and calibration and not isinstance(calibration[0], int):
        return list(calibration)
    ids = tokenize(calibration, tokenizer)
    step = max(1, (ids.numel() - seq_len) // max(1, n - 1))
    return [ids[s : s + seq_len].unsqueeze(0) for s in range(0, max(1, ids.numel() - seq_len + 1), step)][:n]


def compare_schemes(
    model: nn.Module,
    schemes: Sequence[SchemeLike] = DEFAULT_SCHEMES,
    eval_text: Any = None,
    *,
    tokenizer: Any = None,
    calibration: Any = None,
    seq_len: int = 256,
    stride: Optional[int] = None,
    max_eval_tokens: Optional[int] = None,
    latency_inputs: Any = None,
    latency_repetitions: int = 5,
    exclude_layers: Sequence[str] = (),
    show_progress: Optional[bool] = None,
) -> BenchmarkReport:
    """Quantize `model` with each scheme (the model itself is not modified) and measure them all
    against the unquantized model: size, bits/weight, compression, perplexity on `eval_text`
    (text, file path or token ids), KL divergence and top-1 agreement vs the original, and CPU
    latency of ``model(latency_inputs)`` (default: one window of `seq_len` eval tokens). Each
    scheme is timed in alternation with the original model and its speedup is the median of the
    per-round ratios, so load changes on a shared machine do not bias one scheme.

    `calibration` (token ids, text, or a list of model inputs) is needed by ``w8a8-static``.
    """
    if eval_text is None:
        raise ConfigError("compare_schemes needs eval_text (a text, a path to a text file, or token ids)")
    ids = tokenize(eval_text, tokenizer)
    if max_eval_tokens is not None:
        ids = ids[: int(max_eval_tokens)]
    if latency_inputs is None:
        latency_inputs = ids[:seq_len].unsqueeze(0)
    parsed = [parse_scheme(s, exclude_layers) for s in schemes]
    labels = [lab for lab, _ in parsed]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"scheme labels must be unique, got {labels}")
    calib = _calibration_batches(calibration, tokenizer, seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    base_size = model_size_bytes(model)

    ref_ppl = perplexity(model, ids, seq_len=seq_len, stride=stride, show_progress=show_progress)
    ref_latency = (measure_latency(model, latency_inputs, repetitions=latency_repetitions).median_ms
                   if latency_repetitions > 0 else None)
    rows: List[SchemeResult] = []
    for label, cfg in parsed:
        if cfg is None:
            q, n_layers, qtime = model, 0, 0.0
            ppl = ref_ppl
            kl, top1 = 0.0, 1.0
            lat = ref_latency
            speedup = 1.0 if ref_latency else None
        else:
            if isinstance(cfg, QuantizationConfig):
                result = QUANTIZERS[cfg.dtype](show_progress=False).quantize(model, cfg, calibration_data=calib)
            else:  # a mixed-precision profile (applied in place, so to a copy)
                from ..quant.profile import apply_profile

                result = apply_profile(copy.deepcopy(model), cfg, calibration_data=calib, show_progress=False)
            q, n_layers, qtime = result.model, result.num_quantized_layers, result.conversion_time_s
            ppl = perplexity(q, ids, seq_len=seq_len, stride=stride, reference_model=model, show_progress=show_progress)
            kl, top1 = ppl.kl_divergence, ppl.top1_agreement
            lat = speedup = None
            if latency_repetitions > 0:
                # timed in alternation with the original model: the ratio survives load changes
                speedup, _, lat = measure_speedup(model, q, latency_inputs, rounds=latency_repetitions)
        size = model_size_bytes(q)
        rows.append(SchemeResult(
            label=label, config=None if cfg is None else cfg.to_dict(), size_bytes=size,
            bits_per_weight=8.0 * size / max(1, n_params), compression=base_size / size if size else 1.0,
            perplexity=ppl.perplexity, ppl_delta=ppl.perplexity - ref_ppl.perplexity, kl_divergence=float(kl),
            top1_agreement=float(top1), latency_ms=lat,
            speedup=speedup,
            num_quantized_layers=n_layers, quantize_time_s=qtime,
        ))
    from .. import __version__, kernel_info

    meta = {
        "model": type(model).__name__,
        "parameters": n_params,
        "eval_tokens": ref_ppl.n_tokens,
        "seq_len": seq_len,
        "stride": ref_ppl.stride,
        "latency_input_shape": tuple(latency_inputs.shape) if isinstance(latency_inputs, torch.Tensor) else None,
        "latency_repetitions": latency_repetitions,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "diffulex_edge": __version__,
        "cpu_kernel": kernel_info()["selected"],
        "machine": platform.machine(),
    }
    return BenchmarkReport(rows, meta)
