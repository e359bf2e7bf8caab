"""Quantization throughput per GGML type on a 4096 x 14336 f32 weight (a Llama-3-8B FFN matrix),
as a ratio to gguf-py's numpy quantizer for the types gguf-py supports.

    PYTHONPATH=python python benchmarks/bench_gguf.py [--rows 4096 --cols 14336] [--types Q8_0,Q4_0]

"search" is the default quantizer (weighted least-squares scale search); "rtn" is the
round-to-nearest mode that produces gguf-py's exact bytes — the like-for-like comparison.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from diffulex_edge import kernel_info
from diffulex_edge.gguf import GGML_TYPES, quantize

GGUF_PY_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "BF16"}
DEFAULT_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                 "IQ4_NL", "IQ4_XS", "F16", "BF16"]


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-gguf-py", action="store_true", help="skip the (slow) gguf-py baselines")
    ap.add_argument("--no-search", action="store_true", help="skip the (slow) default search mode")
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"weights {args.rows}x{args.cols} f32 ({mb:.0f} MB); native: {kernel_info()}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'type':<7} {'search s':>9} {'rtn s':>8} {'gguf-py s':>10} {'rtn/gguf-py':>12} {'search/gguf-py':>15}")
    for t in args.types.split(","):
        t = t.strip().upper()
        s_search = None if args.no_search else best_of(lambda: quantize(x, t), args.repeat)
        s_rtn = best_of(lambda: quantize(x, t, mode="rtn"), args.repeat) if GGML_TYPES[t].has_rtn else None
        s_ref = None
        if t in GGUF_PY_TYPES and not args.no_gguf_py:
            from gguf import GGMLQuantizationType, quants

            s_ref = best_of(lambda: quants.quantize(x, GGMLQuantizationType[t]), args.repeat)
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"
        ratio = lambda a: f"{s_ref / a:.1f}x" if (s_ref and a) else "-"
        print(f"{t:<7} {fmt(s_search):>9} {fmt(s_rtn):>8} {fmt(s_ref):>10} {ratio(s_rtn):>12} {ratio(s_search):>15}", flush=True)


if __name__ == "__main__":
    main()
