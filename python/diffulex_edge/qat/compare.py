"""QAT against PTQ on the same model, data and format: how much of PTQ's perplexity gap to the
float model quantization-aware training recovers, with a float fine-tuning control (the same steps
without fake quantization, then PTQ) that shows what extra training alone gives."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from torch import nn

from .trainer import Trainer, TrainingConfig


@dataclass
class QATComparison:
    scheme: str
    steps: int
    #: perplexity on the eval text of: the float model, its PTQ, the QAT model converted (PTQ of
    #: the QAT-trained weights), the float model fine-tuned for the same steps, and that one's PTQ
    ppl: Dict[str, float] = field(default_factory=dict)

    @property
    def gap_recovered(self) -> float:
        """(PTQ - QAT) / (PTQ - float): the fraction of PTQ's gap to the float model that QAT closes."""
        gap = self.ppl["ptq"] - self.ppl["fp32"]
        return float("nan") if gap <= 0 else (self.ppl["ptq"] - self.ppl["qat"]) / gap

    @property
    def gap_recovered_vs_control(self) -> float:
        """The same against the float fine-tuned control: (control PTQ - QAT) / (control PTQ - control);
        NaN without the control run."""
        if "finetuned_ptq" not in self.ppl:
            return float("nan")
        gap = self.ppl["finetuned_ptq"] - self.ppl["finetuned_fp32"]
        return float("nan") if gap <= 0 else (self.ppl["finetuned_ptq"] - self.ppl["qat"]) / gap

    def table(self) -> str:
        rows = [("float (FP32)", "fp32"), (f"PTQ {self.scheme}", "ptq"), (f"QAT {self.scheme}, {self.steps} steps", "qat"),
                (f"float fine-tuned {self.steps} steps (control)", "finetuned_fp32"),
                (f"control + PTQ {self.scheme}", "finetuned_ptq")]
        out = ["| model | perplexity |", "|---|---|"] + [f"| {n} | {self.ppl[k]:.3f} |" for n, k in rows if k in self.ppl]
        control = (f" ({100 * self.gap_recovered_vs_control:.1f}% of the control's gap)" if "finetuned_ptq" in self.ppl
                   else "")
        out.append(f"\nQAT recovers {100 * self.gap_recovered:.1f}% of PTQ's gap to FP32{control}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"QATComparison({self.scheme}, {self.steps} steps: fp32 {self.ppl['fp32']:.3f}, ptq {self.ppl['ptq']:.3f}, "
                f"qat {self.ppl['qat']:.3f}; recovers {100 * self.gap_recovered:.1f}% of the gap)")


def compare_qat_ptq(model: nn.Module, scheme: str, train_data: Any, eval_data: Any, tokenizer: Any = None, *,
                    steps: int = 100, config: Optional[TrainingConfig] = None, eval_seq_len: int = 256,
                    max_eval_tokens: Optional[int] = None, control: bool = True,
                    show_progress: Optional[bool] = None) -> QATComparison:
    """Perplexities of `model` (left unchanged) in float, after PTQ to `scheme`, and after `steps`
    of QAT then conversion; with `control`, also after `steps` of float fine-tuning (and its PTQ).
    `config` gives the training settings (its quantization fields are set here)."""
    from ..eval.perplexity import perplexity
    from ..quant.api import quantize_

    base = config or TrainingConfig()

    def ppl(m: nn.Module) -> float:
        return perplexity(m.eval(), eval_data, tokenizer, seq_len=eval_seq_len, max_tokens=max_eval_tokens,
                          show_progress=False).perplexity

    res = QATComparison(scheme, steps)
    res.ppl["fp32"] = ppl(model)
    ptq = copy.deepcopy(model)
    quantize_(ptq, scheme, show_progress=False)
    res.ppl["ptq"] = ppl(ptq)
    del ptq
    for mode in ["qat"] + ([None] if control else []):
        m = copy.deepcopy(model)
        cfg = TrainingConfig.from_dict({**base.to_dict(), "quantization_mode": mode, "quantization_scheme": scheme,
                                        "max_steps": steps, "enable_quantized_finetuning": False})
        t = Trainer(m, cfg, train_data, tokenizer=tokenizer, show_progress=show_progress)
        t.fit()
        if mode == "qat":
            t.convert()
            res.ppl["qat"] = ppl(m)
        else:
            res.ppl["finetuned_fp32"] = ppl(m)
            quantize_(m, scheme, show_progress=False)
            res.ppl["finetuned_ptq"] = ppl(m)
        del m, t
    return res


__all__ = ["QATComparison", "compare_qat_ptq"]
