"""Quantization error of every GGML type: ours (default search) vs gguf-py's quantizer where it has
one, on Gaussian and Student-t(3) weights, and how much an importance matrix lowers the weighted
error. Prints one line per type.

    PYTHONPATH=python python benchmarks/gguf_error_table.py [--rows 64 --cols 4096]
"""

from __future__ import annotations

import argparse

import numpy as np

from diffulex_edge.gguf import dequantize, quantize

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
         "IQ4_XS"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args()
    from gguf import GGMLQuantizationType
    from gguf import quants as gq

    rng = np.random.default_rng(0)
    shape = (args.rows, args.cols)
    data = {"gauss": rng.standard_normal(shape).astype(np.float32),
            "student-t3": rng.standard_t(3, shape).astype(np.float32)}
    # log-normal-ish importances: a few columns matter much more than the rest
    imp = (rng.standard_normal(args.cols) ** 2 * np.exp(rng.standard_normal(args.cols))).astype(np.float32)
    print(f"{'type':<7} {'gauss RMSE ours / gguf-py':>27} {'student-t3 RMSE ours / gguf-py':>31} "
          f"{'weighted err, imatrix / none':>29}")
    for t in TYPES:
        cells = []
        for x in data.values():
            ours = float(np.sqrt(np.mean((dequantize(quantize(x, t), t) - x) ** 2)))
            try:
                g = GGMLQuantizationType[t]
                with np.errstate(all="ignore"):
                    ref = float(np.sqrt(np.mean((gq.dequantize(gq.quantize(x, g), g) - x) ** 2)))
                cells.append(f"{ours:.4f} / {ref:.4f}")
            except NotImplementedError:  # gguf-py cannot quantize this type
                cells.append(f"{ours:.4f} / -")
        x = data["gauss"]

        def werr(q, t=t, x=x):
            return float(np.sum(imp * (dequantize(q, t) - x) ** 2))

        ratio = werr(quantize(x, t, imatrix=imp)) / werr(quantize(x, t))
        print(f"{t:<7} {cells[0]:>27} {cells[1]:>31} {ratio:>29.3f}")


if __name__ == "__main__":
    main()
