"""Per-tensor sensitivity: how much each weight tensor's quantization moves the model's output.

For every 2-D weight (each Linear layer, and the token embedding where it is its own tensor or
doubles as the output) and every candidate GGML format that fits its width:

* a cheap proxy, the importance-weighted squared weight error ``sum_j imp_j sum_i (W - Q(W))_ij^2``
  (``imp`` the imatrix column importance, else 1), from the Rust quantizers;
* a measurement: the tensor alone is quantized to its *reference* format (the lowest-bit
  candidate) inside the full-precision model, and the mean KL divergence of the output vs the
  original (nats/token, as ``llama-perplexity --kl-divergence``) is measured on the calibration
  windows. ``measure="all"`` measures every candidate (slower by the number of candidates).

The estimate for a candidate is the measured KL scaled by its proxy ratio to the reference
(``KL_ref * E_f / E_ref``): KL grows with the energy of the output perturbation, which for one
tensor is proportional to the weighted weight error. Per-tensor KLs are then treated as additive
(the solver's assumption; ``SolvedPlan.verify`` measures the whole plan).

Work is checkpointed per tensor (``checkpoint=`` a JSON path): an interrupted analysis resumes
with the tensors it finished.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .._progress import progress
from ..errors import ConfigError
from ..gguf.quants import GGML_TYPES, dequantize, quantize

log = logging.getLogger(__name__)

#: Candidates by default: the GGML types from 8 down to 1.56 bits/weight (block 32 first, so a
#: tensor whose width is not a multiple of 256 still has a range).
DEFAULT_CANDIDATES = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q3_K", "IQ3_S", "IQ3_XXS",
                      "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


@dataclass
class TensorSensitivity:
    """One weight tensor: its module, shape, the candidates that fit it with their bytes, proxy
    errors and estimated (or measured) KL, and which candidate was measured."""

    name: str  # module name (Linear layer or embedding)
    shape: Tuple[int, int]
    candidates: List[str]
    bytes: Dict[str, int]
    proxy: Dict[str, float]
    kl: Dict[str, float] = field(default_factory=dict)  # estimated (measured where `measured`)
    measured: Dict[str, float] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "candidates": self.candidates, "bytes": self.bytes,
                "proxy": self.proxy, "kl": self.kl, "measured": self.measured}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TensorSensitivity":
        return cls(d["name"], tuple(d["shape"]), list(d["candidates"]), {k: int(v) for k, v in d["bytes"].items()},
                   {k: float(v) for k, v in d["proxy"].items()}, {k: float(v) for k, v in d["kl"].items()},
                   {k: float(v) for k, v in d["measured"].items()})


@dataclass
class SensitivityReport:
    """Sensitivities of every tensor of a model; ``solve(...)`` turns it into a plan."""

    tensors: List[TensorSensitivity]
    tokens: int
    baseline_note: str = ""

    def __getitem__(self, name: str) -> TensorSensitivity:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def total_params(self) -> int:
        return sum(t.params for t in self.tensors)

    def table(self, top: int = 15) -> str:
        rows = sorted(self.tensors, key=lambda t: -max(t.measured.values(), default=0.0))[:top]
        w = max([len(t.name) for t in rows] + [6])
        out = [f"{'tensor':<{w}}  {'params':>9}  {'measured at':>11}  {'KL':>9}"]
        for t in rows:
            (f, kl), = list(t.measured.items())[:1] or [("-", float("nan"))]
            out.append(f"{t.name:<{w}}  {t.params:>9}  {f:>11}  {kl:>9.5f}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"SensitivityReport({len(self.tensors)} tensors, {self.total_params / 1e6:.1f}M weights, "
                f"{self.tokens} calibration tokens)\n{self.table(8)}")

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{t.name}</td><td>{t.params}</td><td>{f}</td><td>{kl:.5f}</td></tr>"
            for t in sorted(self.tensors, key=lambda t: -max(t.measured.values(), default=0.0))
            for f, kl in list(t.measured.items())[:1])
        return (f"<b>SensitivityReport</b>: {len(self.tensors)} tensors, {self.tokens} calibration tokens"
                f"<table><tr><th>tensor</th><th>params</th><th>measured at</th><th>KL (nats/token)</th></tr>{rows}</table>")

    def plot(self, ax=None):
        """Bar chart of the measured KL per tensor (in model order); returns the matplotlib axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(max(6, len(self.tensors) * 0.08), 3.5))
        vals = [max(t.measured.values(), default=0.0) for t in self.tensors]
        ax.bar(range(len(vals)), vals)
        ax.set_yscale("log")
        ax.set_xlabel("tensor (model order)")
        ax.set_ylabel("KL vs original at reference format (nats/token)")
        ax.set_title("per-tensor sensitivity")
        return ax

    def to_dict(self) -> Dict[str, Any]:
        return {"tokens": self.tokens, "note": self.baseline_note, "tensors": [t.to_dict() for t in self.tensors]}

    def save(self, path: Union[str, os.PathLike]) -> None:
        from .._io import atomic_write

        text = json.dumps(self.to_dict())
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SensitivityReport":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls([TensorSensitivity.from_dict(t) for t in d["tensors"]], int(d["tokens"]), d.get("note", ""))


