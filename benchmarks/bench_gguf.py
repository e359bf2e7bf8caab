"""Quantization throughput per GGML type on a 4096 x 14336 f32 weight (a Llama-3-8B FFN matrix),
as a ratio to gguf-py's numpy quantizer for the types gguf-py supports.

    PYTHONPATH=python python benchmarks/bench_gguf.py [--rows 4096 --cols 14336] [--types Q8_0,Q4_0] [--rounds 5]

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
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds per type; each round times gguf-py once and ours best-of-3, "
                         "and the ratio is taken within the round (load drift hits both alike)")
    ap.add_argument("--no-gguf-py", action="store_true", help="skip the (slow) gguf-py baselines")
    ap.add_argument("--no-search", action="store_true", help="skip the (slow) default search mode")
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"weights {args.rows}x{args.cols} f32 ({mb:.0f} MB); native: {kernel_info()}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if not args.no_gguf_py:
        # Untimed warm-up: the first gguf-py calls in a fresh process run up to 3x slower (glibc
        # serves their large temporaries with fresh mmaps, page-faulted on first touch, until a
        # freed block raises its mmap threshold), so without it the baseline would look slower
        # for whichever type is timed first.
        from gguf import GGMLQuantizationType, quants

        for t in ("Q4_0", "Q8_0"):
            quants.quantize(x[:1024], GGMLQuantizationType[t])
            quants.quantize(x, GGMLQuantizationType[t])
    print("times: median over rounds; ratios: median of per-round ratios [min..max]")
    print(f"{'type':<7} {'search s':>9} {'rtn s':>8} {'gguf-py s':>10} {'rtn/gguf-py':>22} {'search/gguf-py':>22}")
    for t in args.types.split(","):
        t = t.strip().upper()
        has_rtn = GGML_TYPES[t].has_rtn
        has_ref = t in GGUF_PY_TYPES and not args.no_gguf_py
        if has_ref:
            from gguf import GGMLQuantizationType, quants
        rows = []  # per round: (search s, rtn s, gguf-py s)
        for _ in range(args.rounds):
            s_ref = best_of(lambda t=t: quants.quantize(x, GGMLQuantizationType[t]), 1) if has_ref else None
            s_rtn = best_of(lambda t=t: quantize(x, t, mode="rtn"), 3) if has_rtn else None
            s_search = None if args.no_search else best_of(lambda t=t: quantize(x, t), 1)
            rows.append((s_search, s_rtn, s_ref))

        def med(vals):
            vals = [v for v in vals if v is not None]
            return float(np.median(vals)) if vals else None

        def ratio(i, rows=rows):
            r = [row[2] / row[i] for row in rows if row[2] and row[i]]
            return f"{np.median(r):.1f}x [{min(r):.1f}..{max(r):.1f}]" if r else "-"

        fmt = lambda v: f"{v:.4f}" if v is not None else "-"
        print(f"{t:<7} {fmt(med(r[0] for r in rows)):>9} {fmt(med(r[1] for r in rows)):>8} "
              f"{fmt(med(r[2] for r in rows)):>10} {ratio(1):>22} {ratio(0):>22}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
