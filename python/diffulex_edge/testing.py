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


#: Llama-2-7B's shapes (its published config.json): the default of `write_synthetic_checkpoint`.
LLAMA_7B_CONFIG = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)


def write_synthetic_checkpoint(folder: str, config: Optional[dict] = None, *, dtype: str = "bf16",
                               shard_bytes: int = 2 * 2**30, seed: int = 0, std: float = 0.02,
                               show_progress: Optional[bool] = None) -> int:
    """Write a Hugging Face Llama checkpoint folder with random weights (N(0, std^2); norms 1):
    ``config.json``, safetensors shards of at most `shard_bytes` and ``model.safetensors.index.json``
    when there is more than one shard. Tensors are generated and written one at a time, so a
    checkpoint of any size is written in the memory of its largest tensor. `config`: LlamaConfig
    arguments (default :data:`LLAMA_7B_CONFIG`). Returns the bytes of tensor data written."""
    import json
    import os

    import numpy as np
    import transformers

    from ._progress import progress

    np_dtype, width = {"bf16": (np.uint16, 2), "f16": (np.float16, 2), "f32": (np.float32, 4)}[dtype]
    st_dtype = {"bf16": "BF16", "f16": "F16", "f32": "F32"}[dtype]
    cfg = transformers.LlamaConfig(**(LLAMA_7B_CONFIG if config is None else config))
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(cfg)
    tensors = [(k, tuple(v.shape)) for k, v in skeleton.state_dict().items()
               if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = math.prod(shape) * width
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    os.makedirs(folder, exist_ok=True)
    cfg.save_pretrained(folder)
    files = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
             if len(shards) > 1 else ["model.safetensors"])
    weight_map, total = {}, 0
    bar = progress(list(range(len(tensors))), "synthetic checkpoint", show_progress, unit="tensor")
    ticks = iter(bar)
    for idx, (fname, shard) in enumerate(zip(files, shards)):
        header, off = {}, 0
        for name, shape in shard:
            n = math.prod(shape) * width
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes with spaces
        with open(os.path.join(folder, fname), "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            for j, (name, shape) in enumerate(shard):
                rng = np.random.default_rng([seed, idx, j])
                if name.endswith("norm.weight"):
                    a = np.ones(shape, np.float32)
                else:
                    a = rng.standard_normal(shape, dtype=np.float32)
                    a *= std
                if dtype == "bf16":  # round to nearest even into the top 16 bits
                    u = a.view(np.uint32)
                    u += 0x7FFF + ((u >> 16) & 1)
                    out = (u >> 16).astype(np.uint16)
                else:
                    out = a.astype(np_dtype)
                fh.write(out.tobytes())
                total += out.nbytes
                del a, out
                next(ticks, None)
    if len(files) > 1:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return total
