"""Calibration on the tiny WikiText-2 Llama: imatrix-weighted INT4, SmoothQuant W8A8 and the
static INT8 observers, scored by perplexity on the WikiText-2 test split.

    PYTHONPATH=python python examples/calibrate_tiny_llama.py [--samples 128] [--max-tokens 65536] [--plant-outliers 30]

Calibration text is the validation split (never the test split the perplexity is measured on).
``--plant-outliers F`` first multiplies 4 channels of every norm by F and divides the matching
weight columns of the layers reading it by F: the float model computes the same function, but its
activations now have the channel outliers real LLMs have (what SmoothQuant is for).
"""

import argparse
import os
import tempfile
import time

import torch

from diffulex_edge.calib import (
    CalibrationDataset,
    ImportanceMatrix,
    SmoothQuantConfig,
    compute_imatrix,
    smoothquant_w8a8,
)
from diffulex_edge.data import wikitext2
from diffulex_edge.eval import perplexity
from diffulex_edge.hf import load_model
from diffulex_edge.quant import INT4Quantizer, INT8Quantizer, QuantizationConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def plant_outliers(model, factor: float, n: int = 4, seed: int = 0) -> None:
    """Function-preserving activation outliers: norm channels x factor, consumer columns / factor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, lins in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                               (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                idx = torch.randperm(norm.weight.numel(), generator=g)[:n]
                norm.weight[idx] *= factor
                for lin in lins:
                    lin.weight[:, idx] /= factor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "tiny-llama-wikitext"))
    ap.add_argument("--valid", default=None, help="calibration text (default: the bundled WikiText-2 valid sample, or the full split when DIFFULEX_EDGE_WIKITEXT2 names its folder)")
    ap.add_argument("--test", default=None, help="evaluation text (default: WikiText-2 test, as --valid)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--plant-outliers", type=float, default=None, metavar="F",
                    help="give 4 channels per norm F times larger activations (the float function is unchanged)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: the tiny model gains nothing from more, and OpenMP spinning "
                         "collapses on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    if args.plant_outliers:
        plant_outliers(model, args.plant_outliers)
    calib = CalibrationDataset(args.valid or wikitext2("valid"), tok, n_samples=args.samples, seq_len=args.seq_len,
                               batch_size=8, show_progress=False)
    test = args.test or wikitext2("test")

    def ppl(m):
        return perplexity(m, test, tok, seq_len=args.seq_len, max_tokens=args.max_tokens, reference_model=model,
                          show_progress=False)

    t0 = time.perf_counter()
    im = compute_imatrix(model, calib, dataset_name="wikitext-2 valid")
    print(f"imatrix over {calib.n_samples} x {args.seq_len} tokens: {time.perf_counter() - t0:.2f} s")
    path = os.path.join(tempfile.mkdtemp(), "imatrix.gguf")
    im.save(path)
    im = ImportanceMatrix.load(path, model)  # what a llama.cpp user would hand back

    rows = [("fp32", model)]
    for g in (128, 32):
        cfg = QuantizationConfig(dtype="int4", group_size=g)
        rows.append((f"int4 g{g} round-to-nearest", INT4Quantizer().quantize(model, cfg).model))
        rows.append((f"int4 g{g} imatrix", INT4Quantizer().quantize(model, cfg, imatrix=im).model))
    dyn = QuantizationConfig(dtype="int8", mode="dynamic")
    rows.append(("w8a8 dynamic", INT8Quantizer().quantize(model, dyn).model))
    for alpha in (0.5, 0.8):
        res, rep = smoothquant_w8a8(model, calib, SmoothQuantConfig(alpha=alpha), dyn)
        rows.append((f"w8a8 dynamic + SmoothQuant a={alpha}", res.model))
    for obs in ("minmax", "percentile", "mse"):
        st = QuantizationConfig(dtype="int8", mode="static", observer=obs)
        rows.append((f"w8a8 static {obs}", INT8Quantizer().quantize(model, st, calibration_data=calib).model))
    res, rep = smoothquant_w8a8(model, calib, SmoothQuantConfig(alpha=0.5),
                                QuantizationConfig(dtype="int8", mode="static", observer="mse"))
    rows.append(("w8a8 static mse + SmoothQuant a=0.5", res.model))
    print(rep)
    print(f"\n{'variant':<38} {'ppl':>9} {'KL vs fp32':>11} {'top-1 agree':>11}")
    for name, m in rows:
        r = ppl(m)
        print(f"{name:<38} {r.perplexity:9.4f} {r.kl_divergence:11.3e} {100 * r.top1_agreement:10.2f}%")


if __name__ == "__main__":
    main()
