"""Small models with controlled activations and paths shared by the calibration tests."""

from __future__ import annotations

import os

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(REPO, "examples", "tiny-llama-wikitext", "tokenizer.json")


def tiny_hf_llama(hidden=64, inter=128, layers=2, vocab=96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, rms_norm_eps=1e-6)
    return LlamaForCausalLM(cfg).eval()


class Skewed(nn.Module):
    """A two-layer MLP whose input channels have very different scales (as LLM activations do)."""

    def __init__(self, d=128, h=256, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(h, d, generator=g) / d ** 0.5)
            self.fc2.weight.copy_(torch.randn(d, h, generator=g) / h ** 0.5)
        self.register_buffer("channel_scale", torch.exp(1.5 * torch.randn(d, generator=g)))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x * self.channel_scale)))
