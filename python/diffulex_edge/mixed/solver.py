"""Choose a format per tensor under a size or quality target: a multiple-choice knapsack over the
sensitivities of :func:`~diffulex_edge.mixed.analyze_sensitivity`.

Minimise the summed estimated KL subject to the summed bytes <= the budget, one candidate per
tensor. Solved exactly by dynamic programming over the budget cut into ``resolution`` units (each
candidate's bytes rounded *up*, so a solution always fits), then the bytes the rounding left
unused are spent greedily on the upgrades with the best KL reduction per byte. One DP pass gives
the minimum KL at every budget up to the target, which is the size/quality frontier reported.
A quality target (``max_kl``) takes the smallest plan whose estimated KL is below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import ConfigError
from ..gguf.quants import GGML_TYPES
from .sensitivity import SensitivityReport


class InfeasibleTargetError(ConfigError):
    """No assignment meets the target; ``nearest`` holds the closest feasible plans."""

    def __init__(self, message: str, nearest: List["SolvedPlan"]):
        super().__init__(message)
        self.nearest = nearest


@dataclass
class SolvedPlan:
    """Per-tensor formats with their total size and estimated KL."""

    assignment: Dict[str, str]
    bytes: int
    params: int
    est_kl: float
    target: Dict[str, Any] = field(default_factory=dict)
    frontier: List[Tuple[float, float]] = field(default_factory=list)  # (bits/weight, est. KL)
    #: per tensor: (format, bytes, weights, estimated KL)
    details: Dict[str, Tuple[str, int, int, float]] = field(default_factory=dict)

    def table(self, top: Optional[int] = None) -> str:
        """Per tensor: format, bits/weight, weights, share of the plan's bytes, estimated KL
        (largest estimated KL first; `top` rows)."""
        rows = sorted(self.details.items(), key=lambda kv: -kv[1][3])[:top]
        w = max([len(n) for n, _ in rows] + [6])
        out = [f"{'tensor':<{w}}  {'format':<8} {'bits':>6} {'weights':>10} {'share':>7} {'est. KL':>9}"]
        for n, (f, b, p, kl) in rows:
            out.append(f"{n:<{w}}  {f:<8} {b * 8 / max(p, 1):>6.3f} {p:>10} {100 * b / max(self.bytes, 1):>6.2f}% "
                       f"{kl:>9.5f}")
        return "\n".join(out)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{n}</td><td>{f}</td><td>{b * 8 / max(p, 1):.3f}</td><td>{p}</td>"
                       f"<td>{100 * b / max(self.bytes, 1):.2f}%</td><td>{kl:.5f}</td></tr>"
                       for n, (f, b, p, kl) in sorted(self.details.items(), key=lambda kv: -kv[1][3]))
        return (f"<b>{repr(self)}</b><table><tr><th>tensor</th><th>format</th><th>bits/weight</th><th>weights</th>"
                f"<th>share of size</th><th>estimated KL</th></tr>{rows}</table>")

    @property
    def bits_per_weight(self) -> float:
        return self.bytes * 8 / max(self.params, 1)

    def counts(self) -> Dict[str, int]:
        c: Dict[str, int] = {}
        for f in self.assignment.values():
            c[f] = c.get(f, 0) + 1
        return dict(sorted(c.items(), key=lambda kv: -GGML_TYPES[kv[0]].bits_per_weight))

    def to_profile(self, name: str = "solved"):
        """The plan as a :class:`~diffulex_edge.quant.DynamicQuantizationProfile` (exact module
        names, lower-case format names): for ``quantize_``, ``export_gguf(profile=...)``, a file."""
        from ..quant.profile import FORMAT_OF_GGML, DynamicQuantizationProfile, LayerQuantizationConfig

        rules = [LayerQuantizationConfig(n, FORMAT_OF_GGML[f]) for n, f in self.assignment.items()]
        return DynamicQuantizationProfile(name, rules, None, target=dict(self.target),
                                          notes=f"{self.bits_per_weight:.3f} bits/weight, estimated KL {self.est_kl:.5f}")

    def __repr__(self) -> str:
        mix = ", ".join(f"{n} {f}" for f, n in self.counts().items())
        return (f"SolvedPlan({self.bits_per_weight:.3f} bits/weight, {self.bytes / 2**20:.2f} MiB, "
                f"estimated KL {self.est_kl:.5f} nats/token; {mix})")

    def plot_frontier(self, ax=None):
        """The size/quality frontier with this plan marked; returns the matplotlib axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        xs, ys = zip(*self.frontier) if self.frontier else ([], [])
        ax.plot(xs, ys, "-", label="frontier (estimated)")
        ax.plot([self.bits_per_weight], [self.est_kl], "o", label="this plan")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("estimated KL (nats/token)")
        ax.set_yscale("log")
        ax.legend()
        return ax


def _options(report: SensitivityReport) -> List[Tuple[str, List[str], np.ndarray, np.ndarray]]:
    out = []
    for t in report.tensors:
        cands = [c for c in t.candidates if c in t.kl]
        out.append((t.name, cands, np.array([t.bytes[c] for c in cands], np.int64),
                    np.array([t.kl[c] for c in cands], np.float64)))
    return out


def _dp(opts, budget: int, resolution: int):
    """min summed KL for every budget unit 0..resolution and the choices that reach it."""
    unit = max(budget / resolution, 1.0)
    n = resolution + 1
    inf = np.inf
    best = np.zeros(n)  # with no tensors every budget costs 0
    choice = np.zeros((len(opts), n), np.int16)
    for i, (_, _, nb, kl) in enumerate(opts):
        new = np.full(n, inf)
        arg = np.zeros(n, np.int16)
        for j in range(len(nb)):
            w = int(math.ceil(nb[j] / unit))
            if w >= n:
                continue
            cand = np.full(n, inf)
            cand[w:] = best[: n - w] + kl[j]
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        best, choice[i] = new, arg
    return best, choice, unit


