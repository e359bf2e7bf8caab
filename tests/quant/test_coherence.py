"""The coherence check after ultra-low-bit quantization (quant/coherence.py): it runs by default
below 3 bits per weight, measures KL divergence and top-1 agreement against the unquantized
model, warns with the numbers when the output has collapsed, and never fails a quantization."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from diffulex_edge.quant import QuantizationConfig, quantize_
from diffulex_edge.quant.coherence import KL_WARN, compare


class Peaked(nn.Module):
    """Token -> embedding -> logits with large weights: sharp output distributions whose argmax
    a coarse weight grid moves."""

    def __init__(self, vocab: int = 64, dim: int = 256, scale: float = 3.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, dim, generator=g))
            self.hidden.weight.copy_(torch.randn(dim, dim, generator=g) * scale / dim**0.5)
            self.head.weight.copy_(torch.randn(vocab, dim, generator=g) * scale / dim**0.5)

    def forward(self, ids):
        return self.head(torch.relu(self.hidden(self.embed(ids))))


def data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(4)]


def test_compare_is_kl_and_top1():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    same = compare([a], [a.clone()], "x")
    assert same.kl == 0 and same.top1 == 1 and same.tokens == 2 and not same.degraded
    flipped = compare([a], [a.flip(-1)], "x")
    p = torch.softmax(a.double(), -1)
    want = float((p * (p.log() - torch.log_softmax(a.flip(-1).double(), -1))).sum()) / 2
    assert flipped.kl == pytest.approx(want, rel=1e-12) and flipped.top1 == 0.5


def test_ternary_collapse_warns_with_numbers_and_keeps_the_model():
    model = Peaked()
    with pytest.warns(UserWarning, match=r"KL \d+\.\d+ nats/token.*top-1 agreement.*mixed plan"):
        result = quantize_(model, QuantizationConfig(dtype="tq1_0"), calibration_data=data())
    r = result.coherence
    assert r is not None and r.degraded and r.kl > KL_WARN and r.source == "calibration data"
    assert r.tokens == 4 * 2 * 16
    assert any("collapsed" in w for w in result.warnings)
    assert "coherence: CoherenceReport(DEGRADED" in repr(result)
    assert result.to_dict()["coherence"]["degraded"] is True


def test_default_is_below_three_bits_and_a_fine_format_passes():
    model = Peaked()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quantize_(model, "q8_0", calibration_data=data()).coherence is None  # 8.5 bits: not checked
        ok = quantize_(Peaked(), QuantizationConfig(dtype="q8_0", check_coherence=True), calibration_data=data())
    assert ok.coherence is not None and not ok.coherence.degraded and ok.coherence.top1 > 0.9
    off = quantize_(Peaked(), QuantizationConfig(dtype="tq1_0", check_coherence=False), calibration_data=data())
    assert off.coherence is None


def test_models_it_cannot_run_skip_the_check():
    # no calibration data and no config.vocab_size: nothing to run the model on
    result = quantize_(nn.Sequential(nn.Linear(256, 8)), "tq2_0")
    assert result.coherence is None and not any("collapsed" in w for w in result.warnings)
    # inputs the model cannot take: skipped, not an error
    result = quantize_(Peaked(), "tq2_0", calibration_data=[torch.randn(3, 3)])
    assert result.coherence is None


def test_hf_model_without_data_uses_random_token_windows():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    result = quantize_(LlamaForCausalLM(cfg).eval(), "q2_K")
    assert result.coherence is not None and result.coherence.source == "random token ids"
    assert result.coherence.tokens == 4 * 32
