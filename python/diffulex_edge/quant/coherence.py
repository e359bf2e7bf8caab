"""The coherence check after ultra-low-bit quantization: below 3 bits per weight a model can stop
producing sensible output while every layer's weight error still looks unremarkable. After
quantizing, the quantized model and the original are run on a few inputs and compared where it
matters, in the output distribution: the mean KL divergence per token (nats, as llama.cpp's
``llama-perplexity --kl-divergence`` reports it) and how often the two pick the same top token.
A large gap is a warning with the measured numbers and what to do instead (a mixed plan that
keeps the sensitive layers at more bits, or a format with more bits).

Inputs: the calibration data when the caller gave some, else (for a model with
``config.vocab_size``, e.g. a Hugging Face causal LM) a few windows of random token ids, seeded:
not text, so the figures say how far the quantized model's predictions move, not how good
either is; they are labelled with their source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from .walk import run_model

#: Formats below this many bits per weight get the check by default (``check_coherence=None``).
LOW_BITS = 3.0
#: Mean KL divergence (nats/token) above which the output counts as severely degraded. llama.cpp's
#: published KL figures put the 2-bit K-quant mixes of 7B models around 0.1-0.2 and the 1.5-bit
#: IQ1 types around 0.5-1; past 0.5 generated text typically loses coherence.
KL_WARN = 0.5
#: Inputs used (calibration items, or random windows of WINDOW_TOKENS tokens).
WINDOWS = 4
WINDOW_TOKENS = 64


@dataclass
class CoherenceReport:
    """How far the quantized model's output distribution is from the original's."""

    kl: float  # mean KL(original || quantized), nats per token
    top1: float  # fraction of tokens whose argmax agrees
    tokens: int
    source: str  # "calibration data" or "random token ids"

    @property
    def degraded(self) -> bool:
        """KL above :data:`KL_WARN` (KL, not top-1 agreement, decides: where the original's
        distribution is flat, e.g. an untrained model or random inputs, the top token is a
        coin toss that a negligible change flips)."""
        return not self.kl <= KL_WARN

    def __repr__(self) -> str:
        verdict = "DEGRADED" if self.degraded else "ok"
        return (f"CoherenceReport({verdict}: KL {self.kl:.3f} nats/token, top-1 agreement {self.top1:.1%} "
                f"over {self.tokens} tokens of {self.source})")


def check_inputs(model: nn.Module, calibration_data: Optional[Sequence[Any]]) -> Optional[tuple]:
    """(inputs, source) for the check, or None when there is nothing to run the model on."""
    if calibration_data is not None:
        items = []
        for item in calibration_data:
            items.append(item)
            if len(items) == WINDOWS:
                break
        if items:
            return items, "calibration data"
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 1:
        g = torch.Generator().manual_seed(0)
        n_pos = getattr(model.config, "max_position_embeddings", WINDOW_TOKENS) or WINDOW_TOKENS
        seq = max(2, min(WINDOW_TOKENS, int(n_pos)))
        return [torch.randint(0, vocab, (1, seq), generator=g) for _ in range(WINDOWS)], "random token ids"
    return None


def _logits(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def model_outputs(model: nn.Module, inputs: Sequence[Any]) -> Optional[List[torch.Tensor]]:
    """The float32 CPU outputs (logits) of `model` on each input, or None if they are not tensors."""
    outs = []
    with torch.no_grad():
        for item in inputs:
            t = _logits(run_model(model, item))
            if t is None or not t.dtype.is_floating_point:
                return None
            outs.append(t.detach().to("cpu", torch.float32).reshape(-1, t.shape[-1]))
    return outs


def compare(reference: Sequence[torch.Tensor], quantized: Sequence[torch.Tensor], source: str) -> CoherenceReport:
    """KL(reference || quantized) per row and top-1 agreement, over all rows of all outputs."""
    kl_sum, agree, n = 0.0, 0, 0
    for r, q in zip(reference, quantized):
        lp, lq = torch.log_softmax(r.double(), -1), torch.log_softmax(q.double(), -1)
        kl_sum += float((lp.exp() * (lp - lq)).sum())
        agree += int((r.argmax(-1) == q.argmax(-1)).sum())
        n += r.shape[0]
    kl = kl_sum / max(n, 1)
    return CoherenceReport(kl if math.isfinite(kl) else float("inf"), agree / max(n, 1), n, source)


def advice(report: CoherenceReport, fmt: str) -> str:
    return (f"output quality collapsed after {fmt} quantization: KL {report.kl:.3f} nats/token (warn above {KL_WARN}), "
            f"top-1 agreement {report.top1:.1%} vs the unquantized model on "
            f"{report.tokens} tokens of {report.source}. Validate generated text before deploying; consider a mixed "
            "plan that keeps the most sensitive layers at more bits (e.g. exclude_layers=['*down_proj', '*v_proj'] or "
            "quantize them with q4_K), or a format with more bits (q3_K, q4_K)")