def _backtrack(opts, choice, best, b: int, unit: float) -> List[int]:
    picks = [0] * len(opts)
    for i in range(len(opts) - 1, -1, -1):
        j = int(choice[i, b])
        picks[i] = j
        b -= int(math.ceil(opts[i][2][j] / unit))
    return picks


def _plan(opts, picks, params: int, target, sizes: Dict[str, int]) -> SolvedPlan:
    assign = {name: cands[j] for (name, cands, _, _), j in zip(opts, picks)}
    nbytes = int(sum(nb[j] for (_, _, nb, _), j in zip(opts, picks)))
    kl = float(sum(k[j] for (_, _, _, k), j in zip(opts, picks)))
    details = {name: (cands[j], int(nb[j]), sizes[name], float(k[j])) for (name, cands, nb, k), j in zip(opts, picks)}
    return SolvedPlan(assign, nbytes, params, kl, dict(target), details=details)


def _fill(opts, picks: List[int], budget: int) -> List[int]:
    """Spend what rounding left: repeatedly take the upgrade with the best KL drop per byte."""
    picks = list(picks)
    used = int(sum(nb[j] for (_, _, nb, _), j in zip(opts, picks)))
    while True:
        best_gain, best_move = 0.0, None
        for i, (_, _, nb, kl) in enumerate(opts):
            j0 = picks[i]
            for j in range(len(nb)):
                extra = int(nb[j] - nb[j0])
                drop = kl[j0] - kl[j]
                if drop <= 0 or used + extra > budget:
                    continue
                gain = drop / max(extra, 1)
                if gain > best_gain:
                    best_gain, best_move = gain, (i, j, extra)
        if best_move is None:
            return picks
        i, j, extra = best_move
        picks[i] = j
        used += extra


def solve(report: SensitivityReport, *, target_bpw: Optional[float] = None, target_bytes: Optional[int] = None,
          max_kl: Optional[float] = None, resolution: int = 20000) -> SolvedPlan:
    """The plan with the lowest estimated KL within `target_bytes` (or `target_bpw` bits per
    weight over the analysed tensors), or with `max_kl` the smallest plan whose estimated KL is at
    most `max_kl` (with a size target too: the smallest within both). Raises
    :class:`InfeasibleTargetError` naming the nearest feasible plans when no plan meets them."""
    if sum(x is not None for x in (target_bpw, target_bytes)) > 1:
        raise ConfigError("give target_bpw or target_bytes, not both")
    if target_bpw is None and target_bytes is None and max_kl is None:
        raise ConfigError("give a target: target_bpw, target_bytes or max_kl")
    opts = _options(report)
    params = report.total_params
    sizes = {t.name: t.params for t in report.tensors}
    lo = int(sum(nb.min() for _, _, nb, _ in opts))
    hi = int(sum(nb.max() for _, _, nb, _ in opts))
    target = {k: v for k, v in (("bits_per_weight", target_bpw), ("bytes", target_bytes), ("max_kl", max_kl))
              if v is not None}
    budget = hi if target_bytes is None and target_bpw is None else (
        int(target_bytes) if target_bytes is not None else int(target_bpw * params / 8))
    smallest = _plan(opts, [int(np.argmin(nb)) for _, _, nb, _ in opts], params, target, sizes)
    largest_q = _plan(opts, [int(np.argmin(kl)) for _, _, _, kl in opts], params, target, sizes)
    if budget < lo:
        raise InfeasibleTargetError(
            f"no plan fits {budget * 8 / params:.3f} bits/weight ({budget / 2**20:.2f} MiB): the smallest assignment "
            f"of these candidates is {smallest.bits_per_weight:.3f} bits/weight ({smallest.bytes / 2**20:.2f} MiB, "
            f"estimated KL {smallest.est_kl:.4f}); add lower-bit candidates or raise the target", [smallest])
    best, choice, unit = _dp(opts, budget, resolution)
    frontier = []
    for b in np.unique(np.linspace(0, len(best) - 1, 40).astype(int)):
        if np.isfinite(best[b]):
            frontier.append((b * unit * 8 / params, float(best[b])))
    if max_kl is not None:
        ok = np.nonzero(best <= max_kl)[0]
        if len(ok) == 0:
            top = _plan(opts, _backtrack(opts, choice, best, len(best) - 1, unit), params, target, sizes)
            raise InfeasibleTargetError(
                f"no plan within {budget * 8 / params:.3f} bits/weight reaches estimated KL <= {max_kl}: the best "
                f"there is {top.est_kl:.4f}; the best of all ({largest_q.bits_per_weight:.3f} bits/weight) estimates "
                f"{largest_q.est_kl:.4f}", [top, largest_q])
        b = int(ok[0])
        picks = _backtrack(opts, choice, best, b, unit)
        plan = _plan(opts, picks, params, target, sizes)
    else:
        if np.isfinite(best).any():
            b = int(np.argmin(best))  # the minimum is at the largest budget, ties at the smallest one
            picks = _backtrack(opts, choice, best, b, unit)
        else:  # the budget is within the rounding of the smallest plan: start from that plan
            picks = [int(np.argmin(nb)) for _, _, nb, _ in opts]
        plan = _plan(opts, _fill(opts, picks, budget), params, target, sizes)
    plan.frontier = frontier
    return plan
