"""Check that llama.cpp loads and runs diffulex-edge's GGUF exports, and compare perplexities.

    LLAMA_CPP_BIN_DIR=/path/to/llama.cpp/build/bin PYTHONPATH=python \
        python benchmarks/llama_cpp_check.py [--model examples/tiny-llama-wikitext] \
        [--text /work/shared/data/wikitext-2/test.txt] [--ctx 128] [--mixes F16,Q8_0,Q4_K_M,...]

Needs a llama.cpp build with the `llama-perplexity`, `llama-quantize`, `llama-tokenize` and
`llama-simple` targets (see docs/gguf.md). For the HF model and tokenizer in `--model` it

1. compares llama.cpp's tokenization of the text (llama-tokenize on our F16 export) with the HF
   tokenizer's, token for token;
2. exports each mix with `export_gguf`, runs `llama-perplexity -c CTX` on it, and evaluates the
   same file's dequantized weights in PyTorch (`GGUFFile` -> HF model) with llama.cpp's protocol
   (`eval.llama_cpp_perplexity`): the two must agree up to llama.cpp's f16 KV cache and float
   reassociation;
3. evaluates the original float32 HF model with the same protocol and with `eval.perplexity`;
4. quantizes our F16 export with llama.cpp's own `llama-quantize` (Q4_K_M) for a like-for-like
   comparison with our Q4_K_M export;
5. generates a few tokens with `llama-simple` from the F16 and Q4_K_M files.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from diffulex_edge.eval import llama_cpp_perplexity, perplexity
from diffulex_edge.export import export_gguf, load_gguf_weights
from diffulex_edge.gguf import GGUFFile

CHUNK_RE = re.compile(r"\[(\d+)\]([0-9.]+),")


def run(cmd, **kw) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def tool(bin_dir: str, name: str) -> str:
    path = os.path.join(bin_dir, name)
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: build llama.cpp with the {name} target")
    return path


def llama_perplexity(bin_dir, gguf, text, ctx, threads, chunks) -> float:
    """llama-perplexity's running PPL after `chunks` chunks.

    It is run for one chunk more and the running value printed after chunk `chunks` is taken:
    some llama.cpp builds lose the last log lines (the last chunk's value and the "Final
    estimate") when the process exits, because the asynchronous logger is stopped undrained.
    """
    out = run([tool(bin_dir, "llama-perplexity"), "-m", gguf, "-f", text, "-c", str(ctx), "-b", str(ctx),
               "-t", str(threads), "--no-warmup", "--chunks", str(chunks + 1)])
    vals = {int(k): float(v) for k, v in CHUNK_RE.findall(out)}
    if chunks not in vals:
        raise RuntimeError(f"no PPL after chunk {chunks} in llama-perplexity output:\n{out[-3000:]}")
    return vals[chunks]


def llama_tokenize(bin_dir, gguf, text_path) -> list:
    out = run([tool(bin_dir, "llama-tokenize"), "-m", gguf, "-f", text_path, "--ids", "--log-disable"])
    line = out.strip().splitlines()[-1]
    return [int(v) for v in line.strip("[] \n").split(",") if v.strip()]


def model_from_gguf(model, path):
    """A copy of the HF `model` with the GGUF file's (dequantized) weights."""
    return load_gguf_weights(copy.deepcopy(model), path).eval()


def activation_imatrix(model, ids: torch.Tensor, ctx: int) -> dict:
    """llama.cpp-style importance matrix: per nn.Linear, the mean squared input activation of each
    column over `ids` (run in disjoint windows of `ctx` tokens), keyed by HF module name."""
    sums, counts, hooks = {}, {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, inp, out, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_hook(hook))
    try:
        n = ids.numel() // ctx
        with torch.inference_mode():
            for b in range(0, n, 16):
                model(ids[b * ctx : min(n, b + 16) * ctx].reshape(-1, ctx))
    finally:
        for h in hooks:
            h.remove()
    return {k: (sums[k] / counts[k]).float().numpy() for k in sums}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.environ.get("LLAMA_CPP_BIN_DIR"))
    ap.add_argument("--model", default="examples/tiny-llama-wikitext")
    ap.add_argument("--text", default="/work/shared/data/wikitext-2/test.txt")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--mixes", default="F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,IQ4_XS,Q3_K_M,Q2_K,TQ2_0")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--llama-quantize", default="Q4_K_M,Q4_0",
                    help="types to quantize our F16 export to with llama.cpp's llama-quantize, for comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=600, help="score the first N chunks of CTX tokens")
    ap.add_argument("--prompt", default=" The game")
    ap.add_argument("--imatrix-text", default=None,
                    help="also export the mixes with an importance matrix from this (calibration) text")
    ap.add_argument("--imatrix-tokens", type=int, default=65536)
    args = ap.parse_args()
    if not args.bin_dir:
        raise SystemExit("pass --bin-dir or set LLAMA_CPP_BIN_DIR to llama.cpp's build/bin")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="llama_cpp_check_")
    os.makedirs(out_dir, exist_ok=True)
    with open(args.text, encoding="utf-8") as fh:
        text = fh.read()
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    adds_bos = bool(len(ids)) and tok.bos_token_id is not None and int(ids[0]) == tok.bos_token_id
    bos = tok.bos_token_id if adds_bos else None
    print(f"model {args.model}; text {args.text}: {len(ids)} HF tokens; ctx {args.ctx}; add_bos {adds_bos}; out {out_dir}")

    # 1. tokenization
    f16 = os.path.join(out_dir, "ours-F16.gguf")
    export_gguf(model, f16, quant="F16", tokenizer=tok)
    lids = llama_tokenize(args.bin_dir, f16, args.text)
    same = lids == ids.tolist()
    first_diff = next((i for i, (a, b) in enumerate(zip(lids, ids.tolist())) if a != b), min(len(lids), len(ids)))
    print(f"tokenization: llama.cpp {len(lids)} tokens, HF {len(ids)}; identical: {same}"
          + ("" if same else f" (first difference at token {first_diff})"))

    # 3. the float model
    t0 = time.perf_counter()
    ref = llama_cpp_perplexity(model, ids, n_ctx=args.ctx, bos_id=bos, max_chunks=args.chunks)
    n_eval = args.chunks * args.ctx
    ours_default = perplexity(model, ids, seq_len=args.ctx, max_tokens=n_eval, show_progress=False)
    print(f"HF float32: llama.cpp protocol PPL {ref.perplexity:.4f} ({ref.n_tokens} tokens, {ref.n_windows} chunks); "
          f"eval.perplexity(seq_len={args.ctx}) PPL {ours_default.perplexity:.4f} over {ours_default.n_tokens} tokens "
          f"({time.perf_counter() - t0:.1f} s)")

    # 2. + 4. mixes
    rows = []
    mixes = [m.strip().upper() for m in args.mixes.split(",") if m.strip()]
    files = []
    for mix in mixes:
        path = f16 if mix == "F16" else os.path.join(out_dir, f"ours-{mix}.gguf")
        rep = export_gguf(model, path, quant=mix, tokenizer=tok)
        types = ", ".join(f"{k}x{v}" for k, v in sorted(rep.type_counts().items()))
        files.append((f"ours {mix}", path, f"{rep.bits_per_weight:.2f}", types))
    if args.imatrix_text:
        with open(args.imatrix_text, encoding="utf-8") as fh:
            cal = torch.tensor(tok(fh.read())["input_ids"][: args.imatrix_tokens], dtype=torch.long)
        imat = activation_imatrix(model, cal, args.ctx)
        for mix in mixes:
            if mix in ("F16", "F32", "BF16"):
                continue
            path = os.path.join(out_dir, f"ours-{mix}-imatrix.gguf")
            rep = export_gguf(model, path, quant=mix, tokenizer=tok, imatrix=imat)
            types = ", ".join(f"{k}x{v}" for k, v in sorted(rep.type_counts().items()))
            files.append((f"ours {mix} + imatrix ({cal.numel()} tokens of {os.path.basename(args.imatrix_text)})",
                          path, f"{rep.bits_per_weight:.2f}", types))
    for q in [m.strip().upper() for m in args.llama_quantize.split(",") if m.strip()]:
        lq = os.path.join(out_dir, f"llama-quantize-{q}.gguf")
        run([tool(args.bin_dir, "llama-quantize"), f16, lq, q, str(args.threads)])
        g = GGUFFile.read(lq)
        counts = {}
        for t in g.tensors.values():
            counts[str(t.ggml_type)] = counts.get(str(t.ggml_type), 0) + 1
        bpw = 8.0 * sum(t.nbytes for t in g.tensors.values()) / sum(int(np.prod(t.shape)) for t in g.tensors.values())
        files.append((f"llama-quantize {q} (from ours F16)", lq, f"{bpw:.2f}",
                      ", ".join(f"{k}x{v}" for k, v in sorted(counts.items()))))
    for label, path, bpw, types in files:
        ppl = llama_perplexity(args.bin_dir, path, args.text, args.ctx, args.threads, args.chunks)
        torch_ppl = llama_cpp_perplexity(model_from_gguf(model, path), ids, n_ctx=args.ctx, bos_id=bos,
                                         max_chunks=args.chunks).perplexity
        rows.append((label, bpw, types, ppl, torch_ppl))
        print(f"{label:<40} bpw {bpw:>5}  llama.cpp PPL {ppl:.4f}  torch on the same weights {torch_ppl:.4f}"
              f"  ({100 * (ppl / torch_ppl - 1):+.2f}%)  [{types}]", flush=True)

    print("\n| file | bits/weight | tensor types | llama-perplexity PPL | PyTorch on the file's weights | diff |")
    print("|---|---|---|---|---|---|")
    print(f"| HF float32 (no file) | 32 | - | - | {ref.perplexity:.4f} | - |")
    for label, bpw, types, ppl, tp in rows:
        print(f"| {label} | {bpw} | {types} | {ppl:.4f} | {tp:.4f} | {100 * (ppl / tp - 1):+.2f}% |")

    # 5. generation: llama-simple (greedy) vs HF greedy decoding of the float model
    hf_ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        gen = model.generate(hf_ids, max_new_tokens=24, do_sample=False)
    print(f"HF float32 greedy: {tok.decode(gen[0])!r}")
    for label, path in (("F16", f16), ("Q4_K_M", os.path.join(out_dir, "ours-Q4_K_M.gguf"))):
        if os.path.exists(path):
            p = subprocess.run([tool(args.bin_dir, "llama-simple"), "-m", path, "-n", "24", args.prompt],
                               capture_output=True, text=True)
            print(f"llama-simple {label}: {p.stdout.strip(chr(10))!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
