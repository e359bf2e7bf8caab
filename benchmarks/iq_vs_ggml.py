#!/usr/bin/env python
"""Our block quantizers against llama.cpp's own (`ggml_quantize_chunk` of a llama.cpp build's
libggml-base), on the same rows and the same importance matrix: importance-weighted RMS error
and time, per type. Data: 64 rows x 2048, Gaussian or Student-t (4 dof); importances drawn once.

    LLAMA_CPP_BIN_DIR=/path/to/llama.cpp/build/bin python benchmarks/iq_vs_ggml.py [--data gauss|t4] [--types ...]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as GQT
from gguf import quants as gq

from diffulex_edge.gguf import GGML_TYPES, dequantize, quantize

TYPES = ["IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "Q2_K", "Q3_K", "IQ4_XS"]


def ggml(bin_dir: Path):
    lib = ctypes.CDLL(str(bin_dir / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["gauss", "t4"], default="gauss")
    ap.add_argument("--types", default=",".join(TYPES))
    a = ap.parse_args()
    lib = ggml(Path(os.environ["LLAMA_CPP_BIN_DIR"]))
    rng = np.random.default_rng(0)
    shape = (64, 2048)
    x = (rng.standard_normal(shape) if a.data == "gauss" else rng.standard_t(4, shape)).astype(np.float32)
    imp = (rng.uniform(0.2, 3, shape[1]) ** 2).astype(np.float32)
    werr = lambda y: float(np.sqrt((((y - x) ** 2) * imp).mean() / imp.mean()))  # noqa: E731
    print(f"{a.data} {shape[0]}x{shape[1]}, importance-weighted RMSE (lower is better), 2 threads ours / 1 llama.cpp")
    print("| type | bits/weight | ours | llama.cpp | ours / llama.cpp | ours s | llama.cpp s |\n|---|---|---|---|---|---|---|")
    for t in a.types.split(","):
        info = GGML_TYPES[t]
        lib.ggml_quantize_init(info.id)
        quantize(x[:1, :256], t)  # build the codebook tables outside the timing
        t0 = time.perf_counter()
        ours = dequantize(quantize(x, t, imatrix=imp), t)
        t1 = time.perf_counter()
        out = np.zeros(shape[0] * info.row_bytes(shape[1]), np.uint8)
        lib.ggml_quantize_chunk(info.id, x.ctypes.data, out.ctypes.data, 0, shape[0], shape[1], imp.ctypes.data)
        t2 = time.perf_counter()
        theirs = gq.dequantize(out, GQT[t]).reshape(shape)
        e0, e1 = werr(ours), werr(theirs)
        print(f"| {t} | {info.type_size * 8 / info.block_size:.4g} | {e0:.4f} | {e1:.4f} | {e0 / e1:.3f} | "
              f"{t1 - t0:.3f} | {t2 - t1:.3f} |")


if __name__ == "__main__":
    main()
