"""Mixed precision: measure how sensitive each weight tensor is to each format
(:func:`analyze_sensitivity`), then choose a format per tensor under a size or quality target
(:func:`solve`). A solved plan becomes a :class:`~diffulex_edge.quant.DynamicQuantizationProfile`
(``plan.to_profile()``) that ``quantize_`` and ``export_gguf(profile=...)`` apply.

    report = analyze_sensitivity(model, windows, imatrix=imatrix, checkpoint="sens.json")
    plan = solve(report, target_bpw=3.0)          # or max_kl=0.05
    export_gguf(model, "model.gguf", profile=plan.to_profile(), imatrix=imatrix)
"""

from .sensitivity import DEFAULT_CANDIDATES, SensitivityReport, TensorSensitivity, analyze_sensitivity
from .solver import InfeasibleTargetError, SolvedPlan, solve

__all__ = ["DEFAULT_CANDIDATES", "InfeasibleTargetError", "SensitivityReport", "SolvedPlan", "TensorSensitivity",
           "analyze_sensitivity", "solve"]
