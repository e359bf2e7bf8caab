"""`BenchmarkReport`: the table of schemes, the Pareto frontier of size vs perplexity, a
recommendation for a budget, and JSON / Markdown / self-contained HTML (plots embedded) output."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .._io import atomic_write


@dataclass
class SchemeResult:
    """One row: a quantization scheme measured on the model."""

    label: str
    config: Optional[Dict[str, Any]]
    size_bytes: int
    bits_per_weight: float
    compression: float
    perplexity: float
    ppl_delta: float
    kl_divergence: float
    top1_agreement: float
    latency_ms: Optional[float]
    speedup: Optional[float]
    num_quantized_layers: int
    quantize_time_s: float

    @property
    def ppl_delta_pct(self) -> float:
        base = self.perplexity - self.ppl_delta
        return 100.0 * self.ppl_delta / base if base else 0.0


COLUMNS = [
    ("scheme", lambda r: r.label),
    ("size (MiB)", lambda r: f"{r.size_bytes / 2**20:.2f}"),
    ("bits/weight", lambda r: f"{r.bits_per_weight:.2f}"),
    ("compression", lambda r: f"{r.compression:.2f}x"),
    ("perplexity", lambda r: f"{r.perplexity:.3f}"),
    ("Δ ppl", lambda r: f"{r.ppl_delta:+.3f} ({r.ppl_delta_pct:+.2f}%)"),
    ("KL (nats)", lambda r: f"{r.kl_divergence:.2e}"),
    ("top-1", lambda r: f"{100 * r.top1_agreement:.2f}%"),
    ("latency (ms)", lambda r: "-" if r.latency_ms is None else f"{r.latency_ms:.2f}"),
    ("speedup", lambda r: "-" if r.speedup is None else f"{r.speedup:.2f}x"),
]


@dataclass
class BenchmarkReport:
    rows: List[SchemeResult]
    meta: Dict[str, Any] = field(default_factory=dict)

    # ---- analysis ----------------------------------------------------------------------------
    def row(self, label: str) -> SchemeResult:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(f"no scheme {label!r}; have {[r.label for r in self.rows]}")

    def pareto_frontier(self) -> List[SchemeResult]:
        """Schemes no other scheme beats on both size and perplexity, smallest first."""
        front = [
            r for r in self.rows
            if not any(
                (o.size_bytes <= r.size_bytes and o.perplexity <= r.perplexity)
                and (o.size_bytes < r.size_bytes or o.perplexity < r.perplexity)
                for o in self.rows
            )
        ]
        return sorted(front, key=lambda r: r.size_bytes)

    def recommend(self, max_size_bytes: Optional[int] = None, max_ppl_increase_pct: Optional[float] = None) -> Optional[SchemeResult]:
        """The best scheme for a budget: with a size budget, the lowest perplexity that fits; with
        an accuracy budget (perplexity increase in percent over the reference), the smallest that
        stays within it; with both, the smallest meeting both. None if nothing qualifies."""
        cands = self.pareto_frontier()
        if max_size_bytes is not None:
            cands = [r for r in cands if r.size_bytes <= max_size_bytes]
        if max_ppl_increase_pct is not None:
            cands = [r for r in cands if r.ppl_delta_pct <= max_ppl_increase_pct]
            return min(cands, key=lambda r: r.size_bytes, default=None)
        return min(cands, key=lambda r: r.perplexity, default=None)

    # ---- output ------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "meta": self.meta,
            "rows": [{**asdict(r), "ppl_delta_pct": r.ppl_delta_pct} for r in self.rows],
            "pareto_frontier": [r.label for r in self.pareto_frontier()],
        }

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            _write_text(path, text)
        return text

    def to_markdown(self, path: Optional[str] = None) -> str:
        front = {r.label for r in self.pareto_frontier()}
        lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in self.rows:
            cells = [f(r) for _, f in COLUMNS]
            if r.label in front:
                cells[0] = f"**{cells[0]}**"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Bold: on the Pareto frontier of size vs perplexity.")
        text = "\n".join(lines)
        if path is not None:
            _write_text(path, text + "\n")
        return text

    def __repr__(self) -> str:
        widths = [max(len(c), *(len(f(r)) for r in self.rows)) for c, f in COLUMNS] if self.rows else [len(c) for c, _ in COLUMNS]
        head = "  ".join(c.ljust(w) for (c, _), w in zip(COLUMNS, widths))
        body = ["  ".join(f(r).ljust(w) for (_, f), w in zip(COLUMNS, widths)) for r in self.rows]
        return "\n".join([f"BenchmarkReport({len(self.rows)} schemes)", head, *body])

    def plots(self) -> Dict[str, bytes]:
        """PNG images: 'pareto' (size vs perplexity) and, when timed, 'speed' (speedup)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        images: Dict[str, bytes] = {}
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for r in self.rows:
            ax.scatter(r.size_bytes / 2**20, r.perplexity, s=40)
            ax.annotate(r.label, (r.size_bytes / 2**20, r.perplexity), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = self.pareto_frontier()
        ax.plot([r.size_bytes / 2**20 for r in front], [r.perplexity for r in front], "--", color="gray", label="Pareto frontier")
        ax.set_xlabel("model size (MiB)")
        ax.set_ylabel("perplexity")
        ax.set_title("Size vs perplexity")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        images["pareto"] = _png(fig)
        plt.close(fig)
        timed = [r for r in self.rows if r.speedup is not None]
        if timed:
            fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
            ax.barh([r.label for r in timed], [r.speedup for r in timed], color="#4c72b0")
            ax.axvline(1.0, color="gray", lw=1)
            ax.set_xlabel("speedup vs reference (higher is faster)")
            ax.set_title("CPU latency")
            ax.invert_yaxis()
            images["speed"] = _png(fig)
            plt.close(fig)
        return images

    def _html_body(self) -> str:
        esc = html.escape
        front = {r.label for r in self.pareto_frontier()}
        head = "".join(f"<th>{esc(c)}</th>" for c, _ in COLUMNS)
        body = "".join(
            "<tr" + (" class='front'" if r.label in front else "") + ">" + "".join(f"<td>{esc(f(r))}</td>" for _, f in COLUMNS) + "</tr>"
            for r in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def _repr_html_(self) -> str:
        return self._html_body()

    def to_html(self, path: Optional[str] = None, title: str = "diffulex-edge quantization report") -> str:
        """A self-contained HTML page: the table, the plots (embedded PNG) and the run's metadata."""
        esc = html.escape
        imgs = "".join(
            f"<figure><img alt='{esc(name)} plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'/></figure>"
            for name, png in self.plots().items()
        )
        meta = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in self.meta.items())
        rec = self.recommend()
        page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;}} table{{border-collapse:collapse;}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right;}} td:first-child,th:first-child{{text-align:left;}}
tr.front td{{background:#eef6ee;font-weight:600;}} figure{{display:inline-block;margin:1em;}}</style></head>
<body><h1>{esc(title)}</h1>
{self._html_body()}
<p>Highlighted rows are on the Pareto frontier of size vs perplexity.
{'Lowest perplexity on the frontier: <b>' + esc(rec.label) + '</b>.' if rec else ''}</p>
{imgs}
<h2>Run</h2><ul>{meta}</ul>
</body></html>"""
        if path is not None:
            _write_text(path, page)
        return page


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(os.fspath(path), write)
