"""Small models for examples, tests and benchmarks, built locally (nothing is downloaded).

`TinyTransformerLM` is a decoder-only transformer in the Llama style (RMSNorm, causal attention
with q/k/v/o projections, SwiGLU MLP, untied LM head). Every projection is an ``nn.Linear``, so
nearly all parameters are quantizable, as in real LLMs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyTransformerLM(nn.Module):
    """Token ids ``[batch, seq]`` -> logits ``[batch, seq, vocab]``."""

    def __init__(self, vocab_size: int = 512, dim: int = 256, layers: int = 4, heads: int = 4, hidden: Optional[int] = None) -> None:
        super().__init__()
        # Llama rounds the SwiGLU width up to a multiple of 256 (multiple_of=256)
        hidden = hidden or int(math.ceil(dim * 8 / 3 / 256) * 256)
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList([Block(dim, heads, hidden) for _ in range(layers)])
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def tiny_transformer(seed: int = 0, **kwargs) -> TinyTransformerLM:
    """A deterministic `TinyTransformerLM` (weights from ``torch.manual_seed(seed)``), in eval mode."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = TinyTransformerLM(**kwargs)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()
