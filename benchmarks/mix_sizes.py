#!/usr/bin/env python
"""File size of each llama.cpp mix on a model shaped like Llama-2-7B (or any shape given), from
`plan_gguf` on a meta-device model: no weights are made, the sizes are those the export writes
(tensor data; the header adds a few MiB of metadata and vocabulary).

    python benchmarks/mix_sizes.py [--hidden 4096 --inter 11008 --layers 32 --heads 32 --kv 32 --vocab 32000]
"""

from __future__ import annotations

import argparse
import logging
import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from diffulex_edge.export.gguf_export import plan_gguf
from diffulex_edge.gguf import GGML_TYPES

MIXES = ["F16", "Q8_0", "Q6_K", "Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_M", "IQ3_XXS", "Q2_K", "IQ2_M", "IQ2_XS",
         "IQ2_XXS", "IQ1_M", "IQ1_S"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in [("hidden", 4096), ("inter", 11008), ("layers", 32), ("heads", 32), ("kv", 32), ("vocab", 32000)]:
        ap.add_argument(f"--{k}", type=int, default=v)
    a = ap.parse_args()
    logging.getLogger("diffulex_edge").setLevel(logging.ERROR)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    rows = []
    for mix in MIXES:
        plan = plan_gguf(model, mix)
        size = sum(GGML_TYPES[t.ggml_type].row_bytes(t.shape[-1]) * math.prod(t.shape[:-1]) for t in plan.tensors)
        n = sum(math.prod(t.shape) for t in plan.tensors)
        rows.append((mix, size, size * 8 / n))
    f16 = rows[0][1]
    print(f"Llama shape hidden {a.hidden}, ffn {a.inter}, {a.layers} layers, {a.heads}/{a.kv} heads, vocab {a.vocab}")
    print("| mix | GiB | bits/weight | FP16 / mix |\n|---|---|---|---|")
    for mix, size, bpw in rows:
        print(f"| {mix} | {size / 2**30:.2f} | {bpw:.3f} | {f16 / size:.2f}x |")


if __name__ == "__main__":
    main()