def weight_tensors(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(module name, module) of every Linear layer and embedding whose weight is a distinct
    tensor (a tied lm_head is covered by its embedding)."""
    out, seen = [], set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and getattr(m, "weight", None) is not None:
            key = m.weight.data_ptr()
            if key in seen:
                continue
            seen.add(key)
            out.append((name, m))
    return out


def _log_softmax(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    logits = out.logits if hasattr(out, "logits") else out
    return torch.log_softmax(logits.float(), dim=-1)


def _kl(model: nn.Module, windows: Sequence[torch.Tensor], base: Sequence[torch.Tensor]) -> float:
    total, n = 0.0, 0
    for w, lp0 in zip(windows, base):
        lp = _log_softmax(model, w)
        total += float((lp0.exp() * (lp0 - lp)).sum())
        n += lp0.shape[0] * lp0.shape[1]
    return total / max(n, 1)


def _fits(t: str, cols: int) -> bool:
    return cols % GGML_TYPES[t].block_size == 0


def analyze_sensitivity(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    *,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    imatrix: Optional[Any] = None,
    measure: str = "reference",
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    show_progress: Optional[bool] = None,
) -> SensitivityReport:
    """Sensitivity of every weight tensor of `model` (a causal LM taking token ids) to each
    candidate GGML format. `calibration`: token-id tensors ``[batch, seq]`` (a few windows of a
    few hundred tokens suffice). `imatrix`: per-column importances by module name (an
    :class:`~diffulex_edge.quant.ImportanceMatrix` or mapping) for the quantizers and the proxy.
    `measure`: ``"reference"`` (one KL measurement per tensor, the others scaled by the proxy) or
    ``"all"``. `checkpoint`: JSON file updated after every tensor; an existing one is resumed."""
    if measure not in ("reference", "all"):
        raise ConfigError(f"measure must be 'reference' or 'all', got {measure!r}")
    cands = [GGML_TYPES[c.upper()].name if c.upper() in GGML_TYPES else None for c in candidates]
    bad = [c for c, k in zip(candidates, cands) if k is None or GGML_TYPES[k].block_size == 1]
    if bad:
        raise ConfigError(f"unknown or unquantized candidate format(s) {bad}; use GGML block types such as "
                          f"{', '.join(DEFAULT_CANDIDATES[:6])}")
    windows = [w if isinstance(w, torch.Tensor) else torch.as_tensor(w) for w in calibration]
    windows = [w.unsqueeze(0) if w.dim() == 1 else w for w in windows]
    if not windows:
        raise ConfigError("analyze_sensitivity needs calibration windows (token-id tensors)")
    done: Dict[str, TensorSensitivity] = {}
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None and ck.exists():
        prev = SensitivityReport.load(ck)
        done = {t.name: t for t in prev.tensors}
        log.info("resuming the sensitivity analysis from %s: %d tensors done", ck, len(done))
    model.eval()
    tensors = weight_tensors(model)
    with torch.no_grad():
        base = [_log_softmax(model, w) for w in windows]
        tokens = sum(b.shape[0] * b.shape[1] for b in base)
        results: List[TensorSensitivity] = []
        for name, mod in progress(tensors, "sensitivity", show_progress, "tensor"):
            if name in done:
                results.append(done[name])
                continue
            w = mod.weight
            rows, cols = int(w.shape[0]), int(w.shape[1])
            fit = [c for c in dict.fromkeys(cands) if _fits(c, cols)]
            if not fit:
                log.warning("%s: width %d fits no candidate block size; left out of the plan", name, cols)
                continue
            a = w.detach().float().cpu().numpy()
            imp = None
            if imatrix is not None and isinstance(mod, nn.Linear) and name in imatrix:
                imp = np.asarray(imatrix[name], np.float32).reshape(-1)
            colw = imp if imp is not None else np.ones(cols, np.float32)
            deq: Dict[str, np.ndarray] = {}
            proxy: Dict[str, float] = {}
            nbytes: Dict[str, int] = {}
            for c in fit:
                q = quantize(a, c, imatrix=imp)
                deq[c] = dequantize(q, c).reshape(rows, cols)
                proxy[c] = float((((deq[c] - a) ** 2) * colw).sum())
                nbytes[c] = int(q.nbytes)
            ref = min(fit, key=lambda c: GGML_TYPES[c].bits_per_weight)
            measured: Dict[str, float] = {}
            orig = w.data.clone()
            try:
                for c in (fit if measure == "all" else [ref]):
                    w.data.copy_(torch.from_numpy(deq[c]).to(w.dtype))
                    measured[c] = max(_kl(model, windows, base), 0.0)
            finally:
                w.data.copy_(orig)
            kl = {}
            for c in fit:
                if c in measured:
                    kl[c] = measured[c]
                else:
                    kl[c] = measured[ref] * proxy[c] / proxy[ref] if proxy[ref] > 0 else 0.0
            t = TensorSensitivity(name, (rows, cols), fit, nbytes, proxy, kl, measured)
            results.append(t)
            done[name] = t
            if ck is not None:
                SensitivityReport(list(done.values()), tokens).save(ck)
    if not results:
        raise ConfigError("no weight tensor fits any candidate format")
    note = f"{len(windows)} windows, {tokens} tokens; measured: {measure}"
    return SensitivityReport(results, tokens, note)

