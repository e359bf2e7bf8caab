"""The built-in example: quantize a small transformer to FP16, BF16, INT8 and INT4 and print a
comparison table (size, compression, output error and top-1 agreement vs FP32, CPU latency).

Run it with ``python -m diffulex_edge.demo`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import List, Optional, Sequence

import torch

from .quant import QUANTIZERS, QuantizationConfig, model_size_bytes
from .testing import tiny_transformer

SCHEMES = [
    ("FP16", QuantizationConfig(dtype="fp16")),
    ("BF16", QuantizationConfig(dtype="bf16")),
    ("INT8 (weight-only)", QuantizationConfig(dtype="int8")),
    ("INT8 W8A8 dynamic", QuantizationConfig(dtype="int8", mode="dynamic")),
    ("INT4 g128", QuantizationConfig(dtype="int4", group_size=128, on_indivisible="pad")),
    ("INT4 g32", QuantizationConfig(dtype="int4", group_size=32, on_indivisible="pad")),
]


def _interleaved_latency_ms(models: Sequence[torch.nn.Module], x: torch.Tensor, reps: int) -> List[float]:
    """Median forward time of each model, timed round-robin (one call of every model per round) so
    that load changes on a shared machine hit every scheme alike instead of biasing one of them."""
    times: List[List[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            m(x)  # warm-up
        for _ in range(reps):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m(x)
                times[i].append(time.perf_counter() - t0)
    return [1000 * statistics.median(t) for t in times]


def run(dim: int = 256, layers: int = 4, vocab: int = 512, seq: int = 64, reps: int = 15, seed: int = 0) -> List[dict]:
    """Quantize the demo model with every scheme; returns one row (dict) per scheme."""
    model = tiny_transformer(seed=seed, vocab_size=vocab, dim=dim, layers=layers)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (1, seq), generator=gen)
    with torch.inference_mode():
        ref = model(tokens).float()
    base_size = model_size_bytes(model)
    rows = [{
        "scheme": "FP32 (reference)", "size_bytes": base_size, "compression": 1.0, "rel_error": 0.0,
        "top1": 1.0, "layers": 0, "time_s": 0.0,
    }]
    models = [model]
    for label, cfg in SCHEMES:
        result = QUANTIZERS[cfg.dtype](show_progress=False).quantize(model, cfg)
        with torch.inference_mode():
            out = result.model(tokens).float()
        rows.append({
            "scheme": label,
            "size_bytes": result.quantized_size_bytes,
            "compression": result.compression_ratio,
            "rel_error": float((out - ref).norm() / ref.norm()),
            "top1": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
            "layers": result.num_quantized_layers,
            "time_s": result.conversion_time_s,
        })
        models.append(result.model)
    for row, ms in zip(rows, _interleaved_latency_ms(models, tokens, reps)):
        row["latency_ms"] = ms
        row["speedup"] = rows[0]["latency_ms"] / ms if ms > 0 else float("nan")
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = f"{'scheme':<20} {'size':>10} {'compression':>11} {'logits rel.err':>14} {'top-1 agree':>11} {'latency':>10} {'speedup':>7} {'layers':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['scheme']:<20} {r['size_bytes'] / 2**20:>7.2f} MiB {r['compression']:>10.2f}x {r['rel_error']:>14.2e} "
            f"{100 * r['top1']:>10.1f}% {r['latency_ms']:>7.1f} ms {r['speedup']:>6.2f}x {r['layers']:>6}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m diffulex_edge.demo",
        description="Quantize a small Llama-style transformer (built locally, random weights) with every "
        "built-in scheme and compare size, output error vs FP32 and CPU latency.",
    )
    p.add_argument("--dim", type=int, default=256, help="hidden size (default 256)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size (default 512)")
    p.add_argument("--seq", type=int, default=64, help="tokens per forward pass (default 64)")
    p.add_argument("--reps", type=int, default=15,
                   help="timed rounds; each round runs every scheme once (median reported; default 15)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from . import kernel_info

    info = kernel_info()
    print(f"diffulex-edge demo: TinyTransformerLM dim={a.dim} layers={a.layers} vocab={a.vocab}, "
          f"{a.seq} tokens; CPU kernel {info['selected']}, {info['num_threads']} threads\n")
    rows = run(a.dim, a.layers, a.vocab, a.seq, a.reps, a.seed)
    print(format_table(rows))
    print("\nrel.err = ||logits_q - logits_fp32|| / ||logits_fp32||; top-1 agree = share of positions whose "
          "argmax token matches FP32; latency = median forward pass on CPU, schemes timed round-robin; "
          "speedup = FP32 latency / latency.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
