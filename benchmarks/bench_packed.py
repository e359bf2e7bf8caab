#!/usr/bin/env python
"""Speed of every packed layer format (the native registry: GGML block types, NF4) on CPU, as
ratios to torch FP32 ``F.linear`` measured in the same interleaved rounds, and batch-1 weight
bandwidth as a share of the copy bandwidth measured in the same run.

    RAYON_NUM_THREADS=2 python benchmarks/bench_packed.py              # 4096x4096, batch 1 and 64
    RAYON_NUM_THREADS=2 python benchmarks/bench_packed.py --quick      # fewer rounds (smoke test)
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # before the native module starts its pool

import argparse
import statistics
import sys
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import COPY_BYTES, copy_dst, copy_src, interleaved  # noqa: E402

from diffulex_edge.quant import PACKED_FORMATS, QuantizedLinear  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rounds, min_time = (3, 0.05) if a.quick else (7, 0.2)
    torch.manual_seed(0)
    lin = nn.Linear(a.k, a.n, bias=False)
    w32 = lin.weight.detach()
    layers = {name: QuantizedLinear.from_linear(lin, name) for name in PACKED_FORMATS}
    print(f"{a.n}x{a.k}, {a.threads} threads, {rounds} interleaved rounds; ratio = torch FP32 time / time")
    print(f"{'format':<8} {'bits/w':>6} {'batch 1':>8} {'GB/s':>6} {'of copy':>8} {'batch 64':>9}")
    for m in (1, 64):
        x = torch.randn(m, a.k)
        variants: Dict[str, Callable[[], object]] = {"torch fp32": lambda x=x: F.linear(x, w32)}
        for name, q in layers.items():
            variants[name] = lambda q=q, x=x: q(x)
        if m == 1:
            variants["copy"] = lambda: copy_dst.copy_(copy_src)
        with torch.inference_mode():
            times = interleaved(variants, rounds, min_time)
        if m == 1:
            copy_gbs = statistics.median(2 * COPY_BYTES / t / 1e9 for t in times["copy"])
            b1 = times
        else:
            b64 = times
    print(f"{'fp32':<8} {32:>6.2f} {'1.00x':>8} {a.k * a.n * 4 / statistics.median(b1['torch fp32']) / 1e9:>6.1f} "
          f"{a.k * a.n * 4 / statistics.median(b1['torch fp32']) / 1e9 / copy_gbs:>7.0%} {'1.00x':>9}")
    for name, q in layers.items():
        nbytes = q.qweight.numel()
        r1 = statistics.median(b / t for b, t in zip(b1["torch fp32"], b1[name]))
        r64 = statistics.median(b / t for b, t in zip(b64["torch fp32"], b64[name]))
        gbs = nbytes / statistics.median(b1[name]) / 1e9
        print(f"{name:<8} {nbytes * 8 / (a.k * a.n):>6.2f} {r1:>7.2f}x {gbs:>6.1f} {gbs / copy_gbs:>7.0%} {r64:>8.2f}x")
    print(f"copy bandwidth (read + write): {copy_gbs:.1f} GB/s")


if __name__ == "__main__":
    main()
