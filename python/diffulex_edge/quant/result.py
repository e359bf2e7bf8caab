"""What a quantization run did: sizes, timings, per-layer records, warnings."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from torch import nn

from .config import QuantizationConfig, QuantizationDtype


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n:.2f} GiB"  # pragma: no cover - loop always returns


@dataclass
class LayerRecord:
    """One quantized layer."""

    name: str
    in_features: int
    out_features: int
    original_dtype: str
    format: str
    original_bytes: int
    quantized_bytes: int
    weight_rel_error: float
    """Relative Frobenius error of the weight, ||W - dequant(quant(W))|| / ||W||."""
    padded: bool = False

    @property
    def compression_ratio(self) -> float:
        return self.original_bytes / self.quantized_bytes if self.quantized_bytes else float("inf")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "original_dtype": self.original_dtype,
            "format": self.format,
            "original_bytes": self.original_bytes,
            "quantized_bytes": self.quantized_bytes,
            "compression_ratio": self.compression_ratio,
            "weight_rel_error": self.weight_rel_error,
            "padded": self.padded,
        }


@dataclass
class QuantizationResult:
    """The outcome of ``quantizer.quantize(model, config)``.

    ``model`` is the quantized model (a new object unless ``inplace=True`` was passed). Sizes count
    every parameter and buffer of the whole model once (tied tensors once), in bytes.
    """

    model: nn.Module
    config: QuantizationConfig
    original_size_bytes: int
    quantized_size_bytes: int
    conversion_time_s: float
    layers: List[LayerRecord] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    #: the coherence check's :class:`~diffulex_edge.quant.coherence.CoherenceReport` (formats
    #: below 3 bits per weight, or ``check_coherence=True``), else None
    coherence: Optional[Any] = None
    #: the :class:`~diffulex_edge.quant.profile.DynamicQuantizationProfile` of a mixed-precision
    #: run (``config`` is then the config of its most common format), else None
    profile: Optional[Any] = None

    @property
    def dtype(self) -> Optional[QuantizationDtype]:
        return self.config.dtype

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def compression_ratio(self) -> float:
        """original size / quantized size (1.0 when nothing was quantized)."""
        if self.quantized_size_bytes == 0:
            return 1.0
        return self.original_size_bytes / self.quantized_size_bytes

    @property
    def memory_reduction_pct(self) -> float:
        """How much smaller the model got, in percent of the original size."""
        if self.original_size_bytes == 0:
            return 0.0
        return 100.0 * (1.0 - self.quantized_size_bytes / self.original_size_bytes)

    @property
    def num_quantized_layers(self) -> int:
        return len(self.layers)

    @property
    def max_weight_rel_error(self) -> float:
        return max((r.weight_rel_error for r in self.layers), default=0.0)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "original_size_bytes": self.original_size_bytes,
            "quantized_size_bytes": self.quantized_size_bytes,
            "compression_ratio": self.compression_ratio,
            "memory_reduction_pct": self.memory_reduction_pct,
            "conversion_time_s": self.conversion_time_s,
            "num_quantized_layers": self.num_quantized_layers,
            "layers": [r.to_dict() for r in self.layers],
            "skipped": dict(self.skipped),
            "warnings": list(self.warnings),
            "coherence": None if self.coherence is None else {
                "kl": self.coherence.kl, "top1": self.coherence.top1, "tokens": self.coherence.tokens,
                "source": self.coherence.source, "degraded": self.coherence.degraded},
        }

    def _headline(self) -> str:
        what = f"{self.dtype} {self.mode}" if self.dtype is not None else "no quantization"
        if self.profile is not None:
            counts: Dict[str, int] = {}
            for r in self.layers:
                counts[r.format] = counts.get(r.format, 0) + 1
            what = f"mixed, profile {self.profile.name!r}: " + ", ".join(f"{n} {f}" for f, n in counts.items())
        return (
            f"QuantizationResult({what}: {self.num_quantized_layers} layer(s) quantized, "
            f"{len(self.skipped)} skipped; {format_bytes(self.original_size_bytes)} -> "
            f"{format_bytes(self.quantized_size_bytes)}, {self.compression_ratio:.2f}x smaller "
            f"({self.memory_reduction_pct:.1f}% less memory) in {self.conversion_time_s:.2f} s)"
        )

    def summary(self, max_layers: int = 12) -> str:
        """A plain-text table of the layers (the worst weight errors first) and any warnings."""
        lines = [self._headline()]
        if self.layers:
            rows = sorted(self.layers, key=lambda r: -r.weight_rel_error)[:max_layers]
            width = max(len(r.name) for r in rows)
            width = max(width, len("layer"))
            lines.append(f"  {'layer':<{width}}  {'shape':>13}  {'format':<14} {'size':>10}  {'ratio':>6}  {'weight err':>10}")
            for r in rows:
                shape = f"{r.out_features}x{r.in_features}"
                lines.append(
                    f"  {r.name:<{width}}  {shape:>13}  {r.format:<14} {format_bytes(r.quantized_bytes):>10}  "
                    f"{r.compression_ratio:>5.2f}x  {r.weight_rel_error:>10.2e}"
                )
            if len(self.layers) > max_layers:
                lines.append(f"  ... {len(self.layers) - max_layers} more layer(s)")
        if self.coherence is not None:
            lines.append(f"  coherence: {self.coherence!r}")
        for name, why in list(self.skipped.items())[:max_layers]:
            lines.append(f"  skipped {name}: {why}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        esc = html.escape
        head = (
            "<table><thead><tr><th style='text-align:left'>layer</th><th>shape</th><th>format</th>"
            "<th>original</th><th>quantized</th><th>ratio</th><th>weight rel. error</th></tr></thead><tbody>"
        )
        rows = "".join(
            f"<tr><td style='text-align:left'><code>{esc(r.name)}</code></td><td>{r.out_features}&times;{r.in_features}</td>"
            f"<td>{esc(r.format)}</td><td>{format_bytes(r.original_bytes)}</td><td>{format_bytes(r.quantized_bytes)}</td>"
            f"<td>{r.compression_ratio:.2f}&times;</td><td>{r.weight_rel_error:.2e}</td></tr>"
            for r in self.layers
        )
        skipped = "".join(f"<li><code>{esc(k)}</code>: {esc(v)}</li>" for k, v in self.skipped.items())
        warns = "".join(f"<li>{esc(w)}</li>" for w in self.warnings)
        parts = [
            "<div class='diffulex-quant-result'>",
            f"<p><b>{esc(self._headline())}</b></p>",
            head + rows + "</tbody></table>" if self.layers else "<p>No layers were quantized.</p>",
        ]
        if self.coherence is not None:
            parts.append(f"<p>coherence: {esc(repr(self.coherence))}</p>")
        if skipped:
            parts.append(f"<details><summary>{len(self.skipped)} skipped layer(s)</summary><ul>{skipped}</ul></details>")
        if warns:
            parts.append(f"<p>Warnings:</p><ul>{warns}</ul>")
        parts.append("</div>")
        return "".join(parts)
