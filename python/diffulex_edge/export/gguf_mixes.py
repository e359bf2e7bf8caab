"""Per-tensor GGML type selection for GGUF export: llama.cpp's standard mixes (`Q4_K_M`, ...).

The rules follow `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp (read for reference):
a base type per mix, output (and token embeddings when they double as the output) at Q6_K,
more bits for `attn_v` / `ffn_down` in the layers `use_more_bits` picks, and a fallback type when a
row length is not a multiple of the block size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple, Union

from ..errors import ConfigError
from ..gguf.quants import GGML_TYPES

#: mix name -> (base type, llama_ftype id written to general.file_type)
MIXES: Dict[str, Tuple[str, int]] = {
    "F32": ("F32", 0), "F16": ("F16", 1), "BF16": ("BF16", 32),
    "Q4_0": ("Q4_0", 2), "Q4_1": ("Q4_1", 3), "Q5_0": ("Q5_0", 8), "Q5_1": ("Q5_1", 9), "Q8_0": ("Q8_0", 7),
    "Q2_K": ("Q2_K", 10), "Q3_K_S": ("Q3_K", 11), "Q3_K_M": ("Q3_K", 12), "Q3_K_L": ("Q3_K", 13),
    "Q4_K_S": ("Q4_K", 14), "Q4_K_M": ("Q4_K", 15), "Q5_K_S": ("Q5_K", 16), "Q5_K_M": ("Q5_K", 17),
    "Q6_K": ("Q6_K", 18), "IQ4_NL": ("IQ4_NL", 25), "IQ4_XS": ("IQ4_XS", 30),
    "TQ1_0": ("TQ1_0", 36), "TQ2_0": ("TQ2_0", 37),
    # the lattice-codebook mixes (llama_ftype ids of llama.h; IQ2_S's base is IQ2_XS, as in llama.cpp)
    "IQ1_S": ("IQ1_S", 24), "IQ1_M": ("IQ1_M", 31), "IQ2_XXS": ("IQ2_XXS", 19), "IQ2_XS": ("IQ2_XS", 20),
    "IQ2_S": ("IQ2_XS", 28), "IQ2_M": ("IQ2_S", 29), "IQ3_XXS": ("IQ3_XXS", 23), "IQ3_XS": ("IQ3_S", 22),
    "IQ3_S": ("IQ3_S", 26), "IQ3_M": ("IQ3_S", 27),
}

#: the mixes below ~2.5 bits that share llama.cpp's low-bit rules (attn_v, first ffn_down, attn_output)
LOW_BIT_MIXES = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")

#: mixes whose quantizers llama.cpp refuses to run without an importance matrix (llama-quantize
#: stops with "Please do not do that"); ours run, weighting by magnitude, and say so
NEEDS_IMATRIX_IN_LLAMA_CPP = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S")

#: llama.cpp's fallbacks for rows that are not a multiple of the block size (`tensor_type_fallback`)
FALLBACK = {"TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL",
            "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL",
            "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL"}

UNQUANTIZED = ("F32", "F16", "BF16")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class MixContext:
    mix: str
    n_layers: int
    n_gqa: int = 1
    has_output: bool = True
    has_imatrix: bool = False


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def mix_type(name: str, row_len: int, ctx: MixContext) -> str:
    """The type llama.cpp's mix `ctx.mix` gives the 2-D weight `name`, before block-size fallback."""
    if ctx.mix not in MIXES:
        raise ConfigError(f"unknown GGUF quantization mix {ctx.mix!r}; supported: {', '.join(MIXES)}")
    base, _ = MIXES[ctx.mix]
    mix, t = ctx.mix, base
    if base in UNQUANTIZED:
        return base
    i, n = _layer(name), ctx.n_layers
    if name == "output.weight" or (not ctx.has_output and name == "token_embd.weight"):
        if row_len % GGML_TYPES[t].block_size != 0:
            return "Q8_0"
        if mix in LOW_BIT_MIXES or mix == "IQ3_XXS":
            return "Q5_K"
        return t if t == "Q8_0" else "Q6_K"
    if name == "token_embd.weight":
        if mix in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if mix in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        return "Q4_K" if mix in ("TQ1_0", "TQ2_0") else t
    if mix in LOW_BIT_MIXES:
        mid = "IQ3_S" if mix in ("IQ2_S", "IQ2_M") else "Q2_K"
        if "attn_v.weight" in name:
            return "Q4_K" if ctx.n_gqa >= 4 else mid
        if "ffn_down" in name:
            return mid if i < n // 8 else t
        if "attn_output.weight" in name:
            return {"IQ1_S": "IQ2_XXS", "IQ1_M": "IQ2_XXS", "IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S"}.get(mix, t)
        return t
    if "attn_v.weight" in name:
        if mix == "Q2_K":
            t = "Q4_K" if ctx.n_gqa >= 4 else "Q3_K"
        elif mix == "IQ3_XXS":
            t = "Q4_K" if ctx.n_gqa >= 4 else ("IQ3_S" if not ctx.has_imatrix else "IQ3_XXS")
        elif mix in ("IQ3_XS", "IQ3_S") and ctx.n_gqa >= 4:
            t = "Q4_K"
        elif mix == "IQ3_M":
            t = "Q4_K"
        elif mix == "Q3_K_M":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif mix == "Q3_K_L":
            t = "Q5_K"
        elif mix in ("IQ4_NL", "IQ4_XS") and ctx.n_gqa >= 4:
            t = "Q5_K"
        elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            t = "Q6_K"
        elif mix == "Q4_K_S" and i < 4:
            t = "Q5_K"
    elif "attn_k.weight" in name or "attn_q.weight" in name:
        t = {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(mix, t)
    elif "ffn_gate" in name or "ffn_up" in name:
        if mix == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            t = "IQ3_XXS"
    elif "ffn_down" in name:
        if mix == "Q2_K":
            t = "Q3_K"
        elif mix == "IQ3_XXS" and not ctx.has_imatrix:
            t = "Q4_K" if i < n // 8 else "Q3_K"
        elif mix == "Q3_K_M":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif mix == "IQ3_M" and i < n // 8:
            t = "Q4_K"
        elif mix == "Q3_K_L":
            t = "Q5_K"
        elif mix == "Q4_K_M":
            if use_more_bits(i, n):
                t = "Q6_K"
        elif i < n // 8 and mix in ("IQ4_NL", "IQ4_XS") and not ctx.has_imatrix:
            t = "Q5_K"
        elif mix == "Q5_K_M" and use_more_bits(i, n):
            t = "Q6_K"
        elif mix == "Q4_K_S" and i < n // 8:
            t = "Q5_K"
        elif mix in ("Q4_0", "Q5_0") and ctx.has_imatrix and i < n // 8:
            t = "Q4_1" if mix == "Q4_0" else "Q5_1"
    elif "attn_output.weight" in name:
        t = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(mix, t)
    return t


def with_fallback(t: str, row_len: int) -> Tuple[str, bool]:
    """`t`, or llama.cpp's fallback when `row_len` is not a multiple of its block size (then F16)."""
    if row_len % GGML_TYPES[t].block_size == 0:
        return t, False
    f = FALLBACK.get(t, "F16")
    if row_len % GGML_TYPES[f].block_size != 0:
        f = "F16"
    return f, True


Overrides = Union[None, Dict[str, str], Sequence[Tuple[str, str]]]


def compile_overrides(overrides: Overrides):
    items = list(overrides.items()) if isinstance(overrides, dict) else list(overrides or [])
    out = []
    for pattern, t in items:
        t = str(t).upper()
        if t not in GGML_TYPES:
            raise ConfigError(f"override {pattern!r}: unknown GGML type {t!r}; supported: {', '.join(GGML_TYPES)}")
        out.append((re.compile(pattern), t))
    return out


def choose_type(name: str, shape: Sequence[int], ctx: MixContext, overrides=()) -> Tuple[str, str]:
    """(type, why) for a tensor of numpy `shape`. 1-D tensors (norms, biases) stay F32."""
    if len(shape) < 2:
        return "F32", "1-D"
    row_len = int(shape[-1])
    for rx, t in overrides:
        if rx.search(name):
            t2, fell = with_fallback(t, row_len)
            return t2, (f"override {rx.pattern!r} -> {t}, fallback" if fell else f"override {rx.pattern!r}")
    t = mix_type(name, row_len, ctx)
    t2, fell = with_fallback(t, row_len)
    if fell:
        return t2, f"{ctx.mix} wants {t}; row {row_len} not a multiple of its block: fallback"
    base = MIXES[ctx.mix][0]
    return t2, (ctx.mix if t2 == base else f"{ctx.mix} rule: {base} -> {t2}")
