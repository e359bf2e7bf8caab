"""Prints (as JSON) a sha256 of everything diffulex-edge computes that must not depend on the run
or on the number of rayon threads: quantized buffers of every QuantizedLinear format,
`diffulex_edge.gguf.quantize` bytes of every GGML type in both modes, exported GGUF files, and
forward outputs of the native kernels (GEMV and GEMM paths, serial and parallel sizes).

    RAYON_NUM_THREADS=1 python determinism_job.py OUT_DIR [--no-export]

test_determinism.py runs it with different RAYON_NUM_THREADS and compares the hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from formats import FORMATS, bits, inputs, quantized_layer  # noqa: E402

from diffulex_edge import kernel_info  # noqa: E402
from diffulex_edge.gguf import GGML_TYPES, quantize  # noqa: E402

# Sizes past the kernels' serial threshold (2^18 multiply-adds), with row counts that are not a
# multiple of the kernels' row blocking, so the parallel split differs between 1 and 2 threads.
D_IN, D_OUT = 512, 1000


def sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(bits(a).numpy().tobytes() if isinstance(a, torch.Tensor) else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def quantized_layers(out: dict) -> None:
    for fmt in FORMATS:
        for protect in (False, True):
            q = quantized_layer(fmt, protect, D_IN, D_OUT)
            out[f"layer/{fmt}/protect={protect}/buffers"] = sha(*[b for _, b in sorted(q.named_buffers())])
            with torch.no_grad():
                for x in inputs(seed=3, d=D_IN, rows=(1, 7, 64)):
                    out[f"layer/{fmt}/protect={protect}/forward/{x.shape[0]}x{x.dtype}"] = sha(q(x))


def calibrated_models(out: dict, out_dir: str) -> None:
    """quantize_ with calibration (static activation scales by each observer), the importance
    matrix, and save_quantized's safetensors bytes of the result."""
    from torch import nn

    from diffulex_edge.calib import compute_imatrix
    from diffulex_edge.quant import QuantizationConfig, quantize_, save_quantized

    def mlp():
        torch.manual_seed(11)
        return nn.Sequential(nn.Linear(D_IN, 1024), nn.GELU(), nn.Linear(1024, D_IN)).eval()

    g = torch.Generator().manual_seed(12)
    calib = [torch.randn(37, D_IN, generator=g) for _ in range(4)]
    imat = compute_imatrix(mlp(), calib, show_progress=False)
    out["calib/imatrix"] = sha(*[np.asarray(imat[k], np.float64) for k in sorted(imat)])
    for observer in ("minmax", "percentile", "mse"):
        m = mlp()
        quantize_(m, QuantizationConfig(dtype="int8", mode="static", observer=observer), calibration_data=calib,
                  show_progress=False)
        out[f"calib/static/{observer}/state"] = sha(*[v for _, v in sorted(m.state_dict().items())])
        p = os.path.join(out_dir, f"static-{observer}.safetensors")
        save_quantized(m, p)
        with open(p, "rb") as f:
            out[f"calib/static/{observer}/safetensors"] = hashlib.sha256(f.read()).hexdigest()


def gguf_quantize(out: dict) -> None:
    g = np.random.default_rng(5)
    w = (g.standard_normal((96, 1024)) * np.linspace(0.2, 2.0, 1024)).astype(np.float32)
    imp = g.random(1024).astype(np.float32) + 0.1
    for name, t in GGML_TYPES.items():
        modes = ["search", "rtn"] if t.has_rtn else ["search"]
        for mode in modes:
            out[f"gguf/{name}/{mode}"] = sha(quantize(w, name, mode=mode))
        out[f"gguf/{name}/search+imatrix"] = sha(quantize(w, name, imatrix=imp, mode="search"))


def export(out: dict, out_dir: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from diffulex_edge.export import export_gguf

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(cfg).eval()
    for quant in ("Q4_K_M", "Q8_0", "IQ4_XS", "TQ2_0"):
        for mode in ("search", "rtn"):
            p = os.path.join(out_dir, f"m-{quant}-{mode}.gguf")
            export_gguf(model, p, quant=quant, mode=mode, show_progress=False)
            with open(p, "rb") as f:
                out[f"export/{quant}/{mode}"] = hashlib.sha256(f.read()).hexdigest()


def main() -> None:
    out_dir = sys.argv[1]
    out = {}
    quantized_layers(out)
    calibrated_models(out, out_dir)
    gguf_quantize(out)
    if "--no-export" not in sys.argv:
        export(out, out_dir)
    out["_threads"] = kernel_info()["num_threads"]
    json.dump(out, sys.stdout, indent=0, sort_keys=True)


if __name__ == "__main__":
    main()
